"""Distributed patient-level DP-SGD in SecAgg+ rounds (no HTTP): step, accounting, checks.

Three sites hold real NumpyTrainer data; each round is one DP-SGD step whose noise the sites
add inside the secure sum (``privacy.mode = "sample_distributed"``). With ``q = 1`` every
patient is sampled, so the clipped sums are deterministic and the committed model can be
compared with ``base - lr * sum / E`` up to the accounted noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide import NumpyTrainer
from confide.client.training import check_per_sample, sample_ddg_step
from confide.data import Dataset
from confide.errors import ConfigError, IntegrityError, PrivacyUnsupportedError
from confide.noise import SecureRng
from confide.privacy.accountant import account
from confide.privacy.distributed_dpsgd import SampleDDGParams, event
from confide.privacy.dpsgd import clipped_patient_sum
from confide.secagg import RoundSetup
from confide.training import SiteData, TrainConfig
from confide.training.base import FitResult
from confide_server.config import Config
from confide_server.engine.privacy import read_privacy
from tests.server.test_secagg_rounds import IDS, Fed, _config
from tests.server.util import N_FEATURES

LR = 0.5
E = 30.0  # public expected batch: q = 1, 10 patients per site, 3 sites
Z = 0.05  # small noise: the committed step stays close to the noiseless one


def _sddg_config(tmp: Path, **kw: object) -> Config:
    base: dict[str, object] = {
        "privacy__mode": "sample_distributed",
        "privacy__noise_multiplier": Z,
        "privacy__clip_norm": 1.0,
        "privacy__sampling_rate": 1.0,
        "privacy__expected_batch_size": E,
        "strategy__learning_rate": LR,
    }
    return _config(tmp, **{**base, **kw})


def _site_data(i: int) -> Dataset:
    rng = np.random.default_rng(100 + i)
    x = rng.normal(size=(20, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=20) > 0).astype(np.int64)
    return Dataset(x, y, patient_ids=np.repeat(np.arange(10), 2))  # 2 records per patient


class SampleFed(Fed):
    """:class:`Fed` whose sites answer ``mask`` with a real distributed DP-SGD step."""

    def __init__(self, tmp: Path, cfg: Config) -> None:
        super().__init__(tmp, cfg)
        self.data = {c: _site_data(i) for i, c in enumerate(IDS)}
        self.trainers = {c: NumpyTrainer.create("logistic", N_FEATURES, 2, seed=0) for c in IDS}

    def answer(self, cid: str) -> tuple[str, dict[str, Any]] | None:
        task = self.eng.task_for(cid).to_json()
        if task["action"] == "mask":
            params = self.parts[cid].sample_ddg(task["round"])
            assert params is not None
            ring = sample_ddg_step(
                self.trainers[cid],
                self.model(),
                self.data[cid],
                params,
                rng=SecureRng(cid.encode() * 32),
            )
            msg = self.parts[cid].answer(task, ring, 0)  # type: ignore[arg-type]
            self.submit(cid, "mask", msg, task["round"])
            return "mask", msg
        return super().answer(cid)

    def clipped_sum(self, ids: tuple[str, ...]) -> np.ndarray:
        """Sum over ``ids`` of the sites' clipped patient sums at the current model (q = 1)."""
        total = np.zeros(self.trainers[ids[0]].manifest.size)
        for c in ids:
            t = self.trainers[c]
            t.set_weights(self.model())
            d = self.data[c]
            total += clipped_patient_sum(t, d, np.arange(len(d)), d.patient_ids, 1.0)
        return total


def _round(fed: SampleFed, skip_mask: tuple[str, ...] = ()) -> None:
    assert fed.eng.tick()
    fed.run_stage()  # advertise
    fed.run_stage()  # share
    fed.run_stage(skip=skip_mask)  # mask
    fed.run_stage()  # unmask
    assert fed.stage() == "evaluate"
    fed.finish_evaluate()


def test_round_is_one_noised_dpsgd_step_accounted_as_central_dpsgd(tmp_path: Path) -> None:
    fed = SampleFed(tmp_path, _sddg_config(tmp_path))
    base = fed.model()
    expected_sum = fed.clipped_sum(IDS)
    assert np.linalg.norm(expected_sum) > 1.0  # the step is not noise-sized
    assert fed.eng.tick()
    task = fed.eng.task_for("a").to_json()
    setup = RoundSetup.from_json(task["setup"])
    # The SecAgg+ ring is the distributed DP-SGD ring: 48 bits, weight 1, model length.
    assert (setup.params.encoding, setup.params.modulus_bits, setup.params.max_weight) == (
        "ring",
        48,
        1,
    )
    assert setup.vector_length == base.size
    assert task["privacy"]["mode"] == "sample_distributed"
    assert "dp" not in task["config"]  # no local DP-SGD: the noise is in the secure sum
    shipped = task["privacy"]["sample_ddg"]
    assert shipped["honest_shares"] == 2  # min_survivors = max(t, n - D) = 2, none colluding
    fed.run_stages("advertise", "share", "mask", "unmask")
    fed.finish_evaluate()
    row = fed.committed()
    assert row.metrics["train_examples"] == 3  # weight 1 per site: sample counts stay hidden
    params = fed.eng._round_ddg(1)
    assert params is not None
    assert isinstance(params[0], SampleDDGParams)
    p = params[0]
    assert row.metrics["sample_ddg"]["expected_batch_size"] == E
    # 3 honest shares carry sqrt(3/2) times the worst-case std; scaled by lr / E.
    std = p.worst_case_noise_std * math.sqrt(3 / 2) * LR / E
    np.testing.assert_allclose(fed.model(), base - LR * expected_sum / E, atol=6 * std + 1e-6)
    assert 6 * std < 0.1 * np.abs(LR * expected_sum / E).max()  # a meaningful tolerance
    # Accounted as one Poisson-subsampled Gaussian step with the realised multiplier.
    want = account([event(p)], 1e-5)
    summary, per_round = read_privacy(fed.eng.store)
    assert summary is not None
    assert summary["mode"] == "sample_distributed"
    assert summary["unit"] == "patient"
    assert per_round[1]["epsilon"] == pytest.approx(want.epsilon)
    assert p.effective_noise_multiplier >= Z * (1 - 1e-9)
    fed.restart()
    assert fed.eng.privacy.accountant.epsilon() == pytest.approx(want.epsilon)
    again = fed.eng.privacy.load_ddg(1)
    assert again is not None
    assert again[0] == p


