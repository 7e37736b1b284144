"""Per-round crypto reused within one client, and the setup digest memo (issue 16).

A client agrees each pairwise share key once, at ``share_keys``; ``masked_input`` decrypts
its neighbours' shares with the same keys instead of a second X25519 agreement, and wipes
them with the seeds. ``RoundSetup.digest`` is remembered per process for the exact setup.
These tests check that the round still sums bit for bit, that no share key is agreed twice,
that the kept keys are zeroed after ``masked_input`` and on abort, and that the digest is
the hash of the canonical JSON for every setup, remembered or not.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from typing import Any

import pytest

import confide.secagg.client as client_mod
from confide.secagg import SecAggAbortError
from tests.secagg.driver import Round, make_params, make_setup, wire


def test_each_share_key_is_agreed_once_and_the_round_sums_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: Counter[tuple[str, str]] = Counter()
    real = client_mod.agree

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls[(kwargs["label"], kwargs["a"])] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(client_mod, "agree", counting)
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=16)
    r = Round(setup, keys)
    res = r.run()
    assert set(res.survivors) == set(setup.cohort)
    total, weight = r.expected(res.survivors)
    assert (res.total.astype(object) == total).all()
    assert res.total_weight == weight
    for c in setup.cohort:
        nbrs = len(r.clients[c]._nbrs)
        assert nbrs == 4
        assert calls[("share", c)] == nbrs  # at share_keys only, not again at masked_input
        assert calls[("mask", c)] == nbrs


def test_kept_share_keys_are_zeroed_after_masking_and_on_abort() -> None:
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8)
    r = Round(setup, keys)
    assert r.server is not None
    for c in setup.cohort:
        r.server.receive_advertisement(wire(r.clients[c].advertise()))
    bcast = wire(r.server.close_advertise())
    for c in setup.cohort:
        r.server.receive_share_upload(wire(r.clients[c].share_keys(copy.deepcopy(bcast))))
    a, b = setup.cohort[0], setup.cohort[1]
    kept_a = list(r.clients[a]._share_keys.values())
    kept_b = list(r.clients[b]._share_keys.values())
    assert len(kept_a) == 4
    assert all(any(k) for k in kept_a)
    deliveries = r.server.close_share()
    delivery_a = wire(deliveries[a])
    masked = r.clients[a].masked_input(
        delivery_a, r.updates[a], r.weights[a], model_sha256=setup.model_sha256
    )
    assert masked.client_id == a
    assert r.clients[a]._share_keys == {}
    assert all(not any(k) for k in kept_a)  # the very buffers, zeroed
    # A delivery naming another receiver aborts the round for b: its keys go too.
    wrong = copy.deepcopy(wire(deliveries[b]))
    wrong["shares"][0]["receiver"] = a
    with pytest.raises(SecAggAbortError):
        r.clients[b].masked_input(
            wrong, r.updates[b], r.weights[b], model_sha256=setup.model_sha256
        )
    assert r.clients[b]._share_keys == {}
    assert all(not any(k) for k in kept_b)


def _canonical(setup: Any) -> bytes:
    text = json.dumps(setup.to_json(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()


def test_the_setup_digest_is_the_canonical_hash_remembered_or_not() -> None:
    s7, _ = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8)
    s8, _ = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8, round=8)
    for s in (s7, s8, s7, s8):  # first computed, then remembered
        assert s.digest() == _canonical(s)
    assert s7.digest() != s8.digest()
    many = [
        make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8, round=9 + i)[0] for i in range(6)
    ]
    for s in many:  # more setups than the memo holds: the oldest are forgotten, not wrong
        assert s.digest() == _canonical(s)
    assert s7.digest() == _canonical(s7)
    assert len({s.digest() for s in many}) == len(many)
