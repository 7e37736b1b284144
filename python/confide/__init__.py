"""confide: federated learning for healthcare you can trust.

Raw data never leaves the site, the server never sees an individual update (secure
aggregation), and the released model carries a differential-privacy guarantee. This package
is the client SDK; its hot and security-critical kernels (clipping, secure noise, masking,
secret sharing) live in a Rust core, ``confide._core``, which user code never imports
directly.
"""

from confide._core import __version__
from confide.client import Client, ClientResult
from confide.clip import clip_l2, clip_rows, l2_norm
from confide.data import Dataset, load_breast_cancer, load_csv, partition_dirichlet, partition_iid
from confide.errors import (
    AggregateError,
    ArrayTypeError,
    ConfideError,
    InvalidArgumentError,
    NonFiniteError,
    RandomSourceError,
    ShapeError,
    ShareError,
)
from confide.federation_errors import (
    ConfigError,
    FederationError,
    IntegrityError,
    ManifestError,
    ServerError,
    SignatureError,
    TransportError,
    WireFormatError,
)
from confide.manifest import Manifest
from confide.noise import (
    SecureRng,
    add_gaussian_noise,
    add_laplace_noise,
    discrete_gaussian,
    gaussian,
    laplace,
)
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
from confide.signing import Identity
from confide.trainer import FitResult, NumpyTrainer, TrainConfig, Trainer

__all__ = [
    "AggregateError",
    "ArrayTypeError",
    "Client",
    "ClientResult",
    "ConfideError",
    "ConfigError",
    "Dataset",
    "FederationError",
    "FitResult",
    "Identity",
    "IntegrityError",
    "InvalidArgumentError",
    "Manifest",
    "ManifestError",
    "MaskDomain",
    "NonFiniteError",
    "NumpyTrainer",
    "RandomSourceError",
    "SecureRng",
    "ServerError",
    "ShapeError",
    "ShareError",
    "SignatureError",
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
    "pack_bits",
    "partition_dirichlet",
    "partition_iid",
    "quantize",
    "split_secret",
    "unpack_bits",
]
