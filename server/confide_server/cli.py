"""``confide-server``: ``run``, ``enroll``, ``status``, ``simulate``, ``dopamine``, and more.

The operator commands ``abort``, ``revoke`` and ``new-job`` are in ``confide_server.opscli``.

``enroll`` prints one-time tokens; ``dopamine`` is the three-arm distributed DP-SGD experiment.

A user mistake (a port in use, a missing model file, an infeasible job, Ctrl-C, a closed
pipe) is reported in one or two lines on stderr with a non-zero exit status, never a
traceback. A server stopped by Ctrl-C or SIGTERM records a clean stop, which ``status``
shows (``stopped``; ``run`` resumes the job).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

from aiohttp import web

from confide.errors import ConfideError, ConfigError
from confide.logs import add_log_options, setup_logging
from confide_server.app import create_app, listen_socket, open_engine, recover_listening
from confide_server.blobs import FaultHook
from confide_server.config import Config, TLSConfig, load_config
from confide_server.connections import IDLE_TIMEOUT_S, LimitedSockSite, install_log_limits
from confide_server.engine.privacy import read_privacy
from confide_server.engine.rounds import CrashHook, hash_token, new_token
from confide_server.engine.stagelog import secagg_tolerance
from confide_server.keys import engine_key, finished_key
from confide_server.opscli import add_operator_commands
from confide_server.statelock import StateLock
from confide_server.store import StorageError, Store

__all__ = ["REPORTED_ERRORS", "build_parser", "build_ssl_context", "main", "serve", "start_refused"]

log = logging.getLogger("confide_server")

DESCRIPTION = """\
confide-server: serve a federated-learning job (run), print one-time enrolment tokens for
its sites (enroll), show its state (status), abort its open round (abort), revoke a site
(revoke), archive its state for a new job (new-job), or run a whole federation on loopback
(simulate). Run 'confide-server COMMAND --help' for a command's options."""

#: The ``meta`` key that says whether a server is serving the job or stopped cleanly.
SERVER_STATE_KEY = "server_state"

#: What ``confide-server`` reports in one line on stderr (``confide.cli.exit_status``)
#: instead of a traceback.
REPORTED_ERRORS: tuple[type[BaseException], ...] = (
    KeyboardInterrupt,
    BrokenPipeError,
    ModuleNotFoundError,
    ConfideError,
    OSError,
)

#: ``errno`` values of a disk that refuses writes: full, over quota, failing, read-only.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


@overload
def start_refused(state_dir: Path, exc: StorageError) -> StorageError: ...
@overload
def start_refused(state_dir: Path, exc: BaseException) -> StorageError | None: ...
def start_refused(state_dir: Path, exc: BaseException) -> StorageError | None:
    """Turn a storage fault during start-up into one clear error (``None``: another error).

    A disk that is full or failing while the server opens or recovers its state (the
    database refused a commit, a model file could not be written) ends ``run`` with a
    one-line message saying what to do, not a traceback. Nothing acknowledged is lost: the
    refused transaction rolled back and the state is what was last committed, so running
    the same command again once the disk is fixed resumes the job. Other errors (a missing
    weights file, a damaged state folder) keep their own message.

    Examples
    --------
    >>> disk_full = OSError(errno.ENOSPC, "No space left on device", "m.bin")
    >>> print(start_refused(Path("state"), disk_full))  # doctest: +ELLIPSIS
    could not start: the state folder state refused a durable write (m.bin: No space left ...
    >>> start_refused(Path("state"), FileNotFoundError(2, "No such file", "w.safetensors"))
    """
    if isinstance(exc, StorageError):
        detail = str(exc)
    elif isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        detail = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    else:
        return None
    return StorageError(
        f"could not start: the state folder {state_dir} refused a durable write ({detail}). "
        "Nothing acknowledged was lost: free disk space or repair the disk that holds it, "
        "then run the same command again to resume the job"
    )


