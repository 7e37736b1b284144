"""Test-only entry points: the real server and client commands plus fault injection.

Crash injection and seeded protocol randomness are never part of the shipped commands;
the e2e tests start these wrappers instead, which pass hooks through the constructor and
function arguments the shipped code offers::

    python -m tests.e2e.entry server [--crash-at POINT[:N]] [--fail-writes STEP:FROM:COUNT]
        [--hold-recovery FILE] [--nofile N] run --config job.toml
    python -m tests.e2e.entry site [--die-in-round R] [--die-at-stage S]
        [--rng-seed HEX --rng-client ID] --server URL --data ...   (``confide client`` options)
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import resource
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confide.cli import build_parser, exit_status, run_client
from confide_server import cli as server_cli
from confide_server.cli import serve
from confide_server.config import load_config
from tests.support import PermissivePolicy, seeded_rng_factory

#: Durable steps the server passes (see RoundEngine's crash hook).
CRASH_POINTS = (
    "submission_committed",
    "after_unmask",
    "model_written",
    "stage_committed",
    "before_round_commit",
    "round_committed",
    "round_started",
    "round_aborted",
    "prune_start",
    "prune_marked",
    "prune_unlinked",
)


def _crash_hook(spec: str) -> Callable[[str], None]:
    point, _, nth = spec.partition(":")
    if point not in CRASH_POINTS:
        raise SystemExit(f"unknown crash point {point!r}; expected one of {CRASH_POINTS}")
    target = int(nth or "1")
    seen = {"n": 0}

    def hook(name: str) -> None:
        if name == point:
            seen["n"] += 1
            if seen["n"] == target:
                # Tell the test the point was reached before dying (it asserts on it).
                print(f"CRASH-POINT-REACHED {point}:{target}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _fault_hook(specs: list[str]) -> Callable[[str], None]:
    """Storage faults: ``STEP_PREFIX:FROM:COUNT`` fails calls FROM..FROM+COUNT-1 (1-based).

    ``blob_write:...`` steps raise ``OSError(ENOSPC)`` (disk full); ``db_commit`` raises
    ``sqlite3.OperationalError("disk I/O error")``. Each failure prints a line the test
    counts.
    """
    rules = []
    for spec in specs:
        prefix, first, count = spec.rsplit(":", 2)
        rules.append((prefix, int(first), int(count), {"n": 0}))

    def hook(step: str) -> None:
        for prefix, first, count, seen in rules:
            if step.startswith(prefix):
                seen["n"] += 1
                if first <= seen["n"] < first + count:
                    print(f"FAULT-INJECTED {step}", flush=True)
                    if step == "db_commit":
                        raise sqlite3.OperationalError("disk I/O error")
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")

    return hook


def _hold_recovery(release: Path) -> None:
    """Make the server's state recovery (run in a worker thread) wait for ``release``.

    Stands in for a slow recovery of a long job: the test sees the server listening and
    answering 503 "recovering" for as long as it likes, then lets recovery finish.
    """
    real = server_cli.open_engine

    def held(*args: Any, **kwargs: Any) -> Any:
        print("RECOVERY-HELD", flush=True)
        while not release.exists():
            time.sleep(0.05)
        return real(*args, **kwargs)

    server_cli.open_engine = held  # type: ignore[assignment]


def _server(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="entry server")
    p.add_argument("--crash-at", default=None)
    p.add_argument("--fail-writes", action="append", default=[])
    p.add_argument(
        "--hold-recovery",
        default=None,
        help="recovery waits until this file exists (the server listens meanwhile)",
    )
    p.add_argument(
        "--nofile", type=int, default=None, help="soft RLIMIT_NOFILE of the server process"
    )
    p.add_argument("command", choices=["run"])
    p.add_argument("--config", required=True)
    a = p.parse_args(argv)
    if a.nofile is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (a.nofile, hard))
    if a.hold_recovery is not None:
        _hold_recovery(Path(a.hold_recovery))
    hook = _crash_hook(a.crash_at) if a.crash_at else None
    faults = _fault_hook(a.fail_writes) if a.fail_writes else None
    try:
        return asyncio.run(serve(load_config(a.config), crash_hook=hook, fault_hook=faults))
    except server_cli.REPORTED_ERRORS as exc:  # reported as ``confide-server run`` reports them
        return exit_status("confide-server run", exc)


def _site(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="entry site", add_help=False)
    p.add_argument("--die-in-round", type=int, default=None)
    p.add_argument("--die-at-stage", default="train")
    p.add_argument("--rng-seed", default=None)
    p.add_argument("--rng-client", default=None, help="client id the seeded RNG is keyed by")
    a, rest = p.parse_known_args(argv)
    args = build_parser().parse_args(["client", *rest])
    on_task: Callable[[Any], None] | None = None
    if a.die_in_round is not None:
        die_in, stage = a.die_in_round, a.die_at_stage

        def on_task(task: Any) -> None:
            if task.action == stage and task.round >= die_in:
                print(f"DIE-POINT-REACHED {stage}:{task.round}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    factory = None
    if a.rng_seed is not None:
        cid = a.rng_client or args.client_id
        if not cid:
            raise SystemExit("--rng-seed needs --rng-client or --client-id")
        factory = seeded_rng_factory(bytes.fromhex(a.rng_seed), cid)
    # Without --policy the sites accept every task: these e2e tests exercise the runtime
    # (plain, non-DP and small secure jobs); tests/security passes --policy to test policies.
    policy = None if args.policy is not None else PermissivePolicy()
    return asyncio.run(run_client(args, on_task=on_task, rng_factory=factory, policy=policy))


def main() -> int:
    kind, argv = sys.argv[1], sys.argv[2:]
    return _server(argv) if kind == "server" else _site(argv)


if __name__ == "__main__":
    sys.exit(main())
