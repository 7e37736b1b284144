"""Downtime does not eat stage deadlines: an open stage keeps its remaining time across restarts."""

from __future__ import annotations

from pathlib import Path

from confide_server.config import Config
from confide_server.engine.rounds import RESTART_GRACE_S, RoundEngine
from tests.server.conftest import FakeClock
from tests.server.util import delta_body, enrolled_engine, tiny_manifest, write_job

MANIFEST = tiny_manifest()
TRAIN_S = 30.0


def _config(tmp: Path) -> Config:
    return write_job(
        tmp,
        job__cohort_size=3,
        job__min_clients=1,
        job__wait_for_clients=3,
        job__rounds=1,
        deadlines__train=TRAIN_S,
    )


def _submit(engine: RoundEngine, cid: str) -> None:
    prepared = engine.prepare(cid, 1, "train", delta_body(MANIFEST, 1.0))
    engine.commit_submission(prepared, nonce=f"{cid}-train")


def test_a_restart_longer_than_the_stage_keeps_its_remaining_time(tmp_path: Path) -> None:
    cfg, clock = _config(tmp_path), FakeClock()
    eng = enrolled_engine(cfg, clock)
    assert eng.tick()  # round 1 opens: train until t0 + 30
    opened = clock.now
    clock.now += 12.0
    _submit(eng, "a")  # the last durable step: 18 s were left
    eng.store.close()  # "SIGKILL"
    clock.now += 10 * TRAIN_S  # down far longer than the stage
    eng = enrolled_engine(cfg, clock)
    row = eng.store.get_round(1)
    assert row is not None
    assert row.stage == "train"
    assert row.deadline == clock.now + 18.0
    assert not eng.tick()  # not due: b and c still have their time
    clock.now += 17.0
    _submit(eng, "b")
    _submit(eng, "c")
    assert eng.tick()
    row = eng.store.get_round(1)
    assert row is not None
    assert row.stage == "evaluate"
    assert row.deadline > opened + TRAIN_S


def test_repeated_restarts_never_add_up_nor_shorten(tmp_path: Path) -> None:
    cfg, clock = _config(tmp_path), FakeClock()
    eng = enrolled_engine(cfg, clock)
    assert eng.tick()
    clock.now += 25.0  # idle since the stage opened (its last durable step), then "SIGKILL"
    eng.store.close()
    eng = enrolled_engine(cfg, clock)  # idle time before a crash counts as downtime: 30 s again
    row = eng.store.get_round(1)
    assert row is not None
    assert row.deadline == clock.now + TRAIN_S
    for _ in range(3):  # crash loops: each re-arm is the last durable step
        clock.now += 1.0
        eng.store.close()
        eng = enrolled_engine(cfg, clock)
        row = eng.store.get_round(1)
        assert row is not None
        assert row.deadline == clock.now + TRAIN_S
    eng.store.close()
    eng = enrolled_engine(cfg, clock)  # no downtime at all: the deadline is kept as it is
    kept = eng.store.get_round(1)
    assert kept is not None
    assert kept.deadline == row.deadline
    eng.store.close()


def test_a_nearly_expired_stage_gets_the_restart_grace(tmp_path: Path) -> None:
    cfg, clock = _config(tmp_path), FakeClock()
    eng = enrolled_engine(cfg, clock)
    assert eng.tick()
    clock.now += TRAIN_S - 0.5
    _submit(eng, "a")  # half a second left
    eng.store.close()
    clock.now += 100.0
    eng = enrolled_engine(cfg, clock)
    row = eng.store.get_round(1)
    assert row is not None
    assert row.deadline == clock.now + RESTART_GRACE_S
    eng.store.close()
