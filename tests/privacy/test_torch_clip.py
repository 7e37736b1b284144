"""Per-row clipping of torch tensors: the Rust kernel's exact bound, in torch ops."""

from __future__ import annotations

import doctest
from fractions import Fraction

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from confide.clip import clip_rows as rust_clip_rows  # noqa: E402
from confide.errors import (  # noqa: E402
    ArrayTypeError,
    ConfideError,
    InvalidArgumentError,
    NonFiniteError,
)
from confide.privacy import torch_clip  # noqa: E402
from confide.privacy.torch_clip import (  # noqa: E402
    as_numpy,
    clip_rows,
    clip_rows_torch,
    row_norms,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def exact_norm_ok(row: np.ndarray, c: float) -> bool:
    """||row||_2 <= c decided exactly, in rationals (no rounding anywhere)."""
    return sum(Fraction(float(v)) ** 2 for v in row) <= Fraction(c) ** 2


def random_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-3, 3, size=(rows, 1))
    return (rng.standard_normal((rows, dim)) * scales).astype(np.float32)


def adversarial_rows(c: float) -> np.ndarray:
    """Rows at and just around the bound, huge and tiny values, a single spike."""
    dim = 257
    out = []
    base = np.ones(dim, np.float32) / np.float32(np.sqrt(dim))  # norm ~1
    for rel in (1.0, 1.0 + 2**-24, 1.0 + 2**-22, 1.0 + 1e-6, 1.0 - 1e-7, 2.0, 1e6):
        out.append((base * np.float32(c * rel)).astype(np.float32))
    spike = np.zeros(dim, np.float32)
    spike[3] = np.float32(c) * np.float32(1.0 + 2**-23)
    out.append(spike)
    out.append(np.full(dim, 3.0e37, np.float32))  # squares overflow float32, not float64
    out.append(np.full(dim, 1e-30, np.float32) + np.float32(c))
    alt = base * np.float32(c * 1.5)
    alt[::2] *= -1
    out.append(alt.astype(np.float32))
    out.append(np.zeros(dim, np.float32))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("c", [1e-3, 0.7, 1.0, 3.3, 1e4])
def test_matches_rust_kernel_and_bound_holds(c: float) -> None:
    data = np.concatenate([random_rows(40, 257, seed=7), adversarial_rows(c)])
    rust = data.copy()
    rust_norms = rust_clip_rows(rust, c)
    t = torch.from_numpy(data.copy())
    norms = clip_rows_torch(t, c)
    assert norms.dtype == torch.float64
    np.testing.assert_allclose(norms.numpy(), rust_norms, rtol=1e-12, atol=0)
    got = t.numpy()
    # Same factor rounded the same way: identical except where the float64 norms differ in
    # their last bits and the factor's float32 rounding flips (one ulp of the factor). Rows
    # whose factor is subnormal (norm / c > 2**126) take a different route in each (the
    # Rust kernel rounds toward zero, torch re-clips); only the bound is checked on those.
    normal = (rust_norms <= c) | (rust_norms * 2.0**-126 <= c)
    np.testing.assert_allclose(got[normal], rust[normal], rtol=2.5e-7, atol=0)
    assert (got[normal] == rust[normal]).mean() > 0.99
    for i, row in enumerate(got):
        assert exact_norm_ok(row, c), f"row {i} above the bound"
        if rust_norms[i] <= c:
            assert np.array_equal(row, data[i]), f"row {i} under the bound was modified"


def test_dispatch_uses_rust_kernel_in_place_on_cpu() -> None:
    data = random_rows(8, 300, seed=1)
    t = torch.from_numpy(data.copy())
    ptr = t.data_ptr()
    norms = clip_rows(t, 1.0)
    expect = data.copy()
    expect_norms = rust_clip_rows(expect, 1.0)
    assert t.data_ptr() == ptr
    assert np.array_equal(t.numpy(), expect)  # bit for bit: it *is* the Rust kernel
    np.testing.assert_array_equal(norms.numpy(), expect_norms)


@pytest.mark.parametrize("c", [1e-45, 3e-45, 1e-44, 1e-40, 1e-39, 1e-38])
@pytest.mark.parametrize("dim", [1, 3, 100])
def test_subnormal_bound_holds_in_torch(c: float, dim: int) -> None:
    # Tiny bounds make the factor or the products subnormal in float32, where one rounding
    # can exceed the 2**-20 margin; the verification pass must still give ||row|| <= c.
    rows = np.stack([np.ones(dim, np.float32), np.full(dim, 1e-3, np.float32)])
    t = torch.from_numpy(rows.copy())
    clip_rows_torch(t, c)
    for row in t.numpy():
        assert exact_norm_ok(row, c)


