"""Central DP writes a round's noised aggregate once: no draw of a killed or failed commit stays."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from confide_server.app import open_engine
from confide_server.blobs import BlobStore
from confide_server.engine.rounds import RoundEngine
from tests.server.conftest import FakeClock
from tests.server.test_privacy_server import (
    Z,
    _config,
    _killed_after_noised_write,
    _train_answers,
)
from tests.server.util import enrolled_engine


def _model_files(eng: RoundEngine) -> set[str]:
    return set(eng.blobs.model_files())


def _registered(eng: RoundEngine) -> set[str]:
    return {sha for sha in _model_files(eng) if eng.store.model_path(sha) is not None}


def test_noised_aggregate_of_a_killed_commit_is_deleted_and_never_redrawn(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=1, mode="central", noise_multiplier=Z)
    clock = FakeClock()
    eng = _killed_after_noised_write(cfg, clock)
    assert len(_model_files(eng) - _registered(eng)) == 1  # this run's draw, unregistered
    eng.store.close()
    # The restart deletes the unregistered draw and, as its write-ahead intent is pending,
    # charges round 1 and aborts it: the round's aggregate was drawn and written once.
    eng = enrolled_engine(cfg, clock, crash_at="model_written")
    assert _model_files(eng) == _registered(eng) == {eng.current_model}
    row = eng.store.get_round(1)
    assert row is not None
    assert row.status == "aborted"
    assert row.new_model is None
    assert eng.tick()  # round 2 starts; round 1 is never closed again
    assert eng.store.get_round(2) is not None
    assert _model_files(eng) == {eng.current_model}
    eng.store.close()


def test_a_failed_commit_transaction_deletes_its_noised_draw(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=1, mode="central", noise_multiplier=Z)
    clock = FakeClock()
    eng = enrolled_engine(cfg, clock)
    assert eng.tick()
    _train_answers(eng)
    commits = {"n": 0}
    real = eng.store.transaction

    def failing_transaction():  # type: ignore[no-untyped-def]
        commits["n"] += 1
        if commits["n"] <= 2:
            raise sqlite3.OperationalError("disk I/O error")
        return real()

    eng.store.transaction = failing_transaction  # type: ignore[method-assign]
    for _ in range(2):  # the round timer retries a transient failure: a new draw each time
        with pytest.raises(sqlite3.OperationalError):
            eng.tick()
        assert _model_files(eng) == {eng.current_model}  # the failed draw is gone
    assert eng.tick()
    row = eng.store.get_round(1)
    assert row is not None
    assert row.new_model is not None
    assert _model_files(eng) == {eng.current_model, row.new_model}
    eng.store.close()


def test_a_restart_keeps_registered_models_and_removes_temporaries(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=1, mode="central", noise_multiplier=Z)
    eng = open_engine(cfg, clock=FakeClock())
    initial = eng.current_model
    stray = eng.blobs.root / "models" / f".{initial}.safetensors.0a1b2c3d.tmp"
    stray.write_bytes(b"half a write")
    eng.store.close()
    eng = open_engine(cfg, clock=FakeClock())
    assert not stray.exists()
    assert set(BlobStore(eng.blobs.root).model_files()) == {initial}
    eng.store.close()
