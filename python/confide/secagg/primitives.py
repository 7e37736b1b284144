"""Secure-aggregation primitives: quantization, masks, bit packing.

A client quantizes its clipped update into the ring ``Z_(2**bits)`` with unbiased
stochastic rounding, adds a self mask and signed pairwise masks expanded from 32-byte seeds,
and uploads the result bit-packed. Masks come from AES-128-CTR keyed by
``HKDF-SHA256(seed, session || round || purpose || bits)``, are exactly uniform mod
``2**bits`` and are added in one fused pass without a mask-sized temporary.

Ring vectors are ``numpy.uint32`` when ``bits <= 32`` and ``numpy.uint64`` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from confide import _core
from confide._validate import as_bytes
from confide.errors import InvalidArgumentError
from confide.noise import SecureRng

__all__ = [
    "MaskDomain",
    "apply_masks",
    "dequantize",
    "expand_mask",
    "pack_bits",
    "quantize",
    "ring_dtype",
    "unpack_bits",
]


@dataclass(frozen=True)
class MaskDomain:
    """Domain separation of a mask: masks for different domains are independent.

    Parameters
    ----------
    session : bytes
        Session identifier (e.g. a hash of all keys advertised in the round).
    round : int
        Round number, ``0 <= round < 2**64``.
    purpose : str
        What the mask is for, e.g. ``"self"`` or ``"pair"``.

    Examples
    --------
    >>> MaskDomain(b"session-1", 3, "self").purpose
    'self'
    """

    session: bytes
    round: int
    purpose: str

    def __post_init__(self) -> None:
        """Check the round number (a u64 on the wire) and the field types."""
        if not isinstance(self.round, int) or isinstance(self.round, bool):
            raise InvalidArgumentError(
                f"round must be an int in [0, 2**64 - 1], got {type(self.round).__name__}"
            )
        if not 0 <= self.round < 1 << 64:
            raise InvalidArgumentError(f"round must be in [0, 2**64 - 1], got {self.round}")


def ring_dtype(bits: int) -> type[np.unsignedinteger]:
    """Return the storage dtype of ring elements mod ``2**bits``.

    Parameters
    ----------
    bits : int
        Ring bit width, 1..64.

    Returns
    -------
    type
        ``numpy.uint32`` for ``bits <= 32``, else ``numpy.uint64``.

    Examples
    --------
    >>> ring_dtype(20).__name__, ring_dtype(40).__name__
    ('uint32', 'uint64')
    """
    return np.uint32 if bits <= 32 else np.uint64


def quantize(
    x: NDArray[np.float32], clip_range: float, bits: int, *, rng: SecureRng | None = None
) -> NDArray[np.unsignedinteger]:
    """Quantize ``x`` to integers in ``[0, 2**bits - 1]`` with stochastic rounding.

    Each value is clipped to ``[-clip_range, clip_range]`` and mapped linearly onto
    ``2**bits - 1`` steps; rounding up happens with probability equal to the fractional part
    (to within ``2**-32``), so the dequantized value is unbiased up to the float64 error of
    the scaled position, below ``2**(bits - 51)`` steps (``2**-19`` at 32 bits). The error
    of one element is below one step, ``2 * clip_range / (2**bits - 1)``, plus that amount.
    ``bits`` is at most 32: wider quantizers cannot be computed exactly in float64 (the
    ring that holds the masked sum may still be up to 64 bits wide).

    Parameters
    ----------
    x : numpy.ndarray
        C-contiguous 1-D ``float32`` array; all values finite.
    clip_range : float
        Finite bound > 0.
    bits : int
        Quantization bits, 1..32.
    rng : SecureRng, optional
        Generator for the rounding; a fresh OS-keyed one by default.

    Returns
    -------
    numpy.ndarray
        ``numpy.uint32`` array of the same length.

    Raises
    ------
    InvalidArgumentError
        ``bits`` outside ``[1, 32]`` or ``clip_range`` not finite and positive.
    NonFiniteError
        ``x`` holds NaN or Inf (the message gives the first index).

    Examples
    --------
    >>> import numpy as np
    >>> quantize(np.array([-1.0, 0.0, 1.0], dtype=np.float32), 1.0, 8).tolist()[::2]
    [0, 255]
    """
    return _core.quantize(x, clip_range, bits, SecureRng() if rng is None else rng)


def dequantize(
    total: NDArray[np.unsignedinteger], clip_range: float, bits: int, n: int, *, mean: bool = True
) -> NDArray[np.float32]:
    """Map the sum of ``n`` quantized vectors back to float32.

    Parameters
    ----------
    total : numpy.ndarray
        1-D ``uint32``/``uint64`` element-wise sum of ``n`` outputs of :func:`quantize` (taken
        in a ring large enough not to wrap: ``modulus_bits >= bits + ceil(log2 n)``).
    clip_range, bits : float, int
        The parameters used to quantize.
    n : int
        Number of vectors summed, >= 1.
    mean : bool, default True
        Return the mean instead of the sum.

    Returns
    -------
    numpy.ndarray
        ``float32`` sum or mean.

    Raises
    ------
    AggregateError
        An element exceeds ``n * (2**bits - 1)``: the sum wrapped or ``n`` is wrong. Only
        such elements are detected; a sum that wrapped to a value at most ``n * (2**bits -
        1)`` looks valid, so the ring must be wide enough before masking.

    Examples
    --------
    >>> import numpy as np
    >>> q = [quantize(np.array([v], dtype=np.float32), 1.0, 16) for v in (0.5, -0.25)]
    >>> total = (q[0].astype(np.uint64) + q[1]).astype(np.uint64)
    >>> round(float(dequantize(total, 1.0, 16, 2)[0]), 3)
    0.125
    """
    return _core.dequantize(total, clip_range, bits, n, mean)


def expand_mask(seed: bytes, n: int, bits: int, domain: MaskDomain) -> NDArray[np.unsignedinteger]:
    """Expand ``seed`` into ``n`` uniformly random elements mod ``2**bits``.

    Parameters
    ----------
    seed : bytes
        Exactly 32 bytes.
    n : int
        Number of elements.
    bits : int
        Ring bit width, 1..64.
    domain : MaskDomain
        Session, round and purpose the mask belongs to.

    Returns
    -------
    numpy.ndarray
        ``ring_dtype(bits)`` array.

    Examples
    --------
    >>> m = expand_mask(bytes(32), 4, 12, MaskDomain(b"s", 1, "self"))
    >>> m.dtype.name, bool((m < 4096).all())
    ('uint32', True)
    """
    return _core.expand_mask(seed, n, bits, domain.session, domain.round, domain.purpose)


def apply_masks(
    x: NDArray[np.unsignedinteger],
    masks: Sequence[tuple[bytes, int]],
    bits: int,
    domain: MaskDomain,
) -> NDArray[np.unsignedinteger]:
    """Return ``x + sum(sign * mask(seed)) mod 2**bits`` for every ``(seed, sign)``.

    All masks are applied in one fused, parallel pass; no mask is materialised.

    Parameters
    ----------
    x : numpy.ndarray
        1-D ``uint32`` (``bits <= 32``) or ``uint64`` array, every element ``< 2**bits``.
    masks : sequence of (bytes, int)
        32-byte seeds with sign ``+1`` (add) or ``-1`` (subtract).
    bits : int
        Ring bit width.
    domain : MaskDomain
        Session, round and purpose.

    Returns
    -------
    numpy.ndarray
        New array of ``x``'s dtype.

    Examples
    --------
    >>> import numpy as np
    >>> d = MaskDomain(b"s", 1, "pair")
    >>> x = np.arange(5, dtype=np.uint32)
    >>> y = apply_masks(x, [(b"k" * 32, 1)], 16, d)
    >>> apply_masks(y, [(b"k" * 32, -1)], 16, d).tolist()
    [0, 1, 2, 3, 4]
    """
    specs: list[tuple[bytes, int]] = []
    for i, m in enumerate(masks):
        if not (isinstance(m, tuple) and len(m) == 2):
            raise _core.InvalidArgumentError(
                f"masks[{i}] must be a (32-byte seed, sign) tuple, got {type(m).__name__}"
            )
        specs.append((as_bytes(m[0], f"masks[{i}] seed"), m[1]))
    return _core.apply_masks(x, specs, bits, domain.session, domain.round, domain.purpose)


def pack_bits(x: NDArray[np.unsignedinteger], bits: int) -> bytes:
    """Pack ring elements into exactly ``ceil(len(x) * bits / 8)`` bytes.

    Parameters
    ----------
    x : numpy.ndarray
        1-D ``uint32``/``uint64`` array, every element ``< 2**bits``.
    bits : int
        Bits per element.

    Returns
    -------
    bytes
        Little-endian bit stream, zero padding.

    Examples
    --------
    >>> import numpy as np
    >>> pack_bits(np.array([1, 2, 7], dtype=np.uint32), 3).hex()
    'd101'
    """
    return _core.pack_bits(x, bits)


def unpack_bits(data: bytes, bits: int, n: int) -> NDArray[np.unsignedinteger]:
    """Decode ``n`` elements of ``bits`` bits; the exact inverse of :func:`pack_bits`.

    Parameters
    ----------
    data : bytes
        Exactly ``ceil(n * bits / 8)`` bytes with zero padding.
    bits : int
        Bits per element.
    n : int
        Number of elements.

    Returns
    -------
    numpy.ndarray
        ``ring_dtype(bits)`` array.

    Raises
    ------
    ShapeError
        Wrong length or non-zero padding.

    Examples
    --------
    >>> unpack_bits(bytes.fromhex("d101"), 3, 3).tolist()
    [1, 2, 7]
    """
    return _core.unpack_bits(data, bits, n)
