"""Named manifests and the safetensors wire format of model parameters.

Every engine exposes its parameters as one flat, C-contiguous ``float32`` vector. A
:class:`Manifest` names the pieces of that vector: an ordered list of ``(name, shape)``
entries, plus a free-form ``spec`` dictionary that tells an engine how to rebuild the model
(for instance ``{"engine": "numpy", "kind": "mlp", "hidden": [16]}``). The manifest's SHA-256
(over its canonical JSON) identifies the model architecture in the protocol.

On the wire and on disk, parameters are safetensors (never pickle): one ``F32`` tensor per
manifest entry, plus string metadata. :func:`decode_tensors` checks a received file against a
manifest before any array is built (names, shapes, dtype, offsets) and rejects NaN and Inf.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from numpy.typing import NDArray

from confide.errors import ManifestError, WireFormatError
from confide.protocol.jsonio import loads_bounded

__all__ = [
    "Manifest",
    "TensorSpec",
    "decode_tensors",
    "encode_tensors",
    "read_safetensors_header",
    "sha256_hex",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_MANIFEST_FORMAT = "confide-manifest/1"
# A safetensors header is JSON; 16 MiB is far beyond any manifest this SDK builds.
_MAX_HEADER_BYTES = 16 << 20


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hex SHA-256 of ``data``.

    Parameters
    ----------
    data : bytes
        Any bytes.

    Returns
    -------
    str
        64 hex characters.

    Examples
    --------
    >>> sha256_hex(b"")[:16]
    'e3b0c44298fc1c14'
    """
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a manifest.

    Parameters
    ----------
    name : str
        1 to 128 characters from ``[A-Za-z0-9_.-]``.
    shape : tuple of int
        Non-negative dimensions; ``()`` is a scalar.
    """

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ManifestError(
                f"tensor name must match {_NAME_RE.pattern}, got {self.name!r}",
            )
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.shape):
            raise ManifestError(f"shape of {self.name!r} must be non-negative ints: {self.shape}")

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Manifest:
    """Ordered names and shapes of a flat float32 parameter vector.

    Parameters
    ----------
    tensors : sequence of TensorSpec
        The entries, in the order they occupy the flat vector; names are unique.
    spec : mapping, optional
        JSON-serialisable description an engine uses to rebuild the model.

    Examples
    --------
    >>> m = Manifest.from_shapes([("w", (2, 3)), ("b", (3,))])
    >>> m.size
    9
    >>> vec = np.arange(9, dtype=np.float32)
    >>> m.unflatten(vec)["b"].tolist()
    [6.0, 7.0, 8.0]
    >>> bool(np.array_equal(m.flatten(m.unflatten(vec)), vec))
    True
    """

    tensors: tuple[TensorSpec, ...]
    spec: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ManifestError(f"tensor names must be unique, got {names}")
        try:
            json.dumps(dict(self.spec), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest spec must be JSON-serialisable: {exc}") from exc

    @classmethod
    def from_shapes(
        cls,
        entries: Sequence[tuple[str, Sequence[int]]],
        spec: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Build a manifest from ``(name, shape)`` pairs.

        Parameters
        ----------
        entries : sequence of (str, sequence of int)
            Names and shapes, in vector order.
        spec : mapping, optional
            Engine description.

        Returns
        -------
        Manifest
            The manifest.
        """
        return cls(
            tuple(TensorSpec(n, tuple(int(d) for d in s)) for n, s in entries),
            dict(spec or {}),
        )

    @property
    def names(self) -> list[str]:
        """Tensor names in vector order."""
        return [t.name for t in self.tensors]

    @property
    def size(self) -> int:
        """Total number of float32 elements."""
        return sum(t.size for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Size of the flat vector in bytes."""
        return 4 * self.size

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form of the manifest.

        Returns
        -------
        dict
            ``{"format", "dtype", "tensors": [{"name", "shape"}...], "spec"}``.
        """
        return {
            "format": _MANIFEST_FORMAT,
            "dtype": "float32",
            "tensors": [{"name": t.name, "shape": list(t.shape)} for t in self.tensors],
            "spec": dict(self.spec),
        }

    def to_json(self) -> str:
        """Return the canonical JSON text (sorted keys, no spaces) the hash is taken over.

        Returns
        -------
        str
            Canonical JSON.
        """
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        """SHA-256 (hex) of the canonical JSON."""
        return sha256_hex(self.to_json().encode())

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse the JSON form produced by :meth:`to_dict`.

        Parameters
        ----------
        data : Any
            Decoded JSON.

        Returns
        -------
        Manifest
            The manifest.

        Raises
        ------
        ManifestError
            The document is not a confide manifest.
        """
        if not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT:
            raise ManifestError(f"expected a {_MANIFEST_FORMAT!r} document")
        if data.get("dtype") != "float32":
            raise ManifestError(f"only float32 manifests exist, got {data.get('dtype')!r}")
        tensors = data.get("tensors")
        spec = data.get("spec", {})
        if not isinstance(tensors, list) or not isinstance(spec, dict):
            raise ManifestError("manifest needs a 'tensors' list and a 'spec' object")
        entries: list[tuple[str, Sequence[int]]] = []
        for t in tensors:
            if not isinstance(t, dict) or not isinstance(t.get("shape"), list):
                raise ManifestError(f"bad tensor entry {t!r}")
            entries.append((t.get("name"), t["shape"]))  # type: ignore[arg-type]
        return cls.from_shapes(entries, spec)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse a manifest from JSON text.

        Parameters
        ----------
        text : str or bytes
            JSON document.

        Returns
        -------
        Manifest
            The manifest.
        """
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read a manifest JSON file.

        Parameters
        ----------
        path : str or Path
            File written by :meth:`save`.

        Returns
        -------
        Manifest
            The manifest.
        """
        return cls.from_json(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        """Write the manifest as JSON.

        Parameters
        ----------
        path : str or Path
            Destination file.
        """
        Path(path).write_text(
            json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    def check_vector(self, vector: NDArray[np.float32]) -> None:
        """Check that ``vector`` is a 1-D float32 vector of the manifest's size.

        Parameters
        ----------
        vector : numpy.ndarray
            Candidate flat parameter vector.

        Raises
        ------
        ManifestError
            Wrong dtype, rank or length.
        """
        if not isinstance(vector, np.ndarray) or vector.dtype != np.float32 or vector.ndim != 1:
            raise ManifestError("expected a 1-D float32 numpy vector")
        if vector.shape[0] != self.size:
            raise ManifestError(f"expected {self.size} parameters, got {vector.shape[0]}")

    def flatten(self, tensors: Mapping[str, NDArray[Any]]) -> NDArray[np.float32]:
        """Concatenate named tensors into the flat vector, in manifest order.

        Parameters
        ----------
        tensors : mapping of str to numpy.ndarray
            Exactly the manifest's names, with its shapes.

        Returns
        -------
        numpy.ndarray
            New 1-D float32 vector.

        Raises
        ------
        ManifestError
            Names or shapes differ from the manifest.
        """
        if set(tensors) != set(self.names):
            raise ManifestError(
                f"tensor names differ from the manifest: expected {sorted(self.names)}, "
                f"got {sorted(tensors)}"
            )
        out = np.empty(self.size, dtype=np.float32)
        offset = 0
        for t in self.tensors:
            arr = np.asarray(tensors[t.name])
            if arr.shape != t.shape:
                raise ManifestError(f"{t.name!r}: expected shape {t.shape}, got {arr.shape}")
            out[offset : offset + t.size] = arr.reshape(-1)
            offset += t.size
        return out

    def unflatten(self, vector: NDArray[np.float32]) -> dict[str, NDArray[np.float32]]:
        """Split the flat vector into named views with the manifest's shapes.

        Parameters
        ----------
        vector : numpy.ndarray
            1-D float32 vector of length :attr:`size`.

        Returns
        -------
        dict of str to numpy.ndarray
            Views into ``vector`` (no copy).
        """
        self.check_vector(vector)
        out: dict[str, NDArray[np.float32]] = {}
        offset = 0
        for t in self.tensors:
            out[t.name] = vector[offset : offset + t.size].reshape(t.shape)
            offset += t.size
        return out


def read_safetensors_header(data: bytes) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and sanity-check a safetensors header without building any array.

    Parameters
    ----------
    data : bytes
        A complete safetensors file.

    Returns
    -------
    entries : dict
        Tensor name to ``{"dtype", "shape", "data_offsets"}``.
    metadata : dict of str to str
        The ``__metadata__`` section (empty if absent).
    data_start : int
        Offset of the data section in ``data``.

    Raises
    ------
    WireFormatError
        Truncated or malformed file.
    """
    if len(data) < 8:
        raise WireFormatError(f"safetensors file truncated: {len(data)} bytes")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise WireFormatError(
            f"safetensors header of {header_len} bytes does not fit in {len(data)} bytes"
        )
    # Bounded: depth, integer size, duplicate names (two tensors of one name) refused.
    header = loads_bounded(
        data[8 : 8 + header_len],
        max_bytes=_MAX_HEADER_BYTES,
        max_depth=4,
        max_int_digits=20,
        what="safetensors header",
    )
    if not isinstance(header, dict):
        raise WireFormatError("safetensors header is not a JSON object")
    raw_meta = header.pop("__metadata__", {})
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise WireFormatError("safetensors __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = len(data) - data_start
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise WireFormatError(f"safetensors entry {name!r} is not an object")
        offsets = entry.get("data_offsets")
        shape = entry.get("shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise WireFormatError(f"safetensors entry {name!r} has bad data_offsets {offsets}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WireFormatError(f"safetensors entry {name!r} has bad shape {shape}")
        if not isinstance(entry.get("dtype"), str):
            raise WireFormatError(f"safetensors entry {name!r} has no dtype")
    return header, dict(raw_meta), data_start


def encode_tensors(
    manifest: Manifest,
    vector: NDArray[np.float32],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise a flat vector as safetensors, one tensor per manifest entry.

    Parameters
    ----------
    manifest : Manifest
        Names and shapes.
    vector : numpy.ndarray
        1-D float32 vector of length ``manifest.size``.
    metadata : mapping of str to str, optional
        Stored in the file's ``__metadata__``.

    Returns
    -------
    bytes
        The safetensors file; identical inputs always give identical bytes.

    Examples
    --------
    >>> m = Manifest.from_shapes([("w", (2,))])
    >>> blob = encode_tensors(m, np.ones(2, np.float32), {"num_examples": "3"})
    >>> vec, meta = decode_tensors(m, blob)
    >>> vec.tolist(), meta["num_examples"]
    ([1.0, 1.0], '3')
    """
    # Written here rather than with safetensors.numpy.save, whose header order (a Rust
    # HashMap) varies between calls: model versions are named by their hash, so the same
    # parameters must always give the same bytes. Tensors are laid out in manifest order,
    # which makes the data section the flat vector itself.
    manifest.check_vector(vector)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in manifest.tensors:
        end = offset + 4 * t.size
        header[t.name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the spec allows space padding to 8-byte alignment
    data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return struct.pack("<Q", len(text)) + text + data


def decode_tensors(manifest: Manifest, data: bytes) -> tuple[NDArray[np.float32], dict[str, str]]:
    """Parse safetensors bytes and check them against ``manifest``.

    Parameters
    ----------
    manifest : Manifest
        What the file must contain: exactly these names, shapes and dtype float32.
    data : bytes
        A complete safetensors file.

    Returns
    -------
    vector : numpy.ndarray
        The flat float32 vector.
    metadata : dict of str to str
        The file's metadata.

    Raises
    ------
    WireFormatError
        The bytes are not a valid safetensors file.
    ManifestError
        Names, shapes or dtypes differ from the manifest, or a value is NaN or Inf.
    """
    header, metadata, _ = read_safetensors_header(data)
    expected = {t.name: t for t in manifest.tensors}
    if set(header) != set(expected):
        missing = sorted(set(expected) - set(header))
        extra = sorted(set(header) - set(expected))
        raise ManifestError(
            f"tensor names differ from the manifest: missing {missing}, extra {extra}"
        )
    for name, entry in header.items():
        if entry["dtype"] != "F32":
            raise ManifestError(f"{name!r}: expected dtype F32, got {entry['dtype']}")
        if tuple(entry["shape"]) != expected[name].shape:
            raise ManifestError(
                f"{name!r}: expected shape {expected[name].shape}, got {tuple(entry['shape'])}"
            )
        start, end = entry["data_offsets"]
        if end - start != 4 * expected[name].size:
            raise WireFormatError(f"{name!r}: data length {end - start} does not match its shape")
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # the Rust parser raises its own SafetensorError
        raise WireFormatError(f"invalid safetensors file: {exc}") from exc
    vector = manifest.flatten(tensors)
    if not np.isfinite(vector).all():
        raise ManifestError("tensors contain NaN or Inf", code="non_finite")
    return vector, metadata
