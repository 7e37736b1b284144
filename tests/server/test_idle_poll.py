"""Idle long polls are answered on the event loop, with exactly ``task_for``'s answer.

``RoundEngine.wait_task_nowait`` answers a poll whose answer is a plain wait without the
worker-thread hop (a third of the server's time with 10,000 idle sites, issue 16); any
other answer, and any poll while the engine lock is busy, goes to ``task_for`` in a worker
thread (``None`` here). The engine on real SQLite with a fake clock.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from confide.protocol.tasks import TrainTask, WaitTask
from confide_server.app import open_engine
from confide_server.engine.rounds import RoundEngine
from tests.server.conftest import FakeClock
from tests.server.util import delta_body, tiny_manifest, write_job

MANIFEST = tiny_manifest()
IDS = ("a", "b", "c", "d", "e", "f")


def _engine(tmp: Path, clock: FakeClock) -> RoundEngine:
    cfg = write_job(
        tmp, job__cohort_size=3, job__min_clients=2, job__wait_for_clients=6, job__rounds=2
    )
    engine = open_engine(cfg, clock=clock)
    for cid in IDS:
        engine.enroll(engine.create_tokens(1)[0], cid, f"key-{cid}")
        engine.touch(cid)
    return engine


def _agrees(engine: RoundEngine, cid: str) -> WaitTask | None:
    """``wait_task_nowait``'s answer, checked against ``task_for``'s."""
    quick = engine.wait_task_nowait(cid)
    slow = engine.task_for(cid)
    if quick is not None:
        assert isinstance(slow, WaitTask)
        assert quick.to_json() == slow.to_json()
    else:
        assert not isinstance(slow, WaitTask)
    return quick


def test_waits_are_answered_inline_and_tasks_are_not(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(tmp_path, clock)
    for cid in IDS:  # no round yet: everyone waits
        assert _agrees(engine, cid) is not None
    assert engine.tick()  # round 1 opens with a cohort of 3
    row = engine.store.get_round(1)
    assert row is not None
    cohort = row.cohort
    outside = [c for c in IDS if c not in cohort]
    assert len(cohort) == 3
    assert len(outside) == 3
    for cid in outside:
        assert _agrees(engine, cid) is not None
    for cid in cohort:  # a train task: built in the worker thread, not here
        assert _agrees(engine, cid) is None
        assert isinstance(engine.task_for(cid), TrainTask)
    first = cohort[0]
    prepared = engine.prepare(first, 1, "train", delta_body(MANIFEST, 0.1))
    engine.commit_submission(prepared, nonce="t-1")
    assert _agrees(engine, first) is not None  # submitted: waits for the others
    assert _agrees(engine, cohort[1]) is None
    clock.now += 10_000.0  # past the deadline, not yet closed: everyone waits
    for cid in IDS:
        assert _agrees(engine, cid) is not None


def test_a_busy_engine_lock_sends_the_poll_to_the_worker_thread(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(tmp_path, clock)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine._lock:  # as a durable commit holds it
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        assert engine.wait_task_nowait("a") is None  # never blocks on the lock
    finally:
        release.set()
        holder.join()
    assert engine.wait_task_nowait("a") is not None


def test_a_finished_job_is_not_a_wait(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = _engine(tmp_path, clock)
    engine.status = "finished"
    assert engine.wait_task_nowait("a") is None
    assert engine.task_for("a").action == "finished"


def test_outside_the_cohort_only_a_round_change_matters(tmp_path: Path) -> None:
    # The long poll of a site outside the open round's cohort waits on round changes only
    # (Notifier.round_ticket); the round timer tells the two apart by round_key.
    clock = FakeClock()
    engine = _engine(tmp_path, clock)
    assert engine.round_key() == ("running", None)
    assert not any(engine.outside_open_round(c) for c in IDS)  # no round: every change counts
    assert engine.tick()
    row = engine.store.get_round(1)
    assert row is not None
    cohort = row.cohort
    outside = [c for c in IDS if c not in cohort]
    for cid in IDS:  # as the handler does: the task first, then which ticket
        engine.wait_task_nowait(cid)
    assert engine.round_key() == ("running", 1)
    assert [c for c in IDS if engine.outside_open_round(c)] == outside
    for k, cid in enumerate(cohort):
        prepared = engine.prepare(cid, 1, "train", delta_body(MANIFEST, 0.1))
        engine.commit_submission(prepared, nonce=f"t-{k}")
    assert engine.tick()  # train closed, evaluate opened: a stage change of round 1
    assert engine.round_key() == ("running", 1)
    for cid in outside:  # still a wait at every stage of the round
        assert engine.outside_open_round(cid)
        assert isinstance(engine.task_for(cid), WaitTask)
    for cid in cohort:
        assert not engine.outside_open_round(cid)
        assert engine.task_for(cid).action == "evaluate"
    for k, cid in enumerate(cohort):
        body = json.dumps({"num_examples": 4, "metrics": {"accuracy": 0.5}}).encode()
        engine.commit_submission(engine.prepare(cid, 1, "evaluate", body), nonce=f"e-{k}")
    assert engine.tick()  # round 1 committed: a round change
    assert engine.round_key() == ("running", None)
    assert not any(engine.outside_open_round(c) for c in IDS)
    engine.status = "finished"  # the job's end is a round change: everyone is woken
    assert engine.round_key()[0] == "finished"
    assert not any(engine.outside_open_round(c) for c in IDS)
