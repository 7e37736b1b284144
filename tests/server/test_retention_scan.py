"""Retention's per-round queries read the live rows only, not the job's history.

``Retention.after_close`` runs after every round: it asks the store for the unpruned
model versions (``Store.model_rows``) and the pinned ones (``Store.pinned_models``). Both
used to scan every row ever written (``models`` with a ``NOT EXISTS`` on ``pruned_blobs``;
``rounds`` for ``status='open'``), 17-27 ms a round at ~25,000 rounds. These tests count
the SQLite virtual-machine steps a query takes (a progress handler called every step), so
they fail when a query visits the pruned history again, and compare what retention keeps
with the old query on long synthetic histories (the oracle). An older job's database
(without ``models.pruned``) is upgraded when it is opened and keeps the same models.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from confide_server.blobs import BlobStore
from confide_server.config import RetentionConfig
from confide_server.engine.retention import Retention
from confide_server.store import RoundRow, Store

#: The query ``Store.model_rows`` ran before ``models.pruned`` (the oracle).
OLD_MODEL_ROWS = (
    "SELECT sha256, path, round FROM models m WHERE NOT EXISTS "
    "(SELECT 1 FROM pruned_blobs p WHERE p.path = m.path) "
    "ORDER BY COALESCE(round, 0), created_at"
)


def _sha(n: int) -> str:
    return f"{n:064x}"


def _path(n: int) -> str:
    return f"models/{_sha(n)}.safetensors"


def _open(folder: Path) -> tuple[Store, BlobStore]:
    return Store(folder / "state" / "confide.sqlite"), BlobStore(folder / "state")


def _init(store: Store) -> None:
    with store.transaction() as cur:
        Store.add_model(cur, _sha(0), _path(0), None)
        Store.set_meta(cur, "initial_model", _sha(0))
        Store.set_meta(cur, "current_model", _sha(0))


def _round(store: Store, r: int, base: int, *, commit: bool, model: int | None) -> None:
    """Open round ``r`` on model ``base``; commit it with ``model`` or abort it."""
    row = RoundRow(
        r, "open", "train", 0.0, ("a", "b"), r, _sha(base), None, float(r), None, None, None
    )
    with store.transaction() as cur:
        Store.insert_round(cur, row)
    with store.transaction() as cur:
        if commit and model is not None:
            Store.add_model(cur, _sha(model), _path(model), r)
            Store.advance_round(cur, r, "train", "evaluate", 0.0, _sha(model))
            assert Store.commit_round(cur, r, "evaluate", {}, float(r) + 0.5) is not None
            Store.set_meta(cur, "current_model", _sha(model))
        else:
            Store.abort_round(cur, r, float(r) + 0.5, "test")


def _old_prunable(store: Store, keep: int) -> list[tuple[str, str, int | None]]:
    rows = [
        (str(s), str(p), None if r is None else int(r))
        for s, p, r in store._db.execute(OLD_MODEL_ROWS).fetchall()
    ]
    pinned = store.pinned_models()
    return [r for r in rows[: max(0, len(rows) - keep)] if r[0] not in pinned]


def _steps(store: Store, query: Callable[[], Any]) -> int:
    """SQLite VM steps ``query`` takes (a progress handler called at every step)."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    store._db.set_progress_handler(tick, 1)
    try:
        query()
    finally:
        store._db.set_progress_handler(None, 1)
    return count[0]


def _history(store: Store, rounds: int, first: int = 1) -> None:
    """Committed rounds ``first..first+rounds-1``, each with a model that is then pruned."""
    entries = []
    with store.transaction() as cur:
        for r in range(first, first + rounds):
            row = RoundRow(
                r,
                "open",
                "train",
                0.0,
                ("a", "b"),
                r,
                _sha(r - 1),
                None,
                float(r),
                None,
                None,
                None,
            )
            Store.insert_round(cur, row)
            Store.add_model(cur, _sha(r), _path(r), r)
            Store.advance_round(cur, r, "train", "evaluate", 0.0, _sha(r))
            Store.commit_round(cur, r, "evaluate", {"x": "y" * 200}, float(r) + 0.5)
            entries.append((_path(r), "model", r, 100))
            entries += [(f"updates/r{r}/{c}.safetensors", "update", r, 100) for c in "ab"]
    store.mark_pruned(entries)


