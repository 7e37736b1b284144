"""The application factory: ``create_app(config) -> web.Application``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from confide.protocol.manifest import Manifest
from confide_server.blobs import BlobStore, FaultHook
from confide_server.config import Config
from confide_server.connections import (
    IDLE_TIMEOUT_S,
    LISTEN_BACKLOG,
    ClientRequestCap,
    LimitedSockSite,
    client_cap_key,
    client_cap_middleware,
)
from confide_server.engine.rounds import CrashHook, RoundEngine
from confide_server.engine.secure import secure_upload_limit
from confide_server.events import NonceCache, Notifier, UploadGate
from confide_server.keys import (
    config_key,
    engine_key,
    finished_key,
    nonce_cache_key,
    notifier_key,
    upload_gate_key,
    wake_key,
)
from confide_server.memory import tune_allocator
from confide_server.middlewares import error_middleware
from confide_server.routes import setup_routes
from confide_server.store import Store

__all__ = ["RECOVERING_BODY", "create_app", "listen_socket", "open_engine", "recover_listening"]

log = logging.getLogger("confide_server")


def open_engine(
    config: Config,
    *,
    clock: Callable[[], float] | None = None,
    crash_hook: CrashHook | None = None,
    fault_hook: FaultHook | None = None,
) -> RoundEngine:
    """Open the job's state (creating it on first start) and recover the open round.

    Parameters
    ----------
    config : Config
        The job configuration.
    clock : callable, optional
        Unix-time source (tests).
    crash_hook : callable, optional
        Fault-injection hook (tests).
    fault_hook : callable, optional
        Storage fault injection (tests): called before each durable write step
        (:data:`confide_server.blobs.FaultHook`).

    Returns
    -------
    RoundEngine
        The recovered engine.
    """
    manifest = Manifest.load(config.manifest)
    store = Store(config.server.database, fault_hook=fault_hook)
    blobs = BlobStore(config.server.state_dir, fault_hook=fault_hook)
    engine = RoundEngine(
        config, store, blobs, manifest, clock=clock or time.time, crash_hook=crash_hook
    )
    engine.initialise(config.weights.read_bytes())
    return engine


#: What every route answers (503, ``Retry-After: 1``) while the server recovers its state.
RECOVERING_BODY: dict[str, object] = {
    "status": "recovering",
    "error": {
        "code": "recovering",
        "message": "the server is recovering its state after a restart; retry in a moment",
    },
}


def listen_socket(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Bind and listen on ``host:port`` (the first address it resolves to).

    The server listens before it recovers (:func:`recover_listening`), so a restart is
    never a refused connection: sites queue in the backlog or get a 503 "recovering".

    Raises
    ------
    OSError
        The address cannot be bound (``EADDRINUSE`` when another process holds the port).
    """
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _answer_recovering(request: web.Request) -> web.Response:
    """Every route during recovery: 503 "recovering" (the client retries it as a wait)."""
    return web.json_response(
        RECOVERING_BODY, status=503, headers={"Retry-After": "1", "Connection": "close"}
    )


async def recover_listening(
    sock: socket.socket,
    open_state: Callable[[], RoundEngine],
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> RoundEngine:
    """Run ``open_state`` in a worker thread while ``sock`` answers 503 "recovering".

    A stand-in application serves a duplicate of the listening socket meanwhile; every
    request (``/v1/health`` included) gets ``503 {"status": "recovering"}`` with
    ``Retry-After: 1`` and ``Connection: close``, so no connection outlives the recovery.
    When the state is open the stand-in stops; connections arriving in between wait in the
    listen backlog of ``sock`` for the real application.

    Parameters
    ----------
    sock : socket.socket
        The listening socket (:func:`listen_socket`); it stays open.
    open_state : callable
        Opens and recovers the job's state (:func:`open_engine` with its arguments).
    ssl_context : ssl.SSLContext, optional
        The server's TLS context, so the stand-in speaks TLS too.

    Returns
    -------
    RoundEngine
        What ``open_state`` returned (its exception propagates).
    """
    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", _answer_recovering)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=1.0,
        keepalive_timeout=IDLE_TIMEOUT_S,
    )
    await runner.setup()
    dup = sock.dup()
    try:
        await LimitedSockSite(runner, dup, ssl_context=ssl_context).start()
        return await asyncio.to_thread(open_state)
    finally:
        await runner.cleanup()
        dup.close()


async def _round_timer(app: web.Application) -> AsyncIterator[None]:
    """Background task: start rounds and close stages at their deadlines (cleanup_ctx)."""
    engine = app[engine_key]
    notifier = app[notifier_key]
    wake = app[wake_key]
    finished = app[finished_key]

    async def loop() -> None:
        backoff = 1.0
        while True:
            wake.clear()
            before = engine.round_key()
            try:
                changed = await asyncio.to_thread(engine.tick)
                backoff = 1.0
            except Exception as exc:
                # Only transient storage trouble gets here (the engine aborts a round whose
                # close fails otherwise): retry with a growing pause, one line per retry.
                log.warning(
                    "round timer: %s: %s; retrying in %.0f s", type(exc).__name__, exc, backoff
                )
                changed = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            if changed:
                # A stage change within the same open round wakes only the sites of its
                # cohort (the others wait on round changes, see Notifier).
                after = engine.round_key()
                notifier.notify(stage_only=before == after and after[1] is not None)
                continue
            if engine.status != "running":
                notifier.notify()
                finished.set()
            delay = max(0.01, engine.seconds_to_next_event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    engine.store.close()


def create_app(
    config: Config,
    *,
    engine: RoundEngine | None = None,
    crash_hook: CrashHook | None = None,
    fault_hook: FaultHook | None = None,
) -> web.Application:
    """Build the confide-server application for one job.

    Parameters
    ----------
    config : Config
        The job configuration.
    engine : RoundEngine, optional
        A pre-built engine (tests); opened from ``config`` when omitted.
    crash_hook : callable, optional
        Fault-injection hook passed to the engine (tests).
    fault_hook : callable, optional
        Storage fault injection passed to the store and blob store (tests).

    Returns
    -------
    web.Application
        The application; its round timer runs between startup and cleanup.
    """
    if engine is None:
        engine = open_engine(config, crash_hook=crash_hook, fault_hook=fault_hook)
    tune_allocator()  # freed upload buffers go back to the OS (confide_server.memory)
    upload_limit = config.server.max_upload_bytes or (engine.manifest.nbytes + 65536)
    if config.secagg.enabled:
        upload_limit = max(upload_limit, secure_upload_limit(engine.secure_vector_length))
    # Explicit body cap (aiohttp's default is 1 MiB); handlers check Content-Length first.
    # No request body is ever inflated: a compressed one is refused (415) by the error
    # middleware, and with auto_decompress off the parser never runs a decompressor on it
    # (no gzip bomb in memory, no decoder error outside any handler).
    app = web.Application(
        client_max_size=upload_limit + 4096,
        middlewares=[error_middleware, client_cap_middleware],
        handler_args={"auto_decompress": False},
    )
    app[config_key] = config
    app[engine_key] = engine
    app[notifier_key] = Notifier()
    app[wake_key] = asyncio.Event()
    app[finished_key] = asyncio.Event()
    app[nonce_cache_key] = NonceCache(2 * config.server.max_clock_skew_s)
    app[client_cap_key] = ClientRequestCap(config.server.max_requests_per_client)
    app[upload_gate_key] = UploadGate(
        config.server.max_concurrent_uploads, config.server.max_queued_uploads
    )
    setup_routes(app)
    app.cleanup_ctx.append(_round_timer)
    return app
