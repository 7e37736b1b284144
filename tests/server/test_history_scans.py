"""Per-round and status queries that used to read the whole job history (issue 12 item 9).

A profile of an 8,000-round sample-DP soak (py-spy on the server at rounds 1,500, 4,500 and
7,300) found three queries whose cost grew with the job: the strategy state of the last
committed round (read at every aggregation; it sorted every committed round), the job's
largest cumulative epsilon (read for every round's ledger entry and metrics export; it
scanned every privacy record) and the status page's round total (a ``GROUP BY`` over every
round). These tests count the SQLite virtual-machine steps of each (a progress handler
called at every step, as in ``test_retention_scan``): the same with 50 or 5,050 rounds
behind, while the old query's steps grow by thousands, and each answer equals the old
query's (the oracle), also when the newest rounds were aborted or carry no state.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from confide_server.store import PrivacyRow, RoundRow, Store
from tests.server.test_retention_scan import _history, _init, _open, _round, _sha, _steps

OLD_STRATEGY = (
    "SELECT s.state FROM strategy_states s JOIN rounds r ON r.round = s.round "
    "WHERE r.status='committed' ORDER BY s.round DESC LIMIT 1"
)
OLD_MAX_EPSILON = "SELECT MAX(epsilon) FROM privacy_rounds"  # without the index
OLD_TOTAL = "SELECT status, COUNT(*) FROM rounds GROUP BY status"


def _old_strategy(store: Store) -> object:
    row = store._db.execute(OLD_STRATEGY).fetchone()
    return None if row is None else json.loads(row[0])


def _states(store: Store, rounds: range) -> None:
    with store.transaction() as cur:
        for r in rounds:
            Store.save_strategy_state(cur, r, {"round": r, "m": [r * 0.5]})


def _privacy(store: Store, rounds: range, rng: random.Random) -> None:
    with store.transaction() as cur:
        for r in rounds:
            eps = rng.uniform(0.0, 50.0)  # not monotone: MAX must look at every value
            row = PrivacyRow(r, "sample", [], 0.1, eps, eps, "pld", 1e-5, "train")
            Store.insert_privacy_round(cur, row, {"v": 1})


def test_strategy_state_of_the_last_committed_round_does_not_sort_the_history(
    tmp_path: Path,
) -> None:
    store, _ = _open(tmp_path)
    _init(store)
    _history(store, 50)
    _states(store, range(1, 51))
    _round(store, 51, 50, commit=False, model=None)  # aborted: its state must not count
    _states(store, range(51, 52))
    assert store.committed_strategy_state() == _old_strategy(store) == {"round": 50, "m": [25.0]}
    short = (
        _steps(store, store.committed_strategy_state),
        _steps(store, lambda: store._db.execute(OLD_STRATEGY).fetchall()),
    )
    _history(store, 5000, first=1000)
    _states(store, range(1000, 5999, 2))  # every other round has a state
    # The newest committed round (5999) has none: the newest committed one that has wins.
    assert (
        store.committed_strategy_state() == _old_strategy(store) == {"round": 5998, "m": [2999.0]}
    )
    long = (
        _steps(store, store.committed_strategy_state),
        _steps(store, lambda: store._db.execute(OLD_STRATEGY).fetchall()),
    )
    assert long[1] - short[1] >= 5000, (short, long)  # the old query reads them all
    assert long[0] <= short[0] + 10, (short, long)
    # An open round with a state after it (as while a round runs) changes nothing.
    with store.transaction() as cur:
        row = RoundRow(
            6000, "open", "train", 0.0, ("a",), 1, _sha(5999), None, 1.0, None, None, None
        )
        Store.insert_round(cur, row)
        Store.save_strategy_state(cur, 6000, {"round": 6000})
    assert (
        store.committed_strategy_state() == _old_strategy(store) == {"round": 5998, "m": [2999.0]}
    )
    store.close()


def test_max_epsilon_reads_an_index_not_every_privacy_record(tmp_path: Path) -> None:
    store, _ = _open(tmp_path)
    rng = random.Random(7)
    _privacy(store, range(1, 51), rng)
    short = _steps(store, store.max_epsilon)
    _privacy(store, range(51, 5051), rng)
    long = _steps(store, store.max_epsilon)
    assert long <= short + 10, (short, long)
    values = [float(v) for (v,) in store._db.execute("SELECT epsilon FROM privacy_rounds")]
    assert store.max_epsilon() == max(values)
    # The measurement sees a scan: the same MAX without the index reads every record.
    store._db.execute("DROP INDEX privacy_by_epsilon")
    assert _steps(store, lambda: store._db.execute(OLD_MAX_EPSILON).fetchall()) >= 5000
    assert store._db.execute(OLD_MAX_EPSILON).fetchone()[0] == max(values)
    store.close()
    # Opening the database again (an older job's, say) creates the index.
    store, _ = _open(tmp_path)
    assert _steps(store, store.max_epsilon) <= short + 10
    store.close()


def test_round_total_is_one_lookup_and_counts_every_round(tmp_path: Path) -> None:
    store, _ = _open(tmp_path)
    _init(store)
    assert store.round_total() == 0
    _history(store, 50)
    _round(store, 51, 50, commit=False, model=None)
    short = _steps(store, store.round_total)
    old_short = _steps(store, lambda: store._db.execute(OLD_TOTAL).fetchall())
    _history(store, 5000, first=52)
    with store.transaction() as cur:  # the open round counts too
        row = RoundRow(
            5052, "open", "train", 0.0, ("a",), 1, _sha(5051), None, 1.0, None, None, None
        )
        Store.insert_round(cur, row)
    assert store.round_total() == sum(store.round_counts().values()) == 5052
    assert _steps(store, store.round_total) <= short + 5
    assert _steps(store, lambda: store._db.execute(OLD_TOTAL).fetchall()) - old_short >= 5000
    store.close()
