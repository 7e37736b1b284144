"""Durable state: SQLite (WAL, ``synchronous=FULL``). Every SQL statement and the one schema.

The engine (:mod:`confide_server.engine`) never writes SQL: it calls the methods here. Methods
that take a ``cur`` (a :data:`Tx`) run inside the caller's :meth:`Store.transaction`, so one
round transition (rows, privacy record, SecAgg+ snapshot, strategy state) is one transaction.
Blob files live in :mod:`confide_server.blobs`.

Invariants the round machine relies on:

* a blob (model version or client update) is written durably
  (:class:`~confide_server.blobs.BlobStore`) *before* the SQLite row that refers to it is
  committed;
* an accepted submission is one SQLite transaction (row + nonce); once ``commit`` returns it
  survives SIGKILL and power loss, and only then is it acknowledged;
* model versions are named by the SHA-256 of their bytes, so re-running an interrupted
  aggregation rewrites the same file under the same name;
* every round transition is one transaction guarded by the row's current status/stage, so a
  transition replayed after a crash cannot happen twice.

The class is synchronous and thread-safe (one connection behind a lock); the server calls it
from worker threads with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confide.errors import ConfigError, FederationError
from confide_server.blobs import BlobStore, FaultHook

log = logging.getLogger("confide_server")

__all__ = [
    "TRANSIENT_ERRORS",
    "BlobStore",
    "DamagedStateError",
    "ForgetPlan",
    "PrivacyRow",
    "RoundRow",
    "StorageError",
    "Store",
    "SubmissionRow",
    "Tx",
]


class DamagedStateError(ConfigError):
    """The state folder does not match what was last committed: refuse to start.

    Raised for a database that cannot be read or fails ``PRAGMA quick_check``, and for a
    database that is older than (or another job than) its job manifest says: its
    write-ahead log or the database itself was deleted or replaced. Starting anyway would
    silently lose acknowledged work (or start a new, empty job).
    """

    code = "damaged_state"


_RECOVERY = (
    "Stop the server, restore the state folder (the database and its -wal file together) "
    "from a backup, or move the folder away to start a new job; do not start on it as is"
)
_MANIFEST_FORMAT = "confide-state/1"


class StorageError(FederationError):
    """The disk refused a durable write (full, I/O error): nothing was acknowledged.

    Transient by nature: the HTTP layer answers 503 with ``Retry-After`` and clients retry.
    """

    code = "storage_unavailable"


#: Errors of a full or failing disk (transient: retry, never abort a round over them). The
#: engine catches these without importing sqlite3 (store.py owns the database).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    StorageError,
    OSError,
    sqlite3.OperationalError,
)


#: The handle of an open transaction (what :meth:`Store.transaction` yields). The engine
#: passes it through to the ``Store`` methods that take ``cur``; it never executes SQL on it.
Tx = sqlite3.Cursor

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, created_at REAL NOT NULL,
    used_by TEXT, used_at REAL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY, public_key TEXT NOT NULL UNIQUE, enrolled_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, status TEXT NOT NULL, stage TEXT NOT NULL,
    deadline REAL NOT NULL, cohort TEXT NOT NULL, seed INTEGER NOT NULL,
    base_model TEXT NOT NULL, new_model TEXT, started_at REAL NOT NULL,
    ended_at REAL, metrics TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS submissions (
    round INTEGER NOT NULL, stage TEXT NOT NULL, client_id TEXT NOT NULL,
    sha256 TEXT NOT NULL, num_examples INTEGER NOT NULL, blob TEXT, payload TEXT,
    receipt TEXT NOT NULL, accepted_at REAL NOT NULL,
    PRIMARY KEY (round, stage, client_id));
CREATE TABLE IF NOT EXISTS nonces (
    nonce TEXT PRIMARY KEY, client_id TEXT NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    sha256 TEXT PRIMARY KEY, path TEXT NOT NULL, round INTEGER, created_at REAL NOT NULL,
    pruned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS privacy_rounds (
    round INTEGER PRIMARY KEY, mode TEXT NOT NULL, events TEXT NOT NULL,
    epsilon_round REAL NOT NULL, epsilon REAL NOT NULL, epsilon_rdp REAL NOT NULL,
    method TEXT NOT NULL, delta REAL NOT NULL, recorded_at_stage TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ddg_rounds (
    round INTEGER PRIMARY KEY, params TEXT NOT NULL, rotation_seed TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secagg_state (
    round INTEGER PRIMARY KEY, state TEXT NOT NULL, result TEXT);
CREATE TABLE IF NOT EXISTS strategy_states (
    round INTEGER PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certificates (
    client_id TEXT PRIMARY KEY, certificate TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    round INTEGER PRIMARY KEY, entry TEXT NOT NULL, entry_hash TEXT NOT NULL,
    signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_clients (
    client_id TEXT PRIMARY KEY, revoked_at REAL NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pruned_blobs (
    path TEXT PRIMARY KEY, kind TEXT NOT NULL, round INTEGER, size INTEGER NOT NULL,
    pruned_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS round_uploads (
    round INTEGER PRIMARY KEY, updates INTEGER NOT NULL, upload_bytes INTEGER NOT NULL);
"""

#: Indexes that keep the per-round queries of a long job from reading its whole history
#: (created after :meth:`Store._migrate`, which adds the columns they name). Partial
#: indexes: each holds the few rows a round-time query looks for, so its cost does not
#: grow with the job's length.
_INDEXES = """
CREATE INDEX IF NOT EXISTS models_live ON models (COALESCE(round, 0), created_at)
    WHERE pruned = 0;
CREATE INDEX IF NOT EXISTS models_by_path ON models (path);
CREATE INDEX IF NOT EXISTS rounds_open ON rounds (round) WHERE status = 'open';
CREATE INDEX IF NOT EXISTS rounds_committed ON rounds (round) WHERE status = 'committed';
CREATE INDEX IF NOT EXISTS nonces_by_ts ON nonces (ts);
CREATE INDEX IF NOT EXISTS pruned_models ON pruned_blobs (path) WHERE kind = 'model';
CREATE INDEX IF NOT EXISTS privacy_by_epsilon ON privacy_rounds (epsilon);
"""


