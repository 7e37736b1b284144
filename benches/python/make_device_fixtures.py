"""Regenerate the committed device-model fixtures in ``tests/inference/fixtures/``.

Not part of ``make test``: the tests load the committed files, so the LiteRT runtime path
is tested without any converter installed. This script needs ``onnx`` and
``ai-edge-litert`` (for the TFLite schema's generated object API); it writes each model
twice from the same float32 weights, as ONNX and as TFLite (see
``tests/inference/builders.py`` for why the TFLite writer is hand-made), plus the weights
as ``.npz`` so tests can compare with a numpy forward pass.

Run::

    python benches/python/make_device_fixtures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.inference.builders import (  # noqa: E402
    cnn_to_onnx,
    cnn_to_tflite,
    dense_to_onnx,
    dense_to_tflite,
    make_cnn,
    make_dense,
)

OUT = ROOT / "tests" / "inference" / "fixtures"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    head = make_dense(6, 3, hidden=(5,), activation="tanh", seed=7)
    cnn = make_cnn(seed=11, channels=(4, 8), image=64, n_classes=3)
    # The same weights at the device resolution: the engines must agree at 224x224 too.
    cnn224 = make_cnn(seed=11, channels=(4, 8), image=224, n_classes=3)
    files = {
        "dense_head.onnx": dense_to_onnx(head),
        "dense_head.tflite": dense_to_tflite(head),
        "tiny_cnn64.onnx": cnn_to_onnx(cnn),
        "tiny_cnn64.tflite": cnn_to_tflite(cnn),
        "tiny_cnn224.onnx": cnn_to_onnx(cnn224),
        "tiny_cnn224.tflite": cnn_to_tflite(cnn224),
    }
    for name, data in files.items():
        (OUT / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")
    arrays = {f"head.w{i}": w for i, w in enumerate(head.weights)}
    arrays.update({f"head.b{i}": b for i, b in enumerate(head.biases)})
    for i, (w, b) in enumerate(cnn.convs):
        arrays[f"cnn.conv{i}.w"], arrays[f"cnn.conv{i}.b"] = w, b
    arrays.update({f"cnn.head.w{i}": w for i, w in enumerate(cnn.head.weights)})
    arrays.update({f"cnn.head.b{i}": b for i, b in enumerate(cnn.head.biases)})
    np.savez(OUT / "weights.npz", **arrays)


if __name__ == "__main__":
    main()
