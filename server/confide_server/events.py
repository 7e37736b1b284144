"""Small asyncio helpers shared by handlers and the round timer (no aiohttp import)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable

import numpy as np

from confide.errors import FederationError

__all__ = ["UPLOADS_PER_CLIENT", "BusyError", "NonceCache", "Notifier", "UploadGate"]


class Notifier:
    """Wake the waiters when the round state changes.

    A long poll reads the state and then waits for the next change; a change that lands
    between the two must still wake it. It takes a :meth:`ticket` *before* reading the
    state and waits on that ticket, which any later :meth:`notify` has already set.

    Two kinds of change: every change (a stage opens or closes) sets :meth:`ticket`'s
    event; a *round* change (a round starts or ends, the job ends) sets
    :meth:`round_ticket`'s too. A site outside the open round's cohort gets the same
    answer (wait) at every stage of that round, so it waits on its round ticket: with
    1,000 sites polling and a cohort of 100, a stage change wakes the 100, not all 1,000.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._round_event = asyncio.Event()

    def notify(self, *, stage_only: bool = False) -> None:
        """Wake the current waiters (and every ticket taken before this call).

        Parameters
        ----------
        stage_only : bool
            The change is within the open round (a stage opened or closed): the round
            tickets are left alone. Default: a round change, which sets both.
        """
        self._event.set()
        self._event = asyncio.Event()
        if not stage_only:
            self._round_event.set()
            self._round_event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        """Return the event the next :meth:`notify` sets (take it before reading the state)."""
        return self._event

    def round_ticket(self) -> asyncio.Event:
        """Return the event the next round change sets (take it before reading the state)."""
        return self._round_event

    async def wait(self, timeout: float, ticket: asyncio.Event | None = None) -> None:
        """Wait for the next :meth:`notify` or ``timeout`` seconds, whichever comes first.

        With ``ticket`` (from :meth:`ticket` or :meth:`round_ticket`), a notify since the
        ticket was taken returns at once: it is not lost while the caller was reading the
        state.
        """
        event = self._event if ticket is None else ticket
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)


class NonceCache:
    """Nonces seen recently (bounded by age); older requests are stale anyway.

    Every request with a valid signature passes here, so the cache holds the request rate
    times ``max_age_s`` nonces: at a few hundred requests a second that is ~10^5 entries,
    and its per-entry cost is the server's memory growth until the window is full. So a
    nonce is kept as a 64-bit fingerprint (keyed BLAKE2b with a per-process random key):
    the nonces of the newest time slice (``max_age_s / slices``) in a set, older ones in
    one sorted ``uint64`` array with their slice's start time (16 bytes a nonce), merged
    once a slice and cleared of slices whose newest nonce is older than ``max_age_s``.

    A nonce is remembered for at least ``max_age_s`` (at most one slice longer), on the
    monotonic clock. The same nonce always has the same fingerprint, so a replay is never
    accepted; two different nonces share one with probability ~2^-64 per pair, which only
    refuses a fresh request as a replay (409) and cannot be aimed without the key.

    Parameters
    ----------
    max_age_s : float
        How long a nonce is remembered (twice the accepted clock skew).
    slices : int, default 32
        Time slices the window is cut into (one merge per slice).
    clock : callable, optional
        Monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        max_age_s: float,
        slices: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not max_age_s > 0 or slices < 1:
            raise ValueError("max_age_s must be > 0 and slices >= 1")
        self._max_age = max_age_s
        self._width = max_age_s / slices
        self._clock = clock
        self._key = secrets.token_bytes(16)
        # The open slice: its start and its fingerprints.
        self._start: float | None = None
        self._open: set[int] = set()
        # Older slices: fingerprints (sorted) and each one's slice start.
        self._fps = np.empty(0, dtype=np.uint64)
        self._starts = np.empty(0, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._open) + int(self._fps.size)

    def _fingerprint(self, nonce: str) -> int:
        data = nonce.encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(data, digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little")

    def _close_slice(self, now: float) -> None:
        """Merge the open slice into the sorted arrays; drop slices past ``max_age_s``."""
        fps, starts = self._fps, self._starts
        keep = starts + self._width + self._max_age >= now
        if not keep.all():
            fps, starts = fps[keep], starts[keep]
        if self._open and self._start is not None:
            new = np.sort(np.fromiter(self._open, np.uint64, len(self._open)))
            at = np.searchsorted(fps, new)  # a linear merge: copies, no re-sort
            fps = np.insert(fps, at, new)
            starts = np.insert(starts, at, self._start)
        self._fps, self._starts = fps, starts
        self._open = set()
        self._start = now

    def add(self, nonce: str) -> bool:
        """Record ``nonce``; return ``False`` if it was already seen."""
        now = self._clock()
        if self._start is None or now >= self._start + self._width:
            self._close_slice(now)
        fp = self._fingerprint(nonce)
        if fp in self._open:
            return False
        i = int(np.searchsorted(self._fps, np.uint64(fp)))
        if i < self._fps.size and int(self._fps[i]) == fp:
            return False
        self._open.add(fp)
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
