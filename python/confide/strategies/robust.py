"""Robust aggregation: coordinate-wise median, trimmed mean, norm bounding.

* :class:`Median` (Yin et al. 2018): each coordinate of the step is the median of the
  sites' deltas at that coordinate. Weights (example counts) are ignored on purpose: a
  weighted median would let one site that claims many examples decide alone.
* :class:`TrimmedMean` (Yin et al. 2018): per coordinate, drop the ``k = floor(trim_fraction
  * n)`` largest and ``k`` smallest values and average the rest (unweighted, same reason).
  One arbitrary outlier cannot move the result outside the range of the honest values when
  ``k >= 1``.
* :class:`NormBounding` (Sun et al. 2019, "Can you really backdoor federated learning?"):
  each delta is scaled down to L2 norm at most ``max_norm`` before the weighted FedAvg mean.

Median and trimmed mean need every update in the clear: ``secure_compatible = False``, and
the job config refuses them with ``[secagg] enabled = true`` or a client-level DP mode
(``central``, ``distributed``), whose server only ever sees sums. Norm bounding works under
SecAgg+ too: it asks every site to clip its own delta before masking (the training task's
``update_clip_norm``, :func:`~confide.strategies.base.client_train_options`); in the clear the
server also clips what it sees, under secure aggregation it cannot check the sites' clipping
(a site that ignores the task is bounded only by SecAgg+'s ``clip_range`` per element).

All three are stateless (state ``{}``) and invariant to the order of the updates: median
and trimmed mean bit for bit (they sort each coordinate first), norm bounding up to float64
rounding of the sum, like FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from confide.errors import AggregateError, ConfigError
from confide.strategies.base import (
    StrategyState,
    Update,
    check_updates,
    number_param,
    positive_param,
    register,
    step_model,
    sum_mean,
    weighted_mean,
)

__all__ = ["Median", "NormBounding", "TrimmedMean"]


def _sorted_stack(base: NDArray[np.float32], updates: Sequence[Update]) -> NDArray[np.float64]:
    """``(n, dim)`` float64 deltas sorted along the client axis (order-free from here on)."""
    check_updates(base, updates)
    # "+ 0.0" turns -0.0 into +0.0: the two compare equal, so their order after the sort
    # (and the sign of a median of zeros) would otherwise depend on the clients' order.
    stack = np.stack([d.astype(np.float64) for d, _ in updates]) + 0.0
    out: NDArray[np.float64] = np.sort(stack, axis=0)
    return out


class _ClearOnly:
    """Robust rules that need the individual updates: no summed-update entry point."""

    name: ClassVar[str]
    secure_compatible: ClassVar[bool] = False

    def initial_state(self) -> StrategyState:
        """Stateless."""
        return {}

    def aggregate_sum(
        self,
        base: NDArray[np.float32],
        weighted_sum: NDArray[np.floating[Any]],
        total_weight: float,
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Refused: a median or trimmed mean of a sum does not exist."""
        raise AggregateError(
            f"strategy {self.name!r} needs every update in the clear; it cannot aggregate a "
            "sum (secure aggregation or client-level DP). Use fedavg, a server optimizer or "
            "norm_bounding there"
        )


