"""Key broadcasts derived once per process: every client still gets every check's answer.

The Ray simulation runs many clients in one process; each would verify the same signed
advertisements, hash the same session and build the same graph. ``confide.secagg.client``
remembers those public derivations per exact (setup, broadcast); these tests check that a
remembered broadcast changes no answer: the honest round is bit-identical, and a broadcast
that differs in one signature, the session id or the setup is derived (and refused) anew.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest

import confide.secagg.client as client_mod
from confide.secagg import SecAggAbortError
from tests.secagg.driver import Round, make_params, make_setup, wire

Json = dict[str, Any]


def _staged(seed: bytes = b"round") -> tuple[Round, Json]:
    setup, keys = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8)
    r = Round(setup, keys, seed=seed)
    assert r.server is not None
    for c in setup.cohort:
        r.server.receive_advertisement(wire(r.clients[c].advertise()))
    return r, wire(r.server.close_advertise())


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    with client_mod._BROADCASTS_LOCK:
        client_mod._BROADCASTS.clear()


def test_every_client_shares_one_derivation_and_the_round_sums_right() -> None:
    r, bcast = _staged()
    ups = {c: r.clients[c].share_keys(copy.deepcopy(bcast)) for c in r.setup.cohort}
    assert len(client_mod._BROADCASTS) == 1  # derived once for the seven clients
    (derived,) = client_mod._BROADCASTS.values()
    assert derived.bad_signature is None
    # The graph each client shares along is the remembered one (k = 4 neighbours each).
    for c, up in ups.items():
        assert {s.receiver for s in up.shares} == set(derived.graph[c])  # type: ignore[index]
    # The full round through the driver (a fresh round: its own broadcast) sums exactly.
    r2 = Round(*make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8), seed=b"other")
    result = r2.run(drop={"mask": {"c003"}})
    assert result.survivors == tuple(c for c in r2.setup.cohort if c != "c003")


def test_a_flipped_signature_after_the_honest_broadcast_is_refused() -> None:
    r, bcast = _staged()
    r.clients["c000"].share_keys(copy.deepcopy(bcast))  # the honest broadcast is remembered
    forged = copy.deepcopy(bcast)
    forged["advertisements"][2]["signature"] = _flip(forged["advertisements"][2]["signature"])
    with pytest.raises(SecAggAbortError) as err:
        r.clients["c001"].share_keys(forged)
    assert err.value.reason == "bad-signature"
    # Never remembered: a second client is refused the same way, not served from the memo.
    with pytest.raises(SecAggAbortError) as err:
        r.clients["c004"].share_keys(copy.deepcopy(forged))
    assert err.value.reason == "bad-signature"
    assert all(d.bad_signature is None for d in client_mod._BROADCASTS.values())


def test_another_session_id_is_refused_by_every_client() -> None:
    r, bcast = _staged()
    r.clients["c000"].share_keys(copy.deepcopy(bcast))
    other = copy.deepcopy(bcast)
    other["session_id"] = _flip(other["session_id"])
    for c in ("c001", "c002"):
        with pytest.raises(SecAggAbortError) as err:
            r.clients[c].share_keys(copy.deepcopy(other))
        assert err.value.reason == "wrong-session"


def test_the_same_broadcast_under_another_setup_is_derived_anew() -> None:
    r, bcast = _staged()
    r.clients["c000"].share_keys(copy.deepcopy(bcast))
    # Another round's clients (another setup: round 8) given round 7's broadcast.
    setup8, keys8 = make_setup(make_params(7, k=4, t=3, max_dropouts=2), d=8, round=8)
    r8 = Round(setup8, keys8)
    for c in setup8.cohort:
        r8.clients[c].advertise()
    with pytest.raises(SecAggAbortError) as err:
        r8.clients["c001"].share_keys(copy.deepcopy(bcast))
    assert err.value.reason == "wrong-round"
    assert len(client_mod._BROADCASTS) == 1
