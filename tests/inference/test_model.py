"""confide.inference.load_model: ONNX Runtime and LiteRT behind one validated interface."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.errors import (
    ArrayTypeError,
    ConfideError,
    ConfigError,
    IntegrityError,
    NonFiniteError,
    ShapeError,
)
from confide.inference import (
    EngineUnavailableError,
    ModelFormatError,
    available_engines,
    load_model,
)
from confide.protocol.manifest import sha256_hex
from tests.inference.builders import fixture_models, numpy_forward

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return fixture_models(FIXTURES / "weights.npz")


def _rng_inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def _engines() -> list[Any]:
    return [
        pytest.param(
            "onnx",
            marks=pytest.mark.skipif(
                "onnx" not in available_engines(), reason="onnxruntime not installed"
            ),
        ),
        pytest.param(
            "litert",
            marks=pytest.mark.skipif(
                "litert" not in available_engines(), reason="ai-edge-litert not installed"
            ),
        ),
    ]


def _path(name: str, engine: str) -> Path:
    return FIXTURES / f"{name}.{'onnx' if engine == 'onnx' else 'tflite'}"


@pytest.mark.parametrize("engine", _engines())
def test_dense_head_matches_numpy_reference(engine: str, models: Any) -> None:
    head, _ = models
    x = _rng_inputs((7, 6))
    model = load_model(_path("dense_head", engine), engine)
    assert model.engine == engine
    assert model.input.shape == (None, 6)
    probs = model.predict(x)
    assert probs.dtype == np.float32
    assert probs.shape == (7, 3)
    np.testing.assert_allclose(probs, numpy_forward(head, x)["probabilities"], atol=1e-6)


@pytest.mark.parametrize("engine", _engines())
def test_cnn_both_outputs_match_numpy_reference(engine: str, models: Any) -> None:
    _, cnn = models
    x = _rng_inputs((3, 3, 64, 64), seed=1)
    model = load_model(_path("tiny_cnn64", engine), engine)
    assert model.output == "probabilities"
    assert set(model.output_names) == {"probabilities", "features"}
    out = model.run(x)
    ref = numpy_forward(cnn, x)
    np.testing.assert_allclose(out["probabilities"], ref["probabilities"], atol=1e-6)
    np.testing.assert_allclose(out["features"], ref["features"], atol=1e-5)


def test_onnx_and_litert_agree_to_1e5() -> None:
    pytest.importorskip("onnxruntime")
    if "litert" not in available_engines():
        pytest.skip("ai-edge-litert not installed")
    for name, shape in (
        ("dense_head", (16, 6)),
        ("tiny_cnn64", (4, 3, 64, 64)),
        ("tiny_cnn224", (2, 3, 224, 224)),
    ):
        a = load_model(_path(name, "onnx"), "onnx")
        b = load_model(_path(name, "litert"), "litert")
        for batch in (1, shape[0]):  # LiteRT resizes its input for a new batch size
            x = _rng_inputs((batch, *shape[1:]), seed=batch)
            ra, rb = a.run(x), b.run(x)
            for key in ra:
                np.testing.assert_allclose(ra[key], rb[key], atol=1e-5, rtol=0)


def test_onnx_export_equals_numpy_trainer_forward() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from confide.training.numpy_engine import NumpyTrainer
    from tests.inference.builders import DenseHead, dense_to_onnx

    for kind, hidden, act in (
        ("logistic", (), "tanh"),
        ("softmax", (), "tanh"),
        ("mlp", (8,), "tanh"),
        ("mlp", (8, 4), "relu"),
    ):
        n_classes = 2 if kind == "logistic" else 3
        trainer = NumpyTrainer.create(kind, 5, n_classes, hidden, act, seed=3)
        head = DenseHead.from_vector(trainer.manifest, trainer.get_weights())
        model = load_model(dense_to_onnx(head))
        x = _rng_inputs((9, 5), seed=4)
        np.testing.assert_allclose(model.predict(x), trainer.predict_proba(x), atol=1e-6)


@pytest.mark.parametrize("engine", _engines())
def test_input_validation_raises_typed_errors(engine: str) -> None:
    model = load_model(_path("dense_head", engine), engine)
    with pytest.raises(ArrayTypeError, match="numpy array"):
        model.predict([[0.0] * 6])  # type: ignore[arg-type]
    with pytest.raises(ArrayTypeError, match="floating dtype"):
        model.predict(np.zeros((1, 6), np.int64))
    with pytest.raises(ShapeError, match=r"shape \(N, 6\), got \(1, 5\)"):
        model.predict(np.zeros((1, 5), np.float32))
    with pytest.raises(ShapeError, match="got \\(6,\\)"):
        model.predict(np.zeros(6, np.float32))
    with pytest.raises(ShapeError, match="empty"):
        model.predict(np.zeros((0, 6), np.float32))
    bad = np.zeros((2, 6), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        model.predict(bad)
    with pytest.raises(NonFiniteError):
        model.predict(np.full((1, 6), 1e300))  # finite float64, inf as float32
    with pytest.raises(ConfigError, match="no output"):
        model.run(np.zeros((1, 6), np.float32), ["logits"])
    # float64 is accepted and converted
    assert model.predict(np.zeros((1, 6))).dtype == np.float32


def test_errors_are_confide_errors_with_builtin_bases() -> None:
    assert issubclass(EngineUnavailableError, ConfideError)
    assert issubclass(EngineUnavailableError, ImportError)
    assert issubclass(ModelFormatError, ValueError)


@pytest.mark.parametrize("engine", _engines())
def test_bad_model_bytes(engine: str, tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="empty"):
        load_model(b"", engine)
    with pytest.raises(ModelFormatError, match="cannot load"):
        load_model(b"\x00garbage" * 10, engine)
    with pytest.raises(ModelFormatError, match="cannot read"):
        load_model(tmp_path / "missing.onnx", engine)
    # the other engine's format is refused as a format error, not a crash
    other = _path("dense_head", "litert" if engine == "onnx" else "onnx")
    with pytest.raises(ModelFormatError):
        load_model(other, engine)


def test_expected_sha256_is_checked_on_the_loaded_bytes() -> None:
    pytest.importorskip("onnxruntime")
    data = _path("dense_head", "onnx").read_bytes()
    model = load_model(data, expected_sha256=sha256_hex(data).upper())
    assert model.sha256 == sha256_hex(data)
    with pytest.raises(IntegrityError, match="SHA-256"):
        load_model(data, expected_sha256="0" * 64)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="engine must be one of"):
        load_model(b"x", "tensorrt")
    with pytest.raises(ConfigError, match="num_threads"):
        load_model(b"x", num_threads=0)
    with pytest.raises(ConfigError, match="path or bytes"):
        load_model(123)  # type: ignore[arg-type]


def _block_imports(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make ``import name`` (and importlib.import_module) raise ImportError."""
    for loaded in list(sys.modules):
        if loaded.split(".")[0] in {n.split(".")[0] for n in names}:
            monkeypatch.delitem(sys.modules, loaded)
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_engines_name_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _block_imports(
        monkeypatch,
        "onnxruntime",
        "ai_edge_litert",
        "ai_edge_litert.interpreter",
        "tflite_runtime",
        "tflite_runtime.interpreter",
    )
    assert available_engines() == []
    data = (FIXTURES / "dense_head.onnx").read_bytes()
    with pytest.raises(EngineUnavailableError, match=r"pip install 'confide\[onnx\]'"):
        load_model(data, "onnx")
    with pytest.raises(EngineUnavailableError, match=r"pip install 'confide\[litert\]'"):
        load_model(data, "litert")


