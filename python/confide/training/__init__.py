"""Training engines behind one contract (:mod:`confide.training.base`).

* :class:`NumpyTrainer` -- logistic/softmax regression and small MLPs in numpy, with exact
  per-sample gradients; the default on patient devices and for heads on frozen backbones.
* :class:`~confide.training.torch_engine.TorchTrainer` -- any ``nn.Module`` (SqueezeNet 1.1
  ships in :mod:`~confide.training.torch_models`), CPU or CUDA, per-sample gradients with
  ``torch.func``; the ``confide[torch]`` extra (imported only when used).
* :func:`build_trainer` -- the engine a manifest names (what a site client calls).

An engine implements :class:`Trainer`; one that gives per-sample gradients implements
:class:`PerSampleTrainer` and can run patient-level DP-SGD through
:func:`confide.privacy.run_dpsgd`.
"""

from confide.training.base import (
    DPSGDConfig,
    FitResult,
    PerSampleTrainer,
    SiteData,
    TrainConfig,
    Trainer,
)
from confide.training.numpy_engine import NumpyTrainer
from confide.training.registry import build_trainer, engines, register_engine

__all__ = [
    "DPSGDConfig",
    "FitResult",
    "NumpyTrainer",
    "PerSampleTrainer",
    "SiteData",
    "TrainConfig",
    "Trainer",
    "build_trainer",
    "engines",
    "register_engine",
]
