"""Long jobs stay flat on disk: with ``prune_updates`` the per-request rows are bounded.

After the replay window (twice the largest accepted clock skew plus
``REPLAY_MARGIN_S``) retention forgets a closed round's submission rows (keeping the
round's update count and upload bytes in ``round_uploads``), the ``pruned_blobs`` rows of
files that are gone, and the nonces of requests accepted before it, raising the nonce
floor so that such a request's replay is still refused. These tests drive real HTTP on
loopback with real SQLite; the engine's clock is injected and advanced between rounds,
never slept on. The commit-time count of committed rounds is a counter: its SQLite
step count does not depend on the job's length, and an older database is upgraded.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from confide_server.app import create_app, open_engine
from confide_server.config import Config, RetentionConfig
from confide_server.engine.retention import REPLAY_MARGIN_S, Retention
from confide_server.ledger import load_public_key, read_ledger, verify_ledger
from confide_server.metrics import round_rows
from confide_server.store import RoundRow, Store, SubmissionRow
from tests.server.conftest import FakeClock, Fed
from tests.server.test_retention import SITES, _wait_round
from tests.server.test_retention_scan import _history, _init, _open, _sha, _steps
from tests.server.util import delta_body, eval_body, tiny_manifest, write_job

MANIFEST = tiny_manifest()
SKEW = 5.0  # [server] max_clock_skew_s of the bounded-row tests: a 70 s window
ROUND_S = 10.0  # the engine clock moves this much after each round
WINDOW_ROUNDS = int((2 * SKEW + REPLAY_MARGIN_S) // ROUND_S) + 1

Client = Callable[..., Awaitable[TestClient[Any, Any]]]


def _counts(store: Store) -> dict[str, int]:
    return {
        t: int(store._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
        for t in ("submissions", "nonces", "pruned_blobs", "round_uploads")
    }


async def _serve(aiohttp_client: Client, cfg: Config, clock: FakeClock) -> Fed:
    engine = open_engine(cfg, clock=clock)
    client = await aiohttp_client(create_app(cfg, engine=engine))
    return Fed(client, engine, clock)


async def _fed(aiohttp_client: Client, tmp_path: Path, clock: FakeClock, **kw: Any) -> Fed:
    cfg = write_job(tmp_path, **{"job__rounds": 200, **kw})
    fed = await _serve(aiohttp_client, cfg, clock)
    for cid in SITES:
        await fed.enroll(cid)
        await fed.task(cid)
    return fed


async def _round(fed: Fed, r: int, receipts: dict[tuple[int, str], Any] | None = None) -> None:
    """Play round ``r`` (both sites train and evaluate), then move the clock on."""
    await _wait_round(fed, r, "train")
    for k, cid in enumerate(SITES):
        status, doc = await fed.put(cid, r, "train", delta_body(MANIFEST, 0.01 * (k + 1)))
        assert status == 200, doc
        if receipts is not None:
            receipts[(r, cid)] = doc["receipt"]
    await _wait_round(fed, r, "evaluate")
    for cid in SITES:
        assert (await fed.put(cid, r, "evaluate", eval_body(0.5)))[0] == 200
    await _wait_round(fed, r + 1, "train")  # round r closed (and retention ran)
    fed.clock.now += ROUND_S


async def test_rows_stay_bounded_and_metrics_and_ledger_survive(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    fed = await _fed(aiohttp_client, tmp_path, FakeClock(), server__max_clock_skew_s=SKEW)
    store = fed.engine.store
    at: dict[int, dict[str, int]] = {}
    for r in range(1, 25):
        await _round(fed, r)
        at[r] = _counts(store)
    # Bounded by the window, the same after 12 and after 24 rounds (2 sites x 2 stages).
    bound = {"submissions": 4 * WINDOW_ROUNDS, "nonces": 4 * WINDOW_ROUNDS}
    for n in (12, 24):
        assert at[n]["submissions"] <= bound["submissions"], at[n]
        assert at[n]["nonces"] <= bound["nonces"], at[n]
        # The window's update files, and the model the last pass unlinked (its row goes
        # with the next pass).
        assert at[n]["pruned_blobs"] <= 2 * WINDOW_ROUNDS + 1, at[n]
    assert at[12]["submissions"] == at[24]["submissions"] > 0
    assert at[12]["nonces"] == at[24]["nonces"] > 0
    assert at[24]["round_uploads"] == 24 - at[24]["submissions"] // 4  # forgotten rounds
    # What the rows were kept for still reads the same: the ledger verifies, and the
    # metrics of forgotten rounds are those of the rounds still held (same bodies).
    state = fed.engine.config.server.state_dir
    lines = read_ledger(state / "ledger.jsonl")
    assert len(lines) == 24
    assert verify_ledger(lines, load_public_key(str(state / "release_key.pub"))).ok
    rows = round_rows(store, state_dir=state)
    assert len(rows) == 24
    assert store.get_submission(1, "train", "alice") is None  # forgotten
    assert store.get_submission(24, "train", "alice") is not None  # in the window
    assert {r["upload_bytes"] for r in rows} == {rows[-1]["upload_bytes"]}
    assert rows[-1]["upload_bytes"] > 2 * len(delta_body(MANIFEST, 0.01)) - 1
    assert {r["survivors"] for r in rows} == {2}


async def test_retention_off_forgets_nothing(aiohttp_client: Client, tmp_path: Path) -> None:
    fed = await _fed(
        aiohttp_client,
        tmp_path,
        FakeClock(),
        server__max_clock_skew_s=SKEW,
        retention__prune_updates=False,
    )
    for r in range(1, 13):
        await _round(fed, r)
    counts = _counts(fed.engine.store)
    assert counts["submissions"] == 4 * 12
    assert counts["nonces"] == 4 * 12
    assert counts["round_uploads"] == 0
    assert fed.engine.store.nonce_floor_ms == 0


async def test_a_late_redo_gets_its_receipt_in_the_window_then_409(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    fed = await _fed(aiohttp_client, tmp_path, FakeClock(), server__max_clock_skew_s=SKEW)
    store = fed.engine.store
    receipts: dict[tuple[int, str], Any] = {}
    await _round(fed, 1, receipts)
    body = delta_body(MANIFEST, 0.01)  # alice's round-1 update, sent again (new signature)
    # Within the window: today's answer, the stored receipt, and nothing counted twice.
    before = store.count_submissions()
    status, doc = await fed.put("alice", 1, "train", body)
    assert (status, doc["receipt"]) == (200, receipts[(1, "alice")])
    assert store.count_submissions() == before
    for r in range(2, WINDOW_ROUNDS + 3):
        await _round(fed, r)
    assert store.get_submission(1, "train", "alice") is None  # forgotten
    # After it: refused as the closed round it is, saying why; nothing written.
    files = sorted(p for p in (fed.engine.blobs.root / "updates").rglob("*") if p.is_file())
    before = store.count_submissions()
    status, doc = await fed.put("alice", 1, "train", body)
    assert status == 409, doc
    assert doc["error"]["code"] == "round_closed"
    assert "retention" in doc["error"]["message"]
    assert store.count_submissions() == before
    assert sorted(p for p in (fed.engine.blobs.root / "updates").rglob("*") if p.is_file()) == (
        files
    )
    # Another body for that round is refused as before (409, not counted).
    status, doc = await fed.put("alice", 1, "train", delta_body(MANIFEST, 0.5))
    assert (status, doc["error"]["code"]) == (409, "round_closed")


async def test_a_replay_after_its_nonce_was_forgotten_is_refused(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    # The engine's clock starts at the real time (the signatures carry real timestamps).
    clock = FakeClock()
    clock.now = time.time()
    skew = 300.0
    fed = await _fed(aiohttp_client, tmp_path, clock, server__max_clock_skew_s=skew)
    await _wait_round(fed, 1, "train")
    # alice's clock runs 250 s ahead: accepted (within the skew), and replayable by its
    # timestamp until 250 + 300 s after it was accepted.
    body = delta_body(MANIFEST, 0.01)
    path = "/v1/rounds/1/train"
    ahead = int((time.time() + 250.0) * 1000)
    headers = fed.ids["alice"].sign_request(
        "alice", "PUT", path, 1, "train", body, timestamp_ms=ahead
    )
    status, doc = await fed.put("alice", 1, "train", body, headers=headers)
    assert status == 200, doc
    assert fed.engine.store.nonce_seen(headers["X-Confide-Nonce"])
    assert (await fed.put("bob", 1, "train", delta_body(MANIFEST, 0.02)))[0] == 200
    await _wait_round(fed, 1, "evaluate")
    for cid in SITES:
        assert (await fed.put(cid, 1, "evaluate", eval_body(0.5)))[0] == 200
    await _wait_round(fed, 2, "train")
    # The engine's clock passes the window; the next pass forgets round 1's nonces.
    clock.now += 2 * skew + REPLAY_MARGIN_S + 1.0
    fed.engine.retention.after_close(1)
    store = fed.engine.store
    assert not store.nonce_seen(headers["X-Confide-Nonce"])
    assert _counts(store)["nonces"] == 0
    # The floor is past the forgotten request's timestamp, and below what a request
    # signed now (by the engine's clock) within the skew carries.
    assert ahead < store.nonce_floor_ms <= int((clock.now - skew) * 1000)
    # A restart (a new process: a fresh in-memory nonce cache) and the replay.
    ids = dict(fed.ids)
    await fed.http.close()
    store.close()
    fed = await _serve(aiohttp_client, fed.engine.config, clock)
    fed.ids.update(ids)
    assert fed.engine.store.nonce_floor_ms > ahead  # durable
    before = fed.engine.store.count_submissions()
    status, doc = await fed.put("alice", 1, "train", body, headers=headers)
    assert status == 401, doc
    assert doc["error"]["code"] == "stale_request"
    assert fed.engine.store.count_submissions() == before


class _Killed(BaseException):
    """Stands in for SIGKILL between the unlinks and the commit that forgets their rows."""


async def test_a_kill_between_unlink_and_forget_is_recovered_at_start(
    aiohttp_client: Client, tmp_path: Path
) -> None:
    fed = await _fed(aiohttp_client, tmp_path, FakeClock(), server__max_clock_skew_s=SKEW)
    for r in range(1, 4):
        await _round(fed, r)
    store, blobs = fed.engine.store, fed.engine.blobs

    def kill(point: str) -> None:
        if point == "prune_unlinked":
            raise _Killed

    # A pass that prunes two models (keep_models 10 -> 1) after the window passed, killed
    # after its unlinks, before the commit that forgets their rows.
    fed.clock.now += 2 * SKEW + REPLAY_MARGIN_S + 1.0
    held = _counts(store)
    stopped = Retention(
        RetentionConfig(keep_models=1),
        store,
        blobs,
        crash_hook=kill,
        max_clock_skew_s=SKEW,
        clock=fed.clock,
    )
    with pytest.raises(_Killed):
        stopped.after_close(3)
    # The marking transaction forgot the rounds past the window; the two models it
    # marked were unlinked, and their rows (forgotten by the next pass) are what the kill
    # left: rows whose files are gone.
    after_kill = _counts(store)
    assert after_kill["submissions"] == 0 < held["submissions"]
    gone = [p for p in store.pruned_paths() if not (blobs.root / p).exists()]
    assert len(gone) == 2 == after_kill["pruned_blobs"], gone
    assert all(p.startswith("models/") for p in gone)
    # The start-up sweep forgets them, nothing else.
    Retention(
        RetentionConfig(keep_models=1), store, blobs, max_clock_skew_s=SKEW, clock=fed.clock
    ).sweep()
    after = _counts(store)
    assert after == {**after_kill, "pruned_blobs": 0}
    assert after["nonces"] == 0
    assert store.pruned_paths() == []
    # A pruned model is still refused as pruned (models.pruned), not as unknown.
    current = fed.engine.current_model
    pruned = [r.new_model for r in store.rounds() if r.new_model not in (None, current)]
    assert len(pruned) == 2
    assert all(store.is_pruned(store.model_path(m or "") or "") for m in pruned)


def test_the_nonce_floor_only_rises_and_survives_a_reopen(tmp_path: Path) -> None:
    store, _ = _open(tmp_path)
    with store.transaction() as cur:
        cur.execute("INSERT INTO nonces(nonce, client_id, ts) VALUES ('a', 'x', 10.0)")
        cur.execute("INSERT INTO nonces(nonce, client_id, ts) VALUES ('b', 'x', 100.0)")
    assert store.forget_closed({}, [], 50.0, 5_000) == (0, 0, 1)
    assert store.nonce_floor_ms == 5_000
    assert store.forget_closed({}, [], 50.0, 1_000) == (0, 0, 0)  # nothing deleted
    assert store.nonce_floor_ms == 5_000
    assert store.forget_closed({}, [], 200.0, 2_000) == (0, 0, 1)  # lower: kept
    assert store.nonce_floor_ms == 5_000
    store.close()
    store, _ = _open(tmp_path)
    assert store.nonce_floor_ms == 5_000
    # The largest skew a process accepted is kept: lowering it never shortens the window.
    assert store.note_clock_skew(600.0) == 600.0
    assert store.note_clock_skew(300.0) == 600.0
    store.close()


# -- the committed-round count -----------------------------------------------------------
OLD_COUNT = "SELECT COUNT(*) FROM rounds WHERE status='committed'"


def _commit_steps(store: Store, r: int) -> tuple[int, int]:
    """SQLite steps of committing round ``r`` (opened here); and the committed count."""
    row = RoundRow(r, "open", "train", 0.0, ("a",), r, _sha(0), None, float(r), None, None, None)
    with store.transaction() as cur:
        Store.insert_round(cur, row)
        Store.advance_round(cur, r, "train", "evaluate", 0.0, _sha(r))
    done: list[int | None] = []

    def commit() -> None:
        with store.transaction() as cur:
            done.append(Store.commit_round(cur, r, "evaluate", {}, float(r) + 0.5))

    steps = _steps(store, commit)
    assert done[0] is not None
    return steps, done[0]


def test_the_committed_count_costs_the_same_after_5000_rounds(tmp_path: Path) -> None:
    store, _ = _open(tmp_path)
    _init(store)
    _history(store, 50)
    short, n = _commit_steps(store, 51)
    assert n == 51
    old_short = _steps(store, lambda: store._db.execute(OLD_COUNT).fetchone())
    _history(store, 5000, first=100)
    long, n = _commit_steps(store, 6000)
    assert n == 51 + 5000 + 1 == int(store._db.execute(OLD_COUNT).fetchone()[0])
    old_long = _steps(store, lambda: store._db.execute(OLD_COUNT).fetchone())
    assert old_long - old_short >= 5000, (old_short, old_long)  # the old count scans
    assert long <= short + 5, (short, long)
    store.close()


def test_an_older_database_gets_the_counter_from_its_rows(tmp_path: Path) -> None:
    store, _ = _open(tmp_path)
    _init(store)
    _history(store, 30)
    commits = store.get_meta("commit_counter")
    path = store.path
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)  # as an older server left it
    conn.execute("DELETE FROM meta WHERE key='committed_rounds'")
    conn.close()
    store, _ = _open(tmp_path)  # the upgrade runs here
    try:
        assert store.get_meta("committed_rounds") == "30"
        assert store.get_meta("commit_counter") == commits  # not a job-level commit
        assert _commit_steps(store, 31)[1] == 31
    finally:
        store.close()
    store, _ = _open(tmp_path)  # a second open is a no-op
    try:
        assert store.get_meta("committed_rounds") == "31"
    finally:
        store.close()


# -- a pass's cost does not grow with the job --------------------------------------------
def _window(store: Store, first: int, n: int) -> None:
    """Rounds ``first..first+n-1`` committed with two plain submissions each (in window)."""
    for r in range(first, first + n):
        row = RoundRow(
            r, "open", "train", 0.0, ("a", "b"), r, _sha(0), None, float(r), None, None, None
        )
        with store.transaction() as cur:
            Store.insert_round(cur, row)
        for c in "ab":
            receipt = {"round": r, "client_id": c}
            sub = SubmissionRow(r, "train", c, _sha(r), 1, None, {"train_loss": 0.5}, receipt)
            store.insert_submission(sub, f"n{r}{c}", 1e9 + r)
        with store.transaction() as cur:
            Store.advance_round(cur, r, "train", "evaluate", 0.0, _sha(r))
            Store.commit_round(cur, r, "evaluate", {}, 1e9 + r)


def test_a_forget_pass_costs_the_same_after_5000_rounds(tmp_path: Path) -> None:
    store, blobs = _open(tmp_path)
    _init(store)
    clock = FakeClock()
    clock.now = 1e9 + 6000.5 + 2 * SKEW + REPLAY_MARGIN_S  # round 6000 past the window
    retention = Retention(RetentionConfig(), store, blobs, max_clock_skew_s=SKEW, clock=clock)

    def measure() -> int:
        # Round 6000 past the window (forgotten), 6001-6100 in it (held).
        _window(store, 6000, 101)
        steps = _steps(store, lambda: retention.forget(store.pruned_model_rows()))
        assert store.get_submission(6000, "train", "a") is None  # forgotten
        assert store.get_submission(6001, "train", "a") is not None  # held
        with store.transaction() as cur:  # take the window away again
            cur.execute("DELETE FROM submissions")
            cur.execute("DELETE FROM rounds WHERE round >= 6000")
            cur.execute("DELETE FROM round_uploads")
        return steps

    _history(store, 50)
    with store.transaction() as cur:  # as retention leaves a long job's history
        cur.execute("DELETE FROM pruned_blobs")
    short = measure()
    _history(store, 5000, first=100)
    with store.transaction() as cur:
        cur.execute("DELETE FROM pruned_blobs")
    long = measure()
    assert long <= short + 5, (short, long)
    store.close()
