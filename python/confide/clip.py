"""L2 clipping of update vectors and of per-sample gradients.

Clipping bounds the sensitivity of everything downstream: client-level DP clips each model
update, DP-SGD clips each per-sample gradient (each row of a ``(batch, dim)`` matrix). After a
successful call every clipped vector has L2 norm at most ``max_norm`` exactly, for every
finite input and bound (the factor is shrunk by 2**-20 to absorb float32 rounding; where the
float32 factor or the products would be subnormal, each element is scaled in float64 and
rounded toward zero instead). Inputs containing NaN or Inf are rejected before anything is
written, naming the first offending element.

Rows are rows of the logical (row-major) matrix: the kernels accept only C-contiguous
arrays and raise ``ArrayTypeError`` for F-ordered, transposed, reversed or sliced views
(pass ``np.ascontiguousarray(x)``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from confide import _core

__all__ = ["clip_l2", "clip_rows", "l2_norm"]


def l2_norm(x: NDArray[np.float32]) -> float:
    """Return the L2 norm of a 1-D float32 vector, accumulated in float64.

    Parameters
    ----------
    x : numpy.ndarray
        C-contiguous 1-D ``float32`` array.

    Returns
    -------
    float
        ``sqrt(sum(x**2))``.

    Raises
    ------
    NonFiniteError
        ``x`` holds NaN or Inf (the message gives the first index).
    ArrayTypeError
        ``x`` is not a C-contiguous 1-D float32 array.

    Examples
    --------
    >>> import numpy as np
    >>> l2_norm(np.array([3.0, 4.0], dtype=np.float32))
    5.0
    """
    return _core.l2_norm(x)


def clip_l2(x: NDArray[np.float32], max_norm: float) -> float:
    """Clip ``x`` in place to L2 norm at most ``max_norm``.

    Parameters
    ----------
    x : numpy.ndarray
        Writeable, C-contiguous 1-D ``float32`` array; modified in place.
    max_norm : float
        Finite bound > 0.

    Returns
    -------
    float
        The norm of ``x`` before clipping.

    Raises
    ------
    ArrayTypeError
        ``x`` is not a writeable contiguous 1-D float32 array.
    NonFiniteError
        ``x`` holds NaN or Inf (``x`` is left unchanged).
    InvalidArgumentError
        ``max_norm`` is not finite and positive.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([3.0, 4.0], dtype=np.float32)
    >>> clip_l2(x, 1.0)
    5.0
    >>> bool(l2_norm(x) <= 1.0)
    True
    """
    return _core.clip_l2(x, max_norm)


def clip_rows(x: NDArray[np.float32], max_norm: float) -> NDArray[np.float64]:
    """Clip every row of a ``(batch, dim)`` float32 matrix in place, in parallel.

    Parameters
    ----------
    x : numpy.ndarray
        Writeable, C-contiguous (row-major) 2-D ``float32`` array (e.g. per-sample
        gradients); F-ordered or strided views are refused, not clipped by memory runs.
    max_norm : float
        Finite bound > 0 applied to each row.

    Returns
    -------
    numpy.ndarray
        ``float64`` array of the ``batch`` row norms before clipping.

    Raises
    ------
    ArrayTypeError
        Wrong dtype or rank, or not C-contiguous (the message says to pass
        ``np.ascontiguousarray(x)``).
    NonFiniteError
        A row holds NaN or Inf (the message names the element); no row is modified.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)
    >>> clip_rows(g, 1.0).round(4).tolist()
    [5.0, 0.5]
    >>> np.linalg.norm(g, axis=1).round(4).tolist()
    [1.0, 0.5]
    """
    return _core.clip_rows(x, max_norm)