def test_round_with_threshold_survivors_commits_and_is_accounted_once(tmp_path: Path) -> None:
    fed = SampleFed(tmp_path, _sddg_config(tmp_path))
    base = fed.model()
    expected_sum = fed.clipped_sum(("a", "b"))
    _round(fed, skip_mask=("c",))
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed"
    params = fed.eng._round_ddg(1)
    assert params is not None
    std = params[0].worst_case_noise_std * LR / E  # exactly h = 2 honest shares
    # Divided by the public E, not by the survivors' (private) batch.
    np.testing.assert_allclose(fed.model(), base - LR * expected_sum / E, atol=6 * std + 1e-6)
    _, per_round = read_privacy(fed.eng.store)
    assert list(per_round) == [1]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("local_sigma", 0.0, "local_sigma"),  # a server asking for no noise
        ("honest_shares", 3, "honest_shares"),  # a server pretending more honest shares
        ("gamma", 1.0, "gamma"),
        ("noise_multiplier", 0.0, "noise_multiplier"),
        ("extra", 1, "exactly the fields"),
    ],
)
def test_client_refuses_tampered_parameters(
    tmp_path: Path, key: str, value: object, match: str
) -> None:
    fed = SampleFed(tmp_path, _sddg_config(tmp_path))
    assert fed.eng.tick()
    task: dict[str, Any] = json.loads(json.dumps(fed.eng.task_for("a").to_json()))
    task["privacy"]["sample_ddg"][key] = value
    with pytest.raises(IntegrityError, match=match):
        fed.parts["a"].advertise(task)
    assert not fed.parts["a"].known(1)  # nothing was advertised


def test_client_refuses_a_setup_without_ring_inputs(tmp_path: Path) -> None:
    fed = SampleFed(tmp_path, _sddg_config(tmp_path))
    assert fed.eng.tick()
    task: dict[str, Any] = json.loads(json.dumps(fed.eng.task_for("b").to_json()))
    del task["privacy"]  # ring inputs without parameters: no noise would be added
    with pytest.raises(IntegrityError, match="ring inputs"):
        fed.parts["b"].advertise(task)


def test_mask_refuses_a_float_update(tmp_path: Path) -> None:
    fed = SampleFed(tmp_path, _sddg_config(tmp_path))
    assert fed.eng.tick()
    fed.run_stage()
    fed.run_stage()
    task = fed.eng.task_for("a").to_json()
    assert task["action"] == "mask"
    with pytest.raises(IntegrityError, match="ring vector"):
        fed.parts["a"].answer(task, np.zeros(fed.model().size, dtype=np.float32), 1)


class _NoPerSample:
    """A custom engine without per-sample gradients."""

    def fit(self, data: SiteData, config: TrainConfig, seed: int) -> FitResult:
        return FitResult(num_examples=len(data), loss=0.0)


def test_engine_without_per_sample_gradients_is_refused() -> None:
    with pytest.raises(PrivacyUnsupportedError, match="per-sample gradients"):
        check_per_sample(_NoPerSample(), "distributed patient-level DP-SGD")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"secagg__enabled": False}, "needs \\[secagg\\] enabled"),
        ({"privacy__expected_batch_size": 0.0}, "expected_batch_size"),
        ({"privacy__local_steps": 5}, "one DP-SGD step per round"),
        ({"privacy__momentum": 0.9}, "fedavgm"),
    ],
)
def test_config_errors(tmp_path: Path, overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _sddg_config(tmp_path, **overrides)


def test_too_small_ring_is_refused_at_start(tmp_path: Path) -> None:
    from confide_server.app import open_engine

    with pytest.raises(ConfigError, match="bits >="):
        open_engine(_sddg_config(tmp_path, privacy__ddg_bits=24))


def test_target_epsilon_calibrates_the_worst_case_noise(tmp_path: Path) -> None:
    cfg = _sddg_config(
        tmp_path,
        job__rounds=20,
        privacy__noise_multiplier=0.0,
        privacy__target_epsilon=2.0,
        privacy__sampling_rate=0.1,
        privacy__expected_batch_size=3.0,
    )
    fed = SampleFed(tmp_path, cfg)
    z = fed.eng.privacy.noise_multiplier
    from confide.privacy.accountant import dpsgd_event

    assert account([dpsgd_event(0.1, z, 20)], 1e-5).epsilon <= 2.0
    assert account([dpsgd_event(0.1, z * 0.98, 20)], 1e-5).epsilon > 2.0
