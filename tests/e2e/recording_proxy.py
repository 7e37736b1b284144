"""A recording HTTP proxy in front of a confide server (test-only, a real process).

confide-server runs without an access log, so the patient-app e2e test puts this proxy
between the app and the server: every request the app sends to "the server" is forwarded
unchanged and written, body included (base64), as one JSON line to ``--log`` *before* it is
forwarded. The test then asserts from that log that no request carried the image.

Run::

    python -m tests.e2e.recording_proxy --upstream http://127.0.0.1:8765 --log reqs.jsonl

Prints ``proxy listening on http://127.0.0.1:PORT`` once bound (``--port 0``: any free port).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from pathlib import Path

import aiohttp
from aiohttp import web

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def make_app(upstream: str, log_path: Path) -> web.Application:
    session_box: dict[str, aiohttp.ClientSession] = {}

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        session_box["s"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await session_box["s"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        entry = {
            "method": request.method,
            "path": request.path_qs,
            "headers": {k: v for k, v in request.headers.items()},
            "body_b64": base64.b64encode(body).decode(),
        }
        with log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with session_box["s"].request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as up:
            data = await up.read()
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            return web.Response(status=up.status, body=data, headers=out_headers)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", forward)
    app.cleanup_ctx.append(lifecycle)
    return app


async def serve(app: web.Application, port: int) -> None:
    """Serve ``app`` on loopback, print the ready line the tests wait for, run forever."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"proxy listening on http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


async def _main(args: argparse.Namespace) -> None:
    await serve(make_app(args.upstream.rstrip("/"), args.log), args.port)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    asyncio.run(_main(p.parse_args()))
