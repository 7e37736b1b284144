"""ONNX export of numpy and torch models, checked against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from confide.errors import ConfideError, ConfigError  # noqa: E402
from confide.export import ExportError, export_onnx, verify_onnx  # noqa: E402
from confide.training.numpy_engine import NumpyTrainer  # noqa: E402

NUMPY_MODELS = [
    ("logistic", 2, (), "tanh"),
    ("softmax", 4, (), "tanh"),
    ("mlp", 3, (8, 5), "tanh"),
    ("mlp", 2, (6,), "relu"),
]


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize(("kind", "classes", "hidden", "act"), NUMPY_MODELS)
def test_numpy_models_export_without_torch(
    tmp_path: Path, kind: str, classes: int, hidden: tuple[int, ...], act: str
) -> None:
    t = NumpyTrainer.create(
        kind, n_features=5, n_classes=classes, hidden=hidden, activation=act, seed=3
    )
    path = export_onnx(t, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    assert verify_onnx(t, path, n=32) <= 1e-5
    meta = metadata(path)
    assert meta["confide.manifest_sha256"] == t.manifest.sha256
    assert meta["confide.engine"] == "numpy"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 17):  # dynamic batch axis
        x = np.random.default_rng(batch).standard_normal((batch, 5)).astype(np.float32)
        probs = sess.run(None, {"input": x})[0]
        assert probs.shape == (batch, classes)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(probs, t.predict_proba(x), atol=1e-5)


def test_verify_detects_a_stale_export(tmp_path: Path) -> None:
    t = NumpyTrainer.create("softmax", n_features=3, n_classes=3, seed=0)
    path = export_onnx(t, tmp_path / "m.onnx", metadata={"site": "a"})
    assert metadata(path)["site"] == "a"
    w = t.get_weights()
    w[0] += np.float32(1.0)  # one weight: a uniform shift would cancel in the softmax
    t.set_weights(w)
    with pytest.raises(ExportError, match="differs from the model"):
        verify_onnx(t, path)


def test_bad_arguments(tmp_path: Path) -> None:
    t = NumpyTrainer.create("logistic", n_features=2, n_classes=2)
    with pytest.raises(ConfigError, match="does not exist"):
        export_onnx(t, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ExportError, match=r"TorchTrainer, a NumpyTrainer or a torch\.nn\.Module"):
        export_onnx(object(), tmp_path / "m.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="cannot load"):
        verify_onnx(t, junk)
    with pytest.raises(ConfigError, match="n must be"):
        verify_onnx(t, junk, n=0)
    assert issubclass(ExportError, ConfideError)


# ----------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch_modules() -> object:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from confide.training.torch_engine import TorchTrainer

    return TorchTrainer


@pytest.mark.parametrize(
    ("arch", "shape"), [("small_cnn", (1, 8, 8)), ("squeezenet1_1", (3, 64, 64))]
)
def test_torch_trainer_export_matches_forward(
    tmp_path: Path, torch_modules: object, arch: str, shape: tuple[int, ...]
) -> None:
    trainer = torch_modules.create(arch, 3, shape, seed=0)  # type: ignore[attr-defined]
    trainer.module.train()
    path = export_onnx(trainer, tmp_path / f"{arch}.onnx")
    assert trainer.module.training  # the live module is left as it was
    assert verify_onnx(trainer, path, n=5) <= 1e-5
    meta = metadata(path)
    assert meta["confide.manifest_sha256"] == trainer.manifest.sha256
    assert meta["confide.input_shape"] == ",".join(map(str, shape))
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 6):
        x = np.zeros((batch, *shape), np.float32)
        assert sess.run(None, {"input": x})[0].shape == (batch, 3)


def test_bare_module_needs_an_input_shape(tmp_path: Path, torch_modules: object) -> None:
    import torch

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
    with pytest.raises(ConfigError, match="input_shape is required"):
        export_onnx(module, tmp_path / "m.onnx")
    path = export_onnx(module, tmp_path / "m.onnx", input_shape=(2, 3))
    assert verify_onnx(module, path, input_shape=(2, 3)) <= 1e-5
