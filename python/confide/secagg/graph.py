"""Random Harary graphs from a public seed (Bell et al., CCS 2020).

``H(n, k)`` places the ``n`` clients on a ring in a uniformly random order and connects each
to the ``k / 2`` nearest positions on each side; ``k = n - 1`` is the complete graph. The
order is a Fisher-Yates shuffle driven by :class:`confide.SecureRng` keyed with
``SHA-256("confide/secaggplus/graph/v1" || seed)``, with rejection sampling so every
permutation is equally likely. Server and clients derive the same graph from the same seed
(the session id), so the graph needs no message of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from confide.errors import InfeasibleConfigError
from confide.noise import SecureRng

__all__ = ["harary_graph", "shuffle"]

_TAG = b"confide/secaggplus/graph/v1"


def _below(rng: SecureRng, bound: int) -> int:
    """Uniform integer in ``[0, bound)`` by rejection sampling."""
    if bound <= 1:
        return 0
    nbytes = (bound.bit_length() + 7) // 8 + 1
    span = 1 << (8 * nbytes)
    limit = span - span % bound
    while True:
        v = int.from_bytes(rng.random_bytes(nbytes), "big")
        if v < limit:
            return v % bound


def shuffle(items: Sequence[str], seed: bytes) -> list[str]:
    """Return ``items`` in a uniformly random order determined by ``seed``.

    Parameters
    ----------
    items : sequence of str
        Items to order (their input order matters; callers pass them sorted).
    seed : bytes
        Public seed, any length.

    Returns
    -------
    list of str
        A permutation of ``items``.

    Examples
    --------
    >>> shuffle(["a", "b", "c"], b"s") == shuffle(["a", "b", "c"], b"s")
    True
    """
    rng = SecureRng(hashlib.sha256(_TAG + seed).digest())
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = _below(rng, i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def harary_graph(ids: Sequence[str], k: int, seed: bytes) -> dict[str, tuple[str, ...]]:
    """Build the random Harary graph ``H(len(ids), k)`` over ``ids``.

    Parameters
    ----------
    ids : sequence of str
        Distinct client ids (order irrelevant: they are sorted first).
    k : int
        Degree; ``k >= len(ids) - 1`` gives the complete graph, otherwise ``k`` must be even.
    seed : bytes
        Public seed.

    Returns
    -------
    dict of str to tuple of str
        Each id's neighbours, sorted, never including itself.

    Raises
    ------
    ValueError
        Duplicate ids, or an odd ``k`` below ``len(ids) - 1``.

    Examples
    --------
    >>> g = harary_graph(["a", "b", "c", "d", "e"], 2, b"seed")
    >>> sorted(len(v) for v in g.values())
    [2, 2, 2, 2, 2]
    >>> harary_graph(["a", "b", "c"], 4, b"seed")["a"]
    ('b', 'c')
    """
    ordered = sorted(ids)
    n = len(ordered)
    if len(set(ordered)) != n:
        raise InfeasibleConfigError("client ids must be distinct")
    if k >= n - 1:
        return {i: tuple(j for j in ordered if j != i) for i in ordered}
    if k < 2 or k % 2:
        raise InfeasibleConfigError(f"k must be even and >= 2 below the complete graph, got {k}")
    ring = shuffle(ordered, seed)
    half = k // 2
    graph: dict[str, tuple[str, ...]] = {}
    for pos, node in enumerate(ring):
        nbrs = {ring[(pos + off) % n] for off in range(-half, half + 1) if off}
        graph[node] = tuple(sorted(nbrs))
    return graph
