"""Training engines behind one interface: a flat float32 vector plus a named manifest.

:class:`Trainer` is the protocol the federated client drives; it never sees layers, only
``get_weights``/``set_weights`` on the flat vector described by ``manifest``, ``fit`` and
``evaluate``. :class:`NumpyTrainer` is the first engine: dense models in numpy (binary logistic
regression, softmax regression and small MLPs with tanh or ReLU), trained by mini-batch SGD,
with exact per-sample gradients (:meth:`NumpyTrainer.per_sample_gradients`) for DP-SGD.

Two heads. The **classification** head (the default) takes integer class labels and
cross-entropy. The **regression** head (``kind="linear"``, or ``kind="mlp"`` with
``head="regression"``) has one output, takes real-valued targets and the squared error
``(f(x) - y)^2``; its manifest spec says ``"head": "regression"`` (classification manifests
carry no ``head`` key, so their hashes are unchanged). A classification model refuses float
labels with :class:`~confide.errors.ArrayTypeError`, so a regression target never reaches a
cross-entropy by mistake.

Patient-level DP-SGD is not this engine's business: the engine is a
:class:`~confide.training.base.PerSampleTrainer` (exact per-record gradients), and
:func:`confide.privacy.run_dpsgd` owns the DP-SGD loop (Poisson sampling of patients,
per-patient clipping by the Rust kernel, noise from the Rust core, normalisation, momentum).
:meth:`NumpyTrainer.fit` refuses a config with ``dp`` set, so no code path trains a DP round
without the privacy layer.

Parameters are named ``layer{i}.weight`` (shape ``(fan_in, fan_out)``) and ``layer{i}.bias``
(shape ``(fan_out,)``); the manifest's ``spec`` records the architecture so any site can
rebuild the model from the manifest alone (:meth:`NumpyTrainer.from_manifest`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.errors import (
    ArrayTypeError,
    ConfigError,
    DataError,
    ManifestError,
    PrivacyUnsupportedError,
)
from confide.protocol.manifest import Manifest
from confide.training.base import FitResult, SiteData, TrainConfig

__all__ = ["NumpyTrainer"]

_KINDS = ("logistic", "softmax", "mlp", "linear")
_ACTIVATIONS = ("tanh", "relu")
_HEADS = ("classification", "regression")


def _check_shapes(
    x: NDArray[Any], y: NDArray[Any], n_features: int
) -> tuple[NDArray[Any], NDArray[Any]]:
    """``x`` and ``y`` as arrays, refused unless ``(n, n_features)`` and ``(n,)`` with ``n > 0``."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise DataError(f"x must have shape (n, {n_features}), got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"y must have shape ({x.shape[0]},), got {y.shape}")
    if x.shape[0] == 0:
        raise DataError("x and y must hold at least one example")
    return x, y


def _check_regression_xy(
    x: NDArray[Any], y: NDArray[Any], n_features: int
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    x, y = _check_shapes(x, y, n_features)
    if y.dtype == np.bool_ or not (
        np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)
    ):
        raise ArrayTypeError(f"a regression target must be real numbers, got dtype {y.dtype}")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    yf = np.ascontiguousarray(y, dtype=np.float32)
    if not (np.isfinite(xf).all() and np.isfinite(yf).all()):
        raise DataError("x or y contains NaN or Inf (or a target too large for float32)")
    return xf, yf


