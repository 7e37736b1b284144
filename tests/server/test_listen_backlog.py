"""The server's accept queue: a thousand sites connecting in the same second are queued.

``LimitedSockSite.start`` hands the listening socket to ``loop.create_server``, which calls
``listen()`` again with the site's backlog; aiohttp's default there is 128. A round start
that sends a 1,000-site cohort to upload at once overflowed it: the kernel dropped their
SYNs and the uploads failed with 10 s connect timeouts (the 10,000-client Ray run, issue
16). Here the server's event loop is deliberately blocked (no ``accept()`` runs) while more
than 128 clients connect: every connection must still complete in the kernel's queue.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest
from aiohttp import web

from confide_server.app import listen_socket
from confide_server.connections import LISTEN_BACKLOG, LimitedSockSite

#: More connections than aiohttp's default backlog of 128 lets the kernel queue.
_CONNECTIONS = 300


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 4096


def _listen_backlog(sock: socket.socket) -> int:
    """The accept-queue size of a listening socket (Linux: ``tcpi_sacked`` of TCP_INFO)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 28)[0])


pytestmark = pytest.mark.skipif(
    not hasattr(socket, "TCP_INFO") or _somaxconn() <= _CONNECTIONS,
    reason="needs Linux TCP_INFO and net.core.somaxconn above the connections opened",
)


def test_site_keeps_the_large_backlog_and_queues_a_burst_while_the_loop_is_busy() -> None:
    async def main() -> tuple[int, int]:
        runner = web.AppRunner(web.Application(), handle_signals=False)
        await runner.setup()
        sock = listen_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        try:
            await LimitedSockSite(runner, sock).start()
            backlog = _listen_backlog(sock)
            # The loop is blocked from here on: nothing accepts; the kernel's queue must
            # hold every connection (a dropped SYN would block connect() past its timeout).
            clients = []
            try:
                for _ in range(_CONNECTIONS):
                    clients.append(socket.create_connection(("127.0.0.1", port), timeout=30))
                connected = len(clients)
            finally:
                for c in clients:
                    c.close()
            return backlog, connected
        finally:
            await runner.cleanup()
            sock.close()

    backlog, connected = asyncio.run(main())
    assert backlog == min(LISTEN_BACKLOG, _somaxconn())
    assert connected == _CONNECTIONS


def test_aiohttp_default_site_would_have_reset_the_backlog_to_128() -> None:
    """The premise: without the explicit backlog the socket's queue drops to 128."""

    async def main() -> int:
        runner = web.AppRunner(web.Application(), handle_signals=False)
        await runner.setup()
        sock = listen_socket("127.0.0.1", 0)
        try:
            assert _listen_backlog(sock) == min(LISTEN_BACKLOG, _somaxconn())
            await web.SockSite(runner, sock).start()
            return _listen_backlog(sock)
        finally:
            await runner.cleanup()
            sock.close()

    assert asyncio.run(main()) == 128
