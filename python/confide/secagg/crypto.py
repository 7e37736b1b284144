"""Cryptographic building blocks of SecAgg+ (all from ``cryptography``).

* **Key pairs.** Two X25519 key pairs per client per round, each derived from a fresh
  32-byte seed (the seed *is* the X25519 private key; clamping happens inside), so the mask
  key can be Shamir-shared as a 32-byte secret and rebuilt from its shares.
* **Key agreement.** ``HKDF-SHA256(salt = "confide/secaggplus/v1", ikm = X25519(a, B),
  info = label || session || round || id_lo || id_hi)`` -> 32 bytes, with the two ids in
  sorted order so both ends derive the same value. Label ``"mask"`` gives the pairwise mask
  seed, ``"share"`` the AEAD key for share encryption. An all-zero (low-order) DH output is
  rejected.
* **Share encryption.** ChaCha20-Poly1305, random 96-bit nonce, associated data
  ``session || round || sender || receiver``: a ciphertext cannot be replayed into another
  session, round or direction.
* **Signatures.** Ed25519 identity keys sign the advertised keys (bound to the round
  configuration digest) and, in the consistency check, the survivor roster.
* **Self-mask commitment.** The advertisement carries ``SHA-256(tag || round || id ||
  seed)`` of the self-mask seed, so the server can tell a correctly rebuilt seed from one
  poisoned by a bad share (the seed has 256 bits of entropy, so the hash hides it).

Every variable-length field in a hashed or signed string is length-prefixed (big-endian
u32), so distinct field tuples never encode to the same bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from confide.errors import ProtocolViolationError
from confide.sigcache import verify_ed25519

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "SIGNATURE_BYTES",
    "advert_payload",
    "agree",
    "decrypt_share",
    "ed25519_public",
    "encrypt_share",
    "lp",
    "pack_share_bundle",
    "roster_payload",
    "self_commitment",
    "session_id",
    "sign",
    "task_binding",
    "unpack_share_bundle",
    "verify",
    "x25519_public",
]

KEY_BYTES = 32
NONCE_BYTES = 12
SIGNATURE_BYTES = 64
_SALT = b"confide/secaggplus/v1"


def lp(data: bytes | str) -> bytes:
    """Length-prefix ``data`` (UTF-8 for str) with a big-endian u32.

    Examples
    --------
    >>> lp("ab").hex()
    '000000026162'
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return struct.pack(">I", len(raw)) + raw


