"""The engine aggregates a plain or central-DP round one stored update at a time."""

from __future__ import annotations

import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from numpy.typing import NDArray

import confide
from confide.protocol.manifest import decode_tensors
from confide.strategies import FedAvg, Median, NormBounding, Strategy
from confide_server.blobs import BlobStore
from confide_server.engine.privacy import JobPrivacy, PrivacyConfig
from confide_server.engine.rounds import RoundEngine
from confide_server.store import Store
from tests.server.conftest import FakeClock
from tests.server.util import delta_body, tiny_manifest, write_job

MANIFEST = tiny_manifest()
SITES = ("a", "b", "c", "d", "e")


def _engine(tmp: Path, strategy: Strategy, **extra: Any) -> RoundEngine:
    cfg = write_job(
        tmp,
        job__cohort_size=len(SITES),
        job__min_clients=1,
        job__wait_for_clients=len(SITES),
        job__rounds=1,
        **extra,
    )
    eng = RoundEngine(
        cfg,
        Store(cfg.server.database),
        BlobStore(cfg.server.state_dir),
        MANIFEST,
        clock=FakeClock(),
        strategy=strategy,
    )
    eng.initialise(cfg.weights.read_bytes())
    for cid in SITES:
        eng.enroll(eng.create_tokens(1)[0], cid, f"key-{cid}")
        eng.touch(cid)
    return eng


def _train(eng: RoundEngine) -> None:
    assert eng.tick()
    for i, cid in enumerate(SITES):
        p = eng.prepare(cid, 1, "train", delta_body(MANIFEST, 0.1 * (i + 1), 10 * (i + 1)))
        eng.commit_submission(p, f"{cid}-t")


def _count_reads(eng: RoundEngine) -> list[str]:
    """Record every hash-verified read of an update file (the engine's only way to them)."""
    reads: list[str] = []
    inner = eng.blobs.read_verified

    def read_verified(path: str, sha: str, what: str) -> bytes:
        if what.startswith("update"):
            reads.append(what)
        return inner(path, sha, what)

    eng.blobs.read_verified = read_verified  # type: ignore[method-assign]
    return reads


def _model(eng: RoundEngine, sha: str | None = None) -> NDArray[np.float32]:
    path = eng.store.model_path(sha or eng.current_model)
    assert path is not None
    return decode_tensors(MANIFEST, eng.blobs.read(path))[0]


class _ProbeBound(NormBounding):
    """Norm bounding that notes how many update files were read when each one is added."""

    name: ClassVar[str] = "probe_bound"
    reads: ClassVar[list[str]] = []
    added: ClassVar[list[int]] = []

    def prepare_update(self, delta: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        self.added.append(len(self.reads))
        return super().prepare_update(delta)


def test_a_streaming_round_reads_one_update_per_addition(tmp_path: Path) -> None:
    eng = _engine(tmp_path, _ProbeBound(max_norm=10.0))
    _ProbeBound.reads = _count_reads(eng)
    _ProbeBound.added = []
    base = _model(eng)
    _train(eng)
    assert eng.tick()  # train closes: aggregated
    # update i was added after i+1 files were read: never the round's five at once
    assert _ProbeBound.added == [1, 2, 3, 4, 5]
    # and the result is the list path's, bit for bit
    updates = [
        (np.full(MANIFEST.size, 0.1 * (i + 1), np.float32), float(10 * (i + 1)))
        for i in range(len(SITES))
    ]
    want, _ = NormBounding(max_norm=10.0).aggregate(base, updates, {})
    new = eng.store.rounds()[-1].new_model  # the train stage's aggregate
    assert new is not None
    assert _model(eng, new).tobytes() == want.tobytes()


def test_a_strategy_that_needs_every_update_gets_the_list(tmp_path: Path) -> None:
    seen: list[int] = []

    class CountedMedian(Median):
        def aggregate(self, base: Any, updates: Any, state: Any) -> Any:
            seen.append(len(reads))  # every file was read before the strategy runs
            return super().aggregate(base, updates, state)

    eng = _engine(tmp_path, CountedMedian())
    reads = _count_reads(eng)
    _train(eng)
    assert eng.tick()
    assert seen == [5]


def test_a_non_finite_streamed_aggregate_aborts_the_round(tmp_path: Path) -> None:
    eng = _engine(tmp_path, FedAvg(server_learning_rate=2.0))
    assert eng.tick()
    for cid in SITES:  # finite deltas whose step (2 x 3e38) overflows float32
        p = eng.prepare(cid, 1, "train", delta_body(MANIFEST, 3e38, 10))
        eng.commit_submission(p, f"{cid}-t")
    base_sha = eng.current_model
    assert eng.tick()
    row = eng.store.rounds()[-1]
    assert row.status == "aborted"
    assert "not finite" in (row.reason or "")
    assert eng.current_model == base_sha


def test_central_dp_clips_and_adds_one_update_at_a_time(tmp_path: Path) -> None:
    handed: list[object] = []
    eng = _engine(tmp_path, FedAvg(), privacy__mode="central", privacy__noise_multiplier=0.5)
    inner = eng.privacy.central_sum

    def central_sum(deltas: Iterable[NDArray[np.floating[Any]]], rng: Any = None) -> Any:
        handed.append(deltas)
        return inner(deltas, rng)

    eng.privacy.central_sum = central_sum  # type: ignore[method-assign]
    _train(eng)
    assert eng.tick()
    assert len(handed) == 1
    assert isinstance(handed[0], types.GeneratorType)
    assert eng.store.rounds()[-1].new_model is not None


@pytest.mark.parametrize("n", [0, 1, 4])
def test_central_sum_of_a_generator_equals_that_of_the_list(n: int) -> None:
    priv = JobPrivacy(PrivacyConfig(mode="central", noise_multiplier=1.0, clip_norm=0.5), 1, 1)
    rng = np.random.default_rng(n)
    deltas = [rng.standard_normal(50).astype(np.float32) for _ in range(n)]
    seed = bytes(32)
    got = priv.central_sum((d for d in deltas), rng=confide.SecureRng(seed))
    want = priv.central_sum(deltas, rng=confide.SecureRng(seed))
    assert got.tobytes() == want.tobytes()
    assert got.shape == (50 if n else 0,)
