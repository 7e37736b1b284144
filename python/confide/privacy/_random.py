"""Uniform variates from :class:`confide.SecureRng` (never numpy's RNG)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from confide.noise import SecureRng

__all__ = ["uniforms"]

_TWO_POW_53 = 9007199254740992.0


def uniforms(n: int, rng: SecureRng) -> NDArray[np.float64]:
    """Return ``n`` uniforms in ``[0, 1)`` with 53 random bits each.

    Parameters
    ----------
    n : int
        Number of variates.
    rng : SecureRng
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        ``float64`` array; ``k / 2**53`` for uniform integers ``k``, so ``u < q`` holds with
        probability ``q`` up to ``2**-53``.

    Examples
    --------
    >>> u = uniforms(4, SecureRng(bytes(32)))
    >>> bool(((0 <= u) & (u < 1)).all())
    True
    """
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    raw = np.frombuffer(rng.random_bytes(8 * n), dtype="<u8")
    out: NDArray[np.float64] = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / _TWO_POW_53)
    return out
