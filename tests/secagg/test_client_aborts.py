"""A test-double server sends inconsistent requests; the client must abort revealing nothing.

Each test runs an honest round up to the request under test (real server), tampers with the
request addressed to the client ``c000`` and checks that the client raises
:class:`SecAggAbortError` with the expected reason, returned nothing, wiped its secrets and
refuses every later request, including the honest one.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.secagg import ClientSecAgg, SecAggAbortError
from confide.secagg.crypto import roster_payload, sign
from tests.secagg.driver import MODEL, Round, make_params, make_setup, wire

ME = "c000"
Json = dict[str, Any]


class Staged:
    """Walks an honest round stage by stage (c005 drops after sharing keys)."""

    def __init__(self, consistency: bool = False) -> None:
        setup, keys = make_setup(make_params(7, t=4, max_dropouts=3), d=8, consistency=consistency)
        self.r = Round(setup, keys)
        self.srv = self.r.server
        self.c = self.r.clients
        self.ids = list(setup.cohort)

    def broadcast(self) -> Json:
        for c in self.ids:
            self.srv.receive_advertisement(wire(self.c[c].advertise()))
        return wire(self.srv.close_advertise())

    def delivery(self) -> Json:
        b = self.broadcast()
        for c in self.ids:
            self.srv.receive_share_upload(wire(self.c[c].share_keys(b)))
        return {c: wire(m) for c, m in self.srv.close_share().items()}[ME]

    def mask_all(self) -> Json:
        deliveries = {c: wire(m) for c, m in self._deliveries().items()}
        for c in self.ids:
            if c == "c005":
                continue
            self.srv.receive_masked_input(
                wire(
                    self.c[c].masked_input(
                        deliveries[c],
                        self.r.updates[c],
                        self.r.weights[c],
                        model_sha256=hashlib.sha256(MODEL).digest(),
                    )
                )
            )
        return wire(self.srv.close_mask())

    def _deliveries(self) -> Any:
        b = self.broadcast()
        for c in self.ids:
            self.srv.receive_share_upload(wire(self.c[c].share_keys(b)))
        return self.srv.close_share()

    def unmask_request(self) -> Json:
        req = self.mask_all()
        if self.r.setup.consistency_check:
            for c in self.ids:
                if c != "c005":
                    self.srv.receive_consistency_signature(wire(self.c[c].consistency_check(req)))
            req = wire(self.srv.close_consistency())
        return req


def expect_abort(
    client: ClientSecAgg,
    call: Callable[[], Any],
    reason: str,
    honest: Callable[[], Any] | None = None,
) -> None:
    with pytest.raises(SecAggAbortError) as info:
        call()
    assert info.value.reason == reason, str(info.value)
    assert client.aborted
    assert not client._peers  # no share kept
    assert bytes(client._self_seed) == bytes(32)
    assert bytes(client._mask_seed) == bytes(32)
    if honest is not None:
        with pytest.raises(SecAggAbortError, match="already-aborted"):
            honest()


# -- unmask -------------------------------------------------------------------------------


def unmask_case(mutate: Callable[[Json], None], reason: str, consistency: bool = False) -> None:
    s = Staged(consistency)
    honest = s.unmask_request()
    bad = copy.deepcopy(honest)
    mutate(bad)
    client = s.c[ME]
    expect_abort(client, lambda: client.unmask(bad), reason, lambda: client.unmask(honest))


def test_honest_unmask_releases_one_kind_per_owner() -> None:
    s = Staged()
    resp = s.c[ME].unmask(s.unmask_request())
    self_owners = {o for o, _ in resp.self_shares}
    key_owners = {o for o, _ in resp.key_shares}
    assert not self_owners & key_owners
    assert key_owners <= {"c005"}
    assert ME in self_owners
    # An identical retry gets the identical answer; a different request aborts.
    req = s.srv.pending_unmask_request()
    assert s.c[ME].unmask(wire(req)) == resp


def test_peer_listed_dead_and_alive() -> None:
    unmask_case(lambda r: r["dead"].append("c001"), "dead-and-alive")


def test_self_listed_dead() -> None:
    def m(r: Json) -> None:
        r["alive"].remove(ME)
        r["dead"].append(ME)

    unmask_case(m, "self-listed-dead")


def test_self_missing_from_alive() -> None:
    unmask_case(lambda r: r["alive"].remove(ME), "self-listed-dead")


def test_unknown_id() -> None:
    unmask_case(lambda r: r["alive"].append("intruder"), "unknown-id")


def test_repeated_id() -> None:
    unmask_case(lambda r: r["alive"].append(r["alive"][1]), "malformed")


def test_fewer_than_t_alive() -> None:
    def m(r: Json) -> None:
        moved = [c for c in r["alive"] if c != ME][:3]
        r["alive"] = [c for c in r["alive"] if c not in moved]
        r["dead"] = sorted(r["dead"] + moved)

    unmask_case(m, "too-few-alive")


def test_holder_neither_dead_nor_alive() -> None:
    unmask_case(lambda r: r["dead"].remove("c005"), "roster-mismatch")


def test_second_different_request() -> None:
    s = Staged()
    honest = s.unmask_request()
    client = s.c[ME]
    client.unmask(honest)
    other = copy.deepcopy(honest)
    other["alive"].remove("c006")
    other["dead"] = sorted([*other["dead"], "c006"])
    with pytest.raises(SecAggAbortError, match="unexpected-stage"):
        client.unmask(other)


def test_roster_differs_from_signed_one() -> None:
    unmask_case(
        lambda r: (r["alive"].remove("c006"), r["dead"].append("c006")),
        "roster-mismatch",
        consistency=True,
    )


def test_too_few_consistency_signatures() -> None:
    def m(r: Json) -> None:
        r["signatures"] = dict(list(r["signatures"].items())[:3])

    unmask_case(m, "too-few-signatures", consistency=True)


def test_forged_consistency_signature() -> None:
    def m(r: Json) -> None:
        r["signatures"]["c001"] = r["signatures"]["c002"]

    unmask_case(m, "bad-signature", consistency=True)


def test_wrong_session() -> None:
    unmask_case(lambda r: r.update(session_id="A" * 43 + "="), "wrong-session")


def test_consistency_request_listing_self_dead() -> None:
    s = Staged(consistency=True)
    req = s.mask_all()
    honest = copy.deepcopy(req)
    req["survivors"].remove(ME)
    client = s.c[ME]
    expect_abort(
        client,
        lambda: client.consistency_check(req),
        "self-listed-dead",
        lambda: client.consistency_check(honest),
    )


def test_unmask_before_consistency_check() -> None:
    s = Staged(consistency=True)
    s.mask_all()
    client = s.c[ME]
    fake = {
        "type": "UnmaskRequest",
        "round": 7,
        "session_id": "",
        "alive": [],
        "dead": [],
        "signatures": {},
    }
    fake["session_id"] = wire(s.srv.consistency_request())["session_id"]
    fake["alive"] = list(s.srv.consistency_request().survivors)
    fake["dead"] = ["c005"]
    expect_abort(client, lambda: client.unmask(fake), "unexpected-stage")


# -- share keys ---------------------------------------------------------------------------


def share_case(mutate: Callable[[Json, Staged], None], reason: str) -> None:
    s = Staged()
    honest = s.broadcast()
    bad = copy.deepcopy(honest)
    mutate(bad, s)
    client = s.c[ME]
    expect_abort(client, lambda: client.share_keys(bad), reason, lambda: client.share_keys(honest))


def test_own_advertisement_altered() -> None:
    def m(b: Json, s: Staged) -> None:
        b["advertisements"][0]["mask_pk"] = b["advertisements"][1]["mask_pk"]

    share_case(m, "repeated-key")


def test_own_advertisement_missing() -> None:
    share_case(lambda b, s: b["advertisements"].pop(0), "own-advert-altered")


def test_unsigned_advertisement() -> None:
    def m(b: Json, s: Staged) -> None:
        b["advertisements"][2]["signature"] = b["advertisements"][3]["signature"]

    share_case(m, "bad-signature")


def test_advertisement_from_outside_cohort() -> None:
    def m(b: Json, s: Staged) -> None:
        extra = copy.deepcopy(b["advertisements"][-1])
        extra["client_id"] = "zz-intruder"
        b["advertisements"].append(extra)

    share_case(m, "unknown-id")


def test_repeated_advertisement() -> None:
    share_case(lambda b, s: b["advertisements"].append(b["advertisements"][-1]), "repeated-id")


def test_session_id_not_hash_of_keys() -> None:
    share_case(lambda b, s: b.update(session_id="B" * 43 + "="), "wrong-session")


def test_too_few_advertisements() -> None:
    share_case(lambda b, s: b.update(advertisements=b["advertisements"][:3]), "too-few-clients")


def test_wrong_round() -> None:
    share_case(lambda b, s: b.update(round=8), "wrong-round")


# -- masked input -------------------------------------------------------------------------


def mask_case(mutate: Callable[[Json], None], reason: str, model: bytes = MODEL) -> None:
    s = Staged()
    honest = s.delivery()
    bad = copy.deepcopy(honest)
    mutate(bad)
    client = s.c[ME]
    digest = hashlib.sha256(model).digest()

    def call(d: Json, h: bytes = digest) -> Any:
        return client.masked_input(d, s.r.updates[ME], s.r.weights[ME], model_sha256=h)

    expect_abort(
        client, lambda: call(bad), reason, lambda: call(honest, hashlib.sha256(MODEL).digest())
    )


def test_model_hash_mismatch() -> None:
    mask_case(lambda d: None, "model-hash-mismatch", model=b"another model")


def test_tampered_share_ciphertext() -> None:
    def m(d: Json) -> None:
        ct = d["shares"][0]["ciphertext"]
        d["shares"][0]["ciphertext"] = ("A" if ct[0] != "A" else "B") + ct[1:]

    mask_case(m, "bad-share")


def test_share_from_non_neighbour_or_missing() -> None:
    mask_case(lambda d: d["shares"].pop(), "share-set-mismatch")


def test_self_not_a_holder() -> None:
    mask_case(lambda d: d["holders"].remove(ME), "self-listed-dead")


def test_identity_mismatch_at_construction() -> None:
    setup, _ = make_setup(make_params(4), d=4)
    other = Ed25519PrivateKey.from_private_bytes(bytes(32))
    with pytest.raises(SecAggAbortError, match="identity-mismatch"):
        ClientSecAgg(setup, ME, other)
    with pytest.raises(SecAggAbortError, match="not-in-cohort"):
        ClientSecAgg(setup, "nobody", other)


def test_roster_payload_is_order_independent() -> None:
    k = Ed25519PrivateKey.from_private_bytes(bytes(32))
    assert sign(k, roster_payload(b"s", 1, ["b", "a"])) == sign(
        k, roster_payload(b"s", 1, ["a", "b"])
    )
