"""Internal reference driver: DP-SGD logistic regression and in-process FedAvg.

Used by the tests and ``benches/python/bench_privacy.py`` until the real numpy trainer
(``confide.training``) is wired to :mod:`confide.privacy`. Not public API; kept small on
purpose. Parameters are one flat float32 vector ``[w (dim), b]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from confide.noise import SecureRng
from confide.privacy.client_dp import (
    DDGParams,
    add_central_noise,
    clip_update,
    ddg_decode,
    ddg_encode,
    rotation_seed,
)
from confide.privacy.dpsgd import DPSGD, poisson_sample_patients

__all__ = [
    "Site",
    "accuracy",
    "fedavg",
    "local_dpsgd",
    "local_sgd",
    "logistic_loss",
    "per_sample_grads",
]

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Site:
    """One site's training data.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, dim)`` float32 features.
    y : numpy.ndarray
        ``(n,)`` labels in {0, 1}.
    patient_ids : numpy.ndarray, optional
        ``(n,)`` patient of each row; each row is its own patient when omitted.
    """

    x: F32
    y: NDArray[np.floating]
    patient_ids: NDArray[np.generic] | None = None

    @property
    def ids(self) -> NDArray[np.generic]:
        """Patient ids (row indices when none were given)."""
        return np.arange(self.x.shape[0]) if self.patient_ids is None else self.patient_ids

    @property
    def n_patients(self) -> int:
        """Number of distinct patients."""
        return int(np.unique(self.ids).size)


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * z))
    return out


def per_sample_grads(params: F32, x: F32, y: NDArray[np.floating]) -> F32:
    """Exact per-sample gradients of the logistic loss, ``(n, dim + 1)``.

    Parameters
    ----------
    params : numpy.ndarray
        ``[w, b]``.
    x : numpy.ndarray
        ``(n, dim)`` features.
    y : numpy.ndarray
        ``(n,)`` labels.

    Returns
    -------
    numpy.ndarray
        C-contiguous float32 ``(n, dim + 1)``.
    """
    w = params[:-1].astype(np.float64)
    b = float(params[-1])
    r = _sigmoid(x.astype(np.float64) @ w + b) - y.astype(np.float64)
    g = np.empty((x.shape[0], x.shape[1] + 1), dtype=np.float32)
    g[:, :-1] = r[:, None] * x
    g[:, -1] = r
    return g


def logistic_loss(params: F32, x: F32, y: NDArray[np.floating]) -> float:
    """Mean logistic loss."""
    z = x.astype(np.float64) @ params[:-1].astype(np.float64) + float(params[-1])
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def accuracy(params: F32, x: F32, y: NDArray[np.floating]) -> float:
    """Fraction of correct 0/1 predictions."""
    z = x.astype(np.float64) @ params[:-1].astype(np.float64) + float(params[-1])
    return float(np.mean((z > 0) == (y > 0.5)))


def local_sgd(params: F32, site: Site, steps: int, lr: float, batch: int, rng: SecureRng) -> F32:
    """Non-private minibatch SGD (Poisson batches of expected size ``batch``)."""
    p = params.copy()
    q = min(1.0, batch / site.n_patients)
    for _ in range(steps):
        rows = poisson_sample_patients(site.ids, q, rng)
        if rows.size == 0:
            continue
        g = per_sample_grads(p, site.x[rows], site.y[rows]).mean(axis=0)
        p = (p - lr * g).astype(np.float32)
    out: F32 = p
    return out


def local_dpsgd(
    params: F32,
    site: Site,
    steps: int,
    lr: float,
    opt: DPSGD,
    sampling_rate: float,
    rng: SecureRng,
) -> F32:
    """Run ``steps`` DP-SGD steps, Poisson-sampling patients at rate ``sampling_rate``."""
    p = params.copy()
    opt.reset_momentum()
    for _ in range(steps):
        rows = poisson_sample_patients(site.ids, sampling_rate, rng)
        g = per_sample_grads(p, site.x[rows], site.y[rows])
        ids = None if site.patient_ids is None else site.patient_ids[rows]
        p = opt.step(p, g, lr, ids)
    out: F32 = p
    return out


def fedavg(
    params: F32,
    updates: Sequence[F32],
    *,
    weights: Sequence[float] | None = None,
    clip_norm: float | None = None,
    noise_multiplier: float = 0.0,
    ddg: DDGParams | None = None,
    job_seed: bytes = b"reference",
    round_id: int = 0,
    rng: SecureRng | None = None,
) -> F32:
    """Aggregate client *deltas* into the new global model.

    Without ``clip_norm``: weighted FedAvg. With ``clip_norm``: client-level DP, uniform
    weights, the sum of clipped deltas noised centrally (``noise_multiplier``) or via DDG
    (``ddg``), normalised by the public cohort size ``len(updates)``.
    """
    rng = SecureRng() if rng is None else rng
    n = len(updates)
    if clip_norm is None:
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        avg = sum(wi * u.astype(np.float64) for wi, u in zip(w, updates, strict=True)) / w.sum()
        new: F32 = (params + avg).astype(np.float32)
        return new
    if ddg is None:
        total = sum(clip_update(u, clip_norm)[0].astype(np.float64) for u in updates)
        mean = add_central_noise(
            np.asarray(total), noise_multiplier, clip_norm, normalize_by=n, rng=rng
        )
        return (params + mean).astype(np.float32)
    seed = rotation_seed(job_seed, round_id)
    modulus = np.uint64(1) << np.uint64(ddg.bits)
    ring = np.zeros(ddg.padded_dim, dtype=np.uint64)
    for u in updates:
        ring = (ring + ddg_encode(u, ddg, seed, rng=rng).astype(np.uint64)) % modulus
    return (params + ddg_decode(ring, ddg, seed, normalize_by=n)).astype(np.float32)
