"""Hostile connections against a real server process: slow heads, idle sockets, floods.

Bounds here are generous upper limits (the server closes at 8 s; without the limits the
connections stayed open for an hour), never tight timings.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from confide_server.connections import IDLE_TIMEOUT_S
from confide_server.launcher import get_json
from confide_server.simulate import SimulationOptions, prepare_job
from tests.e2e.conftest import ENTRY, Procs

#: A closed connection must be seen closed well within this (the server closes at 8 s).
BOUND_S = 3 * IDLE_TIMEOUT_S


def _server(tmp_path: Path, procs_factory: Any, *extra: str) -> tuple[Procs, str, int]:
    files = prepare_job(tmp_path, SimulationOptions(clients=1, rounds=1, seed=5))
    procs: Procs = procs_factory(files)
    cmd = [*ENTRY, "server", *extra, "run", "--config", str(files.config)]
    server = procs.launcher.spawn("server", cmd)
    procs.wait_until(lambda: procs.status() is not None or server.poll() is not None)
    assert server.poll() is None, procs.log("server")
    port = int(files.server_url.rsplit(":", 1)[1])
    return procs, files.server_url, port


def _closed_by_peer(sock: socket.socket) -> str | None:
    """``"fin"`` / ``"reset"`` if the server closed ``sock``, ``None`` while it is open."""
    try:
        data = sock.recv(65536)
    except (BlockingIOError, TimeoutError):
        return None
    except ConnectionResetError:
        return "reset"
    return "fin" if data == b"" else None


@pytest.mark.slow
def test_slow_headers_and_idle_connections_are_closed_within_a_bound(
    tmp_path: Path, procs_factory: Any
) -> None:
    procs, url, port = _server(tmp_path, procs_factory)
    head = b"PUT /v1/rounds/1/train HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000
    slow = socket.create_connection(("127.0.0.1", port))
    idle = socket.create_connection(("127.0.0.1", port))
    for s in (slow, idle):
        s.settimeout(0.2)
    start = time.monotonic()
    slow_closed = idle_closed = None
    sent = 0
    while time.monotonic() - start < BOUND_S and (slow_closed is None or idle_closed is None):
        if slow_closed is None:
            try:
                slow.send(head[sent : sent + 1])  # one byte of the head at a time
                sent += 1
            except OSError:
                slow_closed = time.monotonic() - start
            if slow_closed is None and _closed_by_peer(slow) is not None:
                slow_closed = time.monotonic() - start
        if idle_closed is None and _closed_by_peer(idle) is not None:
            idle_closed = time.monotonic() - start
    slow.close()
    idle.close()
    assert slow_closed is not None, f"slow head still open after {BOUND_S:.0f} s ({sent} bytes)"
    assert idle_closed is not None, f"idle connection still open after {BOUND_S:.0f} s"
    assert get_json(url + "/v1/health") == {"ok": True}  # the server kept serving
    assert "Traceback" not in procs.log("server")


@pytest.mark.slow
def test_connections_beyond_the_per_address_cap_are_closed_at_once(
    tmp_path: Path, procs_factory: Any
) -> None:
    # 200 descriptors: 72 connections in total, 36 from one address (connections.py)
    procs, url, port = _server(tmp_path, procs_factory, "--nofile", "200")
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(36)]
    extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        outcomes = []
        for s in extra:
            s.settimeout(BOUND_S)
            outcomes.append(_closed_by_peer(s))
        still_open = [_closed_by_peer_now(s) for s in held]
    finally:
        for s in held + extra:
            s.close()
    assert outcomes == ["reset"] * 5  # refused on arrival, not closed later as idle
    assert still_open == [None] * 36  # the held ones stay open
    procs.wait_until(lambda: get_json(url + "/v1/health") == {"ok": True})
    log = procs.log("server")
    assert log.count("connection cap reached") == 1  # one line, not one per refusal
    assert "Traceback" not in log


def _closed_by_peer_now(sock: socket.socket) -> str | None:
    sock.settimeout(0.05)
    return _closed_by_peer(sock)


@pytest.mark.slow
def test_a_body_shorter_than_its_content_length_is_answered_408_and_closed(
    tmp_path: Path, procs_factory: Any
) -> None:
    procs, url, port = _server(tmp_path, procs_factory)
    # Content-Length larger than the bytes sent, then silence: was held forever
    head = (
        b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 8000\r\n\r\n{"token": '
    )
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.settimeout(BOUND_S)
    start = time.monotonic()
    stalled.sendall(head)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = stalled.recv(65536)
        if not chunk:
            break
        answer += chunk
    took = time.monotonic() - start
    closed = None
    try:
        while closed is None and time.monotonic() - start < 3 * BOUND_S:
            data = stalled.recv(65536)  # the rest of the answer, then the close
            closed = "fin" if data == b"" else None
    except ConnectionResetError:
        closed = "reset"
    except TimeoutError:
        pass
    stalled.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert took < BOUND_S, took
    assert closed is not None, "the connection stayed open after the 408"
    assert get_json(url + "/v1/health") == {"ok": True}
    assert "Traceback" not in procs.log("server")
