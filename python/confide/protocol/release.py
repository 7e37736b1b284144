r"""Signed model releases: what a device checks before it runs a model.

The server signs every model version it releases with its Ed25519 **release key**; a device
pins the release public key at enrolment and runs a model only after
:func:`verify_release` has accepted it. A release is three things:

* the **record** (:class:`ReleaseRecord`): the model's SHA-256, a version that only grows,
  the architecture (manifest SHA-256), the class names, the job id, the creation time and
  the differential-privacy guarantee the server accounted for the model
  (:class:`DPGuarantee`: epsilon, delta and the protected unit);
* the **signature**: Ed25519 over ``b"confide-release/1\n" + record_bytes`` (the prefix
  separates release signatures from every other signature in the protocol);
* the **model bytes** (ONNX), which must hash to the record's ``model_sha256``.

Canonical encoding
------------------
``record_bytes`` is the record's JSON with keys sorted, no whitespace
(``separators=(",", ":")``), ASCII only (``\uXXXX`` escapes) and floats written in their
shortest round-trip form (Python's ``repr``). The schema, for ``format`` =
``"confide-release/1"``::

    {"classes":[str, ...],          class names, in output order (at least one)
     "created_at":int,              Unix seconds
     "dp":{"delta":float,"epsilon":float,"unit":"patient"|"site"|"record"} | null,
     "format":"confide-release/1",
     "job_id":str,
     "manifest_sha256":hex64,       architecture: SHA-256 of the manifest's canonical JSON
     "model_format":"onnx"|"tflite",
     "model_sha256":hex64,          SHA-256 of the model file
     "version":int}                 >= 1; strictly increases with every release of a key

A verifier checks the signature over the bytes it **received** and then parses those
bytes; it never re-serialises a record to verify it (so implementations in other languages
need no canonical JSON writer). :meth:`ReleaseRecord.from_bytes` also refuses any encoding
that is not the canonical one (extra spaces, unknown or missing keys), so one record has
exactly one byte string.

The device policy
-----------------
:class:`DevicePolicy` states the weakest guarantee a device accepts: ``max_epsilon``,
``max_delta`` and ``min_unit``; units are ordered ``record < patient < site`` (a site-level
guarantee covers every patient of a site, and on a patient's device the site *is* the
patient). A release without DP is refused unless ``require_dp`` is off. The device also
remembers the highest version it has accepted (:class:`VersionStore`) and refuses anything
older, or a different model under the same version.

Examples
--------
>>> from confide.protocol.signing import Identity
>>> key = Identity.generate()
>>> model = b"onnx bytes"
>>> record = ReleaseRecord.create(
...     job_id="derm", version=3, model=model, manifest_sha256="ab" * 32,
...     classes=("benign", "malignant"), dp=DPGuarantee(2.0, 1e-5, "patient"),
...     created_at=1_700_000_000)
>>> signature = sign_release(record, key)
>>> policy = DevicePolicy(max_epsilon=4.0, max_delta=1e-5)
>>> verify_release(record.to_bytes(), signature, model, key.public_key_b64, policy).version
3
>>> verify_release(record.to_bytes(), signature, b"tampered", key.public_key_b64, policy)
Traceback (most recent call last):
...
confide.errors.ReleaseIntegrityError: model SHA-256 ... is not the released ...
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from confide._fsio import write_atomic
from confide.errors import (
    ConfigError,
    ReleaseError,
    ReleaseIntegrityError,
    ReleasePolicyError,
    ReleaseReplayError,
    ReleaseSignatureError,
    SignatureError,
)
from confide.protocol.manifest import sha256_hex
from confide.protocol.signing import Identity, decode_public_key

__all__ = [
    "DOMAIN",
    "RELEASE_FORMAT",
    "UNITS",
    "DPGuarantee",
    "DevicePolicy",
    "ReleaseError",
    "ReleaseIntegrityError",
    "ReleasePolicyError",
    "ReleaseRecord",
    "ReleaseReplayError",
    "ReleaseSignatureError",
    "VersionStore",
    "key_fingerprint",
    "release_message",
    "sign_release",
    "verify_release",
]

RELEASE_FORMAT = "confide-release/1"
"""The ``format`` field of every record this module writes or accepts."""

DOMAIN = b"confide-release/1\n"
"""Prefix of the signed message: ``DOMAIN + record_bytes``."""

UNITS = ("record", "patient", "site")
"""DP units, weakest first."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FORMATS = ("onnx", "tflite")
_KEYS = {
    "classes",
    "created_at",
    "dp",
    "format",
    "job_id",
    "manifest_sha256",
    "model_format",
    "model_sha256",
    "version",
}
# A record is a few hundred bytes; this bounds what a hostile server can make a device parse.
_MAX_RECORD_BYTES = 64 << 10


