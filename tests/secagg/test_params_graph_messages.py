"""Parameters from the threat model, Harary graphs, message encoding."""

from __future__ import annotations

import base64
import math

import pytest

from confide.secagg import (
    ConsistencyRequest,
    InfeasibleConfigError,
    KeyBroadcast,
    MessageFormatError,
    SecAggParams,
    ThreatModel,
    UnmaskRequest,
    UnmaskResponse,
    assess,
    decode,
    derive_params,
    harary_graph,
)
from tests.secagg.driver import Round, make_params, make_setup, wire


def derive(n: int, gamma: float, delta: float, **kw: object) -> SecAggParams:
    return derive_params(
        n, ThreatModel(gamma, delta), quant_bits=16, clip_range=1.0, max_weight=100, **kw
    )  # type: ignore[arg-type]


def test_small_cohort_uses_complete_graph() -> None:
    p = derive(6, 0.2, 0.2)
    assert p.complete
    assert p.t == 5
    assert p.max_dropouts == 1
    assert p.corrupt == 2
    assert 2 * p.t >= p.k + 2 + p.corrupt


@pytest.mark.parametrize(
    ("n", "gamma", "delta"),
    [(1000, 0.05, 0.05), (1000, 0.1, 0.1), (10000, 0.05, 0.05), (200, 0.0, 0.1)],
)
def test_large_cohort_uses_sparse_graph_meeting_bounds(n: int, gamma: float, delta: float) -> None:
    p = derive(n, gamma, delta)
    assert not p.complete
    assert p.k < n / 2
    assert p.log2_privacy_failure <= -40
    assert p.log2_correctness_failure <= -20
    privacy, correctness = assess(n, p.k, p.t, p.corrupt, p.max_dropouts)
    assert (privacy, correctness) == (p.log2_privacy_failure, p.log2_correctness_failure)
    # The next smaller degree (best t) must fail one of the bounds, else k was not minimal.
    k = p.k - 2
    best = [assess(n, k, t, p.corrupt, p.max_dropouts) for t in range((k + 3) // 2, k + 2)]
    assert not any(a <= -40 and b <= -20 for a, b in best)


def test_infeasible_threat_models_are_refused() -> None:
    with pytest.raises(InfeasibleConfigError, match="honest survivors"):
        derive(4, 0.5, 0.25)
    with pytest.raises(InfeasibleConfigError, match="no graph meets"):
        derive(10, 0.4, 0.3)
    with pytest.raises(InfeasibleConfigError, match="no harary graph"):
        derive(5, 0.0, 0.2, graph="harary")
    with pytest.raises(InfeasibleConfigError, match="> 64"):
        derive_params(1000, ThreatModel(0, 0), quant_bits=32, clip_range=1.0, max_weight=2**60)


def test_modulus_never_wraps() -> None:
    p = derive(50, 0.0, 0.1)
    assert 2**p.modulus_bits > 50 * ((1 << 16) - 1)
    assert 2 ** (p.modulus_bits - 1) <= 50 * ((1 << 16) - 1)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"k": 3}, "k must be"),
        ({"t": 2}, "t must"),
        ({"max_dropouts": 6}, "max_dropouts"),
        ({"modulus_bits": 10}, "cannot wrap"),
        ({"quant_bits": 40}, "quant_bits"),
    ],
)
def test_params_validation(kw: dict[str, int], match: str) -> None:
    base = make_params(8, k=4).to_dict()
    base.update(kw)
    with pytest.raises(InfeasibleConfigError, match=match):
        SecAggParams.from_dict(base)


def test_params_round_trip() -> None:
    p = derive(1000, 0.05, 0.05)
    assert SecAggParams.from_dict(p.to_dict()) == p
    c = derive(6, 0.2, 0.2)
    assert c.to_dict()["log2_privacy_failure"] is None
    assert math.isinf(SecAggParams.from_dict(c.to_dict()).log2_privacy_failure)


