"""Model architectures the torch engine can rebuild from a manifest alone.

A torch job's manifest carries a ``spec`` such as ::

    {"engine": "torch", "arch": "squeezenet1_1", "num_classes": 2, "input_shape": [3, 64, 64]}

and :func:`build_model` turns it into a freshly initialised :class:`torch.nn.Module`, so a
site client needs nothing but the manifest to train. Two architectures ship:

``squeezenet1_1``
    SqueezeNet 1.1 (Iandola et al. 2016, the "v1.1" of the reference implementation), layer
    for layer the layout of torchvision's ``squeezenet1_1`` with the same parameter names,
    so a torchvision checkpoint converted to safetensors loads with :func:`load_weights`.
    1,235,496 parameters at 1000 classes, 723,522 at 2. No BatchNorm (so it runs under
    DP-SGD), and every ReLU is out of place so ``torch.func.vmap`` can batch it.
``small_cnn``
    Two 3x3 conv layers, global average pooling and a linear head (a few hundred
    parameters): fast enough for unit tests and smoke runs.

Further architectures are added with :func:`register_architecture`; every site of a job must
register the same factory under the same name. Pretrained weights are never downloaded:
:func:`load_weights` reads a user's safetensors file (tensor names are the module's
``named_parameters()`` names).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from confide.errors import ManifestError, NonFiniteError, WireFormatError

__all__ = [
    "Fire",
    "SmallCNN",
    "SqueezeNet11",
    "architectures",
    "build_model",
    "count_parameters",
    "load_weights",
    "parse_spec",
    "register_architecture",
    "small_cnn",
    "squeezenet1_1",
]

#: ``factory(num_classes, input_shape, **options) -> nn.Module``
ModelFactory = Callable[..., nn.Module]


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands, concatenated.

    Parameters
    ----------
    inplanes : int
        Input channels.
    squeeze_planes : int
        Channels after the 1x1 squeeze convolution.
    expand1x1_planes : int
        Output channels of the 1x1 expand branch.
    expand3x3_planes : int
        Output channels of the 3x3 expand branch; the module outputs
        ``expand1x1_planes + expand3x3_planes`` channels.
    """

    def __init__(
        self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int
    ) -> None:
        super().__init__()
        # Out-of-place ReLUs throughout: in-place ops on batched tensors are not supported
        # by torch.func.vmap, which computes the per-sample gradients of DP-SGD.
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=False)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=False)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module to ``(N, inplanes, H, W)`` input."""
        s = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [
                self.expand1x1_activation(self.expand1x1(s)),
                self.expand3x3_activation(self.expand3x3(s)),
            ],
            1,
        )


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1, the layout of torchvision's ``squeezenet1_1``.

    Parameters
    ----------
    num_classes : int, default 1000
        Output classes (the width of the final 1x1 convolution).
    dropout : float, default 0.5
        Dropout probability before the final convolution.
    in_channels : int, default 3
        Input channels (the reference model has 3).
    final_relu : bool, default True
        Whether the final convolution is followed by a ReLU, as in the reference. Without it
        (same parameters, same names) the logits can be negative: trained from scratch on a
        two-class task, the reference's final ReLU often dies (every logit 0, loss stuck at
        ``log 2``); the lesion demo turns it off.

    Notes
    -----
    Weights are initialised as the reference does: Kaiming-uniform for every convolution but
    the last, ``N(0, 0.01^2)`` for the last, zero biases. The output is ``(N, num_classes)``
    logits (average-pooled (ReLU) outputs of the final convolution).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float = 0.5,
        in_channels: int = 3,
        final_relu: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=2),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )
        final_conv = nn.Conv2d(512, num_classes, kernel_size=1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            final_conv,
            nn.ReLU(inplace=False) if final_relu else nn.Identity(),
            nn.AdaptiveAvgPool2d((1, 1)),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(N, num_classes)`` logits for ``(N, C, H, W)`` images."""
        return torch.flatten(self.classifier(self.features(x)), 1)


class SmallCNN(nn.Module):
    """A tiny CNN for tests: conv3x3(8) - ReLU - maxpool - conv3x3(16) - ReLU - GAP - linear.

    Parameters
    ----------
    num_classes : int
        Output classes.
    in_channels : int, default 3
        Input channels.
    width : int, default 8
        Channels of the first convolution (the second has ``2 * width``).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d((1, 1)),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(N, num_classes)`` logits."""
        out: torch.Tensor = self.head(torch.flatten(self.features(x), 1))
        return out


