"""Known-answer tests: confide's PRG, secure generator, Shamir sharing, noise samplers,
quantization, bit packing, DDG encoding and protocol encodings against frozen vectors produced
by independent reference implementations (tests/vectors/reference.py, docs/spec.md)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

import confide
from tests.vectors import reference
from tests.vectors.loader import load_vectors


@pytest.mark.parametrize("v", load_vectors("prg"), ids=lambda v: f"b{v['bits']}-{v['purpose']}")
def test_mask_expansion_matches_vectors(v: dict[str, Any]) -> None:
    domain = confide.MaskDomain(bytes.fromhex(v["session"]), v["round"], v["purpose"])
    got = confide.expand_mask(bytes.fromhex(v["seed"]), v["n"], v["bits"], domain)
    assert got.dtype == (np.uint32 if v["bits"] <= 32 else np.uint64)
    assert [int(x) for x in got] == v["mask"]
    # And the vectors still agree with the reference implementation.
    ref = reference.mask(
        bytes.fromhex(v["seed"]),
        v["n"],
        v["bits"],
        bytes.fromhex(v["session"]),
        v["round"],
        v["purpose"],
    )
    assert [int(x) for x in ref] == v["mask"]


def test_mask_of_a_long_vector_matches_reference() -> None:
    # Crosses many AES batches and parallel segments (16384 elements each).
    seed, session = bytes(range(1, 33)), b"sess"
    for bits in (17, 32, 48):
        n = 50_003
        got = confide.expand_mask(seed, n, bits, confide.MaskDomain(session, 9, "self"))
        np.testing.assert_array_equal(
            got.astype(np.uint64), reference.mask(seed, n, bits, session, 9, "self")
        )


@pytest.mark.parametrize("v", load_vectors("secure_rng"), ids=lambda v: v["seed"][:8])
def test_secure_rng_keystream_matches_vectors(v: dict[str, Any]) -> None:
    r = confide.SecureRng(bytes.fromhex(v["seed"]))
    assert r.seeded
    assert r.random_bytes(80).hex() == v["bytes"]


@pytest.mark.parametrize("v", load_vectors("shamir"), ids=lambda v: f"{v['t']}of{v['n']}")
def test_shamir_split_matches_vectors(v: dict[str, Any]) -> None:
    secret = bytes.fromhex(v["secret"])
    shares = confide.split_secret(
        secret, v["n"], v["t"], rng=confide.SecureRng(bytes.fromhex(v["rng_seed"]))
    )
    assert [s.hex() for s in shares] == v["shares"]
    t = v["t"]
    assert confide.combine_shares(shares[-t:]) == secret
    assert reference.shamir_combine([bytes.fromhex(s) for s in v["shares"][:t]]) == secret


def _seeded(hexseed: str) -> confide.SecureRng:
    return confide.SecureRng(bytes.fromhex(hexseed))


@pytest.mark.parametrize("v", load_vectors("quantize"), ids=lambda v: f"b{v['bits']}")
def test_quantize_matches_vectors(v: dict[str, Any]) -> None:
    x = np.array(v["x"], np.float32)
    got = confide.quantize(x, v["clip_range"], v["bits"], rng=_seeded(v["rng_seed"]))
    assert got.dtype == np.uint32
    assert [int(q) for q in got] == v["q"]
    ref = reference.quantize(
        v["x"], v["clip_range"], v["bits"], reference.secure_rng(bytes.fromhex(v["rng_seed"]))
    )
    assert ref == v["q"]


@pytest.mark.parametrize(
    "v", load_vectors("noise"), ids=lambda v: f"{v['kind']}-{v['dtype']}-{v['scale']}"
)
def test_lattice_noise_matches_vectors(v: dict[str, Any]) -> None:
    dtype = np.float32 if v["dtype"] == "float32" else np.float64
    x = np.array(v["x"], dtype)
    add = confide.add_gaussian_noise if v["kind"] == "gaussian" else confide.add_laplace_noise
    got = add(x, v["scale"], rng=_seeded(v["rng_seed"]))
    assert np.array_equal(got, np.array(v["out"], dtype))
    # Every output lies on the lattice of the exact step.
    assert reference.lattice_step(v["scale"]) == v["lattice_step"]
    k = got.astype(np.float64) / v["lattice_step"]
    if dtype == np.float64:
        assert np.array_equal(k, np.round(k))
    ref = reference.lattice_noise(
        v["x"],
        v["kind"],
        v["scale"],
        reference.secure_rng(bytes.fromhex(v["rng_seed"])),
        single=dtype == np.float32,
    )
    assert ref == v["out"]


@pytest.mark.parametrize("v", load_vectors("discrete_gaussian"), ids=lambda v: str(v["sigma"]))
def test_discrete_gaussian_matches_vectors(v: dict[str, Any]) -> None:
    n = len(v["samples"])
    got = confide.discrete_gaussian(n, v["sigma"], rng=_seeded(v["rng_seed"]))
    assert [int(s) for s in got] == v["samples"]
    assert confide.noise.discrete_gaussian_variance(v["sigma"]) == v["variance"] == v["a"] / v["b"]
    assert reference.discrete_gaussian_params(v["sigma"]) == (v["a"], v["b"], v["t"])
    ref = reference.discrete_gaussian(
        n, v["sigma"], reference.secure_rng(bytes.fromhex(v["rng_seed"]))
    )
    assert ref == v["samples"]


@pytest.mark.parametrize("v", load_vectors("pack"), ids=lambda v: f"b{v['bits']}")
def test_bit_packing_matches_vectors(v: dict[str, Any]) -> None:
    x = np.array(v["values"], np.uint32 if v["bits"] <= 32 else np.uint64)
    assert confide.pack_bits(x, v["bits"]).hex() == v["packed"]
    back = confide.unpack_bits(bytes.fromhex(v["packed"]), v["bits"], len(v["values"]))
    assert [int(a) for a in back] == v["values"]
    assert reference.pack_bits(v["values"], v["bits"]).hex() == v["packed"]


@pytest.mark.parametrize("v", load_vectors("ddg"), ids=lambda v: f"d{v['config']['dim']}")
def test_ddg_encoding_matches_vectors(v: dict[str, Any]) -> None:
    from confide.privacy import DDGConfig, calibrate_ddg, ddg_encode, rotation_seed

    p = calibrate_ddg(DDGConfig(**v["config"]))
    assert p.to_dict() == v["params"]
    seed = rotation_seed(bytes.fromhex(v["job_seed"]), v["round"])
    assert seed.hex() == v["rotation_seed"]
    got = ddg_encode(np.array(v["x"], np.float32), p, seed, rng=_seeded(v["rng_seed"]))
    assert [int(a) for a in got] == v["ring"]
    ref = reference.ddg_encode(
        v["x"],
        p.padded_dim,
        p.gamma,
        p.norm_bound,
        p.local_sigma,
        p.bits,
        seed,
        reference.secure_rng(bytes.fromhex(v["rng_seed"])),
    )
    assert ref == v["ring"]


def _protocol_bytes(name: str, args: list[Any]) -> bytes:
    from confide.protocol.signing import signing_payload
    from confide.secagg import crypto

    h = bytes.fromhex
    if name == "signing_payload":
        method, path, cid, rnd, stage, body, nonce, ts = args
        digest = hashlib.sha256(h(body)).hexdigest()
        return signing_payload(method, path, cid, rnd, stage, digest, nonce, ts)
    if name == "self_commitment":
        return crypto.self_commitment(h(args[0]), args[1], args[2])
    if name == "advert_payload":
        d, rnd, cid, e, m, c = args
        return crypto.advert_payload(h(d), rnd, cid, h(e), h(m), h(c))
    if name == "session_id":
        return crypto.session_id(h(args[0]), args[1], [(c, h(b)) for c, b in args[2]])
    if name == "share_ad":
        return bytes(crypto._ad(h(args[0]), args[1], args[2], args[3]))
    if name == "share_bundle":
        return crypto.pack_share_bundle(args[0], args[1], h(args[2]), h(args[3]))
    if name == "agreement_info":
        label, session, rnd, a, b = args
        lo, hi = sorted((a, b))
        return bytes(
            crypto.lp(label)
            + crypto.lp(h(session))
            + rnd.to_bytes(8, "big")
            + crypto.lp(lo)
            + crypto.lp(hi)
        )
    if name == "roster_payload":
        return crypto.roster_payload(h(args[0]), args[1], args[2])
    if name == "task_binding":
        return crypto.task_binding(h(args[0]), h(args[1]))
    raise AssertionError(name)


@pytest.mark.parametrize("v", load_vectors("protocol"), ids=lambda v: v["name"])
def test_protocol_encodings_match_vectors(v: dict[str, Any]) -> None:
    assert _protocol_bytes(v["name"], v["args"]).hex() == v["bytes"]


def test_agreement_uses_the_specified_info() -> None:
    # The key agreement is HKDF-SHA256(salt, X25519(a, B), info) with the documented info.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from confide.secagg import crypto

    s1, s2 = bytes([1]) * 32, bytes([2]) * 32
    got = crypto.agree(
        s1, crypto.x25519_public(s2), label="share", session=b"S", round=9, a="b", b="a"
    )
    shared = X25519PrivateKey.from_private_bytes(s1).exchange(
        X25519PublicKey.from_public_bytes(crypto.x25519_public(s2))
    )
    info = reference.agreement_info("share", b"S", 9, "b", "a")
    expect = HKDF(hashes.SHA256(), 32, b"confide/secaggplus/v1", info).derive(shared)
    assert got == expect


def test_bulk_calls_consume_32_bytes_of_the_parent_stream() -> None:
    # A bulk kernel forks one 32-byte key from the parent stream; the parent then continues
    # right after it, whatever the size of the call (docs/spec.md, SecureRng).
    seed = bytes(range(32))
    stream = reference.secure_rng_bytes(seed, 128)
    for call in (
        lambda r: confide.gaussian(100_000, 1.0, rng=r),
        lambda r: confide.quantize(np.zeros(70_000, np.float32), 1.0, 8, rng=r),
        lambda r: confide.discrete_gaussian(10, 2.0, rng=r),
    ):
        r = confide.SecureRng(seed)
        call(r)
        assert r.random_bytes(16) == stream[32:48]


def test_long_vectors_cross_chunks_like_the_reference() -> None:
    # Several 2**15-element chunks (each with its own stream at block chunk * 2**64).
    x = np.array(np.random.default_rng(5).standard_normal(70_000), np.float32)  # test data only
    got = confide.quantize(x, 1.0, 12, rng=confide.SecureRng(bytes([7]) * 32))
    ref = reference.quantize([float(a) for a in x], 1.0, 12, reference.secure_rng(bytes([7]) * 32))
    assert [int(q) for q in got] == ref
    y = confide.add_gaussian_noise(x[:40_000], 0.3, rng=confide.SecureRng(bytes([8]) * 32))
    ref_y = reference.lattice_noise(
        [float(a) for a in x[:40_000]],
        "gaussian",
        0.3,
        reference.secure_rng(bytes([8]) * 32),
        single=True,
    )
    assert np.array_equal(y, np.array(ref_y, np.float32))
