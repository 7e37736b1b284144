"""Distributed DP (DDG) in SecAgg+ rounds (no HTTP): encoding, decoding, accounting, config."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.errors import ConfigError, IntegrityError
from confide.noise import SecureRng
from confide.privacy.accountant import account
from confide.privacy.client_dp import ddg_decode, ddg_encode, ddg_event, rotation_seed
from confide.secagg import RoundSetup
from confide_server.config import Config
from confide_server.engine.privacy import read_privacy
from tests.server.test_secagg_rounds import IDS, Fed, _config
from tests.server.util import write_job

Z = 0.02  # large epsilon: the decoded mean stays close to the non-private one


def _ddg_config(tmp: Path, **kw: object) -> Config:
    base: dict[str, object] = {
        "privacy__mode": "distributed",
        "privacy__noise_multiplier": Z,
        "privacy__clip_norm": 1.0,
        "privacy__ddg_bits": 32,
    }
    return _config(tmp, **{**base, **kw})


def _run_round(fed: Fed, skip_mask: tuple[str, ...] = ()) -> None:
    assert fed.eng.tick()  # round starts in "advertise"
    fed.run_stage()  # advertise
    fed.run_stage()  # share
    fed.run_stage(skip=skip_mask)  # mask
    fed.run_stage()  # unmask
    assert fed.stage() == "evaluate"
    fed.finish_evaluate()


def _clipped_sum(fed: Fed, ids: tuple[str, ...], clip: float = 1.0) -> np.ndarray:
    total = np.zeros(fed.updates[ids[0]].size, dtype=np.float64)
    for c in ids:
        u = fed.updates[c].astype(np.float64)
        total += u * min(1.0, clip / float(np.linalg.norm(u)))
    return total


def test_distributed_round_commits_noised_mean_and_accounts_it(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _ddg_config(tmp_path))
    base = fed.model()
    assert fed.eng.tick()
    task = fed.eng.task_for("a").to_json()
    setup = RoundSetup.from_json(task["setup"])
    # The SecAgg+ ring is the DDG ring; uniform weights; the upload is the padded rotation.
    assert setup.params.encoding == "ring"
    assert setup.params.modulus_bits == 32
    assert setup.params.max_weight == 1
    ddg = task["privacy"]["ddg"]
    assert task["privacy"]["mode"] == "distributed"
    assert setup.vector_length == ddg["padded_dim"] == 8
    # worst case: min_survivors = max(t, n - D) = 2, nobody colluding -> h = 2
    assert ddg["honest_shares"] == 2
    assert ddg["num_clients"] == 3
    fed.run_stages("advertise", "share", "mask", "unmask")
    fed.finish_evaluate()
    row = fed.committed()
    assert row.metrics["train_clients"] == 3
    assert row.metrics["train_examples"] == 3  # weight 1 each: the count of masked inputs
    # Decoded sum / cohort size (3): close to the clipped non-private mean. Noise std of
    # the mean with all 3 honest shares: sqrt(3/2) * worst-case std / 3 per coordinate.
    params = fed.eng._round_ddg(1)
    assert params is not None
    std = params[0].worst_case_noise_std * math.sqrt(3 / 2) / 3
    assert row.metrics["ddg"]["normaliser"] == 3
    expected = base + _clipped_sum(fed, IDS) / 3
    np.testing.assert_allclose(fed.model(), expected, atol=6 * std + 1e-5)
    assert 6 * std < 0.06  # the tolerance is meaningful next to updates in [-0.5, 0.5]
    # Accounted with ddg_event (worst case h shares), persisted with the round.
    summary, per_round = read_privacy(fed.eng.store)
    want = account([ddg_event(params[0])], 1e-5)
    assert per_round[1]["epsilon"] == pytest.approx(want.epsilon)
    assert per_round[1]["method"] == "rdp"
    assert summary is not None
    assert summary["mode"] == "distributed"
    assert summary["epsilon"] == pytest.approx(want.epsilon)
    assert fed.eng.store.get_meta("privacy_accountant") is not None
    # A restart keeps the spent budget and the stored round parameters.
    fed.restart()
    assert fed.eng.privacy.accountant.epsilon() == pytest.approx(want.epsilon)
    again = fed.eng.privacy.load_ddg(1)
    assert again is not None
    assert again[0] == params[0]


def test_decoded_noise_has_the_accounted_variance_with_t_survivors(tmp_path: Path) -> None:
    """Statistical: with exactly ``h = t`` survivors the decoded sum's noise variance is
    ``h * local_variance * gamma**2`` per coordinate (the accounted worst case).

    The round's parameters come from the server's own derivation for this cohort (with a
    4096-long model so the estimate is tight); the survivors encode zero updates with fixed
    seeds, the ring sum is decoded as the server does. 4096 coordinates give a relative
    standard error of sqrt(2/4096) = 2.2% on the variance: tolerance 10%.
    """
    fed = Fed(tmp_path, _ddg_config(tmp_path, privacy__noise_multiplier=1.0))
    secagg, ddg0 = fed.eng._secure_params(3)
    assert ddg0 is not None
    params = fed.eng.privacy.ddg_params(4096, secagg)
    h = params.honest_shares
    assert h == secagg.min_survivors - secagg.corrupt == 2
    seed = rotation_seed(b"job", 1)
    modulus = 1 << params.bits
    total = np.zeros(params.padded_dim, dtype=np.uint64)
    for i in range(h):  # exactly t survivors, all honest
        enc = ddg_encode(np.zeros(4096), params, seed, rng=SecureRng(bytes([i + 1]) * 32))
        total = (total + enc.astype(np.uint64)) % np.uint64(modulus)
    noise = ddg_decode(total, params, seed).astype(np.float64)
    want = h * params.local_variance * params.gamma**2
    assert params.worst_case_noise_std**2 == pytest.approx(want)
    assert float(np.mean(noise**2)) == pytest.approx(want, rel=0.10)
    # ... which is at least the calibrated (z * Delta_2 * gamma)^2
    assert want >= (params.noise_multiplier * params.norm_bound * params.gamma) ** 2 * (1 - 1e-9)


def test_round_with_t_survivors_is_accounted_once(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _ddg_config(tmp_path))
    base = fed.model()
    _run_round(fed, skip_mask=("c",))
    row = fed.committed()
    assert row.metrics["train_clients"] == 2
    params = fed.eng._round_ddg(1)
    assert params is not None
    # Normalised by the cohort (3), not by the 2 survivors: a public constant.
    std = params[0].worst_case_noise_std / 3
    np.testing.assert_allclose(
        fed.model(), base + _clipped_sum(fed, ("a", "b")) / 3, atol=6 * std + 1e-5
    )
    _, per_round = read_privacy(fed.eng.store)
    assert list(per_round) == [1]


def test_client_refuses_tampered_ddg_parameters(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _ddg_config(tmp_path))
    assert fed.eng.tick()
    task: dict[str, Any] = json.loads(json.dumps(fed.eng.task_for("a").to_json()))
    task["privacy"]["ddg"]["local_sigma"] = 0.0  # a server asking for no noise
    with pytest.raises(IntegrityError, match="local_sigma"):
        fed.parts["a"].advertise(task)
    task = json.loads(json.dumps(fed.eng.task_for("b").to_json()))
    del task["privacy"]  # ring inputs without DDG parameters
    with pytest.raises(IntegrityError, match="ring inputs"):
        fed.parts["b"].advertise(task)


def test_distributed_needs_secagg(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs \\[secagg\\] enabled"):
        write_job(tmp_path, privacy__mode="distributed", privacy__noise_multiplier=1.0)


def test_infeasible_distributed_config_is_refused_at_start(tmp_path: Path) -> None:
    # An 8-bit ring leaves the local discrete Gaussian below KLS21's sigma >= 1/2.
    cfg = _ddg_config(tmp_path, privacy__noise_multiplier=1e-4, privacy__ddg_bits=8)
    with pytest.raises(ConfigError, match="infeasible for a cohort of"):
        Fed(tmp_path, cfg)


def test_ddg_bits_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ddg_bits"):
        _ddg_config(tmp_path, privacy__ddg_bits=64)


def test_target_epsilon_is_calibrated_for_ddg(tmp_path: Path) -> None:
    fed = Fed(
        tmp_path,
        _ddg_config(
            tmp_path, privacy__noise_multiplier=0.0, privacy__target_epsilon=5.0, job__rounds=3
        ),
    )
    z = fed.eng.privacy.noise_multiplier
    _secagg, ddg = fed.eng._secure_params(3)
    assert ddg is not None
    assert ddg.noise_multiplier == z
    eps = account([ddg_event(ddg, rounds=3)], 1e-5).epsilon
    assert 4.8 < eps <= 5.0
