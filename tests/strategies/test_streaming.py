"""Streaming aggregation: the running sum gives the same bits as the list, for every built-in."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from confide.errors import AggregateError, ShapeError
from confide.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Median,
    NormBounding,
    Strategy,
    StrategyState,
    TrimmedMean,
    Update,
)
from confide.strategies.base import RunningSum, aggregate_stream, streams

STREAMING: list[Strategy] = [
    FedAvg(),
    FedAvg(server_learning_rate=0.7),
    FedProx(mu=0.1),
    FedAvgM(momentum=0.9),
    FedAdam(),
    FedYogi(),
    FedAdagrad(),
    NormBounding(max_norm=0.5),
]


def _rounds(seed: int, dim: int, n: int, rounds: int) -> list[list[Update]]:
    rng = np.random.default_rng(seed)
    return [
        [
            (
                (rng.standard_normal(dim) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32),
                float(rng.integers(1, 10_000)),
            )
            for _ in range(n)
        ]
        for _ in range(rounds)
    ]


def _gen(updates: Sequence[Update], seen: list[int]) -> Iterator[Update]:
    for i, u in enumerate(updates):
        seen.append(i)
        yield u


@pytest.mark.parametrize("strategy", STREAMING, ids=lambda s: type(s).__name__)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dim=st.integers(1, 64),
    n=st.integers(1, 12),
)
def test_running_sum_is_bit_identical_to_the_list(
    strategy: Strategy, seed: int, dim: int, n: int
) -> None:
    assert streams(strategy)
    base = np.random.default_rng(seed ^ 1).standard_normal(dim).astype(np.float32)
    s_list = s_stream = strategy.initial_state()
    w_list = w_stream = base
    for updates in _rounds(seed, dim, n, rounds=3):  # three rounds: optimizer moments too
        w_list, s_list = strategy.aggregate(w_list, updates, s_list)
        w_stream, s_stream = aggregate_stream(strategy, w_stream, _gen(updates, []), s_stream)
        assert w_stream.dtype == np.float32
        assert w_stream.tobytes() == w_list.tobytes()
        assert s_stream == s_list


@pytest.mark.parametrize("strategy", [Median(), TrimmedMean(trim_fraction=0.2)])
def test_strategies_that_need_every_update_keep_the_list(strategy: Strategy) -> None:
    assert not streams(strategy)
    base = np.zeros(8, np.float32)
    updates = _rounds(3, 8, 7, 1)[0]
    got, _ = aggregate_stream(strategy, base, iter(updates), strategy.initial_state())
    want, _ = strategy.aggregate(base, updates, strategy.initial_state())
    assert got.tobytes() == want.tobytes()


class _Recording(FedAvg):
    """A FedAvg subclass that overrides aggregate without redeclaring streaming (test)."""

    name: ClassVar[str] = "recording_avg"
    seen: ClassVar[list[int]] = []

    def aggregate(
        self, base: NDArray[np.float32], updates: Sequence[Update], state: StrategyState
    ) -> tuple[NDArray[np.float32], StrategyState]:
        self.seen.append(len(updates))
        return super().aggregate(base, updates, state)


def test_an_override_of_aggregate_is_never_bypassed() -> None:
    _Recording.seen = []
    strategy = _Recording()
    assert not streams(strategy)
    base = np.zeros(3, np.float32)
    aggregate_stream(strategy, base, iter(_rounds(0, 3, 4, 1)[0]), {})
    assert _Recording.seen == [4]

    class Declared(_Recording):
        streaming: ClassVar[bool] = True

        def aggregate(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - bypassed
            raise AssertionError("the streaming path calls aggregate_sum")

    assert streams(Declared())
    new, _ = aggregate_stream(Declared(), base, iter(_rounds(0, 3, 4, 1)[0]), {})
    assert new.shape == (3,)


def test_updates_are_consumed_one_at_a_time() -> None:
    """The running sum never asks for update i+1 before update i was added."""
    seen: list[int] = []
    added: list[int] = []

    class Probe(NormBounding):
        def prepare_update(self, delta: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
            added.append(len(seen))  # how many updates were read when this one is added
            return super().prepare_update(delta)

    updates = _rounds(5, 4, 6, 1)[0]
    aggregate_stream(Probe(max_norm=1.0), np.zeros(4, np.float32), _gen(updates, seen), {})
    assert added == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("strategy", STREAMING[:1] + STREAMING[3:4], ids=["FedAvg", "FedAvgM"])
def test_errors_are_those_of_the_list_path(strategy: Strategy) -> None:
    base = np.zeros(3, np.float32)
    good = (np.ones(3, np.float32), 1.0)
    cases: list[tuple[list[Update], type[Exception], str]] = [
        ([], AggregateError, "at least one accepted update"),
        ([good, (np.ones(4, np.float32), 1.0)], ShapeError, r"update 1 has shape \(4,\)"),
        ([good, good, (np.ones(3, np.float32), 0.0)], AggregateError, "update 2 has weight 0.0"),
        ([(np.ones(3, np.float32), float("nan"))], AggregateError, "update 0 has weight nan"),
    ]
    for updates, exc, match in cases:
        with pytest.raises(exc, match=match):
            strategy.aggregate(base, updates, strategy.initial_state())
        with pytest.raises(exc, match=match):
            aggregate_stream(strategy, base, iter(updates), strategy.initial_state())


def test_running_sum_known_answer() -> None:
    acc = RunningSum(np.zeros(2, np.float32))
    acc.add(np.array([1.0, -2.0], np.float32), 2.0)
    acc.add(np.array([0.5, 4.0], np.float32), 4.0)
    assert acc.sum.tolist() == [4.0, 12.0]
    assert (acc.total_weight, acc.count) == (6.0, 2)