# --- errors -------------------------------------------------------------------------------


# --- record -------------------------------------------------------------------------------


def _finite(name: str, value: Any, *, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise ConfigError(f"{name} must be >= {low}{upper}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DPGuarantee:
    """The (epsilon, delta)-DP guarantee a model carries, and the unit it protects.

    Parameters
    ----------
    epsilon : float
        Cumulative epsilon accounted for the model (finite, >= 0).
    delta : float
        Delta, in [0, 1).
    unit : {"record", "patient", "site"}
        What one neighbouring dataset differs by.

    Examples
    --------
    >>> DPGuarantee(1.5, 1e-5, "patient").to_dict()
    {'delta': 1e-05, 'epsilon': 1.5, 'unit': 'patient'}
    """

    epsilon: float
    delta: float
    unit: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _finite("epsilon", self.epsilon, low=0.0))
        delta = _finite("delta", self.delta, low=0.0, high=1.0)
        if delta >= 1.0:
            raise ConfigError(f"delta must be < 1, got {delta!r}")
        object.__setattr__(self, "delta", delta)
        if self.unit not in UNITS:
            raise ConfigError(f"unit must be one of {UNITS}, got {self.unit!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the record's ``dp`` object."""
        return {"delta": self.delta, "epsilon": self.epsilon, "unit": self.unit}

    def describe(self) -> str:
        """Return a one-line human-readable form.

        Returns
        -------
        str
            For example ``"(epsilon=1.5, delta=1e-05) patient-level DP"``.

        Examples
        --------
        >>> DPGuarantee(1.5, 1e-5, "patient").describe()
        '(epsilon=1.5, delta=1e-05) patient-level DP'
        """
        return f"(epsilon={self.epsilon:g}, delta={self.delta:g}) {self.unit}-level DP"


@dataclass(frozen=True)
class ReleaseRecord:
    """What the server signs about one released model version.

    Build one with :meth:`create` (from the model bytes) or :meth:`from_bytes` (from a
    received record); :meth:`to_bytes` is the canonical encoding described in the module
    documentation.

    Parameters
    ----------
    job_id : str
        The job that trained the model (1 to 128 printable characters).
    version : int
        Release version (>= 1), strictly increasing per release key.
    model_sha256 : str
        Lowercase hex SHA-256 of the model file.
    manifest_sha256 : str
        Lowercase hex SHA-256 of the model's manifest (its architecture).
    classes : tuple of str
        Class names in the order of the model's probability output.
    dp : DPGuarantee or None
        The accounted guarantee; ``None`` for a model trained without DP.
    created_at : int
        Unix seconds.
    model_format : {"onnx", "tflite"}, default "onnx"
        Format of the model file.
    """

    job_id: str
    version: int
    model_sha256: str
    manifest_sha256: str
    classes: tuple[str, ...]
    dp: DPGuarantee | None
    created_at: int
    model_format: str = "onnx"

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if (
            not isinstance(self.job_id, str)
            or not 1 <= len(self.job_id) <= 128
            or not self.job_id.isprintable()
        ):
            raise ConfigError(f"job_id must be 1..128 printable characters, got {self.job_id!r}")
        for name, low in (("version", 1), ("created_at", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("model_sha256", "manifest_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _HEX64.fullmatch(value):
                raise ConfigError(f"{name} must be 64 lowercase hex characters, got {value!r}")
        if not self.classes or not all(
            isinstance(c, str) and 0 < len(c) <= 128 and c.isprintable() for c in self.classes
        ):
            raise ConfigError(f"classes must be 1+ non-empty printable names, got {self.classes!r}")
        if self.dp is not None and not isinstance(self.dp, DPGuarantee):
            raise ConfigError(f"dp must be a DPGuarantee or None, got {type(self.dp).__name__}")
        if self.model_format not in _FORMATS:
            raise ConfigError(f"model_format must be one of {_FORMATS}, got {self.model_format!r}")

    @classmethod
    def create(
        cls,
        *,
        job_id: str,
        version: int,
        model: bytes,
        manifest_sha256: str,
        classes: Sequence[str],
        dp: DPGuarantee | None,
        created_at: int | None = None,
        model_format: str = "onnx",
    ) -> ReleaseRecord:
        """Describe ``model`` (hashing its bytes) as release ``version`` of ``job_id``.

        Parameters
        ----------
        job_id, version, manifest_sha256, classes, dp, model_format
            See the class parameters.
        model : bytes
            The model file.
        created_at : int, optional
            Unix seconds; now when omitted.

        Returns
        -------
        ReleaseRecord
            The record (not yet signed: see :func:`sign_release`).
        """
        return cls(
            job_id=job_id,
            version=version,
            model_sha256=sha256_hex(bytes(model)),
            manifest_sha256=manifest_sha256,
            classes=tuple(classes),
            dp=dp,
            created_at=int(time.time()) if created_at is None else created_at,
            model_format=model_format,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object of the canonical encoding."""
        return {
            "classes": list(self.classes),
            "created_at": self.created_at,
            "dp": None if self.dp is None else self.dp.to_dict(),
            "format": RELEASE_FORMAT,
            "job_id": self.job_id,
            "manifest_sha256": self.manifest_sha256,
            "model_format": self.model_format,
            "model_sha256": self.model_sha256,
            "version": self.version,
        }

    def to_bytes(self) -> bytes:
        """Return the canonical encoding (the bytes that are signed after :data:`DOMAIN`).

        Returns
        -------
        bytes
            Sorted-key, compact, ASCII JSON.

        Examples
        --------
        >>> r = ReleaseRecord("j", 1, "0" * 64, "1" * 64, ("a", "b"), None, 0)
        >>> r.to_bytes()[:40]
        b'{"classes":["a","b"],"created_at":0,"dp"'
        >>> ReleaseRecord.from_bytes(r.to_bytes()) == r
        True
        """
        text = json.dumps(
            self.to_dict(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
        return text.encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> ReleaseRecord:
        """Parse a canonical record, refusing any other encoding.

        Parameters
        ----------
        data : bytes
            A record as :meth:`to_bytes` writes it.

        Returns
        -------
        ReleaseRecord
            The record.

        Raises
        ------
        ReleaseError
            Not JSON, unknown ``format``, missing or extra keys, invalid values, or bytes
            that are not the canonical encoding of the record they hold.
        """
        if not isinstance(data, bytes | bytearray) or len(data) > _MAX_RECORD_BYTES:
            raise ReleaseError(f"a release record is at most {_MAX_RECORD_BYTES} bytes")
        try:
            doc = json.loads(bytes(data).decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ReleaseError(f"release record is not ASCII JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != RELEASE_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ReleaseError(f"release record format must be {RELEASE_FORMAT!r}, got {got!r}")
        if set(doc) != _KEYS:
            raise ReleaseError(f"release record keys must be {sorted(_KEYS)}, got {sorted(doc)}")
        dp_doc = doc["dp"]
        try:
            if dp_doc is not None:
                if not isinstance(dp_doc, dict) or set(dp_doc) != {"epsilon", "delta", "unit"}:
                    raise ConfigError(f"dp must have epsilon, delta and unit, got {dp_doc!r}")
                dp = DPGuarantee(dp_doc["epsilon"], dp_doc["delta"], dp_doc["unit"])
            else:
                dp = None
            if not isinstance(doc["classes"], list):
                raise ConfigError(f"classes must be a list, got {doc['classes']!r}")
            record = cls(
                job_id=doc["job_id"],
                version=doc["version"],
                model_sha256=doc["model_sha256"],
                manifest_sha256=doc["manifest_sha256"],
                classes=tuple(doc["classes"]),
                dp=dp,
                created_at=doc["created_at"],
                model_format=doc["model_format"],
            )
        except ConfigError as exc:
            raise ReleaseError(f"invalid release record: {exc}") from None
        if record.to_bytes() != bytes(data):
            raise ReleaseError("release record is not in canonical encoding")
        return record


def release_message(record_bytes: bytes) -> bytes:
    r"""Return the exact bytes the release key signs for ``record_bytes``.

    Parameters
    ----------
    record_bytes : bytes
        A canonical record (:meth:`ReleaseRecord.to_bytes`).

    Returns
    -------
    bytes
        ``b"confide-release/1\n" + record_bytes``.

    Examples
    --------
    >>> release_message(b"{}")
    b'confide-release/1\n{}'
    """
    return DOMAIN + bytes(record_bytes)


def sign_release(record: ReleaseRecord, key: Identity) -> bytes:
    """Sign a record with the server's release key.

    Parameters
    ----------
    record : ReleaseRecord
        The record.
    key : Identity
        The release key (an Ed25519 key; see ``confide_server.releases``).

    Returns
    -------
    bytes
        The 64-byte Ed25519 signature of :func:`release_message`.
    """
    return key.sign(release_message(record.to_bytes()))


def key_fingerprint(public_key: Ed25519PublicKey | str) -> str:
    """Return the hex SHA-256 of a raw Ed25519 public key (to show and compare pins).

    Parameters
    ----------
    public_key : Ed25519PublicKey or str
        The key, or its base64 raw form.

    Returns
    -------
    str
        64 hex characters.

    Examples
    --------
    >>> key_fingerprint("A" * 43 + "=")[:16]
    '66687aadf862bd77'
    """
    key = decode_public_key(public_key) if isinstance(public_key, str) else public_key
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)


# --- device side --------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePolicy:
    """The weakest released model a device agrees to run.

    Parameters
    ----------
    max_epsilon : float
        Largest accepted epsilon (finite, >= 0).
    max_delta : float
        Largest accepted delta, in [0, 1).
    min_unit : {"record", "patient", "site"}, default "patient"
        Weakest accepted DP unit (``record < patient < site``).
    require_dp : bool, default True
        Refuse models released without a DP guarantee.
    model_formats : tuple of str, default ("onnx",)
        Model formats the device can run.

    Examples
    --------
    >>> p = DevicePolicy(max_epsilon=3.0, max_delta=1e-5)
    >>> p.refusal(DPGuarantee(8.0, 1e-5, "patient"))
    'epsilon 8 is above the device maximum 3'
    >>> p.refusal(DPGuarantee(1.0, 1e-6, "site")) is None
    True
    """

    max_epsilon: float
    max_delta: float
    min_unit: str = "patient"
    require_dp: bool = True
    model_formats: tuple[str, ...] = ("onnx",)

    def __post_init__(self) -> None:
        _finite("max_epsilon", self.max_epsilon, low=0.0)
        if _finite("max_delta", self.max_delta, low=0.0, high=1.0) >= 1.0:
            raise ConfigError(f"max_delta must be < 1, got {self.max_delta!r}")
        if self.min_unit not in UNITS:
            raise ConfigError(f"min_unit must be one of {UNITS}, got {self.min_unit!r}")
        object.__setattr__(self, "model_formats", tuple(self.model_formats))

    def refusal(self, dp: DPGuarantee | None) -> str | None:
        """Return why ``dp`` is refused, or ``None`` when it is acceptable.

        Parameters
        ----------
        dp : DPGuarantee or None
            A record's guarantee.

        Returns
        -------
        str or None
            The reason, or ``None``.
        """
        if dp is None:
            return "the model was released without a DP guarantee" if self.require_dp else None
        if dp.epsilon > self.max_epsilon:
            return f"epsilon {dp.epsilon:g} is above the device maximum {self.max_epsilon:g}"
        if dp.delta > self.max_delta:
            return f"delta {dp.delta:g} is above the device maximum {self.max_delta:g}"
        if UNITS.index(dp.unit) < UNITS.index(self.min_unit):
            return f"{dp.unit}-level DP is weaker than the required {self.min_unit}-level DP"
        return None


class VersionStore:
    """The highest release version a device has accepted, per pinned key, on disk.

    The file is a small JSON object ``{key fingerprint: {"version": int, "model_sha256":
    hex}}`` written atomically (temporary file + ``os.replace``) with mode 0600. Without a
    path the store lives in memory (tests, or a device that keeps it elsewhere).

    Parameters
    ----------
    path : str or Path, optional
        File to keep the state in; created on the first acceptance.

    Examples
    --------
    >>> store = VersionStore()
    >>> store.highest("k") is None
    True
    >>> store.record("k", 2, "ab" * 32)
    >>> store.highest("k")
    (2, 'abababababababababababababababababababababababababababababababab')
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self._path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, Any]] = {}
        if self._path is not None and self._path.exists():
            try:
                state = json.loads(self._path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"version store {self._path} is unreadable: {exc}") from exc
            if not isinstance(state, dict):
                raise ConfigError(f"version store {self._path} is not a JSON object")
            self._state = state

    def highest(self, fingerprint: str) -> tuple[int, str] | None:
        """Return ``(version, model_sha256)`` last accepted under a key, or ``None``."""
        entry = self._state.get(fingerprint)
        if entry is None:
            return None
        return int(entry["version"]), str(entry["model_sha256"])

    def record(self, fingerprint: str, version: int, model_sha256: str) -> None:
        """Remember that ``version`` (with that model) was accepted under a key."""
        with self._lock:
            self._state[fingerprint] = {"version": int(version), "model_sha256": model_sha256}
            if self._path is None:
                return
            write_atomic(self._path, json.dumps(self._state, sort_keys=True).encode())


def _decode_signature(signature: bytes | str | None) -> bytes:
    if signature is None or len(signature) == 0:
        raise ReleaseSignatureError("the release is not signed")
    if isinstance(signature, str):
        try:
            signature = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise ReleaseSignatureError("release signature is not base64") from None
    if len(signature) != 64:
        raise ReleaseSignatureError(f"an Ed25519 signature is 64 bytes, got {len(signature)}")
    return bytes(signature)


def verify_release(
    record: bytes | ReleaseRecord,
    signature: bytes | str | None,
    model_bytes: bytes,
    pinned_key: Ed25519PublicKey | str,
    policy: DevicePolicy,
    versions: VersionStore | None = None,
) -> ReleaseRecord:
    """Check a release end to end and return its record if the device may run the model.

    The checks, in order: a signature is present and verifies under the pinned key over
    the received record bytes; the record parses (canonical encoding); the model bytes hash
    to ``model_sha256``; the model format is one the device runs; the DP guarantee meets
    ``policy``; the version is not older than the highest one accepted under this key (nor
    the same version with a different model). Only then is the version remembered.

    Parameters
    ----------
    record : bytes or ReleaseRecord
        The record bytes as received (or a record, whose canonical bytes are checked).
    signature : bytes, str or None
        The raw 64-byte signature or its base64 form.
    model_bytes : bytes
        The downloaded model file.
    pinned_key : Ed25519PublicKey or str
        The release public key pinned at enrolment (or its base64 raw form).
    policy : DevicePolicy
        The device's policy.
    versions : VersionStore, optional
        The device's memory of accepted versions; without it no replay check is made.

    Returns
    -------
    ReleaseRecord
        The verified record.

    Raises
    ------
    ReleaseSignatureError
        Unsigned, malformed signature, or signed by another key (a re-signed record).
    ReleaseError
        The signed bytes are not a valid canonical record.
    ReleaseIntegrityError
        The model bytes do not match ``model_sha256``.
    ReleasePolicyError
        The DP guarantee is weaker than ``policy`` (or missing), or the format is not run.
    ReleaseReplayError
        An older version than one already accepted, or its version reused for another model.
    """
    if not isinstance(policy, DevicePolicy):
        raise ConfigError(f"policy must be a DevicePolicy, got {type(policy).__name__}")
    data = record.to_bytes() if isinstance(record, ReleaseRecord) else bytes(record)
    sig = _decode_signature(signature)
    try:
        key = decode_public_key(pinned_key) if isinstance(pinned_key, str) else pinned_key
    except SignatureError as exc:
        raise ConfigError(f"pinned release key is invalid: {exc}") from None
    try:
        key.verify(sig, release_message(data))
    except InvalidSignature:
        raise ReleaseSignatureError(
            "release signature does not verify under the pinned release key "
            f"{key_fingerprint(key)[:16]}"
        ) from None
    parsed = ReleaseRecord.from_bytes(data)
    digest = sha256_hex(bytes(model_bytes))
    if digest != parsed.model_sha256:
        raise ReleaseIntegrityError(
            f"model SHA-256 {digest} is not the released {parsed.model_sha256}"
        )
    if parsed.model_format not in policy.model_formats:
        raise ReleasePolicyError(
            f"model format {parsed.model_format!r} is not one the device runs "
            f"({list(policy.model_formats)})"
        )
    reason = policy.refusal(parsed.dp)
    if reason is not None:
        raise ReleasePolicyError(f"release {parsed.version} refused by the device policy: {reason}")
    if versions is not None:
        fingerprint = key_fingerprint(key)
        seen = versions.highest(fingerprint)
        if seen is not None:
            version, sha = seen
            if parsed.version < version:
                raise ReleaseReplayError(
                    f"release version {parsed.version} is older than the accepted version {version}"
                )
            if parsed.version == version and parsed.model_sha256 != sha:
                raise ReleaseReplayError(
                    f"release version {version} was already accepted for another model"
                )
        versions.record(fingerprint, parsed.version, parsed.model_sha256)
    return parsed
