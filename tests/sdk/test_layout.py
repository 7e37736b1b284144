"""Memory layouts: every kernel that reads rows or reshapes requires C order or handles others.

rust-numpy's ``as_slice`` accepts F-contiguous arrays, whose memory order is not the logical
row-major order; a kernel that took it would clip runs of memory instead of rows, or return
the input read in memory order relabelled as row-major. Each kernel is run on an F-ordered
copy, a transposed view, a negative-stride view and a sliced view.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import confide

C_ORDER = r"C-contiguous.*np\.ascontiguousarray\(x\)"


def seeded(i: int) -> confide.SecureRng:
    return confide.SecureRng(bytes([i]) * 32)


def matrix(rows: int = 32, dim: int = 257, dtype: type = np.float32) -> np.ndarray:
    g = np.random.default_rng(0).standard_normal((rows, dim)) * 3.0  # test data only
    return g.astype(dtype)


def views_2d(g: np.ndarray) -> dict[str, np.ndarray]:
    """Non-C-contiguous 2-D views whose logical shape is a (rows, dim) matrix."""
    return {
        "fortran": np.asfortranarray(g),
        "transposed": np.ascontiguousarray(g.T).T,  # F-contiguous view of a C array
        "negative-stride": g[::-1],
        "sliced": g[:, ::2],
    }


def views_1d(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"negative-stride": x[::-1], "sliced": x[::2]}


def test_views_are_what_they_claim() -> None:
    for name, v in views_2d(matrix()).items():
        assert not v.flags.c_contiguous, name
    assert views_2d(matrix())["transposed"].flags.f_contiguous


@pytest.mark.parametrize("view", ["fortran", "transposed", "negative-stride", "sliced"])
def test_clip_rows_refuses_non_c_order(view: str) -> None:
    g = matrix()
    v = views_2d(g.copy())[view]
    before = v.copy()
    with pytest.raises(confide.ArrayTypeError, match=C_ORDER):
        confide.clip_rows(v, 1.0)
    assert np.array_equal(v, before), "a refused call must not write"
    # The advertised remedy works and clips logical rows.
    c = np.ascontiguousarray(v)
    norms = confide.clip_rows(c, 1.0)
    np.testing.assert_allclose(norms, np.linalg.norm(before.astype(np.float64), axis=1))
    assert (np.linalg.norm(c.astype(np.float64), axis=1) <= 1.0).all()


def test_clip_rows_transposed_matrix_from_the_issue() -> None:
    # G.T of a (257, 32) C array is a (32, 257) F-contiguous matrix: refused, not clipped.
    g = matrix(257, 32).T
    assert g.shape == (32, 257)
    assert g.flags.f_contiguous
    with pytest.raises(confide.ArrayTypeError, match="F-contiguous"):
        confide.clip_rows(g, 1.0)


def test_clip_rows_accepts_c_contiguous_slices() -> None:
    g = matrix()
    v = g[3:9]  # a row slice is still C-contiguous
    assert v.flags.c_contiguous
    norms = confide.clip_rows(v, 1.0)
    assert norms.shape == (6,)
    assert (np.linalg.norm(g[3:9].astype(np.float64), axis=1) <= 1.0).all()


@pytest.mark.parametrize("view", ["negative-stride", "sliced"])
@pytest.mark.parametrize(
    "kernel",
    [
        lambda x: confide.l2_norm(x),
        lambda x: confide.clip_l2(x, 1.0),
        lambda x: confide.quantize(x, 1.0, 8, rng=seeded(1)),
    ],
    ids=["l2_norm", "clip_l2", "quantize"],
)
def test_1d_float_kernels_refuse_strided_views(
    kernel: Callable[[np.ndarray], object], view: str
) -> None:
    x = np.arange(1, 40, dtype=np.float32)
    v = views_1d(x)[view]
    with pytest.raises(confide.ArrayTypeError, match=C_ORDER):
        kernel(v)
    assert np.array_equal(x, np.arange(1, 40, dtype=np.float32))


@pytest.mark.parametrize("view", ["negative-stride", "sliced"])
def test_ring_kernels_refuse_strided_views(view: str) -> None:
    x = np.arange(40, dtype=np.uint32)
    v = views_1d(x)[view]
    dom = confide.MaskDomain(b"s", 1, "self")
    with pytest.raises(confide.ArrayTypeError, match=C_ORDER):
        confide.apply_masks(v, [(bytes(32), 1)], 8, dom)
    with pytest.raises(confide.ArrayTypeError, match=C_ORDER):
        confide.pack_bits(v, 8)
    with pytest.raises(
        confide.ArrayTypeError, match=r"C-contiguous.*np\.ascontiguousarray\(total\)"
    ):
        confide.dequantize(v, 1.0, 8, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("add", [confide.add_gaussian_noise, confide.add_laplace_noise])
@pytest.mark.parametrize("view", ["fortran", "transposed", "negative-stride", "sliced"])
def test_noise_copy_keeps_every_element_in_its_place(
    view: str, add: Callable[..., np.ndarray], dtype: type
) -> None:
    # Same seed: noising a view must give exactly the noised C-contiguous copy, element for
    # element (the bug returned the input read in memory order relabelled as row-major).
    g = matrix(6, 9, dtype) * 1000.0
    v = views_2d(g)[view]
    expect = add(np.ascontiguousarray(v), 0.01, rng=seeded(4))
    got = add(v, 0.01, rng=seeded(4))
    assert got.shape == v.shape
    assert got.dtype == v.dtype
    assert got.flags.c_contiguous
    assert np.array_equal(got, expect)
    # And the noise is small: every output stays next to its own input.
    assert np.abs(got.astype(np.float64) - v).max() < 1.0


def test_noise_copy_rank3_fortran() -> None:
    x = np.asfortranarray(np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4) * 100)
    got = confide.add_gaussian_noise(x, 1e-6, rng=seeded(5))
    assert np.abs(got - x).max() < 1e-3


@pytest.mark.parametrize("view", ["fortran", "transposed", "negative-stride", "sliced"])
def test_noise_in_place_on_views(view: str) -> None:
    base = matrix(6, 9, np.float64) * 1000.0
    expect_in = views_2d(base.copy())[view]
    expect = confide.add_gaussian_noise(np.ascontiguousarray(expect_in), 0.01, rng=seeded(6))
    work = base.copy()
    if view == "fortran":
        work = np.asfortranarray(work)
        v = work
    elif view == "transposed":
        work = np.ascontiguousarray(work.T)
        v = work.T
    elif view == "negative-stride":
        v = work[::-1]
    else:
        v = work[:, ::2]
    out = confide.add_gaussian_noise(v, 0.01, rng=seeded(6), inplace=True)
    assert out is v
    assert np.array_equal(v, expect)
    if view == "sliced":
        # Columns outside the view are untouched.
        assert np.array_equal(work[:, 1::2], base[:, 1::2])
