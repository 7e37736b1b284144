"""Distributed patient-level DP-SGD: the secure sum carries the accounted noise.

Statistical tests use fixed seeds; tolerances are stated with each assertion.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide import SecureRng
from confide.errors import InvalidPrivacyConfig
from confide.privacy.distributed_dpsgd import (
    SampleDDGConfig,
    calibrate,
    decode_sum,
    encode_site_sum,
    event,
)


def _params(dim: int, n: int = 3, t: int = 3, z: float = 1.0, **kw: object):  # type: ignore[no-untyped-def]
    cfg = dict(
        dim=dim,
        clip_norm=1.0,
        noise_multiplier=z,
        sampling_rate=0.2,
        num_sites=n,
        min_survivors=t,
        site_clip_norm=4.0,
    )
    cfg.update(kw)
    return calibrate(SampleDDGConfig(**cfg))  # type: ignore[arg-type]


def _secure_sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros_like(vectors[0], dtype=np.uint64)
    for v in vectors:
        total = (total + v.astype(np.uint64)) % np.uint64(1 << bits)
    return total


def test_aggregate_noise_variance_equals_the_accounted_variance_at_1e6_samples() -> None:
    # 10^6 coordinates of the noise of a secure sum of h = 3 honest shares (zero inputs):
    # the sample variance of 10^6 Gaussian draws is within 0.5 % of the truth at ~3.5 sigma,
    # so the 1 % tolerance fails only if the calibration is off.
    p = _params(1_000_000, n=3, t=3, z=0.8)
    shares = [
        encode_site_sum(np.zeros(p.dim), p, rng=SecureRng(bytes([k]) * 32)) for k in (1, 2, 3)
    ]
    noise = decode_sum(_secure_sum(shares, p.bits), p)
    assert noise.var() == pytest.approx(p.worst_case_noise_std**2, rel=0.01)
    assert abs(noise.mean()) < 5 * p.worst_case_noise_std / math.sqrt(p.dim)
    # ... and the accounted std is z * C up to the (tiny) rounding slack.
    assert p.worst_case_noise_std == pytest.approx(0.8 * 1.0, rel=1e-4)
    assert p.effective_noise_multiplier >= 0.8


def test_only_the_threshold_honest_shares_are_needed() -> None:
    # Calibrated for min_survivors = 4 of 6 with 1 colluder: 3 honest shares already carry
    # the full noise, so each share is sqrt(3) times smaller than a lone site's.
    p = _params(200_000, n=6, t=4, max_colluding=1)
    assert p.honest_shares == 3
    shares = [
        encode_site_sum(np.zeros(p.dim), p, rng=SecureRng(bytes([k]) * 32)) for k in (1, 2, 3)
    ]
    noise = decode_sum(_secure_sum(shares, p.bits), p)
    assert noise.std() == pytest.approx(1.0, rel=0.01)  # z * C with z = 1, C = 1


def test_decoded_sum_is_the_sum_of_site_gradients_plus_noise() -> None:
    p = _params(50_000, n=3, t=3, z=0.05)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=p.dim) * 0.002 for _ in range(3)]
    enc = [encode_site_sum(g, p, rng=SecureRng(bytes([k + 7]) * 32)) for k, g in enumerate(grads)]
    err = decode_sum(_secure_sum(enc, p.bits), p) - np.sum(grads, axis=0)
    assert err.std() == pytest.approx(p.worst_case_noise_std, rel=0.02)
    assert abs(err.mean()) < 5 * p.worst_case_noise_std / math.sqrt(p.dim)  # unbiased rounding


def test_a_site_sum_above_the_bound_is_clipped_to_it() -> None:
    p = _params(1_000, n=1, t=1, z=1e-3)
    big = np.full(p.dim, 1.0)  # norm 31.6 > B = 4
    out = decode_sum(encode_site_sum(big, p, rng=SecureRng(bytes(32))), p)
    assert np.linalg.norm(out) == pytest.approx(4.0, rel=0.01)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32 - 1),
)
def test_one_patient_moves_the_rounded_vector_by_at_most_the_sensitivity(
    dim: int, scale: float, seed: int
) -> None:
    # Coupled through the same generator (same uniforms, same noise), two site sums that
    # differ by one clipped patient (norm <= C) encode to ring vectors whose difference is
    # at most Delta = C / gamma + 1.25 sqrt(d) in L2: the sensitivity the noise is set for.
    p = _params(dim, n=2, t=2)
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim) * scale
    patient = rng.normal(size=dim)
    patient *= 1.0 / max(1.0, float(np.linalg.norm(patient)))
    key = seed.to_bytes(4, "little") * 8
    a = encode_site_sum(base, p, rng=SecureRng(key)).astype(np.int64)
    b = encode_site_sum(base + patient, p, rng=SecureRng(key)).astype(np.int64)
    diff = (b - a + (1 << (p.bits - 1))) % (1 << p.bits) - (1 << (p.bits - 1))
    assert float(np.linalg.norm(diff)) <= p.sensitivity


def test_configurations_that_cannot_hold_are_refused() -> None:
    with pytest.raises(InvalidPrivacyConfig, match="use bits >="):
        _params(100, n=50, t=40, bits=20, site_clip_norm=1e6)
    with pytest.raises(InvalidPrivacyConfig, match="min_survivors"):
        _params(100, n=3, t=4)
    with pytest.raises(InvalidPrivacyConfig, match="noise_multiplier"):
        _params(100, z=0.0)
    p = _params(10)
    with pytest.raises(InvalidPrivacyConfig, match="finite"):
        encode_site_sum(np.full(10, np.nan), p)
    with pytest.raises(InvalidPrivacyConfig, match="finite"):
        encode_site_sum(np.zeros(11), p)


def test_accounting_event_is_the_subsampled_gaussian_of_the_worst_case_sum() -> None:
    from confide.privacy.accountant import account, dpsgd_event

    p = _params(1_000)
    eps = account([event(p, steps=10)], 1e-5).epsilon
    ref = account([dpsgd_event(0.2, p.effective_noise_multiplier, 10)], 1e-5).epsilon
    assert eps == pytest.approx(ref, rel=1e-12)
    assert p.tau < 1e-12