@dataclass(frozen=True)
class RoundRow:
    """One row of the ``rounds`` table."""

    round: int
    status: str
    stage: str
    deadline: float
    cohort: tuple[str, ...]
    seed: int
    base_model: str
    new_model: str | None
    started_at: float
    ended_at: float | None
    metrics: dict[str, Any] | None
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        """Return the row as a JSON-ready dict (status endpoint)."""
        return {
            "round": self.round,
            "status": self.status,
            "stage": self.stage,
            "deadline": self.deadline,
            "cohort": list(self.cohort),
            "base_model": self.base_model,
            "new_model": self.new_model,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "metrics": self.metrics,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class PrivacyRow:
    """One row of the ``privacy_rounds`` table: a round's accounted release."""

    round: int
    mode: str
    events: list[dict[str, Any]]
    epsilon_round: float
    epsilon: float
    epsilon_rdp: float
    method: str
    delta: float
    recorded_at_stage: str


@dataclass(frozen=True)
class SubmissionRow:
    """One accepted submission."""

    round: int
    stage: str
    client_id: str
    sha256: str
    num_examples: int
    blob: str | None
    payload: dict[str, Any] | None
    receipt: dict[str, Any]


@dataclass(frozen=True)
class ForgetPlan:
    """What a retention pass forgets (:meth:`Store.mark_pruned`), files already checked.

    ``uploads``: ``{round: (updates, upload_bytes)}`` of closed rounds whose submission
    rows (and the ``pruned_blobs`` rows of their update files, which are gone) are
    deleted, the totals kept in ``round_uploads``; ``model_paths``: pruned model files
    that are gone (their ``pruned_blobs`` rows go; ``models.pruned`` stays); nonces
    accepted before ``nonces_before`` are deleted and signed timestamps below
    ``nonce_floor_ms`` refused from then on (the floor only rises).
    """

    uploads: dict[int, tuple[int, int]]
    model_paths: list[str]
    nonces_before: float
    nonce_floor_ms: int


class Store:
    """SQLite-backed job state.

    Parameters
    ----------
    path : Path
        Database file (created with its folder).
    """

    def __init__(self, path: Path, *, fault_hook: FaultHook | None = None) -> None:
        # Only the server's user reads its state: folder 0700, database 0600 (SQLite gives
        # its -wal and -shm files the database's mode).
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.path = path
        #: The job manifest beside the database: job id and commit counter, fsynced.
        self.manifest_path = path.with_name(path.name + ".job.json")
        self._fault = fault_hook or (lambda _step: None)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk (WAL fsynced) when it returns, so acks are durable.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=30000")
            check = str(self._db.execute("PRAGMA quick_check").fetchone()[0])
            if check == "ok":
                self._db.executescript(_SCHEMA)
                self._migrate()
                self._db.executescript(_INDEXES)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise DamagedStateError(
                f"{path} is not a readable confide database ({exc}). {_RECOVERY}"
            ) from None
        if check != "ok":
            self._db.close()
            raise DamagedStateError(
                f"{path} failed its integrity check ({check[:200]}). {_RECOVERY}"
            )
        self._manifest_commits = 0
        self._manifest_commits = self._check_identity()
        #: Signed timestamps (ms) below this are refused on mutating requests: every nonce
        #: :meth:`forget_closed` deleted belongs to a request signed before it.
        self.nonce_floor_ms = int(self.get_meta("nonce_floor_ms") or 0)

    def _migrate(self) -> None:
        """Bring a database written by an older server up to the current schema.

        ``models.pruned`` (a job started before it): added, and set from ``pruned_blobs``
        in the same transaction, so a model pruned before the upgrade stays pruned and no
        other row changes. ``meta.committed_rounds`` (the count :meth:`commit_round`
        returns, kept in the commit transaction): set once from the committed rows. A
        no-op on a current database. Neither is a job-level commit (no counter moves).
        """
        cols = {str(r[1]) for r in self._db.execute("PRAGMA table_info(models)")}
        counted = self._db.execute("SELECT 1 FROM meta WHERE key='committed_rounds'").fetchone()
        if "pruned" in cols and counted is not None:
            return
        # Not through transaction(): that syncs the job manifest, which must first be
        # compared with this database (_check_identity), not overwritten from it.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if "pruned" not in cols:
                self._db.execute("ALTER TABLE models ADD COLUMN pruned INTEGER NOT NULL DEFAULT 0")
                self._db.execute(
                    "UPDATE models SET pruned = 1 WHERE path IN (SELECT path FROM pruned_blobs)"
                )
            if counted is None:  # once, on a job started before the counter: O(rounds)
                self._db.execute(
                    "INSERT INTO meta(key, value) SELECT 'committed_rounds', "
                    "CAST(COUNT(*) AS TEXT) FROM rounds WHERE status='committed'"
                )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        log.info("%s: schema upgraded (models.pruned, meta.committed_rounds)", self.path)

    # -- job identity ------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.manifest_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DamagedStateError(
                f"{self.manifest_path} cannot be read ({exc}). {_RECOVERY}"
            ) from None
        if (
            not isinstance(doc, dict)
            or doc.get("format") != _MANIFEST_FORMAT
            or not isinstance(doc.get("job_id"), str)
            or not isinstance(doc.get("commits"), int)
        ):
            raise DamagedStateError(f"{self.manifest_path} is not a confide job manifest")
        return doc

    def _write_manifest(self, job_id: str, commits: int) -> None:
        doc = {"format": _MANIFEST_FORMAT, "job_id": job_id, "commits": commits}
        BlobStore.write_file(self.manifest_path, (json.dumps(doc) + "\n").encode())

    def _check_identity(self) -> int:
        """Compare the database with its job manifest; create both on a new state folder.

        Returns the commit count the manifest holds. A database that lost committed work
        (its WAL deleted, an older copy) has a lower counter than the manifest, or no job at
        all: refused. A higher counter means a crash between a commit and the manifest
        update (the manifest is only ever behind): the manifest is brought up to date.
        """
        manifest = self._read_manifest()
        job_id = self.get_meta("job_id")
        commits = int(self.get_meta("commit_counter") or 0)
        if job_id is None:
            if manifest is not None:
                raise DamagedStateError(
                    f"{self.path} holds no job, but {self.manifest_path.name} records job "
                    f"{manifest['job_id']} with {manifest['commits']} commits: the database or "
                    f"its write-ahead log ({self.path.name}-wal) was deleted or replaced. "
                    f"{_RECOVERY}"
                )
            job_id = secrets.token_hex(16)
            with self.transaction() as cur:
                Store.set_meta(cur, "job_id", job_id)
                Store.set_meta(cur, "commit_counter", "0")
        elif manifest is not None and manifest["job_id"] != job_id:
            raise DamagedStateError(
                f"{self.path} belongs to job {job_id}, but {self.manifest_path.name} records "
                f"job {manifest['job_id']}: the database was replaced. {_RECOVERY}"
            )
        elif manifest is not None and manifest["commits"] > commits:
            raise DamagedStateError(
                f"{self.path} holds {commits} commits, but {self.manifest_path.name} records "
                f"{manifest['commits']}: committed work is missing (the write-ahead log "
                f"{self.path.name}-wal was deleted, or an older copy restored). {_RECOVERY}"
            )
        if manifest is None or manifest["commits"] != commits:
            self._write_manifest(job_id, commits)
        return commits

    def _sync_manifest(self) -> None:
        """After a commit: write the manifest if the commit counter moved (lock held)."""
        row = self._db.execute(
            "SELECT a.value, b.value FROM meta a, meta b "
            "WHERE a.key='job_id' AND b.key='commit_counter'"
        ).fetchone()
        if row is None or int(row[1]) <= self._manifest_commits:
            return
        try:
            self._write_manifest(str(row[0]), int(row[1]))
        except OSError as exc:  # the commit stands; a manifest that is behind is harmless
            log.warning("could not update %s: %s", self.manifest_path, exc)
            return
        self._manifest_commits = int(row[1])

    @staticmethod
    def bump_commits(cur: Tx) -> None:
        """Count one job-level commit (round start/close, enrolment) in a transaction."""
        cur.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='commit_counter'")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Run a block in one ``BEGIN IMMEDIATE`` transaction (commit or roll back).

        Raises
        ------
        StorageError
            The commit failed (disk full, I/O error): the transaction is rolled back and
            nothing of it is durable, so the caller must not acknowledge anything.
        """
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException as exc:
                cur.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):  # e.g. "database or disk is full"
                    raise StorageError(f"the database refused a write: {exc}") from exc
                raise
            try:
                self._fault("db_commit")
                cur.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if self._db.in_transaction:  # a failed COMMIT can leave it open
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                raise StorageError(f"the database refused a commit: {exc}") from exc
            self._sync_manifest()

    # -- meta --------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """Return a meta value or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def set_meta(cur: Tx, key: str, value: str) -> None:
        """Set a meta value inside a transaction."""
        cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @staticmethod
    def set_meta_once(cur: Tx, key: str, value: str) -> str:
        """Set a meta value inside a transaction unless it exists; return the stored value."""
        cur.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
        row = cur.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0])

    # -- tokens and clients ------------------------------------------------------------
    def add_token_hashes(self, hashes: list[str]) -> None:
        """Store new one-time token hashes."""
        now = time.time()
        with self.transaction() as cur:
            cur.executemany(
                "INSERT INTO tokens(token_hash, created_at) VALUES (?, ?)",
                [(h, now) for h in hashes],
            )

    def enroll(
        self, token_hash: str, client_id: str, public_key: str, certificate: str | None = None
    ) -> str:
        """Consume a token and register a client (and its consortium certificate), atomically.

        Returns
        -------
        str
            ``"ok"``, ``"bad_token"`` (unknown or used), ``"client_exists"`` or ``"key_exists"``.
        """
        now = time.time()
        with self.transaction() as cur:
            row = cur.execute(
                "SELECT used_by FROM tokens WHERE token_hash=?", (token_hash,)
            ).fetchone()
            if row is None or row[0] is not None:
                return "bad_token"
            if cur.execute("SELECT 1 FROM clients WHERE client_id=?", (client_id,)).fetchone():
                return "client_exists"
            if cur.execute("SELECT 1 FROM clients WHERE public_key=?", (public_key,)).fetchone():
                return "key_exists"
            cur.execute(
                "UPDATE tokens SET used_by=?, used_at=? WHERE token_hash=?",
                (client_id, now, token_hash),
            )
            cur.execute(
                "INSERT INTO clients(client_id, public_key, enrolled_at) VALUES (?, ?, ?)",
                (client_id, public_key, now),
            )
            if certificate is not None:
                cur.execute(
                    "INSERT OR REPLACE INTO certificates(client_id, certificate) VALUES (?, ?)",
                    (client_id, certificate),
                )
            Store.bump_commits(cur)
        return "ok"

    def certificates(self) -> dict[str, str]:
        """Return ``{client_id: certificate JSON}`` of the clients that presented one."""
        with self._lock:
            rows = self._db.execute("SELECT client_id, certificate FROM certificates").fetchall()
        return {str(c): str(k) for c, k in rows}

    def clients(self) -> dict[str, str]:
        """Return ``{client_id: base64 public key}``."""
        with self._lock:
            rows = self._db.execute("SELECT client_id, public_key FROM clients").fetchall()
        return {str(c): str(k) for c, k in rows}

    def revoke_client(self, client_id: str, reason: str) -> None:
        """Record that ``client_id``'s key is no longer accepted (a job-level commit)."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT OR IGNORE INTO revoked_clients(client_id, revoked_at, reason) "
                "VALUES (?, ?, ?)",
                (client_id, time.time(), reason),
            )
            Store.bump_commits(cur)

    def revoked(self) -> dict[str, str]:
        """Return ``{client_id: reason}`` of the revoked sites."""
        with self._lock:
            rows = self._db.execute("SELECT client_id, reason FROM revoked_clients").fetchall()
        return {str(c): str(r) for c, r in rows}

    def count_tokens(self) -> tuple[int, int]:
        """Return ``(unused, used)`` token counts."""
        with self._lock:
            rows = self._db.execute(
                "SELECT used_by IS NULL, COUNT(*) FROM tokens GROUP BY used_by IS NULL"
            ).fetchall()
        counts = {bool(a): int(b) for a, b in rows}
        return counts.get(True, 0), counts.get(False, 0)

    # -- nonces ------------------------------------------------------------------------
    def nonce_seen(self, nonce: str) -> bool:
        """Whether a nonce was recorded with an accepted request."""
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM nonces WHERE nonce=?", (nonce,)).fetchone()
                is not None
            )

    # -- models ------------------------------------------------------------------------
    @staticmethod
    def add_model(cur: Tx, sha256: str, path: str, round_id: int | None) -> None:
        """Register a model version inside a transaction (idempotent)."""
        cur.execute(
            "INSERT OR IGNORE INTO models(sha256, path, round, created_at) VALUES (?, ?, ?, ?)",
            (sha256, path, round_id, time.time()),
        )
        # A model written again after retention pruned it is live again: the start-up
        # sweep must not delete it.
        cur.execute("DELETE FROM pruned_blobs WHERE path=?", (path,))
        cur.execute("UPDATE models SET pruned = 0 WHERE sha256=? AND pruned = 1", (sha256,))

    def model_path(self, sha256: str) -> str | None:
        """Relative path of a registered model version, or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT path FROM models WHERE sha256=?", (sha256,)).fetchone()
        return None if row is None else str(row[0])

    # -- rounds ------------------------------------------------------------------------
    @staticmethod
    def _round(row: tuple[Any, ...]) -> RoundRow:
        return RoundRow(
            round=int(row[0]),
            status=str(row[1]),
            stage=str(row[2]),
            deadline=float(row[3]),
            cohort=tuple(json.loads(row[4])),
            seed=int(row[5]),
            base_model=str(row[6]),
            new_model=row[7],
            started_at=float(row[8]),
            ended_at=row[9],
            metrics=None if row[10] is None else json.loads(row[10]),
            reason=row[11],
        )

    _ROUND_COLS = (
        "round, status, stage, deadline, cohort, seed, base_model, new_model, "
        "started_at, ended_at, metrics, reason"
    )

    def rounds(self) -> list[RoundRow]:
        """All rounds, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round"  # noqa: S608
            ).fetchall()
        return [self._round(r) for r in rows]

    def get_round(self, round_id: int) -> RoundRow | None:
        """One round or ``None``."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._ROUND_COLS} FROM rounds WHERE round=?",  # noqa: S608
                (round_id,),
            ).fetchone()
        return None if row is None else self._round(row)

    @staticmethod
    def insert_round(cur: Tx, r: RoundRow) -> None:
        """Insert a new open round inside a transaction."""
        Store.bump_commits(cur)
        cur.execute(
            "INSERT INTO rounds(round, status, stage, deadline, cohort, seed, base_model, "
            "started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.round,
                r.status,
                r.stage,
                r.deadline,
                json.dumps(list(r.cohort)),
                r.seed,
                r.base_model,
                r.started_at,
            ),
        )

    @staticmethod
    def advance_round(
        cur: Tx, round_id: int, from_stage: str, stage: str, deadline: float, new_model: str | None
    ) -> None:
        """Move an open round from ``from_stage`` to ``stage`` (guarded: at most once)."""
        cur.execute(
            "UPDATE rounds SET new_model=?, stage=?, deadline=? "
            "WHERE round=? AND status='open' AND stage=?",
            (new_model, stage, deadline, round_id, from_stage),
        )

    @staticmethod
    def set_round_deadline(cur: Tx, round_id: int, stage: str, deadline: float) -> None:
        """Re-open the open round's current stage until ``deadline``."""
        cur.execute(
            "UPDATE rounds SET deadline=? WHERE round=? AND status='open' AND stage=?",
            (deadline, round_id, stage),
        )

    @staticmethod
    def commit_round(
        cur: Tx, round_id: int, stage: str, metrics: dict[str, Any], ended_at: float
    ) -> int | None:
        """Mark an open round committed; return the committed count (``None``: not open)."""
        changed = cur.execute(
            "UPDATE rounds SET status='committed', metrics=?, ended_at=? "
            "WHERE round=? AND status='open' AND stage=?",
            (json.dumps(metrics), ended_at, round_id, stage),
        ).rowcount
        if changed != 1:
            return None
        Store.bump_commits(cur)
        # A counter kept in this transaction: O(1), not a count of the job's history.
        cur.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='committed_rounds'"
        )
        row = cur.execute("SELECT value FROM meta WHERE key='committed_rounds'").fetchone()
        return int(row[0])

    @staticmethod
    def abort_round(cur: Tx, round_id: int, ended_at: float, reason: str) -> None:
        """Mark an open round aborted with its reason."""
        Store.bump_commits(cur)
        cur.execute(
            "UPDATE rounds SET status='aborted', ended_at=?, reason=? "
            "WHERE round=? AND status='open'",
            (ended_at, reason, round_id),
        )

    # -- strategy state ----------------------------------------------------------------
    @staticmethod
    def save_strategy_state(cur: Tx, round_id: int, state: dict[str, Any]) -> None:
        """Store the strategy state that comes with ``round_id``'s new model."""
        cur.execute(
            "INSERT OR REPLACE INTO strategy_states(round, state) VALUES (?, ?)",
            (round_id, json.dumps(state, sort_keys=True)),
        )

    def committed_strategy_state(self) -> dict[str, Any] | None:
        """Return the strategy state of the last committed round (``None`` before one)."""
        with self._lock:
            row = self._db.execute(
                # Ordered by the committed-rounds index, newest first: the first committed
                # round with a state ends the walk (ordering by s.round sorted them all).
                "SELECT s.state FROM strategy_states s JOIN rounds r ON r.round = s.round "
                "WHERE r.status='committed' ORDER BY r.round DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        state: dict[str, Any] = json.loads(row[0])
        return state

    # -- privacy -----------------------------------------------------------------------
    @staticmethod
    def insert_privacy_round(cur: Tx, row: PrivacyRow, accountant_state: dict[str, Any]) -> None:
        """Record a round's release (idempotent) and the accountant's state, in ``cur``."""
        cur.execute(
            "INSERT OR IGNORE INTO privacy_rounds(round, mode, events, epsilon_round, epsilon, "
            "epsilon_rdp, method, delta, recorded_at_stage) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.round,
                row.mode,
                json.dumps(row.events),
                row.epsilon_round,
                row.epsilon,
                row.epsilon_rdp,
                row.method,
                row.delta,
                row.recorded_at_stage,
            ),
        )
        Store.set_meta(cur, "privacy_accountant", json.dumps(accountant_state))

    def privacy_rounds(self) -> list[PrivacyRow]:
        """Every recorded privacy release, oldest round first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT round, mode, events, epsilon_round, epsilon, epsilon_rdp, method, delta, "
                "recorded_at_stage FROM privacy_rounds ORDER BY round"
            ).fetchall()
        return [self._privacy(r) for r in rows]

    @staticmethod
    def _privacy(r: tuple[Any, ...]) -> PrivacyRow:
        return PrivacyRow(
            round=int(r[0]),
            mode=str(r[1]),
            events=json.loads(r[2]),
            epsilon_round=float(r[3]),
            epsilon=float(r[4]),
            epsilon_rdp=float(r[5]),
            method=str(r[6]),
            delta=float(r[7]),
            recorded_at_stage=str(r[8]),
        )

    @staticmethod
    def save_privacy_intent(cur: Tx, intent: dict[str, Any]) -> None:
        """Write the pending privacy intent (one at a time; a job-level commit), in ``cur``.

        Counted in the commit counter, so a database that lost it (a deleted write-ahead
        log) is refused at start rather than forgetting a release that may have happened.
        """
        Store.bump_commits(cur)
        Store.set_meta(cur, "privacy_intent", json.dumps(intent, sort_keys=True))

    @staticmethod
    def clear_privacy_intent(cur: Tx) -> None:
        """Remove the pending privacy intent (it was charged or nothing was released)."""
        cur.execute("DELETE FROM meta WHERE key='privacy_intent'")

    def privacy_intent(self) -> dict[str, Any] | None:
        """Return the pending privacy intent, or ``None``."""
        raw = self.get_meta("privacy_intent")
        if raw is None:
            return None
        intent: dict[str, Any] = json.loads(raw)
        return intent

    def privacy_round(self, round_id: int) -> PrivacyRow | None:
        """Return one round's recorded privacy release, or ``None`` (not charged)."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, mode, events, epsilon_round, epsilon, epsilon_rdp, method, delta, "
                "recorded_at_stage FROM privacy_rounds WHERE round=?",
                (round_id,),
            ).fetchone()
        return None if row is None else self._privacy(row)

    @staticmethod
    def save_ddg(cur: Tx, round_id: int, params: dict[str, Any], rotation_seed: bytes) -> None:
        """Store a distributed round's DDG parameters and public rotation seed, in ``cur``."""
        cur.execute(
            "INSERT OR REPLACE INTO ddg_rounds(round, params, rotation_seed) VALUES (?, ?, ?)",
            (round_id, json.dumps(params), rotation_seed.hex()),
        )

    def load_ddg(self, round_id: int) -> tuple[dict[str, Any], bytes] | None:
        """Return a round's stored DDG parameters (a dict) and rotation seed, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT params, rotation_seed FROM ddg_rounds WHERE round=?", (round_id,)
            ).fetchone()
        if row is None:
            return None
        params: dict[str, Any] = json.loads(row[0])
        return params, bytes.fromhex(row[1])

    # -- secure aggregation ------------------------------------------------------------
    @staticmethod
    def save_secagg_state(cur: Tx, round_id: int, state: str, summary: str | None) -> None:
        """Write a round's SecAgg+ snapshot (and, once known, its public summary), in ``cur``.

        ``state`` and ``summary`` are JSON text, serialised by the caller before the
        transaction (a snapshot holds every masked vector: not work to do under the lock).
        """
        cur.execute(
            "INSERT INTO secagg_state(round, state, result) VALUES (?, ?, ?) "
            "ON CONFLICT(round) DO UPDATE SET state=excluded.state, "
            "result=COALESCE(excluded.result, secagg_state.result)",
            (round_id, state, summary),
        )

    def secagg_state(self, round_id: int) -> dict[str, Any] | None:
        """Return a round's last SecAgg+ snapshot, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM secagg_state WHERE round=?", (round_id,)
            ).fetchone()
        if row is None:
            return None
        state: dict[str, Any] = json.loads(row[0])
        return state

    def secagg_summary(self, round_id: int) -> dict[str, Any] | None:
        """Return the public summary of a finished secure round, or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM secagg_state WHERE round=?", (round_id,)
            ).fetchone()
        if row is None or row[0] is None:
            return None
        doc: dict[str, Any] = json.loads(row[0])
        return doc

    def prune_secagg_states(self, last: int) -> int:
        """Delete the SecAgg+ rows of the closed rounds up to ``last``; return how many.

        A closed (committed or aborted) round's snapshot holds every masked vector and is
        never read again: only the open round's is recovered at start, and its summary
        went into the round's metrics and ledger entry in the commit transaction. One
        transaction, so a kill leaves all of them or none (the start-up sweep catches up).
        Driven by the few ``secagg_state`` rows (a primary-key lookup into ``rounds``
        each), never a scan of the job's rounds; with nothing to delete, no write.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM secagg_state WHERE round <= ? AND EXISTS (SELECT 1 FROM rounds r "
                "WHERE r.round = secagg_state.round AND r.status IN ('committed', 'aborted')) "
                "LIMIT 1",
                (last,),
            )
            if row.fetchone() is None:
                return 0
        with self.transaction() as cur:
            cur.execute(
                "DELETE FROM secagg_state WHERE round <= ? AND EXISTS (SELECT 1 FROM rounds r "
                "WHERE r.round = secagg_state.round AND r.status IN ('committed', 'aborted'))",
                (last,),
            )
            return int(cur.rowcount)

    def count_secagg_states(self) -> int:
        """Rows in ``secagg_state`` (the open round's, plus any a stopped prune left)."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM secagg_state").fetchone()
        return int(row[0])

    # -- submissions -------------------------------------------------------------------
    def get_submission(self, round_id: int, stage: str, client_id: str) -> SubmissionRow | None:
        """One accepted submission or ``None``."""
        with self._lock:
            row = self._db.execute(
                "SELECT round, stage, client_id, sha256, num_examples, blob, payload, receipt "
                "FROM submissions WHERE round=? AND stage=? AND client_id=?",
                (round_id, stage, client_id),
            ).fetchone()
        return None if row is None else self._submission(row)

    @staticmethod
    def _submission(row: tuple[Any, ...]) -> SubmissionRow:
        return SubmissionRow(
            round=int(row[0]),
            stage=str(row[1]),
            client_id=str(row[2]),
            sha256=str(row[3]),
            num_examples=int(row[4]),
            blob=row[5],
            payload=None if row[6] is None else json.loads(row[6]),
            receipt=json.loads(row[7]),
        )

    def last_accepted_at(self, round_id: int, stage: str) -> float | None:
        """Return when the stage's latest submission was accepted (``None`` if none was)."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(accepted_at) FROM submissions WHERE round=? AND stage=?",
                (round_id, stage),
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def submissions(self, round_id: int, stage: str) -> list[SubmissionRow]:
        """Return the accepted submissions of a stage, sorted by client id (aggregation order)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT round, stage, client_id, sha256, num_examples, blob, payload, receipt "
                "FROM submissions WHERE round=? AND stage=? ORDER BY client_id",
                (round_id, stage),
            ).fetchall()
        return [self._submission(r) for r in rows]

    def delete_submissions(self, round_id: int, stage: str) -> None:
        """Forget a stage's accepted submissions (secure unmask answers after a restart)."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM submissions WHERE round=? AND stage=?", (round_id, stage))

    def count_submissions(self) -> int:
        """Total accepted submissions (tests check that rejected requests change nothing)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM submissions").fetchone()[0])

    def insert_submission(self, s: SubmissionRow, nonce: str, accepted_at: float) -> None:
        """Durably record an accepted submission and its request nonce (one transaction)."""
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO submissions(round, stage, client_id, sha256, num_examples, blob, "
                "payload, receipt, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    s.round,
                    s.stage,
                    s.client_id,
                    s.sha256,
                    s.num_examples,
                    s.blob,
                    None if s.payload is None else json.dumps(s.payload),
                    json.dumps(s.receipt),
                    accepted_at,
                ),
            )
            cur.execute(
                "INSERT OR IGNORE INTO nonces(nonce, client_id, ts) VALUES (?, ?, ?)",
                (nonce, s.client_id, accepted_at),
            )

    # -- contribution ledger (confide_server.ledger) -----------------------------------
    @staticmethod
    def last_ledger_hash(cur: Tx) -> str | None:
        """Return the newest ledger entry's hash, read inside the committing transaction."""
        row = cur.execute("SELECT entry_hash FROM ledger ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def insert_ledger(cur: Tx, round_id: int, line: dict[str, Any]) -> None:
        """Store one signed ledger entry (``{"entry", "entry_hash", "signature"}``)."""
        cur.execute(
            "INSERT INTO ledger(round, entry, entry_hash, signature) VALUES (?, ?, ?, ?)",
            (round_id, json.dumps(line["entry"]), line["entry_hash"], line["signature"]),
        )

    def ledger(self) -> list[dict[str, Any]]:
        """Every ledger entry, oldest round first, in its stored form."""
        with self._lock:
            rows = self._db.execute(
                "SELECT entry, entry_hash, signature FROM ledger ORDER BY round"
            ).fetchall()
        return [
            {"entry": json.loads(r[0]), "entry_hash": str(r[1]), "signature": str(r[2])}
            for r in rows
        ]

    # -- pagination and retention (confide_server.engine.retention) --------------------
    def last_round(self) -> RoundRow | None:
        """Return the newest round (``None`` before the first): one row, not the history."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY round DESC LIMIT 1"  # noqa: S608
            ).fetchone()
        return None if row is None else self._round(row)

    def rounds_page(
        self, limit: int, before: int | None = None
    ) -> tuple[list[RoundRow], int | None]:
        """Up to ``limit`` rounds older than ``before`` (all when ``None``), oldest first.

        Returns the rows and the cursor of the next (older) page: the oldest round id on
        this page when older rounds exist, else ``None``.
        """
        bound = (1 << 62) if before is None else before
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._ROUND_COLS} FROM rounds WHERE round < ? "  # noqa: S608
                "ORDER BY round DESC LIMIT ?",
                (bound, limit + 1),
            ).fetchall()
        more = len(rows) > limit
        page = [self._round(r) for r in reversed(rows[:limit])]
        return page, (page[0].round if more and page else None)

    def rounds_since(self, first: int) -> list[RoundRow]:
        """Return the rounds with an id ``>= first``, oldest first (new metrics rows)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._ROUND_COLS} FROM rounds WHERE round >= ? "  # noqa: S608
                "ORDER BY round",
                (first,),
            ).fetchall()
        return [self._round(r) for r in rows]

    def ledger_since(self, first: int) -> list[dict[str, Any]]:
        """Ledger entries of rounds ``>= first``, oldest first, in their stored form."""
        with self._lock:
            rows = self._db.execute(
                "SELECT entry, entry_hash, signature FROM ledger WHERE round >= ? ORDER BY round",
                (first,),
            ).fetchall()
        return [
            {"entry": json.loads(r[0]), "entry_hash": str(r[1]), "signature": str(r[2])}
            for r in rows
        ]

    def round_counts(self) -> dict[str, int]:
        """``{status: number of rounds}`` (one aggregate query)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) FROM rounds GROUP BY status"
            ).fetchall()
        return {str(s): int(n) for s, n in rows}

    def round_total(self) -> int:
        """How many rounds the job has had (open, committed and aborted).

        Round ids are consecutive from 1 (the next is the last one's plus one) and a
        ``rounds`` row is never deleted, so this is the largest id: one index lookup where
        a ``COUNT(*)`` reads every row (the status page's cost would grow with the job).
        """
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()
        return int(row[0])

    def last_closed_at(self) -> float | None:
        """When the latest committed or aborted round ended (``None`` before one)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(ended_at) FROM rounds").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def open_round(self) -> RoundRow | None:
        """Return the open round, or ``None``."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._ROUND_COLS} FROM rounds WHERE status='open' "  # noqa: S608
                "ORDER BY round DESC LIMIT 1"
            ).fetchone()
        return None if row is None else self._round(row)

    def privacy_rounds_in(self, first: int, last: int) -> list[PrivacyRow]:
        """Return the privacy records of rounds ``first..last`` (inclusive), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT round, mode, events, epsilon_round, epsilon, epsilon_rdp, method, delta, "
                "recorded_at_stage FROM privacy_rounds WHERE round BETWEEN ? AND ? ORDER BY round",
                (first, last),
            ).fetchall()
        return [self._privacy(r) for r in rows]

    def max_epsilon(self) -> float:
        """Return the largest cumulative epsilon recorded (0 before any release)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(epsilon) FROM privacy_rounds").fetchone()
        return 0.0 if row is None or row[0] is None else float(row[0])

    def update_blobs_of_closed(self, first: int, last: int) -> list[tuple[int, str]]:
        """``(round, path)`` of the update files of closed rounds ``first..last``.

        Only rounds that are committed or aborted (a committed round's ledger entry is
        written in the same transaction as its status) and only blobs not yet pruned.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT s.round, s.blob FROM submissions s JOIN rounds r ON r.round = s.round "
                "WHERE s.round BETWEEN ? AND ? AND r.status IN ('committed', 'aborted') "
                "AND s.blob IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM pruned_blobs p WHERE p.path = s.blob) "
                "ORDER BY s.round",
                (first, last),
            ).fetchall()
        return [(int(r), str(b)) for r, b in rows]

    def model_rows(self) -> list[tuple[str, str, int | None]]:
        """``(sha256, path, round)`` of every registered, unpruned model, oldest first.

        Reads the partial index ``models_live`` (the unpruned rows only, already in this
        order), never the pruned history: retention calls it after every round.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT sha256, path, round FROM models INDEXED BY models_live "
                "WHERE pruned = 0 ORDER BY COALESCE(round, 0), created_at"
            ).fetchall()
        return [(str(s), str(p), None if r is None else int(r)) for s, p, r in rows]

    def pinned_models(self) -> set[str]:
        """Model hashes the job still reads: never pruned.

        The initial and current models and the open round's base and new model. (The
        ledger keeps every committed model's hash, not its file; a release keeps its own
        copy of the model under ``releases/``.)
        """
        keep: set[str] = set()
        with self._lock:
            for key in ("initial_model", "current_model"):
                row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
                if row is not None:
                    keep.add(str(row[0]))
            for base, new in self._db.execute(  # the partial index rounds_open: no scan
                "SELECT base_model, new_model FROM rounds INDEXED BY rounds_open "
                "WHERE status='open'"
            ).fetchall():
                keep.add(str(base))
                if new is not None:
                    keep.add(str(new))
        return keep

    def mark_pruned(
        self, entries: list[tuple[str, str, int | None, int]], forget: ForgetPlan | None = None
    ) -> tuple[int, int, int]:
        """Record ``(path, kind, round, size)`` as pruned, durably, *before* the files go.

        A kill after this commit and before the unlinks leaves files the start-up sweep
        (:meth:`pruned_paths`) deletes; a kill before it leaves everything as it was.
        ``forget`` (rows of earlier passes whose files are gone) is applied in the same
        transaction. Returns the ``(submissions, pruned_blobs, nonces)`` rows it deleted.
        """
        now = time.time()
        counts = (0, 0, 0)
        floor = self.nonce_floor_ms
        with self.transaction() as cur:
            if forget is not None:
                counts, floor = self._forget(cur, forget)
            cur.executemany(
                "INSERT OR IGNORE INTO pruned_blobs(path, kind, round, size, pruned_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(p, k, r, n, now) for p, k, r, n in entries],
            )
            # The same transaction takes the models out of ``models_live`` (model_rows).
            cur.executemany(
                "UPDATE models SET pruned = 1 WHERE path = ? AND pruned = 0",
                [(p,) for p, k, _, _ in entries if k == "model"],
            )
        self.nonce_floor_ms = floor
        return counts

    def pruned_paths(self) -> list[str]:
        """Every path marked pruned (the start-up sweep deletes any that still exist)."""
        with self._lock:
            rows = self._db.execute("SELECT path FROM pruned_blobs").fetchall()
        return [str(r[0]) for r in rows]

    def pruned_size(self, path: str) -> int | None:
        """Return a pruned blob's size (metrics count it as upload bytes), or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT size FROM pruned_blobs WHERE path=?", (path,)).fetchone()
        return None if row is None else int(row[0])

    def is_pruned(self, path: str) -> bool:
        """Whether ``path`` was pruned by the retention policy.

        A pruned model's ``pruned_blobs`` row is forgotten once its file is gone
        (:meth:`forget_closed`); ``models.pruned`` keeps the answer.
        """
        if self.pruned_size(path) is not None:
            return True
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM models WHERE path=? AND pruned = 1", (path,)
            ).fetchone()
        return row is not None

    # -- bounded bookkeeping of closed rounds (retention.prune_updates) -----------------
    def note_clock_skew(self, skew_s: float) -> float:
        """Record the accepted clock skew this process uses; return the largest ever used.

        Nonces are forgotten by a horizon of twice the *largest* skew any process of the
        job accepted (a request accepted under a larger skew may carry a timestamp that far
        ahead), so lowering ``max_clock_skew_s`` never shortens it. Not a job-level commit.
        """
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='max_clock_skew_s'").fetchone()
        stored = 0.0 if row is None else float(row[0])
        if skew_s <= stored:
            return stored
        with self.transaction() as cur:
            Store.set_meta(cur, "max_clock_skew_s", repr(float(skew_s)))
        return float(skew_s)

    def closed_submissions_before(
        self, ended_before: float, limit: int
    ) -> dict[int, list[tuple[str, str | None, str | None, int | None]]]:
        """Submissions of the oldest closed rounds that ended before ``ended_before``.

        Returns ``{round: [(stage, blob, payload JSON, pruned size of the blob)]}`` for at
        most ``limit`` rounds, oldest first. Walks the rounds from the oldest one that
        still has submission rows and stops at the first one that is still open or ended
        at or after ``ended_before``: rounds run one at a time, so the ones that qualify
        are a prefix of that walk, and its cost is at most ``limit`` rounds, not the
        rounds of the replay window (which had to be read to the end when fewer than
        ``limit`` qualified). After a backward step of the wall clock a round can end
        "before" its predecessor; the walk then stops early and forgets less, never more.
        """
        with self._lock:
            first = self._db.execute("SELECT MIN(round) FROM submissions").fetchone()[0]
            if first is None:
                return {}
            picked: list[int] = []
            walk = self._db.execute(
                "SELECT round, status, ended_at FROM rounds WHERE round >= ? "
                "ORDER BY round LIMIT ?",
                (first, limit),
            ).fetchall()  # read whole: no statement left open across the next query
            for rnd, status, ended in walk:
                if status not in ("committed", "aborted") or ended is None:
                    break
                if float(ended) >= ended_before:
                    break
                picked.append(int(rnd))
            if not picked:
                return {}
            rows = self._db.execute(
                "SELECT s.round, s.stage, s.blob, s.payload, p.size FROM submissions s "
                "LEFT JOIN pruned_blobs p ON p.path = s.blob WHERE s.round BETWEEN ? AND ? "
                "ORDER BY s.round",
                (picked[0], picked[-1]),
            ).fetchall()
        out: dict[int, list[tuple[str, str | None, str | None, int | None]]] = {}
        for rnd, stage, blob, payload, size in rows:
            out.setdefault(int(rnd), []).append(
                (str(stage), blob, payload, None if size is None else int(size))
            )
        return out

    def forget_closed(
        self,
        uploads: dict[int, tuple[int, int]],
        model_paths: list[str],
        nonces_before: float,
        nonce_floor_ms: int,
    ) -> tuple[int, int, int]:
        """Apply a :class:`ForgetPlan` in a transaction of its own; see :meth:`mark_pruned`.

        Returns
        -------
        tuple of int
            ``(submissions, pruned_blobs, nonces)`` rows deleted.
        """
        return self.mark_pruned([], ForgetPlan(uploads, model_paths, nonces_before, nonce_floor_ms))

    def _forget(self, cur: Tx, plan: ForgetPlan) -> tuple[tuple[int, int, int], int]:
        """Delete what ``plan`` names inside ``cur``; return the counts and the new floor."""
        subs = blobs = 0
        for rnd, (updates, size) in sorted(plan.uploads.items()):
            cur.execute(
                "INSERT OR REPLACE INTO round_uploads(round, updates, upload_bytes) "
                "VALUES (?, ?, ?)",
                (rnd, updates, size),
            )
            blobs += cur.execute(
                "DELETE FROM pruned_blobs WHERE path IN (SELECT blob FROM submissions "
                "WHERE round=? AND blob IS NOT NULL)",
                (rnd,),
            ).rowcount
            subs += cur.execute("DELETE FROM submissions WHERE round=?", (rnd,)).rowcount
        for path in plan.model_paths:
            blobs += cur.execute(
                "DELETE FROM pruned_blobs WHERE path=? AND kind='model'", (path,)
            ).rowcount
        nonces = int(cur.execute("DELETE FROM nonces WHERE ts < ?", (plan.nonces_before,)).rowcount)
        floor = self.nonce_floor_ms
        if nonces and plan.nonce_floor_ms > floor:  # covers every nonce deleted here
            floor = int(plan.nonce_floor_ms)
            Store.set_meta(cur, "nonce_floor_ms", str(floor))
        return (subs, blobs, nonces), floor

    def round_upload(self, round_id: int) -> tuple[int, int] | None:
        """Return ``(updates, upload_bytes)`` of a round whose submissions were forgotten."""
        with self._lock:
            row = self._db.execute(
                "SELECT updates, upload_bytes FROM round_uploads WHERE round=?", (round_id,)
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def pruned_model_rows(self) -> list[str]:
        """Paths of the pruned models still listed in ``pruned_blobs`` (files to check)."""
        with self._lock:
            rows = self._db.execute(  # the partial index: the few model rows, not the updates
                "SELECT path FROM pruned_blobs INDEXED BY pruned_models WHERE kind='model'"
            ).fetchall()
        return [str(r[0]) for r in rows]
