"""SecAgg+ messages: frozen dataclasses with strict JSON encoding.

Every message encodes to a JSON-ready dict ``{"type": <class name>, <field>: ...}`` with
bytes as standard base64, tuples as lists and maps as objects keyed by client id.
:meth:`from_json` (and :func:`decode`) accept exactly the fields of the class, with the
exact types and byte lengths, and raise :class:`MessageFormatError` for anything else;
constructing a message in Python runs the same checks.

Client ids are 1 to 64 characters from ``[A-Za-z0-9._:@-]``. The protocol flow is

===========================  =================  ==========================================
message                      direction          stage
===========================  =================  ==========================================
:class:`RoundSetup`          server -> clients  announce (public parameters, cohort)
:class:`Advertisement`       client -> server   advertise keys
:class:`KeyBroadcast`        server -> clients  share keys (all advertisements)
:class:`ShareUpload`         client -> server   share keys (encrypted shares)
:class:`ShareDelivery`       server -> client   masked input (shares for this client)
:class:`MaskedInput`         client -> server   masked input (bit-packed vector)
:class:`ConsistencyRequest`  server -> clients  consistency check (optional)
:class:`ConsistencySignature` client -> server  consistency check
:class:`UnmaskRequest`       server -> clients  unmask
:class:`UnmaskResponse`      client -> server   unmask
===========================  =================  ==========================================
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

from confide.errors import InfeasibleConfigError, MessageFormatError
from confide.secagg.crypto import KEY_BYTES, NONCE_BYTES, SIGNATURE_BYTES
from confide.secagg.params import SecAggParams

__all__ = [
    "Advertisement",
    "ConsistencyRequest",
    "ConsistencySignature",
    "EncryptedShare",
    "KeyBroadcast",
    "MaskedInput",
    "Message",
    "RoundSetup",
    "ShareDelivery",
    "ShareUpload",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_client_id",
    "decode",
]

_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
#: RoundSetup.digest's memo (public values only: the setup and its hash).
_DIGESTS: dict[RoundSetup, bytes] = {}
_DIGESTS_MAX = 4
_DIGESTS_LOCK = threading.Lock()
_MAX_SHARE_CIPHERTEXT = 4096
_MAX_SHARE = 1024
_MAX_DATA = 1 << 34

M = TypeVar("M", bound="Message")


def check_client_id(value: object) -> str:
    """Return ``value`` if it is a valid client id, else raise :class:`MessageFormatError`.

    Examples
    --------
    >>> check_client_id("site-01")
    'site-01'
    """
    if not (isinstance(value, str) and _ID.fullmatch(value)):
        raise MessageFormatError(f"invalid client id {str(value)[:80]!r}")
    return value


class _Codec:
    """Check, encode and decode one field."""

    def check(self, name: str, value: Any) -> None:
        raise NotImplementedError

    def encode(self, value: Any) -> Any:
        return value

    def decode(self, name: str, raw: Any) -> Any:
        self.check(name, raw)
        return raw


class _Int(_Codec):
    def check(self, name: str, value: Any) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64):
            raise MessageFormatError(f"{name} must be an int in [0, 2**64), got {value!r:.40}")


class _Bool(_Codec):
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise MessageFormatError(f"{name} must be a bool, got {type(value).__name__}")


class _Id(_Codec):
    def check(self, name: str, value: Any) -> None:
        check_client_id(value)


class _Bytes(_Codec):
    def __init__(self, exact: int | None = None, maximum: int = _MAX_SHARE_CIPHERTEXT) -> None:
        self.exact, self.maximum = exact, maximum

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, bytes):
            raise MessageFormatError(f"{name} must be bytes, got {type(value).__name__}")
        if self.exact is not None and len(value) != self.exact:
            raise MessageFormatError(f"{name} must be {self.exact} bytes, got {len(value)}")
        if len(value) > self.maximum:
            raise MessageFormatError(f"{name} exceeds {self.maximum} bytes")

    def encode(self, value: Any) -> Any:
        return base64.b64encode(value).decode("ascii")

    def decode(self, name: str, raw: Any) -> Any:
        if not isinstance(raw, str):
            raise MessageFormatError(f"{name} must be a base64 string, got {type(raw).__name__}")
        try:
            value = base64.b64decode(raw.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise MessageFormatError(f"{name} is not valid base64") from None
        self.check(name, value)
        return value


class _Tuple(_Codec):
    def __init__(self, item: _Codec, *, unique: bool = False) -> None:
        self.item, self.unique = item, unique

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, tuple):
            raise MessageFormatError(f"{name} must be a tuple, got {type(value).__name__}")
        for v in value:
            self.item.check(name + "[]", v)
        if self.unique and len(set(value)) != len(value):
            raise MessageFormatError(f"{name} contains repeated entries")

    def encode(self, value: Any) -> Any:
        return [self.item.encode(v) for v in value]

    def decode(self, name: str, raw: Any) -> Any:
        if not isinstance(raw, list):
            raise MessageFormatError(f"{name} must be a list, got {type(raw).__name__}")
        value = tuple(self.item.decode(name + "[]", v) for v in raw)
        self.check(name, value)
        return value


class _Map(_Codec):
    """A map from client id to a value, stored as a sorted tuple of pairs (hashable)."""

    def __init__(self, item: _Codec) -> None:
        self.item = item

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, tuple):
            raise MessageFormatError(f"{name} must be a tuple of (id, value) pairs")
        keys = []
        for pair in value:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise MessageFormatError(f"{name} must be a tuple of (id, value) pairs")
            keys.append(check_client_id(pair[0]))
            self.item.check(f"{name}[{pair[0]}]", pair[1])
        if keys != sorted(set(keys)):
            raise MessageFormatError(f"{name} keys must be sorted and distinct")

    def encode(self, value: Any) -> Any:
        return {k: self.item.encode(v) for k, v in value}

    def decode(self, name: str, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise MessageFormatError(f"{name} must be an object, got {type(raw).__name__}")
        value = tuple(sorted((k, self.item.decode(f"{name}[{k}]", v)) for k, v in raw.items()))
        self.check(name, value)
        return value


class _Nested(_Codec):
    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, self.cls):
            raise MessageFormatError(f"{name} must be a {self.cls.__name__}")

    def encode(self, value: Any) -> Any:
        return value.to_json()

    def decode(self, name: str, raw: Any) -> Any:
        return self.cls.from_json(raw)


class _Params(_Codec):
    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, SecAggParams):
            raise MessageFormatError(f"{name} must be SecAggParams")

    def encode(self, value: Any) -> Any:
        return value.to_dict()

    def decode(self, name: str, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise MessageFormatError(f"{name} must be an object")
        try:
            return SecAggParams.from_dict(raw)
        except (InfeasibleConfigError, TypeError) as exc:
            raise MessageFormatError(f"{name}: {exc}") from None


_REGISTRY: dict[str, type[Message]] = {}


def _register(cls: type[M]) -> type[M]:
    _REGISTRY[cls.__name__] = cls
    return cls


@dataclass(frozen=True)
class Message:
    """Base class: strict JSON encoding driven by the subclass's ``_SPEC``."""

    _SPEC: ClassVar[dict[str, _Codec]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            self._SPEC[f.name].check(f.name, getattr(self, f.name))
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks of the subclass."""

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict with a ``"type"`` tag."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            out[f.name] = self._SPEC[f.name].encode(getattr(self, f.name))
        return out

    @classmethod
    def from_json(cls: type[M], data: Mapping[str, Any]) -> M:
        """Decode and validate the output of :meth:`to_json`.

        Raises
        ------
        MessageFormatError
            Wrong type tag, missing or extra fields, wrong types or lengths.
        """
        if not isinstance(data, Mapping):
            raise MessageFormatError(f"{cls.__name__} must be a JSON object")
        if data.get("type") != cls.__name__:
            raise MessageFormatError(
                f"expected type {cls.__name__!r}, got {data.get('type')!r:.40}"
            )
        names = [f.name for f in fields(cls)]
        extra = set(data) - set(names) - {"type"}
        missing = set(names) - set(data)
        if extra or missing:
            raise MessageFormatError(
                f"{cls.__name__}: missing fields {sorted(missing)}, unexpected {sorted(extra)[:5]}"
            )
        # Each codec's decode checks the value it returns (the field checks of
        # __post_init__); building the object through __init__ would run them all again
        # (for a key broadcast: every advertisement's fields twice more). So the fields are
        # set as the frozen dataclass's __init__ sets them, and the cross-field checks run.
        obj = cls.__new__(cls)
        for n in names:
            object.__setattr__(obj, n, cls._SPEC[n].decode(n, data[n]))
        obj._validate()
        return obj


def decode(data: Mapping[str, Any]) -> Message:
    """Decode any SecAgg+ message by its ``"type"`` tag.

    Raises
    ------
    MessageFormatError
        Unknown type or invalid content.

    Examples
    --------
    >>> m = ConsistencyRequest(round=1, session_id=bytes(32), survivors=("a", "b"))
    >>> decode(m.to_json()) == m
    True
    """
    if not isinstance(data, Mapping) or data.get("type") not in _REGISTRY:
        raise MessageFormatError("not a SecAgg+ message")
    return _REGISTRY[data["type"]].from_json(data)


_ROUND = _Int()
_SESSION = _Bytes(exact=32)
_IDS = _Tuple(_Id(), unique=True)


@_register
@dataclass(frozen=True)
class RoundSetup(Message):
    """Public description of a SecAgg+ round, announced before it starts.

    Parameters
    ----------
    round : int
        Round number.
    cohort : tuple of str
        Selected client ids, sorted; ``len(cohort) == params.n``.
    identity_keys : tuple of (str, bytes)
        Each cohort member's raw Ed25519 identity public key, sorted by id.
    params : SecAggParams
        k, t, quantization and modulus.
    vector_length : int
        Length of the (flat float32) update vector.
    model_sha256 : bytes
        SHA-256 of the model clients must train.
    consistency_check : bool
        Whether the optional consistency-check stage runs.
    """

    round: int
    cohort: tuple[str, ...]
    identity_keys: tuple[tuple[str, bytes], ...]
    params: SecAggParams
    vector_length: int
    model_sha256: bytes
    consistency_check: bool

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "cohort": _IDS,
        "identity_keys": _Map(_Bytes(exact=KEY_BYTES)),
        "params": _Params(),
        "vector_length": _Int(),
        "model_sha256": _Bytes(exact=32),
        "consistency_check": _Bool(),
    }

    def _validate(self) -> None:
        if list(self.cohort) != sorted(self.cohort):
            raise MessageFormatError("cohort must be sorted")
        if len(self.cohort) != self.params.n:
            raise MessageFormatError(
                f"cohort has {len(self.cohort)} clients but params.n = {self.params.n}"
            )
        if tuple(k for k, _ in self.identity_keys) != self.cohort:
            raise MessageFormatError("identity_keys must have exactly one key per cohort member")
        if not 1 <= self.vector_length < 2**40:
            raise MessageFormatError(f"vector_length must be >= 1, got {self.vector_length}")

    def digest(self) -> bytes:
        """Return SHA-256 of the canonical JSON encoding (what advertisements sign).

        Remembered per process for the last few setups (frozen, compared field by field):
        every virtual site of a Ray actor hashes the same cohort's setup, twice.
        """
        with _DIGESTS_LOCK:
            known = _DIGESTS.get(self)
        if known is not None:
            return known
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        out = hashlib.sha256(text.encode()).digest()
        with _DIGESTS_LOCK:
            _DIGESTS[self] = out
            while len(_DIGESTS) > _DIGESTS_MAX:
                del _DIGESTS[next(iter(_DIGESTS))]
        return out

    def identity_key(self, client_id: str) -> bytes:
        """Return the identity key of a cohort member."""
        return dict(self.identity_keys)[client_id]


@_register
@dataclass(frozen=True)
class Advertisement(Message):
    """A client's two public keys and self-mask commitment, signed with its identity key.

    ``task_sha256`` is the hash of the whole task as this client received it (see
    :meth:`confide.protocol.tasks.SecureTask.task_sha256`). It travels in clear so that a
    peer given another task can name the mismatch, and it is bound into the signature
    (:func:`confide.secagg.crypto.task_binding`), so it cannot be edited in transit.
    """

    round: int
    client_id: str
    enc_pk: bytes
    mask_pk: bytes
    self_commit: bytes
    task_sha256: bytes
    signature: bytes

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "client_id": _Id(),
        "enc_pk": _Bytes(exact=KEY_BYTES),
        "mask_pk": _Bytes(exact=KEY_BYTES),
        "self_commit": _Bytes(exact=32),
        "task_sha256": _Bytes(exact=32),
        "signature": _Bytes(exact=SIGNATURE_BYTES),
    }


@_register
@dataclass(frozen=True)
class KeyBroadcast(Message):
    """Every accepted advertisement, sorted by client id, and the session id they define."""

    round: int
    session_id: bytes
    advertisements: tuple[Advertisement, ...]

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "session_id": _SESSION,
        "advertisements": _Tuple(_Nested(Advertisement)),
    }


@_register
@dataclass(frozen=True)
class EncryptedShare(Message):
    """One client's two shares for one recipient, AEAD-encrypted to it."""

    sender: str
    receiver: str
    nonce: bytes
    ciphertext: bytes

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "sender": _Id(),
        "receiver": _Id(),
        "nonce": _Bytes(exact=NONCE_BYTES),
        "ciphertext": _Bytes(maximum=_MAX_SHARE_CIPHERTEXT),
    }


