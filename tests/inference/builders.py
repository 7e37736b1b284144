"""Small device models written as ONNX and as TFLite from the same float32 weights.

Used by the inference tests, the patient-app tests, ``benches/python/bench_device.py`` and
``benches/python/make_device_fixtures.py`` (which regenerates the committed fixtures under
``tests/inference/fixtures/``).

Why a hand-written TFLite writer: the only maintained converters to ``.tflite``
(TensorFlow's ``TFLiteConverter``, ``ai-edge-torch``) need TensorFlow (a 274 MB wheel for
``tensorflow-cpu`` 2.21) or torch plus TensorFlow, far too heavy for a test dependency. A
``.tflite`` file is a FlatBuffer of the TFLite schema; ``ai-edge-litert`` ships the
schema's generated Python object API (``ai_edge_litert.schema_py_generated``), so the
models below are written with it and the ``flatbuffers`` runtime. Only the operators these
models need are supported: TRANSPOSE, CONV_2D, MEAN, FULLY_CONNECTED and SOFTMAX.

The models:

* **dense head**: ``x (N, d) -> [FC -> act]* -> FC -> softmax``, in confide's numpy layout
  (``layer{i}.weight`` of shape ``(fan_in, fan_out)``, ``layer{i}.bias``). A binary logistic
  head (one output) is written as two logits ``[0, z]``: ``softmax([0, z]) = [1 - s(z), s(z)]``,
  exactly what :meth:`confide.training.numpy_engine.NumpyTrainer.predict_proba` returns.
* **CNN**: ``image (N, 3, H, W)`` (NCHW, as torch exports it) ``-> [conv 3x3 stride 2 VALID,
  ReLU]* -> global mean -> features -> dense head``. The model has two outputs,
  ``probabilities`` and ``features`` (the frozen-backbone features a device trains a head
  on). The TFLite version takes the same NCHW input and transposes to NHWC first, as
  ``ai-edge-torch`` does.

Both formats have a dynamic batch dimension.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CNN",
    "DenseHead",
    "cnn_to_onnx",
    "cnn_to_tflite",
    "dense_to_onnx",
    "dense_to_tflite",
    "fixture_models",
    "make_cnn",
    "make_dense",
    "numpy_forward",
]

F32 = NDArray[np.float32]


@dataclass
class DenseHead:
    """Dense layers in confide's numpy layout: ``weights[i]`` is ``(fan_in, fan_out)``."""

    weights: list[F32]
    biases: list[F32]
    activation: str = "tanh"  # hidden activation: "tanh" or "relu"

    @property
    def n_features(self) -> int:
        return int(self.weights[0].shape[0])

    def logits_layers(self) -> list[tuple[F32, F32]]:
        """The layers with a one-output (logistic) last layer widened to two logits."""
        layers = list(zip(self.weights, self.biases, strict=True))
        w, b = layers[-1]
        if w.shape[1] == 1:
            w = np.concatenate([np.zeros_like(w), w], axis=1)
            b = np.concatenate([np.zeros_like(b), b])
            layers[-1] = (w, b)
        return layers

    @classmethod
    def from_vector(cls, manifest: Any, vector: F32) -> DenseHead:
        """Rebuild from a NumpyTrainer manifest and flat vector."""
        views = manifest.unflatten(vector)
        n = len(manifest.tensors) // 2
        spec = dict(manifest.spec)
        return cls(
            [np.array(views[f"layer{i}.weight"], np.float32) for i in range(n)],
            [np.array(views[f"layer{i}.bias"], np.float32) for i in range(n)],
            str(spec.get("activation", "tanh")),
        )


@dataclass
class CNN:
    """Conv stack (ONNX layout ``(out, in, 3, 3)``) followed by a :class:`DenseHead`."""

    convs: list[tuple[F32, F32]]
    head: DenseHead
    image: int = 224
    channels: int = 3
    names: dict[str, str] = field(
        default_factory=lambda: {
            "input": "image",
            "probabilities": "probabilities",
            "features": "features",
        }
    )

    @property
    def n_features(self) -> int:
        return int(self.convs[-1][0].shape[0])


