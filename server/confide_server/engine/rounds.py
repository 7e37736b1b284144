"""The round state machine: cohorts, stages with deadlines, quorum, aggregation, recovery.

No aiohttp here: the machine is synchronous, thread-safe and driven by two kinds of calls,
so it is unit-tested directly with a fake clock.

* Client calls: :meth:`RoundEngine.task_for` (what should this client do now),
  :meth:`RoundEngine.check_submission` (cheap pre-check before a body is read),
  :meth:`RoundEngine.prepare` (decode and validate a body; CPU work, no lock) and
  :meth:`RoundEngine.commit_submission` (durable write, then acknowledge).
* Timer calls: :meth:`RoundEngine.tick` starts rounds and closes stages. Only the tick changes
  a round's status or stage, so transitions are serialised.

A round is a sequence of :class:`StageSpec` (for FedAvg: ``train`` with tensors, then
``evaluate`` with JSON metrics; secure aggregation will add its stages to the same list).
A stage closes when every cohort member answered or at its deadline. A closing stage that
needs a quorum (``quorum=True``) and has fewer than ``min_clients`` answers aborts the round;
the next round then starts normally. Every transition is one SQLite transaction guarded by the
row's current status and stage, and blobs are written before the rows that name them, so a
server killed at any instant restarts (:meth:`RoundEngine.initialise`) into a consistent state:
acknowledged submissions are kept, nothing is counted twice, no round is committed twice.
Aggregation is the job's strategy (:mod:`confide.strategies`, ``[strategy] name``): the
engine hands it the accepted updates sorted by client id (or, for secure and client-level DP
rounds, their weighted sum), so the same inputs always give bit-identical model versions;
the state it returns is stored in the transaction that registers the new model.

Slow work never runs under the engine lock (which handlers take on the event loop): the
tick reads a snapshot under the lock, does the accounting, SecAgg+ setup, aggregation and
the durable commit without it, and swaps the new state in under the lock at the end. Only
the tick changes a round's status or stage (``_tick_lock``), so the snapshot stays valid.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import NDArray

from confide.errors import (
    ConfigError,
    FederationError,
    ManifestError,
    WireFormatError,
)
from confide.privacy.client_dp import DDGParams, padded_dim
from confide.privacy.distributed_dpsgd import SampleDDGParams
from confide.protocol.jsonio import loads_bounded
from confide.protocol.manifest import Manifest, decode_tensors, encode_tensors, sha256_hex
from confide.protocol.sharing import (
    round_seed,
    scatter,
    select,
    shared_count,
    shared_indices,
    shared_manifest,
)
from confide.protocol.tasks import (
    EvaluateTask,
    FailedTask,
    FinishedTask,
    PrivacyTask,
    SecureTask,
    Task,
    TrainConfig,
    TrainTask,
    WaitTask,
)
from confide.secagg import (
    AggregateResult,
    InfeasibleConfigError,
    LateSubmissionError,
    SecAggAbortError,
    SecAggError,
    SecAggParams,
)
from confide.strategies import Strategy, StrategyState
from confide.strategies.base import aggregate_stream
from confide.training.trainable import trainable_index, trainable_size
from confide_server.blobs import BlobStore, DamagedBlobError
from confide_server.config import Config
from confide_server.engine import stagelog
from confide_server.engine.privacy import (
    RING_MODES,
    JobPrivacy,
    read_privacy_range,
)
from confide_server.engine.retention import Retention
from confide_server.engine.secure import SECURE_STAGES, SecureRound
from confide_server.engine.stagelog import budget_outcome
from confide_server.ledger import GENESIS, LedgerSigner, entry_fields, sign_entry
from confide_server.metrics import MetricsLog, export_records
from confide_server.store import (
    TRANSIENT_ERRORS,
    PrivacyRow,
    RoundRow,
    Store,
    SubmissionRow,
)

__all__ = [
    "COHORT_GRACE_S",
    "STATUS_PAGE_DEFAULT",
    "STATUS_PAGE_MAX",
    "CrashHook",
    "EnrollmentError",
    "InvalidSubmissionError",
    "Prepared",
    "RoundEngine",
    "RoundError",
    "StageSpec",
    "fedavg_stages",
    "hash_token",
    "new_token",
    "secure_stages",
]

CrashHook = Callable[[str], None]
_CLIENT_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_MAX_METRICS = 32
#: Seconds after a round closed before the next starts with fewer than wait_for_clients
#: (but at least min_clients) of the sites seen since: the survivors' polls arrive first.
COHORT_GRACE_S = 5.0

#: ``GET /v1/status``: rounds on a page by default, and at most (``?limit=``).
STATUS_PAGE_DEFAULT = 50
STATUS_PAGE_MAX = 1000

log = logging.getLogger("confide_server")
#: After a restart an open stage gets back the time it had left, and at least this much
#: (capped by its own deadline) so the sites can reconnect.
RESTART_GRACE_S = 10.0
#: Meta key of the last re-arm of an open stage (``{"round", "stage", "at"}``).
_STAGE_ARMED_KEY = "stage_armed"
_MAX_METRIC_ABS = 1e12  # x 1e9 examples x any cohort stays far below float64's 1.8e308


# The HTTP status of each error (and code) is in the one table,
# confide_server.middlewares.HTTP_STATUS: the engine knows nothing of HTTP.


class _CachedTask(NamedTuple):
    """A secure stage's task, the payload it carries and its encoded JSON body."""

    payload: dict[str, Any]
    task: SecureTask
    body: bytes


class RoundError(FederationError):
    """A submission that does not fit the current round (wrong round/stage, late, duplicate)."""

    code = "wrong_round"


class InvalidSubmissionError(FederationError, ValueError):
    """A submission body that fails validation."""

    code = "invalid_payload"


class EnrollmentError(FederationError):
    """Enrolment refused: bad or used token, taken id or key, bad id (see ``code``)."""

    code = "enrollment_refused"


@dataclass(frozen=True)
class StageSpec:
    """One stage of a round.

    Parameters
    ----------
    name : str
        Stage name, also the last path segment of its upload URL.
    payload : {"tensors", "json", "secagg"}
        What clients upload: safetensors checked against the manifest, JSON metrics, or a
        SecAgg+ protocol message (JSON).
    deadline_s : float
        Seconds the stage stays open at most.
    quorum : bool
        Whether fewer than ``min_clients`` answers abort the round.
    """

    name: str
    payload: Literal["tensors", "json", "secagg"]
    deadline_s: float
    quorum: bool


def fedavg_stages(config: Config) -> tuple[StageSpec, ...]:
    """Stages of a plain FedAvg round: ``train`` (model deltas) then ``evaluate`` (metrics)."""
    return (
        StageSpec("train", "tensors", config.deadlines["train"], quorum=True),
        StageSpec("evaluate", "json", config.deadlines["evaluate"], quorum=False),
    )


def secure_stages(config: Config) -> tuple[StageSpec, ...]:
    """Stages of a SecAgg+ round: the protocol's stages, then ``evaluate``.

    Clients train while the first stages run and upload their masked update in ``mask``;
    the round's quorum is the protocol's threshold ``t`` (checked by the protocol) and, at
    ``mask``, ``min_clients``.
    """
    sa = config.secagg
    names = [s for s in SECURE_STAGES if s != "consistency" or sa.consistency_check]
    return (
        *(StageSpec(n, "secagg", float(getattr(sa, n)), quorum=n == "mask") for n in names),
        StageSpec("evaluate", "json", config.deadlines["evaluate"], quorum=False),
    )


@dataclass(frozen=True)
class Prepared:
    """A validated submission, ready to be written."""

    round_id: int
    stage: str
    client_id: str
    sha256: str
    num_examples: int
    body: bytes | None
    payload: dict[str, Any]


def new_token() -> str:
    """Return a fresh one-time enrolment token (32 random bytes, URL-safe)."""
    # A fixed prefix: a bare token_urlsafe can start with '-', which command lines read as
    # an option (`confide client --token -abc...`).
    return "ct_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Return the hash under which a token is stored (the token itself never is)."""
    return hashlib.sha256(b"confide-enrol-token/1\n" + token.encode()).hexdigest()


