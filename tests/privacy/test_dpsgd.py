"""DP-SGD: Poisson sampling, per-patient clipping, noise scale, exactness at sigma=0."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from confide import SecureRng
from confide.privacy import DPSGD, InvalidPrivacyConfig, poisson_sample, poisson_sample_patients
from confide.privacy.dpsgd import group_by_patient
from tests.privacy.reference import per_sample_grads


def test_poisson_sample_rate_and_reproducibility(rng: SecureRng) -> None:
    n, q = 200_000, 0.03
    idx = poisson_sample(n, q, rng)
    # Binomial(n, q): std = sqrt(n q (1-q)) ~ 76; 5 std tolerance.
    assert abs(idx.size - n * q) < 5 * np.sqrt(n * q * (1 - q))
    same = poisson_sample(n, q, SecureRng(bytes(range(32))))
    assert np.array_equal(idx, same)
    assert poisson_sample(10, 0.0, rng).size == 0
    assert poisson_sample(10, 1.0, rng).size == 10
    with pytest.raises(InvalidPrivacyConfig):
        poisson_sample(10, 1.5, rng)


def test_patient_sampling_takes_all_rows_of_a_patient(rng: SecureRng) -> None:
    ids = np.repeat(np.arange(500), 3)
    rows = poisson_sample_patients(ids, 0.2, rng)
    chosen = np.unique(ids[rows])
    assert np.array_equal(np.sort(rows), np.flatnonzero(np.isin(ids, chosen)))
    assert 50 < chosen.size < 150


def test_sigma_zero_and_huge_clip_equals_non_private() -> None:
    gen = np.random.default_rng(0)  # data only, never noise
    x = gen.normal(size=(64, 5)).astype(np.float32)
    y = (gen.random(64) > 0.5).astype(np.float32)
    params = gen.normal(size=6).astype(np.float32)
    g = per_sample_grads(params, x, y)
    opt = DPSGD(clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=64)
    np.testing.assert_allclose(opt.noisy_gradient(g), g.mean(axis=0), rtol=1e-5, atol=1e-7)
    stepped = opt.step(params, g, 0.1)
    np.testing.assert_allclose(stepped, params - 0.1 * g.mean(axis=0), rtol=1e-5, atol=1e-6)
    # Per patient: with a huge C, grouping changes nothing in the sum.
    ids = np.arange(64) // 4
    np.testing.assert_allclose(opt.noisy_gradient(g, ids), g.mean(axis=0), rtol=1e-5, atol=1e-7)


def test_momentum_is_heavy_ball() -> None:
    g = np.ones((1, 3), dtype=np.float32)
    opt = DPSGD(clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=1.0, momentum=0.5)
    p = opt.step(np.zeros(3, dtype=np.float32), g, 1.0)
    p = opt.step(p, g, 1.0)
    np.testing.assert_allclose(p, -2.5 * np.ones(3))  # -(1) - (0.5 + 1)


@settings(max_examples=30, deadline=None)
@given(
    g=arrays(np.float32, (6, 4), elements=st.floats(-100, 100, width=32)),
    ids=arrays(np.int64, (6,), elements=st.integers(0, 2)),
    c=st.floats(0.01, 10.0),
)
def test_per_patient_clipping_bounds_each_patient(g: np.ndarray, ids: np.ndarray, c: float) -> None:
    # Sensitivity: removing one patient changes the (noise-free) sum by at most C.
    opt = DPSGD(clip_norm=c, noise_multiplier=0.0, expected_batch_size=1.0)
    full = opt.noisy_gradient(g, ids).astype(np.float64)
    for p in np.unique(ids):
        keep = ids != p
        without = opt.noisy_gradient(g[keep], ids[keep]).astype(np.float64)
        assert np.linalg.norm(full - without) <= c * (1 + 1e-5) + 1e-6
    grouped = group_by_patient(g, ids)
    assert grouped.shape == (np.unique(ids).size, 4)


def test_noise_std_within_one_percent_over_1e6_samples() -> None:
    # Empty-gradient batch in 10^6 dimensions: the output is pure noise / expected size.
    # Relative std error of a std estimate from 10^6 samples is ~0.07%; tolerance 1%.
    z, c, b = 1.3, 0.7, 1.0
    opt = DPSGD(clip_norm=c, noise_multiplier=z, expected_batch_size=b, rng=SecureRng(bytes(32)))
    out = opt.noisy_gradient(np.zeros((0, 1_000_000), dtype=np.float32))
    assert abs(out.std() / (z * c) - 1) < 0.01
    assert abs(out.mean()) < 5 * z * c / 1000


def test_invalid_configs() -> None:
    with pytest.raises(InvalidPrivacyConfig):
        DPSGD(clip_norm=0.0, noise_multiplier=1.0, expected_batch_size=1.0)
    with pytest.raises(InvalidPrivacyConfig):
        DPSGD(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=0.0)
    with pytest.raises(InvalidPrivacyConfig):
        DPSGD(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0, momentum=1.0)
