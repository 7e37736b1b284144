"""The accountant is dp-accounting, budgets stop jobs, state survives restarts."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.errors import ConfideError
from confide.privacy import (
    Budget,
    BudgetExceeded,
    InvalidPrivacyConfig,
    PrivacyAccountant,
    PrivacyStateError,
    calibrate_noise_multiplier,
    client_fixed_cohort_event,
    client_poisson_event,
    dpsgd_event,
)
from confide.privacy.accountant import (
    PrivacyEvent,
    _account_cached,
    _pld_cached,
    _rdp_cached,
    _sampled_step,
    account,
)

DELTA = 1e-5


def _direct(event: object, relation: object = None) -> tuple[float, float]:
    rel = relation or dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    p = pld.PLDAccountant(rel)
    p.compose(event)
    r = rdp.RdpAccountant(neighboring_relation=rel)
    r.compose(event)
    return p.get_epsilon(DELTA), r.get_epsilon(DELTA)


def test_known_case_pld_183_rdp_210() -> None:
    # q=0.01, sigma=1.0, 1000 steps, delta=1e-5 (Abadi et al. 2016's running example).
    acc = PrivacyAccountant(DELTA)
    rec = acc.record_round(0, [dpsgd_event(0.01, 1.0, 1000)])
    assert rec.method == "pld"
    assert rec.epsilon == pytest.approx(1.83, abs=0.005)
    assert rec.epsilon_rdp == pytest.approx(2.10, abs=0.005)


def test_epsilon_matches_dp_accounting_called_directly() -> None:
    # RDP is dp-accounting's sum, bit for bit. PLD: sampled events are dp-accounting's PMFs
    # self-composed by FFT as dp-accounting does (only the FFT length differs: agreement to
    # rounding, measured <= 1e-9 relative); q = 1 is the exact analytic Gaussian, never
    # above dp-accounting's pessimistic PLD and within 1e-9 of it.
    cases = [
        (dpsgd_event(0.05, 1.1, 40), 0.05, 1.1, 40),
        (client_poisson_event(1.0, 2.0, 7), 1.0, 2.0, 7),
        (client_poisson_event(0.3, 0.9, 12), 0.3, 0.9, 12),
    ]
    for ev, q, z, steps in cases:
        base = (
            dp_accounting.GaussianDpEvent(z)
            if q == 1.0
            else dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        )
        want_pld, want_rdp = _direct(dp_accounting.SelfComposedDpEvent(base, steps))
        got = account([ev], DELTA)
        assert got.epsilon == pytest.approx(want_pld, rel=1e-8)
        if q == 1.0:
            assert got.epsilon <= want_pld
        assert got.epsilon_rdp == want_rdp


def test_rounds_compose_like_one_event() -> None:
    acc = PrivacyAccountant(DELTA)
    for r in range(4):
        acc.record_round(r, [dpsgd_event(0.02, 1.2, 25)])
    want_pld, want_rdp = _direct(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.2)), 100
        )
    )
    assert acc.epsilon() == pytest.approx(want_pld, rel=1e-8)
    assert acc.epsilon() == account([dpsgd_event(0.02, 1.2, 100)], DELTA).epsilon
    assert acc.epsilon_rdp() == want_rdp
    # Per round: the first round's epsilon is that round alone; cumulative grows.
    eps = [r.epsilon for r in acc.rounds]
    assert eps == sorted(eps)
    assert acc.rounds[0].epsilon_round == acc.rounds[0].epsilon
    assert all(r.epsilon_round == acc.rounds[0].epsilon_round for r in acc.rounds)


@settings(max_examples=8, deadline=None)
@given(
    q=st.floats(0.001, 1.0),
    z=st.floats(0.6, 8.0),
    steps=st.integers(1, 30),
)
def test_rdp_cross_check_never_below_pld(q: float, z: float, steps: int) -> None:
    got = account([dpsgd_event(q, z, steps)], DELTA)
    assert got.method == "pld"
    assert got.epsilon_rdp >= got.epsilon - 1e-9


def test_fixed_cohort_is_rdp_with_replace_one_and_double_sensitivity() -> None:
    ev = client_fixed_cohort_event(100, 10, 2.0, rounds=5)
    acc = PrivacyAccountant(DELTA, relation="replace_one")
    rec = acc.record_round(0, [ev])
    assert rec.method == "rdp"
    r = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    r.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(
                100, 10, dp_accounting.GaussianDpEvent(1.0)
            ),
            5,
        )
    )
    assert rec.epsilon == r.get_epsilon(DELTA)
    with pytest.raises(InvalidPrivacyConfig, match="replace_one"):
        PrivacyAccountant(DELTA).record_round(0, [ev])


def test_zero_noise_is_infinite_and_sampling_zero_is_free() -> None:
    assert math.isinf(account([dpsgd_event(0.1, 0.0, 3)], DELTA).epsilon)
    assert account([dpsgd_event(0.0, 1.0, 3)], DELTA).epsilon == 0.0
    assert PrivacyAccountant(DELTA).epsilon() == 0.0


def test_calibrate_noise_multiplier_meets_target_tightly() -> None:
    z = calibrate_noise_multiplier(2.0, DELTA, 0.1, 50)
    eps = account([dpsgd_event(0.1, z, 50)], DELTA).epsilon
    assert eps <= 2.0
    assert account([dpsgd_event(0.1, z - 0.01, 50)], DELTA).epsilon > 2.0


def test_budget_stops_a_job_before_it_is_exceeded() -> None:
    # At the accountant level: the server loop calls Budget.check before every round.
    acc = PrivacyAccountant(DELTA)
    budget = Budget(epsilon_max=1.0, delta=DELTA)
    nxt = [client_poisson_event(1.0, 4.0)]
    ran = 0
    while budget.allows(acc, nxt) and ran < 1000:
        budget.check(acc, nxt)  # what the server calls before starting a round
        acc.record_round(ran, nxt)
        ran += 1
    with pytest.raises(BudgetExceeded) as info:
        budget.check(acc, nxt)
    assert 0 < ran < 1000
    assert acc.epsilon() <= 1.0
    assert info.value.projected_epsilon > 1.0
    assert isinstance(info.value, ConfideError)
    assert budget.spent(acc) == acc.epsilon()


def test_restart_does_not_change_epsilon_of_finished_run() -> None:
    acc = PrivacyAccountant(DELTA)
    for r in range(3):
        acc.record_round(r, [dpsgd_event(0.03, 1.0, 20), client_poisson_event(1.0, 5.0)])
    blob = json.dumps(acc.to_state())
    for cache in (_account_cached, _pld_cached, _rdp_cached, _sampled_step):
        cache.cache_clear()  # a restarted process recomputes from scratch
    restored = PrivacyAccountant.from_state(json.loads(blob), strict=True)
    assert restored.epsilon() == acc.epsilon()
    assert restored.epsilon_rdp() == acc.epsilon_rdp()
    assert [r.to_dict() for r in restored.rounds] == [r.to_dict() for r in acc.rounds]
    # Re-recording a released round is a no-op; different events for it are refused.
    again = restored.record_round(2, [dpsgd_event(0.03, 1.0, 20), client_poisson_event(1.0, 5.0)])
    assert again == acc.rounds[2]
    with pytest.raises(PrivacyStateError, match="never re-noised"):
        restored.record_round(2, [dpsgd_event(0.03, 0.5, 20)])
    assert restored.epsilon() == acc.epsilon()


def test_restart_never_lowers_stored_epsilon() -> None:
    acc = PrivacyAccountant(DELTA)
    acc.record_round(0, [client_poisson_event(1.0, 3.0)])
    state = acc.to_state()
    state["rounds"][0]["epsilon"] = 99.0  # e.g. written by an older, looser library
    assert PrivacyAccountant.from_state(state).epsilon() == 99.0
    with pytest.raises(PrivacyStateError, match="does not reproduce"):
        PrivacyAccountant.from_state(state, strict=True)
    with pytest.raises(PrivacyStateError):
        PrivacyAccountant.from_state({"version": 1})


def test_event_round_trip_and_validation() -> None:
    ev = client_fixed_cohort_event(50, 5, 1.0)
    assert PrivacyEvent.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev
    with pytest.raises(InvalidPrivacyConfig):
        PrivacyEvent("poisson_gaussian", sampling_rate=1.5, noise_multiplier=1.0)
    with pytest.raises(InvalidPrivacyConfig):
        PrivacyEvent("gaussian", noise_multiplier=-1.0)
    with pytest.raises(InvalidPrivacyConfig):
        Budget(0.0, DELTA)
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant(0.0)
