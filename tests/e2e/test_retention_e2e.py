"""Retention with real processes: a server SIGKILLed mid-prune restarts and finishes the job.

The kill lands between the commit that records what a prune deletes and the unlinks (crash
point ``prune_marked``); the restarted server deletes what was left before its first round,
the job finishes, the update and model files stay bounded and the ledger verifies. A kill after
the unlinks (``prune_unlinked``) leaves rows of files that are gone: the restart forgets them.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from confide_server.config import Config, load_config
from confide_server.ledger import load_public_key, read_ledger, verify_ledger
from confide_server.simulate import SimulationOptions, prepare_job
from confide_server.store import Store
from tests.e2e.conftest import Procs

ROUNDS = 5


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


@dataclass
class _Killed:
    """A retention job whose server was SIGKILLed at a prune crash point, sites still up."""

    procs: Procs
    sites: list[subprocess.Popen[bytes]]
    config: Config
    pruned: list[str]  # the ``pruned_blobs`` paths in the database after the kill

    @property
    def state(self) -> Path:
        return self.config.server.state_dir

    def restart_to_end(self) -> dict[str, Any]:
        """Restart the server (same config, no fault); every process exits 0; the status."""
        server = self.procs.server()
        assert self.procs.wait_exit(server) == 0, self.procs.all_logs()
        assert [self.procs.wait_exit(c) for c in self.sites] == [0, 0, 0], self.procs.all_logs()
        status = self.procs.final_status()
        assert status["status"] == "finished"
        assert [r["status"] for r in status["rounds"]] == ["committed"] * ROUNDS
        return status


def _killed_at(tmp_path: Path, procs_factory: Any, point: str, seed: int) -> _Killed:
    """Run a 3-site job with models kept 1 and updates pruned until ``point`` kills it."""
    files = prepare_job(
        tmp_path, SimulationOptions(clients=3, rounds=ROUNDS, seed=seed, train_deadline=30.0)
    )
    with open(files.config, "a", encoding="utf-8") as fh:
        fh.write("\n[retention]\nkeep_models = 1\nprune_updates = true\n")
    procs: Procs = procs_factory(files)
    server = procs.server(point)
    sites = [procs.client(k, tok) for k, tok in enumerate(procs.tokens(3), start=1)]
    assert procs.wait_exit(server) == -signal.SIGKILL, procs.all_logs()
    assert procs.crash_reached(), "the crash point was never reached"
    config = load_config(files.config)
    store = Store(config.server.database)
    try:
        pruned = store.pruned_paths()
    finally:
        store.close()
    return _Killed(procs, sites, config, pruned)


@pytest.mark.slow
def test_server_killed_mid_prune_restarts_and_stays_bounded(
    tmp_path: Path, procs_factory: Any
) -> None:
    killed = _killed_at(tmp_path, procs_factory, "prune_marked:3", seed=5)  # before the unlinks
    state = killed.state
    left = [p for p in killed.pruned if (state / p).exists()]
    assert left, "the kill should leave marked files behind"

    status = killed.restart_to_end()
    assert not any((state / p).exists() for p in left)
    assert _files(state / "updates") == []
    models = {p.name.split(".")[0] for p in _files(state / "models")}
    store = Store(killed.config.server.database)
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
    killed = _killed_at(tmp_path, procs_factory, "prune_unlinked:3", seed=6)
    state = killed.state
    gone = [p for p in killed.pruned if p.startswith("models/") and not (state / p).exists()]
    assert gone, "the kill should leave the rows of unlinked models behind"

    killed.restart_to_end()
    store = Store(killed.config.server.database)
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
