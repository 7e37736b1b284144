"""Partial model sharing: a public, round-seeded subset of the parameters per round.

Each round only that subset is shared and aggregated; the rest stays on the sites.

The job config's ``[sharing] fraction`` (in (0, 1]; 1.0, the default, shares everything)
sets the share. For every round the server derives a 32-byte **selection seed**
(:func:`round_seed`: SHA-256 of the job name, the job seed and the round) and sends it with
the fraction in the training task (``TrainConfig.share_fraction`` / ``share_seed``), never
the index list. Every site and the server re-derive the same subset from it
(:func:`shared_indices`), so all the cohort's uploads have the same coordinates and secure
aggregation sums them consistently: the masked vector simply has the subset's length.

The subset is **public selection, not a privacy mechanism**: the seed travels in the clear
and anyone can recompute the subset. It is expanded by confide's mask PRG (ChaCha-based
:func:`confide.secagg.expand_mask`, known-answer tested) into one 32-bit key per parameter;
the ``k = max(1, round(fraction * n))`` parameters with the smallest keys (ties by index) are
shared, in increasing index order. The PRG, not ``numpy.random``, so that sites and server
on different numpy releases agree bit for bit.

What "stays local" means. The server applies the strategy to the shared coordinates only
(:func:`scatter`: the unshared coordinates of the global model are left unchanged). A site
keeps its own model between rounds: its next round starts from the global values on that
round's shared subset and from its own previous local values elsewhere
(:func:`local_start`); the client persists that local model in its state folder. The
uploaded delta is the shared coordinates of ``w_local_after - w_start``
(:func:`select`), and the norm bound / DP clip (``update_clip_norm``) applies to that
shared vector, after selection: the sensitivity is that of what is released. The accountant
is unchanged (a smaller vector with the same clip norm has the same sensitivity).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numpy.typing import NDArray

from confide.errors import ConfigError, ShapeError
from confide.protocol.manifest import Manifest

__all__ = [
    "check_fraction",
    "local_start",
    "round_seed",
    "scatter",
    "select",
    "shared_count",
    "shared_indices",
    "shared_manifest",
]

_SESSION = b"confide-partial-sharing-v1"


def round_seed(job_name: str, job_seed: int, round_id: int) -> str:
    """Return the public selection seed of a round (64 hex digits).

    Parameters
    ----------
    job_name : str
        The job's ``[job] name``.
    job_seed : int
        The job's ``[job] seed``.
    round_id : int
        The round (>= 1).

    Returns
    -------
    str
        ``SHA-256("confide-partial-sharing-v1" | name | seed | round)`` in hex.

    Examples
    --------
    >>> len(round_seed("job", 1, 3))
    64
    >>> round_seed("job", 1, 3) == round_seed("job", 1, 4)
    False
    """
    h = hashlib.sha256(_SESSION)
    for part in (job_name.encode(), str(job_seed).encode(), str(round_id).encode()):
        h.update(len(part).to_bytes(4, "little"))
        h.update(part)
    return h.hexdigest()


def check_fraction(fraction: float) -> float:
    """Return ``fraction`` if it is a finite number in (0, 1]; else raise ConfigError."""
    ok = (
        isinstance(fraction, int | float)
        and not isinstance(fraction, bool)
        and math.isfinite(fraction)
        and 0.0 < fraction <= 1.0
    )
    if not ok:
        raise ConfigError(
            f"sharing.fraction must be a number in (0, 1] (1.0 shares every parameter), "
            f"got {fraction!r}"
        )
    return float(fraction)


def shared_count(size: int, fraction: float) -> int:
    """Return the number of shared parameters: ``max(1, round(fraction * size))``.

    Examples
    --------
    >>> shared_count(31, 0.2), shared_count(31, 1.0), shared_count(3, 0.01)
    (6, 31, 1)
    """
    check_fraction(fraction)
    return min(size, max(1, round(fraction * size)))


def shared_indices(seed_hex: str, size: int, fraction: float) -> NDArray[np.int64]:
    """Return the round's shared parameter indices (sorted), the same on every machine.

    Parameters
    ----------
    seed_hex : str
        The round's selection seed (:func:`round_seed`).
    size : int
        Parameters in the model (``manifest.size``).
    fraction : float
        Share in (0, 1].

    Returns
    -------
    numpy.ndarray
        ``shared_count(size, fraction)`` sorted int64 indices in ``[0, size)``.

    Examples
    --------
    >>> idx = shared_indices(round_seed("job", 1, 1), 10, 0.3)
    >>> idx.tolist() == sorted(idx.tolist()), len(idx)
    (True, 3)
    >>> shared_indices(round_seed("job", 1, 1), 10, 1.0).tolist() == list(range(10))
    True
    """
    from confide.secagg.primitives import MaskDomain, expand_mask

    if size < 1:
        raise ShapeError(f"a model has at least one parameter, got size={size}")
    k = shared_count(size, fraction)
    if k == size:
        return np.arange(size, dtype=np.int64)
    try:
        seed = bytes.fromhex(seed_hex)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ConfigError(f"share_seed must be 64 hex digits, got {seed_hex[:80]!r}")
    keys = expand_mask(seed, size, 32, MaskDomain(_SESSION, 1, "self"))
    order = np.argsort(keys, kind="stable")  # ties by index: deterministic
    return np.sort(order[:k]).astype(np.int64)


def shared_manifest(count: int) -> Manifest:
    """Return the manifest of a partial upload: one float32 tensor ``shared`` of ``count``.

    A site encodes the shared coordinates of its delta with it
    (:func:`confide.protocol.manifest.encode_tensors`), the server decodes them with it:
    the upload is ``count * 4`` bytes of values plus the safetensors header.

    Examples
    --------
    >>> shared_manifest(6).size
    6
    """
    return Manifest.from_shapes([("shared", (count,))], {"sharing": "partial"})


def select(vector: NDArray[np.float32], index: NDArray[np.int64]) -> NDArray[np.float32]:
    """Return the shared coordinates of a full-length vector (a copy, float32, contiguous)."""
    out: NDArray[np.float32] = np.ascontiguousarray(vector[index], dtype=np.float32)
    return out


def scatter(
    base: NDArray[np.float32], index: NDArray[np.int64], values: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Return ``base`` with ``values`` written at ``index``: the unshared ones unchanged.

    Raises
    ------
    ShapeError
        ``values`` does not have one entry per index.

    Examples
    --------
    >>> base = np.zeros(4, np.float32)
    >>> scatter(base, np.array([1, 3]), np.array([5.0, 7.0], np.float32)).tolist()
    [0.0, 5.0, 0.0, 7.0]
    """
    if values.shape != index.shape:
        raise ShapeError(
            f"a partial vector must have one value per shared index ({index.shape[0]}), "
            f"got shape {values.shape}"
        )
    out = np.array(base, dtype=np.float32, copy=True)
    out[index] = values
    return out


def local_start(
    global_weights: NDArray[np.float32],
    local_weights: NDArray[np.float32] | None,
    index: NDArray[np.int64],
) -> NDArray[np.float32]:
    """Where a site's round starts: global values on the shared subset, its own elsewhere.

    Parameters
    ----------
    global_weights : numpy.ndarray
        The round's announced (global) model.
    local_weights : numpy.ndarray, optional
        The site's model after its previous round; ``None`` (first round, or a site without
        one) starts from the global model everywhere.
    index : numpy.ndarray
        The round's shared indices.

    Returns
    -------
    numpy.ndarray
        Full-length float32 start vector.
    """
    if local_weights is None:
        return np.array(global_weights, dtype=np.float32, copy=True)
    if local_weights.shape != global_weights.shape:
        raise ShapeError(
            f"the site's local model has shape {local_weights.shape}, the job's "
            f"{global_weights.shape}"
        )
    return scatter(local_weights, index, select(global_weights, index))
