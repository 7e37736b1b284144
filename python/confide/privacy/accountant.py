"""Privacy accounting over Google's ``dp-accounting`` (PLD primary, RDP cross-check).

Nothing here computes a privacy loss by hand: every epsilon comes from
``dp_accounting.pld.PLDAccountant`` (privacy loss distributions, Koskela et al.; Doroshenko
et al.) or ``dp_accounting.rdp.RdpAccountant`` (Renyi DP, Mironov et al.). This module only
decides *which* ``DpEvent`` describes what the SDK actually did, records those events per
round, and keeps the record durable.

Events and neighbouring relations
---------------------------------
======================  ===============================================  ==============  ========
kind                    dp-accounting event                              relation        PLD?
======================  ===============================================  ==============  ========
``gaussian``            ``GaussianDpEvent(z)``                           add/remove one  yes
``poisson_gaussian``    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``  add/remove one  yes
``wor_gaussian``        ``SampledWithoutReplacementDpEvent(N, m,         replace one     no (RDP)
                        GaussianDpEvent(z / 2))``
``zcdp``                ``ZCDpEvent(rho, xi)``                           as computed     no (RDP)
======================  ===============================================  ==============  ========

* **Sample-level (patient-level) DP-SGD**: one *unit* is a patient (all of their records);
  neighbouring datasets differ by adding or removing one patient. Each step samples every
  patient independently with probability ``q`` (Poisson) and releases the noised sum of
  per-patient clipped gradients, so ``steps`` steps are
  ``SelfComposed(PoissonSampled(q, Gaussian(z)), steps)``. Fixed shuffled batches are *not*
  Poisson sampling and must not be accounted with this event.
* **Client-level DP, Poisson cohorts**: each client is in the round's cohort independently
  with probability ``q``; neighbouring federations differ by adding or removing one client
  (all of its data). ``q = 1`` (every client every round, the cross-silo case) is a plain
  ``GaussianDpEvent``.
* **Client-level DP, fixed-size cohorts** (``m`` of ``N`` without replacement): add/remove
  is not meaningful when ``N`` is public, so the relation is *replace one client*. The sum
  of clipped updates then has L2 sensitivity ``2 C``, hence the event's noise multiplier is
  ``z / 2`` (dp-accounting's RDP for this event takes the ratio of noise std to the *replace*
  sensitivity; Wang, Balle, Kasiviswanathan 2019, Thm. 27). dp-accounting has no PLD for
  this event, so these jobs are accounted with RDP only.
* **Distributed discrete Gaussian** (:mod:`confide.privacy.client_dp`): the RDP bound of
  Kairouz, Liu, Steinke (2021, Prop. 14 / Thm. 1) is of the form ``xi + rho * alpha``, i.e. a
  ``ZCDpEvent``; accounted with RDP only and *without* amplification by cohort sampling.

Reported epsilon
----------------
:meth:`PrivacyAccountant.epsilon` is the PLD epsilon when every recorded event has a PLD,
and the RDP epsilon otherwise (then ``method == "rdp"``). The RDP value is always computed
as a cross-check; for PLD-supported ledgers it is never below the PLD value (both are upper
bounds; PLD is the tighter one).

Crash safety
------------
:meth:`PrivacyAccountant.record_round` is idempotent per round id: recording the same round
with the same events again is a no-op, recording it with different events raises
:class:`~confide.errors.PrivacyStateError`. The intended protocol is *write-ahead*:
record the round's events and persist :meth:`~PrivacyAccountant.to_state` **before** the
noised result is released, so a crash can only over-count, never under-count, the budget.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import dp_accounting  # type: ignore[import-untyped]
from dp_accounting import pld, rdp

from confide.errors import BudgetExceeded, InvalidPrivacyConfig, PrivacyStateError

__all__ = [
    "Budget",
    "EventKind",
    "PrivacyAccountant",
    "PrivacyEvent",
    "Relation",
    "RoundRecord",
    "calibrate_noise_multiplier",
    "client_fixed_cohort_event",
    "client_poisson_event",
    "dpsgd_event",
]

Relation = Literal["add_or_remove", "replace_one"]
EventKind = Literal["gaussian", "poisson_gaussian", "wor_gaussian", "zcdp"]

_STATE_VERSION = 1
_RELATIONS: dict[str, Any] = {
    "add_or_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}
#: Relative slack allowed between a stored epsilon and the same ledger re-accounted.
_REPRO_RTOL = 1e-9


def _finite_nonneg(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise InvalidPrivacyConfig(f"{name} must be finite and >= 0, got {value!r}")
    return v


@dataclass(frozen=True)
class PrivacyEvent:
    """One mechanism application (possibly repeated ``count`` times), JSON-safe.

    Build events with :func:`dpsgd_event`, :func:`client_poisson_event`,
    :func:`client_fixed_cohort_event` or :func:`confide.privacy.client_dp.ddg_event` rather
    than by hand.

    Parameters
    ----------
    kind : {"gaussian", "poisson_gaussian", "wor_gaussian", "zcdp"}
        Which dp-accounting event this is (see the module table).
    relation : {"add_or_remove", "replace_one"}
        Neighbouring relation the event is stated for.
    noise_multiplier : float
        Noise standard deviation divided by the per-unit clip norm ``C`` (Gaussian kinds).
        ``0`` means no noise (epsilon is infinite).
    sampling_rate : float
        Poisson inclusion probability ``q`` (``poisson_gaussian``).
    population, sample_size : int
        ``N`` and ``m`` of sampling without replacement (``wor_gaussian``).
    rho, xi : float
        ``(xi, rho)``-zCDP parameters: RDP of order ``alpha`` is ``xi + rho * alpha``.
    count : int
        Number of times the mechanism is applied (e.g. DP-SGD steps in the round).
    label : str
        Free-form tag stored with the event (``"dpsgd"``, ``"ddg"``, ...).

    Examples
    --------
    >>> e = dpsgd_event(0.01, 1.0, 10)
    >>> e.kind, e.count
    ('poisson_gaussian', 10)
    >>> PrivacyEvent.from_dict(e.to_dict()) == e
    True
    """

    kind: EventKind
    relation: Relation = "add_or_remove"
    noise_multiplier: float = 0.0
    sampling_rate: float = 1.0
    population: int = 0
    sample_size: int = 0
    rho: float = 0.0
    xi: float = 0.0
    count: int = 1
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "poisson_gaussian", "wor_gaussian", "zcdp"):
            raise InvalidPrivacyConfig(f"unknown event kind {self.kind!r}")
        if self.relation not in _RELATIONS:
            raise InvalidPrivacyConfig(
                f"relation must be 'add_or_remove' or 'replace_one', got {self.relation!r}"
            )
        if not (isinstance(self.count, int) and self.count >= 0):
            raise InvalidPrivacyConfig(f"count must be an int >= 0, got {self.count!r}")
        _finite_nonneg("noise_multiplier", self.noise_multiplier)
        _finite_nonneg("rho", self.rho)
        _finite_nonneg("xi", self.xi)
        if not 0.0 <= self.sampling_rate <= 1.0:
            raise InvalidPrivacyConfig(f"sampling_rate must be in [0, 1], got {self.sampling_rate}")
        if self.kind == "wor_gaussian":
            if self.relation != "replace_one":
                raise InvalidPrivacyConfig(
                    "sampling without replacement is accounted under replace_one"
                )
            if not 0 < self.sample_size <= self.population:
                raise InvalidPrivacyConfig(
                    "wor_gaussian needs 0 < sample_size <= population, got "
                    f"{self.sample_size} of {self.population}"
                )
        if self.kind in ("gaussian", "poisson_gaussian") and self.relation != "add_or_remove":
            raise InvalidPrivacyConfig(
                f"{self.kind} events are accounted under add_or_remove; fixed-size cohorts "
                "use client_fixed_cohort_event"
            )

    @property
    def pld_supported(self) -> bool:
        """Whether dp-accounting's PLD accountant can account this event."""
        return self.kind in ("gaussian", "poisson_gaussian") or self.count == 0

    def to_dp_event(self) -> Any:
        """Return the equivalent ``dp_accounting.DpEvent``.

        Returns
        -------
        dp_accounting.DpEvent
            The event, wrapped in ``SelfComposedDpEvent`` when ``count > 1``.
        """
        if self.count == 0:
            return dp_accounting.NoOpDpEvent()
        base: Any
        if self.kind == "zcdp":
            base = dp_accounting.ZCDpEvent(rho=self.rho, xi=self.xi)
        elif self.noise_multiplier == 0.0:
            base = dp_accounting.NonPrivateDpEvent()
        elif self.kind == "gaussian" or (
            self.kind == "poisson_gaussian" and self.sampling_rate == 1.0
        ):
            base = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        elif self.kind == "poisson_gaussian":
            if self.sampling_rate == 0.0:
                return dp_accounting.NoOpDpEvent()
            base = dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
            )
        else:  # wor_gaussian: replace-one sensitivity of a clipped sum is 2 C.
            base = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population,
                self.sample_size,
                dp_accounting.GaussianDpEvent(self.noise_multiplier / 2.0),
            )
        return base if self.count == 1 else dp_accounting.SelfComposedDpEvent(base, self.count)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyEvent:
        """Rebuild an event from :meth:`to_dict` output.

        Parameters
        ----------
        d : dict
            Output of :meth:`to_dict`.

        Returns
        -------
        PrivacyEvent
            The event.
        """
        try:
            return cls(**d)
        except TypeError as exc:
            raise PrivacyStateError(f"malformed privacy event {d!r}: {exc}") from exc


