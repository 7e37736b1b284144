"""The exception hierarchy: one base class, builtin bases, and no panic for any input."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import confide
from confide import errors


def test_hierarchy() -> None:
    builtin = {
        errors.InvalidArgumentError: ValueError,
        errors.ShapeError: ValueError,
        errors.ArrayTypeError: TypeError,
        errors.NonFiniteError: ValueError,
        errors.ShareError: ValueError,
        errors.AggregateError: ValueError,
        errors.RandomSourceError: OSError,
    }
    for cls, base in builtin.items():
        assert issubclass(cls, errors.ConfideError)
        assert issubclass(cls, base)
        assert cls.__module__ == "confide.errors"  # registered under the public module
        assert cls.__doc__
    assert {c.__name__ for c in builtin} | {"ConfideError"} <= set(errors.__all__)
    assert errors.ConfideError.__module__ == "confide.errors"
    # One hierarchy: every public class in confide.errors derives from ConfideError.
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ConfideError), name


anything = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.binary(max_size=40),
    st.text(max_size=5),
    st.lists(st.floats(), max_size=4),
    st.sampled_from(
        [
            np.ones(4, dtype=np.float32),
            np.ones((2, 2)),
            np.arange(5, dtype=np.uint32),
            np.arange(5, dtype=np.uint64)[::2],
            np.array([np.nan], dtype=np.float32),
            np.zeros(0, dtype=np.uint64),
        ]
    ),
)

CALLS = [
    lambda a, b: confide.clip_l2(a, b),
    lambda a, b: confide.clip_rows(a, b),
    lambda a, b: confide.add_gaussian_noise(a, b),
    lambda a, b: confide.quantize(a, b, 8),
    lambda a, b: confide.dequantize(a, 1.0, 8, b),
    lambda a, b: confide.apply_masks(a, [(b, 1)], 8, confide.MaskDomain(b"", 0, "")),
    lambda a, b: confide.pack_bits(a, b),
    lambda a, b: confide.unpack_bits(a, 3, b),
    lambda a, b: confide.split_secret(a, b, 2),
    lambda a, b: confide.combine_shares([a, b]),
    lambda a, b: confide.discrete_gaussian(3, b),
    lambda a, b: confide.SecureRng(a),
]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.integers(0, len(CALLS) - 1), anything, anything)
def test_no_input_escapes_as_a_panic_or_untyped_error(i: int, a: object, b: object) -> None:
    # Any input either works or raises a ConfideError / a TypeError or OverflowError from
    # argument conversion; never pyo3's PanicException (a BaseException) or anything else.
    with contextlib.suppress(errors.ConfideError, TypeError, OverflowError):
        CALLS[i](a, b)


def test_messages_say_expected_and_given() -> None:
    with pytest.raises(errors.ArrayTypeError) as e:
        confide.quantize(np.ones(3), 1.0, 8)  # type: ignore[arg-type]
    assert "must be a 1-D numpy.float32 array, got float64 ndarray of shape (3,)" in str(e.value)
