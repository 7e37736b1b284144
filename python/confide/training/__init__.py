"""Training engines behind one contract (:mod:`confide.training.base`).

* :class:`NumpyTrainer` -- logistic/softmax regression and small MLPs in numpy, with exact
  per-sample gradients; the default on patient devices and for heads on frozen backbones.

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

__all__ = [
    "DPSGDConfig",
    "FitResult",
    "NumpyTrainer",
    "PerSampleTrainer",
    "SiteData",
    "TrainConfig",
    "Trainer",
]
