"""``confide-server``: ``run``, ``enroll`` (one-time tokens), ``status`` and ``simulate``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from confide.errors import FederationError
from confide_server.app import create_app
from confide_server.blobs import FaultHook
from confide_server.config import Config, TLSConfig, load_config
from confide_server.engine.privacy import read_privacy
from confide_server.engine.rounds import CrashHook, hash_token, new_token
from confide_server.keys import engine_key, finished_key
from confide_server.store import Store

__all__ = ["build_ssl_context", "main", "serve"]

log = logging.getLogger("confide_server")


def build_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """Server TLS context from the config, or ``None`` for plain HTTP.

    Mutual TLS (client certificates required) when ``tls.client_ca`` is set.
    """
    if tls.cert is None or tls.key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(tls.client_ca))
    return ctx


async def serve(
    config: Config,
    *,
    crash_hook: CrashHook | None = None,
    fault_hook: FaultHook | None = None,
) -> int:
    """Serve ``config``'s job until it ends or SIGTERM/SIGINT; return the exit status.

    ``crash_hook`` and ``fault_hook`` are for crash- and storage-fault-injection tests (their
    own entry point passes them); the ``confide-server`` command never sets them.
    """
    app = create_app(config, crash_hook=crash_hook, fault_hook=fault_hook)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner,
        config.server.host,
        config.server.port,
        ssl_context=build_ssl_context(config.tls),
        backlog=4096,
    )
    await site.start()
    scheme = "https" if config.tls.cert else "http"
    for addr in runner.addresses:
        print(
            f"confide-server: job {config.job.name!r} on {scheme}://{addr[0]}:{addr[1]}", flush=True
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait())]
    if config.server.exit_when_finished:
        waits.append(asyncio.ensure_future(app[finished_key].wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    status = app[engine_key].status
    if status != "running" and not stop.is_set():
        # Let long-polling clients learn that the job is over before the port closes.
        await asyncio.sleep(config.server.linger_s)
    await runner.cleanup()
    print(f"confide-server: job {status}", flush=True)
    return 1 if status == "failed" else 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    return asyncio.run(serve(config))


def _cmd_enroll(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = Store(config.server.database)
    try:
        tokens = [new_token() for _ in range(args.count)]
        store.add_token_hashes([hash_token(t) for t in tokens])
    finally:
        store.close()
    for token in tokens:
        print(token)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.server.database.exists():
        print(f"no state yet at {config.server.state_dir}")
        return 0
    store = Store(config.server.database)
    try:
        rounds = store.rounds()
        unused, used = store.count_tokens()
        clients = sorted(store.clients())
        privacy, per_round = read_privacy(store)
        doc: dict[str, Any] = {
            "job": store.get_meta("job_name"),
            "status": store.get_meta("status"),
            "reason": store.get_meta("status_reason"),
            "privacy": privacy,
            "current_model": store.get_meta("current_model"),
            "rounds_target": config.job.rounds,
            "rounds_completed": sum(r.status == "committed" for r in rounds),
            "clients": clients,
            "tokens_unused": unused,
            "tokens_used": used,
            "rounds": [{**r.to_json(), "privacy": per_round.get(r.round)} for r in rounds],
        }
    finally:
        store.close()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"job {doc['job']!r}: {doc['status']}, {doc['rounds_completed']}/"
        f"{doc['rounds_target']} rounds, {len(clients)} clients enrolled, "
        f"{unused} unused tokens{'' if not doc['reason'] else ' (' + doc['reason'] + ')'}"
    )
    if privacy is not None:
        budget = privacy.get("epsilon_budget")
        print(
            f"privacy: mode={privacy['mode']} ({privacy['unit']}-level), "
            f"epsilon={privacy['epsilon']:.4f} at delta={privacy['delta']:g}"
            f"{'' if budget is None else f' of budget {budget:g}'}, "
            f"noise_multiplier={privacy['noise_multiplier']:.4f}, "
            f"clip_norm={privacy['clip_norm']:g}"
        )
    for r in rounds:
        acc = (r.metrics or {}).get("eval_accuracy")
        extra = f" accuracy={acc:.4f}" if isinstance(acc, float) else ""
        rp = per_round.get(r.round)
        if rp is not None:
            extra += f" epsilon_round={rp['epsilon_round']:.4f} epsilon={rp['epsilon']:.4f}"
        why = f" ({r.reason})" if r.reason else ""
        print(
            f"  round {r.round:3d} {r.status:9s} stage={r.stage:8s} cohort={len(r.cohort)}"
            f"{extra}{why}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``confide-server``."""
    parser = argparse.ArgumentParser(prog="confide-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a job")
    run.add_argument("--config", required=True, help="job TOML file")
    run.set_defaults(func=_cmd_run)
    enroll = sub.add_parser("enroll", help="print new one-time enrolment tokens")
    enroll.add_argument("--config", required=True)
    enroll.add_argument("-n", "--count", type=int, default=1)
    enroll.set_defaults(func=_cmd_enroll)
    status = sub.add_parser("status", help="show the job's state")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    sub.add_parser("simulate", help="run a whole federation on loopback", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        from confide_server.simulate import main_simulate

        return main_simulate(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        return int(args.func(args))
    except FederationError as exc:
        print(f"confide-server: {exc}", file=sys.stderr)
        return 2
