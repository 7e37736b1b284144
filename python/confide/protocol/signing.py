"""Ed25519 client identities and request signing, shared by the client and the server.

Every request after enrolment carries these headers::

    X-Confide-Client      client id
    X-Confide-Round       round number the request is about ("0" when none)
    X-Confide-Stage       stage name ("task", "train", "evaluate", ...)
    X-Confide-Content-SHA256  hex SHA-256 of the body (of b"" for GET)
    X-Confide-Nonce       32 hex characters from the OS random source, never reused
    X-Confide-Timestamp   milliseconds since the Unix epoch
    X-Confide-Signature   base64 Ed25519 signature of :func:`signing_payload`

The signed payload binds all of them together with the HTTP method and path, so a signature
cannot be moved to another request, round, stage, body or endpoint. The server rejects a stale
timestamp or a bad signature (401) and a nonce it has already seen (409).
"""

from __future__ import annotations

import base64
import binascii
import secrets
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from confide._fsio import write_atomic
from confide.errors import ConfigError, SignatureError
from confide.protocol.manifest import sha256_hex

__all__ = [
    "HEADER_CLIENT",
    "HEADER_CONTENT_SHA256",
    "HEADER_NONCE",
    "HEADER_ROUND",
    "HEADER_SIGNATURE",
    "HEADER_STAGE",
    "HEADER_TIMESTAMP",
    "Identity",
    "SignedRequest",
    "decode_public_key",
    "signing_payload",
    "verify_request",
]

HEADER_CLIENT = "X-Confide-Client"
HEADER_ROUND = "X-Confide-Round"
HEADER_STAGE = "X-Confide-Stage"
HEADER_CONTENT_SHA256 = "X-Confide-Content-SHA256"
HEADER_NONCE = "X-Confide-Nonce"
HEADER_TIMESTAMP = "X-Confide-Timestamp"
HEADER_SIGNATURE = "X-Confide-Signature"

_DOMAIN = "confide-request/1"


def signing_payload(
    method: str,
    path: str,
    client_id: str,
    round_id: int,
    stage: str,
    body_sha256: str,
    nonce: str,
    timestamp_ms: int,
) -> bytes:
    r"""Return the exact bytes that are signed for a request.

    Parameters
    ----------
    method : str
        HTTP method (upper-cased here).
    path : str
        Request path without the query string.
    client_id : str
        The enrolled client's id.
    round_id : int
        Round the request is about.
    stage : str
        Stage the request is about.
    body_sha256 : str
        Hex SHA-256 of the body.
    nonce : str
        Single-use random hex string.
    timestamp_ms : int
        Milliseconds since the epoch.

    Returns
    -------
    bytes
        Newline-joined, domain-separated fields.

    Examples
    --------
    >>> signing_payload("get", "/v1/task", "c1", 0, "task", "ab", "00", 1).split(b"\n")[:3]
    [b'confide-request/1', b'GET', b'/v1/task']
    """
    for name, value in (("client_id", client_id), ("stage", stage), ("path", path)):
        if "\n" in value:
            raise SignatureError(f"{name} must not contain a newline")
    fields = [
        _DOMAIN,
        method.upper(),
        path,
        client_id,
        str(int(round_id)),
        stage,
        body_sha256,
        nonce,
        str(int(timestamp_ms)),
    ]
    return "\n".join(fields).encode()


def decode_public_key(value: str) -> Ed25519PublicKey:
    """Decode a base64 raw 32-byte Ed25519 public key.

    Parameters
    ----------
    value : str
        Standard base64 of the 32 raw key bytes.

    Returns
    -------
    Ed25519PublicKey
        The key.

    Raises
    ------
    SignatureError
        Not base64 or not 32 bytes.
    """
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"public key is not base64: {exc}", "bad_public_key") from exc
    if len(raw) != 32:
        raise SignatureError(f"public key must be 32 bytes, got {len(raw)}", "bad_public_key")
    return Ed25519PublicKey.from_public_bytes(raw)


