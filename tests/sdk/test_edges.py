"""The core's guarantees at the edges: the clipping bound for every finite input, the
quantizer's bit range, the exact lattice step, and error messages that name what is wrong."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import confide
from confide import _core


def seeded(i: int) -> confide.SecureRng:
    return confide.SecureRng(bytes([i]) * 32)


def within(row: np.ndarray, c: float) -> bool:
    """||row||_2 <= c decided exactly, in rationals."""
    return sum(Fraction(float(v)) ** 2 for v in row) <= Fraction(c) ** 2


# ------------------------------------------------------------------ clipping bound


def test_tiny_scale_factor_from_the_issue() -> None:
    # norm / max_norm > 2**126: the float32 factor would be subnormal (worst case 1.96x).
    x = np.full(257, 3.0e37, np.float32)
    confide.clip_l2(x, 1e-3)
    assert within(x, 1e-3)
    assert float(np.linalg.norm(x.astype(np.float64))) > 0.999e-3  # not shrunk far below
    rows = np.full((4, 257), 3.0e37, np.float32)
    confide.clip_rows(rows, 1e-3)
    assert all(within(r, 1e-3) for r in rows)


@pytest.mark.parametrize("c", [5e-324, 1e-300, 1e-45, 3e-45, 1e-44, 1e-40, 1e-39, 1e-38])
@pytest.mark.parametrize("dim", [1, 3, 100])
def test_subnormal_bounds_hold(c: float, dim: int) -> None:
    rows = np.stack(
        [np.ones(dim, np.float32), np.full(dim, 1e-3, np.float32), np.full(dim, 3e38, np.float32)]
    )
    confide.clip_rows(rows, c)
    assert all(within(r, c) for r in rows), rows
    v = np.ones(dim, np.float32)
    confide.clip_l2(v, c)
    assert within(v, c)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 40),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    ),
    st.integers(1, 0x7FEF_FFFF_FFFF_FFFF),
)
def test_bound_holds_for_every_finite_input(x: np.ndarray, c_bits: int) -> None:
    # Every positive finite float64 bound (by bit pattern: subnormal to huge).
    c = float(np.array(c_bits, np.uint64).view(np.float64))
    y = x.copy()
    pre = confide.clip_l2(y, c)
    assert within(y, c)
    if pre < c * (1 - 1e-9):
        assert np.array_equal(y, x)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_l2_norm_rejects_non_finite(bad: float) -> None:
    with pytest.raises(confide.NonFiniteError, match=r"found (inf|-inf|NaN) at x\[0\]"):
        confide.l2_norm(np.array([bad], np.float32))
    with pytest.raises(confide.NonFiniteError, match=r"at x\[2\]"):
        confide.l2_norm(np.array([1, 2, bad, 4], np.float32))


def test_clipping_non_finite_messages_give_the_element() -> None:
    with pytest.raises(confide.NonFiniteError, match=r"found NaN at x\[1\]"):
        confide.clip_l2(np.array([0.5, np.nan, 1.0], np.float32), 1.0)
    m = np.zeros((3, 4), np.float32)
    m[2, 3] = np.inf
    with pytest.raises(confide.NonFiniteError, match=r"found inf at x\[2, 3\] \(row 2\)"):
        confide.clip_rows(m, 1.0)


# ------------------------------------------------------------------ quantizer range


@pytest.mark.parametrize("bits", [33, 40, 48, 52, 53, 64])
def test_quantize_refuses_bits_it_cannot_compute_exactly(bits: int) -> None:
    with pytest.raises(confide.InvalidArgumentError, match=rf"bits .*\[1, 32\], got {bits}"):
        confide.quantize(np.zeros(3, np.float32), 1.0, bits)
    with pytest.raises(confide.InvalidArgumentError, match=rf"\[1, 32\], got {bits}"):
        confide.dequantize(np.zeros(3, np.uint64), 1.0, bits, 1)


def test_quantize_32_bits_is_unbiased_and_uint32() -> None:
    r = 1.0
    step = 2 * r / (2**32 - 1)
    x0 = np.float32(0.123456)
    q = confide.quantize(np.full(200_000, x0, np.float32), r, 32, rng=seeded(3))
    assert q.dtype == np.uint32
    exact = (Fraction(float(x0)) + 1) / (2 * Fraction(r) / (2**32 - 1))
    lo = int(exact)
    assert set(np.unique(q).tolist()) <= {lo, lo + 1}
    frac = float(exact - lo)
    got = float((q.astype(np.float64) - lo).mean())
    se = (frac * (1 - frac) / 200_000) ** 0.5
    assert abs(got - frac) < 5 * se + 2**-19
    assert step > 0


# ------------------------------------------------------------------ lattice step


def test_lattice_step_known_answer_below_a_power_of_two() -> None:
    # sigma one ulp below 2: floor(log2) = 0, so outputs lie on multiples of 2**-32 (the
    # float64 log2().floor() rounded up and doubled the step to 2**-31).
    sigma = float(np.nextafter(2.0, 0.0))
    y = confide.add_gaussian_noise(np.zeros(4096), sigma, rng=seeded(7))
    k = y * 2.0**32
    assert np.array_equal(k, np.round(k))
    assert not np.array_equal(y * 2.0**31, np.round(y * 2.0**31)), "step must be 2**-32"


# ------------------------------------------------------------------ messages


@pytest.mark.parametrize("rnd", [2**64, -1, 10**30])
def test_mask_domain_round_out_of_range_is_typed(rnd: int) -> None:
    with pytest.raises(confide.InvalidArgumentError, match=r"round must be in \[0, 2\*\*64 - 1\]"):
        confide.MaskDomain(b"s", rnd, "self")
    with pytest.raises(confide.InvalidArgumentError, match=r"round must be an int in \[0, 2\*\*64"):
        _core.expand_mask(bytes(32), 4, 8, b"s", rnd, "self")
    with pytest.raises(confide.InvalidArgumentError, match=r"round must be an int"):
        _core.apply_masks(np.zeros(4, np.uint32), [], 8, b"s", rnd, "self")


def test_mask_domain_round_must_be_an_int() -> None:
    with pytest.raises(confide.InvalidArgumentError, match="round must be an int"):
        confide.MaskDomain(b"s", 1.5, "self")  # type: ignore[arg-type]
    assert confide.MaskDomain(b"s", 2**64 - 1, "self").round == 2**64 - 1


def test_ring_bits_messages() -> None:
    dom = confide.MaskDomain(b"s", 1, "self")
    for bad in (0, 65):
        with pytest.raises(confide.InvalidArgumentError, match=rf"\[1, 64\], got {bad}"):
            confide.expand_mask(bytes(32), 4, bad, dom)
        with pytest.raises(confide.InvalidArgumentError, match=rf"\[1, 64\], got {bad}"):
            confide.pack_bits(np.zeros(4, np.uint32), bad)
        with pytest.raises(confide.InvalidArgumentError, match=rf"\[1, 64\], got {bad}"):
            confide.unpack_bits(b"", bad, 0)
    x = np.zeros(4, np.uint32)
    with pytest.raises(
        confide.InvalidArgumentError,
        match=r"bits = 40 needs numpy\.uint64 storage, but x is numpy\.uint32.*astype",
    ):
        confide.apply_masks(x, [(bytes(32), 1)], 40, dom)
    with pytest.raises(confide.InvalidArgumentError, match=r"bits = 40 needs numpy\.uint64"):
        confide.pack_bits(x, 40)
    # The remedy works.
    assert confide.apply_masks(x.astype(np.uint64), [(bytes(32), 1)], 40, dom).dtype == np.uint64


def test_out_of_range_sigma_is_printed_compactly() -> None:
    for f in (
        lambda: confide.gaussian(3, 1e-251),
        lambda: confide.add_gaussian_noise(np.zeros(3), 1e-300),
        lambda: confide.discrete_gaussian(3, 1e-251),
    ):
        with pytest.raises(confide.InvalidArgumentError, match=r"got 1e-(251|300)$") as e:
            f()
        assert len(str(e.value)) < 120
    with pytest.raises(confide.InvalidArgumentError, match=r"got 1e300$"):
        confide.gaussian(3, 1e300)


def test_combine_empty_shares_message() -> None:
    with pytest.raises(confide.ShareError, match="got none") as e:
        confide.combine_shares([])
    assert "t = 1" not in str(e.value)


def test_excess_hidden_by_float64_rounding_is_clipped() -> None:
    # Four accumulation lanes of [1, t, t, t], t**2 = 2**-54: the float64 norm is exactly 2,
    # the true norm 2 * (1 + 1.5 * 2**-54) > 2; the kernel must still clip.
    t = 2.0**-27
    x = np.array([1.0] * 4 + [t] * 12, np.float32)
    assert confide.l2_norm(x) == 2.0
    assert not within(x, 2.0)
    confide.clip_l2(x, 2.0)
    assert within(x, 2.0)
    m = np.tile(np.array([1.0] * 4 + [t] * 12, np.float32), (3, 1))
    confide.clip_rows(m, 2.0)
    assert all(within(r, 2.0) for r in m)
