"""The one check of a record index that every dataset's ``batch`` and ``subset`` make."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.errors import DataError


def check_index(index: Any, n: int) -> NDArray[np.int64]:
    """Return ``index`` as int64 if it is a 1-D integer array of records in ``[0, n)``.

    An empty array of any dtype (``np.array([])`` is float64) is the empty index.

    Raises
    ------
    DataError
        Not 1-D, not integers, or a record outside ``[0, n)``.

    Examples
    --------
    >>> check_index([2, 0], 3).tolist()
    [2, 0]
    >>> check_index(np.array([3]), 3)
    Traceback (most recent call last):
    ...
    confide.errors.DataError: index out of range for 3 records: [3, 3]
    """
    idx = np.asarray(index)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
        raise DataError(f"index must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"index out of range for {n} records: [{idx.min()}, {idx.max()}]")
    return idx
