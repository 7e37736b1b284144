"""After sites die, the next cohort holds only sites seen since the last round closed (item 11).

The engine on real SQLite with a fake clock. The first round waits for ``wait_for_clients``
active sites; later rounds draw from the sites that polled since the previous round closed,
start at once when ``wait_for_clients`` of them are back, and otherwise, after
``COHORT_GRACE_S``, with at least ``min_clients`` (a job that lost sites goes on; it never
stalls on ``wait_for_clients``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from confide_server.config import Config
from confide_server.engine.rounds import COHORT_GRACE_S, RoundEngine
from tests.server.conftest import FakeClock
from tests.server.util import delta_body, enrolled_engine, eval_body, tiny_manifest, write_job

MANIFEST = tiny_manifest()
IDS = ("a", "b", "c", "d")


def _config(tmp: Path) -> Config:
    return write_job(
        tmp,
        job__cohort_size=4,
        job__min_clients=2,
        job__wait_for_clients=4,
        job__rounds=10,
        job__max_consecutive_aborts=5,
    )


def _engine(cfg: Config, clock: FakeClock) -> RoundEngine:
    """The four sites enrolled; none has polled yet."""
    return enrolled_engine(cfg, clock, IDS, touch=False)


def _round_one_open(cfg: Config) -> tuple[RoundEngine, FakeClock]:
    """A fresh engine whose four sites all polled: round 1 is open with all of them."""
    clock = FakeClock()
    engine = _engine(cfg, clock)
    for cid in IDS:
        engine.touch(cid)
    assert engine.tick()
    return engine, clock


def _finish_round(engine: RoundEngine, clock: FakeClock, r: int, sites: tuple[str, ...]) -> None:
    for cid in sites:
        prepared = engine.prepare(cid, r, "train", delta_body(MANIFEST, 0.1))
        engine.commit_submission(prepared, nonce=f"{cid}-t-{r}")
    clock.now += 31.0  # past the train deadline when someone is missing
    assert engine.tick()
    for cid in sites:
        prepared = engine.prepare(cid, r, "evaluate", eval_body(0.5))
        engine.commit_submission(prepared, nonce=f"{cid}-e-{r}")
    clock.now += 31.0
    assert engine.tick()
    row = engine.store.get_round(r)
    assert row is not None
    assert row.status in ("committed", "aborted")


def _cohort(engine: RoundEngine, r: int) -> tuple[str, ...]:
    row = engine.store.get_round(r)
    assert row is not None
    return row.cohort


def test_first_round_waits_for_wait_for_clients(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(_config(tmp_path), clock)
    for cid in IDS[:3]:
        engine.touch(cid)
    clock.now += 100.0  # however long: 3 < wait_for_clients = 4
    for cid in IDS[:3]:
        engine.touch(cid)
    assert not engine.tick()
    engine.touch("d")
    assert engine.tick()
    assert _cohort(engine, 1) == IDS


def test_dead_sites_are_not_drawn_and_the_job_goes_on_with_min_clients(tmp_path: Path) -> None:
    engine, clock = _round_one_open(_config(tmp_path))
    _finish_round(engine, clock, 1, IDS)
    # c and d die; a and b poll again after round 1 closed (well within the 60 s window)
    clock.now += 1.0
    for cid in ("a", "b"):
        engine.touch(cid)
    assert not engine.tick()  # grace: the survivors may still be coming back
    clock.now += COHORT_GRACE_S
    for cid in ("a", "b"):
        engine.touch(cid)
    assert engine.tick()  # 2 >= min_clients after the grace: no stall
    assert _cohort(engine, 2) == ("a", "b")  # the dead c, d are not in it
    _finish_round(engine, clock, 2, ("a", "b"))
    row = engine.store.get_round(2)
    assert row is not None
    assert row.status == "committed"


def test_all_back_means_a_full_cohort_at_once(tmp_path: Path) -> None:
    engine, clock = _round_one_open(_config(tmp_path))
    _finish_round(engine, clock, 1, IDS)
    clock.now += 0.5
    for cid in IDS:  # every site polls right after the close
        engine.touch(cid)
    assert engine.tick()  # no grace needed: wait_for_clients are back
    assert _cohort(engine, 2) == IDS


def test_after_all_sites_died_the_next_round_waits_for_live_ones(tmp_path: Path) -> None:
    engine, clock = _round_one_open(_config(tmp_path))
    # everyone dies holding round 1's task: it aborts at its deadline
    clock.now += 31.0
    assert engine.tick()
    row = engine.store.get_round(1)
    assert row is not None
    assert row.status == "aborted"
    # they all count as "active" for 60 s, but none polled since the close: no round
    clock.now += 10.0
    assert not engine.tick()
    assert engine.store.get_round(2) is None
    # two sites restart; after the grace the round starts with exactly them
    for cid in ("b", "d"):
        engine.touch(cid)
    clock.now += COHORT_GRACE_S
    assert engine.tick()
    assert _cohort(engine, 2) == ("b", "d")


def test_restart_keeps_the_rule(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    engine, clock = _round_one_open(cfg)
    _finish_round(engine, clock, 1, IDS)
    engine.store.close()
    engine = _engine(cfg, clock)  # the close time comes back from the store
    clock.now += 1.0
    for cid in ("a", "c", "d"):
        engine.touch(cid)
    clock.now += COHORT_GRACE_S
    assert engine.tick()
    assert _cohort(engine, 2) == ("a", "c", "d")


class _CountingDict(dict[str, str]):
    """The engine's enrolled-sites table, counting the snapshots a tick takes of it."""

    snapshots = 0

    def items(self) -> Any:
        type(self).snapshots += 1
        return super().items()


def test_a_tick_with_too_few_sites_seen_takes_no_snapshot(tmp_path: Path) -> None:
    """Every poll of an idle job wakes the timer: with thousands of sites enrolling, a tick
    that copied and sorted them all each time held the server's GIL (issue 16). A tick that
    cannot start a round (fewer sites ever seen than it needs) must not look at them."""
    clock = FakeClock()
    engine = _engine(_config(tmp_path), clock)
    _CountingDict.snapshots = 0
    engine._clients = _CountingDict(engine._clients)  # counting the engine's reads
    for cid in IDS[:3]:
        engine.touch(cid)
    for _ in range(5):
        assert not engine.tick()
    assert _CountingDict.snapshots == 0
    engine.touch("d")
    assert engine.tick()  # all four: the round starts (one snapshot)
    assert _CountingDict.snapshots == 1
    assert _cohort(engine, 1) == IDS
