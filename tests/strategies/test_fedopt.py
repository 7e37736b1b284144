"""Server optimizers against hand-computed steps; exact state; reductions; order invariance."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.errors import AggregateError, ConfigError
from confide.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Strategy,
    get_strategy,
)
from confide.strategies.base import decode_vector, encode_vector

OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


def _f32(*values: float) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.array(values, dtype=np.float32)


def _two_rounds(
    s: Strategy, d1: float, d2: float
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], dict[str, Any]]:
    """One site (weight 1), one coordinate, two rounds; the state goes through JSON."""
    base = _f32(0.0)
    w1, st1 = s.aggregate(base, [(_f32(d1), 1.0)], s.initial_state())
    st1 = json.loads(json.dumps(st1))
    w2, st2 = s.aggregate(w1, [(_f32(d2), 1.0)], st1)
    return w1, w2, st2


def test_fedavgm_by_hand() -> None:
    # m1 = 1, w1 = 0.5 * 1; m2 = 0.5 * 1 + 1 = 1.5, w2 = 0.5 + 0.5 * 1.5 = 1.25
    w1, w2, state = _two_rounds(FedAvgM(server_learning_rate=0.5, momentum=0.5), 1.0, 1.0)
    assert w1.tolist() == [0.5]
    assert w2.tolist() == [1.25]
    assert state["step"] == 2
    assert decode_vector(state["m"], 1).tolist() == [1.5]


def test_fedadagrad_by_hand() -> None:
    # tau = 0.3: v0 = 0.09. Round 1, Delta 0.4: m = 0.5*0.4 = 0.2, v = 0.09+0.16 = 0.25,
    # step 0.2 / (0.5 + 0.3) = 0.25. Round 2, Delta 1.2: m = 0.1+0.6 = 0.7, v = 0.25+1.44
    # = 1.69, step 0.7 / (1.3 + 0.3) = 0.4375.
    s = FedAdagrad(server_learning_rate=1.0, beta1=0.5, tau=0.3)
    w1, w2, state = _two_rounds(s, 0.4, 1.2)
    np.testing.assert_allclose(w1, [0.25], rtol=1e-6)
    np.testing.assert_allclose(w2, [0.25 + 0.4375], rtol=1e-6)
    np.testing.assert_allclose(decode_vector(state["v"], 1), [1.69], rtol=1e-6)


def test_fedadam_by_hand() -> None:
    # tau = 0.5: v0 = 0.25; beta1 = beta2 = 0.5. Round 1, Delta 0.5: m = 0.25,
    # v = 0.125 + 0.125 = 0.25, step 0.25 / (0.5 + 0.5) = 0.25. Round 2, Delta 1: m = 0.625,
    # v = 0.125 + 0.5 = 0.625, step 0.625 / (sqrt(0.625) + 0.5).
    s = FedAdam(server_learning_rate=1.0, beta1=0.5, beta2=0.5, tau=0.5)
    w1, w2, state = _two_rounds(s, 0.5, 1.0)
    np.testing.assert_allclose(w1, [0.25], rtol=1e-6)
    np.testing.assert_allclose(w2, [0.25 + 0.625 / (math.sqrt(0.625) + 0.5)], rtol=1e-6)
    np.testing.assert_allclose(decode_vector(state["m"], 1), [0.625], rtol=1e-6)


def test_fedyogi_by_hand_and_differs_from_adam() -> None:
    # tau = 0.5: v0 = 0.25; beta1 = 0.5, beta2 = 0.25. Round 1, Delta 1: sign(0.25 - 1) = -1,
    # v = 0.25 + 0.75 = 1, m = 0.5, step 0.5 / 1.5. Round 2, Delta 0.5: sign(1 - 0.25) = +1,
    # v = 1 - 0.75 * 0.25 = 0.8125 (Adam: v1 = 0.0625 + 0.75 = 0.8125, v2 = 0.203125 + 0.1875
    # = 0.390625: it forgets, Yogi changes v additively), m = 0.5,
    # step 0.5 / (sqrt(0.8125) + 0.5).
    s = FedYogi(server_learning_rate=1.0, beta1=0.5, beta2=0.25, tau=0.5)
    w1, w2, state = _two_rounds(s, 1.0, 0.5)
    np.testing.assert_allclose(w1, [1 / 3], rtol=1e-6)
    np.testing.assert_allclose(w2, [1 / 3 + 0.5 / (math.sqrt(0.8125) + 0.5)], rtol=1e-6)
    np.testing.assert_allclose(decode_vector(state["v"], 1), [0.8125], rtol=1e-6)
    adam = FedAdam(server_learning_rate=1.0, beta1=0.5, beta2=0.25, tau=0.5)
    np.testing.assert_allclose(decode_vector(_two_rounds(adam, 1.0, 0.5)[2]["v"], 1), [0.390625])


def test_weighted_mean_is_the_pseudo_gradient() -> None:
    # (1 * 1 + 3 * 5) / 4 = 4 per coordinate; FedAvgM's first step is eta * mean
    ups = [(_f32(1.0, -1.0), 1.0), (_f32(5.0, -5.0), 3.0)]
    new, _ = FedAvgM(server_learning_rate=0.5).aggregate(_f32(0, 0), ups, {"step": 0})
    assert new.tolist() == [2.0, -2.0]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_aggregate_sum_equals_aggregate(name: str) -> None:
    s = get_strategy(name)
    rng = np.random.default_rng(3)
    base = rng.normal(size=6).astype(np.float32)
    state_a = state_b = s.initial_state()
    for _ in range(3):
        deltas = [rng.normal(size=6).astype(np.float32) for _ in range(3)]
        weights = [2.0, 5.0, 1.0]
        summed = np.zeros(6)
        for d, w in zip(deltas, weights, strict=True):
            summed += w * d.astype(np.float64)
        a, state_a = s.aggregate(base, list(zip(deltas, weights, strict=True)), state_a)
        b, state_b = s.aggregate_sum(base, summed, sum(weights), state_b)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        base = a
    assert s.secure_compatible


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_round_trips_bit_exactly_through_json(name: str) -> None:
    """A restarted server reads the state from SQLite (JSON): same bits, same next model."""
    s = get_strategy(name)
    rng = np.random.default_rng(11)
    base = rng.normal(size=257).astype(np.float32)
    state = s.initial_state()
    for _ in range(2):
        base, state = s.aggregate(base, [(rng.normal(size=257).astype(np.float32), 7.0)], state)
    text = json.dumps(state, sort_keys=True)
    restored = json.loads(text)
    assert restored == state
    nxt = [(rng.normal(size=257).astype(np.float32), 3.0)]
    a, sa = s.aggregate(base, nxt, state)
    b, sb = s.aggregate(base, nxt, restored)
    assert a.tobytes() == b.tobytes()
    assert sa == sb


def test_encode_vector_is_exact_for_every_float32() -> None:
    v = np.array([0.1, -0.0, 1e-45, 3.4028235e38, -2.5, np.pi], np.float32)
    assert decode_vector(encode_vector(v), 6).astype(np.float32).tobytes() == v.tobytes()


def test_damaged_state_is_a_typed_error() -> None:
    s = FedAdam()
    base = _f32(0.0, 0.0)
    _, state = s.aggregate(base, [(_f32(1.0, 1.0), 1.0)], s.initial_state())
    with pytest.raises(AggregateError, match="expected 3"):
        s.aggregate(_f32(0, 0, 0), [(_f32(1, 1, 1), 1.0)], state)
    with pytest.raises(AggregateError, match="base64"):
        s.aggregate(base, [(_f32(1, 1), 1.0)], {**state, "m": "not base64!"})
    with pytest.raises(AggregateError, match="lacks"):
        s.aggregate(base, [(_f32(1, 1), 1.0)], {"step": 3})
    with pytest.raises(AggregateError, match="step"):
        s.aggregate(base, [(_f32(1, 1), 1.0)], {"step": -1})
    nan = encode_vector(np.array([np.nan, 0.0], np.float32))
    with pytest.raises(AggregateError, match="NaN"):
        s.aggregate(base, [(_f32(1, 1), 1.0)], {**state, "v": nan})


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedavgm", {"server_learning_rate": 0.0}, "server_learning_rate"),
        ("fedadam", {"beta1": -0.1}, "beta1"),
        ("fedyogi", {"beta2": 1.5}, "beta2"),
        ("fedadagrad", {"tau": 0.0}, "tau"),
        ("fedadam", {"tau": float("nan")}, "tau"),
        ("fedadam", {"beta1": True}, "beta1"),
        ("fedadam", {"momentum": 0.9}, "does not take"),
    ],
)
def test_bad_options_are_config_errors(name: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_strategy(name, **options)


_values = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def _round(data: st.DataObject, dim: int) -> list[tuple[np.ndarray[Any, Any], float]]:
    n = data.draw(st.integers(1, 5), label="clients")
    return [
        (
            np.array(data.draw(st.lists(_values, min_size=dim, max_size=dim)), np.float32),
            float(data.draw(st.integers(1, 1000))),
        )
        for _ in range(n)
    ]


@settings(max_examples=100, deadline=None)
@given(dim=st.integers(1, 6), lr=st.sampled_from([0.25, 1.0, 2.0]), data=st.data())
def test_fedavgm_without_momentum_is_fedavg_bit_for_bit(
    dim: int, lr: float, data: st.DataObject
) -> None:
    base = np.array(data.draw(st.lists(_values, min_size=dim, max_size=dim)), np.float32)
    avg, avgm = FedAvg(server_learning_rate=lr), FedAvgM(server_learning_rate=lr, momentum=0.0)
    a, b, state = base, base, avgm.initial_state()
    for _ in range(3):
        ups = _round(data, dim)
        a, _ = avg.aggregate(a, ups, {})
        b, state = avgm.aggregate(b, ups, state)
        assert a.tobytes() == b.tobytes()


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(OPTIMIZERS),
    dim=st.integers(1, 6),
    data=st.data(),
)
def test_optimizers_are_permutation_invariant(name: str, dim: int, data: st.DataObject) -> None:
    s = get_strategy(name)
    base = np.array(data.draw(st.lists(_values, min_size=dim, max_size=dim)), np.float32)
    ups = _round(data, dim)
    order = data.draw(st.permutations(range(len(ups))), label="order")
    state = s.initial_state()
    a, sa = s.aggregate(base, ups, state)
    b, sb = s.aggregate(base, [ups[i] for i in order], state)
    # float64 sums in another order differ far below a float32 ulp of the result's scale
    scale = float(np.abs(base).max()) + 2.0 * max(float(np.abs(d).max()) for d, _ in ups) + 1.0
    np.testing.assert_allclose(a, b, rtol=0, atol=2 * float(np.spacing(np.float32(scale))))
    assert sa["step"] == sb["step"] == 1


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(("fedadam", "fedyogi", "fedadagrad")),
    dim=st.integers(1, 6),
    data=st.data(),
)
def test_adaptive_first_step_is_bounded_by_eta(name: str, dim: int, data: st.DataObject) -> None:
    """Round 1: |m| = (1 - beta1)|Delta| and sqrt(v) >= c |Delta|, so each coordinate moves
    by at most eta * (1 - beta1) / c (c = sqrt(1 - beta2), 1 for Adagrad), whatever Delta."""
    s = get_strategy(name)
    base = np.zeros(dim, np.float32)
    new, _ = s.aggregate(base, _round(data, dim), s.initial_state())
    eta, b1 = s.server_learning_rate, s.beta1  # type: ignore[attr-defined]
    c = 1.0 if name == "fedadagrad" else math.sqrt(1.0 - s.beta2)  # type: ignore[attr-defined]
    assert (np.abs(new.astype(np.float64)) <= eta * (1 - b1) / c * (1 + 1e-6)).all()