def test_model_rows_and_pins_do_not_read_the_pruned_history(tmp_path: Path) -> None:
    store, _ = _open(tmp_path)
    _init(store)
    _history(store, 50)
    _round(store, 51, 50, commit=True, model=51)
    _round(store, 52, 51, commit=False, model=None)
    # A round open, as when retention runs for the previous close.
    with store.transaction() as cur:
        row = RoundRow(53, "open", "train", 0.0, ("a",), 53, _sha(51), None, 53.0, None, None, None)
        Store.insert_round(cur, row)
    short = (
        _steps(store, store.model_rows),
        _steps(store, store.pinned_models),
        _steps(store, lambda: store._db.execute(OLD_MODEL_ROWS).fetchall()),
    )
    live = store.model_rows()
    # 5,000 more rounds whose models were pruned (as a long job leaves them).
    _history(store, 5000, first=1000)
    assert store.model_rows() == live
    long = (
        _steps(store, store.model_rows),
        _steps(store, store.pinned_models),
        _steps(store, lambda: store._db.execute(OLD_MODEL_ROWS).fetchall()),
    )
    # The measurement sees a scan: the old query takes >= one step per pruned model.
    assert long[2] - short[2] >= 5000, (short, long)
    # The new ones take the same number of steps with 50 or 5,050 rounds behind them.
    assert long[0] <= short[0] + 5, (short, long)
    assert long[1] <= short[1] + 5, (short, long)
    # And the plans name the partial indexes (a dropped index would be an error, not a scan).
    plans = [
        " ".join(str(x) for x in r)
        for q in (
            "SELECT sha256, path, round FROM models INDEXED BY models_live WHERE pruned = 0 "
            "ORDER BY COALESCE(round, 0), created_at",
            "SELECT base_model FROM rounds INDEXED BY rounds_open WHERE status='open'",
        )
        for r in store._db.execute("EXPLAIN QUERY PLAN " + q).fetchall()
    ]
    assert any("models_live" in p for p in plans), plans
    assert any("rounds_open" in p for p in plans), plans
    assert not any("TEMP B-TREE" in p for p in plans), plans  # the index gives the order
    store.close()


@settings(max_examples=25, deadline=None)
@given(
    keep=st.integers(min_value=1, max_value=4),
    # Per round: commit (with a new model), commit re-using an older model, or abort.
    events=st.lists(
        st.tuples(st.sampled_from(["new", "again", "abort"]), st.integers(0, 1000)),
        min_size=1,
        max_size=40,
    ),
)
def test_retention_keeps_the_same_models_as_the_old_query(
    keep: int, events: list[tuple[str, int]]
) -> None:
    with tempfile.TemporaryDirectory(dir=None) as tmp:
        store, blobs = _open(Path(tmp))
        _init(store)
        retention = Retention(RetentionConfig(keep_models=keep, prune_updates=False), store, blobs)
        current, made = 0, [0]
        for r, (kind, pick) in enumerate(events, start=1):
            if kind == "new":
                model: int | None = r
            elif kind == "again":  # a model written again after it was pruned: live again
                model = made[pick % len(made)]
            else:
                model = None
            _round(store, r, current, commit=model is not None, model=model)
            if model is not None:
                current = model
                made.append(model)
            expected = _old_prunable(store, keep)
            assert retention._prunable_models() == expected
            retention.after_close(r)
            rows = store._db.execute(OLD_MODEL_ROWS).fetchall()
            assert store.model_rows() == [(s, p, r_) for s, p, r_ in rows]
            # models.pruned says exactly what pruned_blobs says.
            flags = dict(store._db.execute("SELECT path, pruned FROM models").fetchall())
            marked = {p for (p,) in store._db.execute("SELECT path FROM pruned_blobs")}
            assert {p for p, f in flags.items() if f} == marked & set(flags)
        store.close()


def _downgrade(db_path: Path) -> None:
    """Make the database look like one an older server wrote (no ``models.pruned``)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for name in ("models_live", "models_by_path", "rounds_open", "rounds_committed"):
            conn.execute(f"DROP INDEX {name}")
        conn.execute("ALTER TABLE models DROP COLUMN pruned")
        cols = [r[1] for r in conn.execute("PRAGMA table_info(models)")]
        assert cols == ["sha256", "path", "round", "created_at"]
    finally:
        conn.close()


def test_an_older_database_is_upgraded_and_keeps_its_models(tmp_path: Path) -> None:
    store, blobs = _open(tmp_path)
    _init(store)
    retention = Retention(RetentionConfig(keep_models=2, prune_updates=False), store, blobs)
    for r in range(1, 30):
        _round(store, r, r - 1, commit=r % 7 != 0, model=r if r % 7 else None)
        retention.after_close(r)
    before = store._db.execute(OLD_MODEL_ROWS).fetchall()
    commits = store.get_meta("commit_counter")
    db_path = store.path
    store.close()
    _downgrade(db_path)

    store, blobs = _open(tmp_path)  # the upgrade runs here
    try:
        cols = [str(r[1]) for r in store._db.execute("PRAGMA table_info(models)")]
        assert cols[-1] == "pruned"
        assert store.get_meta("commit_counter") == commits  # not a job-level commit
        assert [tuple(r) for r in store.model_rows()] == [tuple(r) for r in before]
        assert len(before) == 2 + 1  # the two newest and the initial model
        # The upgraded job keeps working: more rounds, the same models as the oracle.
        retention = Retention(RetentionConfig(keep_models=2, prune_updates=False), store, blobs)
        for r in range(30, 40):
            _round(store, r, r - 1, commit=True, model=r)
            assert retention._prunable_models() == _old_prunable(store, 2)
            retention.after_close(r)
        assert [s for s, _, _ in store.model_rows()] == [_sha(0), _sha(38), _sha(39)]
    finally:
        store.close()
    store, _ = _open(tmp_path)  # a second open is a no-op
    try:
        assert [s for s, _, _ in store.model_rows()] == [_sha(0), _sha(38), _sha(39)]
    finally:
        store.close()
