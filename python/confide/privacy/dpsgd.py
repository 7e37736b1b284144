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

Everything after step 3 is post-processing; the privacy of a run is that of
``steps`` compositions of the Poisson-subsampled Gaussian mechanism with noise multiplier
``z``, under add/remove of one patient of this site's dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from confide.clip import clip_rows
from confide.noise import SecureRng, add_gaussian_noise
from confide.privacy._random import uniforms as _uniforms
from confide.privacy.errors import InvalidPrivacyConfig

__all__ = ["DPSGD", "group_by_patient", "poisson_sample", "poisson_sample_patients"]


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
    _, inverse = np.unique(ids, return_inverse=True)
    n_patients = int(inverse.max()) + 1 if inverse.size else 0
    out = np.zeros((n_patients, g.shape[1]), dtype=np.float64)
    np.add.at(out, inverse.ravel(), g.astype(np.float64, copy=False))
    return np.ascontiguousarray(out, dtype=np.float32)


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
        total = rows.sum(axis=0, dtype=np.float64)
        assert self.rng is not None
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
        g = self.noisy_gradient(per_sample_grads, patient_ids).astype(np.float64)
        if self.momentum > 0.0:
            self._velocity = g if self._velocity is None else self.momentum * self._velocity + g
            g = self._velocity
        return (np.asarray(params, dtype=np.float64) - learning_rate * g).astype(np.float32)

    def reset_momentum(self) -> None:
        """Forget the momentum buffer (e.g. when a new global model arrives)."""
        self._velocity = None
