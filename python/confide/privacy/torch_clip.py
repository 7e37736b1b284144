"""Per-row L2 clipping of torch tensors with the Rust kernel's exact norm bound.

DP-SGD's guarantee rests on one inequality: after clipping, every per-patient gradient has
L2 norm at most ``C``. The Rust kernel (:func:`confide.clip.clip_rows`, ``core_rs/src/clip.rs``)
makes it hold *exactly* in float32: norms are accumulated in float64 and the scale factor
``C / norm`` is shrunk by ``2**-20`` before it is rounded to float32, which absorbs the
rounding of the factor and of each scaled element.

This module gives torch tensors the same treatment:

* :func:`clip_rows` dispatches: a CPU tensor is clipped in place by the Rust kernel through a
  zero-copy numpy view (:func:`as_numpy`); any other device (CUDA) goes to
  :func:`clip_rows_torch`.
* :func:`clip_rows_torch` is the same algorithm in torch ops, so it runs where the tensor
  lives: float64 norms (row blocks, to bound the temporary memory), the same shrunk factor
  rounded to float32, one multiply per element. Then it *verifies*: the float64 norm of
  every clipped row is recomputed and any row still above ``C`` is halved until it is not.
  That only happens in the subnormal range (a subnormal ``C``, or ``norm / C > 2**126`` so
  the float32 factor itself is subnormal: rounding it, or a product, can then lose more
  than the ``2**-20`` margin; the Rust kernel handles that range by scaling in float64 and
  rounding toward zero instead); such a row is clipped again with a fresh factor, then
  halved if need be. That makes the bound unconditional.

Inputs holding NaN or Inf are rejected before anything is written, as in the Rust kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray

from confide.clip import clip_rows as _rust_clip_rows
from confide.errors import ArrayTypeError, InvalidArgumentError, NonFiniteError

__all__ = ["SHRINK", "as_numpy", "clip_rows", "clip_rows_torch", "row_norms"]

#: Relative safety margin on the clipping factor; equal to ``SHRINK`` in core_rs/src/clip.rs.
SHRINK = 1.0 - 2.0**-20

# float64 temporaries of at most this many elements per block (32 MiB).
_BLOCK_ELEMENTS = 1 << 22
# Halving a nonzero float32 strictly shrinks it (to zero within ~280 halvings), so the
# verification loop always ends; this cap only guards against a broken device.
_MAX_HALVINGS = 400


def _check_matrix(x: object, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ArrayTypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise ArrayTypeError(f"{what} must be float32, got {x.dtype}")
    if x.ndim != 2:
        raise ArrayTypeError(f"{what} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ArrayTypeError(f"{what} must be C-contiguous")
    return x


def _check_max_norm(max_norm: float) -> float:
    if (
        not isinstance(max_norm, int | float)
        or isinstance(max_norm, bool)
        or not math.isfinite(max_norm)
        or max_norm <= 0
    ):
        raise InvalidArgumentError(f"max_norm must be finite and > 0, got {max_norm!r}")
    return float(max_norm)


def as_numpy(x: torch.Tensor) -> NDArray[np.float32]:
    """Return a writeable numpy view of a CPU float32 C-contiguous tensor (no copy).

    Parameters
    ----------
    x : torch.Tensor
        CPU, float32, C-contiguous; gradients are detached (the view shares memory).

    Returns
    -------
    numpy.ndarray
        Shares ``x``'s memory: writes through either are seen by both.

    Raises
    ------
    ArrayTypeError
        ``x`` is not a CPU float32 contiguous tensor.

    Examples
    --------
    >>> t = torch.zeros(2, 3)
    >>> v = as_numpy(t)
    >>> v[0, 0] = 5.0
    >>> float(t[0, 0])
    5.0
    """
    if not isinstance(x, torch.Tensor):
        raise ArrayTypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ArrayTypeError(f"a numpy view needs a CPU tensor, got device {x.device}")
    if x.dtype != torch.float32:
        raise ArrayTypeError(f"expected float32, got {x.dtype}")
    if not x.is_contiguous():
        raise ArrayTypeError("expected a C-contiguous tensor")
    view: NDArray[np.float32] = x.detach().numpy()
    return view


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every row, accumulated in float64, on ``x``'s device.

    Parameters
    ----------
    x : torch.Tensor
        ``(rows, dim)`` float32, C-contiguous.

    Returns
    -------
    torch.Tensor
        ``(rows,)`` float64.

    Examples
    --------
    >>> row_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [5.0, 0.0]
    """
    x = _check_matrix(x)
    rows, dim = x.shape
    out = torch.empty(rows, dtype=torch.float64, device=x.device)
    block = max(1, _BLOCK_ELEMENTS // max(1, dim))
    for lo in range(0, rows, block):
        hi = min(rows, lo + block)
        # Squares of float32 values are exact in float64, so only the summation rounds
        # (relative error ~ dim * 2**-53, far below the 2**-20 margin).
        out[lo:hi] = x[lo:hi].to(torch.float64).square().sum(dim=1).sqrt()
    return out


def clip_rows_torch(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Clip every row of ``x`` in place to L2 norm at most ``max_norm``, in torch ops.

    Same algorithm and factor as the Rust kernel, on any device, plus a verification pass
    that makes ``||row||_2 <= max_norm`` hold for every row even in the subnormal range.

    Parameters
    ----------
    x : torch.Tensor
        Writeable ``(rows, dim)`` float32, C-contiguous, any device; modified in place.
    max_norm : float
        Finite bound > 0.

    Returns
    -------
    torch.Tensor
        ``(rows,)`` float64 norms before clipping, on ``x``'s device.

    Raises
    ------
    ArrayTypeError
        ``x`` is not a 2-D float32 contiguous tensor.
    NonFiniteError
        A row holds NaN or Inf (no row is modified).
    InvalidArgumentError
        ``max_norm`` is not finite and positive.

    Examples
    --------
    >>> g = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> [round(v, 4) for v in clip_rows_torch(g, 1.0).tolist()]
    [5.0, 0.5]
    >>> bool((row_norms(g) <= 1.0).all())
    True
    """
    x = _check_matrix(x)
    c = _check_max_norm(max_norm)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.float64, device=x.device)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    norms = row_norms(x)
    finite = torch.isfinite(norms)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        raise NonFiniteError(f"row {i} of x holds NaN or Inf (norm {float(norms[i])})")
    over = norms > c
    if not bool(over.any()):
        return norms
    # The Rust kernel: f = (max_norm / norm * SHRINK) as f32 (round to nearest), then
    # v *= f for every element of an over-norm row.
    factor = torch.where(over, c / norms * SHRINK, torch.ones_like(norms)).to(torch.float32)
    # In place over all rows: a factor of exactly 1.0 leaves the other rows bit-identical.
    x.mul_(factor.unsqueeze(1))
    # Verify the bound on the rows just scaled. It fails only when the float32 factor or
    # the products are subnormal (norm / max_norm > 2**126, or a subnormal max_norm), where
    # one rounding can exceed the 2**-20 margin. Such a row is now within a few ulps of
    # the bound in the normal range, so clipping it once more with a fresh factor fixes it;
    # if the elements themselves are subnormal, halving (which strictly shrinks every
    # nonzero float32) ends in at most ~280 steps.
    bad = over & (row_norms(x) > c)
    for attempt in range(_MAX_HALVINGS):
        if not bool(bad.any()):
            return norms
        idx = bad.nonzero().squeeze(1)
        rows = x[idx]
        if attempt < 2:
            rows *= (c / row_norms(rows) * SHRINK).to(torch.float32).unsqueeze(1)
        else:
            rows *= 0.5
        x[idx] = rows
        bad = torch.zeros_like(over)
        bad[idx] = row_norms(rows) > c
    idx = bad.nonzero().squeeze(1)
    x[idx] = 0.0  # unreachable on IEEE hardware; zero rows trivially meet the bound
    return norms


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Clip every row of a torch matrix in place: Rust kernel on CPU, torch elsewhere.

    Parameters
    ----------
    x : torch.Tensor
        Writeable ``(rows, dim)`` float32, C-contiguous.
    max_norm : float
        Finite bound > 0.

    Returns
    -------
    torch.Tensor
        ``(rows,)`` float64 norms before clipping (on CPU for a CPU ``x``).

    Examples
    --------
    >>> g = torch.tensor([[3.0, 4.0]])
    >>> clip_rows(g, 1.0).tolist()
    [5.0]
    >>> bool(row_norms(g)[0] <= 1.0)
    True
    """
    x = _check_matrix(x)
    if x.device.type == "cpu":
        # In place through the shared-memory view: no copy of the (rows, dim) matrix.
        return torch.from_numpy(_rust_clip_rows(as_numpy(x), max_norm))
    return clip_rows_torch(x, max_norm)
