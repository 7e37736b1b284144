"""End-to-end federations: real server and client processes over HTTP on loopback."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confide.data import load_csv
from confide.training import NumpyTrainer
from confide_server.config import load_config
from confide_server.ledger import load_public_key, read_ledger, verify_ledger
from confide_server.simulate import SimulationOptions, prepare_job, run_simulation
from confide_server.store import Store
from tests.e2e.conftest import Procs


def test_simulate_clients_complete_rounds_and_model_improves(tmp_path: Path) -> None:
    opts = SimulationOptions(clients=4, rounds=3, partition="dirichlet", alpha=1.0, seed=3)
    assert run_simulation(tmp_path, opts, timeout=120) == 0
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    # accuracy and epsilon per round, and the points beside the plot: one per round
    assert (tmp_path / "rounds.png").stat().st_size > 1000
    points = json.loads((tmp_path / "rounds.json").read_text())
    assert points["round"] == [1, 2, 3]
    assert len(points["accuracy"]) == len(points["epsilon"]) == 3
    cfg = load_config(tmp_path / "job.toml")
    store = Store(cfg.server.database)
    try:
        rounds = store.rounds()
        assert [r.status for r in rounds] == ["committed"] * 3
        assert all(r.metrics and r.metrics["train_clients"] == 4 for r in rounds)
        accs = [r.metrics["eval_accuracy"] for r in rounds if r.metrics]
        first_model = store.model_path(store.get_meta("initial_model") or "")
        assert first_model is not None
    finally:
        store.close()
    # the federated model beats the initial one on the sites' pooled test data
    files = prepare_job(tmp_path / "again", opts)
    initial = files.trainer.evaluate(files.test)["accuracy"]
    assert accs[-1] > initial
    assert accs[-1] > 0.85


def _job(tmp: Path, **kw: Any) -> Any:
    base: dict[str, Any] = {"clients": 3, "rounds": 3, "seed": 5, "train_deadline": 30.0}
    return prepare_job(tmp, SimulationOptions(**{**base, **kw}))


@pytest.mark.slow
def test_client_killed_mid_round_round_completes_with_quorum(
    tmp_path: Path, procs_factory: Any
) -> None:
    files = _job(tmp_path, min_clients=2, train_deadline=2.0, evaluate_deadline=2.0)
    procs: Procs = procs_factory(files)
    server = procs.server()
    t1, t2, t3 = procs.tokens(3)
    c1, c2 = procs.client(1, t1), procs.client(2, t2)
    c3 = procs.client(3, t3, "--die-in-round", "2")  # SIGKILLs itself holding round 2's task
    assert procs.wait_exit(server) == 0, procs.all_logs()
    procs.killed(c3, "site-3")
    assert (procs.wait_exit(c1), procs.wait_exit(c2)) == (0, 0)
    doc = procs.final_status()
    assert doc["status"] == "finished"
    rows = doc["rounds"]
    assert [r["status"] for r in rows] == ["committed"] * 3
    assert [r["metrics"]["train_clients"] for r in rows] == [3, 2, 2]
    # site-3 died in round 2: round 3 draws only the sites seen since round 2 closed
    assert [len(r["cohort"]) for r in rows] == [3, 3, 2]
    assert "site-3" not in rows[2]["cohort"]


@pytest.mark.slow
def test_all_clients_killed_round_aborts_then_next_round_succeeds(
    tmp_path: Path, procs_factory: Any
) -> None:
    # A generous deadline: round 2 waits it out (both sites are dead), and the restarted
    # sites must make round 3's deadline however slow a busy machine starts them; the stage
    # still closes as soon as both have answered.
    files = _job(tmp_path, clients=2, rounds=2, min_clients=2, train_deadline=15.0)
    procs: Procs = procs_factory(files)
    server = procs.server()
    t1, t2 = procs.tokens(2)
    c1 = procs.client(1, t1, "--die-in-round", "2")
    c2 = procs.client(2, t2, "--die-in-round", "2")
    assert procs.wait_exit(c1) == -signal.SIGKILL
    assert procs.wait_exit(c2) == -signal.SIGKILL
    assert procs.crash_reached("site-1")
    assert procs.crash_reached("site-2")

    def round2_aborted() -> bool:
        doc = procs.status()
        return doc is not None and any(
            r["round"] == 2 and r["status"] == "aborted" for r in doc["rounds"]
        )

    procs.wait_until(round2_aborted)
    # the same sites come back (identity kept on disk, no new token needed)
    c1, c2 = procs.client(1, None), procs.client(2, None)
    assert procs.wait_exit(server) == 0, procs.all_logs()
    assert (procs.wait_exit(c1), procs.wait_exit(c2)) == (0, 0)
    rows = procs.final_status()["rounds"]
    assert [(r["round"], r["status"]) for r in rows] == [
        (1, "committed"),
        (2, "aborted"),
        (3, "committed"),
    ]
    assert "min_clients=2" in rows[1]["reason"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The no-crash run the crash runs are compared with (shared by them)."""
    procs = Procs(_job(tmp_path_factory.mktemp("ref")))
    try:
        yield procs.run_to_end()
    finally:
        procs.kill_all()


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["submission_committed:2", "model_written:2"])
def test_server_sigkill_and_restart_matches_no_crash_run(
    tmp_path: Path, procs_factory: Any, crash_at: str, reference_run: dict[str, Any]
) -> None:
    reference = reference_run
    crashed = procs_factory(_job(tmp_path / "crash")).run_to_end(crash_at)
    assert crashed["status"] == reference["status"] == "finished"
    assert crashed["current_model"] == reference["current_model"]
    for ref_row, row in zip(reference["rounds"], crashed["rounds"], strict=True):
        assert row["status"] == "committed"
        assert row["new_model"] == ref_row["new_model"]
        assert row["metrics"]["train_clients"] == 3  # nothing lost, nothing twice
    cfg = load_config(tmp_path / "crash" / "job.toml")
    store = Store(cfg.server.database)
    try:
        assert store.count_submissions() == 3 * 3 * 2
    finally:
        store.close()
    # The contribution ledger survived the SIGKILL: one signed entry per committed round.
    state = cfg.server.state_dir
    lines = read_ledger(state / "ledger.jsonl")
    result = verify_ledger(lines, load_public_key(str(state / "release_key.pub")))
    assert result.ok, result.describe()
    assert [x["entry"]["model_hash"] for x in lines] == [r["new_model"] for r in crashed["rounds"]]
    assert all(x["entry"]["survivors"] == x["entry"]["cohort"] for x in lines)