def _check_xy(
    x: NDArray[Any], y: NDArray[Any], n_features: int, n_classes: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    x, y = _check_shapes(x, y, n_features)
    if not np.issubdtype(y.dtype, np.integer):
        raise ArrayTypeError(
            f"y must hold integer class labels, got dtype {y.dtype}; a real-valued target "
            "needs a regression head (NumpyTrainer.create('linear', ...) or head='regression')"
        )
    if y.min() < 0 or y.max() >= n_classes:
        raise DataError(f"labels must lie in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        raise DataError("x contains NaN or Inf")
    return xf, y.astype(np.int64, copy=False)


class NumpyTrainer:
    """Dense logistic/softmax regression and small MLPs in numpy.

    Parameters
    ----------
    manifest : Manifest
        A manifest made by :meth:`build_manifest` (its ``spec`` holds the architecture).
    weights : numpy.ndarray, optional
        Initial flat vector; zeros when omitted.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(64, 3)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int64)
    >>> from confide.data import Dataset
    >>> t = NumpyTrainer.create("logistic", n_features=3, n_classes=2, seed=0)
    >>> _ = t.fit(Dataset(x, y), TrainConfig(epochs=20, batch_size=16, learning_rate=0.5), seed=1)
    >>> t.evaluate(Dataset(x, y))["accuracy"] > 0.9
    True
    >>> t.per_sample_gradients(x[:5], y[:5]).shape
    (5, 4)
    """

    #: :meth:`fit` implements FedProx's proximal term (``TrainConfig.proximal_mu``).
    supports_proximal = True

    def __init__(self, manifest: Manifest, weights: NDArray[np.float32] | None = None) -> None:
        spec = dict(manifest.spec)
        if spec.get("engine") != "numpy" or spec.get("kind") not in _KINDS:
            raise ManifestError(f"not a numpy-engine manifest: spec={spec}")
        expected = self.build_manifest(
            spec["kind"],
            int(spec["n_features"]),
            int(spec["n_classes"]),
            tuple(int(h) for h in spec.get("hidden", [])),
            str(spec.get("activation", "tanh")),
            str(spec.get("head", "classification")),
        )
        # Optional: the table's feature columns, in order (`confide init-model --from-csv`);
        # sites check their own columns against them before enrolling.
        names = spec.get("feature_names")
        if names is not None:
            if not (
                isinstance(names, list)
                and len(names) == int(spec["n_features"])
                and all(isinstance(n, str) for n in names)
            ):
                raise ManifestError("spec.feature_names must list one name per feature")
            expected = Manifest(expected.tensors, {**expected.spec, "feature_names": names})
        if expected != manifest:
            raise ManifestError("manifest tensors do not match its numpy spec")
        self._manifest = manifest
        self._kind: str = spec["kind"]
        self._n_features = int(spec["n_features"])
        self._n_classes = int(spec["n_classes"])
        self._activation = str(spec.get("activation", "tanh"))
        self._regression = spec.get("head") == "regression"
        self._n_layers = len(manifest.tensors) // 2
        self._vec = np.zeros(manifest.size, dtype=np.float32)
        # Heavy-ball buffer kept between fits when TrainConfig.momentum_restart is false.
        self._velocity: NDArray[np.float32] | None = None
        if weights is not None:
            self.set_weights(weights)

    @staticmethod
    def build_manifest(
        kind: str,
        n_features: int,
        n_classes: int,
        hidden: tuple[int, ...] = (),
        activation: str = "tanh",
        head: str = "classification",
    ) -> Manifest:
        """Return the manifest of a numpy model.

        Parameters
        ----------
        kind : {"logistic", "softmax", "mlp", "linear"}
            Binary logistic regression (one sigmoid output), softmax regression, an MLP
            (softmax output, or one linear output with the regression head), or linear
            regression (always the regression head).
        n_features : int
            Input width (>= 1).
        n_classes : int
            Number of classes (2 for ``logistic``; >= 2 otherwise); 1 (the one output) for
            the regression head.
        hidden : tuple of int
            Hidden layer widths; must be empty unless ``kind == "mlp"`` (then non-empty).
        activation : {"tanh", "relu"}
            Hidden activation.
        head : {"classification", "regression"}
            Cross-entropy on integer classes, or squared error on a real target.
            ``kind="linear"`` implies ``"regression"``.

        Returns
        -------
        Manifest
            Names, shapes and spec.

        Examples
        --------
        >>> NumpyTrainer.build_manifest("linear", 3, 1).spec["head"]
        'regression'
        """
        if kind not in _KINDS:
            raise ManifestError(f"kind must be one of {_KINDS}, got {kind!r}")
        if activation not in _ACTIVATIONS:
            raise ManifestError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if head not in _HEADS:
            raise ManifestError(f"head must be one of {_HEADS}, got {head!r}")
        if kind == "linear":
            head = "regression"
        regression = head == "regression"
        if regression and kind not in ("linear", "mlp"):
            raise ManifestError(
                f"the regression head is kind 'linear' or 'mlp', got {kind!r} (a classifier)"
            )
        if regression and n_classes != 1:
            raise ManifestError(
                f"the regression head has one output: pass n_classes=1, got {n_classes}"
            )
        if n_features < 1 or (n_classes < 2 and not regression):
            raise ManifestError(
                f"need n_features >= 1 and n_classes >= 2, got {n_features}, {n_classes}"
            )
        if kind == "logistic" and n_classes != 2:
            raise ManifestError(f"logistic regression is binary, got n_classes={n_classes}")
        if (kind == "mlp") != bool(hidden) or any(h < 1 for h in hidden):
            raise ManifestError(f"hidden={hidden} does not fit kind={kind!r}")
        outputs = 1 if kind == "logistic" or regression else n_classes
        widths = [n_features, *hidden, outputs]
        entries: list[tuple[str, tuple[int, ...]]] = []
        for i in range(len(widths) - 1):
            entries.append((f"layer{i}.weight", (widths[i], widths[i + 1])))
            entries.append((f"layer{i}.bias", (widths[i + 1],)))
        spec = {
            "engine": "numpy",
            "kind": kind,
            "n_features": n_features,
            "n_classes": n_classes,
            "hidden": list(hidden),
            "activation": activation,
        }
        if regression:  # only then: classification manifests (and hashes) stay as they were
            spec["head"] = "regression"
        return Manifest.from_shapes(entries, spec)

    @classmethod
    def create(
        cls,
        kind: str,
        n_features: int,
        n_classes: int,
        hidden: tuple[int, ...] = (),
        activation: str = "tanh",
        seed: int = 0,
        head: str = "classification",
    ) -> NumpyTrainer:
        """Build a model with Glorot-uniform weights and zero biases.

        Parameters
        ----------
        kind, n_features, n_classes, hidden, activation, head
            See :meth:`build_manifest`.
        seed : int
            Seed of the (non-privacy) initialisation generator.

        Returns
        -------
        NumpyTrainer
            The initialised trainer.
        """
        manifest = cls.build_manifest(kind, n_features, n_classes, hidden, activation, head)
        trainer = cls(manifest)
        rng = np.random.default_rng(seed)
        for name, view in manifest.unflatten(trainer._vec).items():
            if name.endswith(".weight"):
                limit = math.sqrt(6.0 / (view.shape[0] + view.shape[1]))
                view[...] = rng.uniform(-limit, limit, size=view.shape)
        return trainer

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, weights: NDArray[np.float32] | None = None
    ) -> NumpyTrainer:
        """Rebuild a trainer from a manifest (and optionally weights).

        Parameters
        ----------
        manifest : Manifest
            Manifest with a numpy spec.
        weights : numpy.ndarray, optional
            Flat vector.

        Returns
        -------
        NumpyTrainer
            The trainer.
        """
        return cls(manifest, weights)

    @property
    def manifest(self) -> Manifest:
        """Names and shapes of the flat parameter vector."""
        return self._manifest

    @property
    def head(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "regression" if self._regression else "classification"

    def get_weights(self) -> NDArray[np.float32]:
        """Return a copy of the flat parameter vector.

        Returns
        -------
        numpy.ndarray
            1-D float32.
        """
        out: NDArray[np.float32] = self._vec.copy()
        return out

    def set_weights(self, vector: NDArray[np.float32]) -> None:
        """Replace the parameters.

        Parameters
        ----------
        vector : numpy.ndarray
            1-D float32 vector of ``manifest.size`` finite values (copied).
        """
        self._manifest.check_vector(vector)
        if not np.isfinite(vector).all():
            raise ManifestError("weights contain NaN or Inf", code="non_finite")
        self._vec[...] = vector

    def momentum_buffer(self) -> NDArray[np.float32] | None:
        """Return a copy of the local momentum buffer left by the last :meth:`fit`, or ``None``.

        Returns
        -------
        numpy.ndarray or None
            Flat float32 buffer in the manifest's order; ``None`` before any fit with
            momentum (or after one with ``momentum_restart``, which starts from zero anyway).
        """
        return None if self._velocity is None else self._velocity.copy()

    def set_momentum_buffer(self, buffer: NDArray[np.float32] | None) -> None:
        """Replace the momentum buffer a ``momentum_restart = False`` fit continues from.

        Parameters
        ----------
        buffer : numpy.ndarray or None
            Flat float32 vector of ``manifest.size`` finite values (copied), or ``None``
            (start the next fit from zero).
        """
        if buffer is None:
            self._velocity = None
            return
        self._manifest.check_vector(buffer)
        if not np.isfinite(buffer).all():
            raise ManifestError("momentum buffer contains NaN or Inf", code="non_finite")
        self._velocity = np.array(buffer, dtype=np.float32, copy=True)

    def _params(self, vec: NDArray[np.float32]) -> list[tuple[NDArray[Any], NDArray[Any]]]:
        views = self._manifest.unflatten(vec)
        return [(views[f"layer{i}.weight"], views[f"layer{i}.bias"]) for i in range(self._n_layers)]

    def _forward(self, x: NDArray[np.float32]) -> tuple[list[NDArray[Any]], list[NDArray[Any]]]:
        """Return the layer inputs and pre-activations; the last pre-activation is the logits."""
        inputs: list[NDArray[Any]] = []
        pre: list[NDArray[Any]] = []
        a: NDArray[Any] = x
        params = self._params(self._vec)
        for i, (w, b) in enumerate(params):
            inputs.append(a)
            z = a @ w + b
            pre.append(z)
            if i < len(params) - 1:
                a = np.tanh(z) if self._activation == "tanh" else np.maximum(z, 0)
        return inputs, pre

    def _loss_and_dlogits(
        self, logits: NDArray[Any], y: NDArray[Any]
    ) -> tuple[NDArray[Any], NDArray[Any]]:
        """Per-example loss and d(loss_i)/d(logits_i)."""
        if self._regression:  # squared error (f(x) - y)^2
            r = logits[:, 0] - y
            return r * r, (2.0 * r)[:, None].astype(np.float32)
        if self._kind == "logistic":
            z = logits[:, 0]
            loss = np.logaddexp(0.0, z) - y * z
            p = 1.0 / (1.0 + np.exp(-z))
            return loss, (p - y)[:, None].astype(np.float32)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        loss = log_norm - shifted[np.arange(len(y)), y]
        probs = np.exp(shifted - log_norm[:, None])
        probs[np.arange(len(y)), y] -= 1.0
        return loss, probs.astype(np.float32)

    def _backward(
        self, x: NDArray[np.float32], y: NDArray[Any], per_sample: bool
    ) -> tuple[float, NDArray[np.float32]]:
        inputs, pre = self._forward(x)
        loss, dz = self._loss_and_dlogits(pre[-1], y)
        n = x.shape[0]
        shape = (n, self._manifest.size) if per_sample else (self._manifest.size,)
        grad = np.empty(shape, dtype=np.float32)
        offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for t in self._manifest.tensors:
            offsets[t.name] = (off, off + t.size)
            off += t.size
        params = self._params(self._vec)
        for i in range(self._n_layers - 1, -1, -1):
            a = inputs[i]
            w_lo, w_hi = offsets[f"layer{i}.weight"]
            b_lo, b_hi = offsets[f"layer{i}.bias"]
            if per_sample:
                grad[:, w_lo:w_hi] = np.einsum("bi,bo->bio", a, dz).reshape(n, -1)
                grad[:, b_lo:b_hi] = dz
            else:
                grad[w_lo:w_hi] = (a.T @ dz).reshape(-1) / n
                grad[b_lo:b_hi] = dz.sum(axis=0) / n
            if i > 0:
                da = dz @ params[i][0].T
                z = pre[i - 1]
                deriv = 1.0 - np.tanh(z) ** 2 if self._activation == "tanh" else (z > 0)
                dz = (da * deriv).astype(np.float32)
        return float(loss.mean()), grad

    def loss_and_gradient(
        self, x: NDArray[np.float32], y: NDArray[np.int64]
    ) -> tuple[float, NDArray[np.float32]]:
        """Mean loss and its gradient with respect to the flat vector.

        Parameters
        ----------
        x : numpy.ndarray
            ``(n, n_features)`` inputs.
        y : numpy.ndarray
            ``(n,)`` integer labels.

        Returns
        -------
        loss : float
            Mean cross-entropy.
        gradient : numpy.ndarray
            1-D float32, same layout as the weights.
        """
        xf, yi = self._xy(x, y)
        return self._backward(xf, yi, per_sample=False)

    def per_sample_gradients(
        self, x: NDArray[np.float32], y: NDArray[np.int64]
    ) -> NDArray[np.float32]:
        """Exact gradient of each example's loss, one row per example.

        Parameters
        ----------
        x : numpy.ndarray
            ``(n, n_features)`` inputs.
        y : numpy.ndarray
            ``(n,)`` integer labels.

        Returns
        -------
        numpy.ndarray
            C-contiguous ``(n, manifest.size)`` float32 matrix (ready for
            :func:`confide.clip_rows`); its mean over rows is the batch gradient.
        """
        xf, yi = self._xy(x, y)
        return self._backward(xf, yi, per_sample=True)[1]

    def predict_proba(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Class probabilities, shape ``(n, n_classes)``.

        Parameters
        ----------
        x : numpy.ndarray
            ``(n, n_features)`` inputs.

        Returns
        -------
        numpy.ndarray
            Rows sum to one.
        """
        if self._regression:
            raise ConfigError("a regression model has no class probabilities; use predict")
        xf, _ = _check_xy(x, np.zeros(len(x), np.int64), self._n_features, self._n_classes)
        logits = self._forward(xf)[1][-1]
        if self._kind == "logistic":
            p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs: NDArray[np.float32] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return probs

    def predict(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """Predictions: the class (classification) or the real-valued output (regression).

        Parameters
        ----------
        x : numpy.ndarray
            ``(n, n_features)`` inputs.

        Returns
        -------
        numpy.ndarray
            ``(n,)`` float32 outputs (regression) or int64 classes as float32.

        Examples
        --------
        >>> t = NumpyTrainer.create("linear", n_features=2, n_classes=1)
        >>> t.set_weights(np.array([1.0, 2.0, 0.5], np.float32))
        >>> t.predict(np.array([[1.0, 1.0]], np.float32)).tolist()
        [3.5]
        """
        xf, _ = self._xy(x, np.zeros(len(x), np.int64))
        logits = self._forward(xf)[1][-1]
        out: NDArray[np.float32]
        if self._regression:
            out = logits[:, 0].astype(np.float32)
        elif self._kind == "logistic":
            out = (logits[:, 0] > 0).astype(np.float32)
        else:
            out = logits.argmax(axis=1).astype(np.float32)
        return out

    def _xy(self, x: NDArray[Any], y: NDArray[Any]) -> tuple[NDArray[np.float32], NDArray[Any]]:
        if self._regression:
            return _check_regression_xy(x, y, self._n_features)
        return _check_xy(x, y, self._n_features, self._n_classes)

    @property
    def per_sample_chunk(self) -> int:
        """Records per :meth:`per_sample_gradients` call in DP-SGD (bounds peak memory)."""
        return max(1, (1 << 24) // max(1, self._manifest.size))

    def _arrays(self, data: SiteData) -> tuple[NDArray[np.float32], NDArray[Any]]:
        if not isinstance(data, SiteData):
            raise DataError(
                f"expected a SiteData (e.g. confide.data.Dataset), got {type(data).__name__}"
            )
        x, y = data.batch(np.arange(len(data), dtype=np.int64))
        return self._xy(x, y)

    def fit(self, data: SiteData, config: TrainConfig, seed: int) -> FitResult:
        """Mini-batch SGD over ``data`` (without DP).

        Parameters
        ----------
        data : SiteData
            Local records (e.g. :class:`confide.data.Dataset`).
        config : TrainConfig
            Epochs, batch size, learning rate, and ``proximal_mu`` (FedProx: the gradient of
            ``mu/2 ||w - w0||^2`` is added at every step, ``w0`` the weights ``fit`` starts
            from; the reported loss is the data loss only). ``config.dp`` must be ``None``:
            DP-SGD runs through :func:`confide.privacy.run_dpsgd`, which uses this engine's
            per-sample gradients. ``momentum`` > 0 trains heavy-ball SGD (``v = m v + g``,
            ``w -= lr v``); the buffer starts from zero unless ``momentum_restart`` is false,
            then from :meth:`momentum_buffer` of the previous fit (or
            :meth:`set_momentum_buffer`).
        seed : int
            Seeds the shuffling (``numpy.random.default_rng``; it protects no secret).

        Returns
        -------
        FitResult
            Examples, last-epoch mean loss, steps.
        """
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.dp is not None:
            raise PrivacyUnsupportedError(
                "NumpyTrainer.fit trains without DP; run a DP-SGD config through "
                "confide.privacy.run_dpsgd(trainer, data, config)"
            )
        xf, yi = self._arrays(data)
        shuffler = np.random.default_rng(seed)
        n = xf.shape[0]
        steps = 0
        epoch_loss = 0.0
        mu = np.float32(config.proximal_mu)
        anchor = self._vec.copy()  # w_global: the round's model, set before fit
        m = np.float32(config.momentum)
        velocity: NDArray[np.float32] | None = None
        if m > 0:
            keep = not config.momentum_restart and self._velocity is not None
            velocity = (
                self._velocity.copy()
                if keep and self._velocity is not None
                else np.zeros_like(self._vec)
            )
        for _ in range(config.epochs):
            order = shuffler.permutation(n)
            total = 0.0
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                loss, grad = self._backward(xf[idx], yi[idx], per_sample=False)
                if mu > 0:  # FedProx: grad of mu/2 ||w - w_global||^2 (mu = 0: FedAvg's bits)
                    grad = grad + mu * (self._vec - anchor)
                if velocity is not None:  # heavy ball, as torch.optim.SGD (no dampening)
                    velocity *= m
                    velocity += grad
                    grad = velocity
                self._vec -= np.float32(config.learning_rate) * grad
                total += loss * len(idx)
                steps += 1
            epoch_loss = total / n
        if not np.isfinite(self._vec).all():
            raise ManifestError("training diverged: weights became NaN or Inf", code="non_finite")
        if velocity is not None:
            self._velocity = velocity
        return FitResult(num_examples=n, loss=epoch_loss, num_steps=steps)

    def evaluate(self, data: SiteData) -> dict[str, float]:
        """Mean loss and accuracy on ``data``.

        Parameters
        ----------
        data : SiteData
            Records to evaluate on (e.g. :class:`confide.data.Dataset`).

        Returns
        -------
        dict of str to float
            ``loss``, ``accuracy`` and ``num_examples``; for the regression head ``loss``
            and ``mse`` (mean squared error), ``r2`` (``1 - SSE / SST`` on ``data``, NaN
            when the targets are constant), ``accuracy`` NaN (not reported) and
            ``num_examples``.
        """
        xf, yi = self._arrays(data)
        _, pre = self._forward(xf)
        loss, _ = self._loss_and_dlogits(pre[-1], yi)
        if self._regression:
            mse = float(loss.astype(np.float64).mean())
            y64 = yi.astype(np.float64)
            sst = float(((y64 - y64.mean()) ** 2).sum())
            sse = float(loss.astype(np.float64).sum())
            return {
                "loss": mse,
                "mse": mse,
                "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
                "accuracy": float("nan"),
                "num_examples": float(len(yi)),
            }
        logits = pre[-1]
        pred = (logits[:, 0] > 0).astype(np.int64) if self._kind == "logistic" else logits.argmax(1)
        return {
            "loss": float(loss.mean()),
            "accuracy": float((pred == yi).mean()),
            "num_examples": float(len(yi)),
        }
