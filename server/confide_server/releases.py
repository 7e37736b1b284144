"""HTTP endpoints of signed model releases (the book itself: :mod:`.engine.releases`).

Registered by :func:`setup_release_routes` (one call in :func:`confide_server.routes.setup_routes`).
Public and unauthenticated: a released model is the DP-protected output meant for patients'
devices, and its integrity comes from the signature the device checks against the release
key it pinned, not from the transport.

``GET /v1/releases/key``
    ``{"public_key": base64, "fingerprint": hex}``.
``GET /v1/releases/latest`` and ``GET /v1/releases/{version}``
    ``{"version", "record" (the exact canonical record text), "signature" (base64),
    "model_url", "model_sha256"}``; 404 before the first release.
``GET /v1/releases/{version}/model``
    The model bytes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from confide.protocol.release import key_fingerprint
from confide_server.engine.releases import (
    Release,
    ReleaseBook,
    enrolment_fields,
    head_release_onnx,
    load_or_create_release_key,
)

__all__ = [
    "Release",
    "ReleaseBook",
    "enrolment_fields",
    "get_release",
    "get_release_key",
    "get_release_model",
    "head_release_onnx",
    "load_or_create_release_key",
    "releases_key",
    "setup_release_routes",
]

releases_key = web.AppKey("releases_key", ReleaseBook)


def _json_404(code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=404)


async def get_release_key(request: web.Request) -> web.Response:
    """Return the release public key and its fingerprint."""
    book = request.app[releases_key]
    return web.json_response(
        {"public_key": book.public_key_b64, "fingerprint": key_fingerprint(book.public_key_b64)}
    )


async def get_release(request: web.Request) -> web.Response:
    """Return the latest release, or the one named by ``{version}``."""
    book = request.app[releases_key]
    which = request.match_info.get("version", "latest")
    if which == "latest":
        release = await asyncio.to_thread(book.latest)
    else:
        release = await asyncio.to_thread(book.get, int(which))
    if release is None:
        return _json_404("unknown_release", f"no release {which}")
    return web.json_response(release.to_json(), headers={"Cache-Control": "no-store"})


async def get_release_model(request: web.Request) -> web.Response:
    """Return the model bytes of release ``{version}``."""
    book = request.app[releases_key]
    version = int(request.match_info["version"])
    data = await asyncio.to_thread(book.model, version)
    if data is None:
        return _json_404("unknown_release", f"no release {version}")
    return web.Response(body=data, content_type="application/octet-stream")


def setup_release_routes(app: web.Application, state_dir: Path | None = None) -> None:
    """Open the release book and register the release routes on ``app``.

    Parameters
    ----------
    app : web.Application
        The server application (its ``config_key`` gives the state directory).
    state_dir : Path, optional
        Overrides the configured state directory.
    """
    if releases_key not in app:
        if state_dir is None:
            from confide_server.keys import config_key

            state_dir = app[config_key].server.state_dir
        app[releases_key] = ReleaseBook(state_dir)
    app.router.add_get("/v1/releases/key", get_release_key)
    app.router.add_get("/v1/releases/latest", get_release)
    app.router.add_get("/v1/releases/{version:[0-9]{1,12}}", get_release)
    app.router.add_get("/v1/releases/{version:[0-9]{1,12}}/model", get_release_model)
