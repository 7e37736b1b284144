"""Hostile connections: connection caps (total, per peer address, per client), timeouts, logging.

aiohttp's request handler closes a connection that has not sent a complete request head
within ``keepalive_timeout`` of connecting or of its last response (:data:`IDLE_TIMEOUT_S`,
passed by the server), which bounds slow headers (slowloris) and idle keep-alive
connections. What it lacks is here:

* :func:`read_body_to` streams a request body into a sink with an idle timeout per read and
  an overall deadline (:data:`BODY_IDLE_TIMEOUT_S`, :data:`BODY_GRACE_S`,
  :data:`BODY_MIN_BYTES_PER_S`): a Content-Length larger than the bytes sent, followed by
  silence, is answered 408 instead of being held forever.

* :class:`ConnectionLimiter` wraps the server's protocol factory: beyond ``max_total``
  open connections, or ``max_per_peer`` from one address, a new connection is reset at
  once (before any byte is read), so a flood can neither exhaust the file descriptors nor
  lock other sites out. Sites retry a closed connection with backoff.
* :class:`ClientRequestCap` (with :func:`client_cap_middleware`) caps the requests one
  *authenticated* client id has in progress at once (``server.max_requests_per_client``,
  default :data:`REQUESTS_PER_CLIENT`): one more is answered 429 ``client_busy`` with
  ``Retry-After``. A request counts from its signature check (:func:`confide_server.auth.
  authenticate`) until its handler returns, so a held long-poll counts; requests that
  carry no valid signature never count, so nobody can use up another site's share.
* :class:`RateLimitedLog` is a logging filter for the ``aiohttp`` and ``asyncio`` loggers:
  at most ``burst`` records per ``window_s`` seconds, each cut to ``max_chars`` characters
  with its traceback reduced to the exception's type and (cut) message: a parser error
  never logs a request body, and an accept loop failing under a flood cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from confide.errors import WireFormatError
from confide_server.events import BusyError
from confide_server.middlewares import RequestError

__all__ = [
    "BODY_GRACE_S",
    "BODY_IDLE_TIMEOUT_S",
    "BODY_MIN_BYTES_PER_S",
    "IDLE_TIMEOUT_S",
    "LISTEN_BACKLOG",
    "MIN_REQUESTS_PER_CLIENT",
    "REQUESTS_PER_CLIENT",
    "ClientRequestCap",
    "ConnectionLimiter",
    "LimitedSockSite",
    "RateLimitedLog",
    "client_cap_key",
    "client_cap_middleware",
    "default_connection_limits",
    "install_log_limits",
    "read_body_to",
    "release_client",
]

#: The listening socket's accept queue (the kernel caps it at ``net.core.somaxconn``).
#: aiohttp's sites default to 128, and asyncio's ``create_server(sock=...)`` calls
#: ``listen()`` again with the site's value: a round start that sends a thousand sites to
#: upload at once overflowed 128, and the dropped SYNs became 10 s connect timeouts.
LISTEN_BACKLOG = 4096

#: Seconds a connection may take to send a complete request head, after connecting or after
#: its previous response (slow headers and idle keep-alive connections are closed then).
#: 8 s: aiohttp rounds its keep-alive timer up to a whole second and a busy event loop adds
#: its lag, so a slow head is closed within the 10 s the operations guide promises.
IDLE_TIMEOUT_S = 8.0

#: Seconds an upload body may go without a byte arriving; then it is refused (408), its
#: upload slot freed and the connection closed (aiohttp itself has no body timeout).
BODY_IDLE_TIMEOUT_S = IDLE_TIMEOUT_S

#: A body must also arrive within ``BODY_GRACE_S + length / BODY_MIN_BYTES_PER_S`` seconds
#: in all, so a peer that sends one byte every few seconds cannot hold a slot for hours.
BODY_GRACE_S = 30.0
BODY_MIN_BYTES_PER_S = 32 * 1024

#: File descriptors kept free for the database, blobs and logs when the cap is derived.
_FD_RESERVE = 128


def default_connection_limits() -> tuple[int, int]:
    """``(max_total, max_per_peer)`` from this process's open-file limit.

    The total stays ``_FD_RESERVE`` below the soft ``RLIMIT_NOFILE`` (at least 16); one
    peer address may hold half of it, so another site always finds room.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    total = max(16, int(soft) - _FD_RESERVE)
    return total, max(8, total // 2)


class _Limited(asyncio.Protocol):
    """One connection: passes every event to the real protocol, or closes it at once."""

    def __init__(self, limiter: ConnectionLimiter, inner: asyncio.Protocol) -> None:
        self._limiter = limiter
        self._inner = inner
        self._peer: str | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self._limiter._admit(self._peer):
            # A reset (linger 0): the peer learns at once, and no TIME_WAIT state is kept.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            else:  # pragma: no cover - stream servers always hand a Transport
                transport.close()
            return
        self._admitted = True
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self._limiter._leave(self._peer or "?")
            self._inner.connection_lost(exc)


class ConnectionLimiter:
    """Cap open connections in total and per peer address (wraps a protocol factory).

    Parameters
    ----------
    factory : callable
        The real protocol factory (aiohttp's ``runner.server``).
    max_total : int
        Open connections at most; more are closed on arrival.
    max_per_peer : int
        Open connections from one address at most.
    """

    def __init__(
        self, factory: Callable[[], asyncio.Protocol], max_total: int, max_per_peer: int
    ) -> None:
        self._factory = factory
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.open = 0
        self.refused = 0
        self._per_peer: dict[str, int] = {}
        self._refusals_logged_at = 0.0

    def __call__(self) -> asyncio.Protocol:
        """Return the protocol of one new connection."""
        return _Limited(self, self._factory())

    def _admit(self, peer: str) -> bool:
        held = self._per_peer.get(peer, 0)
        if self.open >= self.max_total or held >= self.max_per_peer:
            self.refused += 1
            now = time.monotonic()
            if now - self._refusals_logged_at >= 10.0:  # one line per 10 s, never per refusal
                self._refusals_logged_at = now
                logging.getLogger("confide_server").warning(
                    "connection cap reached (%d open, %d from %s; caps %d total, %d per "
                    "address): closing new connections (%d so far)",
                    self.open,
                    held,
                    peer,
                    self.max_total,
                    self.max_per_peer,
                    self.refused,
                )
            return False
        self.open += 1
        self._per_peer[peer] = held + 1
        return True

    def _leave(self, peer: str) -> None:
        self.open -= 1
        left = self._per_peer.get(peer, 1) - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)


