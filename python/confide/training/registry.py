"""Build the engine a manifest names: a site builds its trainer from the job's manifest alone.

The manifest's ``spec["engine"]`` selects the engine: ``"numpy"`` (:class:`NumpyTrainer`,
always available) or ``"torch"`` (:class:`~confide.training.torch_engine.TorchTrainer`, the
``confide[torch]`` extra; the spec's ``arch`` names the architecture, e.g.
``squeezenet1_1``). Other engines register themselves with :func:`register_engine`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from confide.errors import ConfigError, ManifestError
from confide.protocol.manifest import Manifest
from confide.training.base import Trainer
from confide.training.numpy_engine import NumpyTrainer

__all__ = ["build_trainer", "engines", "register_engine"]

EngineFactory = Callable[..., Trainer]


def _torch(manifest: Manifest, **kwargs: Any) -> Trainer:
    try:
        module = importlib.import_module("confide.training.torch_engine")
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "this job trains a PyTorch model, but torch is not installed: "
            'pip install "confide[torch]"'
        ) from exc
    trainer: Trainer = module.TorchTrainer.from_manifest(manifest, **kwargs)
    return trainer


def _numpy(manifest: Manifest, **kwargs: Any) -> Trainer:
    if kwargs.get("device", "cpu") != "cpu":
        raise ConfigError(f"the numpy engine runs on the CPU only, got device={kwargs['device']!r}")
    return NumpyTrainer.from_manifest(manifest)


_ENGINES: dict[str, EngineFactory] = {"numpy": _numpy, "torch": _torch}


def register_engine(name: str, factory: EngineFactory, *, replace: bool = False) -> None:
    """Make ``spec["engine"] == name`` build trainers with ``factory(manifest, **kwargs)``.

    Parameters
    ----------
    name : str
        The engine name manifests carry.
    factory : callable
        ``factory(manifest, **kwargs) -> Trainer``.
    replace : bool, default False
        Allow replacing an existing engine.
    """
    if name in _ENGINES and not replace:
        raise ConfigError(f"engine {name!r} is already registered (pass replace=True)")
    _ENGINES[name] = factory


def engines() -> list[str]:
    """Return the registered engine names.

    Examples
    --------
    >>> engines()
    ['numpy', 'torch']
    """
    return sorted(_ENGINES)


def build_trainer(manifest: Manifest, **kwargs: Any) -> Trainer:
    """Build the trainer ``manifest.spec["engine"]`` names.

    Parameters
    ----------
    manifest : Manifest
        The job's manifest.
    **kwargs
        Engine options (``device="cuda"`` for torch).

    Returns
    -------
    Trainer
        A trainer whose manifest equals ``manifest``.

    Raises
    ------
    ManifestError
        No or an unknown engine in the spec.
    ConfigError
        The engine's extra is not installed, or an option it does not support.

    Examples
    --------
    >>> m = NumpyTrainer.build_manifest("logistic", n_features=3, n_classes=2)
    >>> type(build_trainer(m)).__name__
    'NumpyTrainer'
    """
    engine = manifest.spec.get("engine")
    if engine not in _ENGINES:
        raise ManifestError(f"the manifest names engine {engine!r}; this client knows {engines()}")
    trainer = _ENGINES[str(engine)](manifest, **kwargs)
    if trainer.manifest.sha256 != manifest.sha256:
        raise ManifestError("the engine built a model whose manifest is not the job's")
    return trainer
