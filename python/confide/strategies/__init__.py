"""Aggregation strategies: the :class:`Strategy` protocol and its implementations by name.

``get_strategy("fedavg", server_learning_rate=1.0)`` builds the strategy a job config names
(``[strategy] name``). Every module of this package is a candidate: a class decorated with
:func:`~confide.strategies.base.register` in a new module is found without editing this file.

Examples
--------
>>> from confide.strategies import available_strategies, get_strategy
>>> "fedavg" in available_strategies()
True
>>> get_strategy("fedavg").server_learning_rate
1.0
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

from confide.errors import ConfigError
from confide.strategies.base import (
    REGISTRY,
    Strategy,
    StrategyState,
    Update,
    client_train_options,
    register,
)
from confide.strategies.fedavg import FedAvg
from confide.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from confide.strategies.fedprox import FedProx
from confide.strategies.robust import Median, NormBounding, TrimmedMean

__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Median",
    "NormBounding",
    "Strategy",
    "StrategyState",
    "TrimmedMean",
    "Update",
    "available_strategies",
    "client_train_options",
    "get_strategy",
    "register",
]

_loaded = False


def _load_all() -> None:
    """Import every module of the package once, so each registers its strategies."""
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def available_strategies() -> tuple[str, ...]:
    """Return the registered strategy names, sorted."""
    _load_all()
    return tuple(sorted(REGISTRY))


def get_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy registered as ``name`` with its options.

    Parameters
    ----------
    name : str
        Registry name (``[strategy] name`` of a job config).
    **options
        Keyword options of the strategy's constructor (``server_learning_rate``, ...).

    Returns
    -------
    Strategy
        The strategy.

    Raises
    ------
    ConfigError
        No strategy has that name, or it does not take these options.
    """
    _load_all()
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError(
            f"strategy.name: unknown strategy {name!r}; available: {list(available_strategies())}"
        )
    takes = sorted(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ConfigError(
            f"strategy {name!r} does not take options {unknown}; it takes {takes} "
            "([strategy] keys of the job config)"
        )
    strategy: Strategy = cls(**options)
    return strategy
