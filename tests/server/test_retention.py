"""Long jobs stay flat: the paginated ``/v1/status``, ``[retention]`` and crash-safe pruning.

Real HTTP on loopback (pytest-aiohttp) with two enrolled sites; rounds are driven by the
sites' uploads, never by sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from confide.errors import ConfigError
from confide_server.blobs import BlobStore
from confide_server.config import RetentionConfig
from confide_server.engine.retention import Retention
from confide_server.ledger import load_public_key, read_ledger, verify_ledger
from confide_server.metrics import round_rows
from tests.server.conftest import Fed
from tests.server.util import delta_body, eval_body, signed, tiny_manifest, write_job

MANIFEST = tiny_manifest()
SITES = ("alice", "bob")


async def _fed(make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path, **kw: Any) -> Fed:
    cfg = write_job(tmp_path, **{"job__rounds": 40, **kw})
    fed = await make_fed(cfg)
    for cid in SITES:
        await fed.enroll(cid)
        await fed.task(cid)
    return fed


async def _wait_round(fed: Fed, round_id: int, action: str) -> None:
    for _ in range(100):
        tasks = [await fed.task(cid, wait=0.2) for cid in SITES]
        if all(t["action"] == action and t.get("round") == round_id for t in tasks):
            return
    raise AssertionError(f"round {round_id} never reached {action!r}")


async def _rounds(fed: Fed, n: int, first: int = 1) -> None:
    for r in range(first, first + n):
        await _wait_round(fed, r, "train")
        for k, cid in enumerate(SITES):
            status, doc = await fed.put(cid, r, "train", delta_body(MANIFEST, 0.01 * (k + 1)))
            assert status == 200, doc
        await _wait_round(fed, r, "evaluate")
        for cid in SITES:
            assert (await fed.put(cid, r, "evaluate", eval_body(0.5)))[0] == 200
    # The next round opens once the last one closed (and was pruned) and both sites polled.
    await _wait_round(fed, first + n, "train")


async def _status(fed: Fed, query: str = "") -> tuple[int, dict[str, Any]]:
    resp = await fed.http.get("/v1/status" + query, headers=fed.operator())
    doc: dict[str, Any] = await resp.json()
    return resp.status, doc


def _files(fed: Fed, folder: str) -> list[Path]:
    root = fed.engine.blobs.root / folder
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


# -- pagination --------------------------------------------------------------------------
async def test_status_pages_cover_every_round_once(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    fed = await _fed(make_fed, tmp_path)
    await _rounds(fed, 7)
    status, doc = await _status(fed)
    assert status == 200
    # Summary fields as before, plus the page and its cursor.
    assert doc["rounds_completed"] == 7
    assert doc["rounds_total"] == 8  # round 8 is open
    assert [r["round"] for r in doc["rounds"]] == list(range(1, 9))
    assert doc["next"] is None
    seen: list[int] = []
    query = "?limit=3"
    while True:
        status, page = await _status(fed, query)
        assert status == 200
        assert len(page["rounds"]) <= 3
        seen = [r["round"] for r in page["rounds"]] + seen
        if page["next"] is None:
            break
        assert page["next"] == page["rounds"][0]["round"]
        query = f"?limit=3&before={page['next']}"
    assert seen == list(range(1, 9))
    _, last = await _status(fed, "?limit=1")
    assert [r["round"] for r in last["rounds"]] == [8]
    assert last["rounds"][0]["status"] == "open"
    _, empty = await _status(fed, "?before=1")
    assert empty["rounds"] == []
    assert empty["next"] is None


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=abc", "limit"),
        ("?limit=%EF%BC%95", "limit"),  # a fullwidth digit: not ASCII
        ("?limit=1e3", "limit"),
        ("?limit=", "limit"),
        ("?limit=%205", "limit"),
        ("?before=0", "before"),
        ("?before=99999999999999999999999", "before"),
        ("?before=1.5", "before"),
    ],
)
async def test_status_refuses_bad_page_parameters(fed: Fed, query: str, name: str) -> None:
    status, doc = await _status(fed, query)
    assert status == 400, doc
    message = doc["error"]["message"]
    assert f"query parameter {name}=" in message
    assert "ASCII digits" in message


async def test_status_page_size_is_bounded(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    fed = await _fed(make_fed, tmp_path)
    await _rounds(fed, 4)
    _, big = await _status(fed, "?limit=1000")
    _, small = await _status(fed, "?limit=2")
    assert len(big["rounds"]) == 5
    assert len(small["rounds"]) == 2
    assert small["next"] == 4
    assert {k: v for k, v in big.items() if k not in ("rounds", "next")} == {
        k: v for k, v in small.items() if k not in ("rounds", "next")
    }


# -- retention ---------------------------------------------------------------------------
async def test_retention_keeps_blobs_bounded_and_the_ledger_verifies(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    fed = await _fed(make_fed, tmp_path, retention__keep_models=3)
    engine = fed.engine
    initial = engine.store.get_meta("initial_model")
    counts = []
    for block in range(4):
        await _rounds(fed, 3, first=1 + 3 * block)
        counts.append((len(_files(fed, "updates")), len(_files(fed, "models"))))
    # Closed rounds' updates are gone; at most K models plus the pinned ones stay.
    assert all(u == 0 for u, _ in counts), counts
    assert all(m <= 3 + 2 for _, m in counts), counts
    names = {p.name.split(".")[0] for p in _files(fed, "models")}
    assert initial in names
    assert engine.current_model in names
    # Submission rows stay: the ledger (with every receipt hash) verifies.
    state = engine.config.server.state_dir
    result = verify_ledger(
        read_ledger(state / "ledger.jsonl"), load_public_key(str(state / "release_key.pub"))
    )
    assert result.ok, result.describe()
    assert len(read_ledger(state / "ledger.jsonl")) == 12
    assert engine.store.count_submissions() == 12 * 4
    # Upload bytes of pruned rounds survive a rebuild of the metrics rows.
    rows = round_rows(engine.store, state_dir=state)
    assert len(rows) == 12
    assert all(r["upload_bytes"] > 0 for r in rows)
    # A pruned model version is refused with what to do, not a 500.
    pruned = next(r.new_model for r in engine.store.rounds() if r.new_model not in names)
    assert pruned is not None
    assert engine.store.model_path(pruned) is not None
    headers = signed(fed.ids["alice"], "alice", "GET", f"/v1/models/{pruned}", 0, "model", b"")
    resp = await fed.http.get(f"/v1/models/{pruned}", headers=headers)
    assert resp.status == 404
    assert "retention" in (await resp.json())["error"]["message"]


async def test_retention_off_keeps_everything(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    fed = await _fed(
        make_fed, tmp_path, retention__keep_models=1000, retention__prune_updates=False
    )
    await _rounds(fed, 3)
    assert len(_files(fed, "updates")) == 3 * 2
    assert len(_files(fed, "models")) == 1 + 3


def test_retention_config_is_checked(tmp_path: Path) -> None:
    assert write_job(tmp_path).retention == RetentionConfig(keep_models=10, prune_updates=True)
    with pytest.raises(ConfigError, match="keep_models must be >= 1"):
        write_job(tmp_path, retention__keep_models=0)
    with pytest.raises(ConfigError, match=r"retention\.prune_updates must be bool"):
        write_job(tmp_path, retention__prune_updates="yes")
    with pytest.raises(ConfigError, match="unknown keys"):
        write_job(tmp_path, retention__keep="all")


class _Killed(BaseException):
    """Stands in for SIGKILL between the commit that marks a prune and the unlinks."""


async def test_a_prune_stopped_after_marking_is_finished_at_start(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    fed = await _fed(make_fed, tmp_path, retention__keep_models=2)
    await _rounds(fed, 5)
    engine = fed.engine
    store, blobs = engine.store, engine.blobs
    # Round 5 closed and was pruned; make its files reappear as a kill would leave them.
    marked = [p for p in store.pruned_paths() if p.startswith("updates/r5/")]
    assert marked
    for rel in marked:
        (blobs.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (blobs.root / rel).write_bytes(b"left by a killed prune")

    def kill(point: str) -> None:
        if point == "prune_marked":
            raise _Killed

    # And one pass that is itself stopped after its commit, before any unlink.
    stopped = Retention(RetentionConfig(keep_models=1), store, blobs, crash_hook=kill)
    before = len(_files(fed, "models"))
    with pytest.raises(_Killed):
        stopped.after_close(5)
    assert len(_files(fed, "models")) == before  # marked, nothing deleted yet
    # The start-up sweep deletes what the marks name and keeps what the job reads.
    Retention(RetentionConfig(keep_models=1), store, blobs).sweep()
    assert not any((blobs.root / rel).exists() for rel in marked)
    assert not _files(fed, "updates")
    names = {p.name.split(".")[0] for p in _files(fed, "models")}
    assert engine.current_model in names
    assert store.get_meta("initial_model") in names
    blobs.read_verified(
        store.model_path(engine.current_model) or "", engine.current_model, "current model"
    )


def test_sweep_on_an_empty_job_is_a_no_op(tmp_path: Path) -> None:
    from confide_server.store import Store

    store = Store(tmp_path / "state" / "confide.sqlite")
    blobs = BlobStore(tmp_path / "state")
    report = Retention(RetentionConfig(), store, blobs).sweep()
    assert (report.updates, report.models) == (0, 0)
    store.close()


# -- accounting off the event loop -------------------------------------------------------
async def test_health_answers_while_a_round_start_is_accounting(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    cfg = write_job(
        tmp_path,
        privacy__mode="sample",
        privacy__noise_multiplier=1.0,
        privacy__sampling_rate=0.1,
    )
    fed = await make_fed(cfg)
    privacy = fed.engine.privacy
    real = privacy.account
    entered, release = threading.Event(), threading.Event()

    def slow_account(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(120), "the test never released the accounting step"
        return real(*args, **kwargs)

    privacy.account = slow_account  # type: ignore[method-assign]
    try:
        for cid in SITES:
            await fed.enroll(cid)
            await fed.task(cid)
        fed.wake()
        # The round timer is inside the accounting step of round 1's start now...
        for _ in range(600):
            if entered.is_set():
                break
            await fed.task("alice", wait=0.2)
        assert entered.is_set(), "round 1 never started accounting"
        # ...and the event loop still answers.
        resp = await fed.http.get("/v1/health")
        assert resp.status == 200
        assert (await resp.json()) == {"ok": True}
        status, doc = await _status(fed)
        assert status == 200
        assert doc["rounds"] == []
    finally:
        release.set()
    await _wait_round(fed, 1, "train")
