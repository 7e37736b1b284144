"""Adaptive clipping tracks the quantile and its privacy cost is accounted."""

from __future__ import annotations

import numpy as np
import pytest

from confide import SecureRng
from confide.privacy import InvalidPrivacyConfig
from confide.privacy.accountant import account, client_poisson_event
from confide.privacy.adaptive import (
    AdaptiveClipping,
    effective_noise_multiplier,
    update_noise_multiplier,
)


def test_tracks_target_quantile() -> None:
    norms = np.exp(np.linspace(-1, 3, 100))  # median ~ e
    ac = AdaptiveClipping(0.1, target_quantile=0.5, learning_rate=0.3, bit_noise_std=1.0)
    rng = SecureRng(bytes(range(32)))
    for _ in range(200):
        ac.server_update(sum(ac.client_bit(n) for n in norms), len(norms), rng=rng)
    assert ac.clip_norm == pytest.approx(float(np.median(norms)), rel=0.25)


def test_cost_is_accounted_as_the_combined_gaussian() -> None:
    z, sb = 1.0, 2.0
    zd = update_noise_multiplier(z, sb)
    assert zd > z  # updates get more noise so the bits fit in the same budget
    assert effective_noise_multiplier(zd, sb) == pytest.approx(z)
    ac = AdaptiveClipping(1.0, bit_noise_std=sb)
    ev = ac.event(zd, rounds=10)
    assert account([ev], 1e-5).epsilon == pytest.approx(
        account([client_poisson_event(1.0, z, 10)], 1e-5).epsilon, rel=1e-6
    )
    with pytest.raises(InvalidPrivacyConfig):
        update_noise_multiplier(1.0, 0.4)
