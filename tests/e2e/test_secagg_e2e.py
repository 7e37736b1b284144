"""SecAgg+ rounds end to end: real server and client processes over HTTP on loopback.

The clients run through the test-only entry point (:mod:`tests.e2e.entry`), which injects
seeded protocol randomness through ``Client(..., rng_factory=...)``, so a secure run is
reproducible bit for bit (a crashed run must give the very same models) and the test can
recompute every client secret and look for it on disk.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.noise import SecureRng
from confide.protocol.manifest import decode_tensors
from confide_server.config import load_config
from confide_server.simulate import JobFiles, SimulationOptions, prepare_job
from confide_server.store import Store
from tests.e2e.conftest import Procs
from tests.support import round_seed

RNG_SEED = b"secagg-e2e"
# Dropout-tolerant threat model for three sites: complete graph, k = 2, t = 2.
TOLERANT = {"adversarial_fraction": 0.0, "dropout_fraction": 0.34}


class SecureProcs(Procs):
    """:class:`Procs` whose clients get the test-only protocol seed."""

    rng_seed = RNG_SEED.hex()


def _job(tmp: Path, secagg: bool, **kw: Any) -> JobFiles:
    base: dict[str, Any] = {
        "clients": 3,
        "rounds": 2,
        "seed": 11,
        "min_clients": 2,
        "secagg": secagg,
        "extra_secagg": dict(TOLERANT),
    }
    return prepare_job(tmp, SimulationOptions(**{**base, **kw}))


def _models(files: JobFiles, status: dict[str, Any]) -> list[np.ndarray]:
    out = []
    for row in status["rounds"]:
        blob = (files.workdir / "state" / "models" / f"{row['new_model']}.safetensors").read_bytes()
        out.append(decode_tensors(files.trainer.manifest, blob)[0])
    return out


def _finished_run(
    factory: pytest.TempPathFactory, name: str, secagg: bool
) -> Iterator[tuple[JobFiles, Any]]:
    files = _job(factory.mktemp(name), secagg=secagg)
    procs = SecureProcs(files)
    try:
        yield files, procs.run_to_end()
    finally:
        procs.kill_all()


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[JobFiles, Any]]:
    yield from _finished_run(tmp_path_factory, "plain", secagg=False)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[JobFiles, Any]]:
    yield from _finished_run(tmp_path_factory, "secure", secagg=True)


@pytest.mark.slow
def test_secure_rounds_equal_plain_fedavg_within_quantization(
    plain_run: tuple[JobFiles, Any], secure_run: tuple[JobFiles, Any]
) -> None:
    (pfiles, plain), (sfiles, secure) = plain_run, secure_run
    assert plain["status"] == secure["status"] == "finished"
    for row in secure["rounds"]:
        assert row["status"] == "committed"
        assert row["metrics"]["train_clients"] == 3
        assert row["metrics"]["secagg"] == {"n": 3, "k": 2, "t": 2, "modulus_bits": 18}
    for p, s in zip(_models(pfiles, plain), _models(sfiles, secure), strict=True):
        assert not np.array_equal(p, s)  # really aggregated another way
        np.testing.assert_allclose(s, p, atol=1e-3)


def _assert_no_secret_on_disk(files: JobFiles, status: dict[str, Any]) -> None:
    """Recompute every client secret of every round; none is in any file, in any form."""
    data = b"".join(p.read_bytes() for p in files.workdir.rglob("*") if p.is_file())
    assert len(data) > 100_000  # the SQLite file, models, logs, pins: all of it
    checked = 0
    for k in (1, 2, 3):
        for r in (row["round"] for row in status["rounds"]):
            rng = SecureRng(round_seed(RNG_SEED, f"site-{k}", r))
            for secret in (rng.random_bytes(32) for _ in range(3)):  # enc, mask, self seeds
                for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
                    assert form not in data
                    checked += 1
    assert checked == 3 * 2 * 3 * 3


@pytest.mark.slow
def test_no_client_secret_is_on_disk(secure_run: tuple[JobFiles, Any]) -> None:
    _assert_no_secret_on_disk(*secure_run)


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash_at", ["submission_committed:8", "submission_committed:11", "model_written:1"]
)
def test_server_sigkill_mid_secure_round_gives_the_same_models(
    tmp_path: Path, procs_factory: Any, secure_run: tuple[JobFiles, Any], crash_at: str
) -> None:
    """Killed in round 1's mask or unmask stage: restarted, it replays the stage's messages
    or re-asks for the unmask answers; the models are the same bit for bit."""
    _, reference = secure_run
    files = _job(tmp_path, secagg=True)
    procs = SecureProcs(files)
    procs_factory(files).children = procs.children  # reaped by the fixture
    crashed = procs.run_to_end(crash_at)
    assert crashed["status"] == "finished"
    for ref_row, row in zip(reference["rounds"], crashed["rounds"], strict=True):
        assert row["status"] == "committed"
        assert row["new_model"] == ref_row["new_model"]  # bit for bit: never a wrong sum
        assert row["metrics"]["train_clients"] == 3
    cfg = load_config(files.config)
    store = Store(cfg.server.database)
    try:
        # advertise, share, mask, unmask, evaluate: one each per client and round
        assert store.count_submissions() == 5 * 3 * 2
    finally:
        store.close()
    _assert_no_secret_on_disk(files, crashed)


@pytest.mark.slow
def test_client_killed_mid_secure_round_round_completes(tmp_path: Path, procs_factory: Any) -> None:
    fast = {**TOLERANT, "advertise": 3.0, "share": 3.0, "unmask": 3.0}
    files = _job(
        tmp_path,
        secagg=True,
        rounds=3,
        train_deadline=3.0,
        evaluate_deadline=3.0,
        extra_secagg=fast,
    )
    procs = SecureProcs(files)
    procs_factory(files).children = procs.children
    server = procs.server()
    t1, t2, t3 = procs.tokens(3)
    c1, c2 = procs.client(1, t1), procs.client(2, t2)
    # SIGKILLs itself on round 2's mask task: it advertised and shared keys, never masks
    c3 = procs.client(3, t3, "--die-in-round", "2", "--die-at-stage", "mask")
    assert procs.wait_exit(server) == 0, procs.all_logs()
    procs.killed(c3, "site-3")
    assert (procs.wait_exit(c1), procs.wait_exit(c2)) == (0, 0)
    rows = procs.final_status()["rounds"]
    assert [r["status"] for r in rows] == ["committed"] * 3
    assert [r["metrics"]["train_clients"] for r in rows] == [3, 2, 2]
