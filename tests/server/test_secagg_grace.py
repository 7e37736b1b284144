"""``[secagg] stage_grace_s``: a secure stage closes early once enough answers arrived and
none came for the grace period; never with too few answers, never when it is off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.errors import ConfigError
from confide_server.config import Config
from tests.server.test_secagg_rounds import Fed, _config, _start

# Deadlines far beyond any grace below: only the grace close (or everyone answering) closes.
LONG = {f"secagg__{s}": 1000.0 for s in ("advertise", "share", "mask", "unmask")}


def _grace(tmp: Path, grace: float, **kw: object) -> Config:
    return _config(tmp, secagg__stage_grace_s=grace, **{**LONG, **kw})


def _answer(fed: Fed, *ids: str) -> None:
    for c in ids:
        assert fed.answer(c) is not None


@pytest.mark.parametrize("silent_at", ["advertise", "mask", "unmask"])
def test_stage_closes_after_the_grace_since_the_last_answer(tmp_path: Path, silent_at: str) -> None:
    fed = Fed(tmp_path, _grace(tmp_path, 5.0))
    base = _start(fed)
    for stage in ("advertise", "share", "mask", "unmask"):
        assert fed.stage() == stage
        if stage != silent_at:
            fed.run_stage()  # everyone still expected answers: closes at once
            continue
        _answer(fed, "a")
        fed.clock.now += 4.0
        _answer(fed, "c")  # b stays silent; a and c are enough (t = 2)
        fed.clock.now += 4.9  # 8.9 s since the stage opened, 4.9 s since c answered
        assert not fed.eng.tick()
        assert fed.stage() == stage
        fed.clock.now += 0.2
        assert fed.eng.tick()  # 5.1 s of silence: closed, b declared dropped
        if stage != "unmask":  # (after unmask every site evaluates)
            assert fed.eng.task_for("b").action == "wait"  # b is out of the round
    assert fed.stage() == "evaluate"
    fed.finish_evaluate()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed", row
    survivors = ("a", "b", "c") if silent_at == "unmask" else ("a", "c")
    assert row.metrics is not None
    assert row.metrics["train_clients"] == len(survivors)
    np.testing.assert_allclose(fed.model(), fed.expected(survivors, base), atol=2e-4)


def test_too_few_answers_wait_for_the_deadline(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _grace(tmp_path, 2.0))
    _start(fed)
    _answer(fed, "a")  # one advertisement: fewer than min_survivors = 2
    fed.clock.now += 900.0
    assert not fed.eng.tick()
    assert fed.stage() == "advertise"
    _answer(fed, "b")  # now enough, and the grace counts from this answer
    fed.clock.now += 1.9
    assert not fed.eng.tick()
    fed.clock.now += 0.2
    assert fed.eng.tick()
    assert fed.stage() == "share"


def test_mask_stage_also_needs_min_clients(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _grace(tmp_path, 2.0, job__min_clients=3))
    _start(fed)
    fed.run_stage()  # advertise (all three)
    fed.run_stage()  # share
    assert fed.stage() == "mask"
    _answer(fed, "a", "b")  # two masked inputs: enough for t, not for min_clients = 3
    fed.clock.now += 500.0
    assert not fed.eng.tick()
    assert fed.stage() == "mask"
    _answer(fed, "c")
    assert fed.eng.tick()  # everyone answered: closes at once, grace or not
    assert fed.stage() == "unmask"


def test_off_by_default(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **LONG)
    assert cfg.secagg.stage_grace_s == 0.0
    fed = Fed(tmp_path, cfg)
    _start(fed)
    _answer(fed, "a", "c")
    fed.clock.now += 999.0
    assert not fed.eng.tick()
    assert fed.stage() == "advertise"
    fed.clock.now += 2.0  # the deadline
    assert fed.eng.tick()
    assert fed.stage() == "share"


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_grace_is_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ConfigError, match="stage_grace_s"):
        _config(tmp_path, secagg__stage_grace_s=bad)


# -- the adaptive grace: [secagg] stage_grace_factor / stage_grace_floor_s -------------------


def _adaptive(tmp: Path, factor: float, floor: float = 0.25, grace: float = 0.0) -> Config:
    return _grace(tmp, grace, secagg__stage_grace_factor=factor, secagg__stage_grace_floor_s=floor)


@pytest.mark.parametrize(
    ("grace", "factor", "window"),
    [
        (0.0, 0.5, 1.5),  # adaptive only: 0.5 x 3 s to the threshold
        (5.0, 0.5, 1.5),  # both: the shorter of the two
        (5.0, 0.0, 5.0),  # fixed grace only: the full 5 s
        (5.0, 4.0, 5.0),  # 4 x 3 s = 12 s is capped at the fixed grace
        (0.0, 4.0, 12.0),  # adaptive only, uncapped
    ],
)
@pytest.mark.parametrize("silent_at", ["advertise", "mask", "unmask"])
def test_the_adaptive_grace_scales_with_the_time_to_threshold(
    tmp_path: Path, silent_at: str, grace: float, factor: float, window: float
) -> None:
    fed = Fed(tmp_path, _adaptive(tmp_path, factor, grace=grace))
    base = _start(fed)
    for stage in ("advertise", "share", "mask", "unmask"):
        assert fed.stage() == stage
        if stage != silent_at:
            fed.run_stage()
            continue
        opened = fed.clock.now
        fed.clock.now += 1.0
        _answer(fed, "a")  # one answer: below the threshold (t = 2)
        fed.clock.now += 2.0
        _answer(fed, "c")  # threshold reached 3 s after the stage opened; b stays silent
        assert fed.clock.now - opened == 3.0
        fed.clock.now += window - 0.1
        assert not fed.eng.tick()
        assert fed.stage() == stage
        # the round timer is told to wake for the grace close, not a second later
        assert fed.eng.seconds_to_next_event() == pytest.approx(min(1.0, 0.1))
        fed.clock.now += 0.2
        assert fed.eng.tick()  # closed: b declared dropped
        assert fed.stage() != stage
    fed.finish_evaluate()
    survivors = ("a", "b", "c") if silent_at == "unmask" else ("a", "c")
    row = fed.committed()
    assert row.metrics["train_clients"] == len(survivors)
    np.testing.assert_allclose(fed.model(), fed.expected(survivors, base), atol=2e-4)


def test_the_adaptive_grace_never_closes_below_the_threshold(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _adaptive(tmp_path, 0.5, floor=0.25))
    _start(fed)
    fed.clock.now += 10.0
    _answer(fed, "a")  # fewer than min_survivors = 2: the grace does not start
    fed.clock.now += 20.0  # 80 floors of silence (the deadline is at 1000 s)
    assert not fed.eng.tick()
    assert fed.stage() == "advertise"
    assert fed.eng.seconds_to_next_event() == 1.0  # nothing due but the deadline's polling
    _answer(fed, "b")  # the threshold, 30 s after the opening: the window is 15 s
    fed.clock.now += 14.9
    assert not fed.eng.tick()
    fed.clock.now += 0.2
    assert fed.eng.tick()
    assert fed.stage() == "share"


def test_the_adaptive_grace_waits_at_least_its_floor(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _adaptive(tmp_path, 0.5, floor=0.25))
    _start(fed)
    _answer(fed, "a", "c")  # the threshold at the stage's opening instant: 0.5 x 0 s
    assert fed.eng.seconds_to_next_event() == pytest.approx(0.25)
    fed.clock.now += 0.2
    assert not fed.eng.tick()
    fed.clock.now += 0.1
    assert fed.eng.tick()
    assert fed.stage() == "share"


def test_a_restart_mid_stage_starts_the_grace_again(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _adaptive(tmp_path, 0.5, floor=0.25))
    _start(fed)
    fed.clock.now += 3.0
    _answer(fed, "a", "c")  # enough; the window would be 1.5 s from here
    fed.clock.now += 10.0  # the server was down for these 10 s
    fed.restart()
    assert not fed.eng.tick()  # not closed at once: b may be retrying
    assert fed.stage() == "advertise"
    fed.clock.now += 0.2  # below the floor, counted from the restart
    assert not fed.eng.tick()
    fed.clock.now += 1.4
    assert fed.eng.tick()
    assert fed.stage() == "share"


def test_the_adaptive_grace_is_off_by_default(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **LONG)
    assert cfg.secagg.stage_grace_factor == 0.0
    assert cfg.secagg.stage_grace_floor_s > 0.0


@pytest.mark.parametrize("bad", [-0.5, float("inf"), float("nan"), 10.01, 1e9])
def test_bad_grace_factor_is_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ConfigError, match=r"stage_grace_factor must be 0 \(off\) or"):
        _config(tmp_path, secagg__stage_grace_factor=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_grace_floor_is_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ConfigError, match="stage_grace_floor_s must be a finite number"):
        _config(tmp_path, secagg__stage_grace_factor=0.5, secagg__stage_grace_floor_s=bad)


def test_grace_factor_bounds_and_types(tmp_path: Path) -> None:
    assert _config(tmp_path, secagg__stage_grace_factor=10).secagg.stage_grace_factor == 10.0
    with pytest.raises(ConfigError, match=r"secagg\.stage_grace_factor must be float"):
        _config(tmp_path, secagg__stage_grace_factor="0.5")