def test_subnormal_factor_is_reclipped_close_to_the_bound() -> None:
    # norm / c > 2**126: the first factor is subnormal and overshoots; the second clip uses
    # a normal factor, so the row ends just under c (not halved far below it).
    t = torch.full((1, 257), 3.0e37)
    clip_rows_torch(t, 1e-3)
    row = t.numpy()[0]
    assert exact_norm_ok(row, 1e-3)
    assert float(np.linalg.norm(row.astype(np.float64))) > 0.999e-3


def test_rust_kernel_subnormal_bound() -> None:
    # The Rust kernel scales in float64 and rounds toward zero wherever the float32 factor or
    # the products would be subnormal, so the bound holds there too.
    bad = []
    for c in (1e-45, 1e-44, 1e-39):
        for dim in (1, 3, 100):
            rows = np.stack([np.ones(dim, np.float32), np.full(dim, 1e-3, np.float32)])
            rust_clip_rows(rows, c)
            bad += [(c, dim) for row in rows if not exact_norm_ok(row, c)]
    # A normal bound with a huge row: the float32 factor 1e-3 / 4.8e38 is subnormal.
    huge = np.full((1, 257), 3.0e37, np.float32)
    rust_clip_rows(huge, 1e-3)
    bad += [("huge", 257)] if not exact_norm_ok(huge[0], 1e-3) else []
    assert not bad


def test_non_finite_row_rejected_before_any_write() -> None:
    data = np.array([[10.0, 0.0], [0.0, np.inf], [1.0, np.nan]], np.float32)
    t = torch.from_numpy(data.copy())
    with pytest.raises(NonFiniteError, match="row 1"):
        clip_rows_torch(t, 1.0)
    assert np.array_equal(t.numpy(), data, equal_nan=True)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (lambda: torch.zeros(2, 3, dtype=torch.float64), "float32"),
        (lambda: torch.zeros(6), "2-D"),
        (lambda: torch.zeros(3, 4).t(), "contiguous"),
        (lambda: np.zeros((2, 3), np.float32), "torch.Tensor"),
    ],
)
def test_bad_matrix_is_a_typed_error(x: object, match: str) -> None:
    for fn in (clip_rows_torch, clip_rows):
        with pytest.raises(ArrayTypeError, match=match):
            fn(x(), 1.0)  # type: ignore[operator]


@pytest.mark.parametrize("c", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_bound_is_a_typed_error(c: object) -> None:
    with pytest.raises((InvalidArgumentError, ConfideError)):
        clip_rows_torch(torch.ones(2, 2), c)  # type: ignore[arg-type]


def test_empty_shapes() -> None:
    assert clip_rows_torch(torch.zeros(0, 5), 1.0).shape == (0,)
    assert clip_rows_torch(torch.zeros(3, 0), 1.0).tolist() == [0.0, 0.0, 0.0]


def test_as_numpy_is_a_zero_copy_view() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    v = as_numpy(t)
    assert v.ctypes.data == t.data_ptr()
    v[1, 2] = -1.0
    assert float(t[1, 2]) == -1.0
    t.requires_grad_(True)
    assert as_numpy(t).ctypes.data == t.data_ptr()  # detached, still shared
    with pytest.raises(ArrayTypeError, match="contiguous"):
        as_numpy(torch.zeros(3, 4).t())
    with pytest.raises(ArrayTypeError, match="float32"):
        as_numpy(torch.zeros(2, dtype=torch.float64))


def test_row_norms_blocks_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_clip, "_BLOCK_ELEMENTS", 64)  # force many blocks
    data = random_rows(9, 50, seed=3)
    np.testing.assert_allclose(
        row_norms(torch.from_numpy(data)).numpy(),
        np.sqrt((data.astype(np.float64) ** 2).sum(axis=1)),
        rtol=1e-14,
    )


def test_doctests() -> None:
    result = doctest.testmod(torch_clip, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@cuda
def test_cuda_matches_cpu_and_rust() -> None:
    c = 1.0
    data = np.concatenate([random_rows(32, 257, seed=5), adversarial_rows(c)])
    rust = data.copy()
    rust_norms = rust_clip_rows(rust, c)
    t = torch.from_numpy(data.copy()).cuda()
    norms = clip_rows(t, c)  # dispatches to the torch path on CUDA
    assert t.device.type == "cuda"
    np.testing.assert_allclose(norms.cpu().numpy(), rust_norms, rtol=1e-12)
    got = t.cpu().numpy()
    np.testing.assert_allclose(got, rust, rtol=2.5e-7, atol=0)
    for row in got:
        assert exact_norm_ok(row, c)


@cuda
def test_cuda_subnormal_bound() -> None:
    t = torch.ones(4, 3, device="cuda")
    clip_rows_torch(t, 1e-45)
    for row in t.cpu().numpy():
        assert exact_norm_ok(row, 1e-45)