def _derive_seed(job_seed: int, round_id: int) -> int:
    digest = hashlib.sha256(f"confide-round-seed/1:{job_seed}:{round_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class RoundEngine:
    """The job's rounds, backed by a :class:`Store` and a :class:`BlobStore`.

    Parameters
    ----------
    config : Config
        The job configuration.
    store : Store
        Database.
    blobs : BlobStore
        Model versions and updates.
    manifest : Manifest
        The model's manifest (every tensor upload is checked against it).
    clock : callable, optional
        Returns Unix time in seconds; tests pass a fake one.
    crash_hook : callable, optional
        Called with a crash-point name at each durable step (fault-injection tests).
    strategy : Strategy, optional
        The aggregation strategy; by default the one ``config.strategy.name`` names.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        blobs: BlobStore,
        manifest: Manifest,
        *,
        clock: Callable[[], float] = time.time,
        crash_hook: CrashHook | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self.manifest = manifest
        self.privacy = JobPrivacy(config.privacy, config.job.rounds, config.strategy.epochs)
        self.strategy = strategy or config.strategy.build()
        if self.secure_aggregation and not self.strategy.secure_compatible:
            raise ConfigError(
                f"strategy {self.strategy.name!r} needs the individual updates; it cannot run "
                "with secure aggregation or client-level DP (choose another strategy)"
            )
        self.status_reason: str | None = None
        self.secure: SecureRound | None = None
        if config.secagg.enabled:
            self.secure = SecureRound(store, config.secagg)
            self.stages = secure_stages(config)
        else:
            self.stages = fedavg_stages(config)
        self._stage_by_name = {s.name: s for s in self.stages}
        self._clock = clock
        self._crash = crash_hook or (lambda _point: None)
        self._lock = threading.RLock()
        self._tick_lock = threading.Lock()
        self._current: RoundRow | None = None
        self._submitted: dict[tuple[int, str], set[str]] = {}
        self._cohort_set: tuple[int, frozenset[str]] = (0, frozenset())
        # The open secure stage's tasks with their JSON bodies, built once: a broadcast
        # stage gives every site the same payload object, so one task and one encoding
        # serve the whole cohort (the advertise task alone holds every member's keys and
        # certificate). Keyed by (round, stage, deadline), then by the payload's id.
        self._secure_tasks: tuple[tuple[int, str, float] | None, dict[int, _CachedTask]] = (
            None,
            {},
        )
        self._closing = False
        # Enrolled keys and last-seen times have their own lock: authentication takes it on
        # the event loop for every request, so it is never held across slow work.
        self._peers_lock = threading.Lock()
        self._last_seen: dict[str, float] = {}
        self._clients: dict[str, str] = {}
        # Consortium certificates by client id (JSON text): relayed, never trusted here.
        self._certs: dict[str, str] = {}
        self._revoked: dict[str, str] = {}  # client_id -> reason (operator revocations)
        self.status = "running"
        self.current_model = ""
        self.completed_rounds = 0
        self._consecutive_aborts = 0
        self._ddg: dict[int, tuple[DDGParams | SampleDDGParams, bytes]] = {}
        # When the last round committed or aborted (None before the first): the next
        # cohort is drawn from the sites seen since.
        self._last_closed: float | None = None
        # The contribution ledger (signed in the commit transaction) and per-round metrics.
        self.ledger = LedgerSigner(config.server.state_dir)
        self.metrics = MetricsLog(config.server.state_dir)
        # What a long job deletes after each round ([retention]; engine/retention.py).
        self.retention = Retention(
            config.retention,
            store,
            blobs,
            crash_hook=self._crash,
            max_clock_skew_s=config.server.max_clock_skew_s,
            clock=clock,
        )

    # -- start-up and recovery ---------------------------------------------------------
    def initialise(self, initial_weights: bytes) -> None:
        """Create the job on first start, or recover it (and its open round) from the store.

        Parameters
        ----------
        initial_weights : bytes
            The configured initial model (safetensors); checked against the manifest.

        Raises
        ------
        ConfigError
            The state folder belongs to another job or manifest.
        """
        vector, _ = decode_tensors(self.manifest, initial_weights)
        name = self.store.get_meta("job_name")
        if name is None:
            model = encode_tensors(self.manifest, vector)
            sha = self.blobs.write_model(model)
            with self.store.transaction() as cur:
                Store.add_model(cur, sha, self.blobs.model_relpath(sha), None)
                Store.set_meta(cur, "job_name", self.config.job.name)
                Store.set_meta(cur, "manifest_sha256", self.manifest.sha256)
                Store.set_meta(cur, "initial_model", sha)
                Store.set_meta(cur, "current_model", sha)
                Store.set_meta(cur, "status", "running")
                Store.set_meta(cur, "consecutive_aborts", "0")
        elif name != self.config.job.name:
            raise ConfigError(f"state belongs to job {name!r}, not {self.config.job.name!r}")
        elif self.store.get_meta("manifest_sha256") != self.manifest.sha256:
            raise ConfigError("state was created with another manifest")
        self.privacy.open(self.store)
        if self.privacy.mode in RING_MODES:
            # Refuse at start-up what no round could do: both ends of the cohort range.
            job = self.config.job
            for n in sorted({max(job.start_threshold, 2), job.cohort_size}):
                self._secure_params(n)
        self._settle_privacy_intent()
        self._load()
        self._check_current_model()
        self._remove_unregistered_models()
        self.retention.sweep()  # files a killed prune left; rounds closed before a crash
        _ = self.ledger.key  # a bad server key stops the start, not a commit
        self._export_records()

    def _remove_unregistered_models(self) -> None:
        """Delete model files no committed row names (at start, when no write is in flight).

        Blobs are written before the rows that name them, so a model written by a close
        that was then killed (or whose transaction failed) is left unregistered. In central
        DP each such file is a separate noise draw of the round's aggregate; only the one
        the round's transaction registered may exist.
        """
        for sha in self.blobs.model_files():
            if self.store.model_path(sha) is None:
                self.blobs.remove_model(sha)
        self.blobs.remove_temporaries()

    def _register_or_discard(self, sha: str, commit: Callable[[], None]) -> None:
        """Run the transaction ``commit`` that registers model ``sha``; on failure delete it.

        The round timer retries a failed close, and a central-DP retry draws new noise: the
        failed draw must not stay on disk. A file the store does name (the commit went
        through after all, or the model is older) is kept.
        """
        try:
            commit()
        except BaseException:
            with contextlib.suppress(Exception):
                if self.store.model_path(sha) is None:
                    self.blobs.remove_model(sha)
            raise

    def _check_current_model(self) -> None:
        """Refuse to start on a current model whose file is missing or damaged.

        Every round would start from it and fail; better a clear message at start.
        """
        path = self.store.model_path(self.current_model)
        try:
            if path is None:
                raise DamagedBlobError(f"current model {self.current_model} is not registered")
            self.blobs.read_verified(path, self.current_model, "current model")
        except DamagedBlobError as exc:
            raise ConfigError(
                f"cannot start: {exc}. Restore the state folder "
                f"({self.blobs.root}) from a backup, or move it away to start the job anew"
            ) from None

    def _load(self) -> None:
        with self._lock:
            self.status = self.store.get_meta("status") or "running"
            self.status_reason = self.store.get_meta("status_reason")
            self.current_model = self.store.get_meta("current_model") or ""
            self._consecutive_aborts = int(self.store.get_meta("consecutive_aborts") or 0)
            self.completed_rounds = self.store.round_counts().get("committed", 0)
            self._current = self.store.open_round()
            self._last_closed = self.store.last_closed_at()
            self._submitted = {}
            if self._current is not None:
                self._recover_secure(self._current)
            if self._current is not None:
                self._current = self._rearm_after_restart(self._current)
            if self._current is not None:
                for stage in self.stages:
                    subs = self.store.submissions(self._current.round, stage.name)
                    self._submitted[(self._current.round, stage.name)] = {s.client_id for s in subs}
            clients = self.store.clients()
            certs = self.store.certificates()
            with self._peers_lock:
                self._clients = clients
                self._certs = certs
            revoked = self.store.revoked()
            with self._peers_lock:
                self._clients = clients
                self._revoked = revoked

    @property
    def secure_aggregation(self) -> bool:
        """Whether the strategy only ever sees summed updates (SecAgg+ or client-level DP)."""
        return self.config.secagg.enabled or self.privacy.mode in ("central", *RING_MODES)

    @property
    def secure_vector_length(self) -> int:
        """Elements of a masked upload: the model length, or its power-of-two DDG padding."""
        size = self.manifest.size
        if self.privacy.mode == "distributed":
            return padded_dim(size)
        if self.config.sharing.partial:  # partial sharing: only the round's subset is masked
            return shared_count(size, self.config.sharing.fraction)
        return size

    def _secure_params(self, n: int) -> tuple[SecAggParams, DDGParams | SampleDDGParams | None]:
        """SecAgg+ parameters for a cohort of ``n`` (and the noise's in a ring mode).

        In the ring modes (``distributed``: DDG; ``sample_distributed``: distributed DP-SGD)
        the ring is the noise encoding's: ``encoding = "ring"``, ``modulus_bits =
        privacy.ddg_bits`` and ``max_weight = 1`` (every site masks weight 1: uniform
        weights, so the weight element of the sum counts the masked inputs).

        Raises
        ------
        InfeasibleConfigError
            The threat model cannot be met by ``n`` clients.
        ConfigError
            Distributed DP is infeasible for ``n`` clients with this ring.
        """
        params = self.config.secagg.params(n)
        if self.privacy.mode not in RING_MODES:
            return params, None
        ddg: DDGParams | SampleDDGParams
        if self.privacy.mode == "sample_distributed":
            # A trainable subset (spec "trainable"): the step covers only those coordinates.
            ddg = self.privacy.sample_ddg_params(trainable_size(self.manifest), params)
        else:
            ddg = self.privacy.ddg_params(self.manifest.size, params)
        try:
            ring = replace(params, encoding="ring", modulus_bits=ddg.bits, max_weight=1)
        except InfeasibleConfigError as exc:
            raise ConfigError(
                f"privacy.ddg_bits = {ddg.bits} cannot hold a cohort of {n}: {exc}"
            ) from None
        return ring, ddg

    def _round_ddg(self, round_id: int) -> tuple[DDGParams | SampleDDGParams, bytes] | None:
        """Return a ring round's noise parameters and rotation seed (cached)."""
        if self.privacy.mode not in RING_MODES:
            return None
        if round_id not in self._ddg:
            found = self.privacy.load_ddg(round_id)
            if found is None:
                return None
            self._ddg = {round_id: found}
        return self._ddg[round_id]

    def _recover_secure(self, cur: RoundRow) -> None:
        """Reload the open secure round's protocol state after a restart.

        The snapshot taken when the stage opened is loaded and the stage's accepted messages
        are replayed into it, in client order. The unmask answers (released shares) were kept
        in memory only: their rows are forgotten and the stage re-opens for a full deadline,
        so the survivors answer again.
        """
        if self.secure is None or cur.stage not in SECURE_STAGES:
            return
        srv = self.secure.server if self.secure.recover(cur.round) else None
        if srv is None or srv.stage != cur.stage:
            # Never after a crash (snapshot and row are written in one transaction): the
            # round was opened infeasible, or the state was tampered with. Abort it cleanly.
            self._abort(cur, f"secure round {cur.round} has no consistent protocol state")
            return
        if cur.stage != "unmask":
            for sub in self.store.submissions(cur.round, cur.stage):
                if sub.payload is None:
                    raise RoundError(
                        f"stored {cur.stage!r} submission of {sub.client_id!r} in round "
                        f"{cur.round} has no protocol message; the state folder is damaged",
                        "corrupt_state",
                    )
                self.secure.receive(cur.stage, sub.payload["message"])
            # The grace counts from the restart: the sites still to answer were cut off
            # while the server was down (and when the threshold was reached is unknown).
            self.secure.last_answer = self._clock()
        else:
            self.store.delete_submissions(cur.round, "unmask")
            deadline = self._clock() + self._stage_by_name["unmask"].deadline_s
            with self.store.transaction() as db:
                Store.set_round_deadline(db, cur.round, cur.stage, deadline)
            self._current = replace(cur, deadline=deadline)

    def _rearm_after_restart(self, cur: RoundRow) -> RoundRow:
        """Give the open stage back the time it had left when the server went down.

        Deadlines are absolute times, so downtime would eat them: a restart that outlasts
        a stage would close it at once, dropping the sites that had not answered yet (a
        different model, and in sample DP a different epsilon). The latest instant the
        server is known to have been up in this stage is its latest durable step there
        (the stage's opening, its latest accepted answer, or its last re-arm); the stage
        keeps what was left at that instant, counted from now, and at least
        ``min(deadline_s, RESTART_GRACE_S)``. Time the server was up but idle before a
        crash is counted as downtime: a restart can lengthen a stage, never shorten it.
        """
        spec = self._stage_by_name.get(cur.stage)
        if spec is None:
            return cur
        last_up = cur.deadline - spec.deadline_s
        accepted = self.store.last_accepted_at(cur.round, cur.stage)
        if accepted is not None:
            last_up = max(last_up, accepted)
        armed = _parse_armed(self.store.get_meta(_STAGE_ARMED_KEY))
        if armed is not None and armed[:2] == (cur.round, cur.stage):
            last_up = max(last_up, armed[2])
        now = self._clock()
        left = max(cur.deadline - last_up, min(spec.deadline_s, RESTART_GRACE_S))
        deadline = now + left
        if deadline <= cur.deadline:
            return cur
        record = json.dumps({"round": cur.round, "stage": cur.stage, "at": now})
        with self.store.transaction() as db:
            Store.set_round_deadline(db, cur.round, cur.stage, deadline)
            Store.set_meta(db, _STAGE_ARMED_KEY, record)
        return replace(cur, deadline=deadline)

    # -- identity ----------------------------------------------------------------------
    def create_tokens(self, n: int) -> list[str]:
        """Create ``n`` one-time enrolment tokens; only their hashes are stored."""
        if n < 1:
            raise ConfigError(f"n must be >= 1, got {n}")
        tokens = [new_token() for _ in range(n)]
        self.store.add_token_hashes([hash_token(t) for t in tokens])
        return tokens

    def enroll(
        self, token: str, client_id: str, public_key: str, certificate: str | None = None
    ) -> None:
        """Consume ``token`` and register ``client_id`` with its Ed25519 key (and certificate).

        Raises
        ------
        EnrollmentError
            Bad id (422), bad or used token (401), id or key already enrolled (409).
        """
        if not 1 <= len(client_id) <= 64 or not set(client_id) <= _CLIENT_ID_CHARS:
            raise EnrollmentError(
                "client_id must be 1-64 characters from [A-Za-z0-9_.-]", "bad_client_id"
            )
        outcome = self.store.enroll(hash_token(token), client_id, public_key, certificate)
        if outcome == "bad_token":
            raise EnrollmentError("unknown or already used enrolment token", "bad_token")
        if outcome == "client_exists":
            raise EnrollmentError(f"client id {client_id!r} is taken", "client_exists")
        if outcome == "key_exists":
            raise EnrollmentError("this public key is already enrolled", "key_exists")
        with self._peers_lock:
            self._clients[client_id] = public_key
            if certificate is not None:
                self._certs[client_id] = certificate

    def revoked_reason(self, client_id: str) -> str | None:
        """Why the operator revoked ``client_id`` (``None``: not revoked)."""
        with self._peers_lock:
            return self._revoked.get(client_id)

    # -- operator (confide_server.operator) ----------------------------------------------
    def abort_open_round(self, reason: str) -> int | None:
        """Abort the open round now; return its number (``None``: no round is open).

        What an aborted round already released was accounted when it was released; a
        noised aggregate this process computed but has not stored yet (its write-ahead
        intent is pending) is charged now (docs/privacy.md).
        """
        with self._tick_lock:
            with self._lock:
                cur = self._current if self.status == "running" else None
            if cur is None:
                return None
            self._abort(cur, reason)
            return cur.round

    def revoke_client(self, client_id: str, reason: str) -> int | None:
        """Stop accepting ``client_id``'s key; abort the open round if it is in its cohort.

        Returns the aborted round's number (``None``: none was aborted). Raises
        :class:`RoundError` (``unknown_client``) for an id that never enrolled.
        """
        with self._tick_lock:
            with self._peers_lock:
                known = client_id in self._clients or client_id in self._revoked
            if not known:
                raise RoundError(
                    f"no enrolled site {client_id!r}: pass an id from 'confide-server status'",
                    "unknown_client",
                )
            self.store.revoke_client(client_id, reason)
            with self._peers_lock:
                self._last_seen.pop(client_id, None)
                self._revoked.setdefault(client_id, reason)
            with self._lock:
                cur = self._current if self.status == "running" else None
            if cur is None or client_id not in cur.cohort:
                return None
            # Its submissions to this round must not count: the round is aborted.
            self._abort(cur, f"site {client_id!r} was revoked by the operator")
            return cur.round

    def public_key(self, client_id: str) -> str | None:
        """Return the enrolled base64 public key of ``client_id``, or ``None``."""
        with self._peers_lock:
            return self._clients.get(client_id)

    def touch(self, client_id: str) -> None:
        """Mark a client as seen now (it is available for cohort selection)."""
        now = self._clock()
        with self._peers_lock:
            self._last_seen[client_id] = now

    @property
    def idle(self) -> bool:
        """Whether the job runs but no round is open (a round may start).

        Lock-free (two attribute reads): the event loop asks it on every poll, and a stale
        answer only delays or adds one wake-up of the round timer.
        """
        return self.status == "running" and self._current is None

    # -- client-facing -----------------------------------------------------------------
    def task_for(self, client_id: str) -> Task:
        """Return what ``client_id`` should do now.

        Returns
        -------
        Task
            A typed task (:mod:`confide.protocol.tasks`); the handler sends ``to_json()``.
        """
        with self._lock:
            now = self._clock()
            if self.status == "finished":
                return FinishedTask(self.current_model, self.completed_rounds)
            if self.status == "failed":
                return FailedTask(self.status_reason or "too many consecutive aborted rounds")
            cur = self._current
            if cur is None or self._waits(client_id, now):
                return WaitTask(1.0)
            if cur.stage in SECURE_STAGES:
                if self.secure is None:
                    raise RoundError("a secure stage is open without secure-round state")
                payload = self.secure.task(cur.stage, client_id)
                if payload is None:
                    return WaitTask(1.0)
                return self._secure_task(cur, payload).task
            if cur.stage == "train":
                privacy = self._privacy_task()
                return TrainTask(
                    cur.round,
                    cur.deadline,
                    cur.seed,
                    cur.base_model,
                    self._train_config(privacy, cur.round),
                    privacy,
                )
            if cur.new_model is None:
                raise RoundError(f"round {cur.round} evaluates a model it has not written")
            return EvaluateTask(cur.round, cur.deadline, cur.seed, cur.new_model)

    def _secure_task(self, cur: RoundRow, payload: dict[str, Any]) -> _CachedTask:
        """Return the task carrying ``payload`` in the open secure stage, built once (locked)."""
        key = (cur.round, cur.stage, cur.deadline)
        if self._secure_tasks[0] != key:
            self._secure_tasks = (key, {})
        tasks = self._secure_tasks[1]
        hit = tasks.get(id(payload))
        if hit is not None and hit.payload is payload:  # held here, so its id is not reused
            return hit
        if cur.stage != "advertise":
            task = SecureTask(cur.round, cur.stage, cur.deadline, cur.seed, payload)
        else:
            privacy = self._privacy_task(self._round_ddg(cur.round))
            with self._peers_lock:
                certs = {c: _cert_doc(self._certs[c]) for c in cur.cohort if c in self._certs}
            task = SecureTask(
                cur.round,
                cur.stage,
                cur.deadline,
                cur.seed,
                payload,
                model_sha256=cur.base_model,
                config=self._train_config(privacy, cur.round),
                privacy=privacy,
                certificates=certs or None,
            )
        entry = _CachedTask(payload, task, json.dumps(task.to_json()).encode())
        tasks[id(payload)] = entry
        return entry

    def task_body(self, task: Task) -> bytes:
        """Return the JSON body of ``task`` (as ``web.json_response`` writes it).

        A task of the open secure stage was encoded once when it was built; any other
        task is encoded here.
        """
        if isinstance(task, SecureTask):
            hit = self._secure_tasks[1].get(id(task.payload))
            if hit is not None and hit.task is task:
                return hit.body
        return json.dumps(task.to_json()).encode()

    def _waits(self, client_id: str, now: float) -> bool:
        """Whether ``client_id`` has nothing to do in a running job now (engine lock held)."""
        cur = self._current
        if cur is None or self._closing or now >= cur.deadline:
            return True
        if self._cohort_set[0] != cur.round:  # a set per round: cohorts of 1,000 sites
            self._cohort_set = (cur.round, frozenset(cur.cohort))
        return client_id not in self._cohort_set[1] or client_id in self._submitted.get(
            (cur.round, cur.stage), set()
        )

    def round_key(self) -> tuple[str, int | None]:
        """Return the job's status and the open round (``None``: none), without the lock.

        The round timer compares it before and after :meth:`tick`: the same open round
        means a stage change, which only the round's cohort is woken for.
        """
        cur = self._current
        return self.status, None if cur is None else cur.round

    def outside_open_round(self, client_id: str) -> bool:
        """Whether ``client_id`` is outside the open round's cohort (lock-free).

        Such a site's task is a wait at every stage of the round: only a round change (the
        round ends, the job ends) can change it. ``False`` when no round is open, the job
        is not running, or the cohort set is not yet the open round's (unsure: wake it).
        """
        cur = self._current
        if cur is None or self.status != "running":
            return False
        rnd, members = self._cohort_set
        return rnd == cur.round and client_id not in members

    def wait_task_nowait(self, client_id: str) -> WaitTask | None:
        """:meth:`task_for` on the event loop when its answer is a plain wait, else ``None``.

        Never blocks: when the engine lock is held (a durable commit, a stage closing) or
        the answer is anything but a wait, it returns ``None`` and the caller asks
        :meth:`task_for` in a worker thread. Idle long polls are most of a large
        federation's requests (10,000 sites, every state change wakes them all); the
        worker-thread hop of each was a third of the server's time.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self.status != "running" or not self._waits(client_id, self._clock()):
                return None
            return WaitTask(1.0)
        finally:
            self._lock.release()

    def _train_config(self, privacy: PrivacyTask | None, round_id: int) -> TrainConfig:
        dp = privacy.dp if privacy is not None else None
        cfg = self.config.strategy.train_config(self.strategy, dp)
        sharing = self.config.sharing
        if sharing.partial:  # the public selection seed; sites derive the subset from it
            seed = round_seed(self.config.job.name, self.config.job.seed, round_id)
            cfg = replace(cfg, share_fraction=sharing.fraction, share_seed=seed)
        return cfg

    def _upload_manifest(self) -> Manifest:
        """Return the manifest plain uploads are decoded with (the model's or the subset's)."""
        if not self.config.sharing.partial:
            return self.manifest
        return shared_manifest(shared_count(self.manifest.size, self.config.sharing.fraction))

    def _decode_upload(self, body: bytes) -> tuple[NDArray[np.float32], dict[str, str]]:
        """Decode a plain update; under partial sharing, say what a partial upload is."""
        manifest = self._upload_manifest()
        if manifest is self.manifest:
            return decode_tensors(manifest, body)
        try:
            return decode_tensors(manifest, body)
        except ManifestError as exc:
            raise InvalidSubmissionError(
                f"this job shares {manifest.size} of {self.manifest.size} parameters per round "
                f"([sharing] fraction = {self.config.sharing.fraction}): upload the round's "
                f"shared coordinates as one float32 tensor 'shared' of {manifest.size} values "
                f"(confide.client.partial does this); {exc}"
            ) from None

    def _shared_index(self, round_id: int) -> NDArray[np.int64] | None:
        """Return the round's shared parameter indices under partial sharing, else ``None``."""
        sharing = self.config.sharing
        if not sharing.partial:
            return None
        seed = round_seed(self.config.job.name, self.config.job.seed, round_id)
        return shared_indices(seed, self.manifest.size, sharing.fraction)

    def _privacy_task(
        self, ddg: tuple[DDGParams | SampleDDGParams, bytes] | None = None
    ) -> PrivacyTask | None:
        """Return the client-side DP parameters of a training task (``None`` without DP)."""
        return self.privacy.train_task(ddg)

    def _existing_or_check(
        self, client_id: str, round_id: int, stage: str, sha256: str
    ) -> dict[str, Any] | None:
        """Under the lock: the stored receipt for an identical retry, or raise if not open."""
        if stage not in self._stage_by_name:
            raise RoundError(f"unknown stage {stage!r}", "wrong_stage")
        if self.status != "running":
            raise RoundError(f"the job is {self.status}", "job_not_running")
        cur = self._current
        if cur is None or round_id != cur.round:
            row = self.store.get_round(round_id)
            if row is None:
                raise RoundError(f"round {round_id} does not exist", "wrong_round")
            if client_id in row.cohort:
                prior = self.store.get_submission(round_id, stage, client_id)
                if prior is not None and prior.sha256 == sha256:
                    return prior.receipt
                if prior is None and self.store.round_upload(round_id) is not None:
                    raise RoundError(
                        f"round {round_id} is {row.status}; its submissions were forgotten "
                        "by the retention policy ([retention] prune_updates) after the "
                        "replay window: the ledger entry of the round holds the hash of "
                        "every receipt",
                        "round_closed",
                    )
            raise RoundError(f"round {round_id} is {row.status}", "round_closed")
        if client_id not in cur.cohort:
            raise RoundError(
                f"client {client_id!r} is not in round {round_id}'s cohort", "not_in_cohort"
            )
        if client_id in self._submitted.get((round_id, stage), set()):
            prior = self.store.get_submission(round_id, stage, client_id)
            if prior is not None and prior.sha256 == sha256:
                return prior.receipt
            raise RoundError(
                f"client {client_id!r} already submitted to round {round_id} stage {stage!r}",
                "duplicate",
            )
        if stage != cur.stage:
            order = [s.name for s in self.stages]
            if order.index(stage) < order.index(cur.stage):
                raise RoundError(f"stage {stage!r} of round {round_id} is closed", "stage_closed")
            raise RoundError(
                f"round {round_id} is in stage {cur.stage!r}, not {stage!r}", "wrong_stage"
            )
        if self._closing or self._clock() >= cur.deadline:
            raise RoundError(
                f"stage {stage!r} of round {round_id} is closed (late)", "stage_closed"
            )
        return None

    def check_submission(
        self, client_id: str, round_id: int, stage: str, sha256: str
    ) -> dict[str, Any] | None:
        """Cheap check before the body is read.

        Returns
        -------
        dict or None
            The original receipt if this is an identical retry, else ``None`` (go on).

        Raises
        ------
        RoundError
            Wrong round or stage, closed stage, not in the cohort, duplicate.
        """
        with self._lock:
            return self._existing_or_check(client_id, round_id, stage, sha256)

    def stage_payload(self, stage: str) -> str:
        """``"tensors"`` or ``"json"`` for a known stage."""
        spec = self._stage_by_name.get(stage)
        if spec is None:
            raise RoundError(f"unknown stage {stage!r}", "wrong_stage")
        return spec.payload

    def prepare(self, client_id: str, round_id: int, stage: str, body: bytes) -> Prepared:
        """Decode and validate a body (CPU work; call it from a worker thread).

        Raises
        ------
        InvalidSubmissionError, ManifestError, WireFormatError
            The body is malformed or does not match the manifest (422).
        """
        sha = sha256_hex(body)
        kind = self.stage_payload(stage)
        if kind == "secagg":
            msg = _bounded_json(body)
            if not isinstance(msg, dict):
                raise InvalidSubmissionError("expected a SecAgg+ message (a JSON object)")
            if msg.get("client_id") != client_id or msg.get("round") != round_id:
                raise InvalidSubmissionError("the message names another client or round")
            return Prepared(round_id, stage, client_id, sha, 1, None, {"message": msg})
        if kind == "tensors":
            delta, meta = self._decode_upload(body)
            num = _positive_int(meta.get("num_examples"), "num_examples")
            self._check_bounds(delta, num)
            payload: dict[str, Any] = {}
            if "train_loss" in meta:
                payload["train_loss"] = _finite_float(meta["train_loss"], "train_loss")
            return Prepared(round_id, stage, client_id, sha, num, body, payload)
        doc = _bounded_json(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
            raise InvalidSubmissionError('expected {"num_examples": int, "metrics": {...}}')
        num = _positive_int(doc.get("num_examples"), "num_examples")
        metrics = doc["metrics"]
        if len(metrics) > _MAX_METRICS:
            raise InvalidSubmissionError(f"at most {_MAX_METRICS} metrics")
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not 1 <= len(key) <= 64:
                raise InvalidSubmissionError(f"bad metric name {key!r}")
            clean[key] = _finite_float(value, f"metrics.{key}")
        return Prepared(round_id, stage, client_id, sha, num, None, {"metrics": clean})

    def _check_bounds(self, delta: NDArray[np.float32], num_examples: int) -> None:
        """Refuse a plain update outside the job's policy (``max_weight``, ``max_update_norm``).

        Without these, one site's finite but huge delta (3e38 with 1e9 examples) replaces the
        model and overflows the next round's aggregate.
        """
        job = self.config.job
        if num_examples > job.max_weight:
            raise InvalidSubmissionError(
                f"num_examples {num_examples} exceeds job.max_weight = {job.max_weight}",
                "over_max_weight",
            )
        if job.max_update_norm > 0:
            norm = float(np.linalg.norm(delta.astype(np.float64)))
            if not norm <= job.max_update_norm:
                raise InvalidSubmissionError(
                    f"update L2 norm {norm:.6g} exceeds job.max_update_norm = "
                    f"{job.max_update_norm}; clip the update before sending it",
                    "over_max_norm",
                )

    def commit_submission(self, prepared: Prepared, nonce: str) -> dict[str, Any]:
        """Write a prepared submission durably and return its receipt.

        The blob is fsynced before the row; the row and the nonce are one transaction; the
        receipt is returned only after the commit. An identical retry gets the stored receipt.

        Raises
        ------
        RoundError
            The stage closed, or another submission won, in the meantime.
        """
        p = prepared
        if p.stage in SECURE_STAGES:
            return self._commit_secure(p, nonce)
        with self._lock:
            prior = self._existing_or_check(p.client_id, p.round_id, p.stage, p.sha256)
        if prior is not None:
            return prior
        relpath = None
        if p.body is not None:
            relpath = f"updates/r{p.round_id}/{p.stage}/{p.client_id}-{p.sha256[:16]}.safetensors"
            self.blobs.write(relpath, p.body)
        with self._lock:
            prior = self._existing_or_check(p.client_id, p.round_id, p.stage, p.sha256)
            if prior is not None:
                return prior
            receipt = self._record_submission(p, nonce, p.num_examples, relpath, p.payload)
        self._crash("submission_committed")
        return receipt

    def _record_submission(
        self,
        p: Prepared,
        nonce: str,
        num_examples: int,
        relpath: str | None,
        payload: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Write one accepted submission durably and return its receipt (lock held)."""
        now = self._clock()
        receipt = {
            "receipt_id": sha256_hex(f"{p.round_id}|{p.stage}|{p.client_id}|{p.sha256}".encode())[
                :32
            ],
            "round": p.round_id,
            "stage": p.stage,
            "client_id": p.client_id,
            "sha256": p.sha256,
            "num_examples": num_examples,
            "accepted_at": now,
        }
        row = SubmissionRow(
            p.round_id, p.stage, p.client_id, p.sha256, num_examples, relpath, payload, receipt
        )
        self.store.insert_submission(row, nonce, now)
        self._submitted.setdefault((p.round_id, p.stage), set()).add(p.client_id)
        return receipt

    def _commit_secure(self, p: Prepared, nonce: str) -> dict[str, Any]:
        """Feed a protocol message to the secure round, then write it durably.

        The row keeps the message (public keys, encrypted shares, a masked vector), which a
        restart replays on top of the stage's opening snapshot; per-message cost stays
        O(message). Unmask answers (released shares) are never written anywhere.
        """
        if self.secure is None:
            raise RoundError(f"stage {p.stage!r} is a secure stage but the job is not secure")
        with self._lock:
            prior = self._existing_or_check(p.client_id, p.round_id, p.stage, p.sha256)
            if prior is not None:
                return prior
            if p.client_id not in self.secure.expected():
                raise RoundError(
                    f"client {p.client_id!r} is not (or no longer) in round {p.round_id}'s "
                    f"stage {p.stage!r}",
                    "dropped",
                )
            try:
                self.secure.receive(p.stage, p.payload["message"])
            except LateSubmissionError as exc:
                raise RoundError(str(exc), "dropped") from None
            except SecAggError as exc:
                raise InvalidSubmissionError(str(exc), "protocol_violation") from None
            # Unmask answers (released shares) are never written anywhere.
            payload = None if p.stage == "unmask" else p.payload
            receipt = self._record_submission(p, nonce, 0, None, payload)
            self.secure.note_answer(
                p.stage,
                self._submitted.get((p.round_id, p.stage), set()),
                self._clock(),
                self.config.job.min_clients,
                adaptive=self.config.secagg.stage_grace_factor > 0,
            )
        self._crash("submission_committed")
        return receipt

    # -- timer-facing ------------------------------------------------------------------
    def seconds_to_next_event(self) -> float:
        """Seconds until the open stage's deadline or grace close (at most 1 s: starts poll)."""
        with self._lock:
            cur = self._current
            if cur is None or self.status != "running":
                return 1.0
            now = self._clock()
            due = cur.deadline
            grace = self._secure_grace_at(cur, now)
            if grace is not None:
                due = min(due, grace)
            return max(0.0, min(1.0, due - now))

    def tick(self) -> bool:
        """Start a round or close the open stage if it is due.

        Returns
        -------
        bool
            Whether anything changed.
        """
        with self._tick_lock:
            with self._lock:
                if self.status != "running":
                    return False
                now = self._clock()
                cur = self._current
                if cur is None:
                    # A snapshot: enrolment and polls change these while the round starts.
                    with self._peers_lock:
                        # Every poll of an idle job wakes the timer: with 10,000 sites
                        # enrolling, copying and sorting them at each tick held the GIL
                        # most of the time. Too few sites seen at all: no round can start.
                        if self._too_few_seen(now, len(self._last_seen)):
                            return False
                        # Revoked sites are never drawn (their requests get 403).
                        clients = {c: k for c, k in self._clients.items() if c not in self._revoked}
                        last_seen = dict(self._last_seen)
                else:
                    answered = set(self._submitted.get((cur.round, cur.stage), set()))
                    waiting = set(cur.cohort)
                    if self.secure is not None and cur.stage in SECURE_STAGES:
                        waiting = set(self.secure.expected())
                    if (
                        not waiting <= answered
                        and now < cur.deadline
                        and not self._secure_grace_due(cur, answered, now)
                    ):
                        return False
                    self._closing = True
            if cur is None:
                # Outside the engine lock: budget checks, SecAgg+ setup, the durable commit.
                return self._maybe_start(now, clients, last_seen)
            try:
                self._close_stage(cur, sorted(answered))
                self.metrics.stage_closed(cur.round, cur.stage, self._clock())
            except TRANSIENT_ERRORS:
                raise  # transient disk trouble: the timer retries the close
            except Exception as exc:
                # Anything else would fail the same way on every retry (a non-finite
                # aggregate, a damaged blob, a strategy error): abort the round, never wedge.
                self._abort(cur, f"stage {cur.stage!r} could not close: {exc}")
            finally:
                with self._lock:
                    self._closing = False
            return True

    def _too_few_seen(self, now: float, seen: int) -> bool:
        """Whether :meth:`_maybe_start` must refuse with at most ``seen`` available sites.

        ``seen`` bounds the available sites from above (every one has polled), so this is
        :meth:`_maybe_start`'s own refusal, decided without a snapshot of the sites.
        """
        job = self.config.job
        if seen >= job.start_threshold:
            return False
        closed = self._last_closed
        return closed is None or seen < job.min_clients or now - closed < COHORT_GRACE_S

    def _secure_grace_due(self, cur: RoundRow, answered: set[str], now: float) -> bool:
        """Whether an open secure stage may close before its deadline (the grace close)."""
        at = self._secure_grace_at(cur, now, answered)
        return at is not None and now >= at

    def _secure_grace_at(
        self, cur: RoundRow, now: float, answered: set[str] | None = None
    ) -> float | None:
        """When the open secure stage may close early, or ``None`` (engine lock held)."""
        sec = self.config.secagg
        if (
            (sec.stage_grace_s <= 0 and sec.stage_grace_factor <= 0)
            or self.secure is None
            or cur.stage not in SECURE_STAGES
        ):
            return None
        if answered is None:
            answered = self._submitted.get((cur.round, cur.stage), set())
        opened = cur.deadline - self._stage_by_name[cur.stage].deadline_s
        return self.secure.grace_close_at(
            cur.stage,
            answered,
            opened,
            now,
            sec.stage_grace_s,
            self.config.job.min_clients,
            factor=sec.stage_grace_factor,
            floor_s=sec.stage_grace_floor_s,
        )

    def _maybe_start(
        self, now: float, clients: dict[str, str], last_seen: dict[str, float]
    ) -> bool:
        """Start the next round if enough clients are active (tick lock held, engine lock not).

        ``clients`` and ``last_seen`` are snapshots taken under the engine lock; the new
        round becomes visible to handlers only at the end, under the lock.
        """
        job = self.config.job
        window = job.active_window_s
        available = sorted(c for c in clients if now - last_seen.get(c, -math.inf) <= window)
        closed = self._last_closed
        if closed is None:
            if len(available) < job.start_threshold:  # the first round: wait_for_clients
                return False
        else:
            # Later rounds: only sites seen (polled) since the last round closed, so the
            # dead are not drawn again. They start as soon as wait_for_clients such sites
            # are back or, after a short grace for the survivors to poll, with min_clients:
            # a job that lost sites for good goes on with fewer (never stalls).
            available = [c for c in available if last_seen.get(c, -math.inf) >= closed]
            if len(available) < job.start_threshold and (
                len(available) < job.min_clients or now - closed < COHORT_GRACE_S
            ):
                return False
        last = self.store.last_round()  # one row: a round start never reads the history
        round_id = (last.round + 1) if last is not None else 1
        # Ring modes are budget-checked below, with the round's own noise parameters.
        if self.privacy.mode not in RING_MODES and not self.privacy.allows_next_round():
            self._stop_for_budget()
            return True
        if len(available) > job.cohort_size:
            rng = np.random.default_rng([job.seed, round_id])
            pick = rng.choice(len(available), size=job.cohort_size, replace=False)
            cohort = tuple(sorted(available[int(i)] for i in pick))
        else:
            cohort = tuple(available)
        first = self.stages[0]
        row = RoundRow(
            round=round_id,
            status="open",
            stage=first.name,
            deadline=now + first.deadline_s,
            cohort=cohort,
            seed=_derive_seed(job.seed, round_id),
            base_model=self.current_model,
            new_model=None,
            started_at=now,
            ended_at=None,
            metrics=None,
            reason=None,
        )
        setup = None
        infeasible = None
        ddg: DDGParams | SampleDDGParams | None = None
        if self.secure is not None:
            try:
                params, ddg = self._secure_params(len(cohort))
                setup = self.secure.build_setup(
                    round_id,
                    cohort,
                    clients,
                    self.current_model,
                    ddg.padded_dim
                    if isinstance(ddg, DDGParams)
                    else ddg.dim
                    if isinstance(ddg, SampleDDGParams)
                    else self.secure_vector_length,
                    params=params,
                )
            except (InfeasibleConfigError, ConfigError) as exc:
                infeasible = str(exc)
        if self.privacy.mode in RING_MODES:
            if ddg is not None and not self.privacy.allows_next_round(ddg):
                self._stop_for_budget()
                return True
            if ddg is None and not self.privacy.allows_next_round():
                self._stop_for_budget()
                return True
        released: PrivacyRow | None = None
        if self.privacy.mode == "sample":
            # Clients release noised updates as soon as they hold the task: write-ahead.
            released = self.privacy.account(round_id, first.name)
        snapshot = None
        if self.secure is not None and setup is not None:
            snapshot = self.secure.begin(setup)
        with self.store.transaction() as cur:
            Store.insert_round(cur, row)
            if released is not None:
                self.privacy.persist(cur, released)
            if ddg is not None:
                self.privacy.save_ddg(cur, round_id, ddg)
            if snapshot is not None:
                SecureRound.save(cur, snapshot)
        with self._lock:
            self._current = row
            # Only the open round's stages are looked up: earlier rounds' sets go (bounded).
            self._submitted = {(round_id, first.name): set()}
        stagelog.round_opened(round_id, first.name, cohort, first.deadline_s)
        self._crash("round_started")
        if infeasible is not None:
            self._abort(row, f"secure aggregation infeasible for this cohort: {infeasible}")
        return True

    def _close_stage(self, cur: RoundRow, answered: list[str]) -> None:
        if cur.stage in SECURE_STAGES:
            self._close_secure(cur, answered)
            return
        spec = self._stage_by_name[cur.stage]
        if spec.quorum and len(answered) < self.config.job.min_clients:
            self._abort(
                cur,
                f"{len(answered)} of {len(cur.cohort)} answered stage "
                f"{cur.stage!r}; min_clients={self.config.job.min_clients}",
            )
            return
        if cur.stage == "train":
            central = self.privacy.mode == "central"
            if central:
                # Write-ahead: the noise is drawn and written to disk below.
                self.privacy.intend(cur.round, cur.stage)
            new_sha, state = self._aggregate(cur)
            if central:
                self._released_round = cur.round
            self._crash("model_written")
            nxt = self.stages[1]
            released = None
            if central:
                # Charged in the transaction that registers (and so serves) the noised model.
                released = self.privacy.account(cur.round, cur.stage)
            deadline = self._clock() + nxt.deadline_s

            def commit() -> None:
                with self.store.transaction() as db:
                    Store.add_model(db, new_sha, self.blobs.model_relpath(new_sha), cur.round)
                    Store.save_strategy_state(db, cur.round, state)
                    if released is not None:
                        self.privacy.persist(db, released)
                    Store.advance_round(db, cur.round, cur.stage, nxt.name, deadline, new_sha)

            self._register_or_discard(new_sha, commit)
            with self._lock:
                self._current = replace(cur, new_model=new_sha, stage=nxt.name, deadline=deadline)
                self._submitted[(cur.round, nxt.name)] = set()
            stagelog.stage_closed(cur.round, cur.stage, len(answered), len(cur.cohort), nxt.name)
            self._crash("stage_committed")
        else:
            self._commit(cur)

    def _stop_for_budget(self) -> None:
        """End the job: the next round would exceed the privacy budget.

        ``finished`` when only committed rounds spent it; ``failed`` (the server exits
        non-zero) when aborted rounds were charged too (docs/privacy.md, "Aborted rounds").
        """
        status, reason = budget_outcome(self.store, self.config.job.rounds)
        with self.store.transaction() as db:
            Store.set_meta(db, "status", status)
            Store.set_meta(db, "status_reason", reason)
        with self._lock:
            self.status = status
            self.status_reason = reason
        stagelog.job_ended(status, reason)
        self._crash("budget_exhausted")

    #: The round whose noised aggregate this process computed (a SecAgg+ sum unmasked, a
    #: central noise draw written): an abort of that round charges its pending intent.
    _released_round: int | None = None

    def _close_secure(self, cur: RoundRow, answered: list[str]) -> None:
        """Close a SecAgg+ stage; after unmask, commit the weighted mean as the next model."""
        secure = self.secure
        if secure is None:
            raise RoundError(f"stage {cur.stage!r} is a secure stage but the job is not secure")
        spec = self._stage_by_name[cur.stage]
        if spec.quorum and len(answered) < self.config.job.min_clients:
            self._abort(
                cur,
                f"{len(answered)} of {len(cur.cohort)} answered stage "
                f"{cur.stage!r}; min_clients={self.config.job.min_clients}",
            )
            return
        result: AggregateResult | None = None
        new: tuple[str, StrategyState] | None = None
        ddg = self._round_ddg(cur.round)
        # An unmask whose close then failed transiently: the retry finds the shares spent.
        unmasked_before = self._released_round == cur.round
        try:
            if ddg is not None and cur.stage == "unmask":
                # Write-ahead: once unmasked, the noised sum is known to this server.
                self.privacy.intend(cur.round, cur.stage, ddg[0])
            proto_next, result = secure.close(cur.stage)
            if result is not None:
                self._released_round = cur.round
                self._crash("after_unmask")
            new = None if result is None else self._secure_model(cur, result, ddg)
        except Exception as exc:
            unmasked = result is not None or unmasked_before
            if isinstance(exc, TRANSIENT_ERRORS) and not unmasked:
                raise  # nothing unmasked yet: the timer retries the close
            # Anything after the unmask (a non-finite or out-of-range decoded sum, a damaged
            # base model, a strategy error, a disk error) aborts the round; a distributed-DP
            # sum that was unmasked is paid for even if no model comes of it.
            self._abort(
                cur,
                f"secure aggregation aborted at {cur.stage!r}: {exc}",
                ddg=ddg[0] if ddg is not None and unmasked else None,
            )
            return
        new_sha = None if new is None else new[0]
        if new_sha is not None:
            self._crash("model_written")
        order = [s.name for s in self.stages]
        nxt = self.stages[order.index(cur.stage) + 1]
        if result is None and nxt.name != proto_next:
            raise RoundError(
                f"the SecAgg+ protocol moved from {cur.stage!r} to {proto_next!r}, but the "
                f"round's next stage is {nxt.name!r}",
                "stage_mismatch",
            )
        released = None
        if new is not None and ddg is not None:
            # Charged in the transaction that registers the model (its intent was written
            # before the unmask; a restart that finds it pending charges it).
            released = self.privacy.account(cur.round, cur.stage, ddg[0])
        deadline = self._clock() + nxt.deadline_s
        snapshot = secure.snapshot(result)
        with self.store.transaction() as db:
            secure.save(db, snapshot)
            if new is not None:
                Store.add_model(db, new[0], self.blobs.model_relpath(new[0]), cur.round)
                Store.save_strategy_state(db, cur.round, new[1])
                if released is not None:
                    self.privacy.persist(db, released)
            Store.advance_round(db, cur.round, cur.stage, nxt.name, deadline, new_sha)
        with self._lock:
            self._current = replace(cur, new_model=new_sha, stage=nxt.name, deadline=deadline)
            self._submitted[(cur.round, nxt.name)] = set()
            if new_sha is not None:
                secure.forget()
        stagelog.stage_closed(cur.round, cur.stage, len(answered), len(cur.cohort), nxt.name)
        self._crash("stage_committed")

    def _base_model(self, cur: RoundRow) -> NDArray[np.float32]:
        base_path = self.store.model_path(cur.base_model)
        if base_path is None:
            raise ManifestError(f"base model {cur.base_model} is missing from the store")
        data = self.blobs.read_verified(base_path, cur.base_model, "base model")
        base, _ = decode_tensors(self.manifest, data)
        return base

    def _strategy_state(self) -> StrategyState:
        """Return the strategy state of the current model (the initial one before round 1)."""
        state = self.store.committed_strategy_state()
        return self.strategy.initial_state() if state is None else state

    def _write_model(self, cur: RoundRow, new: NDArray[np.float32]) -> str:
        if not np.isfinite(new).all():
            raise ManifestError("aggregate is not finite", code="non_finite")
        blob = encode_tensors(
            self.manifest, new, {"round": str(cur.round), "parent": cur.base_model}
        )
        return self.blobs.write_model(blob)

    def _secure_model(
        self,
        cur: RoundRow,
        result: AggregateResult,
        ddg: tuple[DDGParams | SampleDDGParams, bytes] | None = None,
    ) -> tuple[str, StrategyState]:
        """Write the next model from the unmasked sum; return its SHA-256 and strategy state.

        Without distributed DP the strategy gets the SecAgg+ weighted sum and total weight.
        With it (``ddg``), the ring sum is decoded (:meth:`JobPrivacy.ddg_sum`) and the
        normaliser is the round's cohort size: uniform weights, fixed before any update.
        With distributed DP-SGD (``SampleDDGParams``) the decoded noised gradient sum becomes
        the step ``-learning_rate * g / expected_batch_size``, handed to the strategy as the
        round's (already averaged) update with weight 1: server momentum is post-processing.
        """
        base = self._base_model(cur)
        if ddg is not None and isinstance(ddg[0], SampleDDGParams):
            lr = float(self.config.strategy.learning_rate)
            total = self.privacy.sample_ddg_step(result.total, ddg[0], lr)
            index = trainable_index(self.manifest)
            if index is not None:  # frozen coordinates: a zero update by construction
                full = np.zeros(self.manifest.size, dtype=np.float32)
                full[index] = total
                total = full
            weight = 1.0
        elif ddg is not None and isinstance(ddg[0], DDGParams):
            total = self.privacy.ddg_sum(result.total, ddg[0], ddg[1])
            weight = float(max(1, len(cur.cohort)))
        else:
            if result.total_weight == 0:
                raise SecAggAbortError("zero-weight", "the survivors' weights sum to zero")
            total = result.weighted_sum()
            weight = float(result.total_weight)
        index = self._shared_index(cur.round)
        if index is not None:  # partial sharing: the strategy sees the subset; the rest stays
            sub, state = self.strategy.aggregate_sum(
                select(base, index), total, weight, self._strategy_state()
            )
            return self._write_model(cur, scatter(base, index, sub)), state
        new, state = self.strategy.aggregate_sum(base, total, weight, self._strategy_state())
        return self._write_model(cur, new), state

    def _aggregate(self, cur: RoundRow) -> tuple[str, StrategyState]:
        """Aggregate the accepted deltas; return the new model's SHA-256 and strategy state.

        Plain rounds hand the strategy every delta with its example count, sorted by client
        id. Client-level central DP hands it the noised sum of the clipped deltas
        (:meth:`JobPrivacy.central_sum`, uniform weights) and the cohort size.

        Memory-bounded: the updates are read, verified and decoded one at a time
        (:meth:`_updates`) into a running float64 sum (central DP, and every strategy that
        :func:`~confide.strategies.base.streams`); only strategies that need every update
        (median, trimmed mean) hold the round's N updates at once.
        """
        subs = self.store.submissions(cur.round, cur.stage)  # sorted by client id
        base = self._base_model(cur)
        state = self._strategy_state()
        full = base
        index = self._shared_index(cur.round)
        if index is not None:  # partial sharing: aggregate the subset, keep the rest
            base = select(full, index)
        # An overflow is not an error here: _write_model refuses a non-finite aggregate with a
        # clear reason, and the round is aborted (never committed).
        with np.errstate(over="ignore", invalid="ignore"):
            if self.privacy.mode == "central":
                noised = self.privacy.central_sum(d for d, _ in self._updates(cur, subs))
                cohort = float(max(1, len(cur.cohort)))
                new, state = self.strategy.aggregate_sum(base, noised, cohort, state)
            else:
                new, state = aggregate_stream(self.strategy, base, self._updates(cur, subs), state)
        if index is not None:
            new = scatter(full, index, new)
        return self._write_model(cur, new), state

    def _updates(
        self, cur: RoundRow, subs: Sequence[SubmissionRow]
    ) -> Iterator[tuple[NDArray[np.float32], float]]:
        """Yield each stored update (hash-verified, decoded) with its example count, in order."""
        manifest = self._upload_manifest()
        for s in subs:
            if s.blob is None:
                raise RoundError(
                    f"stored {cur.stage!r} submission of {s.client_id!r} in round {cur.round} "
                    "names no update file; the state folder is damaged",
                    "corrupt_state",
                )
            data = self.blobs.read_verified(s.blob, s.sha256, f"update of {s.client_id!r}")
            yield decode_tensors(manifest, data)[0], float(s.num_examples)

    def _round_metrics(self, cur: RoundRow) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        summary = None if self.secure is None else self.secure.summary(cur.round)
        if summary is not None:
            metrics["train_clients"] = len(summary["survivors"])
            metrics["train_examples"] = summary["total_weight"]
            metrics["secagg"] = {k: summary[k] for k in ("n", "k", "t", "modulus_bits")}
        train = self.store.submissions(cur.round, "train")
        metrics["train_clients"] = len(train)
        metrics["train_examples"] = sum(s.num_examples for s in train)
        losses = [
            (s.num_examples, float(s.payload["train_loss"]))
            for s in train
            if s.payload is not None and "train_loss" in s.payload
        ]
        if train and len(losses) == len(train):
            total_n = sum(n for n, _ in losses)
            metrics["train_loss"] = sum(n * v for n, v in losses) / total_n
        if summary is not None:
            metrics["train_clients"] = len(summary["survivors"])
            metrics["train_examples"] = summary["total_weight"]
        evals = self.store.submissions(cur.round, "evaluate")
        metrics["eval_clients"] = len(evals)
        metrics["eval_examples"] = sum(s.num_examples for s in evals)
        if evals:
            keys = set.intersection(*(set((s.payload or {})["metrics"]) for s in evals))
            total = sum(s.num_examples for s in evals)
            for key in sorted(keys):
                metrics[f"eval_{key}"] = (
                    sum(s.num_examples * (s.payload or {})["metrics"][key] for s in evals) / total
                )
        # Never a NaN/Infinity in the status (not JSON); inputs are bounded, this is a backstop.
        return {k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)}

    def _commit(self, cur: RoundRow) -> None:
        metrics = self._round_metrics(cur)
        metrics.update(self.privacy.round_metrics(cur.round))
        ddg = self._round_ddg(cur.round)
        if ddg is not None and isinstance(ddg[0], SampleDDGParams):
            sp = ddg[0]
            metrics["sample_ddg"] = {
                "honest_shares": sp.honest_shares,
                "bits": sp.bits,
                "gamma": sp.gamma,
                "effective_noise_multiplier": sp.effective_noise_multiplier,
                "worst_case_noise_std": sp.worst_case_noise_std,
                "expected_batch_size": self.config.privacy.expected_batch_size,
            }
        elif ddg is not None and isinstance(ddg[0], DDGParams):
            p = ddg[0]
            metrics["ddg"] = {
                "honest_shares": p.honest_shares,
                "bits": p.bits,
                "gamma": p.gamma,
                "worst_case_noise_std": p.worst_case_noise_std,
                "normaliser": len(cur.cohort),
            }
        self._crash("before_round_commit")
        now = self._clock()
        if cur.new_model is None:
            raise RoundError(f"round {cur.round} has no new model to commit", "no_model")
        summary = None if self.secure is None else self.secure.summary(cur.round)
        entry = entry_fields(
            self.config, self.store, cur, [s.name for s in self.stages], summary, now
        )
        key = self.ledger.key
        with self.store.transaction() as db:
            done = Store.commit_round(db, cur.round, cur.stage, metrics, now)
            if done is None:  # pragma: no cover - guarded by the tick lock
                raise RoundError(f"round {cur.round} was already closed", "round_closed")
            # The ledger entry commits with the round, or neither does.
            prev = Store.last_ledger_hash(db) or GENESIS
            entry.update(model_version=done, prev_entry_hash=prev)
            Store.insert_ledger(db, cur.round, sign_entry(entry, key))
            Store.set_meta(db, "current_model", cur.new_model)
            Store.set_meta(db, "consecutive_aborts", "0")
            status = "finished" if done >= self.config.job.rounds else "running"
            Store.set_meta(db, "status", status)
        with self._lock:
            self.current_model = cur.new_model
            self.completed_rounds = done
            self._consecutive_aborts = 0
            self.status = status
            self._current = None
            self._last_closed = now
        self._export_records()
        self._retain(cur.round)
        stagelog.round_committed(cur.round, cur.stage, metrics)
        if status != "running":
            stagelog.job_ended(status, None)
        self._crash("round_committed")

    def _abort(
        self,
        cur: RoundRow,
        reason: str,
        ddg: DDGParams | SampleDDGParams | None = None,
        *,
        released: PrivacyRow | None = None,
    ) -> None:
        """Abort ``cur``; charge it when its noised aggregate may have been released.

        Charged: with ``ddg`` (a ring round whose sum was unmasked), with ``released`` (a
        pending intent charged at restart), or when this process computed the round's
        noised aggregate and its intent is still pending. The intent is cleared either way.
        """
        aborts = self._consecutive_aborts + 1
        status = "failed" if aborts >= self.config.job.max_consecutive_aborts else "running"
        intent = self.privacy.pending_intent(cur.round)
        if released is None and ddg is not None:
            released = self.privacy.account(cur.round, cur.stage, ddg)
        elif released is None and intent is not None and self._released_round == cur.round:
            released = self.privacy.charge_intent(intent)
        now = self._clock()
        with self.store.transaction() as db:
            Store.abort_round(db, cur.round, now, reason)
            Store.set_meta(db, "consecutive_aborts", str(aborts))
            Store.set_meta(db, "status", status)
            if released is not None:
                self.privacy.persist(db, released)
            elif intent is not None:
                Store.clear_privacy_intent(db)  # this process knows nothing was released
        with self._lock:
            self._consecutive_aborts = aborts
            self.status = status
            self._current = None
            self._last_closed = now
            if self.secure is not None:
                self.secure.forget()
        self._export_records()
        self._retain(cur.round)
        stagelog.round_aborted(cur.round, cur.stage, reason, released is not None)
        if status != "running":
            stagelog.job_ended(status, "too many consecutive aborted rounds")
        self._crash("round_aborted")

    def _settle_privacy_intent(self) -> None:
        """At start: charge a release the previous process may have made (pending intent).

        A pending intent means the server was stopped (SIGKILL, power loss) after it began
        computing a round's noised aggregate and before the transaction that stores it. The
        aggregate may have been computed, written or seen, so the round is charged now with
        the intent's events (conservative), once: a round already charged is not charged
        again. Then:

        * a ring-mode round stopped at its unmask goes on: the unmask is asked again
          (:meth:`_recover_secure`) and the survivors' answers to the same request are the
          same, so its sum is the very same release (the storing transaction finds the round
          charged); if the answers do not come, the round aborts, still charged;
        * any other round (central DP) is aborted: a second close would draw fresh noise,
          a second release of the same updates.
        """
        intent = self.privacy.pending_intent()
        if intent is None:
            return
        round_id = int(intent["round"])
        released = self.privacy.charge_intent(intent)
        row = self.store.get_round(round_id)
        is_open = row is not None and row.status == "open"
        resume = (
            is_open
            and row is not None
            and self.privacy.mode in RING_MODES
            and row.stage == intent["stage"] == "unmask"
        )
        outcome = "asked again" if resume else "aborted" if is_open else "already closed"
        log.warning(
            "privacy: round %d (%s) was stopped between computing its noised aggregate at "
            "stage %r and storing it; the round is %s%s and %s",
            round_id,
            intent["mode"],
            intent["stage"],
            "charged" if released is not None else "already charged",
            "" if released is None else f" (epsilon now {released.epsilon:.6g})",
            outcome,
        )
        if is_open and row is not None and not resume:
            self._consecutive_aborts = int(self.store.get_meta("consecutive_aborts") or 0)
            self._abort(
                row,
                f"the server stopped after starting the {intent['stage']} release of round "
                f"{round_id} and before storing it; charged and aborted (docs/privacy.md)",
                released=released,
            )
            return
        with self.store.transaction() as db:
            if released is not None:
                self.privacy.persist(db, released)
            else:
                Store.clear_privacy_intent(db)

    def _retain(self, round_id: int) -> None:
        """Apply ``[retention]`` after ``round_id`` closed (best effort, never fails it).

        The round is already committed (or aborted); a prune that fails is finished at the
        next start (:meth:`Retention.sweep` catches up on every closed round), and old
        model versions are looked at again after every close.
        """
        try:
            report = self.retention.after_close(round_id)
        except Exception as exc:
            log.warning("retention after round %d: %s: %s", round_id, type(exc).__name__, exc)
            return
        if report.updates or report.models or report.secagg_states:
            log.debug(
                "retention after round %d: %d update(s), %d model(s), %d bytes, %d secagg state(s)",
                round_id,
                report.updates,
                report.models,
                report.bytes,
                report.secagg_states,
            )

    def _export_records(self) -> None:
        """Rewrite ``ledger.jsonl`` and ``metrics/`` from the database (best effort)."""
        export_records(self.store, self.ledger, self.metrics)

    # -- reporting ---------------------------------------------------------------------
    def status_dict(
        self, limit: int = STATUS_PAGE_DEFAULT, before: int | None = None
    ) -> dict[str, Any]:
        """Job status and one page of the round history (JSON-ready).

        Parameters
        ----------
        limit : int, default 50
            Rounds on the page (the newest ones older than ``before``), oldest first.
        before : int, optional
            Only rounds with a smaller id (the previous page's ``next``).

        The answer's ``next`` is the ``before`` of the next (older) page, ``None`` on the
        last. The cost is that of one page, however long the job.
        """
        rounds, nxt = self.store.rounds_page(limit, before)
        first = rounds[0].round if rounds else 0
        last = rounds[-1].round if rounds else -1
        privacy, per_round = read_privacy_range(self.store, first, last)
        total = self.store.round_total()
        with self._peers_lock:
            enrolled = len(self._clients)
        with self._lock:
            return {
                "job": self.config.job.name,
                "status": self.status,
                "reason": self.status_reason,
                "privacy": privacy,
                "rounds_target": self.config.job.rounds,
                "rounds_completed": self.completed_rounds,
                "current_model": self.current_model,
                "manifest_sha256": self.manifest.sha256,
                "enrolled": enrolled,
                "rounds_total": total,
                "rounds": [{**r.to_json(), "privacy": per_round.get(r.round)} for r in rounds],
                "next": nxt,
            }


@functools.lru_cache(maxsize=4096)
def _cert_doc(raw: str) -> Any:
    """Parse a stored certificate once (every advertise task relays the whole cohort's).

    Read-only: the same object goes into every site's task, which only serialises it.
    """
    return json.loads(raw)


def _parse_armed(value: str | None) -> tuple[int, str, float] | None:
    """Decode the ``stage_armed`` meta record (``None`` when absent or unreadable)."""
    if value is None:
        return None
    try:
        doc = json.loads(value)
        return int(doc["round"]), str(doc["stage"]), float(doc["at"])
    except (ValueError, KeyError, TypeError):
        return None


def _bounded_json(body: bytes) -> Any:
    """Decode a JSON body with the one bounded decoder (422 ``malformed_body`` if refused)."""
    try:
        return loads_bounded(body, max_bytes=max(len(body), 1))
    except WireFormatError as exc:
        raise InvalidSubmissionError(exc.message, "malformed_body") from None


def _positive_int(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON 1e309 is inf
        raise InvalidSubmissionError(f"{name} must be a positive integer, got {value!r}") from None
    if isinstance(value, (bool, float)) or not 1 <= n <= 10**9:
        raise InvalidSubmissionError(f"{name} must be an integer in [1, 1e9], got {value!r}")
    return n


def _finite_float(value: Any, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON int of 400 digits
        raise InvalidSubmissionError(f"{name} must be a number, got {value!r:.80}") from None
    # Bounded so that example-weighted sums of them stay finite (status stays valid JSON).
    if isinstance(value, bool) or not abs(f) <= _MAX_METRIC_ABS:
        raise InvalidSubmissionError(
            f"{name} must be a finite number within +-{_MAX_METRIC_ABS:g}, got {value!r:.80}"
        )
    return f
