"""Cryptographically secure noise for differential privacy.

All randomness comes from :class:`SecureRng`, an AES-256-CTR generator keyed from the
operating system or from an explicit 32-byte seed (for reproducible tests). numpy's RNG is
never used for anything that protects privacy.

Float noise uses a *lattice* construction rather than textbook floating-point sampling,
which leaks the input through the low-order bits of the output (Mironov, CCS 2012): for
scale ``s`` the output is ``g * (round(x / g) + K)`` with ``g = 2**(floor(log2 s) - 32)``
and ``K`` an integer variate of scale ``s / g``, so the set of possible outputs does not
depend on ``x``. The costs (a sensitivity increase of at most ``sqrt(d) * s * 2**-33`` and a
bounded deviation from the exact discrete distribution) are stated in ``core_rs/src/noise.rs``.

:func:`discrete_gaussian` is the exact sampler of Canonne, Kamath and Steinke (2020) for
integer domains such as secure aggregation.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from confide import _core
from confide._core import SecureRng

__all__ = [
    "SecureRng",
    "add_gaussian_noise",
    "add_laplace_noise",
    "discrete_gaussian",
    "discrete_gaussian_variance",
    "gaussian",
    "laplace",
]

F = TypeVar("F", np.float32, np.float64)


def _rng(rng: SecureRng | None) -> SecureRng:
    return SecureRng() if rng is None else rng


def _add(
    x: NDArray[F], kind: str, scale: float, rng: SecureRng | None, inplace: bool
) -> NDArray[F]:
    if inplace:
        _core.add_noise_inplace(x, kind, scale, _rng(rng))
        return x
    out: NDArray[F] = _core.add_noise(x, kind, scale, _rng(rng))  # type: ignore[assignment]
    return out


def add_gaussian_noise(
    x: NDArray[F], sigma: float, *, rng: SecureRng | None = None, inplace: bool = False
) -> NDArray[F]:
    """Add Gaussian noise of standard deviation ``sigma`` to every element of ``x``.

    Parameters
    ----------
    x : numpy.ndarray
        ``float32`` or ``float64`` array of any shape and memory layout (C or F order,
        transposed, reversed or sliced views: elements are read in logical order, the
        result is C-contiguous with ``x``'s shape); all values finite.
    sigma : float
        Standard deviation, 0 or in [1e-250, 1e250]. ``0`` adds nothing.
    rng : SecureRng, optional
        Generator to draw from; a fresh OS-keyed one by default.
    inplace : bool, default False
        Write into ``x`` (which must be writeable) instead of returning a new array.

    Returns
    -------
    numpy.ndarray
        The noised array (``x`` itself when ``inplace``), same shape and dtype.

    Raises
    ------
    NonFiniteError
        ``x`` holds NaN or Inf (nothing is written).
    InvalidArgumentError
        ``sigma`` is negative, not finite or out of range.
    ArrayTypeError
        ``x`` is not a float32/float64 array (or not writeable with ``inplace``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = SecureRng(bytes(32))
    >>> y = add_gaussian_noise(np.zeros((2, 3), dtype=np.float32), 1.0, rng=rng)
    >>> y.shape, y.dtype
    ((2, 3), dtype('float32'))
    """
    return _add(x, "gaussian", sigma, rng, inplace)


def add_laplace_noise(
    x: NDArray[F], scale: float, *, rng: SecureRng | None = None, inplace: bool = False
) -> NDArray[F]:
    """Add Laplace noise of scale ``b = scale`` (std ``sqrt(2) * b``) to every element.

    Parameters
    ----------
    x : numpy.ndarray
        ``float32`` or ``float64`` array of any shape and memory layout (as in
        :func:`add_gaussian_noise`); all values finite.
    scale : float
        Laplace scale ``b``, 0 or in [1e-250, 1e250].
    rng : SecureRng, optional
        Generator; a fresh OS-keyed one by default.
    inplace : bool, default False
        Write into ``x`` instead of returning a new array.

    Returns
    -------
    numpy.ndarray
        The noised array.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones(4)
    >>> add_laplace_noise(x, 0.5, rng=SecureRng(bytes(32)), inplace=True) is x
    True
    """
    return _add(x, "laplace", scale, rng, inplace)


def gaussian(
    n: int,
    sigma: float,
    *,
    dtype: type[np.float32] | type[np.float64] = np.float32,
    rng: SecureRng | None = None,
) -> NDArray[np.floating]:
    """Draw ``n`` Gaussian samples of standard deviation ``sigma``.

    Parameters
    ----------
    n : int
        Number of samples.
    sigma : float
        Standard deviation (see :func:`add_gaussian_noise`).
    dtype : {numpy.float32, numpy.float64}
        Output dtype.
    rng : SecureRng, optional
        Generator; a fresh OS-keyed one by default.

    Returns
    -------
    numpy.ndarray
        1-D array of ``n`` samples.

    Examples
    --------
    >>> gaussian(3, 2.0, rng=SecureRng(bytes(32))).dtype
    dtype('float32')
    """
    return _core.sample_noise(n, "gaussian", sigma, _double(dtype), _rng(rng))


def laplace(
    n: int,
    scale: float,
    *,
    dtype: type[np.float32] | type[np.float64] = np.float32,
    rng: SecureRng | None = None,
) -> NDArray[np.floating]:
    """Draw ``n`` Laplace samples of scale ``scale``.

    Parameters
    ----------
    n : int
        Number of samples.
    scale : float
        Laplace scale ``b``.
    dtype : {numpy.float32, numpy.float64}
        Output dtype.
    rng : SecureRng, optional
        Generator; a fresh OS-keyed one by default.

    Returns
    -------
    numpy.ndarray
        1-D array of ``n`` samples.

    Examples
    --------
    >>> laplace(2, 1.0, dtype=np.float64, rng=SecureRng(bytes(32))).shape
    (2,)
    """
    return _core.sample_noise(n, "laplace", scale, _double(dtype), _rng(rng))


def _double(dtype: object) -> bool:
    d = np.dtype(dtype)  # type: ignore[call-overload]
    if d == np.float32:
        return False
    if d == np.float64:
        return True
    raise _core.InvalidArgumentError(f"dtype must be numpy.float32 or numpy.float64, got {d}")


def discrete_gaussian(n: int, sigma: float, *, rng: SecureRng | None = None) -> NDArray[np.int64]:
    """Draw ``n`` exact discrete Gaussian samples (Canonne, Kamath, Steinke 2020).

    ``P(k) ~ exp(-k**2 / (2 * sigma**2))`` over the integers. ``sigma**2`` is rounded *up* to
    a dyadic rational with at least 20 significant bits; the sampler is exact for that value,
    which :func:`discrete_gaussian_variance` returns.

    Parameters
    ----------
    n : int
        Number of samples.
    sigma : float
        Scale parameter in [2**-10, 2**28].
    rng : SecureRng, optional
        Generator; a fresh OS-keyed one by default.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of ``n`` samples.

    Examples
    --------
    >>> discrete_gaussian(4, 3.0, rng=SecureRng(bytes(32))).dtype
    dtype('int64')
    """
    samples, _ = _core.discrete_gaussian(n, sigma, _rng(rng))
    return samples


def discrete_gaussian_variance(sigma: float) -> float:
    """Return the variance parameter :func:`discrete_gaussian` realises for ``sigma``.

    Parameters
    ----------
    sigma : float
        Scale parameter in [2**-10, 2**28].

    Returns
    -------
    float
        ``sigma**2`` rounded up to the sampler's dyadic grid (never below ``sigma**2``).

    Examples
    --------
    >>> discrete_gaussian_variance(3.0)
    9.0
    """
    _, var = _core.discrete_gaussian(0, sigma, SecureRng(bytes(32)))
    return var
