"""Regenerate the known-answer vectors from the reference implementations.

Run ``python -m tests.vectors.generate`` only when a format change is intended; the vectors
are otherwise frozen and every change to them must be explained in the commit.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

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


def _inputs(n: int, seed: int, spread: float) -> list[float]:
    """Deterministic test inputs (float32 values, stored exactly as JSON floats)."""
    rng = np.random.default_rng(seed)  # test data only
    return [float(v) for v in (rng.standard_normal(n) * spread).astype(np.float32)]


def core_vectors() -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Vectors of the noise samplers, quantization and bit packing (reference.py)."""
    quant = []
    for seed, n, r, bits in ((0, 40, 1.0, 8), (1, 40, 0.37, 16), (2, 12, 2.0, 1), (3, 24, 1.0, 32)):
        x = _inputs(n, seed, 0.8 * r)
        x[:3] = [r * 3.0, -r * 3.0, 0.0]  # clipped both ways, and the midpoint
        rng_seed = bytes([seed + 1]) * 32
        q = reference.quantize(x, r, bits, reference.secure_rng(rng_seed))
        quant.append({"x": x, "clip_range": r, "bits": bits, "rng_seed": rng_seed.hex(), "q": q})
    noise: list[dict[str, Any]] = []
    for kind, dtype, scale, n in (
        ("gaussian", "float32", 1.0, 100),  # 12 bytes per element: crosses a buffer skip
        ("gaussian", "float64", 0.75, 100),
        ("gaussian", "float64", math.nextafter(2.0, 0.0), 8),  # exact exponent below 2
        ("laplace", "float32", 2.5, 100),
        ("laplace", "float64", 1e-3, 16),
    ):
        x = _inputs(n, n, 5.0)
        rng_seed = bytes([len(noise) + 40]) * 32
        out = reference.lattice_noise(
            x, kind, scale, reference.secure_rng(rng_seed), single=dtype == "float32"
        )
        noise.append(
            {
                "kind": kind,
                "dtype": dtype,
                "scale": scale,
                "lattice_step": reference.lattice_step(scale),
                "rng_seed": rng_seed.hex(),
                "x": x,
                "out": out,
            }
        )
    dgauss: list[dict[str, Any]] = []
    for sigma, n in ((0.5, 64), (1.2, 64), (3.0, 64), (100.0, 32), (2.0**-10, 16), (12345.6, 16)):
        rng_seed = bytes([len(dgauss) + 80]) * 32
        a, b, t = reference.discrete_gaussian_params(sigma)
        dgauss.append(
            {
                "sigma": sigma,
                "a": a,
                "b": b,
                "t": t,
                "variance": a / b,
                "rng_seed": rng_seed.hex(),
                "samples": reference.discrete_gaussian(n, sigma, reference.secure_rng(rng_seed)),
            }
        )
    pack = []
    for bits, n in ((1, 13), (3, 11), (8, 5), (13, 9), (32, 3), (33, 4), (64, 3)):
        rng = np.random.default_rng(bits)  # test data only
        vals = [int(v) >> (64 - bits) for v in rng.integers(0, 2**63, n, dtype=np.uint64) << 1]
        pack.append({"bits": bits, "values": vals, "packed": reference.pack_bits(vals, bits).hex()})
    ddg: list[dict[str, Any]] = []
    for dim, sigma_mult, bits in ((6, 1.0, 32), (5, 0.5, 40), (9, 0.0, 24)):
        # Inputs under the clipping norm, so clipping is the identity (float32 copy).
        x = [float(np.float32(v * 0.5 / math.sqrt(dim))) for v in _inputs(dim, dim, 0.5)]
        config: dict[str, Any] = {
            "dim": dim,
            "clip_norm": 1.0,
            "noise_multiplier": sigma_mult,
            "num_clients": 3,
            "threshold": 2,
            "bits": bits,
        }
        from confide.privacy import DDGConfig, calibrate_ddg, rotation_seed

        p = calibrate_ddg(DDGConfig(**config))
        rot_seed = rotation_seed(b"job-seed", dim)
        rng_seed = bytes([len(ddg) + 120]) * 32
        ring = reference.ddg_encode(
            x,
            p.padded_dim,
            p.gamma,
            p.norm_bound,
            p.local_sigma,
            p.bits,
            rot_seed,
            reference.secure_rng(rng_seed),
        )
        ddg.append(
            {
                "config": config,
                "params": p.to_dict(),
                "job_seed": b"job-seed".hex(),
                "round": dim,
                "rotation_seed": rot_seed.hex(),
                "rng_seed": rng_seed.hex(),
                "x": x,
                "ring": ring,
            }
        )
    return {
        "ddg": ("DDG client encoding: rotate, scale, round, local noise, mod 2^bits", ddg),
        "quantize": ("Stochastic quantization into [0, 2^bits - 1] (docs/spec.md s7)", quant),
        "noise": ("Lattice Gaussian/Laplace noise added to x (docs/spec.md s6)", noise),
        "discrete_gaussian": ("Exact discrete Gaussian, CKS20 (docs/spec.md s6.4)", dgauss),
        "pack": ("Bit packing: little-endian bit stream (docs/spec.md s4)", pack),
    }


def protocol_vectors() -> list[dict[str, Any]]:
    """SecAgg+ and request-signing byte strings (docs/spec.md s9-10)."""
    digest = bytes(range(32))
    enc_pk, mask_pk = bytes([1]) * 32, bytes([2]) * 32
    commit = reference.self_commitment(bytes([3]) * 32, 7, "site-a")
    session = reference.session_id(digest, 7, [("site-b", b"advert-b"), ("site-a", b"advert-a")])
    return [
        {
            "name": "signing_payload",
            "args": [
                "post",
                "/v1/rounds/7/train",
                "site-a",
                7,
                "train",
                "6865790a",
                "00ff" * 8,
                1700000000123,
            ],
            "bytes": reference.signing_payload(
                "post",
                "/v1/rounds/7/train",
                "site-a",
                7,
                "train",
                b"hey\n",
                "00ff" * 8,
                1700000000123,
            ).hex(),
        },
        {
            "name": "self_commitment",
            "args": [(bytes([3]) * 32).hex(), 7, "site-a"],
            "bytes": commit.hex(),
        },
        {
            "name": "advert_payload",
            "args": [digest.hex(), 7, "site-a", enc_pk.hex(), mask_pk.hex(), commit.hex()],
            "bytes": reference.advert_payload(digest, 7, "site-a", enc_pk, mask_pk, commit).hex(),
        },
        {
            "name": "session_id",
            "args": [
                digest.hex(),
                7,
                [["site-b", b"advert-b".hex()], ["site-a", b"advert-a".hex()]],
            ],
            "bytes": session.hex(),
        },
        {
            "name": "share_ad",
            "args": [session.hex(), 7, "site-a", "site-b"],
            "bytes": reference.share_ad(session, 7, "site-a", "site-b").hex(),
        },
        {
            "name": "share_bundle",
            "args": ["site-a", "site-b", b"self-share".hex(), b"key-share".hex()],
            "bytes": reference.share_bundle("site-a", "site-b", b"self-share", b"key-share").hex(),
        },
        {
            "name": "agreement_info",
            "args": ["mask", session.hex(), 7, "site-b", "site-a"],
            "bytes": reference.agreement_info("mask", session, 7, "site-b", "site-a").hex(),
        },
        {
            "name": "roster_payload",
            "args": [session.hex(), 7, ["site-b", "site-a"]],
            "bytes": reference.roster_payload(session, 7, ["site-b", "site-a"]).hex(),
        },
        {
            "name": "task_binding",
            "args": [digest.hex(), (bytes([4]) * 32).hex()],
            "bytes": reference.task_binding(digest, bytes([4]) * 32).hex(),
        },
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
    for name, (desc, vecs) in core_vectors().items():
        with (VECTOR_DIR / f"{name}.json").open("w") as f:
            json.dump({"description": desc, "vectors": vecs}, f, indent=1)
            f.write("\n")
    with (VECTOR_DIR / "protocol.json").open("w") as f:
        desc = "SecAgg+ payloads, AEAD associated data, session id, signed request (docs/spec.md)"
        json.dump({"description": desc, "vectors": protocol_vectors()}, f, indent=1)
        f.write("\n")
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
