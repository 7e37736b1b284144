"""Server optimizers: FedAvgM (Hsu et al. 2019), FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021).

Each round the server forms the weighted mean of the sites' deltas, ``Delta`` (the negative
of the *pseudo-gradient*), exactly as :class:`~confide.strategies.FedAvg` does, and takes an
optimizer step with it instead of adding it:

* FedAvgM: ``m <- beta * m + Delta``; ``w <- w + eta * m``.
* FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2, without bias correction):
  ``m <- beta1 * m + (1 - beta1) * Delta`` and

  - Adagrad: ``v <- v + Delta^2``
  - Adam:    ``v <- beta2 * v + (1 - beta2) * Delta^2``
  - Yogi:    ``v <- v - (1 - beta2) * Delta^2 * sign(v - Delta^2)``

  then ``w <- w + eta * m / (sqrt(v) + tau)``, with ``v`` starting at ``tau^2`` (the paper's
  ``v_{-1} >= tau^2``) and ``m`` at zero.

They only need the mean delta, so they also run where the server only sees the summed update
(SecAgg+, client-level DP): ``secure_compatible = True`` and :meth:`aggregate_sum` divides the
sum by the total weight. The state is ``{"step": t, "m": ..., "v": ...}`` with the moments
encoded by :func:`~confide.strategies.base.encode_vector` (float32 bytes, exact), so a server
restarted from the state stored with the last committed round continues bit-identically.
Arithmetic is float64 on the decoded float32 moments, in a fixed order.
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
    decode_vector,
    encode_vector,
    number_param,
    positive_param,
    register,
    step_model,
    sum_mean,
    weighted_mean,
)

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi"]


def _unit(name: str, value: float) -> float:
    """Check a decay rate in [0, 1)."""
    v = number_param(name, value)
    if not (math.isfinite(v) and 0.0 <= v < 1.0):
        raise ConfigError(f"strategy.{name} must be in [0, 1), got {value!r}")
    return v


class _ServerOptimizer:
    """Shared shape: mean delta (clear or summed) -> :meth:`_update` -> finite float32 model."""

    name: ClassVar[str]
    secure_compatible: ClassVar[bool] = True
    #: Only the mean delta matters: aggregated from a running sum (memory-bounded).
    streaming: ClassVar[bool] = True

    def initial_state(self) -> StrategyState:
        """Step 0 and no moments yet (they are created at the model's size in round 1)."""
        return {"step": 0}

    def aggregate(
        self,
        base: NDArray[np.float32],
        updates: Sequence[Update],
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Step with the weighted mean of the deltas (see the module docstring)."""
        return self._step(base, weighted_mean(base, updates), state)

    def aggregate_sum(
        self,
        base: NDArray[np.float32],
        weighted_sum: NDArray[np.floating[Any]],
        total_weight: float,
        state: StrategyState,
    ) -> tuple[NDArray[np.float32], StrategyState]:
        """Step with ``weighted_sum / total_weight``."""
        return self._step(base, sum_mean(base, weighted_sum, total_weight), state)

    @staticmethod
    def _moments(state: StrategyState) -> tuple[int, dict[str, Any]]:
        step = state.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise AggregateError(f"strategy state step must be an int >= 0, got {step!r}")
        return step, {k: v for k, v in state.items() if k != "step"}

    def _step(
        self, base: NDArray[np.float32], delta: NDArray[np.float64], state: StrategyState
    ) -> tuple[NDArray[np.float32], StrategyState]:
        step, stored = self._moments(state)
        n = base.shape[0]
        moments = {k: decode_vector(stored[k], n, k) for k in self._state_keys if k in stored}
        missing = sorted(set(self._state_keys) - set(moments))
        if step > 0 and missing:
            raise AggregateError(f"strategy state at step {step} lacks {missing}; it is damaged")
        move, new_moments = self._update(delta, moments if step > 0 else None)
        new = step_model(base, move)
        out: StrategyState = {"step": step + 1}
        for key in self._state_keys:
            out[key] = encode_vector(new_moments[key])
        return new, out

    _state_keys: ClassVar[tuple[str, ...]]

    def _update(
        self, delta: NDArray[np.float64], moments: dict[str, NDArray[np.float64]] | None
    ) -> tuple[NDArray[np.float64], dict[str, NDArray[np.float64]]]:
        raise NotImplementedError  # pragma: no cover - every subclass defines it


@register("fedavgm")
class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum (Hsu, Qi and Brown 2019).

    ``m <- momentum * m + Delta``; ``w <- w + eta * m``. With ``momentum = 0`` it is
    :class:`~confide.strategies.FedAvg` with the same ``eta``, bit for bit.

    Parameters
    ----------
    server_learning_rate : float, default 1.0
        ``eta`` (> 0).
    momentum : float, default 0.9
        ``beta`` in [0, 1).

    Examples
    --------
    >>> import numpy as np
    >>> s = FedAvgM(momentum=0.5)
    >>> base = np.zeros(1, np.float32)
    >>> w1, st = s.aggregate(base, [(np.array([1.0], np.float32), 1.0)], s.initial_state())
    >>> w2, st = s.aggregate(w1, [(np.array([1.0], np.float32), 1.0)], st)
    >>> w1.tolist(), w2.tolist(), st["step"]
    ([1.0], [2.5], 2)
    """

    _state_keys: ClassVar[tuple[str, ...]] = ("m",)

    def __init__(self, server_learning_rate: float = 1.0, momentum: float = 0.9) -> None:
        self.server_learning_rate = positive_param("server_learning_rate", server_learning_rate)
        self.momentum = _unit("momentum", momentum)

    def _update(
        self, delta: NDArray[np.float64], moments: dict[str, NDArray[np.float64]] | None
    ) -> tuple[NDArray[np.float64], dict[str, NDArray[np.float64]]]:
        m = delta if moments is None else self.momentum * moments["m"] + delta
        return self.server_learning_rate * m, {"m": m}


class _Adaptive(_ServerOptimizer):
    """FedAdagrad/FedAdam/FedYogi: first moment ``m``, second moment ``v`` (:meth:`_second`)."""

    _state_keys: ClassVar[tuple[str, ...]] = ("m", "v")

    def __init__(
        self,
        server_learning_rate: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.server_learning_rate = positive_param("server_learning_rate", server_learning_rate)
        self.beta1 = _unit("beta1", beta1)
        self.beta2 = _unit("beta2", beta2)
        self.tau = positive_param("tau", tau)

    def _update(
        self, delta: NDArray[np.float64], moments: dict[str, NDArray[np.float64]] | None
    ) -> tuple[NDArray[np.float64], dict[str, NDArray[np.float64]]]:
        if moments is None:
            m_prev = np.zeros_like(delta)
            v_prev = np.full_like(delta, self.tau * self.tau)
        else:
            m_prev, v_prev = moments["m"], moments["v"]
        m = self.beta1 * m_prev + (1.0 - self.beta1) * delta
        v = self._second(v_prev, delta * delta)
        move = self.server_learning_rate * m / (np.sqrt(v) + self.tau)
        return move, {"m": m, "v": v}

    def _second(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        raise NotImplementedError  # pragma: no cover - every subclass defines it


_ADAPTIVE_PARAMS = """
    Parameters
    ----------
    server_learning_rate : float, default 0.1
        ``eta`` (> 0), the server step.
    beta1 : float, default 0.9
        First-moment decay in [0, 1).
    beta2 : float, default 0.99
        Second-moment decay in [0, 1) (unused by FedAdagrad).
    tau : float, default 1e-3
        Adaptivity ``tau`` (> 0); ``v`` starts at ``tau**2``.
"""


@register("fedadagrad")
class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021): ``v <- v + Delta^2``."""

    __doc__ = (__doc__ or "") + "\n" + _ADAPTIVE_PARAMS

    def _second(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        out: NDArray[np.float64] = v + d2
        return out


@register("fedadam")
class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021): ``v <- beta2 v + (1 - beta2) Delta^2``."""

    __doc__ = (__doc__ or "") + "\n" + _ADAPTIVE_PARAMS

    def _second(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        out: NDArray[np.float64] = self.beta2 * v + (1.0 - self.beta2) * d2
        return out


@register("fedyogi")
class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021): ``v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)``."""

    __doc__ = (__doc__ or "") + "\n" + _ADAPTIVE_PARAMS

    def _second(self, v: NDArray[np.float64], d2: NDArray[np.float64]) -> NDArray[np.float64]:
        out: NDArray[np.float64] = v - (1.0 - self.beta2) * d2 * np.sign(v - d2)
        return out
