"""TorchTrainer: flat vector, determinism, SGD, evaluation, per-sample gradients."""

from __future__ import annotations

import doctest
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from confide.data.images import ArrayDataset  # noqa: E402
from confide.errors import (  # noqa: E402
    ArrayTypeError,
    ConfideError,
    ConfigError,
    DataError,
    ManifestError,
    NonFiniteError,
    PrivacyUnsupportedError,
    ShapeError,
)
from confide.protocol.manifest import Manifest  # noqa: E402
from confide.training import torch_engine  # noqa: E402
from confide.training.base import (  # noqa: E402
    DPSGDConfig,
    PerSampleTrainer,
    SiteData,
    TrainConfig,
    Trainer,
)
from confide.training.torch_engine import TorchTrainer, default_per_sample_chunk  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def toy_data(n: int = 48, side: int = 8, seed: int = 0, channels: int = 1) -> ArrayDataset:
    """A learnable task: class 1 images are brighter in the top-left quadrant."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(0, 0.3, size=(n, channels, side, side)).astype(np.float32)
    x[y == 1, :, : side // 2, : side // 2] += 1.0
    return ArrayDataset(x, y, np.array([f"p{i // 2}" for i in range(n)]))


def small(seed: int = 0, **kw: Any) -> TorchTrainer:
    return TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=seed, **kw)


def test_implements_the_protocols() -> None:
    t = small()
    assert isinstance(t, Trainer)
    assert isinstance(t, PerSampleTrainer)
    assert isinstance(toy_data(), SiteData)


def test_manifest_follows_named_parameters() -> None:
    t = TorchTrainer.create("squeezenet1_1", 2, (3, 32, 32))
    names = [n for n, _ in t.module.named_parameters()]
    assert t.manifest.names == names
    assert [s.shape for s in t.manifest.tensors] == [
        tuple(p.shape) for _, p in t.module.named_parameters()
    ]
    assert t.manifest.size == 723_522
    assert dict(t.manifest.spec) == {
        "engine": "torch",
        "arch": "squeezenet1_1",
        "num_classes": 2,
        "input_shape": [3, 32, 32],
    }
    # The manifest survives its JSON form (what the server sends).
    assert Manifest.from_json(t.manifest.to_json()) == t.manifest


def test_weights_round_trip_bit_exact() -> None:
    t = small()
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(t.manifest.size).astype(np.float32)
    vec[:3] = [np.float32(1e-45), -0.0, np.float32(3.4e38)]  # subnormal, signed zero, huge
    t.set_weights(vec)
    out = t.get_weights()
    assert out.dtype == np.float32
    assert np.array_equal(out.view(np.int32), vec.view(np.int32))
    out[0] = 7.0  # a copy, not a view
    assert t.get_weights()[0] != 7.0
    vec.setflags(write=False)  # read-only input is fine (copied)
    t.set_weights(vec)


def test_parameters_are_views_of_the_flat_vector() -> None:
    t = small()
    first = next(iter(t.module.parameters()))
    with torch.no_grad():
        first.view(-1)[0] = 42.0
    assert t.get_weights()[0] == 42.0
    assert t.flat_parameters.data_ptr() == first.data_ptr()


@pytest.mark.parametrize(
    ("vec", "match"),
    [
        (np.zeros(5, np.float32), "expected 1282 parameters"),
        (np.zeros(1282, np.float64), "float32"),
        (np.full(1282, np.nan, np.float32), "NaN"),
        ([0.0] * 1282, "float32"),
    ],
)
def test_set_weights_rejects_bad_vectors(vec: Any, match: str) -> None:
    t = small()
    before = t.get_weights()
    with pytest.raises(ManifestError, match=match):
        t.set_weights(vec)
    assert np.array_equal(t.get_weights(), before)


def test_from_manifest_rebuilds_the_same_model() -> None:
    a = small(seed=3)
    b = TorchTrainer.from_manifest(a.manifest, a.get_weights())
    assert b.manifest == a.manifest
    assert np.array_equal(b.get_weights(), a.get_weights())
    x = toy_data(4).x
    assert torch.equal(a.predict_proba(x), b.predict_proba(x))


def test_from_manifest_errors() -> None:
    good = small().manifest
    wrong = Manifest.from_shapes([("w", (2,))], dict(good.spec))
    with pytest.raises(ManifestError, match="does not match the manifest"):
        TorchTrainer.from_manifest(wrong)
    custom = TorchTrainer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (1, 2, 2), 2)
    with pytest.raises(ManifestError, match="unknown architecture 'custom'"):
        TorchTrainer.from_manifest(custom.manifest)
    numpy_manifest = Manifest.from_shapes([("w", (2,))], {"engine": "numpy"})
    with pytest.raises(ManifestError, match="not a torch model spec"):
        TorchTrainer.from_manifest(numpy_manifest)


def test_constructor_validation() -> None:
    m = nn.Linear(4, 2)
    with pytest.raises(ConfigError, match="num_classes"):
        TorchTrainer(m, (4,), 1)
    with pytest.raises(ConfigError, match="input_shape"):
        TorchTrainer(m, (), 2)
    with pytest.raises(ConfigError, match="per_sample_chunk"):
        TorchTrainer(m, (4,), 2, per_sample_chunk=0)
    with pytest.raises(ConfigError, match="momentum"):
        TorchTrainer(m, (4,), 2, momentum=1.0)
    with pytest.raises(ConfigError, match="device"):
        TorchTrainer(m, (4,), 2, device="tpu")
    with pytest.raises(ManifestError, match="float32"):
        TorchTrainer(nn.Linear(4, 2).double(), (4,), 2)
    with pytest.raises(ConfigError, match=r"nn\.Module"):
        TorchTrainer("model", (4,), 2)  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            TorchTrainer(m, (4,), 2, device="cuda")


def test_default_chunk_scales_with_input() -> None:
    assert default_per_sample_chunk((3, 224, 224)) == 8
    assert default_per_sample_chunk((3, 448, 448)) == 2
    assert default_per_sample_chunk((3, 64, 64)) == 64
    assert TorchTrainer.create("squeezenet1_1", 2, (3, 224, 224)).per_sample_chunk == 8


def test_create_is_deterministic() -> None:
    assert np.array_equal(small(seed=5).get_weights(), small(seed=5).get_weights())
    assert not np.array_equal(small(seed=5).get_weights(), small(seed=6).get_weights())
    state = torch.random.get_rng_state()
    small(seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched


def test_fit_learns_and_is_deterministic() -> None:
    data = toy_data()
    cfg = TrainConfig(epochs=15, batch_size=8, learning_rate=0.2)
    a, b, c = small(seed=1, momentum=0.9), small(seed=1, momentum=0.9), small(seed=1, momentum=0.9)
    before = a.evaluate(data)
    ra = a.fit(data, cfg, seed=11)
    rb = b.fit(data, cfg, seed=11)
    c.fit(data, cfg, seed=12)
    assert ra.num_examples == 48
    assert ra.num_steps == 15 * 6
    assert ra.loss == rb.loss
    assert np.array_equal(a.get_weights(), b.get_weights())
    assert not np.array_equal(a.get_weights(), c.get_weights())
    after = a.evaluate(data)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.9
    assert after["num_examples"] == 48.0


def test_fit_with_dropout_is_deterministic() -> None:
    data = toy_data(n=8, side=32, channels=3)
    cfg = TrainConfig(epochs=1, batch_size=4, learning_rate=0.01)
    ws = []
    for _ in range(2):
        t = TorchTrainer.create("squeezenet1_1", 2, (3, 32, 32), seed=0)
        t.fit(data, cfg, seed=4)
        ws.append(t.get_weights())
    assert np.array_equal(ws[0], ws[1])


def test_fit_refuses_dp_configs() -> None:
    dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.1, steps=1)
    with pytest.raises(ConfigError, match="run_dpsgd"):
        small().fit(toy_data(), TrainConfig(dp=dp), seed=0)


class BadData:
    """SiteData whose batches break the contract in a chosen way."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.labels = np.array([0, 1, 0, 1], dtype=np.int64)
        self.patient_ids = None

    def __len__(self) -> int:
        return 4

    def batch(self, index: np.ndarray) -> tuple[Any, Any]:
        x = np.zeros((len(index), 1, 8, 8), np.float32)
        y = self.labels[index]
        if self.kind == "nan":
            x[0, 0, 0, 0] = np.nan
        elif self.kind == "float64":
            x = x.astype(np.float64)
        elif self.kind == "shape":
            x = np.zeros((len(index), 1, 7, 8), np.float32)
        elif self.kind == "labels":
            y = y + 5
        elif self.kind == "float_labels":
            y = y.astype(np.float32)
        return x, y


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        ("nan", NonFiniteError, "NaN"),
        ("float64", ArrayTypeError, "float32"),
        ("shape", ShapeError, r"\(n, 1, 8, 8\)"),
        ("labels", DataError, r"\[0, 2\)"),
        ("float_labels", ArrayTypeError, "integer labels"),
    ],
)
def test_bad_batches_are_typed_errors(kind: str, error: type[Exception], match: str) -> None:
    t = small()
    for call in (
        lambda: t.fit(BadData(kind), TrainConfig(batch_size=2), seed=0),
        lambda: t.evaluate(BadData(kind)),
        lambda: t.per_sample_gradients(*BadData(kind).batch(np.arange(2))),
    ):
        with pytest.raises(error, match=match) as info:
            call()
        assert isinstance(info.value, ConfideError)


