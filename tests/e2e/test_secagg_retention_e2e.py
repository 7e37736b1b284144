"""SecAgg+ with ``[retention]`` over real processes: a server killed before its prune.

A real ``confide-server`` process runs a SecAgg+ job with ``prune_updates`` and
``keep_models = 2``; three real site processes talk to it over HTTP. The server is
SIGKILLed after round 3's commit and before that round's prune touched anything (crash
point ``prune_start``: round 3's snapshot, with every masked vector of the round, is still
in ``secagg_state``, and model version 1, which this prune would delete, is still on
disk). It is restarted and killed again at its first round start (``round_started``),
after the start-up sweep and before any later round's prune could do the sweep's work:
the snapshot and the model file must be gone by then. A third start finishes the job with
nothing acknowledged lost (every submission row and ledger entry written before the
kills is still there, the ledger verifies), no closed round's snapshot left, and the
``keep_models`` newest model files plus the pinned ones on disk. (A SecAgg+ round stores
no update files: the masked vectors live in its snapshot, which is what is pruned.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from confide_server.config import load_config
from confide_server.ledger import load_public_key, read_ledger, verify_ledger
from confide_server.simulate import SimulationOptions, prepare_job
from confide_server.store import Store
from tests.e2e.conftest import Procs

ROUNDS = 5
KEEP = 2
KILLED_AFTER = 3  # the round whose prune the kill stops
# Dropout-tolerant threat model for three sites: complete graph, k = 2, t = 2.
TOLERANT = {"adversarial_fraction": 0.0, "dropout_fraction": 0.34}


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]


def models_left(state: Path) -> set[str]:
    return {p.name.split(".")[0] for p in _files(state / "models")}


def _models(store: Store) -> list[tuple[str, str, int | None]]:
    rows = store._db.execute("SELECT sha256, path, round FROM models").fetchall()
    return [(str(a), str(b), c) for a, b, c in rows]


def _snapshot(db: Path) -> dict[str, Any]:
    """What the killed server had committed: rounds, submissions, SecAgg+ rows, ledger."""
    store = Store(db)
    try:
        rounds = store.rounds()
        subs = {
            (s.round, s.stage, s.client_id): s.sha256
            for r in rounds
            for stage in ("train", "evaluate")
            for s in store.submissions(r.round, stage)
        }
        secagg = [r.round for r in rounds if store.secagg_state(r.round) is not None]
        blobs = [
            s.blob
            for r in rounds
            for s in store.submissions(r.round, "train")
            if s.blob is not None and not store.is_pruned(s.blob)
        ]
        return {
            "rounds": {r.round: r.status for r in rounds},
            "new_models": {r.round: r.new_model for r in rounds},
            # Marked in pruned_blobs until the file is gone, then in models.pruned only.
            "pruned": {
                p
                for p in store.pruned_paths() + [m for _, m, _ in _models(store)]
                if store.is_pruned(p)
            },
            "submissions": subs,
            "secagg_rounds": secagg,
            "unpruned_blobs": blobs,
            "ledger": store.ledger(),
        }
    finally:
        store.close()


@pytest.mark.slow
def test_secagg_job_killed_before_its_prune_is_swept_at_restart_and_finishes(
    tmp_path: Path, procs_factory: Any
) -> None:
    files = prepare_job(
        tmp_path,
        SimulationOptions(
            clients=3,
            rounds=ROUNDS,
            seed=7,
            min_clients=2,
            secagg=True,
            extra_secagg=dict(TOLERANT),
            train_deadline=30.0,
        ),
    )
    with open(files.config, "a", encoding="utf-8") as fh:
        fh.write(f"\n[retention]\nkeep_models = {KEEP}\nprune_updates = true\n")
    cfg = load_config(files.config)
    assert cfg.secagg is not None
    state, db = cfg.server.state_dir, cfg.server.database
    procs: Procs = procs_factory(files)
    server = procs.server(f"prune_start:{KILLED_AFTER}")
    sites = procs.sites(3)
    procs.killed(server)

    # The kill left round 3 committed and unpruned: its snapshot and model version 1.
    before = _snapshot(db)
    assert before["rounds"][KILLED_AFTER] == "committed", before["rounds"]
    assert before["secagg_rounds"] == [KILLED_AFTER], before["secagg_rounds"]
    assert before["unpruned_blobs"] == []  # SecAgg+ stores no update files
    assert all(
        s.startswith(("advertise", "share", "mask", "unmask", "evaluate"))
        for _, s, _ in before["submissions"]
    )
    assert len(before["ledger"]) == KILLED_AFTER
    model_1 = before["new_models"][1]
    assert (state / "models" / f"{model_1}.safetensors").exists()

    # Restarted: the sweep runs before the first round; stop it there to look.
    server = procs.server("round_started:1")
    procs.killed(server)
    swept = _snapshot(db)
    assert swept["rounds"].get(KILLED_AFTER + 1) == "open", swept["rounds"]
    closed = [r for r, st in swept["rounds"].items() if st != "open"]
    assert not set(swept["secagg_rounds"]) & set(closed), swept["secagg_rounds"]
    assert not (state / "models" / f"{model_1}.safetensors").exists()
    assert f"models/{model_1}.safetensors" in swept["pruned"]

    server = procs.server()  # same config, no fault injection
    assert procs.wait_exit(server) == 0, procs.all_logs()
    assert [procs.wait_exit(s) for s in sites] == [0, 0, 0], procs.all_logs()
    status = procs.final_status()
    assert status["status"] == "finished"
    assert [r["status"] for r in status["rounds"]] == ["committed"] * ROUNDS
    assert all(r["metrics"]["secagg"]["n"] == 3 for r in status["rounds"])  # all secure

    after = _snapshot(db)
    # Nothing acknowledged was lost: every submission and ledger entry from before the kill.
    for key, sha in before["submissions"].items():
        assert after["submissions"].get(key) == sha, key
    assert after["ledger"][:KILLED_AFTER] == before["ledger"]
    # No closed round kept a snapshot.
    assert after["secagg_rounds"] == []
    assert after["unpruned_blobs"] == []
    assert _files(state / "updates") == []
    # Models kept: the KEEP newest committed versions plus the pinned initial and current.
    store = Store(db)
    try:
        initial = store.get_meta("initial_model")
    finally:
        store.close()
    newest = [r["new_model"] for r in status["rounds"]][-KEEP:]
    assert model_1 not in models_left(state)
    models = models_left(state)
    assert models == {initial, status["current_model"], *newest}
    assert len(models) == KEEP + 1  # the current model is also the newest
    lines = read_ledger(state / "ledger.jsonl")
    result = verify_ledger(lines, load_public_key(str(state / "release_key.pub")))
    assert result.ok, result.describe()
    assert [x["entry"]["model_hash"] for x in lines] == [r["new_model"] for r in status["rounds"]]
