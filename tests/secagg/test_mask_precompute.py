"""Mask seeds derived ahead of ``masked_input`` (``ClientSecAgg.precompute_masks``, issue 16).

After its share upload a client may derive the pairwise mask seeds with its neighbours while
it waits for the mask stage. These tests check that the precomputed seeds are the ones
``masked_input`` derives on demand (same masked input, bit for bit, and the round sums
exactly), that a neighbour that dropped after sharing keys has its seed zeroed and never
used, that a seed is used only with the advertised key it was derived from, and that every
precomputed seed is zeroed after masking, on abort and when the round is discarded.
"""

from __future__ import annotations

import copy
import hashlib
from collections import Counter
from typing import Any

import pytest

import confide
import confide.secagg.client as client_mod
from confide.secagg import ClientSecAgg, SecAggAbortError
from confide.secagg.crypto import agree
from tests.secagg import driver
from tests.secagg.driver import Round, make_params, make_setup, wire


def _twin(r: Round, cid: str) -> ClientSecAgg:
    """A second client with the same id, key and randomness as ``r.clients[cid]``."""
    rng = confide.SecureRng(hashlib.sha256(r.seed + cid.encode()).digest())
    return ClientSecAgg(r.setup, cid, r.keys[cid], rng=rng)


def _to_share_stage(
    r: Round, skip_share: tuple[str, ...] = (), twins: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, ClientSecAgg]]:
    """Advertise and share (``skip_share`` never upload shares); return the deliveries."""
    srv = r.server
    assert srv is not None
    tw = {c: _twin(r, c) for c in twins}
    for c in r.setup.cohort:
        srv.receive_advertisement(wire(r.clients[c].advertise()))
        if c in tw:
            tw[c].advertise()
    bcast = wire(srv.close_advertise())
    for c in r.setup.cohort:
        if c in skip_share:
            continue
        up = wire(r.clients[c].share_keys(copy.deepcopy(bcast)))
        srv.receive_share_upload(up)
        if c in tw:
            assert wire(tw[c].share_keys(copy.deepcopy(bcast))) == up
    return {c: wire(m) for c, m in srv.close_share().items()}, tw


def _mask(client: ClientSecAgg, r: Round, delivery: dict[str, Any]) -> bytes:
    cid = client.client_id
    out = client.masked_input(
        copy.deepcopy(delivery), r.updates[cid], r.weights[cid], model_sha256=r.setup.model_sha256
    )
    return out.data


def test_precomputed_seeds_equal_the_on_demand_agreements() -> None:
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=16)
    r = Round(setup, keys)
    deliveries, twins = _to_share_stage(r, twins=(setup.cohort[0],))
    a = setup.cohort[0]
    client = r.clients[a]
    assert client.precompute_masks() == 4
    assert client.precompute_masks() == 4  # a second call changes nothing
    own = bytes(client._mask_seed)
    for j, (pk, seed) in client._mask_seeds.items():
        assert pk == client._peers[j].advert.mask_pk
        want = agree(own, pk, label="mask", session=client._session, round=setup.round, a=a, b=j)
        assert bytes(seed) == want
    # The same masked input as the twin that derives its seeds at masked_input.
    assert _mask(client, r, deliveries[a]) == _mask(twins[a], r, deliveries[a])


def test_a_round_with_precomputed_seeds_sums_exactly_and_agrees_no_mask_seed_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Precomputing(driver.RecordingClient):
        def share_keys(self, broadcast: Any) -> Any:
            out = super().share_keys(broadcast)
            assert self.precompute_masks() == len(self._nbrs)
            return out

    monkeypatch.setattr(driver, "RecordingClient", Precomputing)
    calls: Counter[str] = Counter()
    real = client_mod.agree

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls[kwargs["label"]] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(client_mod, "agree", counting)
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=16)
    r = Round(setup, keys)
    res = r.run(drop={"mask": [setup.cohort[3]]})
    assert setup.cohort[3] not in res.survivors
    total, weight = r.expected(res.survivors)
    assert (res.total.astype(object) == total).all()
    assert res.total_weight == weight
    # Every mask seed came from the precompute (4 per client), none at masked_input; the
    # dropped client's neighbours rebuilt its masks on the server from its key shares.
    assert calls["mask"] == 7 * 4