def x25519_public(seed: bytes) -> bytes:
    """Return the raw X25519 public key of the private key ``seed`` (32 bytes).

    Examples
    --------
    >>> len(x25519_public(bytes(range(32))))
    32
    """
    private = X25519PrivateKey.from_private_bytes(bytes(seed))
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_public(key: Ed25519PrivateKey) -> bytes:
    """Return the raw 32-byte public key of an Ed25519 identity key."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(
    own_seed: bytes | X25519PrivateKey,
    peer_public: bytes,
    *,
    label: str,
    session: bytes,
    round: int,
    a: str,
    b: str,
) -> bytes:
    """Derive a 32-byte secret shared by clients ``a`` and ``b`` (see the module docstring).

    Parameters
    ----------
    own_seed : bytes or X25519PrivateKey
        This side's 32-byte X25519 private key (or the key object, built once per round by
        a caller that agrees with many peers).
    peer_public : bytes
        The other side's 32-byte X25519 public key.
    label : str
        ``"mask"`` or ``"share"``.
    session : bytes
        Session id.
    round : int
        Round number.
    a, b : str
        The two client ids, in any order.

    Returns
    -------
    bytes
        32 bytes.

    Raises
    ------
    ProtocolViolationError
        The peer key is malformed or of low order.

    Examples
    --------
    >>> s1, s2 = bytes([1] * 32), bytes([2] * 32)
    >>> k12 = agree(s1, x25519_public(s2), label="mask", session=b"s", round=1, a="x", b="y")
    >>> k12 == agree(s2, x25519_public(s1), label="mask", session=b"s", round=1, a="y", b="x")
    True
    """
    try:
        own = (
            own_seed
            if isinstance(own_seed, X25519PrivateKey)
            else X25519PrivateKey.from_private_bytes(bytes(own_seed))
        )
        shared = own.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError:
        raise ProtocolViolationError(
            f"key agreement between {a!r} and {b!r} failed (invalid or low-order key)"
        ) from None
    lo, hi = sorted((a, b))
    info = lp(label) + lp(session) + struct.pack(">Q", round) + lp(lo) + lp(hi)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(shared)


def _ad(session: bytes, round: int, sender: str, receiver: str) -> bytes:
    return lp(session) + struct.pack(">Q", round) + lp(sender) + lp(receiver)


def encrypt_share(
    key: bytes,
    nonce: bytes,
    plaintext: bytes,
    *,
    session: bytes,
    round: int,
    sender: str,
    receiver: str,
) -> bytes:
    """Encrypt a share bundle from ``sender`` to ``receiver`` (ChaCha20-Poly1305).

    Examples
    --------
    >>> c = encrypt_share(bytes(32), bytes(12), b"hi", session=b"s", round=1, sender="a",
    ...                   receiver="b")
    >>> decrypt_share(bytes(32), bytes(12), c, session=b"s", round=1, sender="a",
    ...               receiver="b")
    b'hi'
    """
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, _ad(session, round, sender, receiver))


def decrypt_share(
    key: bytes,
    nonce: bytes,
    ciphertext: bytes,
    *,
    session: bytes,
    round: int,
    sender: str,
    receiver: str,
) -> bytes:
    """Decrypt and authenticate a share bundle.

    Raises
    ------
    ProtocolViolationError
        Authentication failed (wrong key, session, round, sender or receiver, or tampering).
    """
    try:
        return ChaCha20Poly1305(key).decrypt(
            nonce, ciphertext, _ad(session, round, sender, receiver)
        )
    except InvalidTag:
        raise ProtocolViolationError(
            f"encrypted shares from {sender!r} to {receiver!r} failed authentication"
        ) from None


def advert_payload(
    config_digest: bytes,
    round: int,
    client_id: str,
    enc_pk: bytes,
    mask_pk: bytes,
    self_commit: bytes,
) -> bytes:
    """Return the bytes a client signs to advertise its keys."""
    return (
        lp("confide/secaggplus/advertise/v1")
        + lp(config_digest)
        + struct.pack(">Q", round)
        + lp(client_id)
        + lp(enc_pk)
        + lp(mask_pk)
        + lp(self_commit)
    )


def task_binding(config_digest: bytes, task_sha256: bytes) -> bytes:
    """Return the digest an advertisement signs: the round setup's and the task's hashes.

    ``task_sha256`` is the hash of the whole task as the signing site received it (model,
    training config, privacy and SecAgg+ parameters, cohort, round); binding it into the
    signature makes peers that were given different tasks reject each other's keys.
    """
    data = lp("confide/secaggplus/task-binding/v1") + lp(config_digest) + lp(task_sha256)
    return hashlib.sha256(data).digest()


def roster_payload(session: bytes, round: int, ids: Iterable[str]) -> bytes:
    """Return the bytes a client signs in the consistency check (ids sorted)."""
    body = b"".join(lp(i) for i in sorted(ids))
    return lp("confide/secaggplus/roster/v1") + lp(session) + struct.pack(">Q", round) + body


def self_commitment(seed: bytes, round: int, client_id: str) -> bytes:
    """Return the SHA-256 commitment to a self-mask seed (32 bytes)."""
    data = lp("confide/secaggplus/self-commit/v1") + struct.pack(">Q", round) + lp(client_id)
    return hashlib.sha256(data + lp(seed)).digest()


def sign(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """Sign ``payload`` with an Ed25519 identity key (64-byte signature)."""
    return key.sign(payload)


def verify(public_key: bytes, signature: bytes, payload: bytes) -> bool:
    """Return whether ``signature`` is a valid Ed25519 signature of ``payload``.

    Examples
    --------
    >>> k = Ed25519PrivateKey.from_private_bytes(bytes(32))
    >>> verify(ed25519_public(k), sign(k, b"m"), b"m"), verify(ed25519_public(k), bytes(64), b"m")
    (True, False)
    """
    # Remembered per process for the exact bytes (confide.sigcache): the same answer, once.
    return verify_ed25519(public_key, signature, payload)


def pack_share_bundle(sender: str, receiver: str, self_share: bytes, key_share: bytes) -> bytes:
    """Encode the plaintext of an encrypted share: both ids and both shares."""
    return lp(sender) + lp(receiver) + lp(self_share) + lp(key_share)


def unpack_share_bundle(data: bytes) -> tuple[str, str, bytes, bytes]:
    """Decode :func:`pack_share_bundle`'s output.

    Raises
    ------
    ProtocolViolationError
        Malformed bundle.
    """
    parts: list[bytes] = []
    pos = 0
    try:
        for _ in range(4):
            (size,) = struct.unpack_from(">I", data, pos)
            pos += 4
            if pos + size > len(data):
                raise ValueError
            parts.append(bytes(data[pos : pos + size]))
            pos += size
        if pos != len(data):
            raise ValueError
        return parts[0].decode(), parts[1].decode(), parts[2], parts[3]
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ProtocolViolationError("malformed share bundle") from None


def session_id(config_digest: bytes, round: int, adverts: Iterable[tuple[str, bytes]]) -> bytes:
    """Hash the round and every advertised key into the 32-byte session id.

    Parameters
    ----------
    config_digest : bytes
        :meth:`RoundSetup.digest` of the round.
    round : int
        Round number.
    adverts : iterable of (str, bytes)
        ``(client_id, signed advertisement payload || signature)`` for every accepted
        advertisement, in any order (sorted here).

    Returns
    -------
    bytes
        SHA-256 digest.
    """
    h = hashlib.sha256(lp("confide/secaggplus/session/v1") + lp(config_digest))
    h.update(struct.pack(">Q", round))
    for cid, blob in sorted(adverts):
        h.update(lp(cid) + lp(blob))
    return h.digest()