def dpsgd_event(sampling_rate: float, noise_multiplier: float, steps: int) -> PrivacyEvent:
    """Event of ``steps`` DP-SGD steps with Poisson sampling of patients.

    Parameters
    ----------
    sampling_rate : float
        Probability ``q`` that a patient is in a step's batch (Poisson sampling).
    noise_multiplier : float
        ``z``: noise std divided by the per-patient clip norm.
    steps : int
        Number of steps.

    Returns
    -------
    PrivacyEvent
        A ``poisson_gaussian`` event under add/remove one patient.

    Examples
    --------
    >>> dpsgd_event(0.01, 1.0, 1000).to_dp_event().count
    1000
    """
    return PrivacyEvent(
        "poisson_gaussian",
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        count=int(steps),
        label="dpsgd",
    )


def client_poisson_event(
    sampling_rate: float, noise_multiplier: float, rounds: int = 1
) -> PrivacyEvent:
    """Event of client-level DP with central Gaussian noise and Poisson cohorts.

    Parameters
    ----------
    sampling_rate : float
        Probability that a client is in a round's cohort (``1.0``: every client).
    noise_multiplier : float
        ``z``: the server adds ``N(0, (z * C)**2)`` to the sum of clipped updates.
    rounds : int, default 1
        Number of rounds.

    Returns
    -------
    PrivacyEvent
        A ``poisson_gaussian`` event under add/remove one client.

    Examples
    --------
    >>> client_poisson_event(1.0, 2.0).sampling_rate
    1.0
    """
    return PrivacyEvent(
        "poisson_gaussian",
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        count=int(rounds),
        label="client_central",
    )


