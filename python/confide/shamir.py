"""t-of-n Shamir secret sharing of short secrets (e.g. 32-byte mask seeds).

Shares are over GF(2**61 - 1); a secret is cut into 7-byte chunks, each shared with its own
random polynomial, so any ``t - 1`` shares reveal nothing about it. Reconstruction uses
exactly ``t`` shares and rejects duplicates, shares of different secrets or thresholds, and
(with high probability) corrupted shares.
"""

from __future__ import annotations

from collections.abc import Sequence

from confide import _core
from confide._validate import as_bytes
from confide.noise import SecureRng

__all__ = ["combine_shares", "split_secret"]


def split_secret(secret: bytes, n: int, t: int, *, rng: SecureRng | None = None) -> list[bytes]:
    """Split ``secret`` into ``n`` shares, any ``t`` of which reconstruct it.

    Parameters
    ----------
    secret : bytes
        1 to 1024 bytes.
    n : int
        Number of shares, ``t <= n <= 65535``.
    t : int
        Threshold, ``1 <= t <= n``.
    rng : SecureRng, optional
        Generator for the polynomial coefficients; a fresh OS-keyed one by default.

    Returns
    -------
    list of bytes
        Share ``i`` has x-coordinate ``i + 1``.

    Raises
    ------
    InvalidArgumentError
        Invalid ``n``/``t`` or secret length.

    Examples
    --------
    >>> shares = split_secret(b"0123456789abcdef0123456789abcdef", 5, 3)
    >>> combine_shares([shares[4], shares[0], shares[2]])
    b'0123456789abcdef0123456789abcdef'
    """
    return _core.shamir_split(as_bytes(secret, "secret"), n, t, SecureRng() if rng is None else rng)


def combine_shares(shares: Sequence[bytes]) -> bytes:
    """Reconstruct a secret from exactly ``t`` of its shares.

    Parameters
    ----------
    shares : sequence of bytes
        Exactly ``t`` distinct shares from one :func:`split_secret` call.

    Returns
    -------
    bytes
        The secret.

    Raises
    ------
    ShareError
        Wrong count, duplicate x-coordinates, mixed secrets/thresholds, malformed or
        inconsistent shares.

    Examples
    --------
    >>> s = split_secret(b"k" * 32, 3, 2)
    >>> combine_shares(s[:1])
    Traceback (most recent call last):
    ...
    confide.errors.ShareError: reconstruction uses exactly t = 2 shares, got 1
    """
    return _core.shamir_combine([as_bytes(s, f"shares[{i}]") for i, s in enumerate(shares)])