def make_dense(
    n_features: int,
    n_classes: int,
    hidden: tuple[int, ...] = (),
    activation: str = "tanh",
    seed: int = 0,
) -> DenseHead:
    """Random dense head (Glorot-uniform weights, small random biases)."""
    rng = np.random.default_rng(seed)
    widths = [n_features, *hidden, 1 if n_classes == 2 and not hidden else n_classes]
    ws, bs = [], []
    for a, b in itertools.pairwise(widths):
        limit = np.sqrt(6.0 / (a + b))
        ws.append(rng.uniform(-limit, limit, size=(a, b)).astype(np.float32))
        bs.append(rng.normal(scale=0.1, size=(b,)).astype(np.float32))
    return DenseHead(ws, bs, activation)


def make_cnn(
    seed: int = 0,
    channels: tuple[int, ...] = (8, 16),
    image: int = 224,
    n_classes: int = 3,
    hidden: tuple[int, ...] = (),
) -> CNN:
    """Random CNN with He-scaled 3x3 kernels."""
    rng = np.random.default_rng(seed)
    convs = []
    c_in = 3
    for c_out in channels:
        w = rng.normal(scale=np.sqrt(2.0 / (9 * c_in)), size=(c_out, c_in, 3, 3))
        b = rng.normal(scale=0.05, size=(c_out,))
        convs.append((w.astype(np.float32), b.astype(np.float32)))
        c_in = c_out
    head = make_dense(c_in, n_classes, hidden, "relu", seed=seed + 1)
    return CNN(convs, head, image=image)


# --- numpy reference ---------------------------------------------------------------------


def _dense_forward(head: DenseHead, x: NDArray[np.float64]) -> NDArray[np.float64]:
    layers = head.logits_layers()
    a = x
    for i, (w, b) in enumerate(layers):
        a = a @ w.astype(np.float64) + b.astype(np.float64)
        if i < len(layers) - 1:
            a = np.tanh(a) if head.activation == "tanh" else np.maximum(a, 0.0)
    e = np.exp(a - a.max(axis=1, keepdims=True))
    out: NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


def numpy_forward(model: CNN | DenseHead, x: F32) -> dict[str, NDArray[np.float64]]:
    """Float64 reference forward pass: ``probabilities`` (and ``features`` for a CNN)."""
    if isinstance(model, DenseHead):
        return {"probabilities": _dense_forward(model, x.astype(np.float64))}
    a = x.astype(np.float64)
    for w, b in model.convs:
        n, c, h, wd = a.shape
        ho, wo = (h - 3) // 2 + 1, (wd - 3) // 2 + 1
        cols = np.empty((n, c, 3, 3, ho, wo))
        for i in range(3):
            for j in range(3):
                cols[:, :, i, j] = a[:, :, i : i + 2 * ho : 2, j : j + 2 * wo : 2]
        a = np.einsum("ncijhw,ocij->nohw", cols, w.astype(np.float64))
        a = np.maximum(a + b.astype(np.float64)[None, :, None, None], 0.0)
    feats = a.mean(axis=(2, 3))
    return {"probabilities": _dense_forward(model.head, feats), "features": feats}


# --- ONNX ---------------------------------------------------------------------------------

_OPSET = 17
_IR_VERSION = 8  # readable by onnxruntime >= 1.10, as on older devices


def _onnx_dense_nodes(head: DenseHead, x: str, prefix: str) -> tuple[list[Any], list[Any], str]:
    from onnx import helper, numpy_helper

    nodes, inits = [], []
    layers = head.logits_layers()
    a = x
    for i, (w, b) in enumerate(layers):
        wn, bn, zn = f"{prefix}layer{i}.weight", f"{prefix}layer{i}.bias", f"{prefix}z{i}"
        inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)]
        nodes.append(helper.make_node("Gemm", [a, wn, bn], [zn]))
        a = zn
        if i < len(layers) - 1:
            act = f"{prefix}h{i}"
            nodes.append(
                helper.make_node("Tanh" if head.activation == "tanh" else "Relu", [a], [act])
            )
            a = act
    nodes.append(helper.make_node("Softmax", [a], ["probabilities"], axis=1))
    return nodes, inits, "probabilities"


