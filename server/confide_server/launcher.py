"""One process launcher: spawn with a log file, wait for readiness, stop everything, tail logs.

``confide-server simulate`` and the end-to-end tests both run a server and sites as real
processes on loopback; both go through :class:`Launcher`, so starting, logging and reaping
work (and fail) the same way everywhere. Each child writes stdout and stderr to
``<log_dir>/<name>.log``; :meth:`Launcher.stop_all` terminates every child still running,
waits a grace period and kills what is left, so no process outlives its launcher.

Examples
--------
>>> import sys, tempfile
>>> from pathlib import Path
>>> with tempfile.TemporaryDirectory() as tmp:
...     launcher = Launcher(Path(tmp))
...     p = launcher.spawn("hello", [sys.executable, "-c", "print('hi')"])
...     rc = p.wait()
...     launcher.stop_all()
...     (rc, launcher.tail("hello"))
(0, 'hi')
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Launcher", "free_port", "get_json"]


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 5.0, *, token: str | None = None) -> dict[str, Any] | None:
    """GET ``url`` and decode its JSON object; ``None`` if unreachable or not JSON.

    Used as a readiness probe (``/v1/health``) and, with the operator ``token``, as a
    progress probe (``/v1/status``).
    """
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - our own URL
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - our own URL
            doc = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


class Launcher:
    """Child processes of one run, each with its own log file.

    Parameters
    ----------
    log_dir : Path
        Folder of the ``<name>.log`` files (created).
    cwd : Path, optional
        Working directory of the children (default: the caller's).
    env : mapping, optional
        Variables added to the caller's environment for every child.
    """

    def __init__(
        self, log_dir: Path, *, cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd
        self.env = dict(env or {})
        #: Every child spawned (running or not), oldest first.
        self.children: list[subprocess.Popen[bytes]] = []

    def log_path(self, name: str) -> Path:
        """Return the log file of the child called ``name``."""
        return self.log_dir / f"{name}.log"

    def spawn(
        self, name: str, cmd: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with stdout and stderr appended to ``<name>.log``.

        Parameters
        ----------
        name : str
            The child's name (its log file; a restarted child appends to the same log).
        cmd : sequence of str
            The command (no shell).
        env : mapping, optional
            Variables for this child only, on top of the launcher's.

        Returns
        -------
        subprocess.Popen
            The running child (also in :attr:`children`).
        """
        with self.log_path(name).open("ab") as out:
            proc = subprocess.Popen(  # noqa: S603 - an argument list we built, no shell
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env={**os.environ, **self.env, **(env or {})},
            )
        self.children.append(proc)
        return proc

    @staticmethod
    def wait_for(
        cond: Callable[[], bool],
        *,
        timeout: float,
        proc: subprocess.Popen[bytes] | None = None,
        interval: float = 0.05,
    ) -> bool:
        """Poll ``cond`` until it holds; ``False`` on timeout or when ``proc`` exits first."""
        end = time.monotonic() + timeout
        while not cond():
            if (proc is not None and proc.poll() is not None) or time.monotonic() > end:
                return False
            time.sleep(interval)
        return True

    def wait_ready(
        self, url: str, *, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
    ) -> bool:
        """Wait until ``url`` answers a JSON object (a server's health route).

        Returns
        -------
        bool
            ``False`` if ``proc`` exited or ``timeout`` seconds passed first.
        """
        return self.wait_for(
            lambda: get_json(url, timeout=2.0) is not None, timeout=timeout, proc=proc
        )

    def stop_all(self, grace_s: float = 5.0) -> None:
        """Terminate every running child, wait up to ``grace_s`` seconds, kill the rest."""
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + grace_s
        for proc in self.children:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill_all(self) -> None:
        """SIGKILL every running child at once and reap them all (test teardown)."""
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
        for proc in self.children:
            proc.wait()

    def log(self, name: str) -> str:
        """Return the whole log of ``name`` (empty if it has none)."""
        try:
            return self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, name: str, lines: int = 15) -> str:
        """Return the last ``lines`` lines of ``name``'s log."""
        return "\n".join(self.log(name).splitlines()[-lines:])

    def all_logs(self, chars: int = 3000) -> str:
        """Return the last ``chars`` characters of every log, each under a ``--- name`` line."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )
