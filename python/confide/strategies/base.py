"""The Strategy protocol: how the server turns a round's accepted updates into the next model.

A strategy sees only what aggregation needs: the round's base model (a flat float32 vector in
the manifest's order), the accepted updates (model deltas ``w_local - w_base``) with their
weights, and its own state. It never sees clients, rounds or privacy parameters: the server
engine (``confide_server.engine``) collects the updates in a fixed order (sorted by client
id) and, with differential privacy, the privacy code clips and noises them first; the
strategy only combines.

Two entry points, one per kind of round:

* :meth:`Strategy.aggregate`: plain rounds, every update in the clear;
* :meth:`Strategy.aggregate_sum`: rounds whose updates are only seen summed (SecAgg+, and
  client-level DP, central or distributed): the already weighted sum ``sum(w_i * d_i)`` and
  the total weight ``sum(w_i)`` (with DP: the noised sum of clipped updates and the round's
  cohort size, a public normaliser). Strategies that need the individual updates (robust
  rules such as the median) set ``secure_compatible = False`` and refuse it.

State is a JSON-serialisable dict (:data:`StrategyState`): a server optimizer's moments, a
momentum buffer. The engine stores the state returned with a round's new model in the same
SQLite transaction as the model, and hands the state of the last committed round to the
next call, so a restarted server continues with exactly the state it had.

A new strategy is one module in this package that defines a class implementing
:class:`Strategy` and decorates it with :func:`register`; :func:`confide.strategies.get_strategy`
finds it by name (the job config's ``[strategy] name``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from confide.errors import AggregateError, ConfigError, NonFiniteError, ShapeError

__all__ = [
    "REGISTRY",
    "Strategy",
    "StrategyState",
    "Update",
    "check_updates",
    "finite_model",
    "register",
]

#: JSON-serialisable strategy state (floats, ints, strings, lists, dicts).
StrategyState = dict[str, Any]
#: One accepted update: the model delta and its weight (for FedAvg, the example count).
Update = tuple[NDArray[np.float32], float]

#: Strategy classes by name, filled by :func:`register` when their module is imported.
REGISTRY: dict[str, type[Strategy]] = {}


@runtime_checkable
class Strategy(Protocol):
    """What the server needs from an aggregation strategy.

    Implementations are constructed from keyword options (the job config's ``[strategy]``
    keys they understand, for instance ``server_learning_rate``) and are stateless objects:
    everything that changes from round to round lives in the :data:`StrategyState` they
    return.
    """

    #: Registry name (``[strategy] name``).
    name: ClassVar[str]
    #: Whether :meth:`aggregate_sum` is supported (secure aggregation, client-level DP).
    secure_compatible: ClassVar[bool]

    def initial_state(self) -> StrategyState:
        """Return the state before the first round."""
        ...

    def aggregate(
        self,
        base: NDArray[np.float32],
        updates: Sequence[Update],
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Combine updates seen in the clear into the next model.

        Parameters
        ----------
        base : numpy.ndarray
            The round's base model (float32, flat).
        updates : sequence of (numpy.ndarray, float)
            The accepted deltas with their weights, in a fixed order.
        state : StrategyState
            The state returned with the base model.

        Returns
        -------
        tuple
            The next model (float32, finite) and the new state.
        """
        ...

    def aggregate_sum(
        self,
        base: NDArray[np.float32],
        weighted_sum: NDArray[np.floating[Any]],
        total_weight: float,
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Turn an already summed weighted delta into the next model.

        Parameters
        ----------
        base : numpy.ndarray
            The round's base model (float32, flat).
        weighted_sum : numpy.ndarray
            ``sum(w_i * d_i)`` (with DP: noised, of clipped updates).
        total_weight : float
            ``sum(w_i)`` (with DP: the round's cohort size).
        state : StrategyState
            The state returned with the base model.

        Returns
        -------
        tuple
            The next model (float32, finite) and the new state.
        """
        ...


_S = TypeVar("_S", bound=type[Any])


def register(name: str) -> Callable[[_S], _S]:
    """Class decorator: register a strategy under ``name`` (its ``name`` attribute too).

    Examples
    --------
    >>> from confide.strategies.base import REGISTRY, register
    >>> @register("doc_example")
    ... class Example:
    ...     secure_compatible = False
    >>> REGISTRY.pop("doc_example").name
    'doc_example'
    """

    def deco(cls: _S) -> _S:
        other = REGISTRY.get(name)
        if other is not None and other is not cls:
            raise ConfigError(f"strategy name {name!r} is taken by {other.__qualname__}")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def check_updates(base: NDArray[np.float32], updates: Sequence[Update]) -> None:
    """Refuse an empty round, updates whose length differs from ``base``, bad weights.

    Raises
    ------
    AggregateError
        No update, or weights that are not finite and > 0.
    ShapeError
        An update of another shape than ``base``.
    """
    if not updates:
        raise AggregateError("a round needs at least one accepted update to aggregate")
    for i, (delta, weight) in enumerate(updates):
        if delta.shape != base.shape:
            raise ShapeError(f"update {i} has shape {delta.shape}, expected {base.shape}")
        if not (np.isfinite(weight) and weight > 0):
            raise AggregateError(f"update {i} has weight {weight!r}; expected a finite value > 0")


def finite_model(new: NDArray[np.float32]) -> NDArray[np.float32]:
    """Return ``new`` if every value is finite.

    Raises
    ------
    NonFiniteError
        The aggregate overflowed or an update carried NaN/Inf.
    """
    if not np.isfinite(new).all():
        raise NonFiniteError("the aggregated model is not finite; refusing to publish it")
    return new
