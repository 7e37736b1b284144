"""One DDG mapping for both sides: ddg_config_for() and padded_dim() (server and client)."""

from __future__ import annotations

import math

import pytest

from confide.privacy.accountant import account
from confide.privacy.client_dp import (
    DDGConfig,
    calibrate_ddg,
    ddg_config_for,
    padded_dim,
)
from confide.secagg import ThreatModel, derive_params
from confide_server.engine.privacy import JobPrivacy, PrivacyConfig


def test_padded_dim_is_the_next_power_of_two() -> None:
    assert [padded_dim(d) for d in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [
        1,
        2,
        4,
        4,
        8,
        1024,
        1024,
        2048,
    ]


def test_ddg_config_for_maps_the_secagg_parameters() -> None:
    p = derive_params(10, ThreatModel(0.1, 0.2), quant_bits=16, clip_range=1.0, max_weight=1)
    cfg = ddg_config_for(p, dim=100, clip_norm=0.5, noise_multiplier=1.2, bits=40)
    assert cfg == DDGConfig(
        dim=100,
        clip_norm=0.5,
        noise_multiplier=1.2,
        num_clients=p.n,
        threshold=p.min_survivors,
        max_colluding=p.corrupt,
        bits=40,
    )
    assert calibrate_ddg(cfg).padded_dim == padded_dim(100) == 128


def test_server_round_params_are_the_shared_mapping() -> None:
    p = derive_params(5, ThreatModel(0.2, 0.2), quant_bits=16, clip_range=1.0, max_weight=1)
    priv = JobPrivacy(
        PrivacyConfig(mode="distributed", noise_multiplier=1.5, clip_norm=2.0, ddg_bits=48), 3, 1
    )
    got = priv.ddg_params(37, p)
    want = calibrate_ddg(ddg_config_for(p, dim=37, clip_norm=2.0, noise_multiplier=1.5, bits=48))
    assert got == want
    assert got.honest_shares == p.min_survivors - p.corrupt


@pytest.mark.parametrize("target", [2.0, 8.0])
def test_ddg_calibration_is_accountant_calibrate_and_near_minimal(target: float) -> None:
    rounds = 4
    priv = JobPrivacy(
        PrivacyConfig(mode="distributed", target_epsilon=target, clip_norm=1.0), rounds, 1
    )
    z = priv._calibrate()
    events = priv._events_for(z, rounds)
    assert account(events, 1e-5).epsilon <= target
    # within the 0.1 % margin (plus the search tolerance) of the smallest z reaching the target
    assert account(priv._events_for(z / 1.003, rounds), 1e-5).epsilon > target
    assert math.isfinite(z)
