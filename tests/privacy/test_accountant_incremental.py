"""Fast accounting: closed form, incremental == from scratch, restore without replay.

The accountant computes every epsilon from the run-length merged ledger (event kind ->
total count) with its own engine (``confide.privacy.accountant``, "fast PLD engine"). These
tests pin that engine to dp-accounting's ``PLDAccountant`` (what the accountant called
before), state how far apart they may be, and check the properties the server relies on:
the budget check charges what recording then charges, and a restart reads the stored state
(including states written by the previous accountant) without replaying the job.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mpmath
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.privacy import accountant as accountant_mod
from confide.privacy.accountant import (
    Budget,
    BudgetExceeded,
    PrivacyAccountant,
    PrivacyEvent,
    _fft_len,
    _pld_epsilon_dp_accounting,
    _Pmf,
    _pmf_epsilon,
    _run_length,
    _sampled_step,
    account,
    client_fixed_cohort_event,
    client_poisson_event,
    dpsgd_event,
)

DELTA = 1e-5
DISC = 1e-4
FIXTURE = Path(__file__).parent / "data" / "accountant_state_v1.json"


def _reference(events: list[PrivacyEvent], delta: float = DELTA) -> float:
    """dp-accounting's PLD epsilon of ``events`` (the previous accountant's number)."""
    return _pld_epsilon_dp_accounting(tuple(_run_length(events)), delta, DISC)


def _analytic_delta(mu: float, eps: float) -> Any:
    # Balle & Wang (2018), Thm. 8, at 60 digits: an independent check of the closed form.
    with mpmath.workdps(60):
        m, e = mpmath.mpf(mu), mpmath.mpf(eps)
        return mpmath.ncdf(m / 2 - e / m) - mpmath.exp(e) * mpmath.ncdf(-m / 2 - e / m)


# ------------------------------------------------------------------ closed form (q = 1)


@pytest.mark.parametrize(
    ("z", "rounds", "delta"),
    [(0.6, 10, 1e-5), (1.3, 8, 1e-5), (2.0, 7, 1e-4), (5.0, 3, 1e-6), (1.0, 1, 1e-5)],
)
def test_closed_form_gaussian_is_below_and_within_1e_6_of_dp_accounting(
    z: float, rounds: int, delta: float
) -> None:
    # dp-accounting's PLD of a Gaussian is a pessimistic discretisation: the exact value is
    # never above it. Measured gap: <= 4e-10 relative at these settings.
    ev = client_poisson_event(1.0, z, rounds)
    got = account([ev], delta).epsilon
    ref = _reference([ev], delta)
    assert got <= ref
    assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize(("z", "rounds"), [(0.6, 1000), (0.6, 1), (1.0, 100), (20.0, 50)])
def test_closed_form_meets_the_analytic_delta_tightly(z: float, rounds: int) -> None:
    # The q=1, z=0.6, 1,000-round job of the bench (mu = 52.7, epsilon ~ 1613) is out of
    # reach of dp-accounting's PLD (about 90 s); check it against the formula at 60 digits.
    mu = math.sqrt(rounds) / z
    eps = account([client_poisson_event(1.0, z, rounds)], DELTA).epsilon
    assert _analytic_delta(mu, eps) <= DELTA
    assert _analytic_delta(mu, eps * (1 - 1e-9)) > DELTA


def test_gaussian_kinds_merge_exactly() -> None:
    # mu^2 = 3 / 1^2 + 4 / 2^2 = 4: one Gaussian with z = 1 applied 4 times.
    mixed = [
        PrivacyEvent("gaussian", noise_multiplier=1.0, count=3),
        client_poisson_event(1.0, 2.0, 4),
    ]
    assert (
        account(mixed, DELTA).epsilon == account([client_poisson_event(1.0, 1.0, 4)], DELTA).epsilon
    )


def test_tiny_mu_is_free_and_zero_noise_infinite() -> None:
    assert account([client_poisson_event(1.0, 1e6)], DELTA).epsilon == 0.0
    assert math.isinf(account([client_poisson_event(1.0, 0.0)], DELTA).epsilon)
    assert math.isinf(
        account([dpsgd_event(0.1, 1.0, 3), client_poisson_event(1.0, 0.0)], DELTA).epsilon
    )


# ------------------------------------------------------------------ engine == dp-accounting


@settings(max_examples=6, deadline=None)
@given(
    q=st.floats(0.01, 0.5),
    z=st.floats(0.7, 3.0),
    n=st.integers(1, 60),
    delta=st.sampled_from([1e-3, 1e-5, 1e-7]),
)
def test_self_composition_and_epsilon_are_dp_accountings(
    q: float, z: float, n: int, delta: float
) -> None:
    ref = pld_lib.from_gaussian_mechanism(
        standard_deviation=z, value_discretization_interval=DISC, sampling_prob=q
    )
    composed = ref.self_compose(n)
    for side, pmf in enumerate((composed._pmf_remove, composed._pmf_add)):
        d = pmf.to_dense_pmf()
        mine = _sampled_step(q, z, DISC)[side].power(n)
        # Same truncation window; FFT lengths differ, so probabilities agree to rounding.
        assert mine.lower == d._lower_loss
        assert mine.probs.size == d._probs.size
        assert float(abs(mine.probs - d._probs).max()) < 1e-13
        assert mine.infinity_mass == pytest.approx(d._infinity_mass, rel=1e-12, abs=1e-300)
        # The vectorised epsilon on dp-accounting's own PMF is its loop's answer, to
        # rounding (the sums are accumulated in chunks; measured <= 5e-12 relative).
        same = _Pmf(d._lower_loss, d._probs, d._infinity_mass)
        assert _pmf_epsilon(same, delta, DISC) == pytest.approx(
            d.get_epsilon_for_delta(delta), rel=1e-9
        )


def test_epsilon_edge_cases_of_the_vectorised_reader() -> None:
    p = _Pmf(-2, pld_lib.np.array([0.25, 0.25, 0.25, 0.25]), 0.0)  # losses -2e-4 .. 1e-4
    assert _pmf_epsilon(p, 0.9, DISC) == 0.0
    assert math.isinf(_pmf_epsilon(_Pmf(0, p.probs * 0.5, 0.5), 0.1, DISC))


_COARSE = sorted({1 << k for k in range(27)} | {3 << k for k in range(26)})


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 1 << 25))
def test_fft_len_is_the_smallest_power_of_two_or_three_times_one(n: int) -> None:
    assert _fft_len(n) == min(s for s in _COARSE if s >= n)


# ------------------------------------------------------------------ incremental == scratch

_PALETTE = [
    client_poisson_event(1.0, 1.5),
    client_poisson_event(1.0, 3.0),
    dpsgd_event(0.1, 1.2, 3),
    dpsgd_event(0.05, 2.0, 5),
    client_poisson_event(0.5, 1.0),
]


@settings(max_examples=6, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, len(_PALETTE) - 1), min_size=1, max_size=2),
        min_size=1,
        max_size=5,
    )
)
def test_incremental_equals_from_scratch(rounds: list[list[int]]) -> None:
    acc = PrivacyAccountant(DELTA)
    seen: list[PrivacyEvent] = []
    for r, picks in enumerate(rounds):
        evs = [_PALETTE[i] for i in picks]
        projected = Budget(1e9, DELTA).check(acc, evs)
        rec = acc.record_round(r, evs)
        seen += evs
        scratch = account(seen, DELTA)
        # What the pre-round check promised is what recording charges, and both are the
        # from-scratch value of the whole ledger.
        assert rec.epsilon == scratch.epsilon == projected
        assert rec.epsilon_rdp == scratch.epsilon_rdp
        assert rec.epsilon_round == account(evs, DELTA).epsilon
        assert acc.epsilon(1e-6) == account(seen, 1e-6).epsilon
    # Relation to the previous accountant (dp-accounting's PLDAccountant): the same upper
    # bound to rounding (sampled events) and never above it (Gaussian events, exact).
    ref = _reference(seen)
    assert acc.epsilon() == pytest.approx(ref, rel=1e-8)
    assert acc.epsilon() <= ref * (1 + 1e-9)
    restored = PrivacyAccountant.from_state(json.loads(json.dumps(acc.to_state())))
    assert [x.to_dict() for x in restored.rounds] == [x.to_dict() for x in acc.rounds]


# ------------------------------------------------------------------ budget check


@pytest.mark.parametrize(
    "nxt",
    [
        [client_poisson_event(1.0, 2.0)],
        [dpsgd_event(0.05, 1.1, 20)],
        [dpsgd_event(0.05, 1.1, 20), client_poisson_event(1.0, 4.0)],
        [client_fixed_cohort_event(100, 10, 1.0)],
    ],
)
def test_budget_refuses_exactly_above_the_projected_epsilon(nxt: list[PrivacyEvent]) -> None:
    relation = nxt[0].relation
    acc = PrivacyAccountant(DELTA, relation=relation)
    for r in range(3):
        acc.record_round(r, nxt)
    want = account([*acc.events, *nxt], DELTA, relation).epsilon
    assert want > acc.epsilon()
    exact = Budget(want, DELTA)
    assert exact.allows(acc, nxt)
    assert exact.check(acc, nxt) == want
    below = Budget(math.nextafter(want, 0.0), DELTA)
    assert not below.allows(acc, nxt)
    with pytest.raises(BudgetExceeded) as info:
        below.check(acc, nxt)
    assert info.value.projected_epsilon == want
    # At another delta than the accountant's, the check accounts at that delta.
    other = account([*acc.events, *nxt], 1e-7, relation).epsilon
    assert Budget(other, 1e-7).allows(acc, nxt)
    assert not Budget(math.nextafter(other, 0.0), 1e-7).allows(acc, nxt)
    assert acc.record_round(3, nxt).epsilon == want


# ------------------------------------------------------------------ restore


@pytest.mark.parametrize("name", ["sample", "central", "mixed", "fixed_cohort"])
def test_restore_reads_the_state_the_previous_accountant_wrote(name: str) -> None:
    state = json.loads(FIXTURE.read_text())["states"][name]
    stored = state["rounds"]
    acc = PrivacyAccountant.from_state(state)
    events = [PrivacyEvent.from_dict(e) for r in stored for e in r["events"]]
    assert acc.events == tuple(events)
    assert [r.round_id for r in acc.rounds] == [r["round"] for r in stored]
    # History is kept as stored; the spent budget never goes below the stored value and
    # agrees with it to rounding (Gaussian rounds: the stored PLD value, which is larger
    # than the closed form by <= 4e-10 relative, is kept).
    for got, raw in zip(acc.rounds[:-1], stored[:-1], strict=True):
        assert got.epsilon == raw["epsilon"]
    assert acc.epsilon() >= stored[-1]["epsilon"]
    assert acc.epsilon() == pytest.approx(stored[-1]["epsilon"], rel=1e-8)
    assert acc.epsilon_rdp() == pytest.approx(stored[-1]["epsilon_rdp"], rel=1e-12)
    # The job continues from the restored ledger.
    nxt = [PrivacyEvent.from_dict(e) for e in stored[-1]["events"]]
    rec = acc.record_round(stored[-1]["round"] + 1, nxt)
    assert rec.epsilon == account([*events, *nxt], DELTA, acc.relation).epsilon
    assert rec.epsilon > acc.rounds[-2].epsilon
    # What is written now is the same format (version 1), readable by the previous code.
    again = acc.to_state()
    assert again["version"] == state["version"] == 1
    assert set(again) == set(state)
    assert set(again["rounds"][0]) == set(stored[0])


def test_restore_accounts_once_per_distinct_ledger_not_per_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acc = PrivacyAccountant(DELTA)
    ev = [client_poisson_event(1.0, 4.0)]
    for r in range(1000):
        acc.record_round(r, ev)
    state = json.loads(json.dumps(acc.to_state()))
    calls: list[tuple[PrivacyEvent, ...]] = []
    real = accountant_mod._account_cached

    def counting(merged: tuple[PrivacyEvent, ...], *rest: Any) -> Any:
        calls.append(merged)
        return real(merged, *rest)

    monkeypatch.setattr(accountant_mod, "_account_cached", counting)
    restored = PrivacyAccountant.from_state(state)
    # The round's own ledger and the whole job's: no replay of the 1,000 rounds.
    assert len(calls) == 2
    assert restored.epsilon() == acc.epsilon()
    assert [r.to_dict() for r in restored.rounds] == [r.to_dict() for r in acc.rounds]
    calls.clear()
    restored.epsilon_if(ev)
    assert len(calls) == 1


def test_restore_rejects_duplicated_and_malformed_rounds() -> None:
    acc = PrivacyAccountant(DELTA)
    acc.record_round(0, [client_poisson_event(1.0, 3.0)])
    state = acc.to_state()
    twice = {**state, "rounds": state["rounds"] * 2}
    with pytest.raises(accountant_mod.PrivacyStateError, match="stored twice"):
        PrivacyAccountant.from_state(twice)
    bad = json.loads(json.dumps(state))
    bad["rounds"][0]["method"] = "magic"
    with pytest.raises(accountant_mod.PrivacyStateError, match="method"):
        PrivacyAccountant.from_state(bad)
    bad["rounds"][0] = {"round": 1}
    with pytest.raises(accountant_mod.PrivacyStateError, match="malformed"):
        PrivacyAccountant.from_state(bad)


def test_spent_budget_never_decreases_after_restoring_a_larger_stored_value() -> None:
    acc = PrivacyAccountant(DELTA)
    ev = [client_poisson_event(1.0, 50.0)]
    acc.record_round(0, ev)
    state = acc.to_state()
    state["rounds"][0]["epsilon"] = 5.0  # e.g. written by an older, looser library
    restored = PrivacyAccountant.from_state(state)
    assert restored.epsilon_if(ev) == 5.0
    assert restored.record_round(1, ev).epsilon == 5.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.01, 0.05]), st.sampled_from([0.8, 1.3]), st.integers(0, 9)),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 5),
)
def test_ledger_is_the_run_length_of_every_event_and_header_plus_records_restores(
    rounds: list[tuple[float, float, int]], extra_steps: int
) -> None:
    acc = PrivacyAccountant(1e-5)
    for i, (q, z, steps) in enumerate(rounds):
        acc.record_round(i, [dpsgd_event(q, z, steps)])
    extra = [dpsgd_event(0.05, 1.3, extra_steps)]
    assert acc.ledger(extra) == tuple(_run_length([*acc.events, *extra]))
    assert account(acc.ledger(extra), 1e-5) == account([*acc.events, *extra], 1e-5)
    assert acc.round_record(len(rounds)) is None
    assert acc.round_record(0) == acc.rounds[0]
    header = acc.to_state(rounds=False)
    assert "rounds" not in header
    records = [r.to_dict() for r in acc.rounds]  # what a caller stores per round
    restored = PrivacyAccountant.from_state(json.loads(json.dumps({**header, "rounds": records})))
    assert restored.to_state() == acc.to_state()