#: Requests one authenticated client may have in progress at once (the default of
#: ``server.max_requests_per_client``). A site's own pattern needs at most three: a long-poll,
#: an upload and the retry that may overlap the attempt it replaces; a model download makes
#: four.
REQUESTS_PER_CLIENT = 4

#: The smallest accepted ``server.max_requests_per_client``: one long-poll plus one upload.
MIN_REQUESTS_PER_CLIENT = 2

_CLIENT_SLOT = web.RequestKey("confide_client_slot", str)


class ClientRequestCap:
    """Count the requests in progress per authenticated client id; refuse one beyond the cap.

    Parameters
    ----------
    per_client : int
        Requests one client id may have in progress at once (>= 2).
    """

    def __init__(self, per_client: int = REQUESTS_PER_CLIENT) -> None:
        self.per_client = per_client
        self.refused = 0
        self._held: dict[str, int] = {}
        self._refusals_logged_at = 0.0

    def held_by(self, client: str) -> int:
        """Return how many requests ``client`` has in progress now."""
        return self._held.get(client, 0)

    def enter(self, request: web.Request, client: str) -> None:
        """Count ``request`` for ``client`` (once per request); pair with :meth:`leave`.

        Raises
        ------
        BusyError
            Code ``"client_busy"`` (429): ``client`` already has ``per_client`` requests in
            progress.
        """
        if _CLIENT_SLOT in request:
            return  # already counted (an upload checked at Expect and again in its handler)
        held = self._held.get(client, 0)
        if held >= self.per_client:
            self.refused += 1
            now = time.monotonic()
            if now - self._refusals_logged_at >= 10.0:  # one line per 10 s, never per refusal
                self._refusals_logged_at = now
                logging.getLogger("confide_server").warning(
                    "client %s has %d requests in progress (cap %d): answering 429 (%d so far)",
                    client[:64],
                    held,
                    self.per_client,
                    self.refused,
                )
            raise BusyError(
                f"this client already has {held} requests in progress (at most "
                f"{self.per_client}: server.max_requests_per_client); wait for one to finish "
                "or close the connections it no longer uses, then retry",
                "client_busy",
            )
        self._held[client] = held + 1
        request[_CLIENT_SLOT] = client

    def leave(self, request: web.Request) -> None:
        """Stop counting ``request`` (no-op for a request that was not counted, or twice)."""
        client = request.get(_CLIENT_SLOT)
        if client is None:
            return
        del request[_CLIENT_SLOT]
        left = self._held.get(client, 1) - 1
        if left > 0:
            self._held[client] = left
        else:
            self._held.pop(client, None)


client_cap_key = web.AppKey("client_cap_key", ClientRequestCap)


def release_client(request: web.Request) -> None:
    """Stop counting ``request`` against its client's cap (if it was counted)."""
    cap = request.app.get(client_cap_key)
    if cap is not None:
        cap.leave(request)


