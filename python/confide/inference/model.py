"""Run a released model on the device: ONNX Runtime (default) or LiteRT, one interface.

:func:`load_model` reads the model's bytes once, optionally checks their SHA-256 (the one a
verified :class:`~confide.protocol.release.ReleaseRecord` names, so the bytes that were
verified are the bytes that run) and opens them with the chosen engine:

``"onnx"``
    ``onnxruntime.InferenceSession`` on the CPU execution provider (``pip install
    'confide[onnx]'``).
``"litert"``
    ``ai_edge_litert.interpreter.Interpreter`` (``pip install 'confide[litert]'``), the
    maintained successor of ``tflite-runtime``; when only ``tflite_runtime`` is installed
    its ``Interpreter`` (same API) is used instead. ``tflite-runtime`` 2.14, its last
    release, does not load under numpy 2.

A :class:`LocalModel` validates every input before the engine sees it (a numpy array of a
real floating dtype, cast to float32; the model's rank and fixed dimensions; finite values)
and raises confide's typed errors (:class:`~confide.errors.ArrayTypeError`,
:class:`~confide.errors.ShapeError`, :class:`~confide.errors.NonFiniteError`), never an
engine's own exception. Models have one float32 input whose first dimension is the batch;
:meth:`LocalModel.predict` returns the ``probabilities`` output (or the first output).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from confide.errors import (
    ArrayTypeError,
    ConfigError,
    EngineUnavailableError,
    IntegrityError,
    ModelFormatError,
    NonFiniteError,
    ShapeError,
)
from confide.protocol.manifest import sha256_hex

__all__ = [
    "ENGINES",
    "EngineUnavailableError",
    "LocalModel",
    "ModelFormatError",
    "TensorInfo",
    "available_engines",
    "load_model",
]

ENGINES = ("onnx", "litert")
"""Engine names accepted by :func:`load_model`."""

# A released device model is small (a CNN backbone plus a head); this bounds what a
# corrupted or hostile download can make the device parse.
_MAX_MODEL_BYTES = 512 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of a model input or output.

    Parameters
    ----------
    name : str
        Tensor name in the model.
    shape : tuple of (int or None)
        Dimensions; ``None`` where the model leaves a dimension free (the batch).
    dtype : str
        numpy dtype name (``"float32"``).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        """Return the shape as text, free dimensions written ``N``.

        Returns
        -------
        str
            For example ``"(N, 3, 224, 224)"``.

        Examples
        --------
        >>> TensorInfo("image", (None, 3, 224, 224), "float32").describe()
        '(N, 3, 224, 224)'
        """
        dims = ["N" if d is None else str(d) for d in self.shape]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _import_first(modules: Sequence[str]) -> tuple[str, Any] | None:
    for name in modules:
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    return None


def available_engines() -> list[str]:
    """Return the engines that can be used here, in order of preference.

    Returns
    -------
    list of str
        A subset of :data:`ENGINES`.

    Examples
    --------
    >>> set(available_engines()) <= {"onnx", "litert"}
    True
    """
    found = []
    if _import_first(["onnxruntime"]) is not None:
        found.append("onnx")
    if _import_first(["ai_edge_litert.interpreter", "tflite_runtime.interpreter"]) is not None:
        found.append("litert")
    return found


def _read_source(source: str | Path | bytes) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | Path):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ModelFormatError(f"cannot read model file {path}: {exc}") from exc
        if size > _MAX_MODEL_BYTES:
            raise ModelFormatError(
                f"model file {path} is {size} bytes; at most {_MAX_MODEL_BYTES} are accepted"
            )
        data = path.read_bytes()
    else:
        raise ConfigError(f"source must be a path or bytes, got {type(source).__name__}")
    if not data:
        raise ModelFormatError("model is empty (0 bytes)")
    if len(data) > _MAX_MODEL_BYTES:
        raise ModelFormatError(
            f"model is {len(data)} bytes; at most {_MAX_MODEL_BYTES} are accepted"
        )
    return data


class _OnnxBackend:
    engine = "onnx"

    def __init__(self, data: bytes, num_threads: int | None) -> None:
        found = _import_first(["onnxruntime"])
        if found is None:
            raise EngineUnavailableError(
                "the ONNX engine needs onnxruntime: pip install 'confide[onnx]'"
            )
        ort = found[1]
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; warnings would go to stderr
        try:
            self._session = ort.InferenceSession(
                data, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own, untyped, exceptions
            raise ModelFormatError(f"onnxruntime cannot load the model: {exc}") from exc
        self.inputs = tuple(self._info(i) for i in self._session.get_inputs())
        self.outputs = tuple(self._info(o) for o in self._session.get_outputs())
        meta = self._session.get_modelmeta()
        self.metadata: dict[str, str] = dict(meta.custom_metadata_map)

    @staticmethod
    def _info(arg: Any) -> TensorInfo:
        dtype = {"tensor(float)": "float32"}.get(str(arg.type), str(arg.type))
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
        return TensorInfo(str(arg.name), shape, dtype)

    def run(self, names: list[str], x: NDArray[np.float32]) -> list[NDArray[Any]]:
        out: list[NDArray[Any]] = self._session.run(names, {self.inputs[0].name: x})
        return out


class _LiteRTBackend:
    engine = "litert"

    def __init__(self, data: bytes, num_threads: int | None) -> None:
        found = _import_first(["ai_edge_litert.interpreter", "tflite_runtime.interpreter"])
        if found is None:
            raise EngineUnavailableError(
                "the LiteRT engine needs ai-edge-litert: pip install 'confide[litert]' "
                "(tflite_runtime is used when it is the one installed)"
            )
        self.module = found[0]
        try:
            self._interp = found[1].Interpreter(model_content=data, num_threads=num_threads)
            self._interp.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError untyped
            raise ModelFormatError(f"LiteRT cannot load the model: {exc}") from exc
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self.inputs = tuple(self._info(d) for d in self._in)
        self.outputs = tuple(self._info(d) for d in self._out)
        self.metadata: dict[str, str] = {}
        self._shape: tuple[int, ...] = tuple(int(d) for d in self._in[0]["shape"])
        # An Interpreter holds its tensors in place: one invocation at a time.
        self._lock = threading.Lock()

    @staticmethod
    def _info(detail: dict[str, Any]) -> TensorInfo:
        sig = detail.get("shape_signature", detail["shape"])
        shape = tuple(int(d) if int(d) >= 0 else None for d in sig)
        return TensorInfo(str(detail["name"]), shape, np.dtype(detail["dtype"]).name)

    def run(self, names: list[str], x: NDArray[np.float32]) -> list[NDArray[Any]]:
        index = {d["name"]: d["index"] for d in self._out}
        with self._lock:
            if x.shape != self._shape:
                self._interp.resize_tensor_input(self._in[0]["index"], list(x.shape))
                self._interp.allocate_tensors()
                self._shape = x.shape
            self._interp.set_tensor(self._in[0]["index"], x)
            self._interp.invoke()
            return [np.array(self._interp.get_tensor(index[n])) for n in names]


class LocalModel:
    """A model opened on the device by :func:`load_model`.

    Attributes
    ----------
    engine : str
        ``"onnx"`` or ``"litert"``.
    sha256 : str
        Hex SHA-256 of the model bytes that were loaded.
    input : TensorInfo
        The model's single input.
    outputs : tuple of TensorInfo
        The model's outputs, in the model's order.
    output : str
        The output :meth:`predict` returns.
    check_finite : bool
        Whether inputs are scanned for NaN and Inf (see :func:`load_model`).
    metadata : dict of str to str
        ONNX ``metadata_props`` (empty for LiteRT).

    Examples
    --------
    ``tests/inference`` builds small ONNX/TFLite models; with one of them::

        model = load_model("head.onnx")                  # or engine="litert", "head.tflite"
        model.input.describe()                           # '(N, 4)'
        model.predict(np.zeros((1, 4), np.float32))      # (1, n_classes) probabilities
    """

    def __init__(
        self,
        backend: _OnnxBackend | _LiteRTBackend,
        sha256: str,
        output: str,
        check_finite: bool = True,
    ) -> None:
        self._backend = backend
        self.check_finite = check_finite
        self.engine: str = backend.engine
        self.sha256 = sha256
        self.input = backend.inputs[0]
        self.outputs = backend.outputs
        self.output = output
        self.metadata = backend.metadata

    def __repr__(self) -> str:
        return (
            f"LocalModel(engine={self.engine!r}, input={self.input.name}{self.input.describe()}, "
            f"outputs={[o.name for o in self.outputs]}, sha256={self.sha256[:12]}...)"
        )

    @property
    def output_names(self) -> list[str]:
        """Names of the model's outputs, in order."""
        return [o.name for o in self.outputs]

    def check_input(self, x: ArrayLike) -> NDArray[np.float32]:
        """Validate ``x`` against the model's input and return it as C-contiguous float32.

        Parameters
        ----------
        x : numpy.ndarray
            A batch: rank and fixed dimensions as the model's input; a real floating dtype.

        Returns
        -------
        numpy.ndarray
            ``x`` as C-contiguous float32 (not copied when it already is).

        Raises
        ------
        ArrayTypeError
            ``x`` is not a numpy array of a real floating dtype.
        ShapeError
            Wrong rank, a fixed dimension that differs, or an empty batch.
        NonFiniteError
            NaN or Inf in ``x`` (unless the model was loaded with ``check_finite=False``).
        """
        if not isinstance(x, np.ndarray):
            raise ArrayTypeError(
                f"input must be a numpy array of shape {self.input.describe()}, "
                f"got {type(x).__name__}"
            )
        if x.dtype.kind != "f":
            raise ArrayTypeError(
                f"input must have a floating dtype (float32 expected), got {x.dtype}"
            )
        want = self.input.shape
        if x.ndim != len(want) or any(
            w is not None and w != g for w, g in zip(want, x.shape, strict=True)
        ):
            raise ShapeError(
                f"input {self.input.name!r} must have shape {self.input.describe()}, "
                f"got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ShapeError("input batch is empty")
        with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
            arr = np.ascontiguousarray(x, dtype=np.float32)
        if self.check_finite and not np.isfinite(arr).all():
            raise NonFiniteError("input contains NaN or Inf (after conversion to float32)")
        return arr

    def run(self, x: ArrayLike, outputs: Sequence[str] | None = None) -> dict[str, NDArray[Any]]:
        """Run the model on a validated batch and return the requested outputs by name.

        Parameters
        ----------
        x : numpy.ndarray
            Input batch (see :meth:`check_input`).
        outputs : sequence of str, optional
            Output names; all outputs when omitted.

        Returns
        -------
        dict of str to numpy.ndarray
            One array per requested output.

        Raises
        ------
        ConfigError
            An output name the model does not have.
        """
        names = self.output_names if outputs is None else list(outputs)
        unknown = sorted(set(names) - set(self.output_names))
        if unknown:
            raise ConfigError(f"model has no output {unknown}; it has {self.output_names}")
        arr = self.check_input(x)
        try:
            values = self._backend.run(names, arr)
        except Exception as exc:  # an engine failure at run time (e.g. out of memory)
            raise ModelFormatError(f"{self.engine} failed to run the model: {exc}") from exc
        return dict(zip(names, values, strict=True))

    def predict(self, x: ArrayLike) -> NDArray[np.float32]:
        """Class probabilities of a batch (the model's ``output``).

        Parameters
        ----------
        x : numpy.ndarray
            Input batch (see :meth:`check_input`).

        Returns
        -------
        numpy.ndarray
            ``(N, n_classes)`` float32.
        """
        out: NDArray[np.float32] = np.asarray(self.run(x, [self.output])[self.output], np.float32)
        return out


def load_model(
    source: str | Path | bytes,
    engine: str = "onnx",
    *,
    expected_sha256: str | None = None,
    output: str | None = None,
    num_threads: int | None = None,
    check_finite: bool = True,
) -> LocalModel:
    """Open a model on this device with ONNX Runtime or LiteRT.

    Parameters
    ----------
    source : str, Path or bytes
        A ``.onnx`` / ``.tflite`` file, or the model's bytes (as downloaded and verified).
    engine : {"onnx", "litert"}, default "onnx"
        The runtime; see the module documentation for the packages each needs.
    expected_sha256 : str, optional
        Hex SHA-256 the bytes must have (from a verified release record); checked on the
        very bytes that are then loaded.
    output : str, optional
        The output :meth:`LocalModel.predict` returns; default ``"probabilities"`` when the
        model has it, else its first output.
    num_threads : int, optional
        Intra-op threads of the engine (engine default when omitted).
    check_finite : bool, default True
        Scan every input for NaN and Inf and refuse it with
        :class:`~confide.errors.NonFiniteError`. The scan reads the whole input once (about
        0.05-0.1 ms for a 224x224 RGB image); a caller that produces its inputs itself
        (decoded 8-bit images are always finite) may turn it off.

    Returns
    -------
    LocalModel
        The opened model.

    Raises
    ------
    ConfigError
        Unknown ``engine`` or ``output``, or an invalid ``num_threads``.
    EngineUnavailableError
        The engine's package is not installed (the message names the pip extra).
    IntegrityError
        The bytes do not hash to ``expected_sha256``.
    ModelFormatError
        The bytes are not a loadable model, or its signature is not one float32 input.

    Examples
    --------
    >>> load_model(b"", engine="onnx")
    Traceback (most recent call last):
    ...
    confide.errors.ModelFormatError: model is empty (0 bytes)
    >>> load_model(b"...", engine="gpu")
    Traceback (most recent call last):
    ...
    confide.errors.ConfigError: engine must be one of ('onnx', 'litert'), got 'gpu'
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if num_threads is not None and (
        not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1
    ):
        raise ConfigError(f"num_threads must be an int >= 1, got {num_threads!r}")
    data = _read_source(source)
    digest = sha256_hex(data)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise IntegrityError(f"model SHA-256 is {digest}, the release names {expected_sha256}")
    backend: _OnnxBackend | _LiteRTBackend = (
        _OnnxBackend(data, num_threads) if engine == "onnx" else _LiteRTBackend(data, num_threads)
    )
    if len(backend.inputs) != 1:
        raise ModelFormatError(
            f"a device model has exactly one input, this one has {len(backend.inputs)}: "
            f"{[i.name for i in backend.inputs]}"
        )
    if backend.inputs[0].dtype != "float32":
        raise ModelFormatError(f"the model input must be float32, got {backend.inputs[0].dtype}")
    if not backend.inputs[0].shape:
        raise ModelFormatError("the model input must have a batch dimension, got a scalar")
    names = [o.name for o in backend.outputs]
    if output is None:
        output = "probabilities" if "probabilities" in names else names[0]
    elif output not in names:
        raise ConfigError(f"model has no output {output!r}; it has {names}")
    return LocalModel(backend, digest, output, check_finite=bool(check_finite))
