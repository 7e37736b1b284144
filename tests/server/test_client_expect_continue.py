"""The client sends ``Expect: 100-continue`` for large uploads only (issue 16).

A real aiohttp server on loopback records the headers of each PUT; the real
:class:`confide.client.Client` sends a small and a large body. A small one goes with its
headers (no round trip for ``100 Continue``); from
:data:`~confide.client.client.EXPECT_CONTINUE_MIN_BYTES` on, the client waits for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from confide.client import Client
from confide.client.client import EXPECT_CONTINUE_MIN_BYTES


async def test_only_large_uploads_wait_for_100_continue(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    seen: list[tuple[str | None, int]] = []

    async def put(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append((request.headers.get("Expect"), len(body)))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_put("/v1/upload", put)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    sizes = [2, EXPECT_CONTINUE_MIN_BYTES - 1, EXPECT_CONTINUE_MIN_BYTES, 300_000]
    async with Client(url, tmp_path / "site") as client:
        for n in sizes:
            await client._request("PUT", "/v1/upload", body=b"x" * n, signed=False)
    assert seen == [
        (None, 2),
        (None, EXPECT_CONTINUE_MIN_BYTES - 1),
        ("100-continue", EXPECT_CONTINUE_MIN_BYTES),
        ("100-continue", 300_000),
    ]
