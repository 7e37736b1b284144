"""FedProx on the sites (numpy, torch, DP-SGD), the task fields, and client-side norm bounding."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client.training import bound_update, check_trainable, fit_round, train_delta
from confide.data import Dataset
from confide.errors import ConfigError, WireFormatError
from confide.noise import SecureRng
from confide.privacy import run_dpsgd
from confide.protocol.tasks import DPSGDConfig, TrainConfig, parse_task
from confide.strategies import FedAvg, FedProx
from confide.training import NumpyTrainer

ONE = Dataset(np.array([[1.0]], np.float32), np.array([1], np.int64))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _logistic(w: float = 0.0, b: float = 0.0) -> NumpyTrainer:
    t = NumpyTrainer.create("logistic", n_features=1, n_classes=2)
    t.set_weights(np.array([w, b], np.float32))
    return t


def test_numpy_proximal_step_by_hand() -> None:
    """x = 1, y = 1, w0 = (0, 0), lr 1, two full-batch steps.

    Step 1 (w = w0, the proximal gradient is 0): dz = sigmoid(0) - 1 = -0.5, w1 = (0.5, 0.5).
    Step 2: dz = sigmoid(1) - 1; gradient (dz, dz) + mu (w1 - w0) = dz + 0.25 for mu = 0.5,
    so w2 = 0.5 - dz - 0.25 (without the term: 0.5 - dz).
    """
    dz = _sigmoid(1.0) - 1.0
    for mu, expected in ((0.5, 0.5 - dz - 0.25), (0.0, 0.5 - dz)):
        t = _logistic()
        t.fit(ONE, TrainConfig(epochs=2, batch_size=1, learning_rate=1.0, proximal_mu=mu), 0)
        np.testing.assert_allclose(t.get_weights(), [expected, expected], rtol=1e-6)


def test_mu_zero_is_fedavg_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    data = Dataset(x, (x[:, 0] + x[:, 1] > 0).astype(np.int64))
    runs = []
    for cfg in (TrainConfig(3, 8, 0.3), TrainConfig(3, 8, 0.3, proximal_mu=0.0)):
        t = NumpyTrainer.create("mlp", 4, 2, hidden=(5,), seed=1)
        t.fit(data, cfg, seed=4)
        runs.append(t.get_weights().tobytes())
    assert runs[0] == runs[1]
    base = rng.normal(size=3).astype(np.float32)
    ups = [
        (rng.normal(size=3).astype(np.float32), 2.0),
        (rng.normal(size=3).astype(np.float32), 5.0),
    ]
    a, _ = FedProx(mu=0.0).aggregate(base, ups, {})
    b, _ = FedAvg().aggregate(base, ups, {})
    assert a.tobytes() == b.tobytes()
    assert FedProx(mu=0.3).aggregate(base, ups, {})[0].tobytes() == b.tobytes()  # server: FedAvg


@settings(max_examples=15, deadline=None)
@given(mu=st.sampled_from([0.5, 1.0, 4.0]), seed=st.integers(0, 1000))
def test_proximal_term_pulls_the_local_solution_to_the_global_model(mu: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    data = Dataset(x, (x[:, 0] > 0.3).astype(np.int64))
    start = NumpyTrainer.create("logistic", 3, 2, seed=seed).get_weights()
    dist = {}
    for m in (0.0, mu):
        t = NumpyTrainer.create("logistic", 3, 2, seed=seed)
        t.fit(data, TrainConfig(20, 10, 0.2, proximal_mu=m), seed=seed)
        dist[m] = float(np.linalg.norm(t.get_weights() - start))
    assert dist[mu] < dist[0.0]


def test_dpsgd_adds_the_proximal_gradient_after_clipping_and_noise() -> None:
    """One patient, q = 1, z = 0, C = 0.1, lr 1: the data gradient is clipped to 0.1, the
    proximal gradient mu (w - w0) is added after the clip (so it is not clipped away)."""
    c, mu = 0.1, 0.5
    dp = DPSGDConfig(noise_multiplier=0.0, clip_norm=c, sampling_rate=1.0, steps=2)
    t = _logistic()
    run_dpsgd(
        t, ONE, TrainConfig(learning_rate=1.0, dp=dp, proximal_mu=mu), rng=SecureRng(b"p" * 32)
    )
    # step 1: gradient (-0.5, -0.5), norm 0.707 -> clipped to c: w1 = c / sqrt(2) (both)
    w1 = c / math.sqrt(2.0)
    # step 2: data gradient (g, g), g = sigmoid(2 w1) - 1, clipped to norm c: (-c/sqrt 2) each;
    # plus mu * w1 (unclipped)
    g = _sigmoid(2 * w1) - 1.0
    clipped = g * min(1.0, c / (abs(g) * math.sqrt(2.0)))
    w2 = w1 - (clipped + mu * w1)  # = 1.5 w1 (plain DP-SGD: 2 w1)
    np.testing.assert_allclose(t.get_weights(), [w2, w2], rtol=1e-5)
    np.testing.assert_allclose(w2, 1.5 * w1)
    # mu = 0 is the plain DP-SGD run, bit for bit
    runs = []
    for cfg in (
        TrainConfig(learning_rate=1.0, dp=dp),
        TrainConfig(learning_rate=1.0, dp=dp, proximal_mu=0.0),
    ):
        t = _logistic()
        run_dpsgd(t, ONE, cfg, rng=SecureRng(b"q" * 32))
        runs.append(t.get_weights().tobytes())
    assert runs[0] == runs[1]


def test_torch_proximal_step_matches_the_hand_derivation() -> None:
    """Two full-batch SGD steps: the runs with and without mu share w1 (the term is 0 at
    w0), then differ by exactly -lr * mu * (w1 - w0)."""
    pytest.importorskip("torch")
    from confide.training.torch_engine import TorchTrainer
    from tests.training.test_torch_engine import toy_data

    data = toy_data(n=16)
    lr, mu = 0.1, 0.5

    def run(epochs: int, m: float) -> np.ndarray[Any, Any]:
        t = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=0)
        t.fit(data, TrainConfig(epochs, 16, lr, proximal_mu=m), seed=3)
        return t.get_weights().astype(np.float64)

    w0 = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=0)
    start = w0.get_weights().astype(np.float64)
    w1 = run(1, 0.0)
    np.testing.assert_array_equal(run(1, mu), w1)
    np.testing.assert_allclose(run(2, mu) - run(2, 0.0), -lr * mu * (w1 - start), atol=1e-6)
    assert run(2, 0.0).tobytes() == run(2, 0.0).tobytes()


class _PlainEngine:
    """A custom engine that knows nothing of FedProx (it wraps NumpyTrainer's fit)."""

    def __init__(self) -> None:
        self._t = _logistic()

    @property
    def manifest(self) -> Any:
        return self._t.manifest

    def get_weights(self) -> Any:
        return self._t.get_weights()

    def set_weights(self, v: Any) -> None:
        self._t.set_weights(v)

    def fit(self, data: Any, config: TrainConfig, seed: int) -> Any:
        return self._t.fit(
            data, TrainConfig(config.epochs, config.batch_size, config.learning_rate), seed
        )

    def evaluate(self, data: Any) -> dict[str, float]:
        return self._t.evaluate(data)


def test_an_engine_without_the_proximal_term_is_refused_not_silently_fedavg() -> None:
    cfg = TrainConfig(proximal_mu=0.1)
    with pytest.raises(ConfigError, match="does not implement the proximal term"):
        check_trainable(_PlainEngine(), cfg)
    with pytest.raises(ConfigError, match="proximal"):
        fit_round(_PlainEngine(), ONE, cfg, 0)
    check_trainable(_PlainEngine(), TrainConfig())  # FedAvg tasks train as before
    check_trainable(_logistic(), cfg)


def test_train_delta_clips_the_update_before_it_leaves_the_site() -> None:
    t = _logistic()
    w0 = t.get_weights()
    cfg = TrainConfig(epochs=5, batch_size=1, learning_rate=5.0, update_clip_norm=0.01)
    delta, n, _ = train_delta(t, w0, ONE, cfg, seed=0)
    assert n == 1
    assert float(np.linalg.norm(delta.astype(np.float64))) <= 0.01 * (1 + 1e-6)
    free, _, _ = train_delta(_logistic(), w0, ONE, TrainConfig(5, 1, 5.0), seed=0)
    assert float(np.linalg.norm(free)) > 0.01
    np.testing.assert_allclose(
        delta, free * (0.01 / np.linalg.norm(free.astype(np.float64))), rtol=1e-5
    )
    small = np.array([1e-4, 0.0], np.float32)
    assert bound_update(small, cfg).tobytes() == small.tobytes()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"proximal_mu": -0.1}, "proximal_mu"),
        ({"proximal_mu": float("nan")}, "proximal_mu"),
        ({"proximal_mu": True}, "proximal_mu"),
        ({"proximal_mu": "0.1"}, "proximal_mu"),
        ({"update_clip_norm": 0.0}, "update_clip_norm"),
        ({"update_clip_norm": float("inf")}, "update_clip_norm"),
        ({"update_clip_norm": False}, "update_clip_norm"),
        ({"clip": 1.0}, "clip"),
    ],
)
def test_task_fields_are_strictly_validated(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({"epochs": 1, "batch_size": 2, "learning_rate": 0.1, **fields})
    doc = {
        "action": "train",
        "round": 1,
        "stage": "train",
        "deadline": 10.0,
        "seed": 1,
        "model_sha256": "ab" * 32,
        "config": {"epochs": 1, "batch_size": 2, "learning_rate": 0.1, **fields},
    }
    with pytest.raises(WireFormatError, match=match):
        parse_task(doc)


def test_task_fields_round_trip() -> None:
    cfg = TrainConfig(2, 4, 0.5, proximal_mu=0.25, update_clip_norm=1.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
