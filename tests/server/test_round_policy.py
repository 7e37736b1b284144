"""Plain rounds bounded by policy; no stage close can wedge the job (issue 12 item 1).

The engine on real SQLite and real blob files, with a fake clock: huge finite updates that
used to replace the model and overflow the next round, a non-finite aggregate, damaged or
missing update and model files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.errors import ConfigError, ManifestError
from confide.protocol.manifest import encode_tensors
from confide_server.app import open_engine
from confide_server.config import Config
from confide_server.engine.rounds import InvalidSubmissionError, RoundEngine
from confide_server.middlewares import status_for
from tests.server.conftest import FakeClock
from tests.server.util import delta_body, enrolled_engine, eval_body, tiny_manifest, write_job

MANIFEST = tiny_manifest()
IDS = ("a", "b")


def _config(tmp: Path, **kw: object) -> Config:
    base = {
        "job__cohort_size": 2,
        "job__min_clients": 2,
        "job__wait_for_clients": 2,
        "job__rounds": 5,
        "job__max_consecutive_aborts": 3,
    }
    return write_job(tmp, **{**base, **kw})


def _engine(cfg: Config, clock: FakeClock) -> RoundEngine:
    """Both sites enrolled, both just polled."""
    return enrolled_engine(cfg, clock, IDS)


def _submit(engine: RoundEngine, cid: str, stage: str, body: bytes, r: int) -> None:
    prepared = engine.prepare(cid, r, stage, body)
    engine.commit_submission(prepared, nonce=f"{cid}-{stage}-{r}-{len(body)}")


def _body(value: float, n: int = 10) -> bytes:
    vec = np.full(MANIFEST.size, value, dtype=np.float32)
    return encode_tensors(MANIFEST, vec, {"num_examples": str(n)})


def _round(engine: RoundEngine, clock: FakeClock, r: int, body: bytes) -> str:
    """Run round ``r`` with ``body`` from every site; return its final status."""
    for cid in IDS:
        engine.touch(cid)
    assert engine.tick()  # starts round r
    for cid in IDS:
        _submit(engine, cid, "train", body, r)
    assert engine.tick()  # closes train (or aborts the round)
    row = engine.store.get_round(r)
    assert row is not None
    if row.status == "open":
        for cid in IDS:
            _submit(engine, cid, "evaluate", eval_body(0.5), r)
        assert engine.tick()
        row = engine.store.get_round(r)
        assert row is not None
    clock.now += 1.0
    return row.status


def test_max_weight_refuses_a_site_that_claims_too_many_examples(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(_config(tmp_path, job__max_weight=1000), clock)
    assert engine.tick()
    engine.prepare("a", 1, "train", _body(0.1, n=1000))  # at the cap: accepted
    with pytest.raises(InvalidSubmissionError, match="max_weight") as info:
        engine.prepare("a", 1, "train", _body(0.1, n=1001))
    assert status_for(info.value) == 422
    # the default cap is 10**7: the 1e9 examples are refused without any setting
    default = _engine(_config(tmp_path / "default"), FakeClock())
    assert default.tick()
    with pytest.raises(InvalidSubmissionError, match="10000000"):
        default.prepare("a", 1, "train", _body(0.1, n=10**9))


def test_max_update_norm_refuses_large_deltas(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(_config(tmp_path, job__max_update_norm=1.0), clock)
    assert engine.tick()
    # 5 elements of 0.4: norm 0.894 <= 1; of 0.5: 1.118 > 1
    engine.prepare("a", 1, "train", _body(0.4))
    with pytest.raises(InvalidSubmissionError, match="norm") as info:
        engine.prepare("a", 1, "train", _body(0.5))
    assert status_for(info.value) == 422
    with pytest.raises(InvalidSubmissionError, match="norm"):
        engine.prepare("a", 1, "train", _body(3e38))


def test_bad_policy_values_are_config_errors(tmp_path: Path) -> None:
    for kw in ({"job__max_weight": 0}, {"job__max_update_norm": -1.0}):
        with pytest.raises(ConfigError):
            _config(tmp_path, **kw)


def test_overflowing_aggregate_aborts_the_round_and_the_job_goes_on(tmp_path: Path) -> None:
    """The issue's wedge: round 1 commits 3e38, round 2 overflows. Now round 2 aborts."""
    clock = FakeClock()
    engine = _engine(_config(tmp_path), clock)
    assert _round(engine, clock, 1, _body(3e38)) == "committed"
    model_after_1 = engine.current_model
    assert _round(engine, clock, 2, _body(3e38)) == "aborted"
    row = engine.store.get_round(2)
    assert row is not None
    assert row.reason is not None
    assert "not finite" in row.reason, row.reason
    assert engine.status == "running"
    assert engine.current_model == model_after_1  # never committed
    # the job is not wedged: a sane round commits (0 - 3e38 brings it back to finite)
    assert _round(engine, clock, 3, _body(-3e38)) == "committed"
    # and a restart finds a consistent, running job
    engine.store.close()
    engine = _engine(_config(tmp_path), clock)
    assert engine.status == "running"
    assert engine.completed_rounds == 2


def test_strategy_error_at_close_aborts_instead_of_retrying(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(_config(tmp_path), clock)

    def broken(*_args: object) -> object:
        raise ManifestError("strategy exploded")

    engine.strategy.aggregate = broken  # type: ignore[method-assign]
    assert _round(engine, clock, 1, _body(0.1)) == "aborted"
    row = engine.store.get_round(1)
    assert row is not None
    assert row.reason is not None
    assert "strategy exploded" in row.reason


@pytest.mark.parametrize("damage", ["rewrite", "delete"])
def test_damaged_update_file_aborts_the_round(tmp_path: Path, damage: str) -> None:
    clock = FakeClock()
    engine = _engine(_config(tmp_path), clock)
    assert engine.tick()
    for cid in IDS:
        _submit(engine, cid, "train", _body(0.1), 1)
    sub = engine.store.get_submission(1, "train", "b")
    assert sub is not None
    assert sub.blob is not None
    path = engine.blobs.root / sub.blob
    if damage == "rewrite":
        path.write_bytes(delta_body(MANIFEST, 0.2))  # valid safetensors, other bytes
    else:
        path.unlink()
    initial = engine.current_model
    assert engine.tick()
    row = engine.store.get_round(1)
    assert row is not None
    assert row.status == "aborted"
    assert row.reason is not None
    assert "damaged" in row.reason
    assert "'b'" in row.reason
    assert engine.current_model == initial


def test_damaged_current_model_refuses_to_start(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = _config(tmp_path)
    engine = _engine(cfg, clock)
    assert _round(engine, clock, 1, _body(0.1)) == "committed"
    path = engine.store.model_path(engine.current_model)
    assert path is not None
    engine.store.close()
    (engine.blobs.root / path).write_bytes(delta_body(MANIFEST, 0.7))
    with pytest.raises(ConfigError, match=r"cannot start: current model file .* hashes to"):
        open_engine(cfg, clock=clock)
    (engine.blobs.root / path).unlink()
    with pytest.raises(ConfigError, match="missing"):
        open_engine(cfg, clock=clock)