@_register
@dataclass(frozen=True)
class ShareUpload(Message):
    """A client's encrypted shares, one per neighbour."""

    round: int
    client_id: str
    session_id: bytes
    shares: tuple[EncryptedShare, ...]

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "client_id": _Id(),
        "session_id": _SESSION,
        "shares": _Tuple(_Nested(EncryptedShare)),
    }


@_register
@dataclass(frozen=True)
class ShareDelivery(Message):
    """Shares addressed to one client, and the roster of clients whose shares were accepted."""

    round: int
    session_id: bytes
    holders: tuple[str, ...]
    shares: tuple[EncryptedShare, ...]

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "session_id": _SESSION,
        "holders": _IDS,
        "shares": _Tuple(_Nested(EncryptedShare)),
    }


@_register
@dataclass(frozen=True)
class MaskedInput(Message):
    """A client's masked, bit-packed vector (update elements then the weight)."""

    round: int
    client_id: str
    session_id: bytes
    data: bytes

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "client_id": _Id(),
        "session_id": _SESSION,
        "data": _Bytes(maximum=_MAX_DATA),
    }


@_register
@dataclass(frozen=True)
class ConsistencyRequest(Message):
    """The roster of clients whose masked inputs the server holds, to be signed."""

    round: int
    session_id: bytes
    survivors: tuple[str, ...]

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "session_id": _SESSION,
        "survivors": _IDS,
    }


