"""Per-round and status queries that used to read the whole job history (issue 12 item 9).

A profile of an 8,000-round sample-DP soak (py-spy on the server at rounds 1,500, 4,500 and
7,300) found three queries whose cost grew with the job: the strategy state of the last
committed round (read at every aggregation; it sorted every committed round), the job's
largest cumulative epsilon (read for every round's ledger entry and metrics export; it
scanned every privacy record) and the status page's round total (a ``GROUP BY`` over every
round). Retention's forget pass, at every round, walked every round of the replay window
(bounded, but ~6,000 rounds at this machine's round rate) when fewer than a batch had
left it. These tests count the SQLite virtual-machine steps of each (a progress handler
called at every step, as in ``test_retention_scan``): the same with 50 or 5,050 rounds
behind, while the old query's steps grow by thousands, and each answer equals the old
query's (the oracle), also when the newest rounds were aborted or carry no state.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from confide_server.store import PrivacyRow, RoundRow, Store, SubmissionRow
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


#: The query ``Store.closed_submissions_before`` ran before it stopped at the first round
#: that does not qualify (the oracle).
OLD_CLOSED = (
    "SELECT s.round, s.stage, s.blob, s.payload, p.size FROM submissions s "
    "LEFT JOIN pruned_blobs p ON p.path = s.blob WHERE s.round IN ("
    "SELECT round FROM rounds WHERE round >= (SELECT MIN(round) FROM submissions) "
    "AND status IN ('committed', 'aborted') AND ended_at < ? "
    "ORDER BY round LIMIT ?) ORDER BY s.round"
)


def _old_closed(store: Store, before: float, limit: int) -> dict[int, list[tuple[object, ...]]]:
    out: dict[int, list[tuple[object, ...]]] = {}
    for rnd, stage, blob, payload, size in store._db.execute(OLD_CLOSED, (before, limit)):
        out.setdefault(int(rnd), []).append((str(stage), blob, payload, size))
    return out


def _closed_rounds(store: Store, ends: list[tuple[str, float]], first: int = 1) -> None:
    """Rounds ``first..`` closed as ``ends`` says (status, ended_at), two submissions each."""
    for k, (status, ended) in enumerate(ends):
        r = first + k
        row = RoundRow(r, "open", "train", 0.0, ("a", "b"), r, _sha(0), None, 0.0, None, None, None)
        with store.transaction() as cur:
            Store.insert_round(cur, row)
        for c in "ab":
            sub = SubmissionRow(r, "train", c, _sha(r), 1, f"updates/r{r}/{c}.st", None, {"r": r})
            store.insert_submission(sub, f"n{r}{c}", ended)
        with store.transaction() as cur:
            if status == "committed":
                Store.advance_round(cur, r, "train", "evaluate", 0.0, _sha(r))
                assert Store.commit_round(cur, r, "evaluate", {}, ended) is not None
            else:
                Store.abort_round(cur, r, ended, "test")


def test_forget_walk_reads_a_batch_not_the_replay_window(tmp_path: Path) -> None:
    """Rounds inside the window do not qualify; the old query read every one of them."""
    store, _ = _open(tmp_path)
    _closed_rounds(store, [("committed", float(r)) for r in range(1, 101)])  # > one batch
    cutoff = 10.5  # rounds 1-10 ended before it
    short = _steps(store, lambda: store.closed_submissions_before(cutoff, 64))
    old_short = _steps(store, lambda: _old_closed(store, cutoff, 64))
    got = store.closed_submissions_before(cutoff, 64)
    assert sorted(got) == list(range(1, 11))
    _closed_rounds(store, [("committed", 100.0 + r) for r in range(1, 3001)], first=101)
    assert store.closed_submissions_before(cutoff, 64) == got == _old_closed(store, cutoff, 64)
    assert _steps(store, lambda: store.closed_submissions_before(cutoff, 64)) <= short + 10
    assert _steps(store, lambda: _old_closed(store, cutoff, 64)) - old_short >= 3000
    store.close()


@settings(max_examples=40, deadline=None)
@given(
    ends=st.lists(
        st.tuples(st.sampled_from(["committed", "aborted"]), st.floats(0.01, 5.0)),
        min_size=1,
        max_size=30,
    ),
    open_last=st.booleans(),
    cut=st.floats(0.0, 160.0),
    limit=st.integers(1, 12),
    back=st.one_of(st.none(), st.tuples(st.integers(0, 29), st.floats(1.0, 200.0))),
)
def test_forget_walk_equals_the_old_query_and_never_forgets_more(
    ends: list[tuple[str, float]],
    open_last: bool,
    cut: float,
    limit: int,
    back: tuple[int, float] | None,
) -> None:
    """With a clock that only goes forward the same rounds as the old query; after a
    backward step of the clock (``back``: at that round the clock went back so far) a
    subset of them, the oldest ones first."""
    times, t = [], 0.0
    for k, (status, gap) in enumerate(ends):
        t += gap
        if back is not None and k == back[0]:
            t -= back[1]
        times.append((status, t))
    with tempfile.TemporaryDirectory() as tmp:
        store, _ = _open(Path(tmp))
        _closed_rounds(store, times)
        if open_last:
            r = len(times) + 1
            row = RoundRow(r, "open", "train", 0.0, ("a",), r, _sha(0), None, 0.0, None, None, None)
            with store.transaction() as cur:
                Store.insert_round(cur, row)
        new, old = store.closed_submissions_before(cut, limit), _old_closed(store, cut, limit)
        if back is None:
            assert new == old
        else:
            assert list(new) == list(old)[: len(new)]
            assert all(new[r] == old[r] for r in new)
        store.close()