def _finish_onnx(graph: Any) -> bytes:
    from onnx import checker, helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET)],
        producer_name="confide-tests",
        ir_version=_IR_VERSION,
    )
    checker.check_model(model)
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def dense_to_onnx(head: DenseHead, input_name: str = "input") -> bytes:
    """ONNX model ``input (N, d) -> probabilities (N, k)``."""
    from onnx import TensorProto, helper

    nodes, inits, out = _onnx_dense_nodes(head, input_name, "")
    k = head.logits_layers()[-1][0].shape[1]
    graph = helper.make_graph(
        nodes,
        "confide_dense_head",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", head.n_features])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", k])],
        inits,
    )
    return _finish_onnx(graph)


def cnn_to_onnx(model: CNN) -> bytes:
    """ONNX model ``image (N, 3, H, W) -> probabilities (N, k), features (N, f)``."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    a = model.names["input"]
    for i, (w, b) in enumerate(model.convs):
        wn, bn = f"conv{i}.weight", f"conv{i}.bias"
        inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)]
        nodes.append(
            helper.make_node("Conv", [a, wn, bn], [f"c{i}"], kernel_shape=[3, 3], strides=[2, 2])
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        a = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [a], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], axis=1))
    head_nodes, head_inits, _ = _onnx_dense_nodes(model.head, "features", "head.")
    k = model.head.logits_layers()[-1][0].shape[1]
    graph = helper.make_graph(
        nodes + head_nodes,
        "confide_tiny_cnn",
        [
            helper.make_tensor_value_info(
                model.names["input"],
                TensorProto.FLOAT,
                ["N", model.channels, model.image, model.image],
            )
        ],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", model.n_features]),
        ],
        inits + head_inits,
    )
    return _finish_onnx(graph)


# --- TFLite -------------------------------------------------------------------------------


class _TFLiteWriter:
    """Accumulates tensors, buffers and operators of one TFLite subgraph."""

    def __init__(self) -> None:
        from ai_edge_litert import schema_py_generated as fb

        self.fb = fb
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [fb.BufferT()]  # buffer 0 is the empty sentinel
        self.operators: list[Any] = []
        self.opcodes: dict[int, int] = {}

    def tensor(
        self,
        name: str,
        shape: list[int],
        data: NDArray[Any] | None = None,
        dtype: str = "float32",
    ) -> int:
        fb = self.fb
        t = fb.TensorT()
        t.name = name
        t.shape = [max(1, d) for d in shape]
        if any(d < 0 for d in shape):
            t.shapeSignature = list(shape)
        t.type = fb.TensorType.FLOAT32 if dtype == "float32" else fb.TensorType.INT32
        if data is not None:
            buf = fb.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        else:
            t.buffer = 0
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options_type: int = 0,
        options: Any = None,
    ) -> None:
        fb = self.fb
        if code not in self.opcodes:
            self.opcodes[code] = len(self.opcodes)
        o = fb.OperatorT()
        o.opcodeIndex = self.opcodes[code]
        o.inputs, o.outputs = inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.operators.append(o)

    def dense(self, head: DenseHead, x: int, batch: int) -> int:
        fb = self.fb
        layers = head.logits_layers()
        a = x
        for i, (w, b) in enumerate(layers):
            wt = self.tensor(f"layer{i}.weight", [w.shape[1], w.shape[0]], w.T.copy())
            bt = self.tensor(f"layer{i}.bias", [b.shape[0]], b)
            z = self.tensor(f"z{i}", [batch, w.shape[1]])
            opts = fb.FullyConnectedOptionsT()
            hidden = i < len(layers) - 1
            # FULLY_CONNECTED fuses ReLU but not tanh: tanh is its own TANH operator.
            relu = hidden and head.activation == "relu"
            opts.fusedActivationFunction = (
                fb.ActivationFunctionType.RELU if relu else fb.ActivationFunctionType.NONE
            )
            self.op(
                fb.BuiltinOperator.FULLY_CONNECTED,
                [a, wt, bt],
                [z],
                fb.BuiltinOptions.FullyConnectedOptions,
                opts,
            )
            a = z
            if hidden and not relu:
                h = self.tensor(f"h{i}", [batch, w.shape[1]])
                self.op(fb.BuiltinOperator.TANH, [a], [h])
                a = h
        probs = self.tensor("probabilities", [batch, layers[-1][0].shape[1]])
        sm = fb.SoftmaxOptionsT()
        sm.beta = 1.0
        self.op(fb.BuiltinOperator.SOFTMAX, [a], [probs], fb.BuiltinOptions.SoftmaxOptions, sm)
        return probs

    def finish(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        import flatbuffers

        fb = self.fb
        sg = fb.SubGraphT()
        sg.tensors, sg.operators = self.tensors, self.operators
        sg.inputs, sg.outputs, sg.name = inputs, outputs, "main"
        model = fb.ModelT()
        model.version = 3
        model.description = description
        model.subgraphs = [sg]
        model.buffers = self.buffers
        codes = []
        for code in sorted(self.opcodes, key=self.opcodes.__getitem__):
            oc = fb.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            codes.append(oc)
        model.operatorCodes = codes
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def dense_to_tflite(head: DenseHead, input_name: str = "input") -> bytes:
    """TFLite model with the same signature and weights as :func:`dense_to_onnx`."""
    w = _TFLiteWriter()
    x = w.tensor(input_name, [-1, head.n_features])
    probs = w.dense(head, x, -1)
    return w.finish([x], [probs], "confide dense head")


def cnn_to_tflite(model: CNN) -> bytes:
    """TFLite model with the same signature and weights as :func:`cnn_to_onnx`."""
    w = _TFLiteWriter()
    fb = w.fb
    s = model.image
    x = w.tensor(model.names["input"], [-1, model.channels, s, s])
    perm = w.tensor("nchw_to_nhwc", [4], np.array([0, 2, 3, 1], np.int32), dtype="int32")
    c_in = model.channels
    a = w.tensor("nhwc", [-1, s, s, c_in])
    w.op(
        fb.BuiltinOperator.TRANSPOSE,
        [x, perm],
        [a],
        fb.BuiltinOptions.TransposeOptions,
        fb.TransposeOptionsT(),
    )
    for i, (k, b) in enumerate(model.convs):
        s = (s - 3) // 2 + 1
        kt = w.tensor(
            f"conv{i}.weight", list(k.transpose(0, 2, 3, 1).shape), k.transpose(0, 2, 3, 1).copy()
        )
        bt = w.tensor(f"conv{i}.bias", [b.shape[0]], b)
        out = w.tensor(f"r{i}", [-1, s, s, k.shape[0]])
        opts = fb.Conv2DOptionsT()
        opts.padding = fb.Padding.VALID
        opts.strideW = opts.strideH = 2
        opts.fusedActivationFunction = fb.ActivationFunctionType.RELU
        w.op(fb.BuiltinOperator.CONV_2D, [a, kt, bt], [out], fb.BuiltinOptions.Conv2DOptions, opts)
        a = out
    axes = w.tensor("mean_axes", [2], np.array([1, 2], np.int32), dtype="int32")
    feats = w.tensor("features", [-1, model.n_features])
    red = fb.ReducerOptionsT()
    red.keepDims = False
    w.op(fb.BuiltinOperator.MEAN, [a, axes], [feats], fb.BuiltinOptions.ReducerOptions, red)
    probs = w.dense(model.head, feats, -1)
    return w.finish([x], [probs, feats], "confide tiny CNN")


def fixture_models(npz_path: Any) -> tuple[DenseHead, CNN]:
    """The dense head and the 64x64 CNN of the committed fixtures, from ``weights.npz``."""
    with np.load(npz_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}

    def layers(prefix: str) -> tuple[list[F32], list[F32]]:
        n = sum(1 for k in arrays if k.startswith(prefix + "w"))
        return [arrays[f"{prefix}w{i}"] for i in range(n)], [
            arrays[f"{prefix}b{i}"] for i in range(n)
        ]

    head = DenseHead(*layers("head."), activation="tanh")
    n_conv = sum(1 for k in arrays if k.startswith("cnn.conv") and k.endswith(".w"))
    convs = [(arrays[f"cnn.conv{i}.w"], arrays[f"cnn.conv{i}.b"]) for i in range(n_conv)]
    cnn = CNN(convs, DenseHead(*layers("cnn.head."), activation="relu"), image=64)
    return head, cnn
