"""Per-sample gradients of vetted conv nets from one batched backward pass (no ``vmap``).

``torch.func``'s ``vmap(grad(...))`` (the general path of
:meth:`~confide.training.torch_engine.TorchTrainer.per_sample_gradients`) runs the backward
pass of every record as its own small convolution: at 64x64 on CPU that alone cost 1.7-2.5x
a plain SGD step of SqueezeNet 1.1. This module computes the same gradients from one ordinary
batched forward and backward pass, as the "hooks" grad samplers of Opacus and of Goodfellow
(2015) do:

* every trainable ``nn.Conv2d`` / ``nn.Linear`` saves its input ``a`` in a forward hook, and
  the gradient ``G`` of the *summed* loss with respect to its output is captured;
* with ``loss = sum_i loss_i`` and records that do not interact, ``G[i]`` is the gradient of
  ``loss_i`` alone, so record ``i``'s weight gradient is ``G[i] @ unfold(a[i])^T`` (one
  batched matrix product per layer, written straight into the caller's rows) and its bias
  gradient is ``G[i]`` summed over positions;
* the parameters are not differentiated by autograd (``requires_grad`` is off during the
  pass), so no batch weight gradient is computed and thrown away.

**Only for modules whose records cannot interact.** The identity ``G[i] = d loss_i / d out``
holds only if no layer mixes the records of a batch (BatchNorm does; a custom module might).
:func:`supports_hooks` therefore accepts a module only if *every* submodule is of a vetted
type (exactly, not a subclass): confide's :class:`~confide.training.torch_models.SqueezeNet11`,
:class:`~confide.training.torch_models.Fire` and
:class:`~confide.training.torch_models.SmallCNN`, and the record-wise torch layers listed in
``_RECORDWISE``; no instance-level ``forward`` override and no user hooks; every trainable
parameter is a ``weight`` or ``bias`` of a plain ``Conv2d`` (zero padding, integer padding,
one group) or ``Linear``. Anything else keeps the ``vmap`` path. Dropout draws one mask per
element in both paths, so the gradients are per-record either way (the masks differ from the
``vmap`` path's draws: dropout randomness is not a secret and is not reproduced across paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from confide.training.torch_models import Fire, SmallCNN, SqueezeNet11

__all__ = ["layer_calls", "layer_factors", "per_sample_gradients_into", "supports_hooks"]

# Layers without parameters that act on each record separately (no batch statistics).
_RECORDWISE: tuple[type[nn.Module], ...] = (
    nn.Sequential,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Identity,
    nn.Flatten,
)
# confide's own architectures: their forward code is record-wise (read in torch_models.py).
_VETTED: tuple[type[nn.Module], ...] = (SqueezeNet11, Fire, SmallCNN)
_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def _plain_conv(m: nn.Conv2d) -> bool:
    return (
        m.groups == 1
        and m.padding_mode == "zeros"
        and isinstance(m.padding, tuple)
        and all(isinstance(p, int) for p in m.padding)
    )


def _has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or getattr(m, "_backward_pre_hooks", None)
    )


def supports_hooks(module: nn.Module, trainable: set[str]) -> bool:
    """Whether :func:`per_sample_gradients_into` gives exact per-record gradients of ``module``.

    Parameters
    ----------
    module : torch.nn.Module
        The model.
    trainable : set of str
        Names (``named_parameters()``) of the parameters to differentiate.

    Returns
    -------
    bool
        ``True`` only if every submodule is of a vetted record-wise type (exact type match),
        none carries hooks or an instance ``forward``, every trainable parameter is the
        ``weight`` or ``bias`` of a plain ``Conv2d`` or ``Linear`` and no parameter is
        shared between modules.

    Examples
    --------
    >>> from torch import nn
    >>> supports_hooks(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), {"1.weight", "1.bias"})
    True
    >>> supports_hooks(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), {"0.weight"})
    False
    """
    allowed = _RECORDWISE + _VETTED + _LAYERS
    seen: set[int] = set()
    for name, m in module.named_modules(remove_duplicate=False):
        if type(m) not in allowed or "forward" in vars(m) or _has_hooks(m):
            return False
        if isinstance(m, nn.Conv2d) and not _plain_conv(m):
            return False
        if isinstance(m, nn.Flatten) and m.start_dim == 0:
            return False  # flattening the batch dimension would mix the records
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                return False  # shared weights: one module's gradient is not the whole story
            seen.add(id(p))
            full = f"{name}.{pname}" if name else pname
            if full in trainable and (type(m) not in _LAYERS or pname not in ("weight", "bias")):
                return False
    return len(seen) == sum(1 for _ in module.parameters())


def layer_factors(
    m: nn.Module, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched per-record ``(G, U)``: ``(n, out, T)`` and ``(n, in, T)`` over ``T`` positions.

    Record ``i``'s weight gradient (flattened as the layer's weight) is ``G[i] @ U[i]^T`` and
    its bias gradient ``G[i].sum(-1)``.
    """
    n = a.shape[0]
    if isinstance(m, nn.Conv2d):
        gg = g.reshape(n, g.shape[1], -1)  # (n, out, positions)
        if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0):
            u = a.reshape(n, a.shape[1], -1)  # a 1x1 convolution needs no unfold
        else:
            pad = m.padding
            if isinstance(pad, str):  # supports_hooks refuses string padding
                raise RuntimeError(f"padding {pad!r} is not supported by the hooks path")
            u = F.unfold(a, m.kernel_size, m.dilation, pad, m.stride)
        return gg, u
    # Linear on (n, ..., in): positions are the middle dimensions.
    return g.reshape(n, -1, g.shape[-1]).transpose(1, 2), a.reshape(n, -1, a.shape[-1]).transpose(
        1, 2
    )


