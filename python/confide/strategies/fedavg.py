"""Weighted FedAvg (McMahan et al. 2017) with a server learning rate.

``w' = w + eta * sum(n_i * d_i) / sum(n_i)``: the weighted mean of the deltas, scaled by the
server learning rate ``eta`` (1 is plain FedAvg). Accumulation is in float64, in the order
the updates are given (the engine sorts them by client id), so the same inputs always give
bit-identical models. Stateless: the state stays ``{}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from confide.strategies.base import (
    StrategyState,
    Update,
    positive_param,
    register,
    step_model,
    sum_mean,
    weighted_mean,
)

__all__ = ["FedAvg"]


@register("fedavg")
class FedAvg:
    """Weighted federated averaging.

    Parameters
    ----------
    server_learning_rate : float, default 1.0
        ``eta`` (> 0), the step the server takes along the mean delta.

    Examples
    --------
    >>> import numpy as np
    >>> base = np.zeros(2, np.float32)
    >>> ups = [(np.array([1.0, 0.0], np.float32), 1.0), (np.array([0.0, 3.0], np.float32), 3.0)]
    >>> new, state = FedAvg().aggregate(base, ups, {})
    >>> new.tolist(), state
    ([0.25, 2.25], {})
    """

    name: ClassVar[str]
    secure_compatible: ClassVar[bool] = True
    #: ``aggregate`` equals ``aggregate_sum`` of the running sum: memory-bounded rounds.
    streaming: ClassVar[bool] = True

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = positive_param("server_learning_rate", server_learning_rate)

    def initial_state(self) -> StrategyState:
        """FedAvg keeps no state."""
        return {}

    def aggregate(
        self,
        base: NDArray[np.float32],
        updates: Sequence[Update],
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Return ``base + eta * (weighted mean of the deltas)`` (see the module docstring)."""
        # weighted_mean sums in the caller's fixed order: the sum is reproducible.
        return self._step(base, weighted_mean(base, updates)), {}

    def aggregate_sum(
        self,
        base: NDArray[np.float32],
        weighted_sum: NDArray[np.floating[Any]],
        total_weight: float,
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Return ``base + eta * weighted_sum / total_weight``."""
        return self._step(base, sum_mean(base, weighted_sum, total_weight)), {}

    def _step(self, base: NDArray[np.float32], mean: NDArray[np.float64]) -> NDArray[np.float32]:
        return step_model(base, self.server_learning_rate * mean)
