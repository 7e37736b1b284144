"""Patient-level DP-SGD of the numpy engine, driven by the privacy layer (run_dpsgd)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide import SecureRng, clip_rows
from confide.data import load_csv
from confide.privacy import run_dpsgd
from confide.training import DPSGDConfig, NumpyTrainer, TrainConfig
from tests.support import Arrays


def _data(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    return x, y


def test_zero_noise_huge_clip_full_sampling_equals_non_private_gd() -> None:
    x, y = _data()
    a = NumpyTrainer.create("mlp", 3, 2, hidden=(4,), seed=1)
    b = NumpyTrainer.from_manifest(a.manifest, a.get_weights())
    steps = 7
    dp = DPSGDConfig(noise_multiplier=0.0, clip_norm=1e9, sampling_rate=1.0, steps=steps)
    res = run_dpsgd(
        a, Arrays(x, y), TrainConfig(learning_rate=0.3, dp=dp), rng=SecureRng(bytes(32))
    )
    # full-batch GD: one batch of all n examples per epoch
    b.fit(Arrays(x, y), TrainConfig(epochs=steps, batch_size=len(y), learning_rate=0.3), seed=0)
    np.testing.assert_allclose(a.get_weights(), b.get_weights(), rtol=1e-5, atol=1e-6)
    assert res.num_steps == steps
    assert res.num_examples == len(y)
    assert np.isnan(res.loss)  # an un-noised training loss is never reported under DP


def test_clipping_is_per_patient_not_per_record() -> None:
    x, y = _data(12)
    ids = np.array(["p1"] * 5 + ["p2"] * 4 + ["p3"] * 3)
    t = NumpyTrainer.create("logistic", 3, 2, seed=2)
    w0 = t.get_weights()
    c, lr = 0.05, 1.0
    dp = DPSGDConfig(noise_multiplier=0.0, clip_norm=c, sampling_rate=1.0, steps=1)
    run_dpsgd(t, Arrays(x, y, ids), TrainConfig(learning_rate=lr, dp=dp))
    g = t.per_sample_gradients(x, y)  # gradients at w0 (t now holds w1; recompute)
    ref = NumpyTrainer.from_manifest(t.manifest, w0)
    g = ref.per_sample_gradients(x, y)
    per_patient = np.stack([g[ids == p].sum(axis=0) for p in ("p1", "p2", "p3")])
    clip_rows(per_patient, c)
    expected = w0 - lr * per_patient.sum(axis=0) / 3.0  # expected batch size q * 3 patients
    np.testing.assert_allclose(t.get_weights(), expected, rtol=1e-5, atol=1e-7)
    # per-record clipping would give another (larger) step
    rows = g.copy()
    clip_rows(rows, c)
    assert not np.allclose(w0 - lr * rows.sum(axis=0) / 3.0, expected, atol=1e-6)


def test_noise_std_follows_the_config() -> None:
    x, y = _data(400)
    t = NumpyTrainer.create("logistic", 3, 2, seed=0)
    w0 = t.get_weights()
    z, c, q = 2.0, 1.0, 1.0  # q = 1: the clipped sum is fixed, only the noise varies
    dp = DPSGDConfig(noise_multiplier=z, clip_norm=c, sampling_rate=q, steps=1)
    diffs = []
    for k in range(200):
        t.set_weights(w0)
        run_dpsgd(
            t, Arrays(x, y), TrainConfig(learning_rate=1.0, dp=dp), rng=SecureRng(bytes([k]) * 32)
        )
        diffs.append(t.get_weights() - w0)
    d = np.asarray(diffs, dtype=np.float64)
    # noise std on the mean gradient: z C / (q n)
    expected = z * c / (q * 400)
    assert d.std(axis=0).mean() == pytest.approx(expected, rel=0.15)


def test_task_config_round_trips_and_csv_patient_ids(tmp_path: Path) -> None:
    cfg = TrainConfig.from_dict(
        {
            "epochs": 1,
            "batch_size": 8,
            "learning_rate": 0.5,
            "dp": {"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 0.1, "steps": 3},
        }
    )
    assert cfg.dp == DPSGDConfig(1.0, 1.0, 0.1, 3)
    assert TrainConfig(**{"dp": cfg.dp.to_dict()}).dp == cfg.dp  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampling_rate"):
        DPSGDConfig(1.0, 1.0, 0.0, 3)
    path = tmp_path / "site.csv"
    path.write_text("patient,a,b,label\nx,1.0,2.0,1\ny,0.5,0.1,0\nx,3.0,1.0,1\n")
    ds = load_csv(path, patient_id_column="patient")
    assert ds.feature_names == ("a", "b")
    assert ds.patient_ids is not None
    assert ds.patient_ids.tolist() == ["x", "y", "x"]
    assert ds.subset(np.array([2, 1])).patient_ids.tolist() == ["x", "y"]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="no column"):
        load_csv(path, patient_id_column="nope")
