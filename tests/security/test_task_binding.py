"""Attack 4 (inconsistent tasks): the server gives sites different training configs.

Giving every site but a victim ``learning_rate = 1e-9`` makes their updates vanish, so the
secure sum is the victim's update. Each site now signs the hash of the whole task it was
given (:meth:`~confide.protocol.tasks.SecureTask.task_sha256`) with its advertisement and
checks every peer's: a site given another task makes *every* site abort at ``share``, before
any encrypted share or masked input leaves it. The tests use the real round engine (SQLite
store) and the real :class:`~confide.client.secure.SecureParticipant` of each site; the
server's tampering is an edit of one site's task JSON between the engine and the site.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from confide.errors import SecAggAbortError
from confide.protocol.tasks import DPSGDConfig, PrivacyTask, SecureTask, TrainConfig, parse_task
from tests.security.peers import STAGES
from tests.server.test_secagg_rounds import IDS, Fed, _config, _start

VICTIM = "a"


def _stored(fed: Fed) -> set[str]:
    return {stage for r in fed.eng.store.rounds() for stage in STAGES
            if fed.eng.store.submissions(r.round, stage)}  # fmt: skip


def _advertise(fed: Fed, tamper: Any) -> None:
    """Every site advertises; all but the victim get ``tamper(task)`` instead of the task."""
    for c in IDS:
        task = fed.eng.task_for(c).to_json()
        assert task["action"] == "advertise"
        if c != VICTIM:
            task = tamper(copy.deepcopy(task))
        fed.submit(c, "advertise", fed.parts[c].advertise(task))
    assert fed.eng.tick()
    assert fed.stage() == "share"


def _lr(task: dict[str, Any]) -> dict[str, Any]:
    task["config"]["learning_rate"] = 1e-9
    return task


def _epochs(task: dict[str, Any]) -> dict[str, Any]:
    task["config"]["epochs"] += 1
    return task


def _seed(task: dict[str, Any]) -> dict[str, Any]:
    task["seed"] += 1
    return task


@pytest.mark.parametrize("tamper", [_lr, _epochs, _seed], ids=["learning_rate", "epochs", "seed"])
def test_sites_given_different_tasks_all_abort_at_share(tmp_path: Path, tamper: Any) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    _advertise(fed, tamper)
    for c in IDS:
        task = fed.eng.task_for(c).to_json()
        assert task["action"] == "share"
        with pytest.raises(SecAggAbortError) as err:
            fed.parts[c].answer(task)
        assert err.value.reason == "task-mismatch", err.value
        assert not fed.parts[c].known(1)  # the round's secrets are gone
    # Only the advertisements (public keys) ever reached the server: no share, no update.
    assert _stored(fed) == {"advertise"}
    fed.clock.now += 1000  # the share deadline passes with nothing uploaded
    fed.eng.tick()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status != "committed"
    assert _stored(fed) == {"advertise"}


def test_identical_tasks_still_run_the_round(tmp_path: Path) -> None:
    """The control: the same script without tampering gets every site past ``share``."""
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    _advertise(fed, lambda task: task)
    for c in IDS:
        fed.submit(c, "share", fed.parts[c].answer(fed.eng.task_for(c).to_json()))
    assert _stored(fed) == {"advertise", "share"}


def test_a_task_hash_edited_in_transit_fails_the_signature(tmp_path: Path) -> None:
    """The clear ``task_sha256`` cannot be rewritten to match: it is signed."""
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    _advertise(fed, _lr)
    task = fed.eng.task_for(VICTIM).to_json()
    adverts = task["broadcast"]["advertisements"]
    mine = next(a for a in adverts if a["client_id"] == VICTIM)["task_sha256"]
    for a in adverts:
        a["task_sha256"] = mine  # the server makes the others look like the victim's task
    with pytest.raises(SecAggAbortError) as err:
        fed.parts[VICTIM].answer(task)
    assert err.value.reason == "bad-signature"
    assert "share" not in _stored(fed)


def _task(**kw: Any) -> SecureTask:
    base: dict[str, Any] = {
        "round": 3,
        "stage": "advertise",
        "deadline": 100.0,
        "seed": 11,
        "payload": {"cohort": ["a", "b"]},
        "model_sha256": "ab" * 32,
        "config": TrainConfig(epochs=2, learning_rate=0.05),
        "privacy": PrivacyTask(
            mode="sample",
            delta=1e-5,
            dp=DPSGDConfig(noise_multiplier=1.1, clip_norm=1.0, sampling_rate=0.1, steps=4),
            rounds=5,
        ),
    }
    return SecureTask(**{**base, **kw})


def test_the_task_hash_covers_every_field_sites_must_share() -> None:
    ref = _task().task_sha256()
    # Known answer: the canonical JSON is frozen (a change here is a wire change).
    assert ref.hex() == "f2508b0ee1277c1ce96ae7547530466bdefb2b2db7e038a9d0b06e3d2b486f97"
    assert _task(deadline=5.0).task_sha256() == ref  # timing only
    assert parse_task(_task().to_json()).task_sha256() == ref  # what the site parses
    changed = {
        "round": _task(round=4),
        "seed": _task(seed=12),
        "setup": _task(payload={"cohort": ["a", "c"]}),
        "model": _task(model_sha256="cd" * 32),
        "lr": _task(config=TrainConfig(epochs=2, learning_rate=1e-9)),
        "epochs": _task(config=TrainConfig(epochs=3, learning_rate=0.05)),
        "mu": _task(config=TrainConfig(epochs=2, learning_rate=0.05, proximal_mu=0.1)),
        "dp_z": _task(
            privacy=PrivacyTask(
                mode="sample",
                delta=1e-5,
                dp=DPSGDConfig(noise_multiplier=0.1, clip_norm=1.0, sampling_rate=0.1, steps=4),
                rounds=5,
            )
        ),
        "rounds": _task(
            privacy=PrivacyTask(
                mode="sample",
                delta=1e-5,
                dp=DPSGDConfig(noise_multiplier=1.1, clip_norm=1.0, sampling_rate=0.1, steps=4),
                rounds=6,
            )
        ),
        "no_dp": _task(privacy=None),
    }
    hashes = {name: t.task_sha256() for name, t in changed.items()}
    assert ref not in hashes.values()
    assert len(set(hashes.values())) == len(hashes)


# --- the same attack over real HTTP, against real clients -------------------------------


async def test_sites_given_different_tasks_over_http_reveal_nothing(
    make_fed: Any, tmp_path: Path
) -> None:
    """A malicious server hands two of three real ``Client``s ``learning_rate = 1e-9``.

    The server is the real aiohttp app over loopback; its engine's ``task_for`` is wrapped
    (the attacker edits the tasks it serves). Every site aborts at ``share``: the store holds
    advertisements (public keys) only, nothing of any later stage, and no round commits.
    """
    import asyncio
    import dataclasses

    import numpy as np

    from tests.security.test_certified_peers import SECURE
    from tests.server.util import write_job
    from tests.sites import run_site
    from tests.support import PermissivePolicy

    fed = await make_fed(write_job(tmp_path / "job", **SECURE, job__rounds=1))
    honest_task_for = fed.engine.task_for

    def malicious_task_for(client_id: str) -> Any:
        task = honest_task_for(client_id)
        if (
            isinstance(task, SecureTask)
            and task.stage == "advertise"
            and client_id != "victim"
            and task.config is not None
        ):
            return dataclasses.replace(
                task, config=dataclasses.replace(task.config, learning_rate=1e-9)
            )
        return task

    fed.engine.task_for = malicious_task_for  # type: ignore[method-assign]

    lines: list[str] = []

    async def site(cid: str, seed: int) -> Any:
        rng = np.random.default_rng(seed)
        return await run_site(
            fed,
            tmp_path / cid,
            cid,
            PermissivePolicy(),
            rng,
            retry_timeout=10.0,
            poll_wait=1.0,
            log=lines.append,
        )

    runs = [asyncio.ensure_future(site(c, k)) for k, c in enumerate(["victim", "s1", "s2"])]

    async def aborted_at_share() -> None:
        # Every site advertises (its own signed task hash) ...
        while len(fed.engine.store.submissions(1, "advertise")) < 3:
            await asyncio.sleep(0.05)
        # ... then refuses at share (each says why) ...
        while sum("task-mismatch" in line for line in lines) < 3:
            await asyncio.sleep(0.05)
        # ... and the share deadline runs out with nothing uploaded.
        while not any(r.status == "aborted" or r.round > 1 for r in fed.engine.store.rounds()):
            fed.clock.now += 5.0
            fed.engine.tick()
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(aborted_at_share(), 120.0)
    finally:
        for r in runs:
            r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
    assert fed.engine.store.submissions(1, "advertise")  # the attack round did start
    stored = {
        stage
        for r in fed.engine.store.rounds()
        for stage in ("advertise", "share", "mask", "consistency", "unmask", "train")
        if fed.engine.store.submissions(r.round, stage)
    }
    assert stored == {"advertise"}
    assert all(r.status != "committed" for r in fed.engine.store.rounds())
    left = [line for line in lines if "left the round" in line]
    assert {line.split(":")[0] for line in left} == {"victim", "s1", "s2"}, left
