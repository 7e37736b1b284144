"""Small asyncio helpers shared by handlers and the round timer (no aiohttp import)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from confide.errors import FederationError

__all__ = ["BusyError", "NonceCache", "Notifier", "UploadGate"]


class Notifier:
    """Wake every waiter when the round state changes."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake all current waiters."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        """Wait for the next :meth:`notify` or ``timeout`` seconds, whichever comes first."""
        event = self._event
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


class NonceCache:
    """Nonces seen recently (bounded by age); older requests are stale anyway.

    Parameters
    ----------
    max_age_s : float
        How long a nonce is remembered (twice the accepted clock skew).
    """

    def __init__(self, max_age_s: float) -> None:
        self._max_age = max_age_s
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, nonce: str) -> bool:
        """Record ``nonce``; return ``False`` if it was already seen."""
        now = time.monotonic()
        while self._seen:
            oldest, ts = next(iter(self._seen.items()))
            if now - ts <= self._max_age:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


class BusyError(FederationError):
    """Too many uploads are queued; the client should retry later (503)."""

    code = "busy"


class UploadGate:
    """Bound the uploads whose bodies are in memory at once, and the queue in front of them.

    Parameters
    ----------
    concurrent : int
        Bodies read and processed at the same time.
    queued : int
        Uploads allowed to wait for a slot; beyond that :class:`BusyError` (503).
    """

    def __init__(self, concurrent: int, queued: int) -> None:
        self._sem = asyncio.Semaphore(concurrent)
        self._queued = queued
        self._waiting = 0

    async def acquire(self) -> None:
        """Take an upload slot, waiting in the bounded queue; pair with :meth:`release`.

        Raises
        ------
        BusyError
            The queue is full.
        """
        if self._sem.locked() and self._waiting >= self._queued:
            raise BusyError("too many uploads in progress; retry shortly")
        self._waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        self._sem.release()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one upload slot for the duration of the block."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()