def squeezenet1_1(
    num_classes: int,
    input_shape: tuple[int, ...],
    *,
    dropout: float = 0.5,
    final_relu: bool = True,
) -> nn.Module:
    """Build SqueezeNet 1.1 (registered as ``"squeezenet1_1"``).

    Parameters
    ----------
    num_classes : int
        Output classes.
    input_shape : tuple of int
        ``(C, H, W)`` of one image; ``H`` and ``W`` must be at least 17 (smaller inputs
        vanish in the pooling stack).
    dropout : float, default 0.5
        Dropout probability before the final convolution.
    final_relu : bool, default True
        Keep the reference's ReLU after the final convolution (see :class:`SqueezeNet11`).

    Returns
    -------
    torch.nn.Module
        A freshly initialised model.

    Examples
    --------
    >>> count_parameters(squeezenet1_1(1000, (3, 224, 224)))
    1235496
    >>> count_parameters(squeezenet1_1(2, (3, 64, 64), final_relu=False))
    723522
    """
    if not isinstance(final_relu, bool):
        raise ManifestError(f"squeezenet1_1 option final_relu must be a bool, got {final_relu!r}")
    if input_shape[1] < 17 or input_shape[2] < 17:
        raise ManifestError(f"squeezenet1_1 needs images of at least 17x17, got {input_shape}")
    return SqueezeNet11(
        num_classes=num_classes,
        dropout=dropout,
        in_channels=input_shape[0],
        final_relu=final_relu,
    )


def small_cnn(num_classes: int, input_shape: tuple[int, ...], *, width: int = 8) -> nn.Module:
    """Build :class:`SmallCNN` (registered as ``"small_cnn"``).

    Parameters
    ----------
    num_classes : int
        Output classes.
    input_shape : tuple of int
        ``(C, H, W)`` of one image (``H, W >= 2``).
    width : int, default 8
        Channels of the first convolution.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model.

    Examples
    --------
    >>> small_cnn(2, (1, 8, 8))(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 2])
    """
    if input_shape[1] < 2 or input_shape[2] < 2:
        raise ManifestError(f"small_cnn needs images of at least 2x2, got {input_shape}")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ManifestError(f"small_cnn width must be an int >= 1, got {width!r}")
    return SmallCNN(num_classes=num_classes, in_channels=input_shape[0], width=width)


_REGISTRY: dict[str, ModelFactory] = {
    "squeezenet1_1": squeezenet1_1,
    "small_cnn": small_cnn,
}
_SPEC_KEYS = frozenset(
    {
        "engine",
        "arch",
        "num_classes",
        "input_shape",
        "options",
        "classes",
        "trainable",
        "frozen_sha256",
    }
)