def test_litert_falls_back_to_tflite_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    calls: list[str] = []

    class Interpreter(litert.Interpreter):  # type: ignore[misc, name-defined]
        def __init__(self, **kwargs: Any) -> None:
            calls.append("tflite_runtime")
            super().__init__(**kwargs)

    fake_pkg = types.ModuleType("tflite_runtime")
    fake_mod = types.ModuleType("tflite_runtime.interpreter")
    fake_mod.Interpreter = Interpreter  # type: ignore[attr-defined]
    _block_imports(monkeypatch, "ai_edge_litert", "ai_edge_litert.interpreter")
    monkeypatch.setitem(sys.modules, "tflite_runtime", fake_pkg)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fake_mod)
    assert "litert" in available_engines()
    model = load_model(FIXTURES / "dense_head.tflite", "litert")
    assert calls == ["tflite_runtime"]
    assert model.predict(np.zeros((2, 6), np.float32)).shape == (2, 3)


def test_repr_names_engine_and_signature() -> None:
    pytest.importorskip("onnxruntime")
    model = load_model(FIXTURES / "tiny_cnn64.onnx")
    assert "image(N, 3, 64, 64)" in repr(model)
    assert "onnx" in repr(model)


def test_confide_export_of_numpy_heads_runs_on_both_paths(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from confide.export import export_onnx
    from confide.training.numpy_engine import NumpyTrainer

    trainer = NumpyTrainer.create("mlp", 6, 3, (5,), "relu", seed=1)
    path = export_onnx(trainer, tmp_path / "head.onnx")
    model = load_model(path)
    assert model.metadata["confide.manifest_sha256"] == trainer.manifest.sha256
    x = _rng_inputs((5, 6), seed=9)
    np.testing.assert_allclose(model.predict(x), trainer.predict_proba(x), atol=1e-6)


def test_committed_fixtures_are_what_the_writers_produce(models: Any) -> None:
    # The .tflite files are written by tests/inference/builders.py (no converter exists in
    # the test environment); regenerating them from weights.npz gives the same bytes.
    pytest.importorskip("onnx")
    pytest.importorskip("ai_edge_litert")
    from tests.inference.builders import cnn_to_onnx, cnn_to_tflite, dense_to_onnx, dense_to_tflite

    head, cnn = models
    assert dense_to_onnx(head) == (FIXTURES / "dense_head.onnx").read_bytes()
    assert dense_to_tflite(head) == (FIXTURES / "dense_head.tflite").read_bytes()
    assert cnn_to_onnx(cnn) == (FIXTURES / "tiny_cnn64.onnx").read_bytes()
    assert cnn_to_tflite(cnn) == (FIXTURES / "tiny_cnn64.tflite").read_bytes()


def test_the_finiteness_scan_can_be_turned_off() -> None:
    pytest.importorskip("onnxruntime")
    model = load_model(FIXTURES / "dense_head.onnx", check_finite=False)
    x = np.zeros((1, 6), np.float32)
    x[0, 0] = np.nan
    assert np.isnan(model.predict(x)).all()  # the engine propagates NaN; nothing raised
    with pytest.raises(ShapeError):  # shape and dtype are still checked
        model.predict(np.zeros((1, 5), np.float32))
