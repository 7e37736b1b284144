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

Memory: a plain round of N updates of P parameters does not have to hold N x P floats. A
strategy whose :meth:`Strategy.aggregate` is a function of ``sum(w_i * d_i)`` and
``sum(w_i)`` only (FedAvg, FedProx, the server optimizers, norm bounding) declares
``streaming = True`` in the class that defines ``aggregate``; :func:`aggregate_stream` then
reads the updates one at a time into a float64 :class:`RunningSum` and calls
:meth:`Strategy.aggregate_sum`, which must give the same bits as ``aggregate`` on the list
(tested for every built-in). An optional ``prepare_update(delta) -> float64 vector`` maps each
update before it is summed (norm bounding clips there). A subclass that overrides
``aggregate`` without declaring ``streaming`` again gets the list path: the flag is read from
the class that defines ``aggregate`` (:func:`streams`), so an override is never bypassed.
Median and trimmed mean need every update and keep the list.

State is a JSON-serialisable dict (:data:`StrategyState`): a server optimizer's moments, a
momentum buffer. The engine stores the state returned with a round's new model in the same
SQLite transaction as the model, and hands the state of the last committed round to the
next call, so a restarted server continues with exactly the state it had.

A strategy may also ask the sites for something in their local training: an optional
``client_options()`` method returns keyword fields of the task's
:class:`~confide.protocol.tasks.TrainConfig` (FedProx's ``proximal_mu``, norm bounding's
``update_clip_norm``); :func:`client_train_options` reads it, ``{}`` when absent.