#: Longer than the train stage's deadline (``_job``: 30 s), so absolute deadlines would
#: have expired during the downtime.
LONG_DOWNTIME_S = 35.0


@pytest.mark.slow
def test_server_down_longer_than_a_stage_matches_no_crash_run(
    tmp_path: Path, procs_factory: Any, reference_run: dict[str, Any]
) -> None:
    procs: Procs = procs_factory(_job(tmp_path / "down"))
    # 2 of 3 train updates acknowledged. The injected fault itself: the server stays down
    # longer than the open stage had left (the sites keep retrying; their budget is 60 s).
    # Not a threshold the test waits on.
    crashed = procs.run_to_end("submission_committed:2", downtime=LONG_DOWNTIME_S)
    assert crashed["status"] == reference_run["status"] == "finished"
    assert crashed["current_model"] == reference_run["current_model"]
    for ref_row, row in zip(reference_run["rounds"], crashed["rounds"], strict=True):
        assert row["status"] == "committed"
        assert row["new_model"] == ref_row["new_model"]
        assert row["metrics"]["train_clients"] == 3  # the late site was not dropped


def test_site_data_files_round_trip(tmp_path: Path) -> None:
    files = _job(tmp_path, clients=2, rounds=1)
    total = sum(len(load_csv(p)) for p in files.site_train)
    assert total == len(files.train)
    assert isinstance(files.trainer, NumpyTrainer)
