"""Secure-aggregation kernels: quantization, masks and bit packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import confide
from confide.secagg import ring_dtype

DOM = confide.MaskDomain(b"session", 3, "self")
seeds = st.binary(min_size=32, max_size=32)


def seeded(i: int) -> confide.SecureRng:
    return confide.SecureRng(bytes([i]) * 32)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 64),
    st.integers(0, 3000),
    st.lists(st.tuples(seeds, st.sampled_from([1, -1])), min_size=1, max_size=5),
    st.integers(0, 2**64 - 1),
)
def test_masks_added_then_subtracted_give_the_input_back(
    bits: int, n: int, masks: list[tuple[bytes, int]], x0: int
) -> None:
    mod = (1 << bits) - 1
    x = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(x0)) & np.uint64(
        mod
    )
    x = x.astype(ring_dtype(bits))
    y = confide.apply_masks(x, masks, bits, DOM)
    assert y.dtype == x.dtype
    assert (y.astype(np.uint64) <= mod).all()
    back = confide.apply_masks(y, [(s, -sign) for s, sign in masks], bits, DOM)
    np.testing.assert_array_equal(back, x)


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 32), st.integers(2, 8), st.integers(1, 400), st.integers(0, 2**32))
def test_pairwise_masks_cancel_in_the_sum(bits: int, k: int, n: int, salt: int) -> None:
    # Client i adds PRG(s_ij) for j > i and subtracts PRG(s_ji) for j < i: the sum of all
    # masked vectors equals the sum of the inputs, mod 2^bits.
    def s(i: int, j: int) -> bytes:
        return (salt.to_bytes(5, "big") + bytes([i, j])).ljust(32, b"\0")

    rng = np.random.default_rng(salt)  # test data only, not a secret
    xs = [rng.integers(0, 2**bits, n, dtype=np.uint64).astype(np.uint32) for _ in range(k)]
    total = np.zeros(n, dtype=np.uint64)
    for i, x in enumerate(xs):
        masks = [(s(min(i, j), max(i, j)), 1 if i < j else -1) for j in range(k) if j != i]
        total = (total + confide.apply_masks(x, masks, bits, DOM)) & np.uint64(2**bits - 1)
    expect = sum(x.astype(np.uint64) for x in xs) & np.uint64(2**bits - 1)
    np.testing.assert_array_equal(total, expect)


def test_masks_are_uniform_and_domain_separated() -> None:
    seed = bytes(range(32))
    m = confide.expand_mask(seed, 1 << 16, 8, DOM)
    counts = np.bincount(m, minlength=256)
    chi2 = float(((counts - 256) ** 2 / 256).sum())
    assert chi2 < 347.0  # df = 255, critical value at alpha = 1e-4 is ~346
    others = [
        confide.MaskDomain(b"session", 4, "self"),
        confide.MaskDomain(b"session", 3, "pair"),
        confide.MaskDomain(b"session2", 3, "self"),
    ]
    for d in others:
        assert not np.array_equal(m, confide.expand_mask(seed, 1 << 16, 8, d))
    # Widths are domain-separated too: 8-bit masks are not the low bits of 16-bit ones.
    m16 = confide.expand_mask(seed, 1 << 16, 16, DOM)
    assert not np.array_equal(m, (m16 & 0xFF).astype(m.dtype))


def test_quantization_is_unbiased() -> None:
    # x sits 30% of the way between two levels: the mean level over 1e6 draws must be within
    # 5 standard errors (sqrt(0.21/1e6) = 4.6e-4) of 7.3.
    r, bits = 1.0, 4
    step = 2 * r / 15
    x = np.full(1_000_000, -r + 7.3 * step, dtype=np.float32)
    q = confide.quantize(x, r, bits, rng=seeded(1))
    assert set(np.unique(q).tolist()) == {7, 8}
    true_level = (float(x[0]) + r) / step
    assert abs(q.mean() - true_level) < 5 * math.sqrt(0.21 / 1e6)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 32),
    st.floats(0.01, 100),
    hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(-200, 200, width=32)),
)
def test_quantize_dequantize_error_is_below_one_step(bits: int, r: float, x: np.ndarray) -> None:
    q = confide.quantize(x, r, bits, rng=seeded(2))
    assert q.dtype == ring_dtype(bits)
    back = confide.dequantize(q, r, bits, 1, mean=False)
    step = 2 * r / (2**bits - 1)
    err = np.abs(np.clip(x.astype(np.float64), -r, r) - back.astype(np.float64))
    assert (err <= step * (1 + 1e-9) + r * 1.2e-7).all()


def test_sum_of_quantized_vectors_dequantizes_to_the_mean_and_detects_wrap() -> None:
    rng = np.random.default_rng(0)  # test data only
    xs = [rng.uniform(-1, 1, 1000).astype(np.float32) for _ in range(5)]
    qs = [confide.quantize(x, 1.0, 16, rng=seeded(3)).astype(np.uint64) for x in xs]
    total = np.sum(qs, axis=0, dtype=np.uint64)
    mean = confide.dequantize(total, 1.0, 16, 5)
    np.testing.assert_allclose(mean, np.mean(xs, axis=0), atol=2 / 65535)
    total[10] = 5 * 65535 + 1
    with pytest.raises(confide.AggregateError, match="wrapped around the modulus or n is wrong"):
        confide.dequantize(total, 1.0, 16, 5)


@given(st.integers(1, 64), st.lists(st.integers(0, 2**64 - 1), max_size=300))
def test_packing_roundtrip_uses_exactly_b_bits(bits: int, raw: list[int]) -> None:
    x = (np.array(raw, dtype=np.uint64) & np.uint64((1 << bits) - 1)).astype(ring_dtype(bits))
    p = confide.pack_bits(x, bits)
    assert len(p) == math.ceil(len(raw) * bits / 8)
    np.testing.assert_array_equal(confide.unpack_bits(p, bits, len(raw)), x)


def test_secagg_rejects_bad_input() -> None:
    x = np.array([0, 300], dtype=np.uint32)
    with pytest.raises(confide.InvalidArgumentError, match=r"element 1 is 300.*8 bits"):
        confide.apply_masks(x, [(bytes(32), 1)], 8, DOM)
    with pytest.raises(confide.InvalidArgumentError, match="32 bytes, got 16"):
        confide.apply_masks(x, [(bytes(16), 1)], 16, DOM)
    with pytest.raises(confide.InvalidArgumentError, match=r"sign must be \+1 or -1, got 2"):
        confide.apply_masks(x, [(bytes(32), 2)], 16, DOM)
    with pytest.raises(
        confide.InvalidArgumentError, match=r"bits = 40 needs numpy\.uint64 storage.*uint32"
    ):
        confide.apply_masks(x, [(bytes(32), 1)], 40, DOM)
    with pytest.raises(confide.ArrayTypeError, match=r"uint32 or numpy\.uint64"):
        confide.apply_masks(x.astype(np.int64), [(bytes(32), 1)], 16, DOM)  # type: ignore[arg-type]
    with pytest.raises(confide.NonFiniteError, match="index 2"):
        confide.quantize(np.array([0, 1, np.nan], dtype=np.float32), 1.0, 8)
    with pytest.raises(confide.InvalidArgumentError, match="clip_range"):
        confide.quantize(np.zeros(3, dtype=np.float32), 0.0, 8)
    with pytest.raises(confide.InvalidArgumentError, match="bits"):
        confide.quantize(np.zeros(3, dtype=np.float32), 1.0, 0)
    with pytest.raises(confide.InvalidArgumentError, match="n must be"):
        confide.dequantize(np.zeros(3, dtype=np.uint32), 1.0, 8, 0)
    with pytest.raises(confide.ShapeError, match="expected 2, got 1"):
        confide.unpack_bits(b"\0", 3, 4)
    with pytest.raises(confide.ShapeError, match="padding"):
        confide.unpack_bits(b"\x00\x80", 3, 3)
    with pytest.raises(confide.InvalidArgumentError, match="does not fit in 3 bits"):
        confide.pack_bits(np.array([8], dtype=np.uint32), 3)
    # Failed calls leave the input intact.
    assert x.tolist() == [0, 300]