def test_harary_graph() -> None:
    ids = [f"x{i}" for i in range(20)]
    g = harary_graph(ids, 6, b"seed")
    assert all(len(v) == 6 and k not in v for k, v in g.items())
    assert all(k in g[j] for k, v in g.items() for j in v)  # symmetric
    assert g == harary_graph(list(reversed(ids)), 6, b"seed")
    assert g != harary_graph(ids, 6, b"other")
    assert harary_graph(ids, 19, b"seed")["x0"] == tuple(sorted(set(ids) - {"x0"}))
    with pytest.raises(ValueError, match="even"):
        harary_graph(ids, 5, b"seed")


def test_every_message_round_trips_through_json() -> None:
    setup, keys = make_setup(make_params(4), d=3, consistency=True)
    assert type(setup).from_json(wire(setup)) == setup
    r = Round(setup, keys)
    adv = r.clients["c000"].advertise()
    assert decode(wire(adv)) == adv
    req = UnmaskRequest(
        round=1, session_id=bytes(32), alive=("a", "b"), dead=("c",), signatures=(("a", bytes(64)),)
    )
    assert decode(wire(req)) == req


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(extra=1),
        lambda d: d.pop("survivors"),
        lambda d: d.update(type="UnmaskRequest"),
        lambda d: d.update(session_id="AAAA"),
        lambda d: d.update(session_id="not base64!"),
        lambda d: d.update(survivors=["a", "a"]),
        lambda d: d.update(survivors=["a", "b c"]),
        lambda d: d.update(round=True),
        lambda d: d.update(round=-1),
        lambda d: d.update(survivors="ab"),
    ],
)
def test_strict_decoding(mutate: object) -> None:
    good = wire(ConsistencyRequest(round=1, session_id=bytes(32), survivors=("a", "b")))
    mutate(good)  # type: ignore[operator]
    with pytest.raises(MessageFormatError):
        ConsistencyRequest.from_json(good)


def test_response_cannot_hold_both_kinds_for_one_owner() -> None:
    with pytest.raises(MessageFormatError, match="both kinds"):
        UnmaskResponse(
            round=1,
            client_id="a",
            session_id=bytes(32),
            self_shares=(("b", b"x"),),
            key_shares=(("b", b"y"),),
        )


def test_decoding_runs_the_cross_field_checks() -> None:
    """from_json sets the decoded fields directly (each checked once by its codec) and still
    runs the message's cross-field checks."""
    both = {
        "type": "UnmaskResponse",
        "round": 1,
        "client_id": "a",
        "session_id": base64.b64encode(bytes(32)).decode(),
        "self_shares": {"b": base64.b64encode(b"x").decode()},
        "key_shares": {"b": base64.b64encode(b"y").decode()},
    }
    with pytest.raises(MessageFormatError, match="both kinds"):
        UnmaskResponse.from_json(both)
    setup, _ = make_setup(make_params(4), d=3)
    unsorted = wire(setup)
    unsorted["cohort"] = list(reversed(unsorted["cohort"]))
    with pytest.raises(MessageFormatError, match="cohort must be sorted"):
        type(setup).from_json(unsorted)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a: a.update(client_id="b c"),
        lambda a: a.update(enc_pk=base64.b64encode(bytes(31)).decode()),
        lambda a: a.update(signature="not base64!"),
        lambda a: a.update(round=-1),
    ],
)
def test_a_bad_field_of_a_nested_advertisement_is_refused(mutate: object) -> None:
    setup, keys = make_setup(make_params(4), d=3)
    r = Round(setup, keys)
    assert r.server is not None
    for c in setup.cohort:
        r.server.receive_advertisement(wire(r.clients[c].advertise()))
    bcast = wire(r.server.close_advertise())
    assert KeyBroadcast.from_json(bcast).advertisements[1].client_id == "c001"
    mutate(bcast["advertisements"][1])  # type: ignore[operator]
    with pytest.raises(MessageFormatError):
        KeyBroadcast.from_json(bcast)
