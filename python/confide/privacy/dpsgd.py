"""Patient-level (sample-level) DP-SGD: Poisson sampling, per-patient clipping, noise.

One DP-SGD step, as accounted by :func:`confide.privacy.accountant.dpsgd_event`:

1. **Poisson sampling** of *patients*: every patient is in the batch independently with
   probability ``q`` (:func:`poisson_sample_patients`; uniform variates come from
   :class:`confide.SecureRng`, never from numpy's RNG). All records of a sampled patient go
   into the batch. The batch size is random; that is what the accountant assumes.
2. **Per-patient clipping**: the trainer supplies exact per-record gradients; rows that share
   a ``patient_id`` are *summed first* and the sum is clipped to L2 norm ``C`` by the Rust
   kernel :func:`confide.clip_rows`. So the guarantee protects a patient, however many
   records they have. Without ``patient_ids`` every row is its own patient (sample-level DP,
   correct only if no patient has two rows).
3. **Noise**: the clipped sum gets Gaussian noise of std ``z * C`` from the Rust core's lattice
   sampler (:func:`confide.add_gaussian_noise`).
4. **Normalisation** by the *expected* batch size ``q * n_patients`` (a public constant), not
   by the realised, data-dependent count, which would itself leak.
5. Optional **heavy-ball momentum** (``v <- mu v + g``; the update is ``lr * v``), as in
   Dopamine (Malekzadeh et al. 2021): post-processing of the noised gradients, so free in
   privacy.

:func:`run_dpsgd` is the loop every engine's sample-level DP round goes through: the
engine (a :class:`~confide.training.base.PerSampleTrainer`) only supplies per-record
gradients at its current weights, in chunks of at most ``trainer.per_sample_chunk`` records;
sampling, per-patient summing, clipping, noise, normalisation, momentum and the weight
update are done here. An engine cannot skip them, and one that cannot give per-sample
gradients cannot run a sample-level round (:class:`~confide.errors.PrivacyUnsupportedError`).
Gradients may be numpy arrays or torch tensors: CPU tensors are viewed as numpy arrays
without a copy and clipped by the Rust kernel; CUDA tensors are clipped on the device by
:mod:`confide.privacy.torch_clip`, which gives the same exact norm bound. The noise always
comes from the Rust core's CSPRNG on the CPU, never from torch's or numpy's generator.

Everything after step 3 is post-processing; the privacy of a run is that of
``steps`` compositions of the Poisson-subsampled Gaussian mechanism with noise multiplier
``z``, under add/remove of one patient of this site's dataset.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from confide.clip import clip_rows
from confide.errors import (
    ConfigError,
    InvalidPrivacyConfig,
    ManifestError,
    PrivacyUnsupportedError,
)
from confide.noise import SecureRng, add_gaussian_noise
from confide.privacy._random import uniforms as _uniforms

if TYPE_CHECKING:
    from confide.training.base import FitResult, PerSampleTrainer, SiteData, TrainConfig

__all__ = [
    "DPSGD",
    "clipped_patient_sum",
    "group_by_patient",
    "poisson_sample",
    "poisson_sample_patients",
    "run_dpsgd",
]


def _check_rate(q: float) -> float:
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise InvalidPrivacyConfig(f"sampling rate q must be in [0, 1], got {q}")
    return q


def poisson_sample(n: int, q: float, rng: SecureRng) -> NDArray[np.int64]:
    """Return the indices of a Poisson sample: each of ``n`` units kept with prob. ``q``.

    Parameters
    ----------
    n : int
        Population size.
    q : float
        Inclusion probability in [0, 1].
    rng : SecureRng
        Source of randomness (a seeded one for reproducible tests).

    Returns
    -------
    numpy.ndarray
        Sorted ``int64`` indices of the sampled units (possibly empty).

    Examples
    --------
    >>> idx = poisson_sample(1000, 0.1, SecureRng(bytes(32)))
    >>> bool(50 < len(idx) < 150)
    True
    """
    q = _check_rate(q)
    if n < 0:
        raise InvalidPrivacyConfig(f"n must be >= 0, got {n}")
    return np.flatnonzero(_uniforms(n, rng) < q).astype(np.int64)


def poisson_sample_patients(
    patient_ids: NDArray[np.generic], q: float, rng: SecureRng
) -> NDArray[np.int64]:
    """Row indices of a Poisson sample of *patients* (all rows of each sampled patient).

    Patients are ordered by ``numpy.unique`` of their ids, so the draw for a patient does
    not depend on the order of the rows.

    Parameters
    ----------
    patient_ids : numpy.ndarray
        1-D array, one id per row (any hashable numpy dtype).
    q : float
        Inclusion probability of a patient.
    rng : SecureRng
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        Sorted ``int64`` row indices.

    Examples
    --------
    >>> import numpy as np
    >>> ids = np.array([7, 7, 3, 3, 3])
    >>> rows = poisson_sample_patients(ids, 1.0, SecureRng(bytes(32)))
    >>> rows.tolist()
    [0, 1, 2, 3, 4]
    """
    q = _check_rate(q)
    _, inverse = np.unique(np.asarray(patient_ids), return_inverse=True)
    n_patients = int(inverse.max()) + 1 if inverse.size else 0
    chosen = _uniforms(n_patients, rng) < q
    return np.flatnonzero(chosen[inverse]).astype(np.int64)


def group_by_patient(
    per_sample_grads: NDArray[np.floating], patient_ids: NDArray[np.generic]
) -> NDArray[np.float32]:
    """Sum per-record gradients of the same patient: ``(n, dim) -> (n_patients, dim)``.

    Parameters
    ----------
    per_sample_grads : numpy.ndarray
        ``(n, dim)`` gradients, one row per record.
    patient_ids : numpy.ndarray
        ``(n,)`` patient id of each row.

    Returns
    -------
    numpy.ndarray
        C-contiguous ``float32`` ``(n_patients, dim)``, patients in ``numpy.unique`` order.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    >>> group_by_patient(g, np.array(["a", "b", "a"])).tolist()
    [[3.0, 2.0], [0.0, 1.0]]
    """
    g = np.asarray(per_sample_grads)
    ids = np.asarray(patient_ids)
    if g.ndim != 2 or ids.shape != (g.shape[0],):
        raise InvalidPrivacyConfig(
            f"expected (n, dim) gradients and (n,) patient ids, got {g.shape} and {ids.shape}"
        )
    if not ids.size:
        return np.zeros((0, g.shape[1]), dtype=np.float32)
    _, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    sums, _ = _group_sorted(g[order], inverse.ravel()[order])  # float64 sums, float32 out
    return sums


@dataclass
class DPSGD:
    """Noised, clipped, normalised gradient of one DP-SGD step (+ optional momentum).

    Parameters
    ----------
    clip_norm : float
        Per-patient L2 clip norm ``C`` (> 0).
    noise_multiplier : float
        ``z``; the sum of clipped gradients gets ``N(0, (z * C)**2)`` per coordinate.
        ``0`` disables the noise (not private; for tests and baselines).
    expected_batch_size : float
        ``q * n_patients``: the public normaliser (> 0).
    momentum : float, default 0.0
        Heavy-ball momentum ``mu`` in [0, 1).
    rng : SecureRng, optional
        Noise generator; a fresh OS-keyed one by default.

    Examples
    --------
    >>> import numpy as np
    >>> opt = DPSGD(clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=2.0)
    >>> g = np.array([[3.0, 4.0], [0.0, 0.5]], dtype=np.float32)
    >>> [round(float(v), 3) for v in opt.noisy_gradient(g)]
    [0.3, 0.65]
    """

    clip_norm: float
    noise_multiplier: float
    expected_batch_size: float
    momentum: float = 0.0
    rng: SecureRng | None = None
    _velocity: NDArray[np.float64] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise InvalidPrivacyConfig(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if not (np.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise InvalidPrivacyConfig(
                f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}"
            )
        if not (np.isfinite(self.expected_batch_size) and self.expected_batch_size > 0):
            raise InvalidPrivacyConfig(
                f"expected_batch_size must be > 0, got {self.expected_batch_size}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise InvalidPrivacyConfig(f"momentum must be in [0, 1), got {self.momentum}")
        if self.rng is None:
            self.rng = SecureRng()

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped *sum*: ``z * C``."""
        return float(self.noise_multiplier * self.clip_norm)

    def noisy_gradient(
        self,
        per_sample_grads: NDArray[np.floating],
        patient_ids: NDArray[np.generic] | None = None,
    ) -> NDArray[np.float32]:
        """Return ``(sum_p clip(g_p, C) + N(0, (zC)**2 I)) / expected_batch_size``.

        Parameters
        ----------
        per_sample_grads : numpy.ndarray
            ``(n, dim)`` exact per-record gradients of the Poisson-sampled batch (``n`` may
            be 0). Not modified.
        patient_ids : numpy.ndarray, optional
            ``(n,)`` patient of each row; rows of one patient are summed before clipping.

        Returns
        -------
        numpy.ndarray
            ``float32`` ``(dim,)`` noised mean gradient.
        """
        g = np.asarray(per_sample_grads)
        if g.ndim != 2:
            raise InvalidPrivacyConfig(f"per_sample_grads must be (n, dim), got shape {g.shape}")
        if patient_ids is None:
            rows = np.array(g, dtype=np.float32, order="C", copy=True)
        else:
            rows = group_by_patient(g, patient_ids)
        if rows.shape[0]:
            clip_rows(rows, self.clip_norm)
        return self.noisy_mean(rows.sum(axis=0, dtype=np.float64))

    def noisy_mean(self, clipped_sum: NDArray[np.float64]) -> NDArray[np.float32]:
        """Return ``(clipped_sum + N(0, (zC)**2 I)) / expected_batch_size``.

        Parameters
        ----------
        clipped_sum : numpy.ndarray
            ``float64`` ``(dim,)`` sum of the batch's clipped per-patient gradients (not
            modified).

        Returns
        -------
        numpy.ndarray
            ``float32`` ``(dim,)`` noised mean gradient.
        """
        total = np.array(clipped_sum, dtype=np.float64, copy=True)
        if self.rng is None:  # set by __post_init__; re-checked so -O cannot skip noise
            raise InvalidPrivacyConfig("DPSGD has no random generator")
        add_gaussian_noise(total, self.noise_std, rng=self.rng, inplace=True)
        out: NDArray[np.float32] = (total / self.expected_batch_size).astype(np.float32)
        return out

    def step(
        self,
        params: NDArray[np.float32],
        per_sample_grads: NDArray[np.floating],
        learning_rate: float,
        patient_ids: NDArray[np.generic] | None = None,
    ) -> NDArray[np.float32]:
        """One DP-SGD update; returns new parameters (``params`` is not modified).

        Parameters
        ----------
        params : numpy.ndarray
            ``float32`` ``(dim,)`` flat parameters.
        per_sample_grads : numpy.ndarray
            ``(n, dim)`` per-record gradients at ``params`` of the sampled batch.
        learning_rate : float
            Step size.
        patient_ids : numpy.ndarray, optional
            Patient of each row.

        Returns
        -------
        numpy.ndarray
            ``float32`` updated parameters.
        """
        return self.apply(params, self.noisy_gradient(per_sample_grads, patient_ids), learning_rate)

    def apply(
        self, params: NDArray[np.float32], noisy_gradient: NDArray[np.float32], learning_rate: float
    ) -> NDArray[np.float32]:
        """Momentum and SGD update with an already noised gradient (post-processing).

        Parameters
        ----------
        params : numpy.ndarray
            ``float32`` ``(dim,)`` flat parameters (not modified).
        noisy_gradient : numpy.ndarray
            Output of :meth:`noisy_mean` or :meth:`noisy_gradient`.
        learning_rate : float
            Step size.

        Returns
        -------
        numpy.ndarray
            ``float32`` updated parameters.
        """
        g = np.asarray(noisy_gradient, dtype=np.float64)
        if self.momentum > 0.0:
            self._velocity = g if self._velocity is None else self.momentum * self._velocity + g
            g = self._velocity
        return (np.asarray(params, dtype=np.float64) - learning_rate * g).astype(np.float32)

    def reset_momentum(self) -> None:
        """Forget the momentum buffer (e.g. when a new global model arrives)."""
        self._velocity = None


