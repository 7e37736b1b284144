"""Small asyncio helpers shared by handlers and the round timer (no aiohttp import)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from confide.errors import FederationError

__all__ = ["UPLOADS_PER_CLIENT", "BusyError", "NonceCache", "Notifier", "UploadGate"]


class Notifier:
    """Wake every waiter when the round state changes.

    A long poll reads the state and then waits for the next change; a change that lands
    between the two must still wake it. It takes a :meth:`ticket` *before* reading the
    state and waits on that ticket, which any later :meth:`notify` has already set.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake all current waiters (and every ticket taken before this call)."""
        self._event.set()
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        """Return the event the next :meth:`notify` sets (take it before reading the state)."""
        return self._event

    async def wait(self, timeout: float, ticket: asyncio.Event | None = None) -> None:
        """Wait for the next :meth:`notify` or ``timeout`` seconds, whichever comes first.

        With ``ticket`` (from :meth:`ticket`), a notify since the ticket was taken returns
        at once: it is not lost while the caller was reading the state.
        """
        event = self._event if ticket is None else ticket
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


#: Upload slots one authenticated client may hold at once (a site sends one upload at a time;
#: a retry may overlap the attempt it replaces).
UPLOADS_PER_CLIENT = 2


class UploadGate:
    """Bound the uploads in progress at once, per client, and the queue in front of them.

    Parameters
    ----------
    concurrent : int
        Bodies read and processed at the same time (all clients together).
    queued : int
        Uploads allowed to wait for a slot; beyond that :class:`BusyError` (503).
    per_client : int
        Slots (held or waited for) one client id may have at once; beyond that
        :class:`BusyError` with code ``"client_busy"`` (429), so one cohort member that
        opens many uploads and never sends their bodies cannot take every slot.
    """

    def __init__(self, concurrent: int, queued: int, per_client: int = UPLOADS_PER_CLIENT) -> None:
        self._sem = asyncio.Semaphore(concurrent)
        self._queued = queued
        self._waiting = 0
        self.per_client = per_client
        self._held: dict[str, int] = {}

    def held_by(self, client: str) -> int:
        """Slots ``client`` holds or waits for now."""
        return self._held.get(client, 0)

    async def acquire(self, client: str | None = None) -> None:
        """Take an upload slot, waiting in the bounded queue; pair with :meth:`release`.

        Parameters
        ----------
        client : str, optional
            The authenticated client id the slot is for (counted against ``per_client``).

        Raises
        ------
        BusyError
            The queue is full (503), or ``client`` already has ``per_client`` slots (429).
        """
        if client is not None and self._held.get(client, 0) >= self.per_client:
            raise BusyError(
                f"this client already has {self.per_client} uploads in progress; finish or "
                "close them before sending another",
                "client_busy",
            )
        if self._sem.locked() and self._waiting >= self._queued:
            raise BusyError("too many uploads in progress; retry shortly")
        if client is not None:
            self._held[client] = self._held.get(client, 0) + 1
        self._waiting += 1
        try:
            await self._sem.acquire()
        except BaseException:
            self._drop(client)
            raise
        finally:
            self._waiting -= 1

    def release(self, client: str | None = None) -> None:
        """Give back a slot taken with :meth:`acquire` (with the same ``client``)."""
        self._drop(client)
        self._sem.release()

    def _drop(self, client: str | None) -> None:
        if client is None:
            return
        left = self._held.get(client, 1) - 1
        if left > 0:
            self._held[client] = left
        else:
            self._held.pop(client, None)

    @contextlib.asynccontextmanager
    async def slot(self, client: str | None = None) -> AsyncIterator[None]:
        """Hold one upload slot for the duration of the block."""
        await self.acquire(client)
        try:
            yield
        finally:
            self.release(client)