@register("median")
class Median(_ClearOnly):
    """Coordinate-wise median of the deltas (unweighted).

    Parameters
    ----------
    server_learning_rate : float, default 1.0
        ``eta`` (> 0): ``w' = w + eta * median``.

    Examples
    --------
    >>> import numpy as np
    >>> ups = [(np.array([v], np.float32), 1.0) for v in (1.0, 2.0, 100.0)]
    >>> Median().aggregate(np.zeros(1, np.float32), ups, {})[0].tolist()
    [2.0]
    """

    def __init__(self, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = positive_param("server_learning_rate", server_learning_rate)

    def aggregate(
        self,
        base: NDArray[np.float32],
        updates: Sequence[Update],
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Return ``base + eta * median`` (the mean of the two middle values for even ``n``)."""
        s = _sorted_stack(base, updates)
        n = s.shape[0]
        mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0
        return step_model(base, self.server_learning_rate * mid), {}


@register("trimmed_mean")
class TrimmedMean(_ClearOnly):
    """Coordinate-wise trimmed mean of the deltas (unweighted).

    Parameters
    ----------
    trim_fraction : float, default 0.1
        ``beta`` in [0, 0.5): ``k = floor(beta * n)`` values are dropped at each end of every
        coordinate (``n`` = updates in the round). A round where ``n - 2k < 1`` is refused.
    server_learning_rate : float, default 1.0
        ``eta`` (> 0).

    Examples
    --------
    >>> import numpy as np
    >>> ups = [(np.array([v], np.float32), 1.0) for v in (-50.0, 1.0, 2.0, 3.0, 90.0)]
    >>> TrimmedMean(trim_fraction=0.2).aggregate(np.zeros(1, np.float32), ups, {})[0].tolist()
    [2.0]
    """

    def __init__(self, trim_fraction: float = 0.1, server_learning_rate: float = 1.0) -> None:
        fraction = number_param("trim_fraction", trim_fraction)
        if not (math.isfinite(fraction) and 0.0 <= fraction < 0.5):
            raise ConfigError(
                f"strategy.trim_fraction must be in [0, 0.5) (the share dropped at each end), "
                f"got {trim_fraction!r}"
            )
        self.trim_fraction = fraction
        self.server_learning_rate = positive_param("server_learning_rate", server_learning_rate)

    def trimmed(self, n: int) -> int:
        """Values dropped at each end of a coordinate when ``n`` updates arrived."""
        return math.floor(self.trim_fraction * n)

    def aggregate(
        self,
        base: NDArray[np.float32],
        updates: Sequence[Update],
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Return ``base + eta * trimmed mean``."""
        s = _sorted_stack(base, updates)
        n = s.shape[0]
        k = self.trimmed(n)
        if n - 2 * k < 1:  # pragma: no cover - trim_fraction < 0.5 keeps one value
            raise AggregateError(f"trimmed mean of {n} updates with k={k} keeps nothing")
        kept = s[k : n - k]
        return step_model(base, self.server_learning_rate * kept.mean(axis=0)), {}


@register("norm_bounding")
class NormBounding:
    """Weighted FedAvg of deltas clipped to L2 norm ``max_norm``; works with SecAgg+.

    Parameters
    ----------
    max_norm : float
        ``C`` (> 0): a delta ``d`` counts as ``d * min(1, C / ||d||)``. Sent to the sites as
        the task's ``update_clip_norm`` so they clip before masking.
    server_learning_rate : float, default 1.0
        ``eta`` (> 0).

    Examples
    --------
    >>> import numpy as np
    >>> ups = [(np.array([3.0, 4.0], np.float32), 1.0), (np.array([0.5, 0.0], np.float32), 1.0)]
    >>> NormBounding(max_norm=1.0).aggregate(np.zeros(2, np.float32), ups, {})[0].tolist()
    [0.550000011920929, 0.4000000059604645]
    """

    name: ClassVar[str]
    secure_compatible: ClassVar[bool] = True
    #: Clip-then-sum: aggregated from a running sum, each delta clipped by :meth:`prepare_update`.
    streaming: ClassVar[bool] = True

    def __init__(self, max_norm: float = 1.0, server_learning_rate: float = 1.0) -> None:
        self.max_norm = positive_param("max_norm", max_norm)
        self.server_learning_rate = positive_param("server_learning_rate", server_learning_rate)

    def initial_state(self) -> StrategyState:
        """Stateless."""
        return {}

    def client_options(self) -> dict[str, Any]:
        """Ask every site to clip its delta to ``max_norm`` (before masking under SecAgg+)."""
        return {"update_clip_norm": self.max_norm}

    def clip(self, delta: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        """Return ``delta * min(1, max_norm / ||delta||)`` in float64."""
        d = delta.astype(np.float64)
        norm = float(np.sqrt(np.dot(d, d)))
        out: NDArray[np.float64] = d * (self.max_norm / norm) if norm > self.max_norm else d
        return out

    def prepare_update(self, delta: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        """Clip one delta before the running sum adds it (as :meth:`aggregate` clips)."""
        return self.clip(delta)

    def aggregate(
        self,
        base: NDArray[np.float32],
        updates: Sequence[Update],
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Clip each delta the server sees, then the weighted mean step."""
        check_updates(base, updates)
        clipped = [(self.clip(d), w) for d, w in updates]
        mean = weighted_mean(base, clipped)
        return step_model(base, self.server_learning_rate * mean), {}

    def aggregate_sum(
        self,
        base: NDArray[np.float32],
        weighted_sum: NDArray[np.floating[Any]],
        total_weight: float,
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Step with ``weighted_sum / total_weight`` (the sites clipped before masking)."""
        mean = sum_mean(base, weighted_sum, total_weight)
        return step_model(base, self.server_learning_rate * mean), {}
