"""Export a trained global model to ONNX, for on-device inference, and check the export.

Two kinds of model are exported, both to a graph with one input ``input`` (dynamic batch
axis) and one output ``probabilities`` (``(batch, num_classes)``, rows summing to one):

* **torch** models (a :class:`~confide.training.torch_engine.TorchTrainer` or any
  ``nn.Module`` returning logits) through ``torch.onnx.export`` (the ``torch.export``-based
  exporter, opset 18; a softmax is appended to the logits). Needs ``torch``, ``onnx`` and
  ``onnxscript`` (``pip install "confide[torch,onnx]"``).
* **numpy** models (:class:`~confide.training.numpy_engine.NumpyTrainer`: logistic,
  softmax, MLP with tanh/ReLU) written node by node with the ``onnx`` package alone: no
  torch needed, so a patient-device pipeline can export its own heads.

A trainer's export carries its manifest's SHA-256 in the ONNX metadata
(``confide.manifest_sha256``), so a device can check it runs the model it was told about.
:func:`verify_onnx` runs the file in onnxruntime on random inputs and compares with the
model's own forward pass (default tolerance 1e-5).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from confide.errors import ConfigError, ExportError

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["ExportError", "export_onnx", "verify_onnx"]

#: Opset of exported graphs (>= 17 is what the device runtimes are tested with).
OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


def _is_numpy_trainer(obj: object) -> bool:
    manifest = getattr(obj, "manifest", None)
    spec = getattr(manifest, "spec", None)
    return isinstance(spec, Mapping) and spec.get("engine") == "numpy"


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExportError(f'ONNX export needs {module!r}: pip install "confide[{extra}]"')


def _output_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.parent.is_dir():
        raise ConfigError(f"cannot write {str(p)!r}: folder {str(p.parent)!r} does not exist")
    return p


# ------------------------------------------------------------------------ numpy models


def _numpy_graph(trainer: Any) -> onnx.ModelProto:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    manifest = trainer.manifest
    spec = dict(manifest.spec)
    kind = spec.get("kind")
    activation = str(spec.get("activation", "tanh"))
    if kind not in ("logistic", "softmax", "mlp") or activation not in ("tanh", "relu"):
        raise ExportError(f"unsupported numpy model spec {spec}")
    views = manifest.unflatten(trainer.get_weights())
    n_layers = len(manifest.tensors) // 2
    n_features = int(spec["n_features"])
    n_classes = int(spec["n_classes"])
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = INPUT_NAME
    for i in range(n_layers):
        w, b = f"layer{i}.weight", f"layer{i}.bias"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(views[w], np.float32), w))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(views[b], np.float32), b))
        nodes.append(helper.make_node("MatMul", [current, w], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", b], [f"z{i}"]))
        current = f"z{i}"
        if i < n_layers - 1:
            op = "Tanh" if activation == "tanh" else "Relu"
            nodes.append(helper.make_node(op, [current], [f"a{i}"]))
            current = f"a{i}"
    if kind == "logistic":
        inits.append(numpy_helper.from_array(np.ones((1, 1), np.float32), "one"))
        nodes.append(helper.make_node("Sigmoid", [current], ["p1"]))
        nodes.append(helper.make_node("Sub", ["one", "p1"], ["p0"]))
        nodes.append(helper.make_node("Concat", ["p0", "p1"], [OUTPUT_NAME], axis=1))
    else:
        nodes.append(helper.make_node("Softmax", [current], [OUTPUT_NAME], axis=1))
    graph = helper.make_graph(
        nodes,
        "confide_numpy_model",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_classes])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="confide"
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.10 (opset 18 needs IR 8)
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------------ torch models


def _torch_parts(
    obj: Any, input_shape: Sequence[int] | None
) -> tuple[torch.nn.Module, tuple[int, ...]]:
    import torch

    module = getattr(obj, "module", obj)
    if not isinstance(module, torch.nn.Module):
        raise ExportError(
            "export_onnx takes a TorchTrainer, a NumpyTrainer or a torch.nn.Module, "
            f"got {type(obj).__name__}"
        )
    shape = input_shape if input_shape is not None else getattr(obj, "input_shape", None)
    if shape is None:
        raise ConfigError("input_shape is required to export a bare nn.Module, e.g. (3, 64, 64)")
    dims = tuple(shape)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ConfigError(f"input_shape must be ints >= 1 (one record), got {shape!r}")
    return module, dims


def _probabilities_module(module: torch.nn.Module) -> torch.nn.Module:
    import torch

    class _Probabilities(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.inner(x), dim=1)

    # A CPU copy in eval mode: export never touches the trainer's live (maybe CUDA) module.
    inner = copy.deepcopy(module).to("cpu").eval()
    return _Probabilities(inner).eval()


def _torch_graph(module: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    _require("onnxscript", "onnx")
    import torch

    wrapped = _probabilities_module(module)
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    # The exporter warns, once per process, that torchvision's detection ops are not
    # registered; confide's models use none of them, so the warning is noise for users.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types (torch.export, onnxscript)
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    finally:
        registration.setLevel(level)


def _add_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
    onnx.save(model, str(path))


def export_onnx(
    model: Any,
    path: str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` as an ONNX graph that outputs class probabilities.

    Parameters
    ----------
    model : TorchTrainer, NumpyTrainer or torch.nn.Module
        The model; a module must return logits.
    path : str or Path
        Output file (its folder must exist).
    input_shape : sequence of int, optional
        Shape of one record; required for a bare ``nn.Module`` (trainers know theirs).
    metadata : mapping of str to str, optional
        Extra ONNX ``metadata_props``; a trainer's ``confide.manifest_sha256`` and
        ``confide.engine`` are always added.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ExportError
        Unsupported model, a missing package, or the exporter failed.
    ConfigError
        Missing or invalid ``input_shape``, or an unwritable ``path``.

    Examples
    --------
    >>> import tempfile, os
    >>> from confide.training.numpy_engine import NumpyTrainer
    >>> t = NumpyTrainer.create("mlp", n_features=3, n_classes=2, hidden=(4,), seed=0)
    >>> p = export_onnx(t, os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> verify_onnx(t, p) <= 1e-5
    True
    """
    _require("onnx", "onnx")
    out = _output_path(path)
    meta: dict[str, str] = {}
    manifest = getattr(model, "manifest", None)
    if _is_numpy_trainer(model):
        import onnx

        onnx.save(_numpy_graph(model), str(out))
        meta["confide.engine"] = "numpy"
    else:
        _require("torch", "torch")
        module, shape = _torch_parts(model, input_shape)
        _torch_graph(module, shape, out)
        meta["confide.engine"] = "torch"
        meta["confide.input_shape"] = ",".join(map(str, shape))
    if manifest is not None and hasattr(manifest, "sha256"):
        meta["confide.manifest_sha256"] = str(manifest.sha256)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    _add_metadata(out, meta)
    return out


