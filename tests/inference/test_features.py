"""On-device learning on a frozen backbone: cached features and a DP-SGD-trained head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.errors import ConfigError, ShapeError
from confide.inference import FeatureCache, FeatureExtractor, device_dataset, load_model, train_head
from confide.noise import SecureRng
from confide.training.base import DPSGDConfig, TrainConfig
from confide.training.numpy_engine import NumpyTrainer

FIXTURES = Path(__file__).parent / "fixtures"

pytest.importorskip("onnxruntime")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, size=(n, 3, 64, 64)).astype(np.float32)


def test_features_are_the_backbone_output_and_cached(tmp_path: Path) -> None:
    model = load_model(FIXTURES / "tiny_cnn64.onnx")
    cache = FeatureCache(tmp_path / "features")
    extractor = FeatureExtractor(model, batch_size=3, cache=cache)
    images = _images(5)
    first = extractor(images)
    assert first.shape == (5, 8)
    assert extractor.dim == 8
    np.testing.assert_allclose(first, model.run(images)["features"], atol=1e-6)
    assert (cache.hits, cache.misses) == (0, 5)
    again = extractor(images[[4, 0]])
    np.testing.assert_array_equal(again, first[[4, 0]])
    assert cache.hits == 2
    # A fresh process (new in-memory cache) finds the features on disk, without pickle.
    cold = FeatureCache(tmp_path / "features")
    np.testing.assert_array_equal(FeatureExtractor(model, cache=cold)(images[:1]), first[:1])
    assert cold.hits == 1
    assert (tmp_path / "features").stat().st_mode & 0o077 == 0


def test_a_corrupt_cache_file_is_recomputed(tmp_path: Path) -> None:
    model = load_model(FIXTURES / "tiny_cnn64.onnx")
    cache = FeatureCache(tmp_path)
    img = _images(1)
    key = cache.key(model.sha256, img[0])
    (tmp_path / f"{key}.npy").write_bytes(b"garbage")
    out = FeatureExtractor(model, cache=FeatureCache(tmp_path))(img)
    np.testing.assert_allclose(out, model.run(img)["features"], atol=1e-6)


def test_extractor_config_errors() -> None:
    model = load_model(FIXTURES / "tiny_cnn64.onnx")
    with pytest.raises(ConfigError, match="no output"):
        FeatureExtractor(model, output="logits")
    with pytest.raises(ConfigError, match="batch_size"):
        FeatureExtractor(model, batch_size=0)
    with pytest.raises(ShapeError):
        FeatureExtractor(model)(np.zeros((0, 3, 64, 64), np.float32))


def test_dp_sgd_head_on_device_features_changes_the_model_and_is_accounted() -> None:
    model = load_model(FIXTURES / "tiny_cnn64.onnx")
    images = _images(12, seed=5)
    feats = FeatureExtractor(model)(images)
    labels = (feats[:, 0] > np.median(feats[:, 0])).astype(np.int64)
    data = device_dataset(feats, labels)
    assert set(data.patient_ids.tolist()) == {"device-owner"}
    head = NumpyTrainer.create("softmax", n_features=feats.shape[1], n_classes=2, seed=0)
    before = head.get_weights()
    dp = DPSGDConfig(noise_multiplier=1.1, clip_norm=1.0, sampling_rate=0.5, steps=4)
    result = train_head(
        head, data, TrainConfig(learning_rate=0.5, dp=dp), rng=SecureRng(bytes(range(32)))
    )
    assert result.num_steps == 4
    assert np.isnan(result.loss)
    assert not np.array_equal(head.get_weights(), before)
    # Patient-level DP per device owner: the run is accounted as `steps` compositions of the
    # Poisson-subsampled Gaussian over ONE patient (the owner), whatever the image count.
    pytest.importorskip("dp_accounting")
    from confide.privacy.accountant import PrivacyAccountant, dpsgd_event

    acc = PrivacyAccountant(1e-5)
    acc.record_round(0, [dpsgd_event(dp.sampling_rate, dp.noise_multiplier, dp.steps)])
    assert 0.0 < acc.epsilon() < float("inf")


def test_same_seed_same_dp_head() -> None:
    feats = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    data = device_dataset(feats, np.array([0, 1, 0, 1, 1, 0]))
    dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=1.0, steps=2)
    outs = []
    for _ in range(2):
        head = NumpyTrainer.create("softmax", 4, 2, seed=0)
        train_head(head, data, TrainConfig(learning_rate=0.1, dp=dp), rng=SecureRng(bytes(32)))
        outs.append(head.get_weights())
    np.testing.assert_array_equal(outs[0], outs[1])
