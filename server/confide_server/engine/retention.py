"""Retention: what a long job deletes from its state folder, and in which order.

A job of thousands of rounds would otherwise keep every client update and every model
version (about 1 GB a round at 1,000 sites x 1 MiB). After each round closes the engine
calls :meth:`Retention.after_close`:

* ``prune_updates``: the update files of the closed round are deleted. The round is
  committed or aborted by then, and a committed round's ledger entry (with the hash of
  every receipt) was written in the same transaction, so receipts still verify against
  the ledger. Once the replay window has passed (:meth:`Retention.horizon_s`), the
  round's submission rows, the nonces of the requests accepted before it and the
  ``pruned_blobs`` rows of files that are gone are forgotten too
  (:meth:`Retention.forget`): the database stops growing with the job's length.
  The SecAgg+ snapshots of closed rounds (``secagg_state`` rows: every masked vector of
  the round) are deleted in the same pass, in one transaction of their own; only the open
  round's snapshot is ever read again (recovery at start).
* ``keep_models = K``: model versions older than the K newest are deleted, except the
  initial and current models and the open round's base and new model
  (:meth:`~confide_server.store.Store.pinned_models`). The ledger keeps every model's
  hash; a release keeps its own copy of the model (``releases/<version>.model``).

Crash safety: a ``secagg_state`` delete is one transaction (all or none). For files, the
paths are first recorded in ``pruned_blobs`` (one committed
transaction), *then* unlinked. A kill before that commit deletes nothing; a kill after it
leaves files :meth:`Retention.sweep` deletes at the next start (it also catches up on
rounds closed while retention was off or before a crash). A file is never deleted while
a committed row could still need it, and nothing the start-up checks read is pruned.

Cost: one indexed query for the closed round's updates, one over the *unpruned* model
rows (the partial index ``models_live``; pruned rows stay in ``models`` with
``pruned = 1`` so a pruned version's download is a 404 that says so), one over the open
round (``rounds_open``), and the unlinks: a round's pruning does not grow with the job's
length (``tests/server/test_retention_scan.py`` counts the SQLite steps each query takes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confide_server.blobs import BlobStore
from confide_server.config import RetentionConfig
from confide_server.metrics import UPDATE_STAGES
from confide_server.store import ForgetPlan, Store

__all__ = ["REPLAY_MARGIN_S", "PruneReport", "Retention"]

#: Added to twice the accepted clock skew: how long after a request was accepted its
#: nonce (and how long after a round closed its submission rows) are kept.
REPLAY_MARGIN_S = 60.0

#: Closed rounds whose submission rows one pass forgets, at most (a backlog, e.g. of a
#: job started before this, drains over a few closes; the start-up sweep drains it all).
FORGET_BATCH = 64

log = logging.getLogger("confide_server")


@dataclass(frozen=True)
class PruneReport:
    """What one pruning pass deleted."""

    updates: int = 0
    models: int = 0
    bytes: int = 0
    secagg_states: int = 0
    forgotten_submissions: int = 0
    forgotten_nonces: int = 0


class Retention:
    """Applies a job's ``[retention]`` policy to its blob store.

    Parameters
    ----------
    config : RetentionConfig
        The policy.
    store : Store
        The job's database (records what is pruned).
    blobs : BlobStore
        The files.
    crash_hook : callable, optional
        Called with ``"prune_start"`` before a pass deletes anything, with
        ``"prune_marked"`` between the commit that records a pass and the unlinks, and
        with ``"prune_unlinked"`` after the unlinks (their ``pruned_blobs`` rows are
        forgotten by the next pass's transaction; the tests kill the pass there).
    max_clock_skew_s : float, default 300
        The server's accepted clock skew (``[server] max_clock_skew_s``): a signed request
        is replayable by its timestamp for at most twice the largest skew the job ever
        accepted, so nonces and closed rounds' submission rows are kept that long (plus
        :data:`REPLAY_MARGIN_S`).
    clock : callable, default time.time
        Unix seconds (the engine's clock: the one that stamps ``accepted_at``).
    """

    def __init__(
        self,
        config: RetentionConfig,
        store: Store,
        blobs: BlobStore,
        *,
        crash_hook: Callable[[str], None] | None = None,
        max_clock_skew_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self._crash = crash_hook or (lambda _point: None)
        self._skew = float(max_clock_skew_s)
        self._skew_noted = False
        self._clock = clock

    def _size(self, relpath: str) -> int:
        try:
            return (self.blobs.root / relpath).stat().st_size
        except OSError:
            return 0

    def _prunable_models(self) -> list[tuple[str, str, int | None]]:
        rows = self.store.model_rows()  # oldest first, unpruned only
        pinned = self.store.pinned_models()
        older = rows[: max(0, len(rows) - self.config.keep_models)]
        return [r for r in older if r[0] not in pinned]

    def after_close(self, round_id: int, *, first: int | None = None) -> PruneReport:
        """Prune after round ``round_id`` closed (updates of rounds ``first..round_id``).

        Parameters
        ----------
        round_id : int
            The round that just committed or aborted.
        first : int, optional
            The oldest round whose updates to look at (default: ``round_id`` only).
        """
        self._crash("prune_start")
        entries: list[tuple[str, str, int | None, int]] = []
        secagg = 0
        if self.config.prune_updates:
            # The SecAgg+ snapshots of closed rounds (their masked vectors) go with them.
            secagg = self.store.prune_secagg_states(round_id)
            lo = round_id if first is None else first
            for rnd, path in self.store.update_blobs_of_closed(lo, round_id):
                entries.append((path, "update", rnd, self._size(path)))
        n_updates = len(entries)
        for _sha, mpath, mrnd in self._prunable_models():
            entries.append((mpath, "model", mrnd, self._size(mpath)))
        # Pruned models of earlier passes still listed (their files unlinked since).
        plan = self._plan(self.store.pruned_model_rows()) if self.config.prune_updates else None
        subs = nonces = 0
        if entries or plan is not None:
            # One transaction: this pass's marks, and what earlier passes' unlinks and the
            # replay window let go (durable first: a kill now leaves files to sweep).
            subs, _, nonces = self.store.mark_pruned(entries, plan)
        if entries:
            self._crash("prune_marked")
            self._unlink([p for p, _, _, _ in entries])
            # Their pruned_blobs rows are forgotten by the next pass (or the next start).
            self._crash("prune_unlinked")
        return PruneReport(
            updates=n_updates,
            models=len(entries) - n_updates,
            bytes=sum(n for _, _, _, n in entries),
            secagg_states=secagg,
            forgotten_submissions=subs,
            forgotten_nonces=nonces,
        )

    def _exists(self, relpath: str) -> bool:
        return (self.blobs.root / relpath).exists()

    def horizon_s(self) -> float:
        """How long nonces and closed rounds' submissions are kept (seconds)."""
        if not self._skew_noted:
            self._skew = self.store.note_clock_skew(self._skew)
            self._skew_noted = True
        return 2.0 * self._skew + REPLAY_MARGIN_S

    def forget(self, model_paths: list[str], *, limit: int = FORGET_BATCH) -> tuple[int, int]:
        """Forget what no reader needs once the replay window has passed (one transaction).

        The same as every pass of :meth:`after_close` does with its marks; here alone
        (the start-up sweep). Returns ``(submission rows, nonces)`` deleted.
        """
        subs, _, nonces = self.store.mark_pruned([], self._plan(model_paths, limit=limit))
        return subs, nonces

    def _plan(self, model_paths: list[str], *, limit: int = FORGET_BATCH) -> ForgetPlan:
        """Decide what to forget now (reads and file checks, before the transaction).

        * nonces accepted more than :meth:`horizon_s` ago: the request they came with is
          refused by its timestamp by then; the store's nonce floor (signed timestamps
          below it are refused on mutating requests) is raised past every deleted one, so
          this holds across restarts and a later change of ``max_clock_skew_s``;
        * the submission rows of closed rounds that ended more than :meth:`horizon_s` ago
          and whose update files are gone: their receipts are in the ledger (by hash), a
          redo within the window still gets its receipt, later a redo is refused as
          ``round_closed`` (409, nothing counted); the per-round update count and upload
          bytes the metrics read stay in ``round_uploads``;
        * the ``pruned_blobs`` rows of those update files and of ``model_paths`` whose
          files are gone (a row stays while its file exists: the start-up sweep needs it).
        """
        now = self._clock()
        horizon = self.horizon_s()
        cutoff = now - horizon
        # Every deleted nonce's request was accepted before ``cutoff`` with a signed
        # timestamp at most ``skew`` ahead: all of them are below the floor.
        floor_ms = int((cutoff + self._skew) * 1000)
        uploads: dict[int, tuple[int, int]] = {}
        for rnd, rows in self.store.closed_submissions_before(cutoff, limit).items():
            if any(b is not None and (n is None or self._exists(b)) for _, b, _, n in rows):
                continue  # an update file not pruned yet (or not unlinked): keep the rows
            updates = sum(1 for stage, _, _, _ in rows if stage in UPDATE_STAGES)
            size = 0
            for _, blob, payload, n in rows:
                if blob is not None:
                    size += n or 0
                elif payload is not None:  # as metrics.round_rows counts it
                    size += len(json.dumps(json.loads(payload)).encode())
            uploads[rnd] = (updates, size)
        models = [p for p in model_paths if not self._exists(p)]
        return ForgetPlan(uploads, models, cutoff, floor_ms)

    def _unlink(self, paths: list[str]) -> int:
        gone = 0
        folders: set[Path] = set()
        for rel in paths:
            path = self.blobs.root / rel
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            gone += 1
            folders.add(path.parent)
        for folder in folders:  # emptied round folders go too (no empty-dir growth)
            if folder != self.blobs.root / "updates" and folder.is_relative_to(
                self.blobs.root / "updates"
            ):
                _remove_empty(folder, self.blobs.root / "updates")
        return gone

    def sweep(self) -> PruneReport:
        """At start: delete files recorded as pruned that a kill left, then catch up.

        Runs before the first round starts (no write is in flight).
        """
        pinned = self.store.pinned_models()
        left = [
            p
            for p in self.store.pruned_paths()
            if (self.blobs.root / p).exists()
            and not (p.startswith("models/") and _sha_of(p) in pinned)
        ]
        swept = self._unlink(left)
        if swept:
            log.info("retention: deleted %d file(s) a stopped prune had left", swept)
        last = self.store.last_round()
        report = PruneReport() if last is None else self.after_close(last.round, first=1)
        subs, nonces = report.forgotten_submissions, report.forgotten_nonces
        if self.config.prune_updates:
            # Drain what a stopped pass (or an older server) left, then the model rows.
            while True:
                more, n = self.forget([])
                subs, nonces = subs + more, nonces + n
                if not more:
                    break
            self.forget(self.store.pruned_model_rows())
        return PruneReport(
            report.updates + swept,
            report.models,
            report.bytes,
            report.secagg_states,
            subs,
            nonces,
        )


def _sha_of(relpath: str) -> str:
    name = relpath.rsplit("/", 1)[-1]
    return name.split(".", 1)[0]


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents up to ``stop`` while they are empty."""
    cur = folder
    while cur != stop and cur.is_relative_to(stop):
        try:
            os.rmdir(cur)
        except OSError:  # not empty (or already gone)
            return
        cur = cur.parent
