"""The client retries what is transient and stops on a definitive refusal (issue 12 item 2).

A real aiohttp server on loopback answers a scripted sequence of statuses; the real
:class:`confide.client.Client` talks to it. 5xx, 408, 425, 429 and dropped connections are
retried (each retry logged with the URL and the reason, ``Retry-After`` honoured); any other
4xx raises :class:`ServerError` at once; the retry deadline ends the attempts.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from confide.client import Client
from confide.client.client import _backoff
from confide.errors import ServerError, TransportError


def _app(script: list[int | str], hits: list[float]) -> web.Application:
    async def manifest(request: web.Request) -> web.StreamResponse:
        import time

        hits.append(time.monotonic())
        step = script.pop(0) if script else 200
        if step == "drop":  # close the connection without an answer
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        status = int(step)
        if status == 200:
            return web.json_response({"ok": True})
        headers = {"Retry-After": "1"} if status == 503 else {}
        body = {"error": {"code": f"code{status}", "message": f"message {status}"}}
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/health", manifest)
    return app


async def _run(
    tmp_path: Path,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    script: list[int | str],
    retry_timeout: float = 60.0,
) -> tuple[Any, list[str], list[float]]:
    hits: list[float] = []
    server = await aiohttp_server(_app(script, hits))
    lines: list[str] = []
    url = f"http://127.0.0.1:{server.port}"
    async with Client(url, tmp_path / "site", retry_timeout=retry_timeout, log=lines.append) as c:
        try:
            data, _ = await c._request("GET", "/v1/health", signed=False)
            result: Any = json.loads(data)
        except (ServerError, TransportError) as exc:
            result = exc
    return result, lines, hits


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 425, 429, "drop"])
async def test_transient_answers_are_retried_and_logged(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]], status: int | str
) -> None:
    result, lines, hits = await _run(tmp_path, aiohttp_server, [status, status])
    assert result == {"ok": True}
    assert len(hits) == 3
    # aiohttp itself may re-send once on a dropped keep-alive connection
    expected = (1, 2) if status == "drop" else (2,)
    assert len(lines) in expected, lines
    assert all("GET http://127.0.0.1:" in line and "/v1/health" in line for line in lines)
    assert "retry 1 in" in lines[0]
    if status == 503:
        assert "HTTP 503 code503: message 503" in lines[0]
        assert hits[1] - hits[0] >= 0.9  # Retry-After: 1 is a lower bound


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 415, 422])
async def test_definitive_refusals_are_not_retried(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]], status: int
) -> None:
    result, lines, hits = await _run(tmp_path, aiohttp_server, [status])
    assert isinstance(result, ServerError)
    assert result.status == status
    assert len(hits) == 1
    assert lines == []


async def test_retry_deadline_ends_the_attempts(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    result, lines, hits = await _run(tmp_path, aiohttp_server, [500] * 100, retry_timeout=1.0)
    assert isinstance(result, TransportError)
    assert "failed for 1.0 s" in str(result)
    assert "HTTP 500" in str(result)
    assert len(hits) == len(lines) + 1


def test_backoff_grows_with_jitter_and_respects_retry_after() -> None:
    for attempt in range(1, 12):
        ceiling = min(10.0, 0.2 * 2.0**attempt)
        for _ in range(50):
            d = _backoff(attempt, None)
            assert ceiling / 2 <= d <= ceiling
    assert all(_backoff(1, 7.0) >= 7.0 for _ in range(20))
    assert len({_backoff(5, None) for _ in range(20)}) > 1  # jittered
