"""Distributed patient-level DP-SGD under secure aggregation (what Dopamine proposed).

Every hospital computes, for one DP-SGD step, the sum of its sampled patients' clipped
gradients (:func:`confide.privacy.dpsgd.clipped_patient_sum`: Poisson sampling of patients
with rate ``q``, per-patient sum, clip to ``C``), and adds **its share** of the noise in the
integer domain before SecAgg+ masking. The server only ever sees the secure sum, which
carries the full accounted noise even when only the threshold number of honest hospitals
survive; it divides by the public expected batch size and applies momentum
(post-processing). The guarantee is that of *central* DP-SGD over the union of patients.

Encoding of one hospital's vector ``g`` (dimension ``d``), all public parameters:

1. ``x = clip(g, B) / gamma``: clip the site sum to the public bound ``B`` (1-Lipschitz,
   so a patient still moves it by at most ``C``) and scale by the granularity ``gamma``.
2. Unbiased randomized rounding of every coordinate to an integer (uniforms from
   :class:`~confide.SecureRng`).
3. Add ``DG(sigma_l)`` integer noise, the exact discrete Gaussian of the Rust core.
4. Reduce mod ``2**bits``; the result is SecAgg+'s ring input (``encoding = "ring"``).

Sensitivity: for datasets differing in one patient of one hospital, the pre-rounding
vectors differ by at most ``C / gamma`` in L2, and coupling the two roundings through the
same uniforms moves each coordinate by at most one more step, so the rounded vectors differ
by at most ``Delta = C / gamma + 1.25 sqrt(d)`` (integer units) for every realisation (the
extra quarter step covers float64 representation error: scaled coordinates are kept below
``2**50``).

Noise: at least ``h = min_survivors - max_colluding`` honest shares enter any sum that the
protocol lets the server unmask, so the aggregate noise has variance at least
``h * Var(DG(sigma_l))``. ``sigma_l`` is chosen so that this worst case is
``(z * Delta)**2``: the secure sum is the Gaussian mechanism with noise multiplier ``z`` on a
sensitivity-``Delta`` query, accounted as the Poisson-subsampled Gaussian (``q``, ``z``) per
step (:func:`event`). The sum of ``h`` discrete Gaussians is not exactly a discrete
Gaussian; its distance is bounded by KLS21's ``tau`` (Kairouz, Liu, Steinke 2021, Thm. 1),
which :func:`calibrate` computes and requires to be below ``1e-12`` (it is neglected in the
accounting; for ``sigma_l >= 1`` it is below ``1e-80``).

Granularity and range: ``gamma`` is the finest step for which the noise share stays within
the exact sampler's range (``sigma_l <= 2**27``), so the rounding slack ``1.25 sqrt(d)`` is
negligible next to ``C / gamma``. The ring must then hold the sum of ``n`` hospitals:
``n * (B / gamma + 1) + k * sqrt(n * Var) < 2**(bits - 1)`` with ``k = k_stddevs`` (a
deterministic bound on the data part, a ``k``-sigma bound on the noise:
``P(|N| > 12 sigma) < 4e-33`` per coordinate); :func:`calibrate` refuses a smaller ring.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.errors import InvalidPrivacyConfig
from confide.noise import SecureRng, discrete_gaussian, discrete_gaussian_variance
from confide.privacy._random import uniforms
from confide.privacy.client_dp import _tau  # KLS21 tau, shared with the client-level DDG
from confide.secagg.primitives import ring_dtype

__all__ = [
    "SampleDDGConfig",
    "SampleDDGParams",
    "calibrate",
    "decode_sum",
    "encode_site_sum",
    "event",
    "rederive",
    "site_step",
]

_TAU_MAX = 1e-12
# Per-coordinate L2 slack of the coupled roundings: one step of randomized rounding plus
# float64 representation error below 2**50 (at most 1/8 step per vector).
_COORD_SLACK = 1.25
# Largest per-site noise share: the exact discrete Gaussian sampler accepts sigma <= 2**28.
_SIGMA_MAX = float(2**27)


@dataclass(frozen=True)
class SampleDDGConfig:
    """What an operator chooses for distributed patient-level DP-SGD.

    Parameters
    ----------
    dim : int
        Number of model parameters ``d``.
    clip_norm : float
        Per-patient clip norm ``C`` (> 0).
    noise_multiplier : float
        ``z`` (> 0) of the worst-case secure sum.
    sampling_rate : float
        Poisson rate ``q`` of a patient per step, in (0, 1].
    num_sites : int
        Cohort size ``n`` (sizes the ring).
    min_survivors : int
        Fewest sites whose sum the protocol unmasks (SecAgg+'s ``max(t, n - D)``).
    max_colluding : int, default 0
        Sites that may collude with the server (their noise is not counted).
    site_clip_norm : float, optional
        Public bound ``B`` on a site's clipped gradient sum; default ``C`` times 4 times the
        largest expected sampled batch per site is a good start. Required.
    bits : int, default 48
        Ring ``Z_(2**bits)`` (8..62); :func:`calibrate` says which is needed.
    k_stddevs : float, default 12.0
        Noise standard deviations that must fit in the ring.
    """

    dim: int
    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    num_sites: int
    min_survivors: int
    site_clip_norm: float
    max_colluding: int = 0
    bits: int = 48
    k_stddevs: float = 12.0

    def __post_init__(self) -> None:
        def pos(name: str, v: float) -> None:
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise InvalidPrivacyConfig(f"{name} must be a finite number > 0, got {v!r}")

        pos("clip_norm", self.clip_norm)
        pos("noise_multiplier", self.noise_multiplier)
        pos("site_clip_norm", self.site_clip_norm)
        pos("k_stddevs", self.k_stddevs)
        if not 0 < self.sampling_rate <= 1:
            raise InvalidPrivacyConfig(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if self.dim < 1:
            raise InvalidPrivacyConfig(f"dim must be >= 1, got {self.dim}")
        if not 1 <= self.min_survivors <= self.num_sites:
            raise InvalidPrivacyConfig(
                f"need 1 <= min_survivors <= num_sites, got {self.min_survivors}, {self.num_sites}"
            )
        if not 0 <= self.max_colluding < self.min_survivors:
            raise InvalidPrivacyConfig(
                f"max_colluding must be in [0, min_survivors), got {self.max_colluding}"
            )
        if not 8 <= self.bits <= 62:
            raise InvalidPrivacyConfig(f"bits must be in [8, 62], got {self.bits}")


@dataclass(frozen=True)
class SampleDDGParams:
    """Derived public parameters, identical on every site and the server (``to_dict``)."""

    dim: int
    clip_norm: float
    site_clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    gamma: float
    bits: int
    sensitivity: float
    local_sigma: float
    local_variance: float
    honest_shares: int
    num_sites: int
    tau: float

    @property
    def worst_case_noise_std(self) -> float:
        """Std of the secure sum's noise with only ``h`` honest shares (float units)."""
        return self.gamma * math.sqrt(self.honest_shares * self.local_variance)

    @property
    def effective_noise_multiplier(self) -> float:
        """``sqrt(h * Var) / Delta``: the accounted noise multiplier (``>= z``)."""
        return math.sqrt(self.honest_shares * self.local_variance) / self.sensitivity

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (inverse: ``SampleDDGParams(**d)``)."""
        return asdict(self)


def calibrate(config: SampleDDGConfig) -> SampleDDGParams:
    """Choose ``gamma`` and the per-site noise share (see the module docstring).

    Parameters
    ----------
    config : SampleDDGConfig
        The public choices.

    Returns
    -------
    SampleDDGParams
        Parameters every party derives identically.

    Raises
    ------
    InvalidPrivacyConfig
        The ring is too small for the bound, or the discrete sum is not close enough to a
        discrete Gaussian (raise ``bits`` or lower ``site_clip_norm``).

    Examples
    --------
    >>> p = calibrate(SampleDDGConfig(dim=100, clip_norm=1.0, noise_multiplier=1.0,
    ...     sampling_rate=0.1, num_sites=10, min_survivors=7, site_clip_norm=8.0))
    >>> p.honest_shares, round(p.effective_noise_multiplier, 6) >= 1.0
    (7, True)
    """
    c = config
    h = c.min_survivors - c.max_colluding
    n = c.num_sites
    half = float(2 ** (c.bits - 1))
    slack = _COORD_SLACK * math.sqrt(c.dim)
    # The finest granularity the exact sampler allows (sigma_l <= 2**27 < its 2**28 limit),
    # which also keeps scaled coordinates far below 2**50 (float64 holds them exactly enough).
    steps_per_clip = _SIGMA_MAX * math.sqrt(h) / c.noise_multiplier - slack
    if steps_per_clip <= 0:
        raise InvalidPrivacyConfig(
            f"dimension {c.dim} is too large for noise multiplier {c.noise_multiplier} with "
            f"{h} honest shares (the rounding slack exceeds the sampler's range)"
        )
    gamma = max(c.clip_norm / steps_per_clip, c.site_clip_norm * 2.0**-50)
    sensitivity = c.clip_norm / gamma + slack
    sigma_l = c.noise_multiplier * sensitivity / math.sqrt(h)
    variance = discrete_gaussian_variance(sigma_l)
    tau = _tau(sigma_l, h)
    if tau > _TAU_MAX:
        raise InvalidPrivacyConfig(
            f"the noise share sigma_l={sigma_l:.3g} is too small for a discrete sum "
            f"(tau={tau:.2e} > {_TAU_MAX:g}); raise noise_multiplier"
        )
    worst = n * (c.site_clip_norm / gamma + 1) + c.k_stddevs * math.sqrt(n * variance)
    if worst >= half:
        need = math.ceil(math.log2(worst)) + 2
        raise InvalidPrivacyConfig(
            f"the secure sum of {n} sites could wrap the ring of 2^{c.bits}: use bits >= {need}"
        )
    return SampleDDGParams(
        dim=c.dim,
        clip_norm=c.clip_norm,
        site_clip_norm=c.site_clip_norm,
        noise_multiplier=c.noise_multiplier,
        sampling_rate=c.sampling_rate,
        gamma=gamma,
        bits=c.bits,
        sensitivity=sensitivity,
        local_sigma=sigma_l,
        local_variance=variance,
        honest_shares=h,
        num_sites=n,
        tau=tau,
    )


def encode_site_sum(
    clipped_sum: NDArray[np.floating], params: SampleDDGParams, *, rng: SecureRng | None = None
) -> NDArray[np.unsignedinteger[Any]]:
    """One site's ring vector: clip to ``B``, scale, round, add its noise share, reduce.

    Parameters
    ----------
    clipped_sum : numpy.ndarray
        ``(dim,)`` sum of the site's clipped per-patient gradients (one DP-SGD step).
    params : SampleDDGParams
        The round's public parameters.
    rng : SecureRng, optional
        Rounding and noise generator (OS-keyed by default; seeded in tests only).

    Returns
    -------
    numpy.ndarray
        ``(dim,)`` ring elements mod ``2**bits`` (SecAgg+'s ``encoding = "ring"`` input).

    Examples
    --------
    >>> p = calibrate(SampleDDGConfig(dim=4, clip_norm=1.0, noise_multiplier=1.0,
    ...     sampling_rate=0.5, num_sites=2, min_survivors=2, site_clip_norm=2.0))
    >>> encode_site_sum(np.zeros(4), p, rng=SecureRng(bytes(32))).dtype
    dtype('uint64')
    """
    g = np.asarray(clipped_sum, dtype=np.float64)
    if g.shape != (params.dim,) or not np.isfinite(g).all():
        raise InvalidPrivacyConfig(
            f"expected a finite ({params.dim},) gradient sum, got shape {g.shape}"
        )
    gen = rng if rng is not None else SecureRng()
    norm = float(np.linalg.norm(g))
    if norm > params.site_clip_norm:
        g = g * (params.site_clip_norm / norm) * (1.0 - 2.0**-40)
    x = g / params.gamma
    fl = np.floor(x)
    rounded = fl + (uniforms(params.dim, gen) < (x - fl))
    noise = discrete_gaussian(params.dim, params.local_sigma, rng=gen)
    total = rounded.astype(np.int64) + noise
    modulus = 1 << params.bits
    out: NDArray[np.unsignedinteger[Any]] = np.mod(total, modulus).astype(ring_dtype(params.bits))
    return out


def decode_sum(
    ring_sum: NDArray[np.unsignedinteger[Any]], params: SampleDDGParams
) -> NDArray[np.float64]:
    """Return the noisy sum of clipped gradients (float units) from the unmasked ring sum.

    Parameters
    ----------
    ring_sum : numpy.ndarray
        ``(dim,)`` sum of the survivors' ring vectors mod ``2**bits``.
    params : SampleDDGParams
        The round's public parameters.

    Returns
    -------
    numpy.ndarray
        ``(dim,)`` float64: ``sum_sites g_site + N`` with the accounted noise.
    """
    s = np.asarray(ring_sum).astype(np.int64) % (1 << params.bits)
    half = 1 << (params.bits - 1)
    centred = np.where(s >= half, s - (1 << params.bits), s)
    out: NDArray[np.float64] = centred.astype(np.float64) * params.gamma
    return out


def event(params: SampleDDGParams, steps: int = 1) -> Any:
    """Return the accounting event of ``steps`` secure steps (subsampled Gaussian, q, z_eff).

    Returns
    -------
    confide.privacy.accountant.PrivacyEvent
        ``dpsgd_event(q, effective_noise_multiplier, steps)``.
    """
    from confide.privacy.accountant import dpsgd_event

    return dpsgd_event(params.sampling_rate, params.effective_noise_multiplier, steps)


def rederive(
    shipped: dict[str, Any],
    *,
    num_sites: int,
    min_survivors: int,
    max_colluding: int,
    bits: int,
) -> SampleDDGParams:
    """Recompute a round's parameters from its public SecAgg+ parameters; refuse a mismatch.

    A site never trusts the noise share the server ships: it takes only the operator's
    choices (``dim``, ``C``, ``z``, ``q``, ``B``) from ``shipped`` and derives everything else
    from the round's SecAgg+ parameters (cohort ``n``, ``min_survivors``, colluding sites,
    ring width), which the protocol enforces. Shipped derived values that differ are refused.

    Parameters
    ----------
    shipped : dict
        The task's ``sample_ddg`` (:meth:`SampleDDGParams.to_dict`).
    num_sites, min_survivors, max_colluding, bits : int
        From the round's SecAgg+ parameters.

    Returns
    -------
    SampleDDGParams
        The parameters this site uses.

    Raises
    ------
    IntegrityError
        Missing or ill-typed fields, an infeasible configuration, or a shipped value that
        differs from the derived one.

    Examples
    --------
    >>> p = calibrate(SampleDDGConfig(dim=4, clip_norm=1.0, noise_multiplier=1.0,
    ...     sampling_rate=0.5, num_sites=3, min_survivors=2, site_clip_norm=2.0))
    >>> rederive(p.to_dict(), num_sites=3, min_survivors=2, max_colluding=0, bits=48) == p
    True
    """
    from confide.errors import IntegrityError

    if not isinstance(shipped, dict) or set(shipped) != set(SampleDDGParams.__dataclass_fields__):
        raise IntegrityError(
            "the distributed DP-SGD parameters must have exactly the fields "
            f"{sorted(SampleDDGParams.__dataclass_fields__)}"
        )

    def num(key: str) -> float:
        v = shipped[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise IntegrityError(f"sample_ddg.{key} must be a finite number, got {v!r}")
        return float(v)

    dim = shipped["dim"]
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise IntegrityError(f"sample_ddg.dim must be an integer, got {dim!r}")
    try:
        mine = calibrate(
            SampleDDGConfig(
                dim=dim,
                clip_norm=num("clip_norm"),
                noise_multiplier=num("noise_multiplier"),
                sampling_rate=num("sampling_rate"),
                num_sites=num_sites,
                min_survivors=min_survivors,
                site_clip_norm=num("site_clip_norm"),
                max_colluding=max_colluding,
                bits=bits,
            )
        )
    except InvalidPrivacyConfig as exc:
        raise IntegrityError(f"bad distributed DP-SGD parameters: {exc}") from None
    for key, value in mine.to_dict().items():
        other = shipped[key]
        same = (
            isinstance(other, int | float)
            and not isinstance(other, bool)
            and math.isclose(value, other, rel_tol=1e-12, abs_tol=0.0)
            if isinstance(value, float)
            else value == other
        )
        if not same:
            raise IntegrityError(
                f"the shipped distributed DP-SGD parameter {key}={other!r} differs from "
                f"{value!r} derived from the round's public parameters"
            )
    return mine


# One per-sample gradient workspace per trainer (dpsgd._Workspace), reused across the
# steps (rounds) of distributed DP-SGD as run_dpsgd reuses one across its steps; dropped
# with the trainer. Allocated only when a step materialises per-sample gradients.
_WORKSPACES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_WORKSPACES_LOCK = threading.Lock()


def _workspace_for(trainer: Any) -> Any:
    from confide.privacy.dpsgd import _Workspace

    try:
        with _WORKSPACES_LOCK:
            ws = _WORKSPACES.get(trainer)
            if ws is None:
                ws = _WORKSPACES[trainer] = _Workspace()
    except TypeError:  # not weak-referenceable or not hashable: a workspace for this step
        return _Workspace()
    return ws


def site_step(
    trainer: Any,
    data: Any,
    params: SampleDDGParams,
    *,
    rng: SecureRng | None = None,
) -> NDArray[np.unsignedinteger[Any]]:
    """One hospital's share of one distributed DP-SGD step, ready for SecAgg+ masking.

    Poisson-samples patients with rate ``q`` (all records of a sampled patient), sums each
    sampled patient's gradients at the trainer's current weights, clips each patient's sum
    to ``C`` (:func:`~confide.privacy.dpsgd.clipped_patient_sum`) and encodes the site sum
    with its noise share (:func:`encode_site_sum`). Nothing else leaves the site: not the
    number of patients sampled, not a loss.

    Parameters
    ----------
    trainer : confide.training.PerSampleTrainer
        An engine with exact per-sample gradients, at the round's model.
    data : confide.training.SiteData
        The site's records (``patient_ids`` groups them; ``None``: a record per patient).
    params : SampleDDGParams
        The round's parameters (after :func:`rederive`).
    rng : SecureRng, optional
        Sampling, rounding and noise generator (OS-keyed by default; seeded in tests only).

    Returns
    -------
    numpy.ndarray
        ``(dim,)`` ring vector mod ``2**bits``.

    Raises
    ------
    PrivacyUnsupportedError
        ``trainer`` gives no per-sample gradients.
    ConfigError
        Empty data, or patient ids of the wrong shape.
    """
    from confide.errors import ConfigError, PrivacyUnsupportedError
    from confide.privacy.dpsgd import clipped_patient_sum, poisson_sample_patients
    from confide.training.base import PerSampleTrainer

    if not isinstance(trainer, PerSampleTrainer):
        raise PrivacyUnsupportedError(
            f"{type(trainer).__name__} gives no per-sample gradients, so it cannot take part "
            "in distributed patient-level DP-SGD; the round is refused and nothing is uploaded"
        )
    from confide.training.trainable import trainable_size

    dim = trainable_size(trainer.manifest)
    if dim != params.dim:
        raise ConfigError(
            f"the round's parameters are for {params.dim} parameters, the model trains "
            f"{dim} (of {trainer.manifest.size})"
        )
    n = len(data)
    if n == 0:
        raise ConfigError("cannot take a DP-SGD step on an empty dataset")
    ids = np.arange(n) if data.patient_ids is None else np.asarray(data.patient_ids)
    if ids.shape != (n,):
        raise ConfigError(f"patient_ids must have shape ({n},), got {ids.shape}")
    gen = rng if rng is not None else SecureRng()
    rows = poisson_sample_patients(ids, params.sampling_rate, gen)
    part: Any = trainer if dim == trainer.manifest.size else _TrainablePart(trainer)
    clipped = clipped_patient_sum(
        part, data, rows, ids, params.clip_norm, workspace=_workspace_for(trainer)
    )
    return encode_site_sum(clipped, params, rng=gen)


class _TrainablePart:
    """A trainer seen through its trainable subset: per-sample gradients of that part only.

    The vector of a distributed DP-SGD step then has the trainable count as its length, so
    the clipping, the sensitivity and the noise all live in that dimension.
    """

    def __init__(self, trainer: Any) -> None:
        from confide.errors import PrivacyUnsupportedError

        if not hasattr(trainer, "trainable_manifest"):
            raise PrivacyUnsupportedError(
                f"{type(trainer).__name__} cannot train a subset of the model (spec "
                "'trainable'): it has no trainable_manifest"
            )
        self._trainer = trainer
        self.manifest = trainer.trainable_manifest
        self.per_sample_chunk = trainer.per_sample_chunk
        # dpsgd._ghost_source: the ghost-norm clipping of the wrapped trainer, trainable part.
        self.ghost_source = (trainer, True)
        # Takes the reused workspace (dpsgd._Workspace) when the trainer does.
        self.accepts_per_sample_out = bool(getattr(trainer, "accepts_per_sample_out", False))
        if self.accepts_per_sample_out:
            self.device = trainer.device

    def per_sample_gradients(self, x: Any, y: Any, *, out: Any = None) -> Any:
        if out is None:
            return self._trainer.per_sample_gradients(x, y, trainable_only=True)
        return self._trainer.per_sample_gradients(x, y, trainable_only=True, out=out)
