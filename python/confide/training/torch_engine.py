"""The PyTorch engine: any ``nn.Module`` behind confide's flat-vector interface.

:class:`TorchTrainer` implements :class:`~confide.training.base.PerSampleTrainer` for a
classifier module (``(N, *input_shape)`` float32 images in, ``(N, num_classes)`` logits
out, cross-entropy loss), on CPU or CUDA.

**Flat vector.** The module's parameters are re-seated as views into one contiguous float32
tensor, in ``named_parameters()`` order; the :class:`~confide.protocol.manifest.Manifest`
lists the same names and shapes. :meth:`~TorchTrainer.get_weights` and
:meth:`~TorchTrainer.set_weights` are therefore a single copy each and round-trip bit for
bit. The manifest's ``spec`` (``engine``, ``arch``, ``num_classes``, ``input_shape`` and
optional ``options``) lets a site rebuild the model from the manifest alone
(:meth:`TorchTrainer.from_manifest`, through :func:`confide.training.torch_models.build_model`).

**Buffers (BatchNorm statistics and the like) are local, never federated.** Only parameters
travel; buffers stay on the site and are updated by that site's non-private training. Under
DP-SGD a module with batch normalisation is refused
(:class:`~confide.errors.PrivacyUnsupportedError`): in training mode BatchNorm mixes the
records of a batch, so its "per-sample" gradients are not per-sample and the clipping bound
would not bound one patient's influence, and its running statistics are un-noised data
statistics. Replace it with ``nn.GroupNorm`` (as Opacus' ``ModuleValidator.fix`` does).
SqueezeNet 1.1 has no normalisation layers.

**DP-SGD is not done here.** :meth:`TorchTrainer.fit` trains without DP and refuses a config
with ``dp`` set; patient-level DP-SGD is :func:`confide.privacy.run_dpsgd`, which asks this
engine for :meth:`~TorchTrainer.per_sample_gradients` (one batched backward pass with layer
hooks for vetted record-wise models, :mod:`confide.training.torch_per_sample`; otherwise
``torch.func``: ``functional_call`` inside ``vmap(grad(...))``; ``per_sample_chunk``
records at a time) and does the
sampling, per-patient summing, clipping and noise itself. On CPU the returned tensor is
C-contiguous float32, so ``tensor.numpy()`` is a zero-copy view the Rust clipping kernel can
work on in place.

**Randomness.** Shuffling (numpy) and dropout (torch's generator, inside
``torch.random.fork_rng`` so the caller's generator state is untouched) are seeded from the
``seed`` argument: they protect no secret. On CPU with a fixed thread count two runs with the
same seed give the same weights bit for bit. DP noise never comes from torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from numpy.typing import NDArray
from torch import nn
from torch.func import functional_call, grad, vmap

from confide.errors import (
    ArrayTypeError,
    ConfigError,
    DataError,
    ManifestError,
    NonFiniteError,
    PrivacyUnsupportedError,
    ShapeError,
)
from confide.protocol.manifest import Manifest
from confide.training.base import FitResult, SiteData, TrainConfig
from confide.training.torch_models import build_model, load_weights, parse_spec
from confide.training.torch_per_sample import per_sample_gradients_into, supports_hooks
from confide.training.trainable import is_trainable, trainable_index, trainable_prefixes

__all__ = ["TorchTrainer", "default_per_sample_chunk"]

# Per-sample chunk for a 3x224x224 input: SqueezeNet 1.1 at chunk 8 peaks at about 1.33 GB
# RSS for a 32-record batch on CPU (torch itself is ~0.7 GB of that), chunk 32 at ~2 GB.
# Activation memory scales with the input size, so smaller images get larger chunks.
_REFERENCE_CHUNK = 8
_REFERENCE_INPUT = 3 * 224 * 224
_MAX_CHUNK = 64


def default_per_sample_chunk(input_shape: Sequence[int]) -> int:
    """Return the default number of records per ``vmap`` call for an input shape.

    Eight 3x224x224 images, scaled inversely with the input size, capped at 64.

    Parameters
    ----------
    input_shape : sequence of int
        ``(C, H, W)`` of one record.

    Returns
    -------
    int
        Between 1 and 64.

    Examples
    --------
    >>> default_per_sample_chunk((3, 224, 224)), default_per_sample_chunk((3, 64, 64))
    (8, 64)
    """
    size = max(1, math.prod(int(d) for d in input_shape))
    return max(1, min(_MAX_CHUNK, (_REFERENCE_CHUNK * _REFERENCE_INPUT) // size))


def _derive_seed(seed: int, purpose: str) -> int:
    """Derive a 63-bit torch seed from any int ``seed``, separated by ``purpose``."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    digest = hashlib.sha256(f"confide-torch/{purpose}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}: {exc}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(dev)!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {str(dev)!r} requested but only {torch.cuda.device_count()} "
                "CUDA devices exist"
            )
    elif dev.type != "cpu":
        raise ConfigError(f"device must be 'cpu' or a CUDA device, got {str(dev)!r}")
    return dev


