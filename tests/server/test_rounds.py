"""The round state machine on its own (no HTTP): quorum, deadlines, aborts, crash recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.protocol.manifest import decode_tensors
from confide_server.app import open_engine
from confide_server.config import Config
from confide_server.engine.rounds import RoundEngine, RoundError
from tests.server.conftest import FakeClock
from tests.server.util import (
    Crash,
    delta_body,
    enrolled_engine,
    eval_body,
    tiny_manifest,
    write_job,
)

MANIFEST = tiny_manifest()


def _config(tmp: Path, **kw: object) -> Config:
    base = {
        "job__cohort_size": 3,
        "job__min_clients": 2,
        "job__wait_for_clients": 3,
        "job__rounds": 2,
        "job__max_consecutive_aborts": 2,
    }
    return write_job(tmp, **{**base, **kw})


def _submit(
    engine: RoundEngine, cid: str, stage: str, body: bytes, r: int = 1
) -> dict[str, object]:
    prepared = engine.prepare(cid, r, stage, body)
    return engine.commit_submission(prepared, nonce=f"{cid}-{stage}-{r}-{len(body)}")


def _model(engine: RoundEngine) -> np.ndarray:
    path = engine.store.model_path(engine.current_model)
    assert path is not None
    return decode_tensors(MANIFEST, engine.blobs.read(path))[0]


def test_round_goes_on_with_quorum_at_deadline(tmp_path: Path) -> None:
    clock = FakeClock()
    eng = enrolled_engine(_config(tmp_path), clock)
    assert eng.tick()
    assert eng.store.get_round(1) is not None
    base = _model(eng)
    _submit(eng, "a", "train", delta_body(MANIFEST, 1.0, 10))
    _submit(eng, "b", "train", delta_body(MANIFEST, 3.0, 30))
    assert not eng.tick()  # c has not answered and the deadline is ahead
    clock.now += 31
    assert eng.tick()
    row = eng.store.get_round(1)
    assert row is not None
    assert row.stage == "evaluate"
    clock.now += 31  # nobody evaluates: evaluation needs no quorum
    assert eng.tick()
    row = eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed"
    assert row.metrics is not None
    assert row.metrics["train_clients"] == 2
    np.testing.assert_allclose(_model(eng), base + 2.5, atol=1e-6)


def test_round_without_quorum_aborts_and_next_round_succeeds(tmp_path: Path) -> None:
    clock = FakeClock()
    eng = enrolled_engine(_config(tmp_path), clock)
    eng.tick()
    base_sha = eng.current_model
    _submit(eng, "a", "train", delta_body(MANIFEST, 1.0))
    clock.now += 31
    assert eng.tick()
    r1 = eng.store.get_round(1)
    assert r1 is not None
    assert r1.status == "aborted"
    assert "min_clients=2" in (r1.reason or "")
    assert eng.current_model == base_sha
    assert eng.status == "running"
    with pytest.raises(RoundError, match="aborted"):
        _submit(eng, "b", "train", delta_body(MANIFEST, 1.0))
    for cid in "abc":  # the sites poll again (the next cohort is drawn from those seen since)
        eng.touch(cid)
    assert eng.tick()  # round 2 starts normally
    for cid in "abc":
        _submit(eng, cid, "train", delta_body(MANIFEST, 1.0), r=2)
    assert eng.tick()
    for cid in "abc":
        _submit(eng, cid, "evaluate", eval_body(0.75), r=2)
    assert eng.tick()
    r2 = eng.store.get_round(2)
    assert r2 is not None
    assert r2.status == "committed"
    assert r2.metrics is not None
    assert r2.metrics["eval_accuracy"] == pytest.approx(0.75)
    assert eng.completed_rounds == 1


def test_consecutive_aborts_fail_the_job(tmp_path: Path) -> None:
    clock = FakeClock()
    eng = enrolled_engine(_config(tmp_path), clock)
    for _ in range(2):
        for cid in "abc":  # the sites poll (but never answer)
            eng.touch(cid)
        assert eng.tick()
        clock.now += 31
        assert eng.tick()
    assert eng.status == "failed"
    assert eng.task_for("a").action == "failed"


def test_cohort_sampling_is_seeded(tmp_path: Path) -> None:
    cfg = _config(tmp_path, job__cohort_size=2, job__min_clients=1, job__wait_for_clients=2)
    eng = enrolled_engine(cfg, FakeClock())
    eng.tick()
    row = eng.store.get_round(1)
    assert row is not None
    assert len(row.cohort) == 2
    outsider = ({"a", "b", "c"} - set(row.cohort)).pop()
    assert eng.task_for(outsider).action == "wait"
    with pytest.raises(RoundError, match="cohort"):
        eng.check_submission(outsider, 1, "train", "0" * 64)


def _run_job(tmp: Path, crash_points: list[str], **kw: object) -> tuple[str, RoundEngine]:
    """Run a 2-round job, 'killing' the engine at each crash point and reopening it."""
    clock = FakeClock()
    cfg = _config(tmp, **kw)
    pending = list(crash_points)
    eng = enrolled_engine(cfg, clock, crash_at=pending[0] if pending else None)
    values = {"a": 0.5, "b": -0.25, "c": 2.0}
    while eng.status == "running":
        try:
            if eng.idle:
                eng.tick()
                continue
            row = eng._current
            assert row is not None
            for cid in sorted(values):
                if eng.task_for(cid).action == "train":
                    _submit(
                        eng, cid, "train", delta_body(MANIFEST, values[cid] * row.round), row.round
                    )
                elif eng.task_for(cid).action == "evaluate":
                    _submit(eng, cid, "evaluate", eval_body(0.5), row.round)
            eng.tick()
        except Crash:
            pending.pop(0)
            eng.store.close()
            eng = enrolled_engine(cfg, clock, crash_at=pending[0] if pending else None)
    return eng.current_model, eng


@pytest.mark.parametrize(
    "points",
    [
        ["submission_committed"],
        ["model_written"],
        ["stage_committed", "before_round_commit"],
        ["round_committed", "round_started"],
    ],
)
@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_crash_anywhere_gives_the_same_final_model(
    tmp_path: Path, points: list[str], strategy: str
) -> None:
    """SIGKILL equals no crash, for FedAvg and every server optimizer: their state (moments,
    step) is committed with the round, so the resumed job ends on the same bits."""
    reference, ref_eng = _run_job(tmp_path / "ref", [], strategy__name=strategy)
    final, eng = _run_job(tmp_path / "crash", points, strategy__name=strategy)
    assert final == reference  # the model's SHA-256: bit-identical
    assert eng.store.committed_strategy_state() == ref_eng.store.committed_strategy_state()
    if strategy != "fedavg":
        assert eng.store.committed_strategy_state()["step"] == 2  # type: ignore[index]
    rounds = eng.store.rounds()
    assert [r.status for r in rounds] == ["committed", "committed"]
    for r in rounds:  # nothing lost, nothing counted twice
        assert len(eng.store.submissions(r.round, "train")) == 3


def test_server_optimizers_change_the_trajectory(tmp_path: Path) -> None:
    """The crash test above is not vacuous: each optimizer ends on its own model."""
    finals = {
        name: _run_job(tmp_path / name, [], strategy__name=name)[0]
        for name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
    }
    assert len(set(finals.values())) == len(finals)


def test_acknowledged_submission_survives_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = _config(tmp_path)
    eng = enrolled_engine(cfg, clock)
    eng.tick()
    receipt = _submit(eng, "a", "train", delta_body(MANIFEST, 1.0))
    eng.store.close()
    eng2 = enrolled_engine(cfg, clock)
    # the identical retry gets the same receipt; a different body is a duplicate
    assert _submit(eng2, "a", "train", delta_body(MANIFEST, 1.0)) == receipt
    with pytest.raises(RoundError, match="already submitted"):
        _submit(eng2, "a", "train", delta_body(MANIFEST, 2.0))
    assert eng2.task_for("a").action == "wait"
    assert eng2.task_for("b").action == "train"


def test_state_of_another_job_is_refused(tmp_path: Path) -> None:
    from confide.errors import ConfigError

    eng = enrolled_engine(_config(tmp_path), FakeClock())
    eng.store.close()
    with pytest.raises(ConfigError, match="belongs to job"):
        open_engine(_config(tmp_path, job__name="other"))
