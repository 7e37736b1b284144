"""The job's differential privacy: ``[privacy]`` config, accountant, budget, central noise.

Modes (``[privacy] mode``):

* ``"none"``: no DP (the default of a bare config).
* ``"sample"``: patient-level DP-SGD on the clients. The server ships a
  :class:`confide.trainer.DPSGDConfig` with every training task and accounts, per round,
  ``local_steps`` compositions of ``PoissonSampled(q, Gaussian(z))``.
* ``"central"``: client-level DP. Every update is clipped to ``clip_norm`` (by the client and
  again by the server, Rust kernel), the clipped updates are summed with uniform weights,
  the server adds ``N(0, (z C)^2)`` to the sum once and divides by the cohort size. Each round
  is accounted as ``Gaussian(z)`` under add/remove of one site (no amplification by cohort
  selection is claimed).
* ``"distributed"`` (DDG) needs secure aggregation and is refused at start-up for now.

Persistence (:class:`JobPrivacy`): the accountant's state (``meta.privacy_accountant``) and
one ``privacy_rounds`` row per round are written in the *same* SQLite transaction as the
round transition that releases the round's noise: the round's start for ``sample`` (clients
upload noised updates as soon as they have the task) and the transaction that stores the
noised aggregate for ``central``. A noised aggregate that was computed but not committed was
never served (models are served only once registered), so after a crash it is recomputed
with fresh noise and accounted once; after the commit it is never recomputed.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from confide.federation_errors import ConfigError
from confide.noise import SecureRng
from confide.privacy.client_dp import add_central_noise, clip_update

if TYPE_CHECKING:
    from confide.privacy.accountant import PrivacyAccountant, PrivacyEvent
    from confide_server.store import Store

__all__ = [
    "BUDGET_EXHAUSTED",
    "MODES",
    "JobPrivacy",
    "PrivacyConfig",
    "parse_privacy",
    "read_privacy",
]

MODES = ("none", "sample", "central", "distributed")
BUDGET_EXHAUSTED = "privacy budget exhausted"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_rounds (
    round INTEGER PRIMARY KEY, mode TEXT NOT NULL, events TEXT NOT NULL,
    epsilon_round REAL NOT NULL, epsilon REAL NOT NULL, epsilon_rdp REAL NOT NULL,
    method TEXT NOT NULL, delta REAL NOT NULL, recorded_at_stage TEXT NOT NULL);
"""


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

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"privacy.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "distributed":
            raise ConfigError(
                "privacy.mode = 'distributed' (distributed discrete Gaussian) needs secure "
                "aggregation ([secagg] enabled = true) with the DDG encoding wired into its "
                "masked-input stage, which this server does not have yet; use 'sample' "
                "(patient-level DP-SGD) or 'central' (server-side noise)"
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
    def budget(self) -> float:
        """The effective epsilon budget (``inf`` when there is none)."""
        if self.epsilon_budget > 0:
            return self.epsilon_budget
        if self.target_epsilon > 0:
            return self.target_epsilon
        return math.inf

    def steps_per_round(self, epochs: int) -> int:
        """DP-SGD steps per round (``sample`` mode)."""
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


def _ensure_schema(store: Store) -> None:
    with store.transaction() as cur:
        for stmt in _SCHEMA.strip().split(";"):
            if stmt.strip():
                cur.execute(stmt)


def _meta(cur: sqlite3.Cursor, key: str) -> str | None:
    row = cur.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


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
    _ensure_schema(store)
    with store.transaction() as cur:
        params = _meta(cur, "privacy_params")
        rows = cur.execute(
            "SELECT round, epsilon_round, epsilon, epsilon_rdp, method, delta "
            "FROM privacy_rounds ORDER BY round"
        ).fetchall()
    per_round: dict[int, dict[str, Any]] = {
        int(r[0]): {
            "epsilon_round": float(r[1]),
            "epsilon": float(r[2]),
            "epsilon_rdp": float(r[3]),
            "method": str(r[4]),
            "delta": float(r[5]),
        }
        for r in rows
    }
    if params is None:
        return None, per_round
    summary: dict[str, Any] = json.loads(params)
    summary["epsilon"] = max((float(v["epsilon"]) for v in per_round.values()), default=0.0)
    return summary, per_round


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
        from confide.privacy.accountant import client_poisson_event, dpsgd_event

        if self.mode == "sample":
            return [dpsgd_event(self.config.sampling_rate, z, self.steps * rounds)]
        return [client_poisson_event(1.0, z, rounds)]

    def round_events(self) -> list[PrivacyEvent]:
        """Return the events one round releases."""
        return self._events_for(self.noise_multiplier, 1)

    def _calibrate(self) -> float:
        from confide.privacy.accountant import account, calibrate_noise_multiplier

        cfg = self.config
        q = cfg.sampling_rate if self.mode == "sample" else 1.0
        steps = self.steps * self.rounds if self.mode == "sample" else self.rounds
        z = calibrate_noise_multiplier(cfg.target_epsilon, cfg.delta, q, steps)
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
        _ensure_schema(store)
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
                if _meta(cur, "privacy_params") is None:
                    cur.execute(
                        "INSERT INTO meta(key, value) VALUES ('privacy_params', ?)",
                        (json.dumps(params),),
                    )
        state = store.get_meta("privacy_accountant")
        if state is None:
            self._accountant = PrivacyAccountant(self.config.delta)
        else:
            self._accountant = PrivacyAccountant.from_state(json.loads(state))

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
        if self.mode == "sample":
            doc["sampling_rate"] = cfg.sampling_rate
            doc["local_steps"] = self.steps
            doc["unit"] = "patient"
        else:
            doc["unit"] = "site"
        return doc

    def allows_next_round(self) -> bool:
        """Whether one more round fits in the budget (checked before a round starts)."""
        if not self.enabled or math.isinf(self.config.budget):
            return True
        from confide.privacy.accountant import Budget
        from confide.privacy.errors import BudgetExceeded

        try:
            Budget(self.config.budget, self.config.delta).check(
                self.accountant, self.round_events()
            )
        except BudgetExceeded:
            return False
        return True

    def record(self, cur: sqlite3.Cursor, round_id: int, stage: str) -> dict[str, Any]:
        """Account ``round_id`` and persist it inside the caller's transaction.

        Idempotent for a round already recorded with the same events. The in-memory
        accountant may run ahead of the database if the transaction rolls back; that can
        only over-count until the next restart.

        Returns
        -------
        dict
            The round's privacy record (JSON-ready).
        """
        rec = self.accountant.record_round(round_id, self.round_events())
        doc = {
            "epsilon_round": rec.epsilon_round,
            "epsilon": rec.epsilon,
            "epsilon_rdp": rec.epsilon_rdp,
            "method": rec.method,
            "delta": self.config.delta,
        }
        cur.execute(
            "INSERT OR IGNORE INTO privacy_rounds(round, mode, events, epsilon_round, epsilon, "
            "epsilon_rdp, method, delta, recorded_at_stage) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                round_id,
                self.mode,
                json.dumps([e.to_dict() for e in rec.events]),
                rec.epsilon_round,
                rec.epsilon,
                rec.epsilon_rdp,
                rec.method,
                self.config.delta,
                stage,
            ),
        )
        cur.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('privacy_accountant', ?)",
            (json.dumps(self.accountant.to_state()),),
        )
        return doc

    def round_metrics(self, round_id: int) -> dict[str, Any]:
        """``epsilon_round`` and cumulative ``epsilon`` of a recorded round (empty if none)."""
        if not self.enabled:
            return {}
        for rec in self.accountant.rounds:
            if rec.round_id == round_id:
                return {"epsilon_round": rec.epsilon_round, "epsilon": rec.epsilon}
        return {}

    def train_task(self) -> dict[str, Any] | None:
        """Client-side DP parameters for a training task (``None`` without DP)."""
        if self.mode == "sample":
            return {
                "mode": "sample",
                "delta": self.config.delta,
                "dp": {
                    "noise_multiplier": self.noise_multiplier,
                    "clip_norm": self.config.clip_norm,
                    "sampling_rate": self.config.sampling_rate,
                    "steps": self.steps,
                    "momentum": self.config.momentum,
                },
            }
        if self.mode == "central":
            return {
                "mode": "central",
                "delta": self.config.delta,
                "update_clip_norm": self.config.clip_norm,
            }
        return None

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
        c = self.config.clip_norm
        total = np.zeros(deltas[0].shape[0] if deltas else 0, dtype=np.float64)
        for d in deltas:
            clipped, _ = clip_update(d, c)
            total += clipped.astype(np.float64)
        return add_central_noise(
            total, self.noise_multiplier, c, normalize_by=float(max(1, cohort_size)), rng=rng
        )
