"""SecAgg+ as a round mode: one :class:`~confide.secagg.ServerSecAgg` per round, durable.

The round engine (:mod:`confide_server.engine.rounds`) owns the stages, deadlines and submission
rows; this module owns the protocol state of the open secure round:

* at round start :meth:`SecureRound.begin` derives ``k``, ``t`` and the modulus for the
  cohort, announces the enrolled Ed25519 keys in the :class:`~confide.secagg.RoundSetup`
  and writes the first snapshot in the same transaction as the round row;
* every accepted message changes the state (:meth:`SecureRound.receive`) and is written
  durably, before it is acknowledged, as its submission row; each stage close writes a
  snapshot (:meth:`SecureRound.save`) in the same SQLite transaction as the round row's new
  stage, so a restarted server loads the snapshot of the open stage and replays that
  stage's accepted messages (the per-message cost is the message, not the whole state);
* snapshots and rows hold public keys, encrypted shares, masked vectors, the running sum of
  *masked* inputs and the roster, never a secret: the shares clients release in the unmask
  stage live only in memory. A server restarted during unmask has lost them, so the engine
  forgets that stage's answers and asks the survivors again (their answer to the same
  request is identical).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence, Set
from typing import Any, NamedTuple

from confide.errors import ProtocolViolationError
from confide.secagg import AggregateResult, RoundSetup, SecAggParams, ServerSecAgg
from confide_server.config import SecAggConfig
from confide_server.store import Store, Tx

__all__ = ["SECURE_STAGES", "SecureRound", "Snapshot", "secure_upload_limit"]

SECURE_STAGES = ("advertise", "share", "mask", "consistency", "unmask")


class Snapshot(NamedTuple):
    """A serialised SecAgg+ state: the round, its JSON state and public summary (or ``None``)."""

    round: int
    state: str
    summary: str | None


def secure_upload_limit(vector_length: int) -> int:
    """Largest protocol message for a model of ``vector_length`` values, in bytes.

    The masked input is the packed vector (at most 64 bits a value, plus the weight) in
    base64; share uploads and requests are small next to it.
    """
    return (vector_length + 1) * 8 * 4 // 3 + 262144


class SecureRound:
    """The SecAgg+ state of the open round, persisted in the ``secagg_state`` table.

    Parameters
    ----------
    store : Store
        The job's database.
    config : SecAggConfig
        Threat model, quantization and consistency check.
    """

    def __init__(self, store: Store, config: SecAggConfig) -> None:
        self.store = store
        self.config = config
        self.round: int | None = None
        self.server: ServerSecAgg | None = None
        self._outbox: dict[str, dict[str, Any]] = {}
        #: When the open stage last accepted a message (the engine's clock), for the grace close.
        self.last_answer: float | None = None
        #: When the open stage first held enough answers to close (the adaptive grace).
        self.threshold_at: float | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def build_setup(
        self,
        round_id: int,
        cohort: Sequence[str],
        public_keys: Mapping[str, str],
        model_sha256: str,
        vector_length: int,
        params: SecAggParams | None = None,
    ) -> RoundSetup:
        """Return the round's public setup (params derived for ``len(cohort)``).

        Parameters
        ----------
        round_id : int
            The round.
        cohort : sequence of str
            Its members.
        public_keys : mapping
            Enrolled base64 Ed25519 keys by client id.
        model_sha256 : str
            The model clients train from.
        vector_length : int
            Elements a client uploads (the model length, or the DDG ``padded_dim``).
        params : SecAggParams, optional
            Use these instead of deriving them (distributed DP: ring encoding).

        Raises
        ------
        InfeasibleConfigError
            The threat model cannot be met by this cohort.
        """
        return RoundSetup(
            round=round_id,
            cohort=tuple(sorted(cohort)),
            identity_keys=tuple((c, base64.b64decode(public_keys[c])) for c in sorted(cohort)),
            params=self.config.params(len(cohort)) if params is None else params,
            vector_length=vector_length,
            model_sha256=bytes.fromhex(model_sha256),
            consistency_check=self.config.consistency_check,
        )

    def begin(self, setup: RoundSetup) -> Snapshot:
        """Start the protocol for ``setup``; return its first snapshot (write it with :meth:`save`).

        The snapshot is built here, outside any transaction: the caller writes it in the
        same transaction as the round row.
        """
        self.server = ServerSecAgg(setup)
        self.round = setup.round
        self._outbox = {}
        self.last_answer = None
        self.threshold_at = None
        return self.snapshot()

    def recover(self, round_id: int) -> bool:
        """Load the snapshot of ``round_id``; return whether one exists."""
        state = self.store.secagg_state(round_id)
        if state is None:
            return False
        self.server = ServerSecAgg.from_state(state)
        self.round = round_id
        self._outbox = {}
        self.last_answer = None
        self.threshold_at = None
        return True

    def forget(self) -> None:
        """Drop the in-memory state (the round is over)."""
        self.server = None
        self.round = None
        self._outbox = {}
        self.last_answer = None
        self.threshold_at = None

    def snapshot(self, result: AggregateResult | None = None) -> Snapshot:
        """Serialise the protocol state (and the aggregate's public summary), no lock held."""
        srv = self._srv()
        if self.round is None:
            raise RuntimeError("no secure round is open")
        summary = None
        if result is not None:
            p = result.setup.params
            summary = {
                "survivors": list(result.survivors),
                "total_weight": result.total_weight,
                "k": p.k,
                "t": p.t,
                "n": p.n,
                "modulus_bits": p.modulus_bits,
            }
        return Snapshot(
            self.round,
            json.dumps(srv.to_state()),
            None if summary is None else json.dumps(summary),
        )

    @staticmethod
    def save(cur: Tx, snapshot: Snapshot) -> None:
        """Write a snapshot inside ``cur`` (the transaction of the round's transition)."""
        Store.save_secagg_state(cur, snapshot.round, snapshot.state, snapshot.summary)

    def summary(self, round_id: int) -> dict[str, Any] | None:
        """Return the public summary of a finished secure round (survivors, weight, k, t)."""
        return self.store.secagg_summary(round_id)

    def _srv(self) -> ServerSecAgg:
        if self.server is None:
            raise RuntimeError("no secure round is open")
        return self.server

    # -- messages ----------------------------------------------------------------------
    def expected(self) -> frozenset[str]:
        """Clients the open stage waits for."""
        return frozenset() if self.server is None else self.server.expected()

    def enough(self, stage: str, answered: Set[str], min_masked: int = 0) -> bool:
        """Whether ``answered`` lets ``stage`` close without aborting the round.

        What the protocol's close of the stage needs: ``min_survivors`` advertisements,
        share uploads and masked inputs (and ``min_masked``, the job's ``min_clients``, at
        mask), the roster ``quorum`` of consistency signatures, and at unmask ``t`` shares
        of every owner's secrets (:meth:`~confide.secagg.ServerSecAgg.ready`).
        """
        srv = self.server
        if srv is None or srv.stage != stage:
            return False
        p = srv.setup.params
        got = len(srv.expected() & answered)
        if stage == "unmask":
            # Each answer holds at most one share of each secret: fewer than t answers can
            # never be enough, and counting the shares costs O(answers x k) each time.
            return got >= p.t and srv.ready()
        if stage == "consistency":
            return got >= p.quorum
        return got >= max(p.min_survivors, min_masked if stage == "mask" else 0)

    def note_answer(
        self,
        stage: str,
        answered: Set[str],
        now: float,
        min_masked: int = 0,
        *,
        adaptive: bool = False,
    ) -> None:
        """Record that ``stage`` accepted a message at ``now`` (``answered``: with it).

        Keeps the latest answer's time (the grace counts from it) and, with ``adaptive``,
        the first time the stage held enough answers to close (the adaptive grace scales
        with it).
        """
        self.last_answer = now
        if adaptive and self.threshold_at is None and self.enough(stage, answered, min_masked):
            self.threshold_at = now

    def grace_close_at(
        self,
        stage: str,
        answered: Set[str],
        opened_at: float,
        now: float,
        grace_s: float,
        min_masked: int = 0,
        *,
        factor: float = 0.0,
        floor_s: float = 0.0,
    ) -> float | None:
        """When the open stage may close early (the engine's clock), or ``None``: not yet.

        ``None`` until the stage holds enough answers (:meth:`enough`), and always when both
        ``grace_s`` and ``factor`` are 0 (off). Otherwise the stage may close once no answer
        came for the grace window, counted from the stage's latest accepted message (or its
        opening): ``grace_s``, or with ``factor`` > 0 ``max(floor_s, factor x d)``, where ``d``
        is how long the stage took to hold enough answers (capped at ``grace_s`` when that is
        set too). A stage whose threshold was reached before a restart (unknown here) counts
        ``d`` up to ``now``, the first time it is asked: longer, never shorter. A client cut
        this way is a dropout the protocol already tolerates: it is declared dropped at the
        close, as at the deadline.
        """
        if grace_s <= 0 and factor <= 0:
            return None
        if self.threshold_at is None:
            # Enough answers stay enough within a stage (answers accumulate, the stage's
            # expected set is fixed, and a close or restart forgets ``threshold_at``), so
            # once it is known it is not counted again (at unmask: O(answers x k) a tick).
            if not self.enough(stage, answered, min_masked):
                return None
            self.threshold_at = now
        window = grace_s
        if factor > 0:
            adaptive = max(floor_s, factor * max(0.0, self.threshold_at - opened_at))
            window = adaptive if grace_s <= 0 else min(grace_s, adaptive)
        last = opened_at if self.last_answer is None else max(opened_at, self.last_answer)
        return last + window

    def receive(self, stage: str, doc: Mapping[str, Any]) -> None:
        """Feed one client message to the protocol (raises the protocol's errors)."""
        srv = self._srv()
        if stage == "advertise":
            srv.receive_advertisement(doc)
        elif stage == "share":
            srv.receive_share_upload(doc)
        elif stage == "mask":
            srv.receive_masked_input(doc)
        elif stage == "consistency":
            srv.receive_consistency_signature(doc)
        elif stage == "unmask":
            srv.receive_unmask_response(doc)
        else:
            raise ProtocolViolationError(f"not a secure stage: {stage!r}")

    def close(self, stage: str) -> tuple[str, AggregateResult | None]:
        """Close ``stage``; return the protocol's next stage and, after unmask, the sum.

        Raises
        ------
        SecAggAbortError
            Too few clients or shares: the round must be aborted.
        """
        srv = self._srv()
        self._outbox = {}
        self.last_answer = None
        self.threshold_at = None
        if stage == "advertise":
            srv.close_advertise()
        elif stage == "share":
            srv.close_share()
        elif stage == "mask":
            srv.close_mask()
        elif stage == "consistency":
            srv.close_consistency()
        elif stage == "unmask":
            return srv.stage, srv.close_unmask()
        else:
            raise ProtocolViolationError(f"not a secure stage: {stage!r}")
        return srv.stage, None

    def task(self, stage: str, client_id: str) -> dict[str, Any] | None:
        """Return ``stage``'s protocol message for ``client_id`` (JSON), or ``None`` if not asked.

        The message is the payload of the stage's :class:`~confide.protocol.tasks.SecureTask`.
        """
        srv = self.server
        if srv is None or srv.stage != stage or client_id not in srv.expected():
            return None
        if not self._outbox:
            if stage == "advertise":
                setup = srv.setup.to_json()
                self._outbox = {c: setup for c in srv.expected()}
            elif stage == "share":
                bcast = srv.key_broadcast().to_json()
                self._outbox = {c: bcast for c in srv.expected()}
            elif stage == "mask":
                self._outbox = {c: d.to_json() for c, d in srv.share_deliveries().items()}
            elif stage == "consistency":
                req = srv.consistency_request().to_json()
                self._outbox = {c: req for c in srv.expected()}
            else:
                pending = srv.pending_unmask_request()
                if pending is None:
                    return None
                req = pending.to_json()
                self._outbox = {c: req for c in srv.expected()}
        return self._outbox.get(client_id)