class Identity:
    """A client's Ed25519 identity key.

    Parameters
    ----------
    private_key : Ed25519PrivateKey
        The key; use :meth:`generate` or :meth:`load` to get one.

    Examples
    --------
    >>> ident = Identity.generate()
    >>> headers = ident.sign_request("c1", "POST", "/v1/rounds/1/train", 1, "train", b"x")
    >>> req = SignedRequest.from_headers(headers)
    >>> verify_request(decode_public_key(ident.public_key_b64), req, "POST", "/v1/rounds/1/train",
    ...                sha256_hex(b"x"), now_ms=req.timestamp_ms, max_skew_ms=1000)
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The Ed25519 private key (SecAgg+ signs its advertisements with it)."""
        return self._key

    @classmethod
    def generate(cls) -> Identity:
        """Create a fresh key from the operating system's random source.

        Returns
        -------
        Identity
            New identity.
        """
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Load a key written by :meth:`save`, refusing files others can read.

        Parameters
        ----------
        path : str or Path
            PEM file (PKCS#8, unencrypted) with mode 0600.

        Returns
        -------
        Identity
            The identity.

        Raises
        ------
        ConfigError
            The file is readable by group or others, or is not an Ed25519 key.
        """
        p = Path(path)
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"identity key {p} has mode {mode:o}; it must be 0600")
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{p} does not hold an Ed25519 private key")
        return cls(key)

    def save(self, path: str | Path) -> None:
        """Write the key as PEM with file mode 0600 (created that way, never wider).

        Parameters
        ----------
        path : str or Path
            Destination; overwritten if it exists.
        """
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(Path(path), pem)

    @property
    def public_key_b64(self) -> str:
        """Base64 of the raw 32-byte public key."""
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()

    def sign(self, message: bytes) -> bytes:
        """Sign ``message``.

        Parameters
        ----------
        message : bytes
            Bytes to sign.

        Returns
        -------
        bytes
            64-byte Ed25519 signature.
        """
        return self._key.sign(message)

    def sign_request(
        self,
        client_id: str,
        method: str,
        path: str,
        round_id: int,
        stage: str,
        body: bytes,
        *,
        timestamp_ms: int | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        """Return the signature headers for one request.

        Parameters
        ----------
        client_id : str
            This client's id.
        method, path : str
            HTTP method and path (no query string).
        round_id : int
            Round the request is about.
        stage : str
            Stage the request is about.
        body : bytes
            Exact body bytes that will be sent.
        timestamp_ms : int, optional
            Defaults to now.
        nonce : str, optional
            Defaults to 16 fresh random bytes in hex.

        Returns
        -------
        dict of str to str
            Headers to add to the request.
        """
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        nonce = secrets.token_hex(16) if nonce is None else nonce
        digest = sha256_hex(body)
        payload = signing_payload(method, path, client_id, round_id, stage, digest, nonce, ts)
        return {
            HEADER_CLIENT: client_id,
            HEADER_ROUND: str(int(round_id)),
            HEADER_STAGE: stage,
            HEADER_CONTENT_SHA256: digest,
            HEADER_NONCE: nonce,
            HEADER_TIMESTAMP: str(ts),
            HEADER_SIGNATURE: base64.b64encode(self.sign(payload)).decode(),
        }


@dataclass(frozen=True)
class SignedRequest:
    """The signature headers of one request, parsed and type-checked.

    Parameters
    ----------
    client_id : str
        Claimed client id.
    round_id : int
        Claimed round.
    stage : str
        Claimed stage.
    body_sha256 : str
        Claimed body hash.
    nonce : str
        Nonce.
    timestamp_ms : int
        Timestamp.
    signature : bytes
        Raw signature.
    """

    client_id: str
    round_id: int
    stage: str
    body_sha256: str
    nonce: str
    timestamp_ms: int
    signature: bytes

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> SignedRequest:
        """Parse the signature headers.

        Parameters
        ----------
        headers : mapping
            Request headers (case-insensitive mapping, or exact header names).

        Returns
        -------
        SignedRequest
            Parsed fields.

        Raises
        ------
        SignatureError
            A header is missing or malformed.
        """
        names = (
            HEADER_CLIENT,
            HEADER_ROUND,
            HEADER_STAGE,
            HEADER_CONTENT_SHA256,
            HEADER_NONCE,
            HEADER_TIMESTAMP,
            HEADER_SIGNATURE,
        )
        values: dict[str, str] = {}
        for name in names:
            value = headers.get(name)
            if value is None or not value or len(value) > 256:
                raise SignatureError(f"missing or oversized header {name}", "unauthenticated")
            values[name] = value
        try:
            round_id = int(values[HEADER_ROUND])
            timestamp_ms = int(values[HEADER_TIMESTAMP])
            signature = base64.b64decode(values[HEADER_SIGNATURE], validate=True)
        except (ValueError, binascii.Error) as exc:
            raise SignatureError(f"malformed signature headers: {exc}", "unauthenticated") from exc
        nonce = values[HEADER_NONCE]
        if not 16 <= len(nonce) <= 128 or not all(c in "0123456789abcdef" for c in nonce):
            raise SignatureError(
                "nonce must be 16 to 128 lowercase hex characters", "unauthenticated"
            )
        return cls(
            client_id=values[HEADER_CLIENT],
            round_id=round_id,
            stage=values[HEADER_STAGE],
            body_sha256=values[HEADER_CONTENT_SHA256].lower(),
            nonce=nonce,
            timestamp_ms=timestamp_ms,
            signature=signature,
        )


def verify_request(
    public_key: Ed25519PublicKey,
    request: SignedRequest,
    method: str,
    path: str,
    body_sha256: str,
    *,
    now_ms: int,
    max_skew_ms: int,
) -> None:
    """Check a request's signature, timestamp and body hash.

    Nonce reuse is the caller's job (it needs state); this function is pure.

    Parameters
    ----------
    public_key : Ed25519PublicKey
        The enrolled key of ``request.client_id``.
    request : SignedRequest
        Parsed headers.
    method, path : str
        What the server actually received.
    body_sha256 : str
        Hex SHA-256 of the body the server actually received.
    now_ms : int
        Server time in milliseconds.
    max_skew_ms : int
        Largest accepted ``|now - timestamp|``.

    Raises
    ------
    SignatureError
        Stale timestamp (code ``stale_request``), body hash mismatch or bad signature.
    """
    if abs(now_ms - request.timestamp_ms) > max_skew_ms:
        raise SignatureError(
            f"timestamp {request.timestamp_ms} is more than {max_skew_ms} ms from server time",
            "stale_request",
        )
    if request.body_sha256 != body_sha256:
        raise SignatureError("body does not match X-Confide-Content-SHA256")
    payload = signing_payload(
        method,
        path,
        request.client_id,
        request.round_id,
        request.stage,
        request.body_sha256,
        request.nonce,
        request.timestamp_ms,
    )
    try:
        public_key.verify(request.signature, payload)
    except InvalidSignature as exc:
        raise SignatureError("signature does not verify for this client") from exc
