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

``python -m confide_server.releases --config job.toml --classes A B ...`` releases the job's
current model version by hand (what ``make demo`` does at the end of its job; the engine
calls :func:`~confide_server.engine.releases.release_model_version` itself once wired at
commit) and prints the version and the release public key.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web

from confide.protocol.release import key_fingerprint
from confide_server.engine.releases import (
    Release,
    ReleaseBook,
    enrolment_fields,
    head_release_onnx,
    load_or_create_release_key,
    release_model_version,
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
    "main",
    "release_current_model",
    "release_key_of",
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


def release_current_model(
    config_path: Path, classes: list[str], backbone: Path | None = None
) -> Release:
    """Release the current model version of the job at ``config_path``.

    Parameters
    ----------
    config_path : Path
        The job's TOML config (its state folder holds the model versions).
    classes : list of str
        Class names in output order.
    backbone : Path, optional
        Frozen ONNX backbone of a head job.

    Returns
    -------
    Release
        The release (the existing latest one if it already holds this model).
    """
    from confide.protocol.manifest import Manifest, decode_tensors
    from confide_server.blobs import BlobStore
    from confide_server.config import load_config
    from confide_server.engine.privacy import read_privacy
    from confide_server.store import Store

    config = load_config(config_path)
    manifest = Manifest.load(config.manifest)
    store = Store(config.server.database)
    try:
        current = store.get_meta("current_model")
        relpath = None if current is None else store.model_path(current)
        if relpath is None:
            raise SystemExit(f"job {config.job.name!r} has no model version yet")
        weights, _ = decode_tensors(manifest, BlobStore(config.server.state_dir).read(relpath))
        summary, _ = read_privacy(store)
    finally:
        store.close()
    return release_model_version(
        ReleaseBook(config.server.state_dir),
        job_id=config.job.name,
        manifest=manifest,
        weights=weights,
        privacy_summary=summary,
        classes=classes,
        backbone=None if backbone is None else backbone.read_bytes(),
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: release a job's current model (see the module documentation)."""
    p = argparse.ArgumentParser(prog="python -m confide_server.releases")
    p.add_argument("--config", type=Path, required=True, help="the job's TOML config")
    p.add_argument("--classes", nargs="+", required=True, help="class names, in output order")
    p.add_argument("--backbone", type=Path, help="frozen ONNX backbone of a head job")
    args = p.parse_args(argv)
    release = release_current_model(args.config, args.classes, args.backbone)
    book_key = release_key_of(args.config)
    sys.stdout.write(
        f"released version {release.record.version} of job {release.record.job_id} "
        f"({'no DP' if release.record.dp is None else release.record.dp.describe()})\n"
        f"release public key: {book_key}\n"
    )


def release_key_of(config_path: Path) -> str:
    """Return the base64 release public key of the server configured at ``config_path``."""
    from confide_server.config import load_config

    return load_or_create_release_key(load_config(config_path).server.state_dir).public_key_b64


if __name__ == "__main__":
    main()
