"""On-device inference of verified models, and the light on-device learning path.

* :func:`load_model` opens a released model with ONNX Runtime (``confide[onnx]``, the
  default) or LiteRT (``confide[litert]``) behind one :class:`LocalModel` interface that
  validates inputs and raises confide's typed errors.
* :mod:`confide.inference.features` runs a frozen backbone to get per-image features
  (cached) and trains a small head on them with patient-level DP-SGD.

Models reach a device as signed releases: check them with
:func:`confide.protocol.release.verify_release` first, then pass
``expected_sha256=record.model_sha256`` to :func:`load_model` with the same bytes.
"""

from confide.inference.features import FeatureCache, FeatureExtractor, device_dataset, train_head
from confide.inference.model import (
    ENGINES,
    EngineUnavailableError,
    LocalModel,
    ModelFormatError,
    TensorInfo,
    available_engines,
    load_model,
)

__all__ = [
    "ENGINES",
    "EngineUnavailableError",
    "FeatureCache",
    "FeatureExtractor",
    "LocalModel",
    "ModelFormatError",
    "TensorInfo",
    "available_engines",
    "device_dataset",
    "load_model",
    "train_head",
]
