"""Shamir secret sharing: any t shares reconstruct, t-1 reveal nothing, bad shares fail."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import confide
from tests.vectors import reference

P = reference.SHAMIR_P


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=100), st.integers(1, 12), st.data())
def test_any_t_shares_reconstruct(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = confide.split_secret(secret, n, t)
    subset = data.draw(st.permutations(shares))[:t]
    assert confide.combine_shares(subset) == secret


def test_every_subset_of_size_t_works_for_32_byte_seeds() -> None:
    secret = bytes(range(32))
    shares = confide.split_secret(secret, 6, 3)
    for subset in itertools.combinations(shares, 3):
        assert confide.combine_shares(list(subset)) == secret


def _lagrange_eval(points: list[tuple[int, int]], x: int) -> int:
    acc = 0
    for j, (xj, yj) in enumerate(points):
        num = den = 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (x - xm) % P
                den = den * (xj - xm) % P
        acc = (acc + yj * num * pow(den, P - 2, P)) % P
    return acc


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.integers(3, 10))
def test_t_minus_one_shares_are_consistent_with_every_secret(
    secret: bytes, other: bytes, n: int
) -> None:
    # Information-theoretic secrecy, shown constructively: given any t-1 shares of `secret`,
    # there is a valid t-th share that makes them reconstruct to `other`, for every `other`.
    t = n // 2 + 1
    shares = confide.split_secret(secret, n, t)
    known = shares[: t - 1]
    target_x = t
    chunks = [int.from_bytes(other[i : i + 7], "big") for i in range(0, 32, 7)]
    ys = []
    for k, c in enumerate(chunks):
        pts = [(0, c)] + [
            (int.from_bytes(s[3:5], "big"), int.from_bytes(s[7 + 8 * k : 15 + 8 * k], "big"))
            for s in known
        ]
        ys.append(_lagrange_eval(pts, target_x))
    forged = shares[t - 1][:7] + b"".join(y.to_bytes(8, "big") for y in ys)
    assert confide.combine_shares([*known, forged]) == other


def test_bad_shares_are_rejected() -> None:
    secret = b"s" * 32
    shares = confide.split_secret(secret, 5, 3)
    with pytest.raises(confide.ShareError, match="exactly t = 3 shares, got 2"):
        confide.combine_shares(shares[:2])
    with pytest.raises(confide.ShareError, match="exactly t = 3 shares, got 4"):
        confide.combine_shares(shares[:4])
    with pytest.raises(confide.ShareError, match="same x-coordinate 1"):
        confide.combine_shares([shares[0], shares[1], shares[0]])
    other = confide.split_secret(b"o" * 16, 5, 3)
    with pytest.raises(confide.ShareError, match="secret length"):
        confide.combine_shares([shares[0], shares[1], other[2]])
    other_t = confide.split_secret(secret, 5, 2)
    with pytest.raises(confide.ShareError, match="threshold"):
        confide.combine_shares([shares[0], shares[1], other_t[2]])
    with pytest.raises(confide.ShareError, match="malformed share 1"):
        confide.combine_shares([shares[0], shares[1][:-1], shares[2]])
    with pytest.raises(confide.ShareError, match="version"):
        confide.combine_shares([b"\x02" + shares[0][1:], shares[1], shares[2]])
    corrupt = bytearray(shares[1])
    for k in range(5):
        corrupt[8 + 8 * k] ^= 0x0F
    with pytest.raises(confide.ShareError, match="inconsistent"):
        confide.combine_shares([shares[0], bytes(corrupt), shares[2]])
    with pytest.raises(confide.InvalidArgumentError, match="t = 4, n = 3"):
        confide.split_secret(secret, 3, 4)
    with pytest.raises(confide.InvalidArgumentError, match="t = 0"):
        confide.split_secret(secret, 3, 0)
    with pytest.raises(confide.InvalidArgumentError, match="got 0 bytes"):
        confide.split_secret(b"", 3, 2)
