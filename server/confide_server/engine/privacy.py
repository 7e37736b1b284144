"""The job's differential privacy: ``[privacy]`` config, accountant, budget, central noise.

Modes (``[privacy] mode``):

* ``"none"``: no DP (the default of a bare config).
* ``"sample"``: patient-level DP-SGD on the clients. The server ships a
  :class:`confide.training.DPSGDConfig` with every training task and accounts, per round,
  ``local_steps`` compositions of ``PoissonSampled(q, Gaussian(z))``.
* ``"central"``: client-level DP. Every update is clipped to ``clip_norm`` (by the client and
  again by the server, Rust kernel), the clipped updates are summed with uniform weights,
  the server adds ``N(0, (z C)^2)`` to the sum once and divides by the cohort size. Each round
  is accounted as ``Gaussian(z)`` under add/remove of one site (no amplification by cohort
  selection is claimed).
* ``"distributed"``: client-level DP with the distributed discrete Gaussian (DDG; needs
  ``[secagg] enabled = true``). For every round the server derives the DDG parameters
  (:func:`~confide.privacy.client_dp.calibrate_ddg`) from ``C``, ``z``, ``ddg_bits`` and the
  round's SecAgg+ parameters: the noise is calibrated for the worst case of
  ``h = min_survivors - corrupt`` honest noise shares (``min_survivors = max(t, n - D)``:
  clients refuse to unmask fewer masked inputs; ``corrupt = ceil(adversarial_fraction n)``
  may collude with the server). Clients encode their update with ``ddg_encode`` (clip, public
  rotation, scale, conditional rounding, their noise share) and mask the ring vector with
  weight 1; the server unmasks the ring sum, decodes it and divides by the cohort size. Each
  round is accounted as ``ddg_event`` (zCDP, add/remove one site, no amplification).
* ``"sample_distributed"``: patient-level DP-SGD distributed over the hospitals under
  SecAgg+ (what Dopamine proposed; needs ``[secagg] enabled = true``). One DP-SGD step per
  round: every site Poisson-samples its patients with rate ``q``, sums each sampled patient's
  gradients, clips them to ``C``, clips its site sum to ``site_clip_norm`` and adds its
  share of discrete Gaussian noise in the ring (:mod:`confide.privacy.distributed_dpsgd`),
  calibrated for the worst case of ``h = min_survivors - corrupt`` honest shares; the server
  unmasks the noised sum of clipped gradients, divides it by the public
  ``expected_batch_size`` and takes the step ``-learning_rate * g`` through the strategy
  (server momentum, e.g. ``fedavgm``, is post-processing). Each round is accounted as one
  step of the Poisson-subsampled Gaussian (``q``, the realised noise multiplier) over the
  union of the hospitals' patients: the guarantee of central DP-SGD.

Persistence (:class:`JobPrivacy`): the accountant's header (``meta.privacy_accountant``,
constant size) and one ``privacy_rounds`` row per round (the round's record; a restart
rebuilds the accountant from them) are written in the *same* SQLite transaction as the
round transition that releases the round's noise: the round's start for ``sample`` (clients
upload noised updates as soon as they have the task) and the transaction that stores the
noised aggregate for ``central`` and ``distributed`` (for DDG the noised sum is fixed by the
masked inputs: a server restarted before that transaction unmasks the *same* sum again).

Write-ahead charge (:meth:`JobPrivacy.intend`): just before a round's noised aggregate first
exists (the SecAgg+ unmask of a ring mode, the central noise draw) the round's events are
written as a pending intent (``meta.privacy_intent``) in their own transaction; the storing
transaction replaces it by the charge. A restart that finds it pending charges the round
(:meth:`JobPrivacy.charge_intent`, never twice): a ring round then asks its unmask again
(the same sum), a central round is aborted (a second close would be a fresh noise draw).
So the server's accounting never counts fewer releases than happened.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from confide.errors import ConfigError, InvalidPrivacyConfig
from confide.noise import SecureRng
from confide.privacy.client_dp import (
    DDGParams,
    add_central_noise,
    calibrate_ddg,
    clip_update,
    ddg_config_for,
    ddg_decode,
    rotation_seed,
)
from confide.protocol.tasks import DPSGDConfig, PrivacyTask
from confide_server.store import PrivacyRow, Store, Tx

if TYPE_CHECKING:
    from confide.privacy.accountant import PrivacyAccountant, PrivacyEvent
    from confide.privacy.distributed_dpsgd import SampleDDGParams
    from confide.secagg import SecAggParams

    #: A ring round's noise parameters: client-level DDG or distributed DP-SGD.
    RoundNoise = DDGParams | SampleDDGParams

__all__ = [
    "BUDGET_EXHAUSTED",
    "MODES",
    "RING_MODES",
    "JobPrivacy",
    "PrivacyConfig",
    "parse_privacy",
    "read_privacy",
    "read_privacy_range",
]

log = logging.getLogger("confide_server")

MODES = ("none", "sample", "central", "distributed", "sample_distributed")
#: Modes whose noise is added by the sites inside the secure sum (ring-encoded SecAgg+ inputs).
RING_MODES = ("distributed", "sample_distributed")
BUDGET_EXHAUSTED = "privacy budget exhausted"
#: Format tag of a pending write-ahead charge (``meta.privacy_intent``).
INTENT_FORMAT = "confide-privacy-intent/1"


@dataclass(frozen=True)
class PrivacyConfig:
    """The ``[privacy]`` section of a job config.

    Parameters
    ----------
    mode : {"none", "sample", "central", "distributed"}
        Which guarantee the job gives (see the module docstring).
    delta : float
        The delta epsilon is reported at, in (0, 1).
    epsilon_budget : float
        Largest cumulative epsilon; a round that would exceed it is not started and the job
        finishes with the reason ``"privacy budget exhausted"``. ``0``: ``target_epsilon``
        when set, else no budget.
    target_epsilon : float
        When > 0, the noise multiplier is calibrated so that ``job.rounds`` rounds reach
        exactly this epsilon (``calibrate_noise_multiplier``); exclusive with
        ``noise_multiplier``.
    noise_multiplier : float
        ``z`` (> 0 unless ``target_epsilon`` is set).
    clip_norm : float
        ``C``: per-patient gradient clip (``sample``) or update clip (``central``).
    sampling_rate : float
        ``sample`` only: Poisson rate ``q`` of a patient per DP-SGD step, in (0, 1].
    local_steps : int
        ``sample`` only: DP-SGD steps per round; ``0`` means ``epochs * ceil(1 / q)``.
    momentum : float
        ``sample`` only: heavy-ball momentum in [0, 1).
    ddg_bits : int
        ``distributed`` and ``sample_distributed``: width of the secure-aggregation ring
        ``Z_(2**ddg_bits)`` the noised encoding lives in, 8..62; ``0`` (the default) means 32
        for ``distributed`` and 48 for ``sample_distributed``. The SecAgg+ modulus of such a
        round is exactly this (``secagg.quant_bits`` and ``clip_range`` are then unused).
    expected_batch_size : float
        ``sample_distributed`` only (required there): the public expected number of sampled
        patients per step over all hospitals, ``q`` times the consortium's patient count; the
        noised gradient sum is divided by it. It must not be computed from the data of a
        round (it would then depend on the patients).
    site_clip_norm : float
        ``sample_distributed`` only: public bound ``B`` on one hospital's sum of clipped
        patient gradients (clipping the sum keeps the per-patient sensitivity ``C``; it only
        bounds the ring); ``0`` (default) means ``C * expected_batch_size``.
    """

    mode: str = "none"
    delta: float = 1e-5
    epsilon_budget: float = 0.0
    target_epsilon: float = 0.0
    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    sampling_rate: float = 0.1
    local_steps: int = 0
    momentum: float = 0.0
    ddg_bits: int = 0
    expected_batch_size: float = 0.0
    site_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"privacy.mode must be one of {MODES}, got {self.mode!r}")
        if self.ddg_bits != 0 and not 8 <= self.ddg_bits <= 62:
            raise ConfigError(
                f"privacy.ddg_bits must be in [8, 62] (or 0 for the mode's default), "
                f"got {self.ddg_bits}"
            )
        for key in ("expected_batch_size", "site_clip_norm"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"privacy.{key} must be finite and >= 0, got {value}")
        if self.mode == "sample_distributed":
            if self.expected_batch_size <= 0:
                raise ConfigError(
                    "privacy.mode = 'sample_distributed' needs privacy.expected_batch_size "
                    "> 0: the public expected number of sampled patients per step over all "
                    "sites (sampling_rate times the consortium's patient count)"
                )
            if self.local_steps > 1:
                raise ConfigError(
                    "privacy.mode = 'sample_distributed' takes one DP-SGD step per round; "
                    f"local_steps must be 0 or 1, got {self.local_steps} (run more rounds)"
                )
            if self.momentum > 0:
                raise ConfigError(
                    "privacy.momentum is the sites' local momentum (mode 'sample'); with "
                    "'sample_distributed' momentum is server-side: set [strategy] "
                    'name = "fedavgm" and its momentum'
                )
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")
        for key in ("epsilon_budget", "target_epsilon", "noise_multiplier"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"privacy.{key} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ConfigError(f"privacy.sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.local_steps < 0:
            raise ConfigError(f"privacy.local_steps must be >= 0, got {self.local_steps}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"privacy.momentum must be in [0, 1), got {self.momentum}")
        if self.enabled and (self.target_epsilon > 0) == (self.noise_multiplier > 0):
            raise ConfigError(
                "privacy: set exactly one of noise_multiplier and target_epsilon (> 0)"
            )

    @property
    def enabled(self) -> bool:
        """Whether the job is differentially private."""
        return self.mode != "none"

    @property
    def ring_bits(self) -> int:
        """The ring width of a ring mode (``ddg_bits``, or the mode's default)."""
        if self.ddg_bits:
            return self.ddg_bits
        return 48 if self.mode == "sample_distributed" else 32

    @property
    def site_bound(self) -> float:
        """``site_clip_norm`` (or its default ``C * expected_batch_size``)."""
        return self.site_clip_norm or self.clip_norm * max(1.0, self.expected_batch_size)

    @property
    def budget(self) -> float:
        """The effective epsilon budget (``inf`` when there is none)."""
        if self.epsilon_budget > 0:
            return self.epsilon_budget
        if self.target_epsilon > 0:
            return self.target_epsilon
        return math.inf

    def steps_per_round(self, epochs: int) -> int:
        """DP-SGD steps per round (``sample`` mode; one in ``sample_distributed``)."""
        if self.mode == "sample_distributed":
            return 1
        return self.local_steps or epochs * math.ceil(1.0 / self.sampling_rate)


_TYPES: dict[str, type] = {
    "mode": str,
    "delta": float,
    "epsilon_budget": float,
    "target_epsilon": float,
    "noise_multiplier": float,
    "clip_norm": float,
    "sampling_rate": float,
    "local_steps": int,
    "momentum": float,
    "ddg_bits": int,
    "expected_batch_size": float,
    "site_clip_norm": float,
}


def parse_privacy(sec: dict[str, Any]) -> PrivacyConfig:
    """Build a :class:`PrivacyConfig` from the decoded ``[privacy]`` table.

    Parameters
    ----------
    sec : dict
        The table (may be empty).

    Returns
    -------
    PrivacyConfig
        The validated section.

    Raises
    ------
    ConfigError
        Unknown, ill-typed or inconsistent keys.
    """
    if not isinstance(sec, dict):
        raise ConfigError("[privacy] must be a table")
    unknown = set(sec) - set(_TYPES)
    if unknown:
        raise ConfigError(f"[privacy]: unknown keys {sorted(unknown)}; allowed {sorted(_TYPES)}")
    values: dict[str, Any] = {}
    for key, value in sec.items():
        want = _TYPES[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool):
            raise ConfigError(f"privacy.{key} must be {want.__name__}, got {value!r}")
        values[key] = value
    return PrivacyConfig(**values)


def read_privacy(store: Store) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """Read the job's privacy summary and per-round records without dp-accounting.

    Parameters
    ----------
    store : Store
        The job's database.

    Returns
    -------
    summary : dict or None
        ``mode``, ``delta``, ``noise_multiplier``, ``clip_norm``, ``epsilon_budget`` and the
        cumulative ``epsilon`` spent; ``None`` when the job has no DP.
    rounds : dict
        ``{round: {"epsilon_round", "epsilon", "epsilon_rdp", "method", "delta"}}``.
    """
    params = store.get_meta("privacy_params")
    per_round: dict[int, dict[str, Any]] = {r.round: _record_doc(r) for r in store.privacy_rounds()}
    if params is None:
        return None, per_round
    summary: dict[str, Any] = json.loads(params)
    summary["epsilon"] = max((float(v["epsilon"]) for v in per_round.values()), default=0.0)
    return summary, per_round


def read_privacy_range(
    store: Store, first: int, last: int
) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """:func:`read_privacy` for rounds ``first..last`` only (the summary covers the job).

    Two indexed queries however long the job is (the paginated ``/v1/status``).
    """
    params = store.get_meta("privacy_params")
    per_round = {r.round: _record_doc(r) for r in store.privacy_rounds_in(first, last)}
    if params is None:
        return None, per_round
    summary: dict[str, Any] = json.loads(params)
    summary["epsilon"] = store.max_epsilon()
    return summary, per_round


def _record_doc(row: PrivacyRow) -> dict[str, Any]:
    return {
        "epsilon_round": row.epsilon_round,
        "epsilon": row.epsilon,
        "epsilon_rdp": row.epsilon_rdp,
        "method": row.method,
        "delta": row.delta,
    }


def _full_state(store: Store, state: dict[str, Any]) -> dict[str, Any]:
    """Return the accountant state to restore from ``meta.privacy_accountant``.

    The meta row holds the accountant's constant-size header only
    (``to_state(rounds=False)``): each round's record is its ``privacy_rounds`` row,
    written in the same transaction, so a round costs O(1) to persist however long the job
    is. A database written before that change holds the whole state (with ``"rounds"``)
    and is read as it is.
    """
    if "rounds" in state:
        return state
    rounds = [
        {
            "round": r.round,
            "events": r.events,
            "epsilon_round": r.epsilon_round,
            "epsilon": r.epsilon,
            "epsilon_rdp": r.epsilon_rdp,
            "method": r.method,
        }
        for r in store.privacy_rounds()
    ]
    return {**state, "rounds": rounds}


class JobPrivacy:
    """A job's privacy runtime: parameters, accountant, budget check, records, noise.

    Parameters
    ----------
    config : PrivacyConfig
        The ``[privacy]`` section.
    rounds : int
        Planned rounds (for calibration from ``target_epsilon``).
    epochs : int
        Local epochs per round (default DP-SGD steps per round).
    """

    def __init__(self, config: PrivacyConfig, rounds: int, epochs: int) -> None:
        self.config = config
        self.rounds = rounds
        self.steps = config.steps_per_round(epochs)
        self.noise_multiplier = config.noise_multiplier
        self._accountant: PrivacyAccountant | None = None
        self._job_seed = b""
        self._store: Store | None = None
        # The next round's accounting, computed ahead in a worker thread (see account()).
        self._prefetch: threading.Thread | None = None

    @property
    def mode(self) -> str:
        """The configured mode."""
        return self.config.mode

    @property
    def enabled(self) -> bool:
        """Whether the job is differentially private."""
        return self.config.enabled

    @property
    def accountant(self) -> PrivacyAccountant:
        """The loaded accountant (after :meth:`open`)."""
        if self._accountant is None:
            raise RuntimeError("JobPrivacy.open() was not called")
        return self._accountant

    def _events_for(self, z: float, rounds: int) -> list[PrivacyEvent]:
        from confide.privacy.accountant import (
            PrivacyEvent,
            client_poisson_event,
            dpsgd_event,
        )

        if self.mode in ("sample", "sample_distributed"):
            return [dpsgd_event(self.config.sampling_rate, z, self.steps * rounds)]
        if self.mode == "distributed":
            # Calibration only: a DDG round is zCDP with rho = 1/(2 z^2) up to the realised
            # rounding of the sampler's variance (which only lowers rho) and KLS21's tau
            # term (< 1e-15 here); rounds are accounted with their exact ``ddg_event``.
            return [PrivacyEvent("zcdp", rho=0.5 / (z * z), count=rounds, label="ddg")]
        return [client_poisson_event(1.0, z, rounds)]

    def round_events(self, ddg: RoundNoise | None = None) -> list[PrivacyEvent]:
        """Return the events one round releases.

        Parameters
        ----------
        ddg : DDGParams or SampleDDGParams, optional
            Ring modes: the round's noise parameters (required there).
        """
        if self.mode == "sample_distributed":
            from confide.privacy.distributed_dpsgd import SampleDDGParams, event

            if not isinstance(ddg, SampleDDGParams):
                raise RuntimeError("a distributed DP-SGD round is accounted with its params")
            return [event(ddg)]
        if self.mode == "distributed":
            from confide.privacy.client_dp import ddg_event

            if not isinstance(ddg, DDGParams):
                raise RuntimeError("a distributed-DP round is accounted with its DDG params")
            return [ddg_event(ddg)]
        return self._events_for(self.noise_multiplier, 1)

    def _calibrate(self) -> float:
        from confide.privacy.accountant import account, calibrate, calibrate_noise_multiplier

        cfg = self.config
        sampled = self.mode in ("sample", "sample_distributed")
        q = cfg.sampling_rate if sampled else 1.0
        steps = self.steps * self.rounds if sampled else self.rounds
        z = calibrate_noise_multiplier(cfg.target_epsilon, cfg.delta, q, steps)
        if self.mode == "distributed":
            # DDG is accounted with RDP (no PLD for discrete Gaussian sums): the Gaussian's
            # PLD value is a lower end of the search.
            z = calibrate(
                lambda zz: self._events_for(zz, self.rounds),
                cfg.target_epsilon,
                cfg.delta,
                lower=z,
                upper=max(1e3, 64.0 * z),
                tol=1e-4 * z,
            )
            z *= 1.001  # margin for the realised per-round rho (budget-checked anyway)
        # The budget is checked with the accountant's own PLD: step up until it agrees.
        while account(self._events_for(z, self.rounds), cfg.delta).epsilon > cfg.target_epsilon:
            z *= 1.001
        return z

    def open(self, store: Store) -> None:
        """Load (or, on the job's first start, create) the privacy state.

        The noise multiplier is fixed at the first start (calibrated from
        ``target_epsilon`` if asked) and stored, so a restart never changes it. The
        accountant is restored from its stored state; the spent budget never decreases.
        """
        self._store = store
        stored = store.get_meta("privacy_params")
        stored_mode = "none" if stored is None else json.loads(stored)["mode"]
        if stored_mode != self.mode and (stored is not None or store.rounds()):
            raise ConfigError(
                f"state was created with privacy.mode={stored_mode!r}, not {self.mode!r}; "
                "the privacy mode of a job cannot change once it has rounds"
            )
        if not self.enabled:
            return
        from confide.privacy.accountant import PrivacyAccountant

        logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's RDP chatter
        if stored is not None:
            self.noise_multiplier = float(json.loads(stored)["noise_multiplier"])
        else:
            if self.noise_multiplier <= 0:
                self.noise_multiplier = self._calibrate()
            params = self.summary_params()
            with store.transaction() as cur:
                Store.set_meta_once(cur, "privacy_params", json.dumps(params))
        if self.mode in RING_MODES:
            with store.transaction() as cur:
                seed_hex = Store.set_meta_once(cur, "ddg_job_seed", secrets.token_hex(32))
            self._job_seed = bytes.fromhex(seed_hex)
        state = store.get_meta("privacy_accountant")
        if state is None:
            self._accountant = PrivacyAccountant(self.config.delta)
        else:
            self._accountant = PrivacyAccountant.from_state(_full_state(store, json.loads(state)))

    def summary_params(self) -> dict[str, Any]:
        """Return the job's fixed privacy parameters (JSON-ready)."""
        cfg = self.config
        doc: dict[str, Any] = {
            "mode": self.mode,
            "delta": cfg.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": cfg.clip_norm,
            "epsilon_budget": None if math.isinf(cfg.budget) else cfg.budget,
        }
        if self.mode in ("sample", "sample_distributed"):
            doc["sampling_rate"] = cfg.sampling_rate
            doc["local_steps"] = self.steps
            doc["unit"] = "patient"
        else:
            doc["unit"] = "site"
        if self.mode in RING_MODES:
            doc["ddg_bits"] = cfg.ring_bits
        if self.mode == "sample_distributed":
            doc["expected_batch_size"] = cfg.expected_batch_size
            doc["site_clip_norm"] = cfg.site_bound
        return doc

    def allows_next_round(self, ddg: RoundNoise | None = None) -> bool:
        """Whether one more round fits in the budget (checked before a round starts).

        Parameters
        ----------
        ddg : DDGParams or SampleDDGParams, optional
            Ring modes: the next round's noise parameters; without them the calibration
            event (``rho = 1 / (2 z^2)``, or the configured ``z``) is checked.
        """
        if not self.enabled or math.isinf(self.config.budget):
            return True
        self._join_prefetch()
        from confide.errors import BudgetExceeded
        from confide.privacy.accountant import Budget

        try:
            events = (
                self._events_for(self.noise_multiplier, 1)
                if self.mode in RING_MODES and ddg is None
                else self.round_events(ddg)
            )
            Budget(self.config.budget, self.config.delta).check(self.accountant, events)
        except BudgetExceeded:
            return False
        return True

    def account(self, round_id: int, stage: str, ddg: RoundNoise | None = None) -> PrivacyRow:
        """Account ``round_id`` in memory (slow: PLD/RDP); persist it with :meth:`persist`.

        Call it *outside* any lock or transaction, then persist the returned row in the
        transaction that releases the round's noise. Idempotent for a round already
        recorded with the same events. The in-memory accountant may run ahead of the
        database if that transaction rolls back; that can only over-count until the next
        restart.

        Parameters
        ----------
        round_id : int
            The round.
        stage : str
            The stage whose transition releases the noise (recorded for audits).
        ddg : DDGParams, optional
            ``distributed`` mode: the round's DDG parameters.

        Returns
        -------
        PrivacyRow
            The round's privacy record.
        """
        return self._account_events(round_id, stage, self.round_events(ddg))

    def _account_events(
        self, round_id: int, stage: str, events: Sequence[PrivacyEvent]
    ) -> PrivacyRow:
        self._join_prefetch()
        rec = self.accountant.record_round(round_id, events)
        self._prefetch_next()
        return PrivacyRow(
            round=round_id,
            mode=self.mode,
            events=[e.to_dict() for e in rec.events],
            epsilon_round=rec.epsilon_round,
            epsilon=rec.epsilon,
            epsilon_rdp=rec.epsilon_rdp,
            method=rec.method,
            delta=self.config.delta,
            recorded_at_stage=stage,
        )

    def _join_prefetch(self) -> None:
        """Wait for the ahead-of-time accounting (never two accountings at once)."""
        if self._prefetch is not None:
            self._prefetch.join()
            self._prefetch = None

    def _prefetch_next(self) -> None:
        """Account the next round's ledger ahead, in a worker thread, while this one runs.

        The cumulative epsilon after round r + 1 is a pure function of the merged ledger,
        cached by :mod:`confide.privacy.accountant`; computing it while the sites train
        makes the next round start (sample mode: write-ahead, before the task is served)
        and its budget check cache hits, so a round start costs the same in round 10 and
        round 1,000. Only where the next round's events are known in advance (``sample``,
        ``central``); a ring-mode round's events depend on its cohort.
        """
        if self.mode not in ("sample", "central"):
            return
        from confide.privacy.accountant import account

        acc = self.accountant
        events = acc.ledger(self.round_events())  # O(distinct mechanisms), not O(rounds)

        def run() -> None:
            try:
                account(events, acc.delta, acc.relation, acc.pld_discretization)
            except Exception as exc:  # only a cache warm-up: the real call raises again
                log.debug("privacy: accounting ahead failed: %s", exc)

        self._prefetch = threading.Thread(target=run, name="confide-account-ahead", daemon=True)
        self._prefetch.start()

    def persist(self, cur: Tx, row: PrivacyRow) -> None:
        """Write an accounted round and the accountant's state inside ``cur`` (fast).

        The pending intent (:meth:`intend`) is settled in the same transaction: from then
        on the round's charge is the ``privacy_rounds`` row.
        """
        Store.insert_privacy_round(cur, row, self.accountant.to_state(rounds=False))
        Store.clear_privacy_intent(cur)

    # -- write-ahead charge of a noised aggregate ------------------------------------------
    def intend(self, round_id: int, stage: str, ddg: RoundNoise | None = None) -> None:
        """Durably record, in its own transaction, that ``round_id`` is about to release.

        Called just before the round's noised aggregate first exists: before the SecAgg+
        unmask of a ring mode, before the central noise is drawn and written. The intent
        holds the round's events (the mechanism's parameters); the transaction that stores
        the aggregate charges the round and clears it (:meth:`persist`), an in-process abort
        that released nothing clears it, and a restart that finds it pending charges it
        (:meth:`charge_intent`): the server's ledger never counts fewer releases than
        happened. Writing the same pending intent again (a retried close) is a no-op.

        Parameters
        ----------
        round_id : int
            The round.
        stage : str
            The stage whose close computes the aggregate.
        ddg : DDGParams or SampleDDGParams, optional
            Ring modes: the round's noise parameters.
        """
        store = self._require_store()
        intent = {
            "format": INTENT_FORMAT,
            "job_id": store.get_meta("job_id"),
            "round": round_id,
            "stage": stage,
            "mode": self.mode,
            "events": [e.to_dict() for e in self.round_events(ddg)],
        }
        pending = store.privacy_intent()
        if pending is not None and json.dumps(pending, sort_keys=True) == json.dumps(
            intent, sort_keys=True
        ):
            return
        with store.transaction() as cur:
            Store.save_privacy_intent(cur, intent)

    def pending_intent(self, round_id: int | None = None) -> dict[str, Any] | None:
        """Return the pending intent (of ``round_id`` when given), or ``None``."""
        if self._store is None or not self.enabled:
            return None
        intent = self._store.privacy_intent()
        if intent is None or (round_id is not None and int(intent["round"]) != round_id):
            return None
        return intent

    def charge_intent(self, intent: dict[str, Any]) -> PrivacyRow | None:
        """Account a pending intent's round; ``None`` when that round is already charged.

        Persist the row with :meth:`persist` (which also clears the intent). Replaying an
        intent never charges twice: a round with a ``privacy_rounds`` row is not accounted
        again (and the accountant itself is idempotent per round).
        """
        from confide.privacy.accountant import PrivacyEvent

        store = self._require_store()
        round_id = int(intent["round"])
        if store.privacy_round(round_id) is not None:
            return None
        events = [PrivacyEvent.from_dict(e) for e in intent["events"]]
        return self._account_events(round_id, str(intent["stage"]), events)

    def _require_store(self) -> Store:
        if self._store is None:
            raise RuntimeError("JobPrivacy.open() was not called")
        return self._store

    def record(
        self, cur: Tx, round_id: int, stage: str, ddg: RoundNoise | None = None
    ) -> dict[str, Any]:
        """Account ``round_id`` and persist it inside the caller's transaction.

        :meth:`account` then :meth:`persist`; the round engine calls those two apart so
        the accounting runs outside the transaction.

        Parameters
        ----------
        cur : Tx
            The caller's transaction.
        round_id : int
            The round.
        stage : str
            The stage whose transition releases the noise (recorded for audits).
        ddg : DDGParams, optional
            ``distributed`` mode: the round's DDG parameters.

        Returns
        -------
        dict
            The round's privacy record (JSON-ready).
        """
        row = self.account(round_id, stage, ddg)
        self.persist(cur, row)
        return _record_doc(row)

    def round_metrics(self, round_id: int) -> dict[str, Any]:
        """``epsilon_round`` and cumulative ``epsilon`` of a recorded round (empty if none)."""
        if not self.enabled:
            return {}
        rec = self.accountant.round_record(round_id)
        if rec is None:
            return {}
        return {"epsilon_round": rec.epsilon_round, "epsilon": rec.epsilon}

    def train_task(self, ddg: tuple[RoundNoise, bytes] | None = None) -> PrivacyTask | None:
        """Client-side DP parameters for a training task (``None`` without DP).

        Parameters
        ----------
        ddg : tuple, optional
            ``distributed`` mode: the round's DDG parameters and rotation seed.
        """
        delta = self.config.delta
        if self.mode == "sample":
            dp = DPSGDConfig(
                noise_multiplier=self.noise_multiplier,
                clip_norm=self.config.clip_norm,
                sampling_rate=self.config.sampling_rate,
                steps=self.steps,
                momentum=self.config.momentum,
            )
            return PrivacyTask("sample", delta, dp=dp, rounds=self.rounds)
        if self.mode == "central":
            return PrivacyTask(
                "central", delta, update_clip_norm=self.config.clip_norm, rounds=self.rounds
            )
        if self.mode == "distributed" and ddg is not None:
            return PrivacyTask(
                "distributed",
                delta,
                ddg=ddg[0].to_dict(),
                rotation_seed=ddg[1].hex(),
                rounds=self.rounds,
            )
        if self.mode == "sample_distributed" and ddg is not None:
            return PrivacyTask(
                "sample_distributed", delta, sample_ddg=ddg[0].to_dict(), rounds=self.rounds
            )
        return None

    # -- distributed discrete Gaussian ---------------------------------------------------
    def ddg_params(self, dim: int, secagg: SecAggParams) -> DDGParams:
        """Derive a distributed round's DDG parameters from its SecAgg+ parameters.

        The noise is calibrated for ``h = secagg.min_survivors - secagg.corrupt`` honest
        shares: no honest client unmasks a sum of fewer than ``min_survivors = max(t, n - D)``
        masked inputs, and at most ``corrupt`` of those may collude with the server. The
        ring is ``Z_(2**ddg_bits)``.

        Parameters
        ----------
        dim : int
            Model length (the manifest's size).
        secagg : SecAggParams
            The round's SecAgg+ parameters (cohort ``n``, threshold, corrupted clients).

        Returns
        -------
        DDGParams
            Deterministic in its inputs (a restart derives the same values).

        Raises
        ------
        ConfigError
            The combination is infeasible (ring too small for the cohort, noise scale
            outside the sampler's range, no honest share).
        """
        try:
            return calibrate_ddg(
                ddg_config_for(
                    secagg,
                    dim=dim,
                    clip_norm=self.config.clip_norm,
                    noise_multiplier=self.noise_multiplier,
                    bits=self.config.ring_bits,
                )
            )
        except InvalidPrivacyConfig as exc:
            raise ConfigError(
                f"privacy.mode = 'distributed' is infeasible for a cohort of {secagg.n} "
                f"(min_survivors {secagg.min_survivors}, {secagg.corrupt} colluding, "
                f"ddg_bits {self.config.ring_bits}, model length {dim}): {exc}"
            ) from None

    def sample_ddg_params(self, dim: int, secagg: SecAggParams) -> SampleDDGParams:
        """Derive a distributed DP-SGD round's parameters from its SecAgg+ parameters.

        As for DDG, the noise is calibrated for ``h = secagg.min_survivors - secagg.corrupt``
        honest shares; the ring is ``Z_(2**ddg_bits)`` (48 bits by default).

        Raises
        ------
        ConfigError
            Infeasible for this cohort (ring too small, noise share out of range).
        """
        from confide.privacy.distributed_dpsgd import SampleDDGConfig, calibrate

        cfg = self.config
        try:
            return calibrate(
                SampleDDGConfig(
                    dim=dim,
                    clip_norm=cfg.clip_norm,
                    noise_multiplier=self.noise_multiplier,
                    sampling_rate=cfg.sampling_rate,
                    num_sites=secagg.n,
                    min_survivors=secagg.min_survivors,
                    max_colluding=secagg.corrupt,
                    site_clip_norm=cfg.site_bound,
                    bits=cfg.ring_bits,
                )
            )
        except InvalidPrivacyConfig as exc:
            raise ConfigError(
                f"privacy.mode = 'sample_distributed' is infeasible for a cohort of {secagg.n} "
                f"(min_survivors {secagg.min_survivors}, {secagg.corrupt} colluding, "
                f"ddg_bits {cfg.ring_bits}, model length {dim}): {exc}"
            ) from None

    def sample_ddg_step(
        self, total: NDArray[np.unsignedinteger[Any]], params: SampleDDGParams, lr: float
    ) -> NDArray[np.float32]:
        """Decode the unmasked ring sum into the DP-SGD model step ``-lr * g / E``.

        ``g`` is the noised sum of the survivors' clipped patient gradients, ``E`` the public
        ``expected_batch_size``: post-processing of the accounted sum.
        """
        from confide.privacy.distributed_dpsgd import decode_sum

        g = decode_sum(total, params)
        step = (-lr / self.config.expected_batch_size) * g
        out: NDArray[np.float32] = step.astype(np.float32)
        return out

    def rotation_seed(self, round_id: int) -> bytes:
        """Public rotation seed of ``round_id`` (from the job's random ``ddg_job_seed``)."""
        if not self._job_seed:
            raise RuntimeError("JobPrivacy.open() was not called in distributed mode")
        return rotation_seed(self._job_seed, round_id)

    def save_ddg(self, cur: Tx, round_id: int, params: RoundNoise) -> None:
        """Store a round's noise parameters inside the round-start transaction."""
        Store.save_ddg(cur, round_id, params.to_dict(), self.rotation_seed(round_id))

    def load_ddg(self, round_id: int) -> tuple[RoundNoise, bytes] | None:
        """Return a ring round's stored parameters and rotation seed (or ``None``)."""
        if self._store is None:
            return None
        found = self._store.load_ddg(round_id)
        if found is None:
            return None
        if self.mode == "sample_distributed":
            from confide.privacy.distributed_dpsgd import SampleDDGParams

            return SampleDDGParams(**found[0]), found[1]
        return DDGParams(**found[0]), found[1]

    def ddg_sum(
        self, total: NDArray[np.unsignedinteger[Any]], params: DDGParams, seed: bytes
    ) -> NDArray[np.float32]:
        """Decode the unmasked DDG ring sum into the noised float sum of the updates.

        The strategy (:mod:`confide.strategies`) divides it by the round's cohort size.

        Parameters
        ----------
        total : numpy.ndarray
            The unmasked ring sum (``padded_dim`` elements, weight element removed).
        params : DDGParams
            The round's parameters.
        seed : bytes
            The round's rotation seed.

        Returns
        -------
        numpy.ndarray
            ``float32`` noised sum of length ``params.dim``.
        """
        return ddg_decode(total, params, seed)

    def ddg_mean(
        self,
        total: NDArray[np.unsignedinteger[Any]],
        params: DDGParams,
        seed: bytes,
        cohort_size: int,
    ) -> NDArray[np.float32]:
        """Decode the unmasked DDG ring sum and divide it by the round's cohort size.

        The cohort is fixed when the round starts, before any update exists, so dividing
        by it is post-processing of the DP sum (the realised number of survivors is not
        used: it is what add/remove of one site changes).

        Parameters
        ----------
        total : numpy.ndarray
            The unmasked ring sum (``padded_dim`` elements, weight element removed).
        params : DDGParams
            The round's parameters.
        seed : bytes
            The round's rotation seed.
        cohort_size : int
            The round's cohort size.

        Returns
        -------
        numpy.ndarray
            ``float32`` noised mean update of length ``params.dim``.
        """
        return ddg_decode(total, params, seed, normalize_by=float(max(1, cohort_size)))

    def central_sum(
        self, deltas: Iterable[NDArray[np.floating]], rng: SecureRng | None = None
    ) -> NDArray[np.float32]:
        """Clip each update to ``C``, sum them and add ``N(0, (z C)^2)`` to the sum once.

        The strategy (:mod:`confide.strategies`) divides the noised sum by the round's
        cohort size (fixed before any update was seen, so public). ``deltas`` may be any
        iterable: each update is clipped and added as it comes, so the server holds the
        running sum and one update, not the round's N updates.

        Parameters
        ----------
        deltas : iterable of numpy.ndarray
            The accepted updates, in a fixed order (consumed once).
        rng : SecureRng, optional
            Noise generator; OS-keyed by default.

        Returns
        -------
        numpy.ndarray
            ``float32`` noised sum.
        """
        return add_central_noise(
            self._clipped_sum(deltas), self.noise_multiplier, self.config.clip_norm, rng=rng
        )

    def _clipped_sum(self, deltas: Iterable[NDArray[np.floating]]) -> NDArray[np.float64]:
        total: NDArray[np.float64] | None = None
        for d in deltas:
            clipped, _ = clip_update(d, self.config.clip_norm)
            if total is None:
                total = np.zeros(d.shape[0], dtype=np.float64)
            total += clipped.astype(np.float64)
        return np.zeros(0, dtype=np.float64) if total is None else total

    def central_mean(
        self,
        deltas: Sequence[NDArray[np.floating]],
        cohort_size: int,
        rng: SecureRng | None = None,
    ) -> NDArray[np.float32]:
        """Clip each update to ``C``, sum, add ``N(0, (z C)^2)`` once, divide by the cohort.

        Parameters
        ----------
        deltas : sequence of numpy.ndarray
            The accepted updates, in a fixed order.
        cohort_size : int
            The round's cohort size, fixed before any update was seen (public).
        rng : SecureRng, optional
            Noise generator; OS-keyed by default.

        Returns
        -------
        numpy.ndarray
            ``float32`` noised mean update.
        """
        return add_central_noise(
            self._clipped_sum(deltas),
            self.noise_multiplier,
            self.config.clip_norm,
            normalize_by=float(max(1, cohort_size)),
            rng=rng,
        )
