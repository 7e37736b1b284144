"""Clipping: the invariant ||clip(x)|| <= C, agreement with numpy, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import confide

finite32 = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)


@given(hnp.arrays(np.float32, st.integers(0, 500), elements=finite32), st.floats(1e-3, 1e3))
def test_clipped_norm_never_exceeds_bound(x: np.ndarray, c: float) -> None:
    before = np.linalg.norm(x.astype(np.float64))
    y = x.copy()
    pre = confide.clip_l2(y, c)
    assert pre == pytest.approx(before, rel=1e-9, abs=1e-12)
    assert np.linalg.norm(y.astype(np.float64)) <= c
    if before <= c:
        np.testing.assert_array_equal(y, x)
    else:
        # Direction is preserved.
        np.testing.assert_allclose(y, x * (c / before), rtol=1e-5, atol=1e-30)


@settings(max_examples=50)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 64)), elements=finite32),
    st.floats(1e-2, 1e2),
)
def test_rows_clipped_independently(m: np.ndarray, c: float) -> None:
    norms = np.linalg.norm(m.astype(np.float64), axis=1)
    y = m.copy()
    got = confide.clip_rows(y, c)
    np.testing.assert_allclose(got, norms, rtol=1e-9)
    assert (np.linalg.norm(y.astype(np.float64), axis=1) <= c).all()
    for i in range(m.shape[0]):
        row = m[i].copy()
        confide.clip_l2(row, c)
        np.testing.assert_array_equal(row, y[i])


def test_rejects_bad_input_and_leaves_data_intact() -> None:
    x = np.array([1.0, np.nan, 3.0], dtype=np.float32)
    with pytest.raises(confide.NonFiniteError, match="finite"):
        confide.clip_l2(x, 1.0)
    assert x[0] == 1.0
    m = np.ones((3, 4), dtype=np.float32) * 10
    m[2, 1] = np.inf
    with pytest.raises(confide.NonFiniteError, match="row 2"):
        confide.clip_rows(m, 1.0)
    assert (m[0] == 10).all(), "no row may be clipped when another row is invalid"
    with pytest.raises(confide.ArrayTypeError, match=r"float32.*got float64"):
        confide.clip_l2(np.ones(3), 1.0)
    with pytest.raises(confide.ArrayTypeError, match="C-contiguous"):
        confide.clip_l2(np.ones(6, dtype=np.float32)[::2], 1.0)
    ro = np.ones(3, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(confide.ArrayTypeError, match="writeable"):
        confide.clip_l2(ro, 1.0)
    with pytest.raises(confide.ArrayTypeError, match="2-D"):
        confide.clip_rows(np.ones(3, dtype=np.float32), 1.0)
    with pytest.raises(confide.ArrayTypeError, match="list"):
        confide.clip_l2([1.0, 2.0], 1.0)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(confide.InvalidArgumentError, match="max_norm"):
            confide.clip_l2(np.ones(3, dtype=np.float32), bad)
    # Builtin bases keep working for callers who do not know confide's hierarchy.
    with pytest.raises(ValueError, match="max_norm"):
        confide.clip_l2(np.ones(3, dtype=np.float32), 0.0)
    with pytest.raises(TypeError, match="float32"):
        confide.clip_l2(np.ones(3), 1.0)


def test_empty_and_zero_inputs() -> None:
    assert confide.clip_l2(np.zeros(0, dtype=np.float32), 1.0) == 0.0
    z = np.zeros((2, 0), dtype=np.float32)
    assert confide.clip_rows(z, 1.0).tolist() == [0.0, 0.0]