def layer_calls(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    names: Mapping[str, tuple[int, int]],
) -> tuple[list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]], list[tuple[nn.Module, str]]]:
    """One batched forward/backward pass: each trainable layer's input and output gradient.

    ``module`` must pass :func:`supports_hooks`. The loss is the *summed* cross-entropy, so
    record ``i``'s gradient with respect to a layer's output is row ``i`` of the captured
    gradient (records do not interact). Shared by :func:`per_sample_gradients_into` and the
    ghost-norm clipping of :mod:`confide.privacy.torch_ghost`.

    Parameters
    ----------
    module : torch.nn.Module
        The model, in the mode the caller wants (training mode for DP-SGD).
    x, y : torch.Tensor
        ``(n, *input_shape)`` float32 inputs and ``(n,)`` int64 labels.
    names : mapping of str
        Keys are the parameter names (``named_parameters()``) to differentiate.

    Returns
    -------
    calls : list of (module, str, torch.Tensor, torch.Tensor)
        ``(layer, layer name, detached input, gradient of the summed loss w.r.t. its
        output)`` per trainable layer call, in forward order.
    skipped : list of (module, str)
        Trainable layers the forward pass did not run (their gradient is zero).
    """
    owners: dict[nn.Module, str] = {}
    for name, m in module.named_modules():
        if isinstance(m, _LAYERS) and any(
            f"{name}.{p}" in names for p, _ in m.named_parameters(recurse=False)
        ):
            owners[m] = name
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(m: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:  # the first trainable layer: start the graph here
            output = output.detach().requires_grad_(True)
        calls.append((m, inputs[0].detach(), output))
        return output

    handles = [m.register_forward_hook(hook) for m in owners]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            loss = F.cross_entropy(module(x), y, reduction="sum")
            if len({id(m) for m, _, _ in calls}) != len(calls):
                raise RuntimeError(
                    "a trainable layer ran more than once in one forward pass, so per-record "
                    "gradients cannot be read off its hooks"
                )
            grads = torch.autograd.grad(loss, [o for _, _, o in calls], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    called = {id(m) for m, _, _ in calls}
    skipped = [(m, name) for m, name in owners.items() if id(m) not in called]
    out = [
        (m, owners[m], a, torch.zeros_like(o) if g is None else g)
        for (m, a, o), g in zip(calls, grads, strict=True)
    ]
    return out, skipped


def per_sample_gradients_into(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    offsets: Mapping[str, tuple[int, int]],
) -> None:
    """Write each record's cross-entropy gradient into the rows of ``out``.

    ``module`` must pass :func:`supports_hooks` for the parameters named in ``offsets`` (the
    caller checks once). Columns of parameters not in ``offsets`` are left untouched.

    Parameters
    ----------
    module : torch.nn.Module
        The model, in the mode the caller wants (training mode for DP-SGD).
    x : torch.Tensor
        ``(n, *input_shape)`` float32 inputs on the module's device.
    y : torch.Tensor
        ``(n,)`` int64 labels.
    out : torch.Tensor
        ``(n, dim)`` float32 rows (a row-contiguous view is enough), same device.
    offsets : mapping of str to (int, int)
        Column range of each trainable parameter in a row of ``out``.
    """
    n = x.shape[0]
    calls, skipped = layer_calls(module, x, y, offsets)
    with torch.no_grad():
        for m, name in skipped:  # a layer the forward pass skipped has zero gradient
            for pname, _ in m.named_parameters(recurse=False):
                span = offsets.get(f"{name}.{pname}")
                if span is not None:
                    out[:, span[0] : span[1]] = 0.0
        for m, name, a, g in calls:
            gg, u = layer_factors(m, a, g)
            w = offsets.get(f"{name}.weight")
            if w is not None:
                view = out[:, w[0] : w[1]].view(n, gg.shape[1], u.shape[1])
                torch.bmm(gg, u.transpose(1, 2), out=view)
            b = offsets.get(f"{name}.bias")
            if b is not None:
                torch.sum(gg, dim=2, out=out[:, b[0] : b[1]])
