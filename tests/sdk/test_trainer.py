"""NumpyTrainer: exact gradients (finite differences), per-sample gradients, learning."""

from __future__ import annotations

import numpy as np
import pytest

from confide import ManifestError, NumpyTrainer, TrainConfig, Trainer, clip_rows
from tests.support import Arrays


def _data(
    n: int = 64, d: int = 5, classes: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, classes))
    y = (x @ w).argmax(axis=1).astype(np.int64)
    return x, y


MODELS = [
    ("logistic", 2, ()),
    ("softmax", 3, ()),
    ("mlp", 3, (6,)),
]


@pytest.mark.parametrize(("kind", "classes", "hidden"), MODELS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gradient_matches_finite_differences(
    kind: str, classes: int, hidden: tuple[int, ...], activation: str
) -> None:
    x, y = _data(classes=classes)
    t = NumpyTrainer.create(kind, 5, classes, hidden, activation, seed=1)
    base = t.get_weights().astype(np.float64)
    _, grad = t.loss_and_gradient(x, y)
    rng = np.random.default_rng(2)
    eps = 1e-3
    for i in rng.choice(base.size, size=min(8, base.size), replace=False):
        for sign, store in ((1, "plus"), (-1, "minus")):
            w = base.copy()
            w[i] += sign * eps
            t.set_weights(w.astype(np.float32))
            if store == "plus":
                lp = t.loss_and_gradient(x, y)[0]
            else:
                lm = t.loss_and_gradient(x, y)[0]
        assert grad[i] == pytest.approx((lp - lm) / (2 * eps), abs=2e-3)


@pytest.mark.parametrize(("kind", "classes", "hidden"), MODELS)
def test_per_sample_gradients_are_exact(kind: str, classes: int, hidden: tuple[int, ...]) -> None:
    x, y = _data(n=9, classes=classes)
    t = NumpyTrainer.create(kind, 5, classes, hidden, seed=3)
    per = t.per_sample_gradients(x, y)
    assert per.shape == (9, t.manifest.size)
    assert per.dtype == np.float32
    assert per.flags.c_contiguous
    np.testing.assert_allclose(per.mean(axis=0), t.loss_and_gradient(x, y)[1], atol=1e-6)
    for i in (0, 4, 8):
        np.testing.assert_allclose(
            per[i], t.loss_and_gradient(x[i : i + 1], y[i : i + 1])[1], atol=1e-6
        )
    norms = clip_rows(per, 0.5)  # ready for DP-SGD clipping in the Rust core
    assert norms.shape == (9,)
    assert np.linalg.norm(per, axis=1).max() <= 0.5 + 1e-6


@pytest.mark.parametrize(("kind", "classes", "hidden"), MODELS)
def test_fit_learns_and_is_reproducible(kind: str, classes: int, hidden: tuple[int, ...]) -> None:
    x, y = _data(n=200, classes=classes)
    cfg = TrainConfig(epochs=30, batch_size=16, learning_rate=0.2)
    results = []
    for _ in range(2):
        t = NumpyTrainer.create(kind, 5, classes, hidden, seed=4)
        before = t.evaluate(Arrays(x, y))["accuracy"]
        fit = t.fit(Arrays(x, y), cfg, seed=9)
        results.append(t.get_weights())
        assert fit.num_examples == 200
        assert fit.num_steps == 30 * 13
        assert t.evaluate(Arrays(x, y))["accuracy"] > max(before, 0.85)
    np.testing.assert_array_equal(results[0], results[1])


def test_trainer_protocol_and_manifest_round_trip() -> None:
    t = NumpyTrainer.create("mlp", 5, 3, (4, 4), seed=0)
    assert isinstance(t, Trainer)
    names = t.manifest.names
    assert names == [f"layer{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    t2 = NumpyTrainer.from_manifest(t.manifest, t.get_weights())
    x, _ = _data(classes=3)
    np.testing.assert_array_equal(t.predict_proba(x), t2.predict_proba(x))
    np.testing.assert_allclose(t.predict_proba(x).sum(axis=1), 1.0, rtol=1e-5)


def test_bad_input_is_rejected() -> None:
    t = NumpyTrainer.create("logistic", 5, 2)
    x, y = _data()
    with pytest.raises(ValueError, match="shape"):
        t.fit(Arrays(x[:, :3], y), TrainConfig(), seed=0)
    with pytest.raises(ValueError, match="labels"):
        t.evaluate(Arrays(x, y + 5))
    with pytest.raises(TypeError, match="integer"):
        t.evaluate(Arrays(x, y.astype(np.float32)))
    with pytest.raises(ValueError, match="NaN"):
        t.evaluate(Arrays(np.full_like(x, np.nan), y))
    with pytest.raises(ManifestError, match="NaN"):
        t.set_weights(np.full(t.manifest.size, np.nan, np.float32))
    with pytest.raises(ManifestError, match="parameters"):
        t.set_weights(np.zeros(3, np.float32))
    with pytest.raises(ManifestError, match="binary"):
        NumpyTrainer.build_manifest("logistic", 5, 3)
    with pytest.raises(ManifestError, match="hidden"):
        NumpyTrainer.build_manifest("mlp", 5, 3)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=-1.0)