def version_string() -> str:
    """``confide-server <version>`` (the distribution's version, pinned to the SDK's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"confide-server {version('confide-server')}"
    except PackageNotFoundError:  # pragma: no cover - a source checkout on PYTHONPATH
        from confide import __version__

        return f"confide-server {__version__}"


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
    install_log_limits()  # what a connection sends can never flood the log
    # One server per state folder, before the port and the database (confide_server.statelock).
    lock = StateLock(config.server.state_dir, "confide-server run")
    try:
        return await _serve_locked(config, crash_hook=crash_hook, fault_hook=fault_hook)
    finally:
        lock.release()


async def _serve_locked(
    config: Config,
    *,
    crash_hook: CrashHook | None,
    fault_hook: FaultHook | None,
) -> int:
    ssl_context = build_ssl_context(config.tls)
    # Listen first, then recover: during recovery every route answers 503 "recovering"
    # (clients wait), and a long job's restart is never a refused connection.
    try:
        sock = listen_socket(config.server.host, config.server.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {config.server.port} on {config.server.host} is already in use "
                "(another confide-server?): stop that process, or set another [server] port "
                "in the job config"
            ) from None
        raise
    try:
        engine = await recover_listening(
            sock,
            lambda: open_engine(config, crash_hook=crash_hook, fault_hook=fault_hook),
            ssl_context=ssl_context,
        )
    except BaseException as exc:
        sock.close()
        refused = start_refused(config.server.state_dir, exc)
        if refused is not None:
            raise refused from exc
        raise
    app = create_app(config, engine=engine)
    # Slow or missing request heads and idle keep-alive connections are closed after
    # IDLE_TIMEOUT_S; connections are capped in total and per address (confide_server.connections).
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, keepalive_timeout=IDLE_TIMEOUT_S
    )
    await runner.setup()
    await LimitedSockSite(runner, sock, ssl_context=ssl_context).start()
    store = app[engine_key].store
    try:
        with store.transaction() as cur:
            store.set_meta(cur, SERVER_STATE_KEY, "serving")
    except StorageError as exc:
        await runner.cleanup()
        raise start_refused(config.server.state_dir, exc) from exc
    scheme = "https" if config.tls.cert else "http"
    for addr in runner.addresses:
        print(
            f"confide-server: job {config.job.name!r} on {scheme}://{addr[0]}:{addr[1]}", flush=True
        )
    tolerance = secagg_tolerance(config)
    if tolerance is not None:  # says clearly whether one site may drop out of a round
        log.log(logging.INFO if tolerance[0] else logging.WARNING, tolerance[1])
    stop = asyncio.Event()
    stopped_by: list[signal.Signals] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
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
    clean_stop = stop.is_set() and status == "running"
    # A clean stop: `status` says "stopped" (recorded before cleanup closes the store), and
    # `run` with the same config resumes the job.
    with store.transaction() as cur:
        store.set_meta(cur, SERVER_STATE_KEY, "stopped")
    await runner.cleanup()
    if clean_stop:
        print(
            f"confide-server: stopped cleanly; job {config.job.name!r} is resumable "
            "(run the same command again)",
            flush=True,
        )
        return 130 if stopped_by[:1] == [signal.SIGINT] else 0
    print(f"confide-server: job {status}", flush=True)
    return 1 if status == "failed" else 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    setup_logging(args.log_level, args.log_file, args.log_format)
    return asyncio.run(serve(config))


def check_client_id(client_id: str) -> None:
    """Refuse a site id the server would not enrol (1-64 characters of [A-Za-z0-9_.-])."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    if not 1 <= len(client_id) <= 64 or not set(client_id) <= allowed:
        raise ConfigError(
            f"--client-id must be 1-64 characters from [A-Za-z0-9_.-], got {client_id!r}"
        )


