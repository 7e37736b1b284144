"""Adaptive clipping for client-level DP (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021).

The clip norm ``C`` tracks a target quantile ``gamma`` of the clients' update norms by
geometric updates driven by a *private* estimate of the fraction of unclipped updates:

1. each client reports ``b_i - 1/2`` with ``b_i = 1[||update_i|| <= C]`` (:meth:`client_bit`);
2. the server sums the centred bits, adds ``N(0, sigma_b**2)`` and estimates
   ``b = noisy_sum / m + 1/2`` with ``m`` the *expected* cohort size;
3. ``C <- C * exp(-eta * (b - gamma))`` (:meth:`AdaptiveClipping.server_update`).

Privacy cost. Adding or removing a client changes the clipped-update sum by at most ``C``
and the centred-bit sum by at most ``1/2``. Releasing both with noise ``z_delta * C`` and
``sigma_b`` is one Gaussian mechanism on the concatenation with effective noise multiplier
``z = (z_delta**-2 + (2 sigma_b)**-2) ** -1/2``. To spend exactly the budget of a plain run
with multiplier ``z``, noise the updates with :func:`update_noise_multiplier`
``(z, sigma_b)`` and account :meth:`AdaptiveClipping.event` (a Gaussian event with the
effective ``z``), so the quantile estimate's cost is accounted, not ignored.

Only the central mode is supported: in DDG the bit would have to travel inside the secure sum
(one extra coordinate, scaled), which is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from confide.errors import InvalidPrivacyConfig
from confide.noise import SecureRng, add_gaussian_noise

if TYPE_CHECKING:
    from confide.privacy.accountant import PrivacyEvent

__all__ = ["AdaptiveClipping", "effective_noise_multiplier", "update_noise_multiplier"]


def update_noise_multiplier(noise_multiplier: float, bit_noise_std: float) -> float:
    """Noise multiplier for the updates so that updates + bits together spend ``z``.

    Parameters
    ----------
    noise_multiplier : float
        Target effective ``z`` of the round (> 0).
    bit_noise_std : float
        ``sigma_b``, std of the noise on the centred bit sum (> ``z / 2``).

    Returns
    -------
    float
        ``z_delta = (z**-2 - (2 sigma_b)**-2) ** -1/2``.

    Raises
    ------
    InvalidPrivacyConfig
        ``sigma_b <= z / 2``: the bits alone would spend the whole budget.

    Examples
    --------
    >>> round(update_noise_multiplier(1.0, 5.0), 4)
    1.005
    """
    z, sb = float(noise_multiplier), float(bit_noise_std)
    if not (z > 0 and sb > 0 and math.isfinite(z) and math.isfinite(sb)):
        raise InvalidPrivacyConfig(f"need z > 0 and sigma_b > 0, got {z}, {sb}")
    rest = z**-2 - (2.0 * sb) ** -2
    if rest <= 0:
        raise InvalidPrivacyConfig(f"bit_noise_std={sb} must exceed noise_multiplier / 2 = {z / 2}")
    return float(rest**-0.5)


def effective_noise_multiplier(update_multiplier: float, bit_noise_std: float) -> float:
    """Effective ``z`` of releasing noised updates and noised centred bits together.

    Parameters
    ----------
    update_multiplier : float
        ``z_delta`` used on the clipped-update sum.
    bit_noise_std : float
        ``sigma_b`` used on the centred-bit sum.

    Returns
    -------
    float
        ``(z_delta**-2 + (2 sigma_b)**-2) ** -1/2``.

    Examples
    --------
    >>> round(effective_noise_multiplier(update_noise_multiplier(1.0, 5.0), 5.0), 9)
    1.0
    """
    return float((update_multiplier**-2 + (2.0 * bit_noise_std) ** -2) ** -0.5)


@dataclass
class AdaptiveClipping:
    """Server-side state of quantile-tracking clip norm (central client-level DP).

    Parameters
    ----------
    clip_norm : float
        Current ``C`` (initial value at construction).
    target_quantile : float, default 0.5
        ``gamma``: fraction of updates that should be unclipped.
    learning_rate : float, default 0.2
        ``eta`` of the geometric update.
    bit_noise_std : float, default 5.0
        ``sigma_b`` (Andrew et al. suggest about ``m / 20`` for cohorts of ``m``).

    Examples
    --------
    >>> ac = AdaptiveClipping(1.0, bit_noise_std=1e-9)
    >>> bits = [ac.client_bit(n) for n in (0.5, 2.0, 3.0, 4.0)]
    >>> c = ac.server_update(sum(bits), 4, rng=SecureRng(bytes(32)))
    >>> bool(c > 1.0)  # only 25% unclipped < 50% target: C grows
    True
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    bit_noise_std: float = 5.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise InvalidPrivacyConfig(f"clip_norm must be > 0, got {self.clip_norm}")
        if not 0.0 < self.target_quantile < 1.0:
            raise InvalidPrivacyConfig(
                f"target_quantile must be in (0, 1), got {self.target_quantile}"
            )
        if not self.learning_rate > 0:
            raise InvalidPrivacyConfig(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.bit_noise_std > 0:
            raise InvalidPrivacyConfig(f"bit_noise_std must be > 0, got {self.bit_noise_std}")

    def client_bit(self, update_norm: float) -> float:
        """Centred bit a client reports: ``+1/2`` if ``update_norm <= C`` else ``-1/2``.

        Parameters
        ----------
        update_norm : float
            Norm of the client's update before clipping.

        Returns
        -------
        float
            ``0.5`` or ``-0.5``.
        """
        return 0.5 if update_norm <= self.clip_norm else -0.5

    def server_update(
        self, bit_sum: float, expected_cohort: float, *, rng: SecureRng | None = None
    ) -> float:
        """Noise the centred-bit sum, estimate the unclipped fraction, update ``C``.

        Parameters
        ----------
        bit_sum : float
            Sum of the cohort's :meth:`client_bit` values.
        expected_cohort : float
            Public expected cohort size ``m``.
        rng : SecureRng, optional
            Noise generator; a fresh OS-keyed one by default.

        Returns
        -------
        float
            The new clip norm (also stored in ``clip_norm``).
        """
        if not expected_cohort > 0:
            raise InvalidPrivacyConfig(f"expected_cohort must be > 0, got {expected_cohort}")
        noisy = add_gaussian_noise(np.array([float(bit_sum)]), self.bit_noise_std, rng=rng)
        frac = float(noisy[0]) / expected_cohort + 0.5
        self.clip_norm = float(
            self.clip_norm * math.exp(-self.learning_rate * (frac - self.target_quantile))
        )
        return self.clip_norm

    def event(
        self, update_multiplier: float, sampling_rate: float = 1.0, rounds: int = 1
    ) -> PrivacyEvent:
        """Accounting event of a round releasing noised updates *and* the noised bits.

        Parameters
        ----------
        update_multiplier : float
            ``z_delta`` used on the clipped-update sum.
        sampling_rate : float, default 1.0
            Poisson cohort sampling rate.
        rounds : int, default 1
            Number of rounds.

        Returns
        -------
        PrivacyEvent
            A client-level Poisson Gaussian event with the effective noise multiplier.
        """
        from confide.privacy.accountant import client_poisson_event

        z = effective_noise_multiplier(update_multiplier, self.bit_noise_std)
        ev = client_poisson_event(sampling_rate, z, rounds)
        return ev.__class__(**{**ev.to_dict(), "label": "client_central+adaptive_clip"})