def register_architecture(name: str, factory: ModelFactory, *, replace: bool = False) -> None:
    """Make ``factory`` buildable by :func:`build_model` under ``name``.

    Parameters
    ----------
    name : str
        The ``arch`` value manifests will carry.
    factory : callable
        ``factory(num_classes, input_shape, **options) -> torch.nn.Module``; it must build
        the same parameter names and shapes on every site.
    replace : bool, default False
        Allow replacing an existing entry (the shipped ones included).

    Examples
    --------
    >>> from torch import nn
    >>> def linear(num_classes, input_shape):
    ...     return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))
    >>> register_architecture("doc_linear", linear, replace=True)
    >>> "doc_linear" in architectures()
    True
    """
    if not isinstance(name, str) or not name:
        raise ManifestError(f"architecture name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise ManifestError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not replace:
        raise ManifestError(f"architecture {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = factory


def architectures() -> list[str]:
    """Return the registered architecture names, sorted.

    Returns
    -------
    list of str
        Names accepted as ``spec["arch"]``.

    Examples
    --------
    >>> [a for a in architectures() if a in ("small_cnn", "squeezenet1_1")]
    ['small_cnn', 'squeezenet1_1']
    """
    return sorted(_REGISTRY)


def _positive_int(spec: Mapping[str, Any], key: str, low: int) -> int:
    value = spec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ManifestError(f"model spec {key!r} must be an int >= {low}, got {value!r}")
    return value


def parse_spec(spec: Mapping[str, Any]) -> tuple[str, int, tuple[int, ...], dict[str, Any]]:
    """Validate a torch model spec and return ``(arch, num_classes, input_shape, options)``.

    Parameters
    ----------
    spec : mapping
        ``engine`` (``"torch"``), ``arch``, ``num_classes``, ``input_shape`` (``[C, H, W]``)
        and optionally ``options`` (keyword arguments of the factory).

    Returns
    -------
    tuple
        The validated fields.

    Raises
    ------
    ManifestError
        A field is missing, unknown or of the wrong type, or the architecture is not
        registered.

    Examples
    --------
    >>> parse_spec({"engine": "torch", "arch": "small_cnn", "num_classes": 2,
    ...             "input_shape": [1, 8, 8]})
    ('small_cnn', 2, (1, 8, 8), {})
    """
    if not isinstance(spec, Mapping):
        raise ManifestError(f"model spec must be a mapping, got {type(spec).__name__}")
    if spec.get("engine") != "torch":
        raise ManifestError(f"not a torch model spec (engine={spec.get('engine')!r}): {spec}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ManifestError(
            f"unknown keys {unknown} in torch model spec; allowed {sorted(_SPEC_KEYS)}"
        )
    arch = spec.get("arch")
    if not isinstance(arch, str) or arch not in _REGISTRY:
        raise ManifestError(
            f"unknown architecture {arch!r}; registered: {architectures()} "
            "(custom models need register_architecture on every site)"
        )
    num_classes = _positive_int(spec, "num_classes", 2)
    shape = spec.get("input_shape")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise ManifestError(
            f"model spec 'input_shape' must be [C, H, W] of ints >= 1, got {shape!r}"
        )
    options = spec.get("options", {})
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ManifestError(f"model spec 'options' must map str to values, got {options!r}")
    return arch, num_classes, tuple(shape), dict(options)


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Build a freshly initialised model from a manifest's ``spec``.

    Initialisation uses torch's global generator; seed it (or use
    :meth:`confide.training.torch_engine.TorchTrainer.create`, which does) for a
    reproducible start.

    Parameters
    ----------
    spec : mapping
        See :func:`parse_spec`.

    Returns
    -------
    torch.nn.Module
        The model, on CPU, in training mode.

    Raises
    ------
    ManifestError
        Invalid spec, or factory options the architecture does not take.

    Examples
    --------
    >>> m = build_model({"engine": "torch", "arch": "small_cnn", "num_classes": 3,
    ...                  "input_shape": [1, 8, 8]})
    >>> sum(p.numel() for p in m.parameters())
    1299
    """
    arch, num_classes, input_shape, options = parse_spec(spec)
    try:
        module = _REGISTRY[arch](num_classes, input_shape, **options)
    except TypeError as exc:  # unexpected option names
        raise ManifestError(f"cannot build {arch!r} with options {options}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise ManifestError(f"factory of {arch!r} returned {type(module).__name__}, not nn.Module")
    return module


def _float_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise ManifestError(f"weights file {str(path)!r} does not exist") from None
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise WireFormatError(f"{str(path)!r} is not a valid safetensors file: {exc}") from None


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Copy the parameters of ``module`` from a safetensors file, in place.

    The file must hold exactly the module's ``named_parameters()`` names with their shapes,
    in a floating dtype (converted to the parameter's dtype) and finite. Buffers are not
    read: the torch engine federates parameters only. Nothing is written unless the whole
    file checks out.

    Parameters
    ----------
    module : torch.nn.Module
        The model; its parameters keep their identity (and any views into a flat vector).
    path : str or Path
        A safetensors file, e.g. a torchvision checkpoint converted with
        ``safetensors.torch.save_file({k: v for k, v in model.named_parameters()}, path)``.

    Raises
    ------
    ManifestError
        The file is missing, lacks some names, has extra names, a wrong shape or a
        non-floating dtype.
    WireFormatError
        The file is not a valid safetensors file.
    NonFiniteError
        A tensor holds NaN or Inf.

    Examples
    --------
    >>> import tempfile, os, safetensors.torch
    >>> m = nn.Linear(2, 1)
    >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> safetensors.torch.save_file({"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, p)
    >>> load_weights(m, p)
    >>> m.weight.tolist()
    [[1.0, 1.0]]
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"weights file {str(path)!r} does not exist")
    tensors = _float_tensors(path)
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise ManifestError(
            f"{str(path)!r} does not match the model's parameters: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, extra {extra[:10]}"
            f"{' ...' if len(extra) > 10 else ''}"
        )
    for name, param in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(param.shape):
            raise ManifestError(
                f"{str(path)!r}: tensor {name!r} has shape {tuple(t.shape)}, "
                f"the model expects {tuple(param.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise ManifestError(
                f"{str(path)!r}: tensor {name!r} has dtype {t.dtype}, expected float"
            )
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{str(path)!r}: tensor {name!r} holds NaN or Inf")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(dtype=param.dtype))


def count_parameters(module: nn.Module) -> int:
    """Return the number of parameter elements of ``module``.

    Parameters
    ----------
    module : torch.nn.Module
        Any module.

    Returns
    -------
    int
        ``sum(p.numel() for p in module.parameters())``.

    Examples
    --------
    >>> count_parameters(SqueezeNet11(num_classes=2))
    723522
    """
    return sum(math.prod(p.shape) for p in module.parameters())