def _cmd_enroll(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    store = Store(config.server.database)
    try:
        # --client-id binds each token to that id (it enrols no other): ct_<random>.<id>.
        suffix = "" if args.client_id is None else "." + args.client_id
        tokens = [new_token() + suffix for _ in range(args.count)]
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
        current = store.get_meta("current_model")
        rel = store.model_path(current) if current else None
        model_file = None if rel is None else str(config.server.state_dir / rel)
        if args.model_path:
            if model_file is None:
                raise ConfigError(f"no model version recorded yet in {config.server.state_dir}")
            print(model_file)
            return 0
        job_status = store.get_meta("status")
        if job_status == "running" and store.get_meta(SERVER_STATE_KEY) == "stopped":
            job_status = "stopped"
        doc: dict[str, Any] = {
            "job": store.get_meta("job_name"),
            "status": job_status,
            "reason": store.get_meta("status_reason"),
            "privacy": privacy,
            "current_model": current,
            "current_model_path": model_file,
            "rounds_target": config.job.rounds,
            "rounds_completed": sum(r.status == "committed" for r in rounds),
            "clients": clients,
            "revoked": store.revoked(),
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
    if model_file is not None:
        print(f"current model: {model_file}")
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


def build_parser() -> argparse.ArgumentParser:
    """Build the ``confide-server`` argument parser (``simulate`` has its own)."""
    from confide.cli import add_command

    version = version_string()
    parser = argparse.ArgumentParser(prog="confide-server", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = add_command(
        sub,
        "run",
        help="serve a job",
        description="Serve one job until it ends or Ctrl-C/SIGTERM (a stopped job resumes "
        "when run again with the same config).",
        version=version,
    )
    run.add_argument("--config", required=True, help="the job config (job.toml; docs/job.md)")
    add_log_options(run)
    run.set_defaults(func=_cmd_run)
    enroll = add_command(
        sub,
        "enroll",
        help="print new one-time enrolment tokens",
        description="Print new one-time enrolment tokens, one per line, one per site (only "
        "their hashes are stored). Hand each site its token over a trusted channel.",
        version=version,
    )
    enroll.add_argument("--config", required=True, help="the job config (job.toml)")
    enroll.add_argument("-n", "--count", type=int, default=1, help="number of tokens")
    enroll.add_argument(
        "--client-id",
        help="bind the token to this site id: it enrols no other id (e.g. hospital-1)",
    )
    enroll.set_defaults(func=_cmd_enroll)
    status = add_command(
        sub,
        "status",
        help="show the job's state",
        description="Show the job's state: status, rounds, accuracy and epsilon per round.",
        version=version,
    )
    status.add_argument("--config", required=True, help="the job config (job.toml)")
    status.add_argument("--json", action="store_true", help="print the state as JSON")
    status.add_argument(
        "--model-path",
        action="store_true",
        help="print only the file of the current model version (for scripts: confide export)",
    )
    status.set_defaults(func=_cmd_status)
    add_operator_commands(sub, version)  # abort, revoke, new-job (opscli)
    sub.add_parser(
        "simulate",
        help="run a whole federation on loopback",
        add_help=False,
    )
    sub.add_parser(
        "ledger",
        help="check the contribution ledger offline: verify its chain, or find a receipt",
        add_help=False,
    )
    sub.add_parser(
        "dopamine",
        help="the Dopamine experiment: distributed DP-SGD under SecAgg+ vs FedAvg vs central",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``confide-server``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    name = "confide-server"
    try:
        if argv[:1] == ["simulate"]:
            from confide_server.simulate import main_simulate

            name = "confide-server simulate"
            rc = main_simulate(argv[1:])
        elif argv[:1] == ["ledger"]:
            from confide_server.ledger_cli import main_ledger

            name = "confide-server ledger"
            rc = main_ledger(argv[1:])
        elif argv[:1] == ["dopamine"]:
            from confide_server.dopamine import main_dopamine

            name = "confide-server dopamine"
            rc = main_dopamine(argv[1:])
        else:
            args = parser.parse_args(argv)
            name = f"confide-server {args.command}"
            logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
            if args.command == "enroll" and args.count < 1:
                raise ConfigError(f"--count must be >= 1, got {args.count}")
            if args.command == "enroll" and args.client_id is not None:
                check_client_id(args.client_id)
            rc = int(args.func(args))
        sys.stdout.flush()
        return rc
    except REPORTED_ERRORS as exc:
        from confide.cli import exit_status

        return exit_status(name, exc)  # the same one-line report and status as ``confide``
