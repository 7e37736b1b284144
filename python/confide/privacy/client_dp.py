"""Client-level DP on model updates: clipping, central noise, distributed discrete Gaussian.

Every client clips its update to L2 norm ``C`` (:func:`clip_update`, the Rust kernel); the
sum of clipped updates then has sensitivity ``C`` under add/remove of one client. Noise of
std ``z * C`` on that sum is added in one of two places:

**Central** (:func:`add_central_noise`): the server adds ``N(0, (zC)**2 I)`` to the sum once.
For deployments without secure aggregation: the server sees every individual update and is
trusted; the guarantee holds against everyone who only sees the released model.

**Distributed** (DDG; Kairouz, Liu, Steinke, ICML 2021, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation"): each client adds a share of
*integer* noise to its quantized update before secure-aggregation masking, so the server
only ever sees the noised sum. A client (:func:`ddg_encode`):

1. clips ``x`` to ``||x|| <= C``;
2. zero-pads to ``d = 2**ceil(log2 dim)`` and applies the randomized Hadamard transform
   ``H D / sqrt(d)`` (``D``: random signs from a *public* per-round seed shared by every
   client, :func:`rotation_seed`). The transform is orthogonal, so ``||.|| <= C`` still
   holds; it only flattens the vector so that modular wrap-around is rare;
3. scales by ``1 / gamma`` and applies *conditional randomized rounding*: unbiased stochastic
   rounding to integers, repeated until ``||x~||_2 <= Delta_2`` with
   ``Delta_2 = min(C/gamma + sqrt(d),
   sqrt((C/gamma)**2 + d/4 + sqrt(2 ln(1/beta)) (C/gamma + sqrt(d)/2)))``
   (KLS21 Thm. 1 / Prop. 22; each attempt succeeds with probability >= 1 - beta). The bound
   is *enforced* by the check, not merely expected;
4. adds ``N_Z(0, sigma_l**2)`` per coordinate (exact CKS20 sampler in the Rust core);
5. reduces mod ``2**bits`` (the secure-aggregation ring) and hands the vector to masking.

The server unmasks the ring sum, maps it to the centred range ``[-2**(bits-1), 2**(bits-1))``,
multiplies by ``gamma`` and undoes the rotation (:func:`ddg_decode`).

Calibration and worst case
--------------------------
With secure-aggregation threshold ``t`` and at most ``c`` clients colluding with the server
(``max_colluding``; colluders know and can subtract their own shares), at least
``h = t - c`` honest noise shares are in any sum the server can unmask (a round with fewer
than ``t`` survivors aborts and releases nothing; shares of clients that drop *after*
their masked input was accepted stay in the sum). Each client therefore draws

    ``sigma_l = z * Delta_2 / sqrt(h)``     (integer units; float units: ``gamma * sigma_l``),

so the worst-case sum carries variance ``h sigma_l**2 >= (z Delta_2)**2``: the discrete
analogue of central noise ``z * C`` with the sensitivity inflated by rounding. With all
``n`` cohort members surviving and honest, the noise std is ``sqrt(n / h)`` times larger
than needed: that is the utility price of dropout- and collusion-robustness.

Accounting uses KLS21 Prop. 14 / Eq. 17 for the sum of ``h`` i.i.d. discrete Gaussians:
``(alpha, alpha * rho)``-RDP with
``rho = (l2**2 + 2 * l1 * tau + tau**2 * d) / 2``, ``l2 = Delta_2 / (sqrt(h) sigma_l)``,
``l1 = min(sqrt(d) Delta_2, Delta_2**2) / (sqrt(h) sigma_l)``,
``tau = 10 * sum_{k=1}^{h-1} exp(-2 pi**2 sigma_l**2 k / (k+1))``
(under replace-one, ``Delta_2`` and ``Delta_1`` double). This is a ``ZCDpEvent(rho)``
accounted with dp-accounting's RDP accountant (:func:`ddg_event`). Adding *more* shares is
post-processing of the ``h``-share mechanism, so the bound holds for any number of survivors
``>= t``. Modular wrap-around is post-processing of the exact integer sum, so it costs
accuracy, never privacy; ``gamma`` is chosen (KLS21 Sec. 4.4) so that ``k_stddevs`` standard
deviations of every coordinate of the aggregate fit in the ring.

What is simplified, and what it costs
-------------------------------------
* No amplification by cohort sampling is claimed for DDG (the event is accounted as if every
  client took part every round). This over-states epsilon when cohorts are sampled; it is
  also the honest statement against a server that picks the cohort itself.
* The ``(alpha, rho*alpha)`` bound uses KLS21's ``min`` term that is linear in ``alpha``;
  dp-accounting composes one ``(xi, rho)`` pair per event, so the pointwise minimum over
  KLS21's three bounds is not taken. For ``sigma_l >= 2`` (always the case in practice)
  ``tau < 1e-15`` and the three bounds coincide with the continuous Gaussian's
  ``rho = 1 / (2 z**2)`` up to the rounding inflation already in ``Delta_2``.
* There is no PLD for the sum of discrete Gaussians in dp-accounting, so DDG epsilon is an
  RDP epsilon (typically 5-15% above what PLD gives the continuous Gaussian of the same
  ``z``).
* The Rust core's float Gaussian (central mode) uses a lattice construction whose stated
  costs (``core_rs/src/noise.rs``: sensitivity ``C + sqrt(dim) z C 2**-33``, density ratio
  within ``1 +/- 2**-30``) are not added to the accounted epsilon.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from confide.clip import clip_l2
from confide.errors import InvalidPrivacyConfig
from confide.noise import (
    SecureRng,
    add_gaussian_noise,
    discrete_gaussian,
    discrete_gaussian_variance,
)
from confide.privacy._random import uniforms
from confide.secagg.primitives import ring_dtype

if TYPE_CHECKING:
    from confide.privacy.accountant import PrivacyEvent
    from confide.secagg.params import SecAggParams

__all__ = [
    "DDGConfig",
    "DDGParams",
    "add_central_noise",
    "calibrate_ddg",
    "clip_update",
    "ddg_config_for",
    "ddg_decode",
    "ddg_encode",
    "ddg_event",
    "padded_dim",
    "rotate",
    "rotation_seed",
    "unrotate",
]

#: Largest ``sigma`` the Rust discrete Gaussian sampler accepts is 2**28; stay below.
_MAX_LOCAL_SIGMA = float(2**27)
_MIN_LOCAL_SIGMA = 0.5  # KLS21 Thm. 1 needs sigma >= 1/2.
_MAX_ROUNDING_ATTEMPTS = 1000


# ---------------------------------------------------------------------------- clipping


def clip_update(
    update: NDArray[np.floating], clip_norm: float
) -> tuple[NDArray[np.float32], float]:
    """Return a float32 copy of ``update`` clipped to L2 norm ``clip_norm``, and its norm.

    Parameters
    ----------
    update : numpy.ndarray
        1-D model update (any float dtype); not modified.
    clip_norm : float
        Bound ``C`` > 0.

    Returns
    -------
    clipped : numpy.ndarray
        ``float32`` copy with ``||clipped|| <= clip_norm`` (Rust kernel, exact bound).
    norm : float
        The norm before clipping.

    Examples
    --------
    >>> import numpy as np
    >>> c, n = clip_update(np.array([3.0, 4.0]), 1.0)
    >>> round(n, 3), round(float(np.linalg.norm(c)), 3)
    (5.0, 1.0)
    """
    x = np.array(update, dtype=np.float32, order="C", copy=True).ravel()
    norm = clip_l2(x, float(clip_norm))
    return x, norm


def add_central_noise(
    total: NDArray[np.floating],
    noise_multiplier: float,
    clip_norm: float,
    *,
    normalize_by: float | None = None,
    rng: SecureRng | None = None,
) -> NDArray[np.float32]:
    """Central DP: add ``N(0, (z C)**2)`` to the *sum* of clipped updates, once.

    Parameters
    ----------
    total : numpy.ndarray
        Sum over the cohort of updates each clipped to ``clip_norm``; not modified.
    noise_multiplier : float
        ``z`` >= 0.
    clip_norm : float
        ``C`` used by the clients.
    normalize_by : float, optional
        Divide the noised sum by this *public* constant (the expected cohort size, never
        the realised count); the sum itself is returned when omitted.
    rng : SecureRng, optional
        Generator; a fresh OS-keyed one by default.

    Returns
    -------
    numpy.ndarray
        ``float32`` noised sum (or mean).

    Examples
    --------
    >>> import numpy as np
    >>> out = add_central_noise(np.zeros(3), 1.0, 0.5, normalize_by=10, rng=SecureRng(bytes(32)))
    >>> out.shape, out.dtype
    ((3,), dtype('float32'))
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise InvalidPrivacyConfig(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise InvalidPrivacyConfig(f"clip_norm must be > 0, got {clip_norm}")
    out = np.array(total, dtype=np.float64, order="C", copy=True)
    add_gaussian_noise(out, noise_multiplier * clip_norm, rng=rng, inplace=True)
    if normalize_by is not None:
        if not normalize_by > 0:
            raise InvalidPrivacyConfig(f"normalize_by must be > 0, got {normalize_by}")
        out /= normalize_by
    return out.astype(np.float32)


# ---------------------------------------------------------------------------- rotation


def rotation_seed(job_seed: bytes, round_id: int) -> bytes:
    """Public 32-byte seed of round ``round_id``'s random rotation.

    The rotation is public (every client and the server must use the same one); privacy
    does not depend on it, only the flattening (utility) does.

    Parameters
    ----------
    job_seed : bytes
        Random bytes fixed when the job is created.
    round_id : int
        Round number.

    Returns
    -------
    bytes
        ``SHA-256("confide/ddg-rotation/v1" || job_seed || round_id as u64 BE)``.

    Examples
    --------
    >>> len(rotation_seed(b"job", 3))
    32
    """
    h = hashlib.sha256(b"confide/ddg-rotation/v1")
    h.update(job_seed)
    h.update(int(round_id).to_bytes(8, "big"))
    return h.digest()


def _signs(seed: bytes, d: int) -> NDArray[np.float64]:
    bits = np.unpackbits(
        np.frombuffer(SecureRng(seed).random_bytes((d + 7) // 8), dtype=np.uint8),
        bitorder="little",
    )[:d]
    return 1.0 - 2.0 * bits.astype(np.float64)


def _fwht(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Unnormalised fast Walsh-Hadamard transform (Sylvester order), length a power of 2."""
    n = x.shape[0]
    y = x.copy()
    h = 1
    while h < n:
        y3 = y.reshape(-1, 2, h)
        y = np.stack((y3[:, 0, :] + y3[:, 1, :], y3[:, 0, :] - y3[:, 1, :]), axis=1).reshape(n)
        h *= 2
    out: NDArray[np.float64] = y
    return out


def padded_dim(dim: int) -> int:
    """Length of a DDG ring vector for a model of ``dim`` values: the next power of two.

    The one padding rule: the server sizes a distributed round's masked uploads with it,
    and clients check the setup's ``vector_length`` against it.

    Examples
    --------
    >>> padded_dim(31), padded_dim(32), padded_dim(33)
    (32, 32, 64)
    """
    return 1 << max(0, (dim - 1).bit_length())


def rotate(x: NDArray[np.floating], seed: bytes) -> NDArray[np.float64]:
    """Randomized Hadamard transform ``H D x / sqrt(d)`` after zero-padding to ``d = 2**k``.

    Parameters
    ----------
    x : numpy.ndarray
        1-D vector.
    seed : bytes
        32-byte public seed (:func:`rotation_seed`).

    Returns
    -------
    numpy.ndarray
        ``float64`` vector of length ``d``, same L2 norm as ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(5.0)
    >>> y = rotate(x, bytes(32))
    >>> len(y), bool(np.isclose(np.linalg.norm(y), np.linalg.norm(x)))
    (8, True)
    >>> bool(np.allclose(unrotate(y, bytes(32), 5), x))
    True
    """
    v = np.asarray(x, dtype=np.float64).ravel()
    d = padded_dim(v.size)
    p = np.zeros(d, dtype=np.float64)
    p[: v.size] = v
    return _fwht(p * _signs(seed, d)) / math.sqrt(d)


def unrotate(y: NDArray[np.floating], seed: bytes, dim: int) -> NDArray[np.float64]:
    """Inverse of :func:`rotate`: ``D H y / sqrt(d)``, truncated to ``dim``.

    Parameters
    ----------
    y : numpy.ndarray
        Rotated vector of power-of-two length ``d``.
    seed : bytes
        The seed given to :func:`rotate`.
    dim : int
        Original length.

    Returns
    -------
    numpy.ndarray
        ``float64`` vector of length ``dim``.
    """
    v = np.asarray(y, dtype=np.float64).ravel()
    d = v.size
    if d != padded_dim(d) or dim > d:
        raise InvalidPrivacyConfig(f"rotated length {d} is not a power of two >= dim {dim}")
    return (_fwht(v) * _signs(seed, d) / math.sqrt(d))[:dim]


# ---------------------------------------------------------------------------- DDG


@dataclass(frozen=True)
class DDGConfig:
    """What an operator chooses for the distributed discrete Gaussian.

    Parameters
    ----------
    dim : int
        Length of the flat update vector.
    clip_norm : float
        Client L2 clip norm ``C``.
    noise_multiplier : float
        ``z``: the worst-case aggregate carries integer noise of std ``z * Delta_2``
        (``Delta_2``: the rounding-inflated sensitivity; ``~ z * C`` in float units).
    num_clients : int
        Expected cohort size ``n`` (used to size the ring and ``gamma``).
    threshold : int
        Secure-aggregation threshold ``t``: a round with fewer survivors aborts.
    bits : int, default 32
        Ring ``Z_(2**bits)`` of secure aggregation, 8..62.
    beta : float, default exp(-0.5)
        Conditional rounding parameter in [0, 1); ``0`` disables the conditional check
        (looser bound ``C/gamma + sqrt(d)``).
    k_stddevs : float, default 4.0
        Aggregate standard deviations that must fit in the ring (modular clipping).
    max_colluding : int, default 0
        Clients that may collude with the server; the noise is calibrated for
        ``threshold - max_colluding`` honest shares.
    relation : {"add_or_remove", "replace_one"}, default "add_or_remove"
        Neighbouring relation the accounting event is stated for.

    Examples
    --------
    >>> cfg = DDGConfig(dim=31, clip_norm=1.0, noise_multiplier=1.0, num_clients=3, threshold=2)
    >>> calibrate_ddg(cfg).padded_dim
    32
    """

    dim: int
    clip_norm: float
    noise_multiplier: float
    num_clients: int
    threshold: int
    bits: int = 32
    beta: float = math.exp(-0.5)
    k_stddevs: float = 4.0
    max_colluding: int = 0
    relation: Literal["add_or_remove", "replace_one"] = "add_or_remove"

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise InvalidPrivacyConfig(f"dim must be >= 1, got {self.dim}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise InvalidPrivacyConfig(f"clip_norm must be > 0, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise InvalidPrivacyConfig(
                f"noise_multiplier must be >= 0, got {self.noise_multiplier}"
            )
        if not 1 <= self.threshold <= self.num_clients:
            raise InvalidPrivacyConfig(
                f"need 1 <= threshold <= num_clients, got t={self.threshold}, n={self.num_clients}"
            )
        if not 0 <= self.max_colluding < self.threshold:
            raise InvalidPrivacyConfig(
                f"max_colluding must be in [0, threshold), got {self.max_colluding}"
            )
        if not 8 <= self.bits <= 62:
            raise InvalidPrivacyConfig(f"bits must be in [8, 62], got {self.bits}")
        if not 0.0 <= self.beta < 1.0:
            raise InvalidPrivacyConfig(f"beta must be in [0, 1), got {self.beta}")
        if not self.k_stddevs > 0:
            raise InvalidPrivacyConfig(f"k_stddevs must be > 0, got {self.k_stddevs}")
        if self.relation not in ("add_or_remove", "replace_one"):
            raise InvalidPrivacyConfig(f"unknown relation {self.relation!r}")


@dataclass(frozen=True)
class DDGParams:
    """Derived DDG parameters, shared by clients and server (JSON-safe via ``to_dict``).

    Parameters
    ----------
    dim, padded_dim : int
        Update length and its power-of-two padding ``d``.
    clip_norm : float
        ``C``.
    gamma : float
        Quantization granularity (float units per integer step).
    bits : int
        Ring bits.
    beta : float
        Conditional rounding parameter.
    norm_bound : float
        ``Delta_2``: enforced L2 bound of a rounded client vector, integer units.
    local_sigma : float
        ``sigma_l`` requested from the sampler (integer units; 0 = no noise).
    local_variance : float
        Variance the sampler realises (``>= local_sigma**2``).
    honest_shares : int
        ``h = threshold - max_colluding``: shares the worst-case sum is calibrated for.
    num_clients : int
        Expected cohort size.
    noise_multiplier : float
        ``z`` from the config.
    tau : float
        KLS21 ``tau`` for ``h`` summands.
    rho : float
        Per-round zCDP parameter of the worst-case sum.
    relation : str
        Neighbouring relation of ``rho``.
    """

    dim: int
    padded_dim: int
    clip_norm: float
    gamma: float
    bits: int
    beta: float
    norm_bound: float
    local_sigma: float
    local_variance: float
    honest_shares: int
    num_clients: int
    noise_multiplier: float
    tau: float
    rho: float
    relation: Literal["add_or_remove", "replace_one"]

    @property
    def worst_case_noise_std(self) -> float:
        """Std (float units) of the aggregate noise with only ``h`` honest shares."""
        return self.gamma * math.sqrt(self.honest_shares * self.local_variance)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (inverse: ``DDGParams(**d)``)."""
        return asdict(self)


def ddg_config_for(
    secagg: SecAggParams,
    *,
    dim: int,
    clip_norm: float,
    noise_multiplier: float,
    bits: int,
    beta: float = math.exp(-0.5),
    relation: Literal["add_or_remove", "replace_one"] = "add_or_remove",
) -> DDGConfig:
    """Return the DDG configuration of a distributed round with SecAgg+ parameters ``secagg``.

    The one mapping both sides use (the server to derive a round's parameters, each client
    to re-derive and check what it was sent): the noise is calibrated for the worst case
    of ``secagg.min_survivors - secagg.corrupt`` honest shares (no honest client unmasks
    fewer than ``min_survivors`` masked inputs, at most ``corrupt`` collude with the server).

    Parameters
    ----------
    secagg : SecAggParams
        The round's SecAgg+ parameters (cohort ``n``, ``min_survivors``, ``corrupt``).
    dim : int
        Model length (before padding).
    clip_norm, noise_multiplier : float
        ``C`` and ``z``.
    bits : int
        Ring bits (``privacy.ddg_bits``; the round's SecAgg+ modulus).
    beta : float, default exp(-0.5)
        Conditional rounding parameter.
    relation : {"add_or_remove", "replace_one"}
        Neighbouring relation.

    Returns
    -------
    DDGConfig
        Input of :func:`calibrate_ddg`.

    Raises
    ------
    InvalidPrivacyConfig
        The combination is invalid (for instance no honest share).
    """
    return DDGConfig(
        dim=dim,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        num_clients=secagg.n,
        threshold=secagg.min_survivors,
        max_colluding=secagg.corrupt,
        bits=bits,
        beta=beta,
        relation=relation,
    )


def _rounded_norm_bound(c: float, beta: float, d: int) -> float:
    """KLS21 Thm. 1: L2 bound of a conditionally rounded vector of norm ``<= c``."""
    bound_1 = c + math.sqrt(d)
    if beta == 0.0:
        return bound_1
    sq = c * c + 0.25 * d + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + 0.5 * math.sqrt(d))
    return min(bound_1, math.sqrt(sq))


def _tau(sigma: float, summands: int) -> float:
    s = 0.0
    for k in range(1, summands):
        term = math.exp(-2.0 * (math.pi * sigma) ** 2 * k / (k + 1))
        s += term
        if term == 0.0:
            break
    return 10.0 * s


def calibrate_ddg(config: DDGConfig) -> DDGParams:
    """Choose ``gamma`` and the per-client discrete Gaussian scale (see module docs).

    ``gamma`` follows KLS21 Sec. 4.4 (``rho = 1`` flatness): the smallest granularity such
    that ``k_stddevs`` standard deviations of each aggregate coordinate (signal bounded by
    ``n C / sqrt(d)``, rounding and noise of all ``n`` clients) fit in ``2**bits``; it is
    iterated with ``sigma_l = z Delta_2(gamma) / sqrt(h)`` to a fixed point.

    Parameters
    ----------
    config : DDGConfig
        The operator's choices.

    Returns
    -------
    DDGParams
        Parameters for :func:`ddg_encode`, :func:`ddg_decode` and :func:`ddg_event`.

    Raises
    ------
    InvalidPrivacyConfig
        The ring is too small for the cohort, or the noise scale is out of the sampler's
        range.
    """
    n, z, c, b, k = (
        config.num_clients,
        config.noise_multiplier,
        config.clip_norm,
        config.bits,
        config.k_stddevs,
    )
    d = padded_dim(config.dim)
    h = config.threshold - config.max_colluding
    room = 2.0 ** (2 * b) - n * k * k
    if room <= 0:
        raise InvalidPrivacyConfig(
            f"bits={b} is too small for {n} clients at k_stddevs={k}; increase bits"
        )
    sigma_f = z * c / math.sqrt(h)  # local noise std in float units (first guess)
    gamma = 1.0
    for _ in range(20):
        scale = math.sqrt(room) / (2.0 * k * math.sqrt(c * c * n * n / d + n * sigma_f**2))
        gamma = 1.0 / scale
        norm_bound = _rounded_norm_bound(c / gamma, config.beta, d)
        sigma_l = z * norm_bound / math.sqrt(h)
        if sigma_l > _MAX_LOCAL_SIGMA:  # keep inside the sampler's range: coarser grid
            gamma *= sigma_l / _MAX_LOCAL_SIGMA
            norm_bound = _rounded_norm_bound(c / gamma, config.beta, d)
            sigma_l = z * norm_bound / math.sqrt(h)
        new_sigma_f = gamma * sigma_l
        if math.isclose(new_sigma_f, sigma_f, rel_tol=1e-9):
            break
        sigma_f = new_sigma_f
    if z > 0 and sigma_l < _MIN_LOCAL_SIGMA:
        raise InvalidPrivacyConfig(
            f"local discrete Gaussian scale {sigma_l:.3g} < 0.5 (KLS21 needs >= 1/2); "
            "increase bits or the noise multiplier"
        )
    variance = discrete_gaussian_variance(sigma_l) if z > 0 else 0.0
    factor = 2.0 if config.relation == "replace_one" else 1.0
    if z > 0:
        sd = math.sqrt(h * variance)
        l2 = factor * norm_bound / sd
        l1 = factor * min(math.sqrt(d) * norm_bound, norm_bound**2) / sd
        tau = _tau(math.sqrt(variance), h)
        rho = 0.5 * (l2 * l2 + 2.0 * l1 * tau + tau * tau * d)
    else:
        tau, rho = 0.0, math.inf
    return DDGParams(
        dim=config.dim,
        padded_dim=d,
        clip_norm=c,
        gamma=gamma,
        bits=b,
        beta=config.beta,
        norm_bound=norm_bound,
        local_sigma=sigma_l if z > 0 else 0.0,
        local_variance=variance,
        honest_shares=h,
        num_clients=n,
        noise_multiplier=z,
        tau=tau,
        rho=rho,
        relation=config.relation,
    )


def _conditional_round(y: NDArray[np.float64], bound: float, rng: SecureRng) -> NDArray[np.int64]:
    fl = np.floor(y)
    frac = y - fl
    bound_sq = bound * bound
    for _ in range(_MAX_ROUNDING_ATTEMPTS):
        r = fl + (uniforms(y.size, rng) < frac)
        if float(np.dot(r, r)) <= bound_sq:
            return r.astype(np.int64)
    raise InvalidPrivacyConfig(  # pragma: no cover - probability beta**1000
        f"conditional rounding failed {_MAX_ROUNDING_ATTEMPTS} times; beta too small"
    )


def ddg_encode(
    update: NDArray[np.floating],
    params: DDGParams,
    seed: bytes,
    *,
    rng: SecureRng | None = None,
) -> NDArray[np.unsignedinteger[Any]]:
    """Client side of DDG: clip, rotate, scale, round, add noise share, reduce mod 2**bits.

    Parameters
    ----------
    update : numpy.ndarray
        1-D model update of length ``params.dim``; not modified.
    params : DDGParams
        From :func:`calibrate_ddg` (identical at every client and the server).
    seed : bytes
        Public rotation seed of the round (:func:`rotation_seed`).
    rng : SecureRng, optional
        Generator for the rounding and the noise; a fresh OS-keyed one by default.

    Returns
    -------
    numpy.ndarray
        Ring vector of length ``params.padded_dim`` (``uint32`` for ``bits <= 32``, else
        ``uint64``), ready for :func:`confide.apply_masks` with the same ``bits``.

    Examples
    --------
    >>> import numpy as np
    >>> p = calibrate_ddg(DDGConfig(4, 1.0, 1.0, num_clients=3, threshold=2))
    >>> v = ddg_encode(np.ones(4), p, rotation_seed(b"job", 0), rng=SecureRng(bytes(32)))
    >>> v.dtype.name, v.shape
    ('uint32', (4,))
    """
    x = np.asarray(update)
    if x.ndim != 1 or x.shape[0] != params.dim:
        raise InvalidPrivacyConfig(f"update must have shape ({params.dim},), got {x.shape}")
    rng = SecureRng() if rng is None else rng
    clipped, _ = clip_update(x, params.clip_norm)
    y = rotate(clipped, seed) / params.gamma
    r = _conditional_round(y, params.norm_bound, rng)
    if params.local_sigma > 0:
        r = r + discrete_gaussian(params.padded_dim, params.local_sigma, rng=rng)
    modulus = np.int64(1) << np.int64(params.bits)
    out: NDArray[np.unsignedinteger[Any]] = np.mod(r, modulus).astype(ring_dtype(params.bits))
    return out


def ddg_decode(
    total: NDArray[np.unsignedinteger[Any]],
    params: DDGParams,
    seed: bytes,
    *,
    normalize_by: float | None = None,
) -> NDArray[np.float32]:
    """Server side of DDG: centre the unmasked ring sum, un-scale, un-rotate, normalise.

    Parameters
    ----------
    total : numpy.ndarray
        Sum mod ``2**bits`` of the clients' :func:`ddg_encode` outputs (after unmasking).
    params : DDGParams
        The round's parameters.
    seed : bytes
        The round's rotation seed.
    normalize_by : float, optional
        Public normaliser (expected cohort size); the sum is returned when omitted.

    Returns
    -------
    numpy.ndarray
        ``float32`` vector of length ``params.dim``: noised sum (or mean) of clipped updates.
    """
    t = np.asarray(total)
    if t.shape != (params.padded_dim,):
        raise InvalidPrivacyConfig(f"total must have shape ({params.padded_dim},), got {t.shape}")
    v = t.astype(np.int64) & ((np.int64(1) << np.int64(params.bits)) - 1)
    half = np.int64(1) << np.int64(params.bits - 1)
    v = np.where(v >= half, v - (half << np.int64(1)), v)
    x = unrotate(v.astype(np.float64) * params.gamma, seed, params.dim)
    if normalize_by is not None:
        if not normalize_by > 0:
            raise InvalidPrivacyConfig(f"normalize_by must be > 0, got {normalize_by}")
        x = x / normalize_by
    return x.astype(np.float32)


def ddg_event(params: DDGParams, rounds: int = 1) -> PrivacyEvent:
    """Accounting event of ``rounds`` DDG rounds (worst case: ``h`` honest shares).

    Needs the ``privacy`` extra (dp-accounting), like the rest of the accountant.

    Parameters
    ----------
    params : DDGParams
        From :func:`calibrate_ddg`.
    rounds : int, default 1
        Number of rounds.

    Returns
    -------
    PrivacyEvent
        A ``zcdp`` event with ``rho = params.rho`` (no amplification by sampling).
    """
    from confide.privacy.accountant import PrivacyEvent

    if math.isinf(params.rho):
        return PrivacyEvent("gaussian", noise_multiplier=0.0, count=int(rounds), label="ddg")
    return PrivacyEvent(
        "zcdp", relation=params.relation, rho=params.rho, count=int(rounds), label="ddg"
    )
