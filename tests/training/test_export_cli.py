"""``confide export --format onnx``: a real subprocess writes ONNX that onnxruntime runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from confide.protocol.manifest import encode_tensors
from confide.training import NumpyTrainer

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "confide", "export", *args], capture_output=True, text=True
    )


def test_numpy_model_exports_and_runs(tmp_path: Path) -> None:
    t = NumpyTrainer.create("mlp", 4, 3, (5,), seed=1)
    t.manifest.save(tmp_path / "model.json")
    (tmp_path / "w.safetensors").write_bytes(encode_tensors(t.manifest, t.get_weights()))
    out = _cli(
        "--manifest",
        str(tmp_path / "model.json"),
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--out",
        str(tmp_path / "m.onnx"),
    )
    assert out.returncode == 0, out.stderr
    assert "onnxruntime agrees" in out.stdout
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(probs, t.predict_proba(x), atol=1e-5)


def test_missing_weights_is_one_line_and_exit_2(tmp_path: Path) -> None:
    t = NumpyTrainer.create("logistic", 2, 2)
    t.manifest.save(tmp_path / "model.json")
    out = _cli(
        "--manifest",
        str(tmp_path / "model.json"),
        "--weights",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "m.onnx"),
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"confide export: cannot read weights file '{tmp_path / 'nope'}': No such file or directory"
    ]
    assert not (tmp_path / "m.onnx").exists()