def _reference_probabilities(
    model: Any, x: NDArray[np.float32], input_shape: Sequence[int] | None
) -> NDArray[np.float32]:
    if _is_numpy_trainer(model):
        probs: NDArray[np.float32] = np.asarray(model.predict_proba(x), dtype=np.float32)
        return probs
    import torch

    module, _ = _torch_parts(model, input_shape)
    ref = _probabilities_module(module)
    with torch.no_grad():
        out: NDArray[np.float32] = ref(torch.from_numpy(x)).numpy()
    return out


def verify_onnx(
    model: Any,
    path: str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    n: int = 8,
    atol: float = 1e-5,
    seed: int = 0,
) -> float:
    """Check an exported graph against the model's own forward pass in onnxruntime.

    Parameters
    ----------
    model : TorchTrainer, NumpyTrainer or torch.nn.Module
        The model that was exported (with the same weights).
    path : str or Path
        The ONNX file.
    input_shape : sequence of int, optional
        Shape of one record (required for a bare module; for numpy trainers it is
        ``(n_features,)``).
    n : int, default 8
        Random records (standard normal; numpy's generator, which protects nothing).
    atol : float, default 1e-5
        Largest allowed absolute difference of any probability.
    seed : int, default 0
        Seed of the random inputs.

    Returns
    -------
    float
        The largest absolute difference seen.

    Raises
    ------
    ExportError
        The difference exceeds ``atol``, the file does not load, or its input/output
        names differ from ``input``/``probabilities``.

    Examples
    --------
    >>> import tempfile, os
    >>> from confide.training.numpy_engine import NumpyTrainer
    >>> t = NumpyTrainer.create("logistic", n_features=2, n_classes=2, seed=1)
    >>> p = export_onnx(t, os.path.join(tempfile.mkdtemp(), "lr.onnx"))
    >>> verify_onnx(t, p, n=4) < 1e-5
    True
    """
    _require("onnxruntime", "onnx")
    import onnxruntime as ort  # type: ignore[import-untyped]  # ships no py.typed

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"n must be an int >= 1, got {n!r}")
    if _is_numpy_trainer(model):
        shape: tuple[int, ...] = (int(model.manifest.spec["n_features"]),)
    else:
        _, shape = _torch_parts(model, input_shape)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnxruntime cannot load {str(path)!r}: {exc}") from None
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(
            f"expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got {inputs} and {outputs}"
        )
    x = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
    got = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    want = _reference_probabilities(model, x, input_shape)
    if got.shape != want.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from the model's {want.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    if not diff <= atol:
        raise ExportError(f"ONNX output differs from the model by {diff:.3g} (> atol {atol:g})")
    return diff
