"""Regenerate the known-answer vectors from the reference implementations.

Run ``python -m tests.vectors.generate`` only when a format change is intended; the vectors
are otherwise frozen and every change to them must be explained in the commit.
"""

from __future__ import annotations

import json

from tests.vectors import reference
from tests.vectors.loader import VECTOR_DIR

PRG_CASES = [
    (bytes(32), 16, 32, b"", 0, "self"),
    (bytes(range(32)), 16, 20, b"session-A", 1, "self"),
    (bytes(range(32)), 16, 20, b"session-A", 1, "pair"),
    (bytes(range(32)), 16, 20, b"session-A", 2, "self"),
    (bytes([0xFF] * 32), 9, 1, b"s", 7, "self"),
    (bytes([0xA5] * 32), 8, 33, b"\x00\x01\x02", 2**63 + 5, "pair"),
    (bytes([0x5A] * 32), 8, 64, b"long-session-id" * 4, 123456789, "weight"),
]


def main() -> None:
    prg = [
        {
            "seed": seed.hex(),
            "n": n,
            "bits": bits,
            "session": session.hex(),
            "round": rnd,
            "purpose": purpose,
            "mask": [int(v) for v in reference.mask(seed, n, bits, session, rnd, purpose)],
        }
        for seed, n, bits, session, rnd, purpose in PRG_CASES
    ]
    rng = [
        {"seed": s.hex(), "bytes": reference.secure_rng_bytes(s, 80).hex()}
        for s in (bytes(32), bytes(range(32)))
    ]
    secret = bytes(range(100, 132))
    shamir = [
        {
            "secret": secret.hex(),
            "n": n,
            "t": t,
            "rng_seed": bytes([7] * 32).hex(),
            "shares": [s.hex() for s in reference.shamir_split(secret, n, t, bytes([7] * 32))],
        }
        for n, t in ((5, 3), (3, 1), (4, 4))
    ]
    for name, desc, vecs in (
        ("prg", "SecAgg mask expansion: HKDF-SHA256 -> AES-128-CTR, words mod 2^bits", prg),
        ("secure_rng", "SecureRng keystream: AES-256-CTR keyed by SHA-256(tag || seed)", rng),
        ("shamir", "Shamir over GF(2^61-1), 7-byte chunks, coefficients from SecureRng", shamir),
    ):
        with (VECTOR_DIR / f"{name}.json").open("w") as f:
            json.dump({"description": desc, "vectors": vecs}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
