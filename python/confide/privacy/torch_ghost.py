"""Exact per-patient clipping without materialising every per-sample gradient ("ghost norms").

:func:`confide.privacy.dpsgd.clipped_patient_sum` needs, for one DP-SGD step, only
``sum_p c_p g_p``: each sampled patient's gradient sum ``g_p`` scaled by its clipping factor
``c_p = min(1, C / ||g_p||)``. Writing every record's gradient into a ``(n, dim)`` matrix,
reading it to take norms, rewriting it to clip and reading it again to sum is what made a
64x64 SqueezeNet step cost 1.5-1.8x a plain step (a 92 MB matrix touched four times). For a
layer whose weight gradient of record ``i`` is ``G_i U_i^T`` (``G_i``: the gradient at the
layer's ``T`` output positions, ``U_i``: the unfolded input, from
:func:`confide.training.torch_per_sample.layer_calls`), the patient's layer gradient is
``G_p U_p^T`` with the patient's records' positions side by side, and

* its squared norm is ``sum((G_p^T G_p) * (U_p^T U_p))``: two ``kT x kT`` Gram matrices
  instead of an ``out x in`` product (the "ghost norm" of Goodfellow 2015 / Li et al. 2022);
  cheap when the layer has few positions (the 3x3-spatial Fire layers of SqueezeNet at
  64x64, which hold most of its parameters);
* the clipped sum over patients is one ordinary matrix product
  ``(G * c)(U)^T`` over all records ("book-keeping", Bu et al. 2023), no second backward.

Layers with many positions (where the Gram matrices cost more than the product) keep
materialised per-patient rows; the choice is per layer and per patient, from the patient's
record count only (:func:`plan_layer`), and both kinds enter one norm per patient.

**Exactness.** The guarantee is about the *released sum*: for neighbouring batches ``D`` and
``D' = D`` minus one patient ``q``, ``||S(D) - S(D')|| <= C`` for the float64 vector ``S``
this module returns. Notation: ``v_p`` is patient ``p``'s gradient vector as it enters the
sum, ``c_p`` its clipping factor, ``n_max`` a bound on the batch's records that does not
depend on the data (``max_records``: the trainer's ``per_sample_chunk``; the path refuses
larger batches), ``u = 2^-53``, ``gamma(m) = m u / (1 - m u)``.

1. *What is summed.* On a ghost layer ``v_p`` is ``G_p U_p^T`` exactly (the float32 values
   of ``G`` and ``U``, multiplied in float64, never rounded as a vector); on a materialised
   layer it is the float32 product ``G_p U_p^T`` that torch computes per patient, widened
   to float64 (exact); a bias part is the patient's float64 sum of its float32 per-record
   rows. Whether a layer is ghost or materialised for ``p`` depends on ``k_p`` only
   (:func:`plan_layer` with ``k_p^2``), so ``v_p`` is a function of ``p``'s records.
2. *Norm.* Materialised parts: float64 sums of exact squares. Ghost parts: the computed
   ``s = sum((G_p^T G_p) * (U_p^T U_p))`` differs from ``||G_p U_p^T||^2`` by at most
   ``gamma(K) sum(|G_p|^T|G_p| * |U_p|^T|U_p|) <= gamma(K) ||G_p||_F^2 ||U_p||_F^2``,
   ``K = out + in + (kT)^2 + 1`` (Higham's dot-product bound, any summation order); twice
   that (for the float64 traces) is added to ``s``. With ``(1 + (dim + 8) 2^-52)`` for the
   float64 sums and the square root this gives ``N_v(p) >= ||v_p||``.
3. *The sum's rounding, charged to the patients.* A materialised layer's part of ``S`` is
   a float64 GEMV over at most ``n_max`` patients (one more addition where a layer mixes
   ghost and materialised patients); a ghost layer's part is the float64 product
   ``(G f) U^T`` over ``n T <= n_max T`` positions (``f``: the per-record factors, one
   more rounding for the scaling, one for a mixed layer). Higham's bound
   ``|fl(x^T y) - x^T y| <= gamma(m) |x|^T |y|`` (any order, so any BLAS blocking) gives
   ``|S(D) - sum_p c_p v_p| <= sum_p c_p a_p`` coordinatewise with ``a_p`` depending on
   ``p`` only, and ``||a_p|| <= beta_p = gamma(n_max + 2) ||v_p|| + sum_L gamma(n_max T_L
   + 2) ||G_pL||_F ||U_pL||_F`` (``|| |G||U|^T ||_F <= ||G||_F ||U||_F``; the norm of the
   *product of absolute values*, which cancellation inside ``G_p U_p^T`` does not shrink:
   that is why it is charged separately).
4. *Clip.* ``N_p = N_v(p) + K beta_p`` (rounded up), ``K = 2 n_max / eps``, ``eps =
   2^-16``; ``c_p = C' / N_p * (1 - 2^-20)`` when ``N_p > C'``, else 1, with ``C' = C (1 -
   eps)`` (:func:`clip_target`). So ``c_p ||v_p|| + K c_p beta_p <= C'``.
5. *Sensitivity.* ``c_p``, ``v_p`` and ``beta_p`` depend on ``p``'s records only, so
   ``S(D) - S(D') = c_q v_q + E(D) - E(D')`` with ``||E(D)|| <= sum_{p in D} c_p
   beta_p``: ``||S(D) - S(D')|| <= c_q ||v_q|| + c_q beta_q + 2 sum_{p in D'} c_p beta_p
   <= C' + 2 (n_max - 1) C' / K < C' (1 + eps) = C (1 - eps^2) < C``. Underflow adds at
   most ``2^-1022`` per operation (with or without flushed denormals), far below the
   ``eps C'`` slack for ``C >= 2^-500``; below that, or for a non-finite bound,
   :func:`ghost_clipped_sum` returns ``None`` and the caller runs the materialised path
   (which raises the typed error). Everything is float64, so float32 matmul precision,
   TF32/BF16 reductions (CUDA, not this CPU-only path) and the denormal mode do not enter.

The materialised path of :func:`confide.privacy.dpsgd.clipped_patient_sum` clips a
TorchTrainer's per-patient rows to the same ``C'`` (Rust kernel, ``||row|| <= C'``) and
sums them in float64, so it releases sensitivity ``<= C' (1 + 2 P gamma(P)) < C`` for
``P <= 2^18`` patients in a step. **Not covered** by this argument, as by any DP-SGD
analysis at this level: the float32 rounding inside torch's forward and backward (``G``,
``U`` are taken as functions of the record; a kernel may round differently with the batch
composition), and a neighbouring pair of batches that take different paths (one fits a
chunk, the other not): the two paths' ``v_p`` differ by float32 rounding.

**Why not float32.** Keeping per-patient float32 products for the ghost layers (summing
float32 vectors ``v_p`` with a GEMV) is sound with a margin but measured slower than the
float64 product here (it writes a ``P x out x in`` matrix; benches/README.md). The plain
step's float32 product ``(G f) U^T`` is not: its rounding is bounded by ``gamma32(n T)
|G f||U|^T``, which for a patient whose records cancel is not bounded by anything the
clip controls, and charging it as in step 3 (``K gamma32(n_max T)`` is ~10^3 at 64x64)
would clip every patient far below ``C``.

Only for CPU and modules that pass :func:`~confide.training.torch_per_sample.supports_hooks`
(records do not interact), and only when all sampled records are in one chunk (a patient's
records are then all in this pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from confide.training.torch_per_sample import layer_calls, layer_factors

#: One layer for :func:`clipped_sum_of_factors`: ``(G, U, weight span, bias span)``.
Layer = tuple[torch.Tensor, torch.Tensor, "tuple[int, int] | None", "tuple[int, int] | None"]

__all__ = [
    "CLIP_MARGIN",
    "SHRINK",
    "clip_target",
    "clipped_sum_of_factors",
    "ghost_clipped_sum",
    "ghost_sq_norms",
    "ghost_sq_norms_grouped",
    "plan_layer",
]

#: The Rust kernel's relative margin on the clipping factor (core_rs/src/clip.rs).
SHRINK = 1.0 - 2.0**-20
_U64 = 2.0**-53
#: epsilon of the module docstring: the other patients' rounding shares total <= eps C'.
_EPS = 2.0**-16
#: Every patient is clipped to ``C' = C * CLIP_MARGIN``: ``C' (1 + eps) < C``.
CLIP_MARGIN = 1.0 - _EPS
# Below this clip norm the float64 factor could lose its margin to underflow: fall back.
_MIN_CLIP = 2.0**-500
# Materialising a layer's per-patient rows costs several passes over P x out x in floats; a
# ghost norm costs two Gram products, 2 (k T)^2 (out + in) flops per patient of k records.
# One pass over an element ~ this many flops.
_PASS_FLOPS = 64


def plan_layer(out_dim: int, in_dim: int, positions: int, mean_k: float) -> bool:
    """Whether a layer's per-patient norms are cheaper as ghost norms than materialised.

    Parameters
    ----------
    out_dim, in_dim : int
        The weight gradient is ``out_dim x in_dim`` (``in_dim`` includes the kernel size).
    positions : int
        Output positions ``T`` of one record.
    mean_k : float
        ``k_p^2`` for a patient of ``k_p`` records (:func:`ghost_clipped_sum` plans each
        patient by its own count, so the plan never depends on the other patients).

    Returns
    -------
    bool
        ``True``: ghost norm and one weighted product; ``False``: materialised rows.

    Examples
    --------
    >>> plan_layer(256, 576, 9, 1.0)  # a 3x3-spatial Fire expand layer
    True
    >>> plan_layer(64, 144, 225, 1.0)  # a 15x15-spatial one
    False
    """
    ghost = 2.0 * mean_k * positions * positions * (out_dim + in_dim)
    return ghost <= _PASS_FLOPS * out_dim * in_dim


def _gamma(k: int) -> float:
    return k * _U64 / (1.0 - k * _U64)


def _patient_groups(
    g: torch.Tensor,
    u: torch.Tensor,
    starts: NDArray[np.int64],
    sizes: NDArray[np.int64],
    counts: list[int] | None = None,
) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """Group patients by record count ``k``: ``(indices or None for all, G_p, U_p)``.

    ``G_p`` is ``(P_k, out, k T)`` and ``U_p`` ``(P_k, in, k T)``: each patient's records'
    positions side by side. ``counts``: only these ``k`` (default all).
    """
    n_pat, out_dim, in_dim, t = len(starts), g.shape[1], u.shape[1], g.shape[2]
    groups: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
    for k in np.unique(sizes).tolist() if counts is None else counts:
        sel = np.flatnonzero(sizes == k)
        if len(sel) == n_pat:  # every patient has k records: a reshape, no gather
            if k == 1:
                groups.append((None, g, u))
            else:
                gp = g.reshape(n_pat, k, out_dim, t).permute(0, 2, 1, 3)
                up = u.reshape(n_pat, k, in_dim, t).permute(0, 2, 1, 3)
                groups.append(
                    (None, gp.reshape(n_pat, out_dim, k * t), up.reshape(n_pat, in_dim, k * t))
                )
            continue
        rows = torch.as_tensor(starts[sel][:, None] + np.arange(k)[None, :], device=g.device)
        # (P_k, k, out, T) -> (P_k, out, k T).
        gp = g[rows].permute(0, 2, 1, 3).reshape(len(sel), out_dim, k * t)
        up = u[rows].permute(0, 2, 1, 3).reshape(len(sel), in_dim, k * t)
        idx = None if len(sel) == n_pat else torch.as_tensor(sel, device=g.device)
        groups.append((idx, gp, up))
    return groups


def ghost_sq_norms(
    g: torch.Tensor, u: torch.Tensor, starts: NDArray[np.int64], sizes: NDArray[np.int64]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patient squared norms of ``sum_{i in p} G_i U_i^T`` and a bound on their error.

    Parameters
    ----------
    g : torch.Tensor
        ``(n, out, T)`` float64 output gradients, records of a patient consecutive.
    u : torch.Tensor
        ``(n, in, T)`` float64 unfolded inputs.
    starts, sizes : numpy.ndarray
        First row and record count of each patient.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``(P,)`` float64 computed squared norms and ``(P,)`` float64 bounds on
        ``|computed - exact|`` (exact: of the product of these float64 values).

    Examples
    --------
    >>> import numpy as np, torch
    >>> g, u = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    >>> sq, err = ghost_sq_norms(g, u, np.array([0, 1]), np.array([1, 2]))
    >>> exact = torch.stack([(g[0] @ u[0].T).square().sum(),
    ...                      (g[1] @ u[1].T + g[2] @ u[2].T).square().sum()])
    >>> bool(((sq - exact).abs() <= err).all())
    True
    """
    n_pat = len(starts)
    out_dim, in_dim = g.shape[1], u.shape[1]
    sq = torch.zeros(n_pat, dtype=torch.float64, device=g.device)
    err = torch.zeros(n_pat, dtype=torch.float64, device=g.device)
    for idx, gp, up in _patient_groups(g, u, starts, sizes):
        a = torch.bmm(gp.transpose(1, 2), gp)
        b = torch.bmm(up.transpose(1, 2), up)
        s = (a * b).sum(dim=(1, 2))
        # ||G_p||_F^2 and ||U_p||_F^2 are the traces of the Gram matrices (computed with
        # relative error <= gamma_out, gamma_in; the factor 2 covers them).
        bound = 2.0 * _gamma(out_dim + in_dim + gp.shape[2] ** 2 + 1)
        e = bound * a.diagonal(dim1=1, dim2=2).sum(-1) * b.diagonal(dim1=1, dim2=2).sum(-1)
        if idx is None:
            sq, err = s, e
        else:
            sq[idx] = s
            err[idx] = e
    return sq, err


