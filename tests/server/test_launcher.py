"""The one process launcher (simulate and the e2e tests): logs, readiness, reaping."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from confide_server.launcher import Launcher, free_port, get_json

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]


def test_spawn_logs_and_tail(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path / "logs", env={"CONFIDE_LAUNCHER_TEST": "42"})
    code = "import os, sys; print('a'); print(os.environ['CONFIDE_LAUNCHER_TEST']); sys.exit(3)"
    p = launcher.spawn("child", [sys.executable, "-c", code])
    assert p.wait(30) == 3
    assert launcher.log("child") == "a\n42\n"
    assert launcher.tail("child", 1) == "42"
    # a restarted child appends to its log
    p = launcher.spawn("child", [sys.executable, "-c", "print('again')"])
    assert p.wait(30) == 0
    assert launcher.tail("child", 2) == "42\nagain"
    assert "--- child.log" in launcher.all_logs()
    assert launcher.log("nobody") == ""
    assert launcher.children[0].returncode == 3


def test_stop_all_terminates_and_kill_all_kills(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    a = launcher.spawn("a", SLEEPER)
    b = launcher.spawn("b", SLEEPER)
    assert launcher.wait_for(lambda: launcher.log("a") == "up\n", timeout=30)
    launcher.stop_all(grace_s=10)
    assert a.returncode == -signal.SIGTERM
    assert b.returncode == -signal.SIGTERM
    c = launcher.spawn("c", SLEEPER)
    launcher.kill_all()
    assert c.returncode == -signal.SIGKILL


def test_wait_ready_gives_up_when_the_process_dies(tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    url = f"http://127.0.0.1:{free_port()}/v1/health"
    assert get_json(url, timeout=1) is None
    dead = launcher.spawn("dead", [sys.executable, "-c", "raise SystemExit(1)"])
    assert not launcher.wait_ready(url, timeout=30, proc=dead)
    assert dead.returncode == 1
    assert not launcher.wait_for(lambda: False, timeout=0.1)
