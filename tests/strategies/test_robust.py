"""Median, trimmed mean, norm bounding: hand-computed results, outlier robustness, order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.errors import AggregateError, ConfigError
from confide.strategies import (
    FedAvg,
    Median,
    NormBounding,
    TrimmedMean,
    client_train_options,
    get_strategy,
)


def _f32(*values: float) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.array(values, dtype=np.float32)


def test_median_by_hand_odd_and_even() -> None:
    base = _f32(1.0, 0.0)
    odd = [(_f32(1, -3), 1.0), (_f32(100, 2), 50.0), (_f32(2, 0), 1.0)]
    new, state = Median().aggregate(base, odd, {})
    # per coordinate: median(1, 100, 2) = 2, median(-3, 2, 0) = 0; weights are ignored
    assert new.tolist() == [3.0, 0.0]
    assert state == {}
    even = [*odd, (_f32(4, 10), 1.0)]
    new, _ = Median(server_learning_rate=0.5).aggregate(base, even, {})
    # median(1, 2, 4, 100) = 3, median(-3, 0, 2, 10) = 1; half a step
    assert new.tolist() == [2.5, 0.5]


def test_trimmed_mean_by_hand() -> None:
    base = _f32(0.0, 0.0)
    ups = [(_f32(v, -v), 1.0) for v in (-50.0, 1.0, 2.0, 6.0, 90.0)]
    # k = floor(0.2 * 5) = 1: mean(1, 2, 6) = 3 and mean(-6, -2, -1) = -3
    new, _ = TrimmedMean(trim_fraction=0.2).aggregate(base, ups, {})
    assert new.tolist() == [3.0, -3.0]
    # k = floor(0.1 * 5) = 0: the plain (unweighted) mean, 49 / 5
    new, _ = TrimmedMean(trim_fraction=0.1).aggregate(base, ups, {})
    np.testing.assert_allclose(new, [9.8, -9.8], rtol=1e-6)
    assert TrimmedMean(trim_fraction=0.25).trimmed(8) == 2


def test_norm_bounding_by_hand() -> None:
    base = _f32(0.0, 0.0)
    ups = [(_f32(3.0, 4.0), 1.0), (_f32(0.3, 0.0), 3.0)]
    # [3, 4] has norm 5 -> [0.6, 0.8]; [0.3, 0] is kept; (0.6 + 0.9) / 4, 0.8 / 4
    new, state = NormBounding(max_norm=1.0).aggregate(base, ups, {})
    np.testing.assert_allclose(new, [0.375, 0.2], rtol=1e-6)
    assert state == {}
    # with large enough a bound it is FedAvg bit for bit
    same, _ = NormBounding(max_norm=10.0).aggregate(base, ups, {})
    assert same.tobytes() == FedAvg().aggregate(base, ups, {})[0].tobytes()


def test_norm_bounding_asks_sites_to_clip_and_takes_sums() -> None:
    s = NormBounding(max_norm=0.5)
    assert s.secure_compatible
    assert client_train_options(s) == {"update_clip_norm": 0.5}
    new, _ = s.aggregate_sum(_f32(1.0), np.array([2.0]), 4.0, {})
    assert new.tolist() == [1.5]


@pytest.mark.parametrize("strategy", [Median(), TrimmedMean()])
def test_median_and_trimmed_mean_refuse_sums(strategy: Any) -> None:
    assert not strategy.secure_compatible
    with pytest.raises(AggregateError, match="in the clear"):
        strategy.aggregate_sum(_f32(0.0), np.zeros(1), 1.0, {})


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("trimmed_mean", {"trim_fraction": 0.5}, "trim_fraction"),
        ("trimmed_mean", {"trim_fraction": -0.1}, "trim_fraction"),
        ("trimmed_mean", {"trim_fraction": "0.1"}, "trim_fraction"),
        ("norm_bounding", {"max_norm": 0.0}, "max_norm"),
        ("norm_bounding", {"max_norm": float("inf")}, "max_norm"),
        ("median", {"server_learning_rate": -1.0}, "server_learning_rate"),
        ("median", {"trim_fraction": 0.1}, "does not take"),
    ],
)
def test_bad_options_are_config_errors(name: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_strategy(name, **options)


_values = st.floats(-100, 100, allow_nan=False, width=32)
_outliers = st.floats(allow_nan=False, allow_infinity=False, width=32)  # any finite float32


def _honest(data: st.DataObject, n: int, dim: int) -> list[np.ndarray[Any, Any]]:
    return [
        np.array(data.draw(st.lists(_values, min_size=dim, max_size=dim)), np.float32)
        for _ in range(n)
    ]


@settings(max_examples=150, deadline=None)
@given(
    rule=st.sampled_from(("median", "trimmed_mean")),
    n=st.integers(3, 8),
    dim=st.integers(1, 5),
    data=st.data(),
)
def test_one_arbitrary_outlier_stays_within_the_honest_range(
    rule: str, n: int, dim: int, data: st.DataObject
) -> None:
    """n >= 3 honest sites and one attacker sending anything finite (any weight): every
    coordinate of the step lies within the honest values' range."""
    honest = _honest(data, n, dim)
    outlier = np.array(data.draw(st.lists(_outliers, min_size=dim, max_size=dim)), np.float32)
    at = data.draw(st.integers(0, n), label="outlier position")
    weights = [1.0] * (n + 1)
    weights[at] = float(data.draw(st.integers(1, 10**9), label="claimed weight"))
    deltas = [*honest[:at], outlier, *honest[at:]]
    # trimmed mean: one value dropped per end, k = floor(1.5) = 1 (beta < 0.5 for n + 1 >= 4)
    s = Median() if rule == "median" else TrimmedMean(trim_fraction=1.5 / (n + 1))
    if isinstance(s, TrimmedMean):
        assert s.trimmed(n + 1) == 1
    new, _ = s.aggregate(np.zeros(dim, np.float32), list(zip(deltas, weights, strict=True)), {})
    stack = np.stack(honest)
    assert (new >= stack.min(axis=0)).all()
    assert (new <= stack.max(axis=0)).all()


