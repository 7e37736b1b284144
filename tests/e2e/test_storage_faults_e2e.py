"""A full or failing disk is survived (issue 12 item 2): 503 + Retry-After, clients retry.

A real server process whose blob writes fail with ENOSPC and whose SQLite commits fail with
"disk I/O error" for a while (test-only injection through ``serve(fault_hook=...)`` from
:mod:`tests.e2e.entry`), and real ``confide client`` processes: no site exits, each retry is
logged with its URL and reason, nothing failed is acknowledged, and the job finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from confide_server.config import load_config
from confide_server.simulate import SimulationOptions, prepare_job
from tests.e2e.conftest import Procs


def test_disk_full_and_io_errors_are_retried_not_fatal(tmp_path: Path, procs_factory: Any) -> None:
    files = prepare_job(
        tmp_path, SimulationOptions(clients=3, rounds=2, seed=5, train_deadline=60.0)
    )
    procs: Procs = procs_factory(files)
    # the first 4 update writes hit a full disk; commits 8-10 hit I/O errors (after start-up,
    # which takes six commits on a new job)
    server = procs.server(fail_writes=("blob_write:updates/:1:4", "db_commit:8:3"))
    tokens = procs.tokens(3)
    clients = [procs.client(k, tok) for k, tok in enumerate(tokens, start=1)]
    assert procs.wait_exit(server, timeout=240) == 0, procs.all_logs()
    assert [procs.wait_exit(c, timeout=60) for c in clients] == [0, 0, 0], procs.all_logs()
    server_log = procs.log("server")
    assert server_log.count("FAULT-INJECTED blob_write:updates/") == 4, server_log
    assert server_log.count("FAULT-INJECTED db_commit") == 3, server_log
    assert "Traceback" not in server_log, server_log
    site_logs = "".join(procs.log(f"site-{k}") for k in (1, 2, 3))
    # no silent waits: what failed, where, and when the retry comes
    assert "HTTP 503 storage_unavailable" in site_logs, site_logs
    assert files.server_url + "/v1/rounds/" in site_logs, site_logs
    doc = procs.final_status()
    assert doc["status"] == "finished"
    assert [r["status"] for r in doc["rounds"]] == ["committed", "committed"]
    assert [r["metrics"]["train_clients"] for r in doc["rounds"]] == [3, 3]


@pytest.mark.parametrize(
    "fault",
    ["db_commit:1:1", "db_commit:4:1", "db_commit:6:1", "blob_write:models/:1:1"],
    ids=["creating-the-database", "opening-the-job", "serving-commit", "base-model-write"],
)
def test_a_storage_fault_at_start_up_is_one_clear_line_and_the_next_start_runs_the_job(
    tmp_path: Path, procs_factory: Any, fault: str
) -> None:
    """A disk that fails while the server starts: exit 2 with one line saying what to do.

    No traceback, and nothing half-written: the next start on the same state folder (the
    disk fixed) runs the whole job with its sites.
    """
    files = prepare_job(
        tmp_path, SimulationOptions(clients=3, rounds=2, seed=5, train_deadline=60.0)
    )
    procs: Procs = procs_factory(files)
    failed = procs.spawn_server(fail_writes=(fault,))
    assert procs.wait_exit(failed, timeout=120) == 2, procs.all_logs()
    server_log = procs.log("server")
    assert server_log.count("FAULT-INJECTED") == 1, server_log
    assert "Traceback" not in server_log, server_log
    said = [ln for ln in server_log.splitlines() if ln.startswith("confide-server run: ")]
    assert len(said) == 1, server_log
    state_dir = load_config(files.config).server.state_dir
    assert said[0].startswith(
        f"confide-server run: could not start: the state folder {state_dir} refused a durable "
        "write ("
    ), said[0]
    assert "run the same command again" in said[0], said[0]
    doc = procs.run_to_end(n=3)
    assert doc["status"] == "finished"
    assert [r["status"] for r in doc["rounds"]] == ["committed", "committed"]
    assert [r["metrics"]["train_clients"] for r in doc["rounds"]] == [3, 3]
