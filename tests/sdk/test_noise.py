"""Secure noise: fixed-seed statistical tests with stated tolerances, the lattice property
that stops the floating-point attack, reproducibility, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import confide
from confide.noise import discrete_gaussian_variance

N = 1_000_000


def seeded(i: int) -> confide.SecureRng:
    return confide.SecureRng(bytes([i]) * 32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gaussian_moments_and_ks(dtype: type) -> None:
    # 1e6 samples: std error of the mean 1e-3 * sigma, of the std ~7e-4 * sigma, so 1%
    # tolerances are > 10 standard errors; the KS test is at alpha = 1e-3 with a fixed seed.
    sigma = 2.5
    x = confide.gaussian(N, sigma, dtype=dtype, rng=seeded(1))
    assert x.dtype == dtype
    assert abs(x.mean()) < 0.01 * sigma
    assert abs(x.std() / sigma - 1) < 0.01
    assert stats.kstest(x.astype(np.float64) / sigma, "norm").pvalue > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_laplace_moments_and_ks(dtype: type) -> None:
    b = 0.7
    x = confide.laplace(N, b, dtype=dtype, rng=seeded(2))
    assert abs(x.mean()) < 0.01 * b * math.sqrt(2)
    assert abs(x.std() / (b * math.sqrt(2)) - 1) < 0.01
    assert stats.kstest(x.astype(np.float64) / b, "laplace").pvalue > 1e-3


def test_added_noise_has_the_right_scale_and_keeps_shape() -> None:
    x = np.linspace(-3, 3, N).reshape(1000, 1000)
    y = confide.add_gaussian_noise(x, 0.5, rng=seeded(3))
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert abs((y - x).std() / 0.5 - 1) < 0.01
    assert np.array_equal(x, np.linspace(-3, 3, N).reshape(1000, 1000)), "input unchanged"


def lattice_step(scale: float) -> float:
    return 2.0 ** (math.floor(math.log2(scale)) - 32)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50),
    st.floats(1e-3, 1e3),
    st.sampled_from(["gaussian", "laplace"]),
)
def test_outputs_lie_on_an_input_independent_lattice(
    xs: list[float], scale: float, kind: str
) -> None:
    # The attack this stops (Mironov 2012): with textbook floating-point noise, the set of
    # possible outputs depends on x, so the low-order bits of the output identify x. Here
    # every output is an integer multiple of gamma = 2^(floor(log2 scale) - 32), for every x.
    x = np.array(xs, dtype=np.float64)
    add = confide.add_gaussian_noise if kind == "gaussian" else confide.add_laplace_noise
    y = add(x, scale, rng=seeded(4))
    q = y / lattice_step(scale)
    np.testing.assert_array_equal(q, np.round(q))


def test_textbook_float_noise_leaks_but_lattice_noise_does_not() -> None:
    # Two neighbouring inputs. With naive float64 noise, whether the output lies on the grid
    # gamma*Z reveals which input was used; with confide's noise both always do.
    gamma = lattice_step(1.0)
    x0, x1 = 0.0, gamma / 3
    naive = np.random.default_rng(0).standard_normal(1000)  # the insecure construction
    on_grid_naive = [np.all((x + naive) / gamma == np.round((x + naive) / gamma)) for x in (x0, x1)]
    ours = [confide.add_gaussian_noise(np.full(1000, x), 1.0, rng=seeded(5)) for x in (x0, x1)]
    on_grid_ours = [np.all(o / gamma == np.round(o / gamma)) for o in ours]
    assert on_grid_naive != [True, True]
    assert on_grid_ours == [True, True]


def test_reproducible_with_seed_and_fresh_without() -> None:
    a = confide.gaussian(1000, 1.0, rng=seeded(6))
    b = confide.gaussian(1000, 1.0, rng=seeded(6))
    np.testing.assert_array_equal(a, b)
    c = confide.gaussian(1000, 1.0)
    d = confide.gaussian(1000, 1.0)
    assert not np.array_equal(c, d)
    assert not confide.SecureRng().seeded


def test_inplace_and_copy_agree_for_the_same_seed() -> None:
    x = np.arange(10, dtype=np.float32)
    y = confide.add_laplace_noise(x, 1.0, rng=seeded(7))
    z = x.copy()
    assert confide.add_laplace_noise(z, 1.0, rng=seeded(7), inplace=True) is z
    np.testing.assert_array_equal(y, z)
    assert confide.add_gaussian_noise(x, 0.0, rng=seeded(7)).tolist() == x.tolist()


def exact_dg_variance(s2: float) -> float:
    k = np.arange(-int(40 * math.sqrt(s2)) - 10, int(40 * math.sqrt(s2)) + 11, dtype=np.float64)
    w = np.exp(-(k**2) / (2 * s2))
    return float((k**2 * w).sum() / w.sum())


@pytest.mark.parametrize("sigma", [0.4, 2.0, 50.0])
def test_discrete_gaussian_variance_and_pmf(sigma: float) -> None:
    n = 200_000
    x = confide.discrete_gaussian(n, sigma, rng=seeded(8))
    assert x.dtype == np.int64
    s2 = discrete_gaussian_variance(sigma)
    assert s2 >= sigma**2
    assert s2 == pytest.approx(sigma**2, rel=1e-5)
    # Relative standard error of a variance estimate is ~sqrt(2/n) = 0.32%: allow 1.5%.
    assert x.var() == pytest.approx(exact_dg_variance(s2), rel=0.015)
    # The pmf at 0 within 5 binomial standard errors.
    k = np.arange(-2000, 2001)
    w = np.exp(-(k.astype(np.float64) ** 2) / (2 * s2))
    p0 = 1 / w.sum()
    assert abs((x == 0).mean() - p0) < 5 * math.sqrt(p0 * (1 - p0) / n)


def test_noise_rejects_bad_input_without_writing() -> None:
    x = np.array([1.0, np.inf], dtype=np.float32)
    with pytest.raises(confide.NonFiniteError, match="index 1"):
        confide.add_gaussian_noise(x, 1.0, inplace=True)
    assert x[0] == 1.0
    for bad in (-1.0, float("nan"), float("inf"), 1e300):
        with pytest.raises(confide.InvalidArgumentError, match="sigma"):
            confide.gaussian(3, bad)
    with pytest.raises(confide.ArrayTypeError, match=r"float32 or numpy\.float64"):
        confide.add_gaussian_noise(np.arange(3), 1.0)  # type: ignore[type-var]
    # Strided views are noised element for element (tests/sdk/test_layout.py), not refused.
    assert confide.add_gaussian_noise(np.ones((4, 4))[:, ::2], 1.0).shape == (4, 2)
    with pytest.raises(confide.InvalidArgumentError, match="32 bytes, got 31"):
        confide.SecureRng(bytes(31))
    with pytest.raises(confide.InvalidArgumentError, match="sigma"):
        confide.discrete_gaussian(3, 0.0)
    with pytest.raises(confide.InvalidArgumentError, match="dtype"):
        confide.gaussian(3, 1.0, dtype=np.int32)  # type: ignore[arg-type]
