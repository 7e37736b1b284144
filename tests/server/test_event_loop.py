"""Slow engine work never blocks the event loop: health and polls answer while it runs.

The round timer runs ``RoundEngine.tick`` in a worker thread; handlers take the engine lock
on the loop thread. A tick that held the lock across the privacy accounting (or the SecAgg+
setup, or a ``synchronous=FULL`` commit) would stall every request behind it. Here the
accounting of a round start is made slow (it waits on an event, at most 3 s) and
``/v1/health`` and a task poll must answer within 1 s while it is still running.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from confide_server.engine.rounds import RoundEngine
from tests.server.conftest import Fed
from tests.server.util import delta_body, tiny_manifest, write_job

SLOW_S = 3.0
BOUND_S = 1.0


class SlowCall:
    """Wraps an engine method: signals when it is entered, then blocks until released."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.release.wait(SLOW_S)
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.done.set()


async def _answers_while_slow(fed: Fed, slow: SlowCall) -> None:
    assert await asyncio.to_thread(slow.entered.wait, 30), "the slow call never started"
    t0 = time.monotonic()
    resp = await fed.http.get("/v1/health")
    assert resp.status == 200
    assert await resp.json() == {"ok": True}
    health_s = time.monotonic() - t0
    task = await fed.task("alice")  # an unrelated poll: the round is not visible yet
    poll_s = time.monotonic() - t0
    still_running = not slow.done.is_set()
    slow.release.set()
    assert still_running, "the slow call ended before the requests were answered"
    assert task["action"] == "wait"
    assert health_s < BOUND_S, f"/v1/health took {health_s:.2f} s behind the slow call"
    assert poll_s < BOUND_S, f"health + task poll took {poll_s:.2f} s behind the slow call"


@pytest.mark.parametrize("mode", ["sample", "central"])
async def test_health_and_polls_answer_during_slow_accounting(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path, mode: str
) -> None:
    cfg = write_job(tmp_path, privacy__mode=mode, privacy__noise_multiplier=1.0)
    fed = await make_fed(cfg)
    await fed.enroll("alice")
    await fed.enroll("bob")
    engine: RoundEngine = fed.engine
    if mode == "sample":
        # sample-level DP accounts the round when it starts (write-ahead)
        slow = SlowCall(engine.privacy.account)
        engine.privacy.account = slow  # type: ignore[method-assign]
    else:
        # central DP has no accounting at the start; the budget check runs there
        slow = SlowCall(engine.privacy.allows_next_round)
        engine.privacy.allows_next_round = slow  # type: ignore[method-assign]
    await fed.task("alice")
    await fed.task("bob")  # both active: the timer starts round 1 in a worker thread
    await _answers_while_slow(fed, slow)
    task = await fed.wait_for("alice", "train")
    assert task["round"] == 1
    assert task["privacy"]["mode"] == mode


async def test_health_answers_while_a_submission_commit_holds_the_engine_lock(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    """A durable commit (synchronous=FULL) runs under the engine lock in a worker thread;
    a concurrent poll must wait for it in a worker thread too, not on the event loop."""
    fed = await make_fed(write_job(tmp_path))
    await fed.enroll("alice")
    await fed.enroll("bob")
    await fed.task("alice")
    await fed.task("bob")
    await fed.wait_for("alice", "train")
    engine: RoundEngine = fed.engine
    slow = SlowCall(engine.store.insert_submission)
    engine.store.insert_submission = slow  # type: ignore[method-assign]
    upload = asyncio.ensure_future(fed.put("alice", 1, "train", delta_body(tiny_manifest(), 0.1)))
    assert await asyncio.to_thread(slow.entered.wait, 30), "the commit never started"
    poll = asyncio.ensure_future(fed.task("bob"))  # needs the engine lock the commit holds
    t0 = time.monotonic()
    resp = await fed.http.get("/v1/health")
    health_s = time.monotonic() - t0
    still_running = not slow.done.is_set()
    slow.release.set()
    assert resp.status == 200
    assert still_running, "the commit ended before /v1/health was answered"
    assert health_s < BOUND_S, f"/v1/health took {health_s:.2f} s behind a slow commit"
    status, doc = await upload
    assert status == 200, doc
    assert (await poll)["action"] in ("train", "wait")
