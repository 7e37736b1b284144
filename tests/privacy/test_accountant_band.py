"""The band-limited epsilon of a long sample-DP job (``_StepPmf.epsilon``).

A sample-DP job's cumulative epsilon is one Poisson-sampled Gaussian composed ``n`` times.
Past a few hundred steps the accountant reads it off ``F^n`` at the ~100 FFT bins that have
not underflowed, with closed-form tail sums and a search, instead of an inverse FFT of the
whole window and a walk down it (``_pmf_epsilon(step.power(n))``, the reference here, which
``tests/privacy/test_accountant_incremental.py`` pins to dp-accounting). These tests state
how far apart the two may be, that the fast path is taken where the server needs it, and
that it does no transform of the window's length per round.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.privacy import accountant as accountant_mod
from confide.privacy.accountant import (
    PrivacyAccountant,
    _pld_epsilon_dp_accounting,
    _pmf_epsilon,
    _sampled_step,
    account,
    dpsgd_event,
)

DISC = 1e-4
#: Measured: <= 1.4e-10 relative over 76 (q, z, n, delta, side) cases, n = 500 .. 160,000
#: (the two paths sum the same F^n values in a different order).
RTOL = 1e-9


def _both(q: float, z: float, n: int, delta: float) -> list[tuple[float | None, float]]:
    return [
        (step.epsilon(n, delta, DISC), _pmf_epsilon(step.power(n), delta, DISC))
        for step in _sampled_step(q, z, DISC)
    ]


def _length_change(q: float, z: float, lo: int, hi: int) -> int:
    """Smallest ``n`` in ``(lo, hi]`` whose FFT length (remove side) differs from ``n - 1``'s."""
    step = _sampled_step(q, z, DISC)[0]
    first = step._window(lo)[2]
    a, b = lo, hi
    assert step._window(b)[2] != first
    while b - a > 1:
        mid = (a + b) // 2
        if step._window(mid)[2] == first:
            a = mid
        else:
            b = mid
    return b


@pytest.mark.parametrize("n", [1_000, 10_000, 40_000, 80_000])
@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_soak_job_epsilon_equals_the_inverse_fft_reader(n: int, delta: float) -> None:
    # The soak's sample-DP job: q = 0.01, z = 1.1, 10 steps a round (rounds 100 .. 8,000).
    for fast, direct in _both(0.01, 1.1, n, delta):
        assert fast is not None  # the band-limited path is the one the server takes
        assert fast == pytest.approx(direct, rel=RTOL)


def test_equal_across_an_fft_length_change() -> None:
    n = _length_change(0.01, 1.1, 10_000, 40_000)
    step = _sampled_step(0.01, 1.1, DISC)[0]
    assert step._window(n - 1)[2] != step._window(n)[2]
    for m in (n - 1, n, n + 10):
        for fast, direct in _both(0.01, 1.1, m, 1e-5):
            assert fast is not None
            assert fast == pytest.approx(direct, rel=RTOL)


@pytest.mark.parametrize(("q", "z", "n"), [(0.01, 1.1, 2_000), (0.05, 0.9, 600), (0.2, 2.0, 300)])
def test_account_equals_dp_accountings_pld_accountant(q: float, z: float, n: int) -> None:
    events = (dpsgd_event(q, z, n),)
    ref = _pld_epsilon_dp_accounting(events, 1e-5, DISC)
    got = account(list(events), 1e-5).epsilon
    assert all(fast is not None for fast, _ in _both(q, z, n, 1e-5))
    assert got == pytest.approx(ref, rel=1e-8)


@settings(max_examples=8, deadline=None)
@given(
    q=st.floats(0.005, 0.3),
    z=st.floats(0.7, 3.0),
    n=st.integers(300, 30_000),
    delta=st.sampled_from([0.3, 1e-3, 1e-5, 1e-7]),
)
def test_band_limited_epsilon_is_the_readers_to_rounding(
    q: float, z: float, n: int, delta: float
) -> None:
    for fast, direct in _both(q, z, n, delta):
        if fast is None:  # declined (spectrum not concentrated, or losses past 600)
            continue
        # Never below the reference by more than rounding: it is the same upper bound.
        assert fast >= direct - RTOL * max(1.0, direct)
        assert fast == pytest.approx(direct, rel=RTOL, abs=1e-12)


def test_declines_where_the_spectrum_is_not_concentrated() -> None:
    # Ten steps: thousands of live bins; the caller takes the inverse FFT, same answer.
    remove, _ = _sampled_step(0.01, 1.1, DISC)
    assert remove.epsilon(10, 1e-5, DISC) is None
    events = (dpsgd_event(0.01, 1.1, 10),)
    assert account(list(events), 1e-5).epsilon == pytest.approx(
        _pld_epsilon_dp_accounting(events, 1e-5, DISC), rel=1e-8
    )


def test_a_round_of_a_long_job_does_no_window_length_transform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Round r + 1 of a long job at the same FFT length as round r: no rfft, no irfft, so
    # its cost does not grow with the window (which grows like sqrt(n)).
    q, z, n = 0.01, 1.1, 50_000
    steps = _sampled_step(q, z, DISC)
    assert all(s._window(n)[2] == s._window(n + 10)[2] for s in steps)
    account([dpsgd_event(q, z, n)], 1e-5)
    want = [_pmf_epsilon(s.power(n + 10), 1e-5, DISC) for s in steps]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an FFT in a round's accounting")

    monkeypatch.setattr(np.fft, "irfft", refuse)
    monkeypatch.setattr(np.fft, "rfft", refuse)
    got = account([dpsgd_event(q, z, n + 10)], 1e-5).epsilon
    assert got == pytest.approx(max(want), rel=RTOL)


def test_accountant_round_records_match_the_reference_engine() -> None:
    # What the server records: rounds of 10 steps; the last one against the reference.
    acc = PrivacyAccountant(1e-5)
    acc.record_round(0, [dpsgd_event(0.01, 1.1, 4_990)])
    rec = acc.record_round(1, [dpsgd_event(0.01, 1.1, 10)])
    direct = max(_pmf_epsilon(s.power(5_000), 1e-5, DISC) for s in _sampled_step(0.01, 1.1, DISC))
    assert rec.epsilon == pytest.approx(direct, rel=RTOL)
    assert rec.epsilon <= rec.epsilon_rdp
    assert math.isfinite(rec.epsilon_round)
    assert accountant_mod._LIVE_LOG >= 690.0  # |F^n| < 1e-299 is all that is dropped
