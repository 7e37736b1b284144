"""Known-answer tests: confide's PRG, secure generator and Shamir sharing against frozen
vectors produced by independent reference implementations (tests/vectors/reference.py)."""

from __future__ import annotations

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
