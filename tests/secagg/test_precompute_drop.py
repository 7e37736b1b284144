"""A left round's mask precompute is let go without leaking an unretrieved exception.

The client starts the mask seeds' derivation in a worker thread after its share upload
(issue 16). When the round moves on before the mask stage (the next advertise, or a mask
task of another round), that job is dropped, not awaited. If it had failed, asyncio would
report "Future exception was never retrieved" when the future is collected; the client now
collects the outcome of a dropped job and logs the failure as one line.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from confide.client.client import Client


def _collected_reports(drop: Any) -> list[dict[str, Any]]:
    """Run ``drop(loop, future)`` on a future that failed; return asyncio's error reports
    after the future is garbage-collected."""
    reports: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: reports.append(ctx))
        fut: asyncio.Future[int] = loop.create_future()
        fut.set_exception(RuntimeError("boom"))
        drop(loop, fut)
        del fut
        await asyncio.sleep(0)  # done callbacks run
        gc.collect()

    asyncio.run(main())
    return reports


def test_a_bare_drop_of_a_failed_future_is_reported() -> None:
    """The control: dropping a failed future unread makes asyncio complain (so the test
    below, which expects silence, can fail)."""
    reports = _collected_reports(lambda _loop, _fut: None)
    assert any("never retrieved" in str(r.get("message")) for r in reports)


def test_a_dropped_precompute_that_failed_is_collected_and_logged(tmp_path: Path) -> None:
    lines: list[str] = []
    client = Client("http://127.0.0.1:9", tmp_path, log=lines.append)
    client.client_id = "site-1"

    def drop(_loop: Any, fut: Any) -> None:
        client._precompute = (7, fut)
        client._drop_precompute()
        assert client._precompute is None

    reports = _collected_reports(drop)
    assert reports == []
    assert lines == ["site-1: round 7: mask precompute failed: <class 'RuntimeError'>"]


def test_the_next_round_drops_the_previous_precompute(tmp_path: Path) -> None:
    """``_settle_precompute`` for another round lets the pending job go (collected, not
    awaited) and forgets it."""
    lines: list[str] = []
    client = Client("http://127.0.0.1:9", tmp_path, log=lines.append)
    client.client_id = "site-1"
    reports: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: reports.append(ctx))
        fut: asyncio.Future[int] = loop.create_future()
        client._precompute = (3, fut)
        await client._settle_precompute(4)
        assert client._precompute is None
        assert not fut.done()  # not awaited: it was dropped
        fut.set_exception(RuntimeError("late"))
        del fut
        await asyncio.sleep(0)
        gc.collect()

    asyncio.run(main())
    assert reports == []
    assert lines == ["site-1: round 3: mask precompute failed: <class 'RuntimeError'>"]