def client_fixed_cohort_event(
    population: int, cohort_size: int, noise_multiplier: float, rounds: int = 1
) -> PrivacyEvent:
    """Event of client-level DP with central noise and fixed-size cohorts.

    ``cohort_size`` clients are drawn uniformly without replacement from ``population``;
    accounted under *replace one client* with RDP (see the module docs).

    Parameters
    ----------
    population : int
        Number of clients ``N`` the cohort is drawn from (public).
    cohort_size : int
        Cohort size ``m``.
    noise_multiplier : float
        ``z``: the server adds ``N(0, (z * C)**2)`` to the sum of clipped updates.
    rounds : int, default 1
        Number of rounds.

    Returns
    -------
    PrivacyEvent
        A ``wor_gaussian`` event.

    Examples
    --------
    >>> client_fixed_cohort_event(100, 10, 1.0).relation
    'replace_one'
    """
    return PrivacyEvent(
        "wor_gaussian",
        relation="replace_one",
        noise_multiplier=noise_multiplier,
        population=int(population),
        sample_size=int(cohort_size),
        count=int(rounds),
        label="client_central",
    )


def _run_length(events: Sequence[PrivacyEvent]) -> list[PrivacyEvent]:
    """Merge events that differ only in ``count`` (and ``label``), summing the counts.

    Composition is commutative, so composing ``SelfComposed(e, a + b)`` is the same
    mechanism as composing ``e`` ``a`` times and later ``b`` times. dp-accounting's PLD is
    much faster (and slightly tighter) on the merged form. The merge is canonical (first
    appearance order), so a ledger always re-accounts to the same number.
    """
    out: list[PrivacyEvent] = []
    for e in events:
        if e.count == 0:
            continue
        for i, prev in enumerate(out):
            if _same_but_count(prev, e):
                out[i] = PrivacyEvent(**{**prev.to_dict(), "count": prev.count + e.count})
                break
        else:
            out.append(e)
    return out


