"""Restarts of a real server process: it listens at once and says "recovering" meanwhile."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from confide_server.simulate import SimulationOptions, prepare_job
from tests.e2e.conftest import ENTRY, Procs


def _answer(url: str) -> tuple[int, dict[str, Any]] | None:
    """``(status, JSON body)`` of a GET, ``None`` while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return None


@pytest.mark.slow
def test_server_answers_recovering_while_it_recovers_and_clients_wait(
    tmp_path: Path, procs_factory: Any
) -> None:
    files = prepare_job(tmp_path, SimulationOptions(clients=1, rounds=1, seed=5, min_clients=1))
    procs: Procs = procs_factory(files)
    (token,) = procs.tokens(1)
    release = tmp_path / "release-recovery"
    cmd = [*ENTRY, "server", "--hold-recovery", str(release), "run"]
    server = procs.launcher.spawn("server", [*cmd, "--config", str(files.config)])
    url = files.server_url
    seen: list[tuple[int, dict[str, Any]] | None] = []

    def answers() -> bool:
        seen.append(_answer(url + "/v1/health"))
        return seen[-1] is not None

    procs.wait_until(answers)
    assert "RECOVERY-HELD" in procs.log("server")
    status, body = seen[-1]  # type: ignore[misc]
    assert status == 503
    assert body["status"] == "recovering"
    assert body["error"]["code"] == "recovering"
    assert _answer(url + "/v1/status") == (503, body)  # every route, not only health
    # A site with a 2 s retry budget keeps waiting on "recovering" well past that budget
    # (retry 5 comes after at least 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s of backoff) ...
    site = procs.client(1, token, "--retry-timeout", "2")
    procs.wait_until(lambda: "retry 5 in" in procs.log("site-1") or site.poll() is not None)
    assert site.poll() is None, procs.log("site-1")
    assert "recovering" in procs.log("site-1")
    # ... and joins the job once the state is recovered.
    release.touch()
    assert procs.wait_exit(server) == 0, procs.all_logs()
    assert procs.wait_exit(site) == 0, procs.all_logs()
    doc = procs.final_status()
    assert doc["status"] == "finished"
    assert [r["status"] for r in doc["rounds"]] == ["committed"]