@settings(max_examples=150, deadline=None)
@given(
    rule=st.sampled_from(("median", "trimmed_mean", "norm_bounding")),
    n=st.integers(1, 7),
    dim=st.integers(1, 5),
    data=st.data(),
)
def test_robust_rules_are_permutation_invariant(
    rule: str, n: int, dim: int, data: st.DataObject
) -> None:
    s = get_strategy(rule, **({"trim_fraction": 0.2} if rule == "trimmed_mean" else {}))
    deltas = _honest(data, n, dim)
    weights = [float(data.draw(st.integers(1, 1000))) for _ in range(n)]
    ups = list(zip(deltas, weights, strict=True))
    order = data.draw(st.permutations(range(n)), label="order")
    base = np.array(data.draw(st.lists(_values, min_size=dim, max_size=dim)), np.float32)
    a, _ = s.aggregate(base, ups, {})
    b, _ = s.aggregate(base, [ups[i] for i in order], {})
    if rule == "norm_bounding":  # a float64 weighted sum: order moves it below a float32 ulp
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * float(np.spacing(np.float32(300))))
    else:  # sorted per coordinate first: exactly the same bits
        assert a.tobytes() == b.tobytes()


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 6), dim=st.integers(1, 6), c=st.floats(0.01, 10), data=st.data())
def test_norm_bounding_moves_at_most_the_bound(
    n: int, dim: int, c: float, data: st.DataObject
) -> None:
    """The step is a convex combination of clipped deltas: its norm is at most eta * C."""
    deltas = _honest(data, n, dim)
    weights = [float(data.draw(st.integers(1, 1000))) for _ in range(n)]
    new, _ = NormBounding(max_norm=c).aggregate(
        np.zeros(dim, np.float32), list(zip(deltas, weights, strict=True)), {}
    )
    assert float(np.linalg.norm(new.astype(np.float64))) <= c * (1 + 1e-6)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_signed_zeros_do_not_make_the_result_order_dependent(rule: str) -> None:
    # Found by the permutation property: -0.0 and 0.0 compare equal, so the sort kept the
    # clients' order and the median's sign bit followed it.
    s = get_strategy(rule, **({"trim_fraction": 0.2} if rule == "trimmed_mean" else {}))
    base = np.zeros(1, np.float32)
    ups = [(np.array([v], np.float32), 1.0) for v in (0.0, -0.0, 0.0, -0.0)]
    a, _ = s.aggregate(base, ups, {})
    b, _ = s.aggregate(base, ups[::-1], {})
    assert a.tobytes() == b.tobytes() == np.zeros(1, np.float32).tobytes()
