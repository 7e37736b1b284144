"""Real processes on loopback: a confide-server and confide clients, always reaped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
        self.children: list[subprocess.Popen[bytes]] = []
        self.logs = files.workdir / "logs"
        self.logs.mkdir(exist_ok=True)

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as out:
            p = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **(env or {})},
            )
        self.children.append(p)
        return p

    def server(self, crash_at: str | None = None) -> subprocess.Popen[bytes]:
        """Start the server; ``crash_at="point:n"`` SIGKILLs it the n-th time at ``point``."""
        crash = ["--crash-at", crash_at] if crash_at else []
        p = self._spawn(
            "server", [*ENTRY, "server", *crash, "run", "--config", str(self.files.config)]
        )
        self.wait_until(lambda: self.status() is not None or p.poll() is not None)
        assert p.poll() is None, self.log("server")
        return p

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

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.files.server_url + "/v1/status", timeout=2) as r:
                doc: dict[str, Any] = json.loads(r.read())
                return doc
        except OSError:
            return None

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

    def wait_until(self, cond: Any, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise AssertionError(f"timed out; logs:\n{self.all_logs()}")
            time.sleep(0.05)

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
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.logs.glob("*.log"))
        )

    def kill_all(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()
        for p in self.children:
            p.wait()


@pytest.fixture
def procs_factory() -> Iterator[Any]:
    made: list[Procs] = []

    def make(files: JobFiles) -> Procs:
        p = Procs(files)
        made.append(p)
        return p

    yield make
    for p in made:
        p.kill_all()


def round_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = doc["rounds"]
    return rows
