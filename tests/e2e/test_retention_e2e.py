"""Retention with real processes: a server SIGKILLed mid-prune restarts and finishes the job.

The kill lands between the commit that records what a prune deletes and the unlinks (crash
point ``prune_marked``); the restarted server deletes what was left before its first round,
the job finishes, the update and model files stay bounded and the ledger verifies.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from confide_server.config import load_config
from confide_server.ledger import load_public_key, read_ledger, verify_ledger
from confide_server.simulate import SimulationOptions, prepare_job
from confide_server.store import Store
from tests.e2e.conftest import Procs

ROUNDS = 5


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


@pytest.mark.slow
def test_server_killed_mid_prune_restarts_and_stays_bounded(
    tmp_path: Path, procs_factory: Any
) -> None:
    files = prepare_job(
        tmp_path, SimulationOptions(clients=3, rounds=ROUNDS, seed=5, train_deadline=30.0)
    )
    with open(files.config, "a", encoding="utf-8") as fh:
        fh.write("\n[retention]\nkeep_models = 1\nprune_updates = true\n")
    procs: Procs = procs_factory(files)
    server = procs.server("prune_marked:3")  # after round 3's commit, before its unlinks
    clients = [procs.client(k, tok) for k, tok in enumerate(procs.tokens(3), start=1)]
    assert procs.wait_exit(server) == -signal.SIGKILL, procs.all_logs()
    assert procs.crash_reached(), "the crash point was never reached"
    cfg = load_config(files.config)
    state = cfg.server.state_dir
    store = Store(cfg.server.database)
    try:
        marked = store.pruned_paths()
    finally:
        store.close()
    left = [p for p in marked if (state / p).exists()]
    assert left, "the kill should leave marked files behind"

    server = procs.server()  # same config, no fault injection
    assert procs.wait_exit(server) == 0, procs.all_logs()
    assert [procs.wait_exit(c) for c in clients] == [0, 0, 0], procs.all_logs()
    status = procs.final_status()
    assert status["status"] == "finished"
    assert [r["status"] for r in status["rounds"]] == ["committed"] * ROUNDS
    assert not any((state / p).exists() for p in left)
    assert _files(state / "updates") == []
    models = {p.name.split(".")[0] for p in _files(state / "models")}
    store = Store(cfg.server.database)
    try:
        initial = store.get_meta("initial_model")
        # The submission rows stay (only their files went): one per update that entered.
        for row in status["rounds"]:
            train = store.submissions(row["round"], "train")
            assert len(train) == row["metrics"]["train_clients"]
    finally:
        store.close()
    assert models == {initial, status["current_model"]}
    lines = read_ledger(state / "ledger.jsonl")
    result = verify_ledger(lines, load_public_key(str(state / "release_key.pub")))
    assert result.ok, result.describe()
    assert [x["entry"]["model_hash"] for x in lines] == [r["new_model"] for r in status["rounds"]]


@pytest.mark.slow
def test_server_killed_after_unlinks_forgets_their_rows_at_restart(
    tmp_path: Path, procs_factory: Any
) -> None:
    # The kill lands after a pass's unlinks (crash point ``prune_unlinked``): its
    # ``pruned_blobs`` rows name files that are gone, which the next pass would forget.
    files = prepare_job(
        tmp_path, SimulationOptions(clients=3, rounds=ROUNDS, seed=6, train_deadline=30.0)
    )
    with open(files.config, "a", encoding="utf-8") as fh:
        fh.write("\n[retention]\nkeep_models = 1\nprune_updates = true\n")
    procs: Procs = procs_factory(files)
    server = procs.server("prune_unlinked:3")
    clients = [procs.client(k, tok) for k, tok in enumerate(procs.tokens(3), start=1)]
    assert procs.wait_exit(server) == -signal.SIGKILL, procs.all_logs()
    assert procs.crash_reached(), "the crash point was never reached"
    cfg = load_config(files.config)
    state = cfg.server.state_dir
    store = Store(cfg.server.database)
    try:
        gone = [
            p for p in store.pruned_paths() if p.startswith("models/") and not (state / p).exists()
        ]
    finally:
        store.close()
    assert gone, "the kill should leave the rows of unlinked models behind"

    server = procs.server()  # same config, no fault injection
    assert procs.wait_exit(server) == 0, procs.all_logs()
    assert [procs.wait_exit(c) for c in clients] == [0, 0, 0], procs.all_logs()
    status = procs.final_status()
    assert [r["status"] for r in status["rounds"]] == ["committed"] * ROUNDS
    store = Store(cfg.server.database)
    try:
        left = set(store.pruned_paths())
        assert not left & set(gone)  # forgotten ...
        assert all(store.is_pruned(p) for p in gone)  # ... and still answered as pruned
        # Of the models, only the last pass's row is left (the next pass forgets it);
        # the update rows stay for the replay window (660 s here) with their submissions.
        assert len([p for p in left if p.startswith("models/")]) <= 1
    finally:
        store.close()
    assert _files(state / "updates") == []
    lines = read_ledger(state / "ledger.jsonl")
    assert verify_ledger(lines, load_public_key(str(state / "release_key.pub"))).ok
