"""confide.sigcache: remembering valid Ed25519 triples never changes an answer."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from confide import sigcache
from confide.secagg.crypto import verify

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PK = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _flip(data: bytes, i: int) -> bytes:
    i %= len(data)
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]


def test_known_answers_and_only_valid_triples_are_kept() -> None:
    msg = b"advertisement of c001"
    sig = KEY.sign(msg)
    assert verify(PK, sig, msg)
    assert (PK, sig, msg) in sigcache._valid
    assert verify(PK, sig, msg)  # remembered: the same answer
    bad = _flip(sig, 3)
    assert not verify(PK, bad, msg)
    assert not verify(PK, bad, msg)  # refused again, never remembered
    assert (PK, bad, msg) not in sigcache._valid
    assert not verify(PK, sig, msg + b"!")
    assert not verify(PK[:31], sig, msg)  # malformed key: False, not an exception


@settings(max_examples=60, deadline=None)
@given(msg=st.binary(min_size=1, max_size=64), which=st.sampled_from("kms"), i=st.integers(0, 63))
def test_any_changed_byte_is_refused_after_the_valid_triple_was_seen(
    msg: bytes, which: str, i: int
) -> None:
    sig = KEY.sign(msg)
    assert verify(PK, sig, msg)
    pk, s, m = PK, sig, msg
    if which == "k":
        pk = _flip(PK, i)
    elif which == "s":
        s = _flip(sig, i)
    else:
        m = _flip(msg, i)
    assert not verify(pk, s, m)


def test_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sigcache, "MAX_ENTRIES", 4)
    for k in range(10):
        m = f"m{k}".encode()
        assert sigcache.verify_ed25519(PK, KEY.sign(m), m)
    assert len(sigcache._valid) <= 4
    assert (PK, KEY.sign(b"m9"), b"m9") in sigcache._valid  # newest kept, oldest gone
    assert (PK, KEY.sign(b"m0"), b"m0") not in sigcache._valid
