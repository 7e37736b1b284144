"""``python -m patient_app``: serve the app on the device's loopback.

Prints ``patient-app listening on http://127.0.0.1:PORT/`` once the socket is bound (tests
and launchers wait for that line; ``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import logging
import sys
from pathlib import Path

from aiohttp import web

from confide.client.policy import SitePolicy
from confide.protocol.release import DevicePolicy
from patient_app.app import AppConfig, create_app


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="patient-app", description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, required=True, help="the app's private folder")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--release-key", help="base64 Ed25519 release public key to pin")
    key.add_argument("--release-key-file", type=Path, help="file holding that base64 key")
    p.add_argument("--server", help="confide server URL (omit to run offline)")
    p.add_argument("--port", type=int, default=8770, help="loopback port (0: any free port)")
    p.add_argument("--engine", choices=("onnx", "litert"), default="onnx")
    p.add_argument("--max-epsilon", type=float, default=10.0, help="device policy: largest epsilon")
    p.add_argument("--max-delta", type=float, default=1e-5, help="device policy: largest delta")
    p.add_argument("--min-unit", choices=("record", "patient", "site"), default="patient")
    p.add_argument("--enroll-token-file", type=Path, help="one-time training enrolment token")
    p.add_argument(
        "--site-policy",
        type=Path,
        help="training: the device's site-policy.toml (default: secure aggregation and DP "
        "required; see confide's docs/security.md)",
    )
    p.add_argument("--client-id", help="training client id (default: random, kept in the state)")
    p.add_argument(
        "--import-release",
        type=Path,
        help="install the release files PATH.record/.sig/.model (e.g. state/releases/3)",
    )
    p.add_argument("--update-on-start", action="store_true", help="fetch the latest release first")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    key = args.release_key or args.release_key_file.read_text().strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 32:
            raise ValueError
    except (binascii.Error, ValueError):
        sys.exit("the release key must be the base64 of 32 raw Ed25519 public-key bytes")
    token = None
    if args.enroll_token_file is not None:
        token = args.enroll_token_file.read_text().strip()
    config = AppConfig(
        state_dir=args.state_dir,
        release_key=key,
        server_url=args.server,
        policy=DevicePolicy(
            args.max_epsilon,
            args.max_delta,
            args.min_unit,
            model_formats=("tflite",) if args.engine == "litert" else ("onnx",),
        ),
        engine=args.engine,
        enroll_token=token,
        client_id=args.client_id,
        update_on_start=args.update_on_start,
        import_release=args.import_release,
        site_policy=None if args.site_policy is None else SitePolicy.load(args.site_policy),
    )
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=True, access_log=None)
    await runner.setup()
    # Loopback only: the page and the patient's images never leave the device.
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"patient-app listening on http://127.0.0.1:{port}/", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    """Run the app until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = _parse(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