def ghost_sq_norms_grouped(
    gp: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram-matrix squared norms of ``G_p U_p^T`` for one group of float32 patient factors.

    ``gp``: ``(P_k, out, k T)``, ``up``: ``(P_k, in, k T)`` (float32, or their exact float64
    widening). Returns
    float64 ``(computed, error bound, trace bound)``, the last an upper bound on
    ``||G_p||_F^2 ||U_p||_F^2`` (and so on ``A_p``), from which the patient's share of the
    sum's rounding is bounded.
    """
    g64, u64 = gp.to(torch.float64), up.to(torch.float64)
    out_dim, in_dim, kt = g64.shape[1], u64.shape[1], g64.shape[2]
    a = torch.bmm(g64.transpose(1, 2), g64)
    b = torch.bmm(u64.transpose(1, 2), u64)
    s = (a * b).sum(dim=(1, 2))
    tr = a.diagonal(dim1=1, dim2=2).sum(-1) * b.diagonal(dim1=1, dim2=2).sum(-1)
    e = 2.0 * _gamma(out_dim + in_dim + kt**2 + 1) * tr
    # The computed traces have relative error <= gamma_{out + kT} and gamma_{in + kT}.
    return s, e, tr * (1.0 + _gamma(out_dim + in_dim + 2 * kt + 8))


def clip_target(clip_norm: float) -> float:
    """Return ``C' = C (1 - 2^-16)``, the norm every patient is clipped to (both paths).

    The margin pays for the float64 rounding of the sum over patients (module docstring,
    "Sensitivity of the released sum"); :func:`confide.privacy.dpsgd.clipped_patient_sum`
    clips a :class:`~confide.training.torch_engine.TorchTrainer`'s materialised rows to the
    same ``C'`` (:attr:`~confide.training.torch_engine.TorchTrainer.ghost_clip_margin`), so
    both paths release the same sensitivity.

    Examples
    --------
    >>> clip_target(1.0) == 1.0 - 2.0**-16
    True
    """
    return float(clip_norm) * CLIP_MARGIN


def ghost_clipped_sum(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    patients: NDArray[np.int64],
    clip_norm: float,
    offsets: Mapping[str, tuple[int, int]],
    dim: int,
    *,
    max_records: int | None = None,
    mode: str = "auto",
) -> NDArray[np.float64] | None:
    """``sum_p c_p g_p`` over the patients of one batch, each patient clipped to ``C'``.

    Parameters
    ----------
    module : torch.nn.Module
        Passes :func:`~confide.training.torch_per_sample.supports_hooks`; CPU; training mode.
    x, y : torch.Tensor
        ``(n, *input_shape)`` float32 records and ``(n,)`` int64 labels, sorted by patient.
    patients : numpy.ndarray
        ``(n,)`` sorted patient index of each record (any sorted integers).
    clip_norm : float
        ``C`` (> 0); each patient is clipped to ``C' =`` :func:`clip_target` ``(C)`` so that
        the released sum has sensitivity at most ``C`` (module docstring).
    offsets : mapping of str to (int, int)
        Columns of each trainable parameter in the ``dim``-vector.
    dim : int
        Length of the result (columns of parameters not in ``offsets`` stay 0).
    max_records : int, optional
        A bound on ``n`` that does not depend on the data (the caller's chunk size;
        :class:`~confide.training.torch_engine.TorchTrainer` passes ``per_sample_chunk``).
        The rounding margin of every patient's clip is computed from it, so a patient's
        clipping factor depends on that patient's records only. Default ``n`` (tests and
        direct calls). More than ``max_records`` records: ``None``.
    mode : {"auto", "ghost", "rows"}, default "auto"
        Per layer and per patient by :func:`plan_layer`, or every layer ghost /
        materialised (tests).

    Returns
    -------
    numpy.ndarray or None
        ``(dim,)`` float64 sum of the clipped per-patient gradients, or ``None`` when a value
        is not finite, ``clip_norm < 2**-500`` or ``n > max_records`` (the caller then takes
        the materialised path, which clips with the Rust kernel or raises the typed error).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> x, y = torch.ones(3, 1, 2, 2), torch.tensor([0, 1, 1])
    >>> offsets = {"1.weight": (0, 8), "1.bias": (8, 10)}
    >>> s = ghost_clipped_sum(m, x, y, np.array([0, 0, 1]), 0.5, offsets, 10)
    >>> s.shape, bool(np.linalg.norm(s) <= 2 * 0.5)  # two patients, each clipped to 0.5
    ((10,), True)
    """
    if mode not in ("auto", "ghost", "rows"):
        raise ValueError(f"mode must be 'auto', 'ghost' or 'rows', got {mode!r}")
    n = int(x.shape[0])
    pat = np.asarray(patients, dtype=np.int64)
    if pat.shape != (n,) or (n > 1 and bool((pat[1:] < pat[:-1]).any())):
        raise ValueError(f"patients must be ({n},) sorted indices, got shape {pat.shape}")
    n_max = n if max_records is None else int(max_records)
    if n_max < 1:
        raise ValueError(f"max_records must be >= 1, got {max_records!r}")
    if not (math.isfinite(clip_norm) and clip_norm >= _MIN_CLIP) or n > n_max:
        return None
    if n == 0:
        return np.zeros(dim, dtype=np.float64)
    calls, _skipped = layer_calls(module, x, y, offsets)  # skipped layers: zero gradient

    def layers() -> Iterator[Layer]:
        for m, name, a, g in calls:
            gg, u = layer_factors(m, a, g)
            yield gg, u, offsets.get(f"{name}.weight"), offsets.get(f"{name}.bias")

    with torch.no_grad():
        out = clipped_sum_of_factors(layers(), pat, clip_norm, dim, max_records=n_max, mode=mode)
    if out is None:
        return None
    result: NDArray[np.float64] = out[0].numpy()
    if not np.isfinite(result).all():
        return None
    return result


def clipped_sum_of_factors(
    layers: Iterable[Layer],
    patients: NDArray[np.int64],
    clip_norm: float,
    dim: int,
    *,
    max_records: int,
    mode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Clip and sum as :func:`ghost_clipped_sum` does, from each layer's ``(G, U)``.

    Parameters
    ----------
    layers : iterable of (G, U, weight span or None, bias span or None)
        Per layer: ``(n, out, T)`` and ``(n, in, T)`` float32 factors (record ``i``'s weight
        gradient is ``G[i] @ U[i]^T``, its bias gradient ``G[i].sum(-1)``) and the columns
        of the layer's weight and bias in the result. Consumed once, in order.
    patients : numpy.ndarray
        ``(n,)`` sorted patient index of each record.
    clip_norm : float
        ``C``; every patient is clipped to :func:`clip_target` ``(C)``.
    dim : int
        Length of the result.
    max_records : int
        Data-independent bound on ``n`` (see :func:`ghost_clipped_sum`).
    mode : {"auto", "ghost", "rows"}
        As in :func:`ghost_clipped_sum`.

    Returns
    -------
    (torch.Tensor, torch.Tensor) or None
        The ``(dim,)`` float64 clipped sum and the ``(P,)`` float64 clipping factors
        ``c_p``; ``None`` when a norm bound is not finite, ``clip_norm < 2**-500`` or
        ``n > max_records``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> g, u = torch.ones(2, 1, 1), torch.ones(2, 3, 1)  # two records, one patient each
    >>> total, c = clipped_sum_of_factors([(g, u, (0, 3), None)], np.array([0, 1]), 1.0, 3,
    ...                                   max_records=2)
    >>> bool(c.max() < 1.0), bool(torch.linalg.vector_norm(total) <= 2 * clip_target(1.0))
    (True, True)
    """
    pat = np.asarray(patients, dtype=np.int64)
    n = int(pat.shape[0])
    n_max = int(max_records)
    if mode not in ("auto", "ghost", "rows"):
        raise ValueError(f"mode must be 'auto', 'ghost' or 'rows', got {mode!r}")
    if not (math.isfinite(clip_norm) and clip_norm >= _MIN_CLIP) or n > n_max or n == 0:
        return None
    total = torch.zeros(dim, dtype=torch.float64)
    starts = np.flatnonzero(np.r_[True, pat[1:] != pat[:-1]]).astype(np.int64)
    sizes = np.diff(np.r_[starts, n]).astype(np.int64)
    n_pat = len(starts)
    single = bool((sizes == 1).all())
    local = torch.as_tensor(np.repeat(np.arange(n_pat), sizes))
    # K of the module docstring: each patient's share of the sum's rounding, times K, enters
    # its own norm bound, so the other (at most n_max - 1) patients' shares total <= eps C'.
    big_k = 2.0 * n_max / _EPS

    sq = torch.zeros(n_pat, dtype=torch.float64)
    err = torch.zeros(n_pat, dtype=torch.float64)
    share = torch.zeros(n_pat, dtype=torch.float64)  # sum of the ghost layers' beta_p
    # Ghost layers: (G, U, span, per-record mask of the patients on the ghost norm or None).
    ghosts: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor | None]] = []
    # Materialised float64 per-patient rows: (patients or None for all, rows, span).
    rows: list[tuple[torch.Tensor | None, torch.Tensor, tuple[int, int]]] = []
    length = 0  # coordinates that enter a norm (for the float64 summation margin)

    def patient_rows(r: torch.Tensor) -> torch.Tensor:
        # float64 per-patient bias rows: per-record rows widened (exactly), several records
        # of a patient summed in float64. Norm and weighted sum use these values.
        r64 = r.to(torch.float64)
        if single:
            return r64
        acc = torch.zeros(n_pat, r.shape[1], dtype=torch.float64)
        acc.index_add_(0, local, r64)
        return acc

    def add_rows(idx: torch.Tensor | None, r64: torch.Tensor, span: tuple[int, int]) -> None:
        # Squared row norms in float64 (exact squares of float32-exact values, float64 sums).
        s = torch.linalg.vecdot(r64, r64)
        if idx is None:
            sq.add_(s)
        else:
            sq.index_add_(0, idx, s)
        rows.append((idx, r64, span))

    for gg, u, w, b in layers:
        if w is not None:
            out_dim, in_dim, t = gg.shape[1], u.shape[1], gg.shape[2]
            # The plan depends on a patient's record count only (not on the batch).
            ks = np.unique(sizes).tolist()
            ghost_ks = [
                k
                for k in ks
                if mode == "ghost"
                or (mode == "auto" and plan_layer(out_dim, in_dim, t, float(k * k)))
            ]
            row_ks = [k for k in ks if k not in ghost_ks]
            for idx, gp, up in _patient_groups(gg, u, starts, sizes, row_ks) if row_ks else []:
                # float32 product G_p U_p^T over the patient's positions side by side (one
                # row per patient), widened exactly to float64.
                prod = torch.bmm(gp, up.transpose(1, 2)).reshape(gp.shape[0], -1)
                add_rows(idx, prod.to(torch.float64), w)
            if ghost_ks:
                g64, u64 = gg.to(torch.float64), u.to(torch.float64)  # exact
                for idx, gp, up in _patient_groups(g64, u64, starts, sizes, ghost_ks):
                    s, e, tr = ghost_sq_norms_grouped(gp, up)
                    beta = _gamma(n_max * t + 2) * tr.sqrt()
                    for acc, val in ((sq, s), (err, e), (share, beta)):
                        if idx is None:
                            acc.add_(val)
                        else:
                            acc.index_add_(0, idx, val)
                if not row_ks:
                    ghosts.append((g64, u64, w, None))
                else:  # the other patients' records get factor 0 (exact zeros)
                    on = torch.as_tensor(np.isin(sizes, ghost_ks), dtype=torch.float64)
                    ghosts.append((g64, u64, w, on[local]))
            length += w[1] - w[0]
        if b is not None:
            add_rows(None, patient_rows(gg.sum(dim=2)), b)
            length += b[1] - b[0]
    upper = (sq + err) * (1.0 + (length + 8) * 2.0**-52)
    norms = upper.sqrt() * (1.0 + 2.0**-52)
    # N_p >= ||v_p|| + K beta_p (beta_p: the patient's share of the sum's rounding).
    bound = (norms * (1.0 + big_k * _gamma(n_max + 2)) + big_k * share * (1.0 + 2.0**-40)) * (
        1.0 + 2.0**-50
    )
    if not bool(torch.isfinite(bound).all()):
        return None
    c = clip_target(clip_norm)
    factor = torch.where(bound > c, c / bound * SHRINK, torch.ones_like(bound))
    for idx, r64, (lo, hi) in rows:
        total[lo:hi] += (factor if idx is None else factor[idx]) @ r64
    per_record = factor[local]
    for g64, u64, (lo, hi), keep in ghosts:
        out_dim, in_dim = g64.shape[1], u64.shape[1]
        f = per_record if keep is None else per_record * keep
        gc = (g64 * f[:, None, None]).permute(1, 0, 2).reshape(out_dim, -1)
        uu = u64.permute(0, 2, 1).reshape(-1, in_dim)
        total[lo:hi] += (gc @ uu).reshape(-1)
    return total, factor
