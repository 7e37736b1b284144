"""Connection limits and bounded logging (unit level; the e2e tests run a real server)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from confide_server.connections import ConnectionLimiter, RateLimitedLog, install_log_limits


class _Transport(asyncio.Transport):
    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.aborted = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 1234) if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True


class _Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append("data")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")


def test_limiter_caps_per_address_and_in_total_and_frees_on_close() -> None:
    inners: list[_Inner] = []

    def factory() -> _Inner:
        inners.append(_Inner())
        return inners[-1]

    lim = ConnectionLimiter(factory, max_total=3, max_per_peer=2)
    conns = [(lim(), _Transport(peer)) for peer in ("a", "a", "a", "b", "c")]
    for proto, tr in conns:
        proto.connection_made(tr)
    assert [tr.aborted for _, tr in conns] == [False, False, True, False, True]
    assert (lim.open, lim.refused) == (3, 2)
    conns[2][0].data_received(b"GET / HTTP/1.1\r\n")  # a refused one never reaches aiohttp
    conns[2][0].connection_lost(None)
    assert inners[2].events == []
    conns[0][0].connection_lost(None)
    assert inners[0].events == ["made", "lost"]
    again = lim()
    tr = _Transport("a")
    again.connection_made(tr)
    assert not tr.aborted
    assert lim.open == 3


def _record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    info = None if exc is None else (type(exc), exc, None)
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, msg, (), info)


def test_rate_limited_log_cuts_messages_drops_tracebacks_and_counts_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr("confide_server.connections.time.monotonic", lambda: now[0])
    filt = RateLimitedLog(burst=2, window_s=10.0, max_chars=50)
    body = "x" * 100_000  # e.g. update bytes in a parser error
    first = _record("Error handling request " + body, ValueError("bad " + body))
    assert filt.filter(first)
    text = first.getMessage()
    assert len(text) < 200
    assert "ValueError" in text
    assert first.exc_info is None
    assert filt.filter(_record("two"))
    assert not any(filt.filter(_record("flood")) for _ in range(1000))
    now[0] += 10.0
    after = _record("next window")
    assert filt.filter(after)
    assert "1000 similar records suppressed" in after.getMessage()


def test_install_log_limits_is_idempotent() -> None:
    names = ("aiohttp.server", "aiohttp.web", "aiohttp.internal", "asyncio")
    before = {name: list(logging.getLogger(name).filters) for name in names}
    try:
        install_log_limits()
        install_log_limits()
        for name in names:
            filters = logging.getLogger(name).filters
            assert sum(isinstance(f, RateLimitedLog) for f in filters) == 1
    finally:  # the loggers are process-wide: leave them as they were for other tests
        for name, filters in before.items():
            logging.getLogger(name).filters[:] = filters