@web.middleware
async def client_cap_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Release the request's per-client count when its handler ends (however it ends).

    An ``Expect: 100-continue`` handler that answers by itself (the route handler and the
    middlewares then never run) calls :func:`release_client` instead.
    """
    try:
        return await handler(request)
    finally:
        release_client(request)


class RateLimitedLog(logging.Filter):
    """Let at most ``burst`` records through per ``window_s``, each cut to ``max_chars``.

    A record's traceback is replaced by one line naming its exception (cut too), so no
    request bytes an exception carries reach the log in bulk. The first record after a
    window with suppressed records says how many were dropped.
    """

    def __init__(self, burst: int = 20, window_s: float = 10.0, max_chars: int = 500) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.max_chars = max_chars
        self._lock = threading.Lock()
        self._window_start = 0.0
        self._passed = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Admit or drop ``record`` (rewritten: bounded message, no traceback)."""
        now = time.monotonic()
        with self._lock:
            dropped = 0
            if now - self._window_start >= self.window_s:
                self._window_start, self._passed = now, 0
                dropped, self._dropped = self._dropped, 0
            if self._passed >= self.burst:
                self._dropped += 1
                return False
            self._passed += 1
        text = _cut(record.getMessage(), self.max_chars)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" [{type(exc).__name__}: {_cut(str(exc), self.max_chars // 2)}]"
        if dropped:
            text += f" ({dropped} similar records suppressed in the last {self.window_s:.0f} s)"
        record.msg, record.args = text, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


#: Loggers that can be driven by what a connection sends (filters are not inherited).
_LIMITED_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.internal", "asyncio")


def install_log_limits(**kwargs: Any) -> None:
    """Put a :class:`RateLimitedLog` on aiohttp's server loggers and ``asyncio``'s (once)."""
    for name in _LIMITED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in logger.filters):
            logger.addFilter(RateLimitedLog(**kwargs))


class LimitedSockSite(web.SockSite):
    """An aiohttp site on a listening socket whose connections go through a limiter.

    Parameters
    ----------
    runner : web.BaseRunner
        The application's runner (set up).
    sock : socket.socket
        The listening socket.
    ssl_context : ssl.SSLContext, optional
        TLS for the site.
    limits : (int, int), optional
        ``(max_total, max_per_peer)``; by default :func:`default_connection_limits`.
    backlog : int
        The accept queue :meth:`start` gives the socket (it calls ``listen()`` again).
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: tuple[int, int] | None = None,
        backlog: int = LISTEN_BACKLOG,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=backlog)
        self._limits = limits or default_connection_limits()
        self.limiter: ConnectionLimiter | None = None

    async def start(self) -> None:
        """Register with the runner and serve the socket through a :class:`ConnectionLimiter`."""
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before starting a site")
        self.limiter = ConnectionLimiter(server, *self._limits)
        self._server = await loop.create_server(
            self.limiter, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )


async def read_body_to(
    request: web.Request,
    length: int,
    sink: Callable[[bytes], None],
    *,
    idle_s: float = BODY_IDLE_TIMEOUT_S,
) -> None:
    """Feed exactly ``length`` body bytes of ``request`` to ``sink``, chunk by chunk.

    Only the chunk being handed over is in memory (aiohttp buffers at most ~128 KiB per
    connection before it pauses reading the socket).

    Raises
    ------
    RequestError
        Code ``"body_timeout"`` (408): no byte arrived for ``idle_s`` seconds, or the
        body took longer than ``BODY_GRACE_S + length / BODY_MIN_BYTES_PER_S`` in all.
    WireFormatError
        The body ended (connection closed) before ``length`` bytes, or ran past it (422).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BODY_GRACE_S + length / BODY_MIN_BYTES_PER_S
    last = loop.time()
    got = 0
    handle: asyncio.TimerHandle | None = None

    def watch() -> None:  # one timer per body, not one per chunk
        nonlocal handle
        now = loop.time()
        if now - last >= idle_s or now >= deadline:
            request.content.set_exception(_StalledError())
            return
        handle = loop.call_at(min(last + idle_s, deadline), watch)

    handle = loop.call_at(min(last + idle_s, deadline), watch)
    try:
        while got < length:
            try:
                chunk = await request.content.readany()
            except _StalledError:
                raise _too_slow(got, length) from None
            except (asyncio.CancelledError, MemoryError):
                raise
            except Exception as exc:  # the peer closed mid-body (aiohttp's payload errors)
                raise WireFormatError(
                    f"the body ended after {got} of {length} bytes ({type(exc).__name__})"
                ) from None
            if not chunk:
                raise WireFormatError(
                    f"the body ended after {got} of {length} bytes (Content-Length)"
                )
            last = loop.time()
            got += len(chunk)
            if got > length:
                raise WireFormatError("body length differs from Content-Length")
            sink(chunk)
    finally:
        if handle is not None:
            handle.cancel()


class _StalledError(Exception):
    """Set on a request's payload by the body watchdog (never leaves this module)."""


def _too_slow(got: int, length: int) -> RequestError:
    return RequestError(
        f"the request body stalled after {got} of {length} bytes (Content-Length); send "
        f"the whole body without pauses over {BODY_IDLE_TIMEOUT_S:.0f} s",
        "body_timeout",
    )
