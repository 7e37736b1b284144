"""Client-level DP: clipping, central noise scale, DDG round trip and calibrated variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from confide import SecureRng
from confide.privacy import (
    DDGConfig,
    InvalidPrivacyConfig,
    add_central_noise,
    calibrate_ddg,
    client_poisson_event,
    clip_update,
    ddg_decode,
    ddg_encode,
    ddg_event,
    rotation_seed,
)
from confide.privacy.accountant import account
from confide.privacy.client_dp import rotate, unrotate

SEED = rotation_seed(b"test-job", 7)


def _ring_sum(vectors: list[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros(vectors[0].shape, dtype=np.uint64)
    for v in vectors:
        total = (total + v.astype(np.uint64)) % (np.uint64(1) << np.uint64(bits))
    return total


@settings(max_examples=40, deadline=None)
@given(
    x=arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e6, 1e6)),
    c=st.floats(1e-3, 1e3),
)
def test_clip_update_invariant(x: np.ndarray, c: float) -> None:
    clipped, norm = clip_update(x, c)
    assert np.linalg.norm(clipped.astype(np.float64)) <= c
    assert norm == pytest.approx(np.linalg.norm(x), rel=1e-5, abs=1e-30)
    if norm <= c:
        np.testing.assert_array_equal(clipped, x.astype(np.float32))


def test_central_noise_std_within_one_percent_over_1e6_samples() -> None:
    z, c = 1.1, 0.5
    out = add_central_noise(np.zeros(1_000_000), z, c, rng=SecureRng(bytes(32)))
    assert abs(out.std() / (z * c) - 1) < 0.01
    mean = add_central_noise(
        np.zeros(1_000_000), z, c, normalize_by=10, rng=SecureRng(bytes(1) * 32)
    )
    assert abs(mean.std() / (z * c / 10) - 1) < 0.01


@settings(max_examples=20, deadline=None)
@given(dim=st.integers(1, 300))
def test_rotation_is_orthogonal_and_inverted(dim: int) -> None:
    x = np.sin(np.arange(dim) * 1.7) + 0.3
    y = rotate(x, SEED)
    assert y.size == 1 << max(0, (dim - 1).bit_length())
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(unrotate(y, SEED, dim), x, atol=1e-12)


def test_ddg_round_trip_without_noise_is_exact_up_to_rounding(rng: SecureRng) -> None:
    cfg = DDGConfig(
        dim=100, clip_norm=2.0, noise_multiplier=0.0, num_clients=5, threshold=3, bits=24
    )
    p = calibrate_ddg(cfg)
    gen = np.random.default_rng(1)  # data only
    xs = [gen.normal(size=100) * 0.1 for _ in range(5)]
    total = _ring_sum([ddg_encode(x, p, SEED, rng=rng) for x in xs], p.bits)
    got = ddg_decode(total, p, SEED)
    want = sum(clip_update(x, 2.0)[0].astype(np.float64) for x in xs)
    # Rounding error per coordinate: 5 clients x one grid step gamma.
    assert np.abs(got - want).max() <= 5 * p.gamma + 1e-6
    mean = ddg_decode(total, p, SEED, normalize_by=5)
    np.testing.assert_allclose(mean, got / 5, rtol=1e-6)


def test_ddg_norm_bound_is_enforced(rng: SecureRng) -> None:
    cfg = DDGConfig(
        dim=64, clip_norm=1.0, noise_multiplier=0.0, num_clients=2, threshold=2, bits=12
    )
    p = calibrate_ddg(cfg)
    for _ in range(20):
        v = ddg_encode(np.ones(64) * 5, p, SEED, rng=rng).astype(np.int64)
        v = np.where(v >= 1 << (p.bits - 1), v - (1 << p.bits), v)
        assert math.sqrt(float(v @ v)) <= p.norm_bound


@pytest.mark.parametrize(("n", "t", "colluding"), [(5, 3, 0), (6, 4, 1)])
def test_distributed_noise_sum_has_accounted_variance(n: int, t: int, colluding: int) -> None:
    cfg = DDGConfig(
        dim=1 << 15,
        clip_norm=1.0,
        noise_multiplier=1.5,
        num_clients=n,
        threshold=t,
        max_colluding=colluding,
        bits=40,
    )
    p = calibrate_ddg(cfg)
    h = t - colluding
    target = cfg.noise_multiplier * p.norm_bound * p.gamma  # float units
    assert h * p.local_variance >= (cfg.noise_multiplier * p.norm_bound) ** 2
    zero = np.zeros(cfg.dim)
    rng = SecureRng(bytes(range(32)))
    shares = [ddg_encode(zero, p, SEED, rng=rng) for _ in range(n)]
    # Worst case: only h honest shares remain in the sum.
    worst = ddg_decode(_ring_sum(shares[:h], p.bits), p, SEED)
    # 2^15 samples: relative std error of the variance ~ sqrt(2 / 2^15) = 0.8%; tolerance 4%.
    assert worst.astype(np.float64).var() == pytest.approx(
        h * p.local_variance * p.gamma**2, rel=0.04
    )
    assert worst.std() >= target * 0.98
    full = ddg_decode(_ring_sum(shares, p.bits), p, SEED)
    assert full.astype(np.float64).var() == pytest.approx(
        n * p.local_variance * p.gamma**2, rel=0.04
    )
    assert p.worst_case_noise_std == pytest.approx(math.sqrt(h * p.local_variance) * p.gamma)


def test_ddg_accounting_matches_gaussian_of_same_z_up_to_rdp() -> None:
    p = calibrate_ddg(DDGConfig(31, 1.0, 2.0, num_clients=3, threshold=2, bits=32))
    ddg = account([ddg_event(p, 20)], 1e-5)
    gauss = account([client_poisson_event(1.0, 2.0, 20)], 1e-5)
    assert ddg.method == "rdp"
    assert p.tau < 1e-12
    assert ddg.epsilon == pytest.approx(gauss.epsilon_rdp, rel=1e-6)
    assert ddg.epsilon >= gauss.epsilon


def test_ddg_config_validation() -> None:
    with pytest.raises(InvalidPrivacyConfig):
        DDGConfig(10, 1.0, 1.0, num_clients=3, threshold=4)
    with pytest.raises(InvalidPrivacyConfig):
        DDGConfig(10, 1.0, 1.0, num_clients=3, threshold=2, max_colluding=2)
    with pytest.raises(InvalidPrivacyConfig):
        calibrate_ddg(DDGConfig(10, 1.0, 1.0, num_clients=10**6, threshold=2, bits=8))
