"""Train a part of the model, the rest frozen: the trainable subset of a manifest.

DP fine-tuning (Tramèr & Boneh 2021; De et al. 2022) DP-trains a small part of a network
and keeps the rest frozen at values that carry no patient data (a random initialisation from
a public seed, or weights trained on public data). The noise of one DP-SGD step has L2 norm
about ``z * C * sqrt(d)``: training only ``d_trainable`` parameters divides it by
``sqrt(d / d_trainable)``.

A manifest declares the subset in its ``spec``:

``trainable``
    Parameter-name prefixes, e.g. ``["classifier"]``: a tensor is trainable when its name
    equals a prefix or starts with ``prefix + "."``. Absent: every tensor is trainable.
``frozen_sha256``
    SHA-256 (hex) of the frozen tensors' float32 values in manifest order
    (:func:`frozen_digest`). Required with ``trainable``.

The manifest (and so the digest) is pinned by every site when it joins (its SHA-256 must
equal the site's own manifest's), so a server cannot change the frozen part later without
every site noticing: :func:`check_frozen` refuses announced weights whose frozen part hashes
differently, before any gradient is computed.

In distributed DP-SGD the ring vector, the sensitivity and the noise cover only the
trainable coordinates (:func:`trainable_index`); the server scatters the decoded step into
those coordinates, so the frozen ones get a zero update by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.errors import IntegrityError, ManifestError
from confide.protocol.manifest import Manifest

__all__ = [
    "check_frozen",
    "frozen_digest",
    "is_trainable",
    "trainable_index",
    "trainable_names",
    "trainable_prefixes",
    "trainable_size",
    "with_trainable",
]


def trainable_prefixes(spec: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Return the spec's ``trainable`` prefixes, or ``None`` when every tensor trains.

    Raises
    ------
    ManifestError
        ``trainable`` is not a non-empty list of non-empty strings.
    """
    value = spec.get("trainable")
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(p, str) and p for p in value)
    ):
        raise ManifestError(
            f"spec 'trainable' must be a non-empty list of parameter-name prefixes, got {value!r}"
        )
    return tuple(value)


def is_trainable(name: str, prefixes: Sequence[str] | None) -> bool:
    """Whether tensor ``name`` is in the subset ``prefixes`` (``None``: all).

    Examples
    --------
    >>> is_trainable("classifier.1.weight", ["classifier"])
    True
    >>> is_trainable("classifiers", ["classifier"])
    False
    """
    if prefixes is None:
        return True
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def trainable_names(manifest: Manifest) -> list[str]:
    """Names of the manifest's trainable tensors, in manifest order."""
    prefixes = trainable_prefixes(manifest.spec)
    return [t.name for t in manifest.tensors if is_trainable(t.name, prefixes)]


def trainable_index(manifest: Manifest) -> NDArray[np.int64] | None:
    """Flat-vector indices of the trainable coordinates (ascending), or ``None`` for all.

    Raises
    ------
    ManifestError
        The prefixes match no tensor, or every tensor (then drop ``trainable``), or the
        manifest has no ``frozen_sha256``.

    Examples
    --------
    >>> m = Manifest.from_shapes([("a", (2,)), ("b", (3,))], {"trainable": ["b"],
    ...     "frozen_sha256": "0" * 64})
    >>> trainable_index(m).tolist()
    [2, 3, 4]
    """
    prefixes = trainable_prefixes(manifest.spec)
    if prefixes is None:
        return None
    parts: list[NDArray[np.int64]] = []
    offset = 0
    frozen = 0
    for t in manifest.tensors:
        n = int(np.prod(t.shape, dtype=np.int64))
        if is_trainable(t.name, prefixes):
            parts.append(np.arange(offset, offset + n, dtype=np.int64))
        else:
            frozen += 1
        offset += n
    if not parts:
        raise ManifestError(f"spec 'trainable' {list(prefixes)} matches no parameter")
    if frozen == 0:
        raise ManifestError(
            f"spec 'trainable' {list(prefixes)} matches every parameter; drop it to train all"
        )
    digest = manifest.spec.get("frozen_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ManifestError("a spec with 'trainable' needs 'frozen_sha256' (64 hex digits)")
    return np.concatenate(parts)


def trainable_size(manifest: Manifest) -> int:
    """Return the number of trainable coordinates (``manifest.size`` without a subset)."""
    index = trainable_index(manifest)
    return manifest.size if index is None else int(index.size)


def frozen_digest(manifest: Manifest, weights: NDArray[np.float32]) -> str:
    """SHA-256 (hex) of the frozen coordinates of ``weights`` (float32, little-endian).

    ``manifest`` needs ``trainable`` (its ``frozen_sha256`` is not read here).
    """
    prefixes = trainable_prefixes(manifest.spec)
    if prefixes is None:
        raise ManifestError("the manifest has no 'trainable' subset, so nothing is frozen")
    manifest.check_vector(weights)
    mask = np.ones(manifest.size, dtype=bool)
    offset = 0
    for t in manifest.tensors:
        n = int(np.prod(t.shape, dtype=np.int64))
        if is_trainable(t.name, prefixes):
            mask[offset : offset + n] = False
        offset += n
    frozen = np.ascontiguousarray(np.asarray(weights)[mask], dtype="<f4")
    return hashlib.sha256(frozen.tobytes()).hexdigest()


def with_trainable(
    manifest: Manifest, prefixes: Sequence[str], weights: NDArray[np.float32]
) -> Manifest:
    """Return ``manifest`` with the subset ``prefixes`` and the digest of ``weights``' frozen part.

    Examples
    --------
    >>> m = Manifest.from_shapes([("a", (2,)), ("b", (3,))], {})
    >>> w = np.arange(5, dtype=np.float32)
    >>> m2 = with_trainable(m, ["b"], w)
    >>> trainable_size(m2), m2.names == m.names
    (3, True)
    """
    spec = {**manifest.spec, "trainable": list(prefixes), "frozen_sha256": "0" * 64}
    draft = Manifest(manifest.tensors, spec)
    trainable_index(draft)  # the prefixes match some but not all tensors
    spec["frozen_sha256"] = frozen_digest(draft, weights)
    return Manifest(manifest.tensors, spec)


def check_frozen(manifest: Manifest, weights: NDArray[np.float32]) -> None:
    """Refuse ``weights`` whose frozen part is not the one the manifest pinned.

    Does nothing for a manifest without ``trainable``.

    Raises
    ------
    IntegrityError
        The frozen coordinates hash differently from ``spec["frozen_sha256"]``.
    """
    if trainable_index(manifest) is None:
        return
    got = frozen_digest(manifest, weights)
    if got != manifest.spec["frozen_sha256"]:
        raise IntegrityError(
            "the announced model's frozen parameters differ from the ones pinned in the "
            f"job's manifest (frozen_sha256 {manifest.spec['frozen_sha256'][:16]}..., got "
            f"{got[:16]}...); a server may not change the frozen part: the round is refused"
        )