def _batchnorm_layers(module: nn.Module) -> list[str]:
    return [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats)
    ]


class TorchTrainer:
    """A classifier ``nn.Module`` as a confide engine (CPU or CUDA).

    Parameters
    ----------
    module : torch.nn.Module
        Maps ``(N, *input_shape)`` float32 to ``(N, num_classes)`` logits; all parameters
        float32. The trainer takes ownership: the parameters become views into its flat
        vector and the module is moved to ``device``.
    input_shape : sequence of int
        Shape of one record, e.g. ``(3, 64, 64)``.
    num_classes : int
        Number of classes (>= 2); labels lie in ``[0, num_classes)``.
    spec : mapping, optional
        Manifest ``spec``. Defaults to ``{"engine": "torch", "arch": "custom", ...}``; a
        registered ``arch`` lets other sites rebuild the model from the manifest.
    device : str or torch.device, default "cpu"
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    per_sample_chunk : int, optional
        Records per ``vmap`` call in :meth:`per_sample_gradients`; default
        :func:`default_per_sample_chunk` of ``input_shape``.
    momentum : float, default 0.0
        Heavy-ball momentum of non-private :meth:`fit` when the task's
        ``TrainConfig.momentum`` is 0 (``torch.optim.SGD``). The buffer is reset at each
        call (every round starts from a new global model) unless the task says
        ``momentum_restart = false``: then it continues from :meth:`momentum_buffer`.
    eval_batch_size : int, default 64
        Records per forward pass in :meth:`evaluate`.
    per_sample_method : {"auto", "hooks", "vmap"}, default "auto"
        How :meth:`per_sample_gradients` computes them. ``"vmap"``: ``torch.func``
        (``functional_call`` inside ``vmap(grad(...))``), for any module. ``"hooks"``: one
        batched forward/backward pass with layer hooks
        (:mod:`confide.training.torch_per_sample`), several times faster on CPU, only for
        modules made of vetted record-wise layers (confide's SqueezeNet 1.1 and small CNN,
        plain ``Conv2d``/``Linear``); refused (:class:`~confide.errors.ConfigError`) for
        others. ``"auto"``: hooks where they apply, else ``vmap``. Both give the same
        gradients up to float rounding.
    ghost_clipping : bool, default True
        With the hooks path on CPU, let a DP-SGD step clip per-patient sums from ghost norms
        (:mod:`confide.privacy.torch_ghost`: per-patient norms from Gram matrices where a
        layer has few positions, one weighted product for the clipped sum) instead of
        materialising every per-sample gradient. Same exact norm bound; ``False`` keeps the
        materialised path (for comparisons).

    Examples
    --------
    >>> from torch import nn
    >>> t = TorchTrainer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (1, 2, 2), 2)
    >>> t.manifest.names
    ['1.weight', '1.bias']
    >>> w = t.get_weights()
    >>> t.set_weights(w); bool((t.get_weights() == w).all())
    True
    """

    #: :meth:`fit` implements FedProx's proximal term (``TrainConfig.proximal_mu``).
    supports_proximal = True
    #: :meth:`per_sample_gradients` takes an ``out=`` workspace (run_dpsgd reuses one).
    accepts_per_sample_out = True

    def __init__(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        spec: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        per_sample_chunk: int | None = None,
        momentum: float = 0.0,
        eval_batch_size: int = 64,
        per_sample_method: str = "auto",
        ghost_clipping: bool = True,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        shape = tuple(input_shape)
        if not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape
        ):
            raise ConfigError(
                f"input_shape must be a non-empty sequence of ints >= 1, got {input_shape!r}"
            )
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ConfigError(f"num_classes must be an int >= 2, got {num_classes!r}")
        chunk = default_per_sample_chunk(shape) if per_sample_chunk is None else per_sample_chunk
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ConfigError(f"per_sample_chunk must be an int >= 1, got {per_sample_chunk!r}")
        if not (
            isinstance(momentum, int | float) and math.isfinite(momentum) and 0.0 <= momentum < 1.0
        ):
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be an int >= 1, got {eval_batch_size!r}")
        self._device = _resolve_device(device)
        self._input_shape = shape
        self._num_classes = num_classes
        self._chunk = chunk
        self._momentum = float(momentum)
        # Host copy of the SGD momentum buffers (manifest order), kept between fits for
        # TrainConfig.momentum_restart = false.
        self._velocity: NDArray[np.float32] | None = None
        self._eval_batch_size = eval_batch_size

        named = list(module.named_parameters())
        if not named:
            raise ManifestError("the module has no parameters to train")
        for name, p in named:
            if p.dtype != torch.float32:
                raise ManifestError(
                    f"parameter {name!r} has dtype {p.dtype}; the engine needs float32"
                )
        base_spec: dict[str, Any] = {
            "engine": "torch",
            "arch": "custom",
            "num_classes": num_classes,
            "input_shape": list(shape),
        }
        if spec is not None:
            base_spec.update(dict(spec))
        if base_spec.get("engine") != "torch":
            raise ManifestError(f"spec engine must be 'torch', got {base_spec.get('engine')!r}")
        manifest = Manifest.from_shapes([(n, tuple(p.shape)) for n, p in named], base_spec)

        module.to(self._device)
        # Re-seat every parameter as a view into one flat vector (manifest order): weights
        # move in and out with one copy, and optimizers update the flat vector in place.
        flat = torch.empty(manifest.size, dtype=torch.float32, device=self._device)
        self._offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        with torch.no_grad():
            for name, p in module.named_parameters():
                n = p.numel()
                view = flat[offset : offset + n].view(p.shape)
                view.copy_(p)
                p.data = view
                self._offsets[name] = (offset, offset + n)
                offset += n
        self._flat = flat
        self._module = module
        self._manifest = manifest
        # The trainable subset (spec "trainable"): fit and per-sample gradients touch only
        # these parameters; the others stay at their pinned values (confide.training.trainable).
        prefixes = trainable_prefixes(manifest.spec)
        index = trainable_index(manifest)
        self._trainable = [n for n, _ in named if is_trainable(n, prefixes)]
        self._trainable_index = index
        self._trainable_manifest = (
            manifest
            if index is None
            else Manifest.from_shapes(
                [(t.name, tuple(t.shape)) for t in manifest.tensors if t.name in self._trainable],
                {"engine": "torch", "trainable_of": manifest.sha256},
            )
        )
        self._batchnorm = _batchnorm_layers(module)
        self._ps_fn: Callable[..., dict[str, torch.Tensor]] | None = None
        if per_sample_method not in ("auto", "hooks", "vmap"):
            raise ConfigError(
                f"per_sample_method must be 'auto', 'hooks' or 'vmap', got {per_sample_method!r}"
            )
        hooks_ok = not self._batchnorm and supports_hooks(module, set(self._trainable))
        if per_sample_method == "hooks" and not hooks_ok:
            raise ConfigError(
                "per_sample_method='hooks' needs a module of vetted record-wise layers "
                "(confide's squeezenet1_1 / small_cnn, plain Conv2d and Linear); use 'auto' "
                "or 'vmap' for this module"
            )
        self._ps_hooks = hooks_ok and per_sample_method != "vmap"
        if not isinstance(ghost_clipping, bool):
            raise ConfigError(f"ghost_clipping must be a bool, got {ghost_clipping!r}")
        self._ghost = ghost_clipping

    # ----------------------------------------------------------------- construction

    @classmethod
    def create(
        cls,
        arch: str,
        num_classes: int,
        input_shape: Sequence[int],
        *,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
        weights: str | Path | None = None,
        **kwargs: Any,
    ) -> TorchTrainer:
        """Build a registered architecture and its manifest.

        Parameters
        ----------
        arch : str
            A registered architecture (``"squeezenet1_1"``, ``"small_cnn"``, ...).
        num_classes : int
            Output classes.
        input_shape : sequence of int
            ``(C, H, W)``.
        seed : int, default 0
            Seeds the weight initialisation (reproducible on CPU).
        options : mapping, optional
            Extra factory arguments (e.g. ``{"dropout": 0.0}``); recorded in the spec.
        weights : str or Path, optional
            A safetensors file to start from (see
            :func:`~confide.training.torch_models.load_weights`).
        **kwargs
            ``device``, ``per_sample_chunk``, ``momentum``, ``eval_batch_size``.

        Returns
        -------
        TorchTrainer
            The trainer; its manifest spec records ``engine``, ``arch``, ``num_classes``,
            ``input_shape`` (and ``options`` when given).

        Examples
        --------
        >>> t = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=0)
        >>> t.manifest.spec["arch"], t.manifest.size
        ('small_cnn', 1282)
        """
        spec: dict[str, Any] = {
            "engine": "torch",
            "arch": arch,
            "num_classes": num_classes,
            "input_shape": list(input_shape) if isinstance(input_shape, Sequence) else input_shape,
        }
        if options:
            spec["options"] = dict(options)
        _, n_cls, shape, _ = parse_spec(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derive_seed(seed, "init"))
            module = build_model(spec)
        if weights is not None:
            load_weights(module, weights)
        return cls(module, shape, n_cls, spec=spec, **kwargs)

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        weights: NDArray[np.float32] | None = None,
        **kwargs: Any,
    ) -> TorchTrainer:
        """Rebuild a trainer from a manifest alone (what a site client does).

        Parameters
        ----------
        manifest : Manifest
            A torch manifest whose ``spec`` names a registered architecture.
        weights : numpy.ndarray, optional
            Flat vector to load (e.g. the global model).
        **kwargs
            ``device``, ``per_sample_chunk``, ``momentum``, ``eval_batch_size``.

        Returns
        -------
        TorchTrainer
            The trainer.

        Raises
        ------
        ManifestError
            The spec is not a torch spec, names an unknown architecture, or the built
            model's parameter names and shapes differ from the manifest's.

        Examples
        --------
        >>> a = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=3)
        >>> b = TorchTrainer.from_manifest(a.manifest, a.get_weights())
        >>> b.manifest == a.manifest, bool((b.get_weights() == a.get_weights()).all())
        (True, True)
        """
        if not isinstance(manifest, Manifest):
            raise ManifestError(f"expected a Manifest, got {type(manifest).__name__}")
        spec = dict(manifest.spec)
        _, num_classes, shape, _ = parse_spec(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_derive_seed(0, "init"))
            module = build_model(spec)
        trainer = cls(module, shape, num_classes, spec=spec, **kwargs)
        if trainer.manifest != manifest:
            expected = [(t.name, t.shape) for t in manifest.tensors]
            got = [(t.name, t.shape) for t in trainer.manifest.tensors]
            diff = next(
                (f"{e} vs {g}" for e, g in zip(expected, got, strict=False) if e != g),
                f"{len(expected)} vs {len(got)} tensors",
            )
            raise ManifestError(
                f"the {spec['arch']!r} model built here does not match the manifest "
                f"(manifest vs built: {diff})"
            )
        if weights is not None:
            trainer.set_weights(weights)
        return trainer

    # ------------------------------------------------------------------- properties

    @property
    def manifest(self) -> Manifest:
        """Names and shapes of the flat parameter vector (``named_parameters()`` order)."""
        return self._manifest

    @property
    def module(self) -> nn.Module:
        """The underlying module (its parameters are views into :attr:`flat_parameters`)."""
        return self._module

    @property
    def device(self) -> torch.device:
        """Device holding the parameters."""
        return self._device

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one record."""
        return self._input_shape

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._num_classes

    @property
    def per_sample_chunk(self) -> int:
        """Largest number of records :meth:`per_sample_gradients` differentiates at once."""
        return self._chunk

    @property
    def flat_parameters(self) -> torch.Tensor:
        """The live flat parameter tensor on :attr:`device` (modify only under ``no_grad``).

        Lets a DP loop on CUDA update the parameters in place without a host round trip.
        """
        return self._flat

    @property
    def trainable_names(self) -> list[str]:
        """Names of the parameters :meth:`fit` and DP-SGD train (all without a subset)."""
        return list(self._trainable)

    @property
    def trainable_index(self) -> NDArray[np.int64] | None:
        """Flat-vector indices of the trainable coordinates, ``None`` when all train."""
        return self._trainable_index

    @property
    def trainable_manifest(self) -> Manifest:
        """Names and shapes of the trainable part (the manifest itself without a subset)."""
        return self._trainable_manifest

    @property
    def per_sample_method(self) -> str:
        """``"hooks"`` or ``"vmap"``: how :meth:`per_sample_gradients` computes them."""
        return "hooks" if self._ps_hooks else "vmap"

    @property
    def supports_per_sample(self) -> bool:
        """Whether :meth:`per_sample_gradients` is available (no BatchNorm layers)."""
        return not self._batchnorm

    # ----------------------------------------------------------------------- weights

    def get_weights(self) -> NDArray[np.float32]:
        """Return a copy of the flat parameter vector.

        Returns
        -------
        numpy.ndarray
            1-D float32 of ``manifest.size`` elements, on the host.
        """
        host = self._flat.detach().to("cpu", copy=True)
        out: NDArray[np.float32] = host.numpy()
        return out

    def set_weights(self, vector: NDArray[np.float32]) -> None:
        """Replace the parameters with ``vector`` (copied; bit-exact).

        Parameters
        ----------
        vector : numpy.ndarray
            1-D float32 of ``manifest.size`` finite values.

        Raises
        ------
        ManifestError
            Wrong type, dtype, rank or length, or NaN/Inf values.
        """
        self._manifest.check_vector(vector)
        if not np.isfinite(vector).all():
            raise ManifestError("weights contain NaN or Inf", code="non_finite")
        src = vector if vector.flags.writeable and vector.flags.c_contiguous else vector.copy()
        with torch.no_grad():
            self._flat.copy_(torch.from_numpy(src))

    # -------------------------------------------------------------------- validation

    def _check_labels(self, labels: NDArray[Any], what: str) -> None:
        if labels.size and (labels.min() < 0 or labels.max() >= self._num_classes):
            raise DataError(
                f"{what}: labels must lie in [0, {self._num_classes}), "
                f"got values in [{labels.min()}, {labels.max()}]"
            )

    def _inputs(self, x: Any, y: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a batch and move it to the device (errors are typed confide errors)."""
        if isinstance(x, torch.Tensor):
            if x.dtype != torch.float32:
                raise ArrayTypeError(f"{what}: x must be float32, got {x.dtype}")
            xt = x
        elif isinstance(x, np.ndarray):
            if x.dtype != np.float32:
                raise ArrayTypeError(f"{what}: x must be a float32 array, got dtype {x.dtype}")
            xt = torch.from_numpy(x if x.flags.writeable else x.copy())
        else:
            raise ArrayTypeError(
                f"{what}: x must be a numpy array or torch tensor, got {type(x).__name__}"
            )
        if isinstance(y, torch.Tensor):
            if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
                raise ArrayTypeError(f"{what}: y must hold integer labels, got {y.dtype}")
            yt = y.to(torch.int64)
        elif isinstance(y, np.ndarray):
            if not np.issubdtype(y.dtype, np.integer):
                raise ArrayTypeError(f"{what}: y must hold integer labels, got dtype {y.dtype}")
            yt = torch.from_numpy(y.astype(np.int64, copy=True))
        else:
            raise ArrayTypeError(
                f"{what}: y must be a numpy array or torch tensor, got {type(y).__name__}"
            )
        if tuple(xt.shape[1:]) != self._input_shape or xt.ndim != len(self._input_shape) + 1:
            raise ShapeError(
                f"{what}: x must have shape (n, {', '.join(map(str, self._input_shape))}), "
                f"got {tuple(xt.shape)}"
            )
        if yt.ndim != 1 or yt.shape[0] != xt.shape[0]:
            raise ShapeError(f"{what}: y must have shape ({xt.shape[0]},), got {tuple(yt.shape)}")
        if yt.numel() and (int(yt.min()) < 0 or int(yt.max()) >= self._num_classes):
            raise DataError(
                f"{what}: labels must lie in [0, {self._num_classes}), "
                f"got values in [{int(yt.min())}, {int(yt.max())}]"
            )
        xt = xt.to(self._device, non_blocking=False)
        if not bool(torch.isfinite(xt).all()):
            raise NonFiniteError(f"{what}: x contains NaN or Inf")
        return xt, yt.to(self._device)

    def _batch(self, data: SiteData, index: NDArray[np.int64]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.batch(index)
        return self._inputs(x, y, f"batch of {len(index)} records")

    @staticmethod
    def _check_data(data: Any) -> int:
        if not isinstance(data, SiteData):
            raise ConfigError(
                "data must implement SiteData (__len__, labels, patient_ids, batch), "
                f"got {type(data).__name__}"
            )
        n = len(data)
        if n < 1:
            raise DataError("the site has no records")
        return n

    def _check_finite_weights(self) -> None:
        if not bool(torch.isfinite(self._flat).all()):
            raise ManifestError("training diverged: weights became NaN or Inf", code="non_finite")

    @contextmanager
    def _seeded(self, seed: int, purpose: str) -> Iterator[None]:
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self._device.type):
            torch.manual_seed(_derive_seed(seed, purpose))
            yield

    # ---------------------------------------------------------------------- training

    def fit(self, data: SiteData, config: TrainConfig, seed: int) -> FitResult:
        """Mini-batch SGD (with the trainer's momentum), without DP.

        Parameters
        ----------
        data : SiteData
            The site's records.
        config : TrainConfig
            ``epochs``, ``batch_size``, ``learning_rate``, ``proximal_mu`` (FedProx: the
            gradient ``mu (w - w0)`` of the proximal term is added before every optimizer
            step, ``w0`` the weights ``fit`` starts from); ``dp`` must be ``None``.
        seed : int
            Fixes the batch order (numpy) and dropout (torch); protects no secret.

        Returns
        -------
        FitResult
            Records, mean training loss of the last epoch, steps.

        Raises
        ------
        ConfigError
            ``config.dp`` is set: patient-level DP-SGD is
            :func:`confide.privacy.run_dpsgd`, never an engine's own loop.
        DataError
            Empty data or labels out of range.

        Examples
        --------
        >>> import numpy as np
        >>> from confide.training.base import TrainConfig
        >>> class Toy:
        ...     labels = np.array([0, 1] * 8, dtype=np.int64)
        ...     patient_ids = None
        ...     def __len__(self): return 16
        ...     def batch(self, index):
        ...         x = np.zeros((len(index), 1, 4, 4), np.float32)
        ...         x[:, 0, 0, 0] = self.labels[index] * 2.0 - 1.0
        ...         return x, self.labels[index]
        >>> t = TorchTrainer.create("small_cnn", 2, (1, 4, 4), seed=0)
        >>> t.fit(Toy(), TrainConfig(epochs=2, batch_size=8, learning_rate=0.1), seed=0).num_steps
        4
        """
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.dp is not None:
            raise ConfigError(
                "TorchTrainer.fit trains without DP; a config with dp set must go through "
                "confide.privacy.run_dpsgd (per-sample gradients, clipping and noise by confide)"
            )
        n = self._check_data(data)
        self._check_labels(np.asarray(data.labels), "data.labels")
        shuffler = np.random.default_rng(_derive_seed(seed, "shuffle"))
        momentum = float(config.momentum) or self._momentum  # the task's, else the trainer's
        train_set = set(self._trainable)
        optimizer = torch.optim.SGD(
            [p for name, p in self._module.named_parameters() if name in train_set],
            lr=config.learning_rate,
            momentum=momentum,
        )
        if momentum > 0 and not config.momentum_restart and self._velocity is not None:
            kept = torch.from_numpy(self._velocity).to(self._device)
            for name, p in self._module.named_parameters():
                if p.requires_grad and name in train_set:
                    lo, hi = self._offsets[name]
                    optimizer.state[p]["momentum_buffer"] = kept[lo:hi].view(p.shape).clone()
        self._module.train()
        steps = 0
        epoch_loss = math.nan
        mu = float(config.proximal_mu)
        # FedProx: w_global is the weights fit starts from (the round's model).
        params = [
            p
            for name, p in self._module.named_parameters()
            if p.requires_grad and name in train_set
        ]
        anchors = [p.detach().clone() for p in params] if mu > 0 else []
        with self._seeded(seed, "dropout"):
            for _ in range(config.epochs):
                order = shuffler.permutation(n).astype(np.int64)
                total = 0.0
                for start in range(0, n, config.batch_size):
                    idx = order[start : start + config.batch_size]
                    x, y = self._batch(data, idx)
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(self._module(x), y)
                    loss.backward()  # type: ignore[no-untyped-call]
                    for p, a in zip(params, anchors, strict=False):  # grad of mu/2 ||w - a||^2
                        if p.grad is not None:
                            p.grad.add_(p.detach() - a, alpha=mu)
                    optimizer.step()
                    total += float(loss.detach()) * len(idx)
                    steps += 1
                epoch_loss = total / n
        optimizer.zero_grad(set_to_none=True)
        self._check_finite_weights()
        if momentum > 0:
            velocity = np.zeros(self._manifest.size, dtype=np.float32)
            for name, p in self._module.named_parameters():
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    lo, hi = self._offsets[name]
                    velocity[lo:hi] = buf.detach().reshape(-1).to("cpu").numpy()
            self._velocity = velocity
        return FitResult(num_examples=n, loss=epoch_loss, num_steps=steps)

    def momentum_buffer(self) -> NDArray[np.float32] | None:
        """Return a copy of the SGD momentum buffer left by the last :meth:`fit`, or ``None``.

        Returns
        -------
        numpy.ndarray or None
            Flat float32 buffer in the manifest's order (zeros for parameters without one).
        """
        return None if self._velocity is None else self._velocity.copy()

    def set_momentum_buffer(self, buffer: NDArray[np.float32] | None) -> None:
        """Replace the buffer a ``momentum_restart = False`` fit continues from.

        Parameters
        ----------
        buffer : numpy.ndarray or None
            Flat float32 vector of ``manifest.size`` finite values (copied), or ``None``.
        """
        if buffer is None:
            self._velocity = None
            return
        self._manifest.check_vector(buffer)
        if not np.isfinite(buffer).all():
            raise ManifestError("momentum buffer contains NaN or Inf", code="non_finite")
        self._velocity = np.array(buffer, dtype=np.float32, copy=True)

    def evaluate(self, data: SiteData) -> dict[str, float]:
        """Mean cross-entropy and accuracy over ``data`` (eval mode, no gradients).

        Parameters
        ----------
        data : SiteData
            Records to score, read ``eval_batch_size`` at a time.

        Returns
        -------
        dict of str to float
            ``loss``, ``accuracy`` and ``num_examples``.
        """
        n = self._check_data(data)
        was_training = self._module.training
        self._module.eval()
        loss_sum = 0.0
        correct = 0
        try:
            with torch.no_grad():
                for start in range(0, n, self._eval_batch_size):
                    idx = np.arange(start, min(n, start + self._eval_batch_size), dtype=np.int64)
                    x, y = self._batch(data, idx)
                    logits = self._module(x)
                    loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == y).sum())
        finally:
            self._module.train(was_training)
        return {"loss": loss_sum / n, "accuracy": correct / n, "num_examples": float(n)}

    def predict_proba(self, x: NDArray[np.float32] | torch.Tensor) -> torch.Tensor:
        """Class probabilities (softmax of the logits, eval mode).

        Parameters
        ----------
        x : numpy.ndarray or torch.Tensor
            ``(n, *input_shape)`` float32.

        Returns
        -------
        torch.Tensor
            ``(n, num_classes)`` float32 on :attr:`device`.
        """
        xt, _ = self._inputs(x, np.zeros(len(x), np.int64), "predict_proba")
        was_training = self._module.training
        self._module.eval()
        try:
            with torch.no_grad():
                out: torch.Tensor = torch.softmax(self._module(xt), dim=1)
        finally:
            self._module.train(was_training)
        return out

    def loss_and_gradient(
        self, x: NDArray[np.float32] | torch.Tensor, y: NDArray[np.int64] | torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """Mean loss of a batch and its gradient as one flat vector (training mode).

        Parameters
        ----------
        x : numpy.ndarray or torch.Tensor
            ``(n, *input_shape)`` float32.
        y : numpy.ndarray or torch.Tensor
            ``(n,)`` integer labels.

        Returns
        -------
        loss : float
            Mean cross-entropy.
        gradient : torch.Tensor
            ``(manifest.size,)`` float32 on :attr:`device`, manifest order.
        """
        xt, yt = self._inputs(x, y, "loss_and_gradient")
        self._module.train()
        for p in self._module.parameters():
            p.grad = None
        loss = F.cross_entropy(self._module(xt), yt)
        loss.backward()  # type: ignore[no-untyped-call]
        out = torch.zeros(self._manifest.size, dtype=torch.float32, device=self._device)
        for name, p in self._module.named_parameters():
            lo, hi = self._offsets[name]
            if p.grad is not None:
                out[lo:hi] = p.grad.reshape(-1)
            p.grad = None
        return float(loss.detach()), out

    # ------------------------------------------------------------- per-sample grads

    def check_per_sample(self) -> None:
        """Raise unless this module can give true per-sample gradients.

        Raises
        ------
        PrivacyUnsupportedError
            The module has BatchNorm (or InstanceNorm with running statistics) layers.
        """
        if self._batchnorm:
            raise PrivacyUnsupportedError(
                f"per-sample gradients are not per-sample with batch normalisation "
                f"(layers {self._batchnorm[:5]}); replace them with nn.GroupNorm to run "
                "patient-level DP-SGD"
            )

    def _per_sample_fn(self) -> Callable[..., dict[str, torch.Tensor]]:
        if self._ps_fn is None:
            module = self._module

            def loss_one(
                params: dict[str, torch.Tensor],
                frozen: dict[str, torch.Tensor],
                buffers: dict[str, torch.Tensor],
                xi: torch.Tensor,
                yi: torch.Tensor,
            ) -> torch.Tensor:
                logits = functional_call(
                    module, ({**frozen, **params}, buffers), (xi.unsqueeze(0),)
                )
                return F.cross_entropy(logits, yi.unsqueeze(0))

            # grad w.r.t. the trainable parameters only: with a frozen trunk autograd records
            # nothing before the first trainable layer, so no backward pass runs through it.
            # randomness="different": each record draws its own dropout mask, as in a loop.
            self._ps_fn = vmap(
                grad(loss_one), in_dims=(None, None, None, 0, 0), randomness="different"
            )
        return self._ps_fn

    def _workspace_rows(self, out: Any, n: int, dim: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise ArrayTypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if (
            out.dtype != torch.float32
            or out.device != self._device
            or out.ndim != 2
            or out.shape[1] != dim
            or out.shape[0] < n
            or not out.is_contiguous()
        ):
            raise ShapeError(
                f"out must be a C-contiguous float32 ({n}+, {dim}) tensor on {self._device}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        return out[:n]

    def _per_sample_offsets(self, trainable_only: bool) -> dict[str, tuple[int, int]]:
        """Columns of each trainable parameter in a per-sample row (of the returned width)."""
        if trainable_only and self._trainable_index is not None:
            offsets, lo = {}, 0
            for t in self._trainable_manifest.tensors:
                hi = lo + int(np.prod(t.shape, dtype=np.int64))
                offsets[t.name] = (lo, hi)
                lo = hi
            return offsets
        return {name: self._offsets[name] for name in self._trainable}

    @property
    def ghost_clipping(self) -> bool:
        """Whether :meth:`ghost_clipped_sum` runs (hooks path, CPU, ``ghost_clipping=True``)."""
        return self._ghost and self._ps_hooks and self._device.type == "cpu"

    @property
    def ghost_clip_margin(self) -> float:
        """``C' / C``: every patient of a DP-SGD step is clipped to ``C' = C (1 - 2^-16)``.

        Both paths of :func:`confide.privacy.dpsgd.clipped_patient_sum` use it (the ghost
        path of :mod:`confide.privacy.torch_ghost` and the Rust kernel on materialised
        rows), so they release the same sensitivity; the margin pays for the float64
        rounding of the sum over patients (docs/privacy.md). The accounting and the
        documented sensitivity stay ``C``.
        """
        from confide.privacy.torch_ghost import CLIP_MARGIN

        return CLIP_MARGIN

    def ghost_clipped_sum(
        self,
        x: NDArray[np.float32] | torch.Tensor,
        y: NDArray[np.int64] | torch.Tensor,
        patients: NDArray[np.int64],
        clip_norm: float,
        *,
        trainable_only: bool = False,
    ) -> NDArray[np.float64] | None:
        """Sum of the per-patient clipped gradient sums of one batch, from ghost norms.

        Called by :func:`confide.privacy.dpsgd.clipped_patient_sum` (only for this exact
        class, so an override cannot skip the clipping); see
        :mod:`confide.privacy.torch_ghost` for the sensitivity argument. Batches of more
        than ``per_sample_chunk`` records get ``None`` (the bound on the records is the
        chunk, so every patient's clipping factor depends on its own records only).

        Parameters
        ----------
        x, y : numpy.ndarray or torch.Tensor
            The batch's records, sorted by patient, and labels.
        patients : numpy.ndarray
            ``(n,)`` sorted patient index of each record.
        clip_norm : float
            ``C`` (> 0); every patient is clipped to ``C * ghost_clip_margin``.
        trainable_only : bool, default False
            Columns of the trainable part only (as :meth:`per_sample_gradients`).

        Returns
        -------
        numpy.ndarray or None
            ``(dim,)`` float64, or ``None`` where the ghost path does not apply (not
            :attr:`ghost_clipping`, or a non-finite value: the materialised path then runs).

        Examples
        --------
        >>> import numpy as np
        >>> t = TorchTrainer.create("small_cnn", 2, (1, 4, 4), seed=0)
        >>> x, y = np.ones((3, 1, 4, 4), np.float32), np.array([0, 1, 1])
        >>> s = t.ghost_clipped_sum(x, y, np.array([0, 1, 2]), 0.1)
        >>> s.shape == (t.manifest.size,), bool(np.linalg.norm(s) <= 3 * 0.1)
        (True, True)
        """
        if not self.ghost_clipping:
            return None
        self.check_per_sample()
        from confide.privacy.torch_ghost import ghost_clipped_sum

        xt, yt = self._inputs(x, y, "per_sample_gradients")
        target = self._trainable_manifest if trainable_only else self._manifest
        self._module.train()
        return ghost_clipped_sum(
            self._module,
            xt,
            yt,
            patients,
            clip_norm,
            self._per_sample_offsets(trainable_only),
            target.size,
            max_records=self.per_sample_chunk,
        )

    def per_sample_gradients(
        self,
        x: NDArray[np.float32] | torch.Tensor,
        y: NDArray[np.int64] | torch.Tensor,
        *,
        trainable_only: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gradient of each record's cross-entropy at the current weights.

        Computed in training mode, ``per_sample_chunk`` records at a time so memory stays
        bounded for large images, by one batched backward pass with layer hooks or by
        ``torch.func`` (``vmap(grad(functional_call))``): see ``per_sample_method``.

        Parameters
        ----------
        x : numpy.ndarray or torch.Tensor
            ``(n, *input_shape)`` float32, finite.
        y : numpy.ndarray or torch.Tensor
            ``(n,)`` integer labels in ``[0, num_classes)``.
        trainable_only : bool, default False
            Return only the trainable part's columns (:attr:`trainable_manifest` order).
            Otherwise frozen parameters' columns are zero (they are never differentiated).
        out : torch.Tensor, optional
            A C-contiguous float32 workspace on :attr:`device` with at least ``n`` rows of
            the returned width; the gradients are written into its first ``n`` rows and
            that view is returned. A DP loop reuses one workspace across steps instead of
            faulting in a fresh ``n x dim`` matrix every step.

        Returns
        -------
        torch.Tensor
            C-contiguous ``(n, manifest.size)`` (or ``(n, trainable_manifest.size)``)
            float32 on :attr:`device`, rows in manifest order; on CPU ``.numpy()`` is a
            zero-copy view (ready for :func:`confide.clip.clip_rows`).

        Raises
        ------
        PrivacyUnsupportedError
            BatchNorm layers (see :meth:`check_per_sample`).
        ShapeError, ArrayTypeError, NonFiniteError, DataError
            Invalid inputs.

        Examples
        --------
        >>> import numpy as np
        >>> t = TorchTrainer.create("small_cnn", 2, (1, 4, 4), seed=0)
        >>> g = t.per_sample_gradients(np.ones((3, 1, 4, 4), np.float32), np.array([0, 1, 1]))
        >>> tuple(g.shape) == (3, t.manifest.size), g.is_contiguous()
        (True, True)
        """
        self.check_per_sample()
        xt, yt = self._inputs(x, y, "per_sample_gradients")
        n = xt.shape[0]
        target = self._trainable_manifest if trainable_only else self._manifest
        partial = self._trainable_index is not None
        if out is None:
            alloc = torch.zeros if partial and not trainable_only else torch.empty
            out = alloc((n, target.size), dtype=torch.float32, device=self._device)
        else:
            out = self._workspace_rows(out, n, target.size)
            if partial and not trainable_only:
                out.zero_()
        if n == 0:
            return out
        offsets = self._per_sample_offsets(trainable_only)
        self._module.train()
        if self._ps_hooks:
            for start in range(0, n, self._chunk):
                stop = min(n, start + self._chunk)
                per_sample_gradients_into(
                    self._module, xt[start:stop], yt[start:stop], out[start:stop], offsets
                )
            return out
        fn = self._per_sample_fn()
        train_set = set(self._trainable)
        params: dict[str, torch.Tensor] = {}
        frozen: dict[str, torch.Tensor] = {}
        for name, p in self._module.named_parameters():
            (params if name in train_set else frozen)[name] = p.detach()
        buffers = {name: b.detach() for name, b in self._module.named_buffers()}
        with torch.no_grad():
            for start in range(0, n, self._chunk):
                stop = min(n, start + self._chunk)
                with torch.enable_grad():
                    grads = fn(params, frozen, buffers, xt[start:stop], yt[start:stop])
                for name, g in grads.items():
                    lo, hi = offsets[name]
                    out[start:stop, lo:hi] = g.reshape(stop - start, -1)
                del grads
        return out