@_register
@dataclass(frozen=True)
class ConsistencySignature(Message):
    """A client's Ed25519 signature over the survivor roster."""

    round: int
    client_id: str
    session_id: bytes
    signature: bytes

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "client_id": _Id(),
        "session_id": _SESSION,
        "signature": _Bytes(exact=SIGNATURE_BYTES),
    }


@_register
@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Who sent a masked input (alive) and who dropped after sharing keys (dead).

    ``signatures`` holds the consistency-check signatures over ``alive`` (empty when the
    round has no consistency check).
    """

    round: int
    session_id: bytes
    alive: tuple[str, ...]
    dead: tuple[str, ...]
    signatures: tuple[tuple[str, bytes], ...]

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "session_id": _SESSION,
        "alive": _IDS,
        "dead": _IDS,
        "signatures": _Map(_Bytes(exact=SIGNATURE_BYTES)),
    }


@_register
@dataclass(frozen=True)
class UnmaskResponse(Message):
    """Shares a client releases: self-mask shares of alive owners, key shares of dead ones."""

    round: int
    client_id: str
    session_id: bytes
    self_shares: tuple[tuple[str, bytes], ...]
    key_shares: tuple[tuple[str, bytes], ...]

    _SPEC: ClassVar[dict[str, _Codec]] = {
        "round": _ROUND,
        "client_id": _Id(),
        "session_id": _SESSION,
        "self_shares": _Map(_Bytes(maximum=_MAX_SHARE)),
        "key_shares": _Map(_Bytes(maximum=_MAX_SHARE)),
    }

    def _validate(self) -> None:
        if {k for k, _ in self.self_shares} & {k for k, _ in self.key_shares}:
            raise MessageFormatError("a response may not hold both kinds of share of one owner")