A new strategy is one module in this package that defines a class implementing
:class:`Strategy` and decorates it with :func:`register`; :func:`confide.strategies.get_strategy`
finds it by name (the job config's ``[strategy] name``).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from confide.errors import AggregateError, ConfigError, NonFiniteError, ShapeError

__all__ = [
    "REGISTRY",
    "RunningSum",
    "Strategy",
    "StrategyState",
    "Update",
    "aggregate_stream",
    "check_sum",
    "check_updates",
    "client_train_options",
    "decode_vector",
    "encode_vector",
    "finite_model",
    "number_param",
    "positive_param",
    "register",
    "step_model",
    "streams",
    "sum_mean",
    "weighted_mean",
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


def check_updates(
    base: NDArray[np.float32], updates: Sequence[tuple[NDArray[np.floating[Any]], float]]
) -> None:
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
        _check_update(i, delta, weight, base.shape)


def _check_update(
    i: int, delta: NDArray[np.floating[Any]], weight: float, shape: tuple[int, ...]
) -> None:
    """Refuse update ``i`` unless ``delta`` has ``shape`` and ``weight`` is finite and > 0."""
    if delta.shape != shape:
        raise ShapeError(f"update {i} has shape {delta.shape}, expected {shape}")
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


def step_model(base: NDArray[np.float32], move: NDArray[np.float64]) -> NDArray[np.float32]:
    """Return ``base + move`` computed in float64, as the float32 model, if it is finite.

    Raises
    ------
    NonFiniteError
        The step overflowed or an update carried NaN/Inf.

    Examples
    --------
    >>> import numpy as np
    >>> step_model(np.ones(2, np.float32), np.array([0.5, -1.0])).tolist()
    [1.5, 0.0]
    """
    return finite_model((base.astype(np.float64) + move).astype(np.float32))


def number_param(name: str, value: object) -> float:
    """Return the strategy parameter ``strategy.<name>`` as a float if it is a real number.

    Raises
    ------
    ConfigError
        ``value`` is a bool or not an int or float.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"strategy.{name} must be a number, got {value!r}")
    return float(value)


def positive_param(name: str, value: object) -> float:
    """Return ``strategy.<name>`` as a float if it is a finite number > 0.

    Raises
    ------
    ConfigError
        Not a number, or not finite and > 0.

    Examples
    --------
    >>> positive_param("tau", 1)
    1.0
    >>> positive_param("tau", 0.0)
    Traceback (most recent call last):
    ...
    confide.errors.ConfigError: strategy.tau must be finite and > 0, got 0.0
    """
    v = number_param(name, value)
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"strategy.{name} must be finite and > 0, got {value!r}")
    return v


def check_sum(
    base: NDArray[np.float32], weighted_sum: NDArray[np.floating[Any]], total_weight: float
) -> None:
    """Refuse a summed update of another shape than ``base`` or a total weight that is not > 0.

    Raises
    ------
    ShapeError
        ``weighted_sum`` and ``base`` differ in shape.
    AggregateError
        ``total_weight`` is not finite and > 0.
    """
    if weighted_sum.shape != base.shape:
        raise ShapeError(f"summed update has shape {weighted_sum.shape}, expected {base.shape}")
    if not (math.isfinite(total_weight) and total_weight > 0):
        raise AggregateError(f"the total weight is {total_weight!r}; expected a finite value > 0")


def sum_mean(
    base: NDArray[np.float32], weighted_sum: NDArray[np.floating[Any]], total_weight: float
) -> NDArray[np.float64]:
    """Return ``weighted_sum / total_weight`` in float64, after :func:`check_sum`'s checks.

    Raises
    ------
    ShapeError, AggregateError
        As :func:`check_sum`.
    """
    check_sum(base, weighted_sum, total_weight)
    out: NDArray[np.float64] = weighted_sum.astype(np.float64) / total_weight
    return out


def weighted_mean(
    base: NDArray[np.float32], updates: Sequence[tuple[NDArray[np.floating[Any]], float]]
) -> NDArray[np.float64]:
    """Return ``sum(w_i * d_i) / sum(w_i)`` in float64, summed in the given order.

    The engine gives the updates in a fixed order (sorted by client id), so the same round
    always gives the same bits.

    Examples
    --------
    >>> import numpy as np
    >>> ups = [(np.array([1.0], np.float32), 1.0), (np.array([4.0], np.float32), 3.0)]
    >>> weighted_mean(np.zeros(1, np.float32), ups).tolist()
    [3.25]
    """
    check_updates(base, updates)
    acc = np.zeros(base.shape[0], dtype=np.float64)
    total = 0.0
    for delta, weight in updates:
        acc += weight * delta.astype(np.float64)
        total += weight
    out: NDArray[np.float64] = acc / total
    return out


class RunningSum:
    """``sum(w_i * d_i)`` and ``sum(w_i)`` of updates added one at a time (float64).

    The same additions, in the same order, as :func:`weighted_mean` and FedAvg make over a
    list, so the sum has the same bits; each update is checked as :func:`check_updates` checks
    it (shape of ``base``, weight finite and > 0) before it is added.

    Examples
    --------
    >>> import numpy as np
    >>> acc = RunningSum(np.zeros(1, np.float32))
    >>> acc.add(np.array([1.0], np.float32), 1.0)
    >>> acc.add(np.array([4.0], np.float32), 3.0)
    >>> acc.sum.tolist(), acc.total_weight, acc.count
    ([13.0], 4.0, 2)
    """

    def __init__(self, base: NDArray[np.float32]) -> None:
        self._shape = base.shape
        self.sum: NDArray[np.float64] = np.zeros(base.shape[0], dtype=np.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(
        self,
        delta: NDArray[np.floating[Any]],
        weight: float,
        prepare: Callable[[NDArray[np.floating[Any]]], NDArray[np.float64]] | None = None,
    ) -> None:
        """Check one update, map it with ``prepare`` if given, and add ``weight * delta``.

        Raises
        ------
        ShapeError
            ``delta`` is not of the base model's shape.
        AggregateError
            ``weight`` is not finite and > 0.
        """
        _check_update(self.count, delta, weight, self._shape)
        d = delta if prepare is None else prepare(delta)
        self.sum += weight * d.astype(np.float64)
        self.total_weight += weight
        self.count += 1


def streams(strategy: object) -> bool:
    """Whether ``strategy`` aggregates from a running sum (see the module docstring).

    Read from the class (or instance) that defines ``aggregate``: a subclass that overrides
    it without declaring ``streaming = True`` itself is aggregated from the list.

    Examples
    --------
    >>> from confide.strategies import FedAvg, Median
    >>> streams(FedAvg()), streams(Median())
    (True, False)
    """
    own = getattr(strategy, "__dict__", {})
    if "aggregate" in own:  # replaced on the instance itself
        return own.get("streaming") is True
    for klass in type(strategy).__mro__:
        if "aggregate" in vars(klass):
            return vars(klass).get("streaming") is True
    return False


def aggregate_stream(
    strategy: Strategy,
    base: NDArray[np.float32],
    updates: Iterable[Update],
    state: StrategyState,
) -> tuple[NDArray[np.float32], StrategyState]:
    """Aggregate ``updates`` (any iterable, consumed once), one at a time when possible.

    A streaming strategy (:func:`streams`) never holds more than the running float64 sum and
    the update being added; any other gets the list, as :meth:`Strategy.aggregate` always did.
    Either way the result is the same bits as ``strategy.aggregate(base, list(updates), state)``.

    Raises
    ------
    AggregateError
        No update, or a weight that is not finite and > 0.
    ShapeError
        An update of another shape than ``base``.
    """
    if not streams(strategy):
        return strategy.aggregate(base, list(updates), state)
    prepare = getattr(strategy, "prepare_update", None)
    running = RunningSum(base)
    for delta, weight in updates:
        running.add(delta, weight, prepare)
    if running.count == 0:
        raise AggregateError("a round needs at least one accepted update to aggregate")
    return strategy.aggregate_sum(base, running.sum, running.total_weight, state)


def encode_vector(vector: NDArray[np.floating[Any]]) -> str:
    """Encode a vector for a JSON :data:`StrategyState`: base64 of its little-endian float32 bytes.

    Exact: :func:`decode_vector` gives back the same float32 bits, so a server restarted from
    the stored state continues bit-identically. (float32 halves the state of large models;
    strategies keep their moments in float32 and compute in float64.)

    Examples
    --------
    >>> import numpy as np
    >>> v = np.array([0.1, -2.5, 3e-38], np.float32)
    >>> bool((decode_vector(encode_vector(v), 3) == v).all())
    True
    """
    raw = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return base64.b64encode(raw).decode("ascii")


def decode_vector(text: Any, size: int, what: str = "state vector") -> NDArray[np.float64]:
    """Decode :func:`encode_vector` output of ``size`` float32 values (as float64).

    Raises
    ------
    AggregateError
        Not base64 text of ``size`` finite float32 values (a damaged state).
    """
    try:
        if not isinstance(text, str):
            raise TypeError(type(text).__name__)
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (TypeError, ValueError, binascii.Error) as exc:
        raise AggregateError(
            f"strategy state {what} is not base64 text of float32 values ({exc}); the stored "
            "state is damaged"
        ) from None
    if len(raw) != 4 * size:
        raise AggregateError(
            f"strategy state {what} holds {len(raw) // 4} values, expected {size} (one per "
            "model parameter); the state belongs to another model or is damaged"
        )
    out = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    if not np.isfinite(out).all():
        raise AggregateError(f"strategy state {what} holds NaN or Inf; the state is damaged")
    return out


def client_train_options(strategy: object) -> dict[str, Any]:
    """Return the training-task fields a strategy asks the sites for (``{}`` if none).

    Examples
    --------
    >>> from confide.strategies import FedAvg
    >>> client_train_options(FedAvg())
    {}
    """
    options = getattr(strategy, "client_options", None)
    if not callable(options):
        return {}
    out = options()
    if not isinstance(out, dict):
        raise ConfigError(
            f"{type(strategy).__name__}.client_options() must return a dict, got {out!r}"
        )
    return dict(out)