def _same_but_count(a: PrivacyEvent, b: PrivacyEvent) -> bool:
    da, db = a.to_dict(), b.to_dict()
    da.pop("count")
    db.pop("count")
    da.pop("label")
    db.pop("label")
    return da == db


@dataclass(frozen=True)
class _Epsilons:
    epsilon: float
    epsilon_pld: float | None
    epsilon_rdp: float
    method: Literal["pld", "rdp"]


@dataclass(frozen=True)
class RoundRecord:
    """What the accountant stored for one released round.

    Parameters
    ----------
    round_id : int
        The round number (unique within the job).
    events : tuple of PrivacyEvent
        Everything released in the round.
    epsilon_round : float
        Epsilon at the accountant's delta of this round's events alone.
    epsilon : float
        Cumulative epsilon after this round (PLD where supported, else RDP).
    epsilon_rdp : float
        Cumulative RDP epsilon (cross-check; ``>= epsilon``).
    method : {"pld", "rdp"}
        Which accountant ``epsilon`` comes from.

    Examples
    --------
    >>> acc = PrivacyAccountant(1e-5)
    >>> rec = acc.record_round(0, [dpsgd_event(0.01, 1.0, 100)])
    >>> rec.method, rec.epsilon == rec.epsilon_round
    ('pld', True)
    """

    round_id: int
    events: tuple[PrivacyEvent, ...]
    epsilon_round: float
    epsilon: float
    epsilon_rdp: float
    method: Literal["pld", "rdp"]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (``inf`` is stored as the string ``"inf"``)."""
        return {
            "round": self.round_id,
            "events": [e.to_dict() for e in self.events],
            "epsilon_round": _enc(self.epsilon_round),
            "epsilon": _enc(self.epsilon),
            "epsilon_rdp": _enc(self.epsilon_rdp),
            "method": self.method,
        }


def _enc(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def _dec(x: Any) -> float:
    if x == "inf":
        return math.inf
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise PrivacyStateError(f"expected a number or 'inf', got {x!r}")


@dataclass
class PrivacyAccountant:
    """Per-round and cumulative epsilon of one job, durable across restarts.

    Parameters
    ----------
    delta : float
        The job's delta, in (0, 1); epsilon is reported at this delta.
    relation : {"add_or_remove", "replace_one"}, default "add_or_remove"
        Neighbouring relation of the guarantee; every recorded event must use it.
    pld_discretization : float, default 1e-4
        ``value_discretization_interval`` of the PLD accountant (pessimistic rounding,
        so the reported epsilon is an upper bound).

    Examples
    --------
    >>> acc = PrivacyAccountant(1e-5)
    >>> _ = acc.record_round(0, [dpsgd_event(0.01, 1.0, 500)])
    >>> _ = acc.record_round(1, [dpsgd_event(0.01, 1.0, 500)])
    >>> round(acc.epsilon(), 2), round(acc.epsilon_rdp(), 2)
    (1.83, 2.1)
    >>> PrivacyAccountant.from_state(acc.to_state()).epsilon() == acc.epsilon()
    True
    """

    delta: float
    relation: Relation = "add_or_remove"
    pld_discretization: float = 1e-4
    _rounds: list[RoundRecord] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise InvalidPrivacyConfig(f"delta must be in (0, 1), got {self.delta}")
        if self.relation not in _RELATIONS:
            raise InvalidPrivacyConfig(f"unknown relation {self.relation!r}")
        if not 0.0 < self.pld_discretization <= 0.1:
            raise InvalidPrivacyConfig(
                f"pld_discretization must be in (0, 0.1], got {self.pld_discretization}"
            )

    # ------------------------------------------------------------------ queries

    @property
    def rounds(self) -> tuple[RoundRecord, ...]:
        """The recorded rounds, in recording order."""
        return tuple(self._rounds)

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """Every recorded event, in order."""
        return tuple(e for r in self._rounds for e in r.events)

    def epsilon(self, delta: float | None = None) -> float:
        """Cumulative epsilon at ``delta`` (the job's delta by default).

        Parameters
        ----------
        delta : float, optional
            Target delta.

        Returns
        -------
        float
            PLD epsilon, or RDP epsilon where some event has no PLD; ``0.0`` when nothing
            was recorded, ``inf`` after a non-private release.
        """
        if delta is None and self._rounds:
            return self._rounds[-1].epsilon
        return self._account(self.events, self._delta(delta)).epsilon

    def epsilon_rdp(self, delta: float | None = None) -> float:
        """Cumulative RDP epsilon at ``delta`` (the cross-check).

        Parameters
        ----------
        delta : float, optional
            Target delta.

        Returns
        -------
        float
            RDP epsilon.
        """
        if delta is None and self._rounds:
            return self._rounds[-1].epsilon_rdp
        return self._account(self.events, self._delta(delta)).epsilon_rdp

    def epsilon_if(self, events: Sequence[PrivacyEvent], delta: float | None = None) -> float:
        """Cumulative epsilon the job would have after also releasing ``events``.

        Parameters
        ----------
        events : sequence of PrivacyEvent
            The next round's events.
        delta : float, optional
            Target delta.

        Returns
        -------
        float
            Projected cumulative epsilon.
        """
        self._check_relation(events)
        return self._account([*self.events, *events], self._delta(delta)).epsilon

    def round_epsilon(self, round_id: int) -> float:
        """Epsilon of one recorded round's events alone.

        Parameters
        ----------
        round_id : int
            A recorded round.

        Returns
        -------
        float
            The round's epsilon at the job's delta.
        """
        return self._find(round_id).epsilon_round

    # ------------------------------------------------------------------ recording

    def record_round(self, round_id: int, events: Sequence[PrivacyEvent]) -> RoundRecord:
        """Record the events released in ``round_id`` (idempotent).

        Call this, and persist :meth:`to_state`, *before* the round's noised result is
        released (write-ahead).

        Parameters
        ----------
        round_id : int
            Round number, unique within the job.
        events : sequence of PrivacyEvent
            Everything the round releases.

        Returns
        -------
        RoundRecord
            The stored record (the existing one when the round was already recorded with
            the same events).

        Raises
        ------
        PrivacyStateError
            The round was already recorded with different events.
        InvalidPrivacyConfig
            An event uses another neighbouring relation than the accountant.
        """
        evs = tuple(events)
        self._check_relation(evs)
        for r in self._rounds:
            if r.round_id == round_id:
                if r.events == evs:
                    return r
                raise PrivacyStateError(
                    f"round {round_id} was already recorded with different events; a "
                    "released round is never re-noised (start a new round id instead)"
                )
        one = self._account(evs, self.delta)
        total = self._account([*self.events, *evs], self.delta)
        rec = RoundRecord(
            round_id=int(round_id),
            events=evs,
            epsilon_round=one.epsilon,
            epsilon=total.epsilon,
            epsilon_rdp=total.epsilon_rdp,
            method=total.method,
        )
        self._rounds.append(rec)
        return rec

    # ------------------------------------------------------------------ durability

    def to_state(self) -> dict[str, Any]:
        """Return a JSON-safe snapshot; :meth:`from_state` restores it exactly.

        Returns
        -------
        dict
            ``{"version", "delta", "relation", "pld_discretization", "dp_accounting",
            "rounds": [...]}``.
        """
        return {
            "version": _STATE_VERSION,
            "delta": self.delta,
            "relation": self.relation,
            "pld_discretization": self.pld_discretization,
            "dp_accounting": _dp_accounting_version(),
            "rounds": [r.to_dict() for r in self._rounds],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], *, strict: bool = False) -> PrivacyAccountant:
        """Restore an accountant from :meth:`to_state` output, re-accounting every round.

        Every round is re-accounted from its events. The restored per-round values are the
        *larger* of the stored and the recomputed ones, so a restart can never lower the
        spent budget (e.g. after a dp-accounting upgrade).

        Parameters
        ----------
        state : dict
            Output of :meth:`to_state` (possibly through ``json``).
        strict : bool, default False
            Raise when a recomputed epsilon differs from the stored one by more than a
            relative 1e-9 (same library version expected).

        Returns
        -------
        PrivacyAccountant
            The restored accountant.

        Raises
        ------
        PrivacyStateError
            Malformed state, or (``strict``) a stored epsilon that does not reproduce.
        """
        try:
            if state["version"] != _STATE_VERSION:
                raise PrivacyStateError(f"unsupported state version {state['version']!r}")
            acc = cls(
                delta=float(state["delta"]),
                relation=state["relation"],
                pld_discretization=float(state["pld_discretization"]),
            )
            stored = list(state["rounds"])
        except (KeyError, TypeError) as exc:
            raise PrivacyStateError(f"malformed accountant state: {exc!r}") from exc
        for raw in stored:
            try:
                events = [PrivacyEvent.from_dict(e) for e in raw["events"]]
                rec = acc.record_round(int(raw["round"]), events)
                saved = {k: _dec(raw[k]) for k in ("epsilon_round", "epsilon", "epsilon_rdp")}
            except (KeyError, TypeError) as exc:
                raise PrivacyStateError(f"malformed round record {raw!r}: {exc!r}") from exc
            fresh = {k: getattr(rec, k) for k in saved}
            if strict:
                for k, v in saved.items():
                    if not _close(v, fresh[k]):
                        raise PrivacyStateError(
                            f"round {rec.round_id}: stored {k}={v!r} does not reproduce "
                            f"(re-accounted {fresh[k]!r})"
                        )
            acc._rounds[-1] = RoundRecord(
                round_id=rec.round_id,
                events=rec.events,
                epsilon_round=max(saved["epsilon_round"], fresh["epsilon_round"]),
                epsilon=max(saved["epsilon"], fresh["epsilon"]),
                epsilon_rdp=max(saved["epsilon_rdp"], fresh["epsilon_rdp"]),
                method=rec.method,
            )
        return acc

    # ------------------------------------------------------------------ internals

    def _delta(self, delta: float | None) -> float:
        d = self.delta if delta is None else float(delta)
        if not 0.0 < d < 1.0:
            raise InvalidPrivacyConfig(f"delta must be in (0, 1), got {d}")
        return d

    def _find(self, round_id: int) -> RoundRecord:
        for r in self._rounds:
            if r.round_id == round_id:
                return r
        raise PrivacyStateError(f"round {round_id} was not recorded")

    def _check_relation(self, events: Sequence[PrivacyEvent]) -> None:
        for e in events:
            if not isinstance(e, PrivacyEvent):
                raise InvalidPrivacyConfig(f"expected PrivacyEvent, got {type(e).__name__}")
            if e.relation != self.relation and e.count > 0:
                raise InvalidPrivacyConfig(
                    f"event {e.kind!r} ({e.label or 'unlabelled'}) is stated for "
                    f"{e.relation!r} but the accountant uses {self.relation!r}"
                )

    def _account(self, events: Sequence[PrivacyEvent], delta: float) -> _Epsilons:
        return account(events, delta, self.relation, self.pld_discretization)


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= _REPRO_RTOL * max(1.0, abs(a), abs(b))


def _dp_accounting_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dp-accounting")
    except PackageNotFoundError:  # pragma: no cover - vendored installs
        return "unknown"


def account(
    events: Sequence[PrivacyEvent],
    delta: float,
    relation: Relation = "add_or_remove",
    pld_discretization: float = 1e-4,
) -> _Epsilons:
    """Account ``events`` with fresh dp-accounting accountants.

    Parameters
    ----------
    events : sequence of PrivacyEvent
        Events to compose, in order.
    delta : float
        Target delta.
    relation : {"add_or_remove", "replace_one"}
        Neighbouring relation.
    pld_discretization : float
        PLD value discretization interval.

    Returns
    -------
    _Epsilons
        ``epsilon`` (PLD when supported, else RDP), ``epsilon_pld`` (or None),
        ``epsilon_rdp`` and ``method``.
    """
    return _account_cached(tuple(_run_length(events)), float(delta), relation, pld_discretization)


@functools.lru_cache(maxsize=256)
def _account_cached(
    merged: tuple[PrivacyEvent, ...], delta: float, relation: Relation, pld_discretization: float
) -> _Epsilons:
    # Pure function of a canonical ledger: cached so that identical rounds (the common case)
    # and what-if budget checks do not recompute the same PLD.
    rel = _RELATIONS[relation]
    r = rdp.RdpAccountant(neighboring_relation=rel)
    for e in merged:
        r.compose(e.to_dp_event())
    eps_rdp = 0.0 if not merged else float(r.get_epsilon(delta))
    if all(e.pld_supported for e in merged):
        p = pld.PLDAccountant(rel, value_discretization_interval=pld_discretization)
        for e in merged:
            p.compose(e.to_dp_event())
        eps_pld = 0.0 if not merged else float(p.get_epsilon(delta))
        return _Epsilons(eps_pld, eps_pld, eps_rdp, "pld")
    return _Epsilons(eps_rdp, None, eps_rdp, "rdp")


@dataclass(frozen=True)
class Budget:
    """A job's privacy budget: ``(epsilon_max, delta)``, checked *before* each round.

    Parameters
    ----------
    epsilon_max : float
        Largest cumulative epsilon the job may reach (inclusive).
    delta : float
        The delta the budget is stated at.

    Examples
    --------
    >>> acc = PrivacyAccountant(1e-5)
    >>> budget = Budget(1.0, 1e-5)
    >>> budget.allows(acc, [dpsgd_event(0.01, 1.0, 100)])
    True
    >>> budget.allows(acc, [dpsgd_event(0.01, 1.0, 2000)])
    False
    """

    epsilon_max: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon_max > 0.0 and not math.isnan(self.epsilon_max)):
            raise InvalidPrivacyConfig(f"epsilon_max must be > 0, got {self.epsilon_max}")
        if not 0.0 < self.delta < 1.0:
            raise InvalidPrivacyConfig(f"delta must be in (0, 1), got {self.delta}")

    def spent(self, accountant: PrivacyAccountant) -> float:
        """Cumulative epsilon already spent, at the budget's delta.

        Parameters
        ----------
        accountant : PrivacyAccountant
            The job's accountant.

        Returns
        -------
        float
            Spent epsilon.
        """
        return accountant.epsilon(self.delta)

    def projected(
        self, accountant: PrivacyAccountant, next_events: Sequence[PrivacyEvent]
    ) -> float:
        """Cumulative epsilon if the next round (``next_events``) also ran.

        Parameters
        ----------
        accountant : PrivacyAccountant
            The job's accountant.
        next_events : sequence of PrivacyEvent
            The next round's events.

        Returns
        -------
        float
            Projected epsilon at the budget's delta.
        """
        return accountant.epsilon_if(next_events, self.delta)

    def allows(self, accountant: PrivacyAccountant, next_events: Sequence[PrivacyEvent]) -> bool:
        """Whether the next round can run without exceeding ``epsilon_max``.

        Parameters
        ----------
        accountant : PrivacyAccountant
            The job's accountant.
        next_events : sequence of PrivacyEvent
            The next round's events.

        Returns
        -------
        bool
            ``True`` when the projected epsilon is ``<= epsilon_max``.
        """
        return self.projected(accountant, next_events) <= self.epsilon_max

    def check(self, accountant: PrivacyAccountant, next_events: Sequence[PrivacyEvent]) -> float:
        """Raise :class:`BudgetExceeded` unless the next round fits in the budget.

        Parameters
        ----------
        accountant : PrivacyAccountant
            The job's accountant.
        next_events : sequence of PrivacyEvent
            The next round's events.

        Returns
        -------
        float
            The projected cumulative epsilon (``<= epsilon_max``).

        Raises
        ------
        BudgetExceeded
            The round would take epsilon above ``epsilon_max``.
        """
        eps = self.projected(accountant, next_events)
        if eps > self.epsilon_max:
            raise BudgetExceeded(
                f"the next round would bring epsilon to {eps:.4g} > budget "
                f"{self.epsilon_max:.4g} at delta={self.delta:g}; training stops here",
                projected_epsilon=eps,
                epsilon_max=self.epsilon_max,
            )
        return eps


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    tol: float = 1e-3,
) -> float:
    """Smallest noise multiplier whose Poisson-sampled Gaussian meets ``target_epsilon``.

    Uses ``dp_accounting.calibrate_dp_mechanism``: first with RDP (fast, gives an upper
    end ``z_rdp`` of the bracket, since PLD epsilon <= RDP epsilon), then with PLD inside
    ``[z_rdp / 4, z_rdp]``. The returned value never exceeds the target by more than the
    search tolerance allows; verify with :func:`account` when it matters.

    Parameters
    ----------
    target_epsilon : float
        Target epsilon (> 0).
    delta : float
        Target delta.
    sampling_rate : float
        Poisson sampling rate ``q`` in (0, 1].
    steps : int
        Number of compositions (DP-SGD steps, or rounds for client-level DP).
    tol : float, default 1e-3
        Tolerance on the noise multiplier.

    Returns
    -------
    float
        Noise multiplier ``z``.

    Examples
    --------
    >>> z = calibrate_noise_multiplier(2.0, 1e-5, 1.0, 10)
    >>> e = account([client_poisson_event(1.0, z, 10)], 1e-5).epsilon
    >>> bool(1.95 < e <= 2.0)
    True
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise InvalidPrivacyConfig(f"target_epsilon must be finite and > 0, got {target_epsilon}")
    if not 0.0 < sampling_rate <= 1.0:
        raise InvalidPrivacyConfig(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if steps < 1:
        raise InvalidPrivacyConfig(f"steps must be >= 1, got {steps}")

    def make(z: float) -> Any:
        return PrivacyEvent(
            "poisson_gaussian", noise_multiplier=z, sampling_rate=sampling_rate, count=steps
        ).to_dp_event()

    z_rdp = float(
        dp_accounting.calibrate_dp_mechanism(
            rdp.RdpAccountant,
            make,
            target_epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=tol,
        )
    )
    return _calibrate_pld(make, target_epsilon, delta, z_rdp, tol)


def _calibrate_pld(
    make: Callable[[float], Any], target_epsilon: float, delta: float, upper: float, tol: float
) -> float:
    lower = upper / 4.0

    def fresh() -> Any:
        return pld.PLDAccountant()

    def eps(z: float) -> float:
        a = fresh()
        a.compose(make(z))
        return float(a.get_epsilon(delta))

    if eps(lower) <= target_epsilon:  # pragma: no cover - PLD never 4x tighter in practice
        return lower
    z = float(
        dp_accounting.calibrate_dp_mechanism(
            fresh,
            make,
            target_epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(lower, upper),
            tol=tol,
        )
    )
    # Brent stops within tol of the optimum; step up until the target is met.
    while eps(z) > target_epsilon:
        z += tol
    return z


def calibrate(
    make_events: Callable[[float], Sequence[PrivacyEvent]],
    target_epsilon: float,
    delta: float,
    *,
    relation: Relation = "add_or_remove",
    lower: float = 1e-2,
    upper: float = 1e3,
    tol: float = 1e-3,
) -> float:
    """Smallest parameter ``z`` (noise grows with ``z``) with ``epsilon <= target``.

    Generic bisection on :func:`account` for ledgers :func:`calibrate_noise_multiplier`
    does not cover (DDG, fixed-size cohorts, several events per round).

    Parameters
    ----------
    make_events : callable
        ``z -> events`` of the whole planned run; epsilon must decrease as ``z`` grows.
    target_epsilon : float
        Target epsilon.
    delta : float
        Target delta.
    relation : {"add_or_remove", "replace_one"}
        Neighbouring relation.
    lower, upper : float
        Search interval for ``z``.
    tol : float
        Absolute tolerance on ``z``.

    Returns
    -------
    float
        ``z`` with ``account(make_events(z)).epsilon <= target_epsilon``.

    Raises
    ------
    InvalidPrivacyConfig
        Even ``upper`` does not reach the target.
    """

    def eps(z: float) -> float:
        return account(make_events(z), delta, relation).epsilon

    if eps(upper) > target_epsilon:
        raise InvalidPrivacyConfig(
            f"target epsilon {target_epsilon} is not reachable with z <= {upper}"
        )
    lo, hi = lower, upper
    if eps(lo) <= target_epsilon:
        return lo
    while hi - lo > tol:
        mid = math.sqrt(lo * hi)  # z spans decades: bisect geometrically
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
