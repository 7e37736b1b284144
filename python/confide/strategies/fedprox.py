"""FedProx (Li et al. 2020): FedAvg on the server, a proximal term in every site's training.

Each site minimises ``F_k(w) + mu/2 ||w - w_global||^2`` locally instead of ``F_k(w)``: the
term pulls the local solution towards the round's global model, which limits client drift
on heterogeneous (non-IID) sites. The server side is plain weighted FedAvg; the strategy only
adds ``proximal_mu`` to the training task (:meth:`FedProx.client_options`), which the numpy and
torch engines and DP-SGD honour (see ``docs/strategies.md``). ``mu = 0`` is FedAvg exactly.
"""

from __future__ import annotations

import math
from typing import Any

from confide.errors import ConfigError
from confide.strategies.base import register
from confide.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


@register("fedprox")
class FedProx(FedAvg):
    """Weighted FedAvg whose training tasks ask for the proximal term ``mu``.

    Parameters
    ----------
    mu : float, default 0.01
        Proximal coefficient (finite, >= 0); 0 is FedAvg.
    server_learning_rate : float, default 1.0
        ``eta`` (> 0), as for FedAvg.

    Examples
    --------
    >>> FedProx(mu=0.1).client_options()
    {'proximal_mu': 0.1}
    """

    def __init__(self, mu: float = 0.01, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate)
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu):
            raise ConfigError(f"strategy.mu must be a finite number >= 0, got {mu!r}")
        if mu < 0:
            raise ConfigError(f"strategy.mu must be >= 0 (the proximal coefficient), got {mu!r}")
        self.mu = float(mu)

    def client_options(self) -> dict[str, Any]:
        """Ask every site for the proximal term ``mu/2 ||w - w_global||^2``."""
        return {"proximal_mu": self.mu}