def test_a_dropped_neighbours_precomputed_seed_is_zeroed_and_never_used() -> None:
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=16)
    r = Round(setup, keys)
    a = setup.cohort[0]
    # Find a neighbour of a from the graph, then drop it before its share upload.
    probe = Round(setup, keys)
    _to_share_stage(probe)
    nbrs = probe.clients[a]._nbrs
    gone = nbrs[0]
    deliveries, twins = _to_share_stage(r, skip_share=(gone,), twins=(a,))
    client = r.clients[a]
    assert client.precompute_masks() == 4  # before it can know who shared keys
    held = {j: buf for j, (_, buf) in client._mask_seeds.items()}
    assert gone in held
    assert any(held[gone])
    # Tamper with the dropped neighbour's seed: were it used, the masked input would change.
    held[gone][:] = bytes(range(32))
    assert _mask(client, r, deliveries[a]) == _mask(twins[a], r, deliveries[a])
    assert client._mask_seeds == {}
    assert all(not any(buf) for buf in held.values())  # the very buffers, zeroed


def _one_precomputed() -> tuple[Round, ClientSecAgg, ClientSecAgg, Any, str]:
    """A 7-site round at the share stage whose first site precomputed its mask seeds.

    Returns the round, that site, its twin (no precompute), its share delivery and the
    first neighbour it holds a seed for.
    """
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=16)
    r = Round(setup, keys)
    a = setup.cohort[0]
    deliveries, twins = _to_share_stage(r, twins=(a,))
    client = r.clients[a]
    client.precompute_masks()
    return r, client, twins[a], deliveries[a], next(iter(client._mask_seeds))


def test_a_tampered_seed_of_a_holder_is_used_so_the_check_can_fail() -> None:
    r, client, twin, delivery, j = _one_precomputed()
    client._mask_seeds[j][1][:] = bytes(range(32))
    assert _mask(client, r, delivery) != _mask(twin, r, delivery)


def test_a_seed_is_used_only_with_the_key_it_was_derived_from() -> None:
    r, client, twin, delivery, j = _one_precomputed()
    _, buf = client._mask_seeds[j]
    buf[:] = bytes(range(32))
    client._mask_seeds[j] = (bytes(32), buf)  # derived from another key: not used
    assert _mask(client, r, delivery) == _mask(twin, r, delivery)
    assert not any(buf)


def test_precomputed_seeds_are_zeroed_on_abort_and_on_discard() -> None:
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8)
    r = Round(setup, keys)
    deliveries, _ = _to_share_stage(r)
    a, b = setup.cohort[0], setup.cohort[1]
    # Abort: a delivery addressed to another client.
    r.clients[a].precompute_masks()
    held = [buf for _, buf in r.clients[a]._mask_seeds.values()]
    assert len(held) == 4
    assert all(any(x) for x in held)
    wrong = copy.deepcopy(deliveries[a])
    wrong["shares"][0]["receiver"] = b
    with pytest.raises(SecAggAbortError):
        _mask(r.clients[a], r, wrong)
    assert r.clients[a]._mask_seeds == {}
    assert all(not any(x) for x in held)
    assert r.clients[a].precompute_masks() == 0  # nothing is derived after an abort
    # Discard (the site leaves the round): zeroed at once, and every later call refused.
    r.clients[b].precompute_masks()
    held = [buf for _, buf in r.clients[b]._mask_seeds.values()]
    r.clients[b].discard()
    assert r.clients[b]._mask_seeds == {}
    assert all(not any(x) for x in held)
    assert not any(r.clients[b]._mask_seed)
    with pytest.raises(SecAggAbortError):
        _mask(r.clients[b], r, deliveries[b])


def test_precompute_outside_the_shared_stage_derives_nothing() -> None:
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8)
    r = Round(setup, keys)
    a = setup.cohort[0]
    assert r.clients[a].precompute_masks() == 0  # before share_keys: no peers, no session
    deliveries, _ = _to_share_stage(r)
    _mask(r.clients[a], r, deliveries[a])
    assert r.clients[a].precompute_masks() == 0  # after masking: the seed is gone
    assert r.clients[a]._mask_seeds == {}


def test_a_precompute_that_finishes_after_the_round_moved_on_keeps_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8)
    r = Round(setup, keys)
    _to_share_stage(r)
    a = setup.cohort[0]
    client = r.clients[a]
    made: list[bytearray] = []
    real = client_mod.agree

    def agree_then_discard(*args: Any, **kwargs: Any) -> bytes:
        out = real(*args, **kwargs)
        client.discard()  # the site left the round while the worker thread computed
        return out

    monkeypatch.setattr(client_mod, "agree", agree_then_discard)
    real_bytearray = bytearray

    def tracking(x: Any = b"") -> bytearray:
        buf = real_bytearray(x)
        made.append(buf)
        return buf

    monkeypatch.setattr(client_mod, "bytearray", tracking, raising=False)
    assert client.precompute_masks() == 0
    assert client._mask_seeds == {}
    assert made
    assert all(not any(buf) for buf in made)