def _group_sorted(
    g: NDArray[np.floating], pat: NDArray[np.int64], *, in_place: bool = False
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Sum rows of consecutive equal ``pat`` values (``pat`` sorted): ``(k, dim)``, ids.

    A patient with one record is copied as is; several records are summed in float64. No
    float64 copy of the whole batch is made (it dominated a DP-SGD step at 64x64). With
    ``in_place`` (``g`` is a float32 C-contiguous workspace the caller owns) the sums are
    written over ``g``'s leading rows and a view of them is returned: no new matrix at all,
    and when every patient has one record, nothing is copied.
    """
    starts = np.flatnonzero(np.r_[True, pat[1:] != pat[:-1]])
    ends = np.r_[starts[1:], len(pat)]
    acc: NDArray[np.float64] | None = None

    def patient_sum(s: int, e: int) -> NDArray[np.float64]:
        # Row after row into one float64 accumulator: the same additions in the same order
        # as ``g[s:e].sum(axis=0, dtype=float64)``, without its slow casting reduction.
        nonlocal acc
        if acc is None:
            acc = np.empty(g.shape[1], dtype=np.float64)
        acc[...] = g[s]
        for r in range(s + 1, e):
            np.add(acc, g[r], out=acc)
        return acc

    if in_place and g.dtype == np.float32 and g.flags.c_contiguous and g.flags.writeable:
        # Row k is written only after rows < starts[k] >= k were read: k <= starts[k].
        for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
            if e - s > 1:
                g[k] = patient_sum(int(s), int(e))
            elif k != s:
                g[k] = g[s]
        return g[: len(starts)], pat[starts]
    out = np.empty((len(starts), g.shape[1]), dtype=np.float32)
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        out[k] = g[s] if e - s == 1 else patient_sum(int(s), int(e))
    return out, pat[starts]


# Columns per block of the float64 row sum: 32 rows x 8192 float64 stay in cache.
_SUM_BLOCK = 8192


def _sum_rows64(rows: NDArray[np.float32], total: NDArray[np.float64]) -> None:
    """``total += rows.sum(axis=0)`` accumulated in float64, by column blocks.

    ``ndarray.sum(axis=0, dtype=float64)`` of a wide float32 matrix casts through a small
    buffer and costs several passes over memory; column blocks keep the float64 partial sums
    in cache. Same float64 sum of the same rows (only the order of additions may differ).
    """
    dim = rows.shape[1]
    part = np.empty(min(_SUM_BLOCK, dim), dtype=np.float64)
    for lo in range(0, dim, _SUM_BLOCK):
        hi = min(dim, lo + _SUM_BLOCK)
        p = part[: hi - lo]
        np.sum(rows[:, lo:hi], axis=0, dtype=np.float64, out=p)
        total[lo:hi] += p


class _Workspace:
    """A per-sample gradient matrix reused across the chunks and steps of one DP-SGD run.

    Only for trainers that take an ``out=`` workspace (``accepts_per_sample_out``, e.g.
    :class:`~confide.training.torch_engine.TorchTrainer`): a fresh ``chunk x dim`` float32
    matrix per step cost 0.05-0.09 s of page faults at 64x64 (SqueezeNet 1.1, 92 MB).
    """

    def __init__(self) -> None:
        self.buffer: Any = None

    def rows(self, trainer: Any, n: int, dim: int) -> Any:
        if not getattr(trainer, "accepts_per_sample_out", False):
            return None
        import torch

        device = trainer.device
        buf = self.buffer
        if buf is None or buf.shape[0] < n or buf.shape[1] != dim or buf.device != device:
            rows = max(n, int(trainer.per_sample_chunk))
            buf = torch.empty((rows, dim), dtype=torch.float32, device=device)
            self.buffer = buf
        return buf


def _as_numpy_rows(grads: Any, n: int, dim: int) -> Any:
    """Return a numpy view of CPU gradients (no copy), or the CUDA tensor itself."""
    if isinstance(grads, np.ndarray):
        g = grads
    elif type(grads).__module__.startswith("torch"):
        if grads.device.type != "cpu":
            return grads
        g = grads.detach().numpy()  # zero-copy view of a CPU tensor
    else:
        raise PrivacyUnsupportedError(
            f"per_sample_gradients must return a numpy array or a torch tensor, "
            f"got {type(grads).__name__}"
        )
    if g.shape != (n, dim) or g.dtype != np.float32:
        raise PrivacyUnsupportedError(
            f"per_sample_gradients must return float32 ({n}, {dim}), got {g.dtype} {g.shape}"
        )
    return g


class _DeviceSum:
    """Per-patient group, clip and sum of CUDA gradients on the device (float64 total).

    Clipping uses :func:`confide.privacy.torch_clip.clip_rows_torch`, which gives the same
    exact norm bound as the Rust kernel.
    """

    def __init__(self) -> None:
        self.total: Any = None

    @staticmethod
    def group(grads: Any, pat: NDArray[np.int64]) -> tuple[Any, NDArray[np.int64]]:
        import torch

        starts = np.flatnonzero(np.r_[True, pat[1:] != pat[:-1]])
        local = torch.as_tensor(np.cumsum(np.r_[0, np.diff(pat) != 0]), device=grads.device)
        sums = torch.zeros(len(starts), grads.shape[1], dtype=torch.float64, device=grads.device)
        sums.index_add_(0, local, grads.to(torch.float64))
        return sums.to(torch.float32).contiguous(), pat[starts]

    def clip_add(self, rows: Any, clip_norm: float) -> None:
        import torch

        from confide.privacy.torch_clip import clip_rows_torch

        if rows.shape[0] == 0:
            return
        clip_rows_torch(rows, clip_norm)
        part = rows.to(torch.float64).sum(dim=0)
        self.total = part if self.total is None else self.total + part


def _ghost_source(trainer: Any) -> tuple[Any, bool] | None:
    """Return the trainer whose ghost-norm clipping a step may use, or ``None``.

    The result is ``(trainer, trainable_only)``: a
    :class:`~confide.training.torch_engine.TorchTrainer` and whether only its trainable
    columns are wanted. Only that exact class (not a subclass, which could override the
    method and skip the clipping), and only when torch is already imported (a numpy-only
    site never loads it).
    """
    engine = sys.modules.get("confide.training.torch_engine")
    if engine is None:
        return None
    base, only = getattr(trainer, "ghost_source", (trainer, False))
    if type(base) is not engine.TorchTrainer or not base.ghost_clipping:
        return None
    return base, bool(only)


def _clip_margin(trainer: Any) -> float:
    """``C' / C`` for ``trainer``'s steps: ``torch_ghost.CLIP_MARGIN`` for torch, else 1.

    A :class:`~confide.training.torch_engine.TorchTrainer` (or a subclass, directly or as a
    ``ghost_source``) clips every patient to ``C' = C * CLIP_MARGIN`` on both paths (ghost
    norms and the Rust kernel on materialised rows), so a step releases the same sensitivity
    whichever path runs (docs/privacy.md). The module constant is read, never an attribute
    a subclass could override. Other trainers clip to ``C``.
    """
    engine = sys.modules.get("confide.training.torch_engine")
    if engine is None:
        return 1.0
    base = getattr(trainer, "ghost_source", (trainer, False))[0]
    if not isinstance(base, engine.TorchTrainer):
        return 1.0
    from confide.privacy.torch_ghost import CLIP_MARGIN

    return CLIP_MARGIN


def _one_row(row: Any) -> Any:
    return row[None, :] if isinstance(row, np.ndarray) else row.unsqueeze(0)


def clipped_patient_sum(
    trainer: PerSampleTrainer,
    data: SiteData,
    rows: NDArray[np.int64],
    patient_ids: NDArray[Any],
    clip_norm: float,
    *,
    workspace: _Workspace | None = None,
) -> NDArray[np.float64]:
    """Sum over the patients of ``rows`` of each patient's clipped gradient sum.

    The records of one patient are summed first (across chunks when a patient has more
    records than ``trainer.per_sample_chunk``) and the patient's sum is clipped to L2 norm
    ``clip_norm`` exactly once, so the result has sensitivity ``clip_norm`` under add/remove
    of one patient. A :class:`~confide.training.torch_engine.TorchTrainer` clips to
    ``C' = clip_norm * (1 - 2^-16)`` on both its paths (ghost norms and materialised rows),
    the margin paying for the float64 rounding of the sum (docs/privacy.md); the documented
    sensitivity and the accounting stay ``clip_norm``.

    Parameters
    ----------
    trainer : PerSampleTrainer
        Gives per-record gradients at its current weights.
    data : SiteData
        The records.
    rows : numpy.ndarray
        Indices of the sampled records.
    patient_ids : numpy.ndarray
        ``(len(data),)`` patient of each record.
    clip_norm : float
        ``C`` (> 0).
    workspace : optional
        Internal: the gradient matrix :func:`run_dpsgd` reuses across its steps.

    Returns
    -------
    numpy.ndarray
        ``float64`` ``(dim,)`` sum of clipped per-patient gradients (zeros for no rows).
    """
    dim = trainer.manifest.size
    total = np.zeros(dim, dtype=np.float64)
    if rows.size == 0:
        return total
    _, inverse = np.unique(np.asarray(patient_ids)[rows], return_inverse=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    rows_sorted = np.asarray(rows)[order]
    pat_sorted = inverse.ravel()[order].astype(np.int64)
    chunk = int(trainer.per_sample_chunk)
    if chunk < 1:
        raise PrivacyUnsupportedError(f"per_sample_chunk must be >= 1, got {chunk}")
    m = rows_sorted.size
    # A TorchTrainer clips to C' = C (1 - 2^-16) on both paths (the ghost path applies the
    # same margin itself): the same sensitivity whichever path a step takes.
    clip = clip_norm * _clip_margin(trainer)
    ghost = _ghost_source(trainer)
    if ghost is not None and m <= chunk:
        # Every sampled record in one pass: clip per-patient sums from ghost norms
        # (confide.privacy.torch_ghost), no (m, dim) gradient matrix. None: not applicable
        # or a non-finite value, and the materialised path below runs (and raises).
        base, only = ghost
        x, y = data.batch(rows_sorted)
        res = base.ghost_clipped_sum(x, y, pat_sorted, clip_norm, trainable_only=only)
        if res is not None:
            if res.shape != total.shape:
                raise PrivacyUnsupportedError(
                    f"the trainer's ghost_source gives {res.shape[0]} columns, its manifest {dim}"
                )
            total += res
            return total
    device = _DeviceSum()
    ws = workspace if workspace is not None else _Workspace()

    def finish(sums: Any) -> None:
        if not isinstance(sums, np.ndarray):
            device.clip_add(sums, clip)
        elif sums.shape[0]:
            clip_rows(sums, clip)
            _sum_rows64(sums, total)

    carry: Any = None  # gradient sum of a patient that continues in the next chunk
    carry_pid = -1
    for s in range(0, m, chunk):
        r, p = rows_sorted[s : s + chunk], pat_sorted[s : s + chunk]
        x, y = data.batch(r)
        buf = ws.rows(trainer, len(r), dim)
        if buf is None:
            g = _as_numpy_rows(trainer.per_sample_gradients(x, y), len(r), dim)
        else:  # our own workspace: group and clip it in place
            with_out: Any = trainer  # accepts_per_sample_out: takes out= (TorchTrainer)
            g = _as_numpy_rows(with_out.per_sample_gradients(x, y, out=buf), len(r), dim)
        if isinstance(g, np.ndarray):
            sums, pids = _group_sorted(g, p, in_place=buf is not None)
        else:
            sums, pids = device.group(g, p)
        if carry is not None:
            if pids[0] == carry_pid:
                sums[0] += carry
            else:  # cannot happen with sorted ids, kept so a patient is never dropped
                finish(_one_row(carry))
            carry = None
        if s + chunk < m and pat_sorted[s + chunk] == pids[-1]:
            carry, carry_pid = (
                sums[-1].clone() if hasattr(sums, "clone") else sums[-1].copy(),
                int(pids[-1]),
            )
            sums = sums[:-1]
        finish(sums)
    if carry is not None:
        finish(_one_row(carry))
    if device.total is not None:
        total += device.total.cpu().numpy()
    return total


def run_dpsgd(
    trainer: PerSampleTrainer,
    data: SiteData,
    config: TrainConfig,
    *,
    rng: SecureRng | None = None,
) -> FitResult:
    """Run ``config.dp.steps`` steps of patient-level DP-SGD on ``trainer``.

    Each step: Poisson-sample patients with rate ``q`` (:class:`~confide.SecureRng`),
    compute the sampled records' gradients, sum them per patient, clip each patient's sum
    to ``C`` (:func:`clipped_patient_sum`), add ``N(0, (zC)^2)`` from the Rust core, divide
    by the expected batch size ``q * n_patients``, apply momentum and update the weights.
    An empty batch still takes a (pure-noise) step: it is accounted.

    Parameters
    ----------
    trainer : PerSampleTrainer
        An engine with exact per-sample gradients (e.g. :class:`~confide.NumpyTrainer`).
    data : SiteData
        Local records; ``data.patient_ids`` groups records by patient (``None``: every
        record is its own patient).
    config : TrainConfig
        ``learning_rate`` and ``dp`` (required).
    rng : SecureRng, optional
        Sampling and noise generator; a fresh OS-keyed one by default (seeded ones are for
        tests only).

    Returns
    -------
    FitResult
        ``num_examples = len(data)``, ``loss`` NaN (an un-noised loss would leak), steps.

    Examples
    --------
    >>> import numpy as np
    >>> from confide import NumpyTrainer, TrainConfig, DPSGDConfig
    >>> from confide.data import Dataset
    >>> x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    >>> data = Dataset(x, (x[:, 0] > 0).astype(np.int64))
    >>> t = NumpyTrainer.create("logistic", n_features=3, n_classes=2)
    >>> dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.5, steps=3)
    >>> run_dpsgd(t, data, TrainConfig(learning_rate=0.5, dp=dp)).num_steps
    3
    """
    from confide.training.base import FitResult, PerSampleTrainer, SiteData, TrainConfig

    if not isinstance(config, TrainConfig) or config.dp is None:
        raise ConfigError("run_dpsgd needs a TrainConfig with dp set (a DPSGDConfig)")
    if not isinstance(trainer, PerSampleTrainer):
        raise PrivacyUnsupportedError(
            f"{type(trainer).__name__} gives no per-sample gradients (it does not implement "
            "confide.training.PerSampleTrainer), so it cannot run patient-level DP-SGD; "
            "use an engine that does (NumpyTrainer, TorchTrainer) or another privacy mode"
        )
    if not isinstance(data, SiteData):
        raise ConfigError(f"data must be a SiteData, got {type(data).__name__}")
    dp = config.dp
    n = len(data)
    if n == 0:
        raise ConfigError("cannot train on an empty dataset")
    ids = np.arange(n) if data.patient_ids is None else np.asarray(data.patient_ids)
    if ids.shape != (n,):
        raise ConfigError(f"patient_ids must have shape ({n},), got {ids.shape}")
    n_patients = int(np.unique(ids).size)
    gen = rng if rng is not None else SecureRng()
    opt = DPSGD(
        clip_norm=dp.clip_norm,
        noise_multiplier=dp.noise_multiplier,
        expected_batch_size=dp.sampling_rate * n_patients,
        momentum=dp.momentum,
        rng=gen,
    )
    anchor = trainer.get_weights()  # w_global for FedProx (the round's public model)
    mu = config.proximal_mu
    workspace = _Workspace()
    for _ in range(dp.steps):
        rows = poisson_sample_patients(ids, dp.sampling_rate, gen)
        clipped = clipped_patient_sum(trainer, data, rows, ids, dp.clip_norm, workspace=workspace)
        weights = trainer.get_weights()
        g = opt.noisy_mean(clipped)
        if mu > 0:
            # FedProx's mu (w - w_global) is data-independent: added after clipping and
            # noise it is post-processing of DP outputs and costs no privacy (docs/strategies.md).
            g = (g.astype(np.float64) + mu * (weights - anchor).astype(np.float64)).astype(
                np.float32
            )
        trainer.set_weights(opt.apply(weights, g, config.learning_rate))
    if not np.isfinite(trainer.get_weights()).all():
        raise ManifestError("training diverged: weights became NaN or Inf", code="non_finite")
    return FitResult(num_examples=n, loss=float("nan"), num_steps=dp.steps)
