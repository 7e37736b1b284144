"""Distributed DP: every failure around the unmask aborts the round cleanly, accounted iff unmasked.

The rule (docs/privacy.md, "Aborted rounds"): a distributed-DP round is charged if and only if
its masked sum was unmasked (the noised sum is then known to the server), whatever makes it
abort afterwards; it is never committed, never wedges the job, and the next round runs.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.errors import SecAggAbortError
from confide_server.engine.privacy import read_privacy
from tests.server.test_ddg_rounds import _ddg_config
from tests.server.test_sample_ddg_rounds import SampleFed, _sddg_config
from tests.server.test_secagg_rounds import Fed


def _to_unmask(fed: Fed) -> None:
    assert fed.eng.tick()
    for stage in ("advertise", "share", "mask"):
        assert fed.stage() == stage
        fed.run_stage()
    assert fed.stage() == "unmask"


def _aborted(fed: Fed, base_sha: str) -> str:
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "aborted", row
    assert row.new_model is None or fed.eng.current_model == base_sha
    assert fed.eng.current_model == base_sha  # never committed
    assert fed.eng.status == "running"  # never wedged, never failed for one abort
    assert fed.eng._current is None
    assert row.reason is not None
    return row.reason


def _accounted(fed: Fed) -> list[int]:
    _, per_round = read_privacy(fed.eng.store)
    return sorted(per_round)


def _next_round_starts(fed: Fed) -> None:
    fed.clock.now += 1000
    for c in fed.idents:
        fed.eng.touch(c)
    assert fed.eng.tick()
    assert fed.eng.store.rounds()[-1].round == 2


@pytest.mark.parametrize("bad", [np.inf, np.nan, 1e300])
def test_a_non_finite_or_out_of_range_decoded_sum_aborts_and_is_accounted(
    tmp_path: Path, bad: float
) -> None:
    fed = Fed(tmp_path, _ddg_config(tmp_path, job__rounds=2))
    base_sha = fed.eng.current_model
    _to_unmask(fed)
    inner = fed.eng.privacy.ddg_sum

    def decoded(*args: Any) -> Any:
        out = inner(*args).astype(np.float64)
        out[0] = bad  # 1e300: finite, but out of float32's range once averaged
        return out

    fed.eng.privacy.ddg_sum = decoded  # type: ignore[method-assign]
    fed.run_stage()  # unmask
    reason = _aborted(fed, base_sha)
    # numpy's overflow (an error under the tests' errstate) or the engine's finiteness check
    assert "not finite" in reason or "overflow" in reason, reason
    assert _accounted(fed) == [1]  # the noised sum was unmasked: paid for
    _next_round_starts(fed)


def test_a_strategy_or_storage_failure_after_unmask_is_accounted(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _ddg_config(tmp_path, job__rounds=2))
    base_sha = fed.eng.current_model

    def broken(*_args: object) -> object:
        raise RuntimeError("strategy exploded")

    _to_unmask(fed)
    fed.eng.strategy.aggregate_sum = broken  # type: ignore[method-assign]
    fed.run_stage()
    assert "strategy exploded" in _aborted(fed, base_sha)
    assert _accounted(fed) == [1]
    _next_round_starts(fed)


def test_a_transient_disk_error_after_unmask_aborts_on_retry_and_is_accounted_once(
    tmp_path: Path,
) -> None:
    fed = Fed(tmp_path, _ddg_config(tmp_path, job__rounds=2))
    base_sha = fed.eng.current_model
    _to_unmask(fed)
    for c in fed.idents:
        fed.answer(c)
    inner = fed.eng.blobs.write_model
    fails = {"n": 0}

    def full_disk(blob: bytes) -> str:
        fails["n"] += 1
        raise OSError(28, "No space left on device")

    fed.eng.blobs.write_model = full_disk  # type: ignore[method-assign]
    # The abort's own write fails too: the close is retried, as for any transient error.
    real_abort = sqlite3.OperationalError("database or disk is full")
    orig = fed.eng._abort
    calls: list[Any] = []

    def abort_once_failing(cur: Any, reason: str, ddg: Any = None) -> None:
        calls.append(ddg)
        if len(calls) == 1:
            raise real_abort
        orig(cur, reason, ddg)

    fed.eng._abort = abort_once_failing  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        fed.eng.tick()
    assert fails["n"] == 1
    fed.eng.blobs.write_model = inner  # type: ignore[method-assign]
    assert fed.eng.tick()  # the retry: the shares are spent, the round aborts, still paid
    assert len(calls) == 2
    assert all(d is not None for d in calls)
    _aborted(fed, base_sha)
    assert _accounted(fed) == [1]
    _next_round_starts(fed)


def test_a_reconstruction_failure_aborts_and_is_not_accounted(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _ddg_config(tmp_path, job__rounds=2))
    base_sha = fed.eng.current_model
    _to_unmask(fed)
    secure = fed.eng.secure
    assert secure is not None
    inner = secure.close

    def close(stage: str) -> Any:
        if stage == "unmask":
            raise SecAggAbortError("too-few-shares", "a secret has fewer than t valid shares")
        return inner(stage)

    secure.close = close  # type: ignore[method-assign]
    fed.run_stage()
    assert "fewer than t valid shares" in _aborted(fed, base_sha)
    assert _accounted(fed) == []  # nothing was unmasked: nothing released
    _next_round_starts(fed)


def test_too_few_unmask_answers_abort_and_are_not_accounted(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _ddg_config(tmp_path, job__rounds=2))
    base_sha = fed.eng.current_model
    _to_unmask(fed)
    fed.run_stage(skip=("b", "c"))  # 1 answer: fewer than t = 2 shares of each secret
    assert "1 shares of 'a''s secret, 2 needed" in _aborted(fed, base_sha)
    assert _accounted(fed) == []
    _next_round_starts(fed)


def test_sample_ddg_non_finite_step_aborts_and_is_accounted(tmp_path: Path) -> None:
    fed = SampleFed(tmp_path, _sddg_config(tmp_path, job__rounds=2))
    base_sha = fed.eng.current_model
    _to_unmask(fed)

    def step(*_args: Any) -> Any:
        raise OverflowError("decoded gradient sum out of range")

    fed.eng.privacy.sample_ddg_step = step  # type: ignore[method-assign]
    fed.run_stage()
    assert "out of range" in _aborted(fed, base_sha)
    assert _accounted(fed) == [1]
    _next_round_starts(fed)
