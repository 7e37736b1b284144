"""Real processes on loopback: a confide-server and confide clients, always reaped.

Processes are started, logged, polled and killed by :class:`confide_server.launcher.Launcher`,
the launcher ``confide-server simulate`` uses too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from confide_server.auth import operator_token
from confide_server.config import load_config
from confide_server.launcher import Launcher, get_json
from confide_server.simulate import JobFiles

ENTRY = [sys.executable, "-m", "tests.e2e.entry"]
REPO = Path(__file__).resolve().parents[2]


class Procs:
    """Spawns the server and clients of one job; kills whatever is left at teardown.

    Servers and sites run through the test-only wrappers in :mod:`tests.e2e.entry`, which
    add crash injection and seeded protocol randomness through constructor arguments (the
    shipped commands have no such switch).
    """

    #: Hex seed of the sites' protocol randomness (subclasses set it for reproducible runs).
    rng_seed: str | None = None

    def __init__(self, files: JobFiles) -> None:
        self.files = files
        self.logs = files.workdir / "logs"
        self.launcher = Launcher(self.logs, cwd=REPO)

    @property
    def children(self) -> list[subprocess.Popen[bytes]]:
        """Every process spawned for this job (the fixture reaps them)."""
        return self.launcher.children

    @children.setter
    def children(self, value: list[subprocess.Popen[bytes]]) -> None:
        self.launcher.children = value

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.launcher.spawn(name, cmd, env=env)

    def server(
        self, crash_at: str | None = None, fail_writes: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """Start the server; ``crash_at="point:n"`` SIGKILLs it the n-th time at ``point``.

        ``fail_writes`` injects storage faults (``STEP:FROM:COUNT``, see tests.e2e.entry).
        Returns once the server answers (asserts it is running).
        """
        p = self.spawn_server(crash_at, fail_writes)
        self.wait_until(lambda: self.status() is not None or p.poll() is not None)
        assert p.poll() is None, self.log("server")
        return p

    def spawn_server(
        self, crash_at: str | None = None, fail_writes: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """Start the server process and return at once (for a start that is meant to fail)."""
        crash = ["--crash-at", crash_at] if crash_at else []
        for spec in fail_writes:
            crash += ["--fail-writes", spec]
        return self._spawn(
            "server", [*ENTRY, "server", *crash, "run", "--config", str(self.files.config)]
        )

    def tokens(self, n: int) -> list[str]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "confide_server",
                "enroll",
                "--config",
                str(self.files.config),
                "-n",
                str(n),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.split()

    def client(self, k: int, token: str | None, *extra: str) -> subprocess.Popen[bytes]:
        rng = ["--rng-seed", self.rng_seed, "--rng-client", f"site-{k}"] if self.rng_seed else []
        cmd = [
            *ENTRY,
            "site",
            *rng,
            "--server",
            self.files.server_url,
            "--data",
            str(self.files.site_train[k - 1]),
            "--test-data",
            str(self.files.site_test[k - 1]),
            "--state",
            str(self.files.workdir / "clients" / f"site-{k}"),
            "--retry-timeout",
            "60",
            "--poll-wait",
            "5",
            *extra,
        ]
        if token is not None:
            cmd += ["--token", token, "--client-id", f"site-{k}"]
        return self._spawn(f"site-{k}", cmd)

    def sites(self, n: int) -> list[subprocess.Popen[bytes]]:
        """Enrol ``n`` fresh sites (``site-1`` ... ``site-n``) and start them."""
        return [self.client(k, tok) for k, tok in enumerate(self.tokens(n), start=1)]

    def killed(
        self, p: subprocess.Popen[bytes], name: str = "server", timeout: float = 90.0
    ) -> None:
        """Assert ``p`` (named ``name``) died by SIGKILL at its injected crash or die point."""
        assert self.wait_exit(p, timeout) == -signal.SIGKILL, self.all_logs()
        assert self.crash_reached(name), f"{name} died elsewhere than at the injected point"

    def run_to_end(
        self, crash_at: str | None = None, n: int = 3, downtime: float = 0.0
    ) -> dict[str, Any]:
        """Run the job with ``n`` sites to its end; return ``confide-server status --json``.

        With ``crash_at`` the server is SIGKILLed there and restarted once, with the same
        config and no fault injection, after ``downtime`` seconds (an injected fault, not a
        wait: the sites keep retrying meanwhile). Every process must then exit 0.
        """
        server = self.server(crash_at)
        clients = self.sites(n)
        if crash_at:
            self.killed(server)
            time.sleep(downtime)
            server = self.server()
        assert self.wait_exit(server) == 0, self.all_logs()
        assert [self.wait_exit(c) for c in clients] == [0] * n, self.all_logs()
        return self.final_status()

    def status(self) -> dict[str, Any] | None:
        cfg = self.files.job or load_config(self.files.config)
        token = operator_token(cfg.server.state_dir)
        return get_json(self.files.server_url + "/v1/status", timeout=2, token=token)

    def final_status(self) -> dict[str, Any]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "confide_server",
                "status",
                "--config",
                str(self.files.config),
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def wait_until(self, cond: Callable[[], bool], timeout: float = 90.0) -> None:
        if not self.launcher.wait_for(cond, timeout=timeout):
            raise AssertionError(f"timed out; logs:\n{self.all_logs()}")

    def wait_exit(self, p: subprocess.Popen[bytes], timeout: float = 90.0) -> int:
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not exit; logs:\n{self.all_logs()}") from None

    def crash_reached(self, name: str = "server") -> bool:
        """Whether an injected crash or site death was actually reached (said before dying)."""
        text = self.log(name)
        return "CRASH-POINT-REACHED" in text or "DIE-POINT-REACHED" in text

    def log(self, name: str) -> str:
        return self.launcher.log(name)

    def all_logs(self) -> str:
        return self.launcher.all_logs()

    def kill_all(self) -> None:
        self.launcher.kill_all()


def reaped_procs() -> Iterator[Callable[[JobFiles], Procs]]:
    """The body of a fixture that makes :class:`Procs` and kills their processes at teardown."""
    made: list[Procs] = []

    def make(files: JobFiles) -> Procs:
        p = Procs(files)
        made.append(p)
        return p

    yield make
    for p in made:
        p.kill_all()


@pytest.fixture
def procs_factory() -> Iterator[Callable[[JobFiles], Procs]]:
    yield from reaped_procs()


def round_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = doc["rounds"]
    return rows
