"""A redo is never a second noised release: a site re-sends what it recorded, the server keeps one.

The server process is SIGKILLed and an acknowledged train update is deleted from its
database (what a rolled-back write-ahead log loses); the restarted server asks the site for
the same round again. In sample-DP mode a retrained answer would be a fresh noise draw.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from confide.client.releases_log import ReleaseLog
from confide.privacy.accountant import account, client_poisson_event
from confide_server.config import load_config
from confide_server.simulate import SimulationOptions, prepare_job
from tests.e2e.conftest import Procs


def _train_sha(db: Path, client_id: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute(
            "SELECT sha256 FROM submissions WHERE round=1 AND stage='train' AND client_id=?",
            (client_id,),
        ).fetchone()
    return None if row is None else str(row[0])


@pytest.mark.slow
def test_a_redo_after_a_lost_acknowledged_update_resends_the_same_bytes(
    tmp_path: Path, procs_factory: Any
) -> None:
    opts = SimulationOptions(
        clients=2, rounds=1, seed=5, min_clients=2, dp="sample", noise_multiplier=1.0
    )
    files = prepare_job(tmp_path, opts)
    db = load_config(files.config).server.database
    procs: Procs = procs_factory(files)
    server = procs.server()
    t1, t2 = procs.tokens(2)
    site1 = procs.client(1, t1)
    # site-2 dies holding round 1's train task: the stage stays open for site-1's redo.
    site2 = procs.client(2, t2, "--die-in-round", "1")
    assert procs.wait_exit(site2) == -signal.SIGKILL
    procs.wait_until(lambda: "round 1 trained" in procs.log("site-1"))
    acked = _train_sha(db, "site-1")
    assert acked is not None
    recorded = ReleaseLog(files.workdir / "clients" / "site-1").get(1, "train")
    assert recorded is not None
    assert hashlib.sha256(recorded).hexdigest() == acked
    # The server dies and loses the acknowledged update (a rolled-back WAL).
    os.kill(server.pid, signal.SIGKILL)
    assert procs.wait_exit(server) == -signal.SIGKILL
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM submissions WHERE client_id='site-1'")
    server = procs.server()
    procs.wait_until(lambda: "re-sent its recorded update" in procs.log("site-1"))
    assert _train_sha(db, "site-1") == acked  # the same bytes, not a fresh noise draw
    assert procs.log("site-1").count("round 1 trained") == 1  # trained (and noised) once
    site2 = procs.client(2, None)
    assert procs.wait_exit(server) == 0, procs.all_logs()
    assert (procs.wait_exit(site1), procs.wait_exit(site2)) == (0, 0), procs.all_logs()
    doc = procs.final_status()
    assert [r["status"] for r in doc["rounds"]] == ["committed"]
    assert doc["rounds"][0]["metrics"]["train_clients"] == 2


@pytest.mark.slow
def test_central_dp_server_killed_before_its_commit_keeps_one_noised_aggregate(
    tmp_path: Path, procs_factory: Any
) -> None:
    opts = SimulationOptions(clients=2, rounds=2, seed=5, dp="central", noise_multiplier=1.0)
    files = prepare_job(tmp_path, opts)
    cfg = load_config(files.config)
    procs: Procs = procs_factory(files)
    server = procs.server("model_written:1")  # the noised aggregate is on disk, uncommitted
    clients = [procs.client(k, tok) for k, tok in enumerate(procs.tokens(2), start=1)]
    assert procs.wait_exit(server) == -signal.SIGKILL, procs.all_logs()
    assert procs.crash_reached()
    models = cfg.server.state_dir / "models"
    killed = {p.name for p in models.glob("*.safetensors")}
    assert len(killed) == 2  # the initial model and the killed commit's noise draw
    server = procs.server()
    assert procs.wait_exit(server) == 0, procs.all_logs()
    assert [procs.wait_exit(c) for c in clients] == [0, 0], procs.all_logs()
    doc = procs.final_status()
    # The restart found round 1's write-ahead intent pending: charged and aborted, never
    # closed again (a second close would be a second noise draw). Rounds 2 and 3 commit.
    assert [r["status"] for r in doc["rounds"]] == ["aborted", "committed", "committed"]
    assert "charged and aborted" in doc["rounds"][0]["reason"]
    assert sorted(r["round"] for r in doc["rounds"] if r.get("privacy")) == [1, 2, 3]
    assert doc["privacy"]["epsilon"] == pytest.approx(
        account([client_poisson_event(1.0, 1.0, 3)], 1e-5).epsilon, rel=1e-9
    )
    with sqlite3.connect(cfg.server.database) as conn:
        registered = {f"{sha}.safetensors" for (sha,) in conn.execute("SELECT sha256 FROM models")}
    on_disk = {p.name for p in models.glob("*.safetensors")}
    assert on_disk == registered  # one noised aggregate per round, nothing else
    assert len(on_disk) == 3
    assert len(killed - on_disk) == 1  # the killed commit's draw is gone
