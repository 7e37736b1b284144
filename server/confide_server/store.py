"""Durable state: SQLite (WAL, ``synchronous=FULL``) plus content-addressed blob files.

Invariants the round machine relies on:

* a blob (model version or client update) is written to a temporary file, fsynced and renamed
  into place, and its folder fsynced, *before* the SQLite row that refers to it is committed;
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

import json
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

from confide.protocol.manifest import sha256_hex

__all__ = ["BlobStore", "RoundRow", "Store", "SubmissionRow"]

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
    sha256 TEXT PRIMARY KEY, path TEXT NOT NULL, round INTEGER, created_at REAL NOT NULL);
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Files written atomically and durably under a root folder.

    Parameters
    ----------
    root : Path
        Folder for ``models/`` and ``updates/``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "models").mkdir(parents=True, exist_ok=True)
        (root / "updates").mkdir(parents=True, exist_ok=True)

    def write(self, relpath: str, data: bytes) -> Path:
        """Write ``data`` to ``root/relpath`` durably (tmp + fsync + rename + dir fsync).

        Parameters
        ----------
        relpath : str
            Path relative to the root.
        data : bytes
            Content.

        Returns
        -------
        Path
            The final path.
        """
        final = self.root / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    def model_relpath(self, sha256: str) -> str:
        """Relative path of a model version."""
        return f"models/{sha256}.safetensors"

    def write_model(self, data: bytes) -> str:
        """Store a model version under its SHA-256 and return the hash."""
        digest = sha256_hex(data)
        if not (self.root / self.model_relpath(digest)).exists():
            self.write(self.model_relpath(digest), data)
        return digest

    def read(self, relpath: str) -> bytes:
        """Read a stored blob."""
        return (self.root / relpath).read_bytes()


class Store:
    """SQLite-backed job state.

    Parameters
    ----------
    path : Path
        Database file (created with its folder).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (WAL fsynced) when it returns, so acks are durable.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """Run a block in one ``BEGIN IMMEDIATE`` transaction (commit or roll back)."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    # -- meta --------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        """Return a meta value or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def set_meta(cur: sqlite3.Cursor, key: str, value: str) -> None:
        """Set a meta value inside a transaction."""
        cur.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- tokens and clients ------------------------------------------------------------
    def add_token_hashes(self, hashes: list[str]) -> None:
        """Store new one-time token hashes."""
        now = time.time()
        with self.transaction() as cur:
            cur.executemany(
                "INSERT INTO tokens(token_hash, created_at) VALUES (?, ?)",
                [(h, now) for h in hashes],
            )

    def enroll(self, token_hash: str, client_id: str, public_key: str) -> str:
        """Consume a token and register a client, atomically.

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
        return "ok"

    def clients(self) -> dict[str, str]:
        """Return ``{client_id: base64 public key}``."""
        with self._lock:
            rows = self._db.execute("SELECT client_id, public_key FROM clients").fetchall()
        return {str(c): str(k) for c, k in rows}

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
    def add_model(cur: sqlite3.Cursor, sha256: str, path: str, round_id: int | None) -> None:
        """Register a model version inside a transaction (idempotent)."""
        cur.execute(
            "INSERT OR IGNORE INTO models(sha256, path, round, created_at) VALUES (?, ?, ?, ?)",
            (sha256, path, round_id, time.time()),
        )

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
    def insert_round(cur: sqlite3.Cursor, r: RoundRow) -> None:
        """Insert a new open round inside a transaction."""
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
