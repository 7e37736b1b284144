"""FedAvg against hand-computed results, the registry, and permutation invariance."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.errors import AggregateError, ConfigError, NonFiniteError, ShapeError
from confide.strategies import FedAvg, Strategy, available_strategies, get_strategy


def _f32(*values: float) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.array(values, dtype=np.float32)


def test_weighted_mean_by_hand() -> None:
    base = _f32(1.0, 2.0, 3.0)
    updates = [(_f32(1.0, 0.0, -1.0), 1.0), (_f32(0.0, 4.0, 1.0), 3.0)]
    new, state = FedAvg().aggregate(base, updates, {})
    # (1*[1,0,-1] + 3*[0,4,1]) / 4 = [0.25, 3.0, 0.5]
    np.testing.assert_array_equal(new, _f32(1.25, 5.0, 3.5))
    assert new.dtype == np.float32
    assert state == {}


def test_server_learning_rate_scales_the_step() -> None:
    base = _f32(0.0, 10.0)
    updates = [(_f32(2.0, -2.0), 5.0), (_f32(4.0, 2.0), 5.0)]
    new, _ = FedAvg(server_learning_rate=0.5).aggregate(base, updates, {})
    # mean delta [3, 0], half a step
    np.testing.assert_array_equal(new, _f32(1.5, 10.0))


def test_aggregate_sum_equals_aggregate_of_the_same_updates() -> None:
    base = _f32(0.5, -0.5, 0.0, 2.0)
    deltas = [_f32(1, 2, 3, 4), _f32(-1, 0, 1, 0), _f32(0.5, 0.5, 0.5, 0.5)]
    weights = [2.0, 1.0, 5.0]
    summed = sum(w * d.astype(np.float64) for d, w in zip(deltas, weights, strict=True))
    assert isinstance(summed, np.ndarray)
    strategy = FedAvg(server_learning_rate=0.7)
    plain, _ = strategy.aggregate(base, list(zip(deltas, weights, strict=True)), {})
    secure, state = strategy.aggregate_sum(base, summed, sum(weights), {})
    np.testing.assert_array_equal(plain, secure)
    assert state == {}
    # by hand: (2*[1,2,3,4] + [-1,0,1,0] + 5*[.5,.5,.5,.5]) / 8 = [.4375,.8125,1.1875,1.3125]
    np.testing.assert_allclose(plain, base + 0.7 * _f32(0.4375, 0.8125, 1.1875, 1.3125), 1e-6)


def test_bad_inputs_are_refused_with_typed_errors() -> None:
    base = _f32(0.0, 0.0)
    with pytest.raises(AggregateError, match="at least one"):
        FedAvg().aggregate(base, [], {})
    with pytest.raises(ShapeError, match=r"shape \(3,\)"):
        FedAvg().aggregate(base, [(_f32(1, 2, 3), 1.0)], {})
    with pytest.raises(AggregateError, match="weight"):
        FedAvg().aggregate(base, [(_f32(1, 2), 0.0)], {})
    with pytest.raises(AggregateError, match="total weight"):
        FedAvg().aggregate_sum(base, _f32(1, 2), 0.0, {})
    with pytest.raises(NonFiniteError, match="not finite"):
        FedAvg().aggregate(base, [(_f32(np.inf, 0), 1.0)], {})
    with pytest.raises(ConfigError, match="server_learning_rate"):
        FedAvg(server_learning_rate=0.0)
    # The same parameter check as every other strategy's (base.positive_param): a string or
    # a bool from a job config is a ConfigError, not a TypeError from math.
    for bad in ("1.0", True):
        with pytest.raises(ConfigError, match="server_learning_rate must be a number"):
            FedAvg(server_learning_rate=bad)  # type: ignore[arg-type]


def test_registry_selects_by_name_and_state_is_json() -> None:
    assert "fedavg" in available_strategies()
    strategy = get_strategy("fedavg", server_learning_rate=2.0)
    assert isinstance(strategy, Strategy)
    assert isinstance(strategy, FedAvg)
    assert strategy.name == "fedavg"
    assert strategy.secure_compatible
    assert json.loads(json.dumps(strategy.initial_state())) == strategy.initial_state()
    with pytest.raises(ConfigError, match=r"unknown strategy 'krum'.*fedavg"):
        get_strategy("krum")
    with pytest.raises(ConfigError, match="does not take options"):
        get_strategy("fedavg", momentum=0.9)


_values = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    dim=st.integers(1, 8),
    data=st.data(),
)
def test_permutation_invariance(dim: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 6), label="clients")
    deltas = [
        np.array(data.draw(st.lists(_values, min_size=dim, max_size=dim)), np.float32)
        for _ in range(n)
    ]
    weights = [float(data.draw(st.integers(1, 10_000))) for _ in range(n)]
    base = np.array(data.draw(st.lists(_values, min_size=dim, max_size=dim)), np.float32)
    order = data.draw(st.permutations(range(n)), label="order")
    strategy = FedAvg(server_learning_rate=data.draw(st.sampled_from([0.5, 1.0, 1.5])))
    updates = list(zip(deltas, weights, strict=True))
    a, _ = strategy.aggregate(base, updates, {})
    b, _ = strategy.aggregate(base, [updates[i] for i in order], {})
    # float64 accumulation: the order changes the sum by far less than one float32 ulp of
    # the result's scale, so both round to (almost always) the same float32
    scale = np.abs(base).max() + 1.5 * max(np.abs(d).max() for d in deltas) + 1.0
    np.testing.assert_allclose(a, b, rtol=0, atol=float(np.spacing(np.float32(scale))))
    # and the result lies in the convex hull of base + lr * delta_i per coordinate
    lr = strategy.server_learning_rate
    stacked = base.astype(np.float64) + lr * np.stack(deltas).astype(np.float64)
    tol = np.spacing(np.float32(scale)) * 2
    assert (a >= stacked.min(axis=0) - tol).all()
    assert (a <= stacked.max(axis=0) + tol).all()