def test_bad_data_objects() -> None:
    t = small()
    with pytest.raises(ConfigError, match="SiteData"):
        t.fit((np.zeros(3), np.zeros(3)), TrainConfig(), seed=0)  # type: ignore[arg-type]
    empty = ArrayDataset(np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))
    with pytest.raises(DataError, match="no records"):
        t.evaluate(empty)
    with pytest.raises(ConfigError, match="seed"):
        t.fit(toy_data(), TrainConfig(), seed="1")  # type: ignore[arg-type]
    with pytest.raises(ArrayTypeError, match="numpy array or torch tensor"):
        t.per_sample_gradients([[0.0]], np.array([0]))  # type: ignore[arg-type]


def per_example_loop(t: TorchTrainer, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack(
        [t.loss_and_gradient(x[i : i + 1], y[i : i + 1])[1].cpu().numpy() for i in range(len(y))]
    )


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_per_sample_gradients_equal_a_per_example_loop(chunk: int) -> None:
    t = small(seed=2, per_sample_chunk=chunk)
    data = toy_data(n=7)
    x, y = data.batch(np.arange(7))
    g = t.per_sample_gradients(x, y)
    assert g.dtype == torch.float32
    assert g.device.type == "cpu"
    assert g.is_contiguous()
    assert tuple(g.shape) == (7, t.manifest.size)
    np.testing.assert_allclose(g.numpy(), per_example_loop(t, x, y), rtol=1e-4, atol=1e-6)


def test_squeezenet_per_sample_gradients_equal_a_loop() -> None:
    # dropout=0 so the per-example loop sees the same network as the vmapped call.
    t = TorchTrainer.create(
        "squeezenet1_1", 2, (3, 32, 32), seed=0, options={"dropout": 0.0}, per_sample_chunk=2
    )
    data = toy_data(n=3, side=32, channels=3)
    x, y = data.batch(np.arange(3))
    g = t.per_sample_gradients(x, y)
    np.testing.assert_allclose(g.numpy(), per_example_loop(t, x, y), rtol=1e-3, atol=1e-6)


def test_per_sample_mean_is_the_batch_gradient() -> None:
    t = small(seed=4)
    x, y = toy_data(n=10).batch(np.arange(10))
    loss, full = t.loss_and_gradient(x, y)
    assert loss > 0
    g = t.per_sample_gradients(x, y)
    np.testing.assert_allclose(g.mean(dim=0).numpy(), full.numpy(), rtol=1e-4, atol=1e-6)


def test_per_sample_gradients_with_dropout_run_under_vmap() -> None:
    t = TorchTrainer.create("squeezenet1_1", 2, (3, 32, 32), seed=0, per_sample_chunk=2)
    x, y = toy_data(n=3, side=32, channels=3).batch(np.arange(3))
    g = t.per_sample_gradients(x, y)
    assert bool(torch.isfinite(g).all())
    assert t.per_sample_gradients(x[:0], y[:0]).shape == (0, t.manifest.size)


def test_per_sample_gradients_are_a_zero_copy_numpy_view() -> None:
    from confide.privacy.torch_clip import as_numpy

    t = small()
    x, y = toy_data(n=4).batch(np.arange(4))
    g = t.per_sample_gradients(x, y)
    view = as_numpy(g)
    assert view.ctypes.data == g.data_ptr()
    assert view.flags.c_contiguous
    assert view.flags.writeable


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


def test_batchnorm_buffers_stay_local_and_dp_is_refused() -> None:
    t = TorchTrainer(BNNet(), (1, 8, 8), 2)
    assert not t.supports_per_sample
    assert not any("running" in n or "num_batches" in n for n in t.manifest.names)
    assert t.manifest.names == [
        "conv.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "head.weight",
        "head.bias",
    ]
    bn = t.module.bn
    t.fit(toy_data(n=8), TrainConfig(epochs=1, batch_size=4), seed=0)
    assert float(bn.running_mean.abs().sum()) > 0  # updated locally
    assert int(bn.num_batches_tracked) == 2
    x, y = toy_data(n=2).batch(np.arange(2))
    with pytest.raises(PrivacyUnsupportedError, match="GroupNorm"):
        t.per_sample_gradients(x, y)
    with pytest.raises(PrivacyUnsupportedError):
        t.check_per_sample()


def test_dpsgd_with_no_noise_and_huge_clip_is_the_plain_gradient_step() -> None:
    privacy = pytest.importorskip("confide.privacy")
    run_dpsgd = getattr(privacy, "run_dpsgd", None)
    if run_dpsgd is None:
        pytest.skip("confide.privacy.run_dpsgd is not available yet")
    from confide.noise import SecureRng

    t = small(seed=8)
    n = 12
    data = ArrayDataset(toy_data(n=n).x, toy_data(n=n).labels)  # one record per patient
    w0 = t.get_weights()
    _, grad = t.loss_and_gradient(*data.batch(np.arange(n)))
    dp = DPSGDConfig(noise_multiplier=0.0, clip_norm=1e9, sampling_rate=1.0, steps=1)
    run_dpsgd(t, data, TrainConfig(learning_rate=0.5, dp=dp), rng=SecureRng(bytes(32)))
    np.testing.assert_allclose(t.get_weights(), w0 - 0.5 * grad.numpy(), rtol=1e-5, atol=1e-6)


def test_dpsgd_clips_each_patient_sum_across_chunks() -> None:
    # sigma = 0 and q = 1: the update is exactly lr * sum_p clip(sum_{i in p} g_i, C) / P.
    # per_sample_chunk=2 makes patients with 3 and 4 records span several chunks.
    from confide.noise import SecureRng
    from confide.privacy import run_dpsgd

    n = 12
    base = toy_data(n=n)
    ids = np.array(["a", "a", "a", "b", "c", "c", "c", "c", "d", "e", "e", "f"])
    data = ArrayDataset(base.x, base.labels, ids)
    t = small(seed=9, per_sample_chunk=2)
    w0 = t.get_weights()
    g = t.per_sample_gradients(*data.batch(np.arange(n))).numpy().astype(np.float64)
    clip = 0.05
    expect = np.zeros(t.manifest.size)
    for pid in np.unique(ids):
        s = g[ids == pid].sum(axis=0)
        norm = np.linalg.norm(s)
        assert norm > clip  # every patient is clipped, so the test can fail
        expect += s * min(1.0, clip / norm)
    expect /= len(np.unique(ids))
    dp = DPSGDConfig(noise_multiplier=0.0, clip_norm=clip, sampling_rate=1.0, steps=1)
    run_dpsgd(t, data, TrainConfig(learning_rate=1.0, dp=dp), rng=SecureRng(bytes(32)))
    np.testing.assert_allclose(t.get_weights(), w0 - expect, rtol=1e-4, atol=1e-7)


def test_doctests() -> None:
    result = doctest.testmod(torch_engine, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@cuda
def test_cuda_round_trip_and_gradients_match_cpu() -> None:
    cpu = small(seed=3)
    gpu = TorchTrainer.from_manifest(cpu.manifest, cpu.get_weights(), device="cuda")
    assert gpu.device.type == "cuda"
    assert gpu.flat_parameters.device.type == "cuda"
    assert np.array_equal(gpu.get_weights(), cpu.get_weights())
    x, y = toy_data(n=6).batch(np.arange(6))
    g_cpu = cpu.per_sample_gradients(x, y)
    g_gpu = gpu.per_sample_gradients(x, y)
    assert g_gpu.device.type == "cuda"
    assert g_gpu.is_contiguous()
    np.testing.assert_allclose(g_gpu.cpu().numpy(), g_cpu.numpy(), rtol=1e-3, atol=1e-5)
    data = toy_data()
    cfg = TrainConfig(epochs=3, batch_size=8, learning_rate=0.2)
    gpu.fit(data, cfg, seed=0)
    assert gpu.evaluate(data)["num_examples"] == 48.0


@cuda
def test_cuda_squeezenet_224_per_sample_chunked() -> None:
    t = TorchTrainer.create("squeezenet1_1", 2, (3, 224, 224), seed=0, device="cuda")
    x = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    g = t.per_sample_gradients(x, np.zeros(16, np.int64))
    assert tuple(g.shape) == (16, 723_522)
    assert bool(torch.isfinite(g).all())
