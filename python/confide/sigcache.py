"""Ed25519 verification, remembered per process for the exact bytes already verified.

Verifying a signature is a pure function of ``(public key, signature, message)``: the same
three byte strings always give the same answer. A process that verifies the same signature
many times (the Ray simulation runs hundreds of virtual sites in one actor, and each of them
checks every cohort member's advertisement and certificate: O(cohort**2) verifications per
round in one process) asks OpenSSL once and remembers the *valid* triples; a triple that
differs in any byte is verified again, and an invalid signature is never remembered, so
every check gives the answer it would give without the memo.

Only public data is kept (keys, signatures, signed messages: what the server relays),
bounded to :data:`MAX_ENTRIES` triples (oldest forgotten first). A real site verifies each
peer once per round anyway, so there it saves nothing and costs a dictionary look-up.
"""

from __future__ import annotations

import threading

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["MAX_ENTRIES", "verify_ed25519"]

#: Valid triples remembered per process (a few hundred bytes each).
MAX_ENTRIES = 16384

_valid: dict[tuple[bytes, bytes, bytes], None] = {}
_lock = threading.Lock()


def verify_ed25519(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Return whether ``signature`` is a valid Ed25519 signature of ``message``.

    Examples
    --------
    >>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    >>> from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    >>> k = Ed25519PrivateKey.from_private_bytes(bytes(32))
    >>> pk = k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    >>> sig = k.sign(b"m")
    >>> verify_ed25519(pk, sig, b"m"), verify_ed25519(pk, sig, b"m"), verify_ed25519(pk, sig, b"n")
    (True, True, False)
    """
    key = (bytes(public_key), bytes(signature), bytes(message))
    with _lock:
        if key in _valid:
            return True
    try:
        Ed25519PublicKey.from_public_bytes(key[0]).verify(key[1], key[2])
    except (InvalidSignature, ValueError):
        return False
    with _lock:
        _valid[key] = None
        while len(_valid) > MAX_ENTRIES:
            del _valid[next(iter(_valid))]
    return True
