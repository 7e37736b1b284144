"""confide: federated learning for healthcare you can trust.

Raw data never leaves the site, the server never sees an individual update (secure
aggregation), and the released model carries a differential-privacy guarantee. This package
is the client SDK; its hot and security-critical kernels (clipping, secure noise, masking,
secret sharing) live in a Rust core, ``confide._core``, which user code never imports
directly.

``confide.Client`` (the HTTP site client, which needs aiohttp) is imported on first use, so
a device that only runs inference or local training does not load the HTTP stack.
"""

import importlib
from typing import TYPE_CHECKING, Any

from confide._core import __version__
from confide.clip import clip_l2, clip_rows, l2_norm
from confide.data import Dataset, load_breast_cancer, load_csv, partition_dirichlet, partition_iid
from confide.errors import (
    AggregateError,
    ArrayTypeError,
    BudgetExceeded,
    ConfideError,
    ConfigError,
    DataError,
    DeviceError,
    ExportError,
    FederationError,
    IntegrityError,
    InvalidArgumentError,
    InvalidPrivacyConfig,
    ManifestError,
    NonFiniteError,
    PrivacyError,
    PrivacyUnsupportedError,
    RandomSourceError,
    ReleaseError,
    SecAggAbortError,
    SecAggError,
    ServerError,
    ShapeError,
    ShareError,
    SignatureError,
    TransportError,
    WireFormatError,
)
from confide.inference import LocalModel, load_model
from confide.noise import (
    SecureRng,
    add_gaussian_noise,
    add_laplace_noise,
    discrete_gaussian,
    gaussian,
    laplace,
)
from confide.protocol.manifest import Manifest
from confide.protocol.release import DevicePolicy, DPGuarantee, ReleaseRecord, verify_release
from confide.protocol.signing import Identity
from confide.secagg import (
    MaskDomain,
    apply_masks,
    dequantize,
    expand_mask,
    pack_bits,
    quantize,
    unpack_bits,
)
from confide.shamir import combine_shares, split_secret
from confide.training import (
    DPSGDConfig,
    FitResult,
    NumpyTrainer,
    PerSampleTrainer,
    SiteData,
    TrainConfig,
    Trainer,
)

__all__ = [
    "AggregateError",
    "ArrayTypeError",
    "BudgetExceeded",
    "Client",
    "ClientResult",
    "ConfideError",
    "ConfigError",
    "DPGuarantee",
    "DPSGDConfig",
    "DataError",
    "Dataset",
    "DeviceError",
    "DevicePolicy",
    "ExportError",
    "FederationError",
    "FitResult",
    "Identity",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidPrivacyConfig",
    "LocalModel",
    "Manifest",
    "ManifestError",
    "MaskDomain",
    "NonFiniteError",
    "NumpyTrainer",
    "PerSampleTrainer",
    "PrivacyError",
    "PrivacyUnsupportedError",
    "RandomSourceError",
    "ReleaseError",
    "ReleaseRecord",
    "SecAggAbortError",
    "SecAggError",
    "SecureRng",
    "ServerError",
    "ShapeError",
    "ShareError",
    "SignatureError",
    "SiteData",
    "TrainConfig",
    "Trainer",
    "TransportError",
    "WireFormatError",
    "__version__",
    "add_gaussian_noise",
    "add_laplace_noise",
    "apply_masks",
    "clip_l2",
    "clip_rows",
    "combine_shares",
    "dequantize",
    "discrete_gaussian",
    "expand_mask",
    "gaussian",
    "l2_norm",
    "laplace",
    "load_breast_cancer",
    "load_csv",
    "load_model",
    "pack_bits",
    "partition_dirichlet",
    "partition_iid",
    "quantize",
    "split_secret",
    "unpack_bits",
    "verify_release",
]


if TYPE_CHECKING:
    from confide.client import Client, ClientResult


def __getattr__(name: str) -> Any:
    # Lazy: the client pulls in aiohttp; inference-only devices never pay for it.
    if name in ("Client", "ClientResult"):
        return getattr(importlib.import_module("confide.client"), name)
    raise AttributeError(f"module 'confide' has no attribute {name!r}")
