"""Training engines behind one interface: a flat float32 vector plus a named manifest.

:class:`Trainer` is the protocol the federated client drives; it never sees layers, only
``get_weights``/``set_weights`` on the flat vector described by ``manifest``, ``fit`` and
``evaluate``. :class:`NumpyTrainer` is the first engine: dense models in numpy (binary logistic
regression, softmax regression and small MLPs with tanh or ReLU), trained by mini-batch SGD,
with exact per-sample gradients (:meth:`NumpyTrainer.per_sample_gradients`) for DP-SGD.

Patient-level DP-SGD: when ``TrainConfig.dp`` is set (a :class:`DPSGDConfig`, shipped by the
server with the round task), :meth:`NumpyTrainer.fit` runs ``dp.steps`` steps of
:class:`confide.privacy.DPSGD`: Poisson sampling of *patients* with rate ``q`` (uniforms
from :class:`confide.SecureRng`), exact per-record gradients summed per patient (the
``patient_ids`` argument; without it every row is its own patient), per-patient clipping to
``C`` by the Rust kernel, Gaussian noise ``z * C`` from the Rust core, normalisation by the
expected batch size ``q * n_patients`` and optional heavy-ball momentum. The training loss
of a DP run is not reported (``FitResult.loss`` is NaN): it would be an un-noised statistic
of the private data.

Parameters are named ``layer{i}.weight`` (shape ``(fan_in, fan_out)``) and ``layer{i}.bias``
(shape ``(fan_out,)``); the manifest's ``spec`` records the architecture so any site can
rebuild the model from the manifest alone (:meth:`NumpyTrainer.from_manifest`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from confide.federation_errors import ManifestError
from confide.manifest import Manifest
from confide.noise import SecureRng
from confide.privacy.dpsgd import DPSGD, poisson_sample_patients

__all__ = ["DPSGDConfig", "FitResult", "NumpyTrainer", "TrainConfig", "Trainer"]

_KINDS = ("logistic", "softmax", "mlp")
_ACTIVATIONS = ("tanh", "relu")


@dataclass(frozen=True)
class DPSGDConfig:
    """Patient-level DP-SGD parameters of one round's local training.

    The server derives them from the job's ``[privacy]`` section and accounts exactly this
    mechanism: ``steps`` compositions of the Poisson-subsampled Gaussian with rate
    ``sampling_rate`` and noise multiplier ``noise_multiplier``.

    Parameters
    ----------
    noise_multiplier : float
        ``z`` (>= 0); the sum of clipped per-patient gradients gets ``N(0, (z C)^2)``.
    clip_norm : float
        Per-patient L2 clip norm ``C`` (> 0).
    sampling_rate : float
        Poisson inclusion probability ``q`` of a patient at each step, in (0, 1].
    steps : int
        DP-SGD steps per round (>= 1).
    momentum : float, default 0.0
        Heavy-ball momentum in [0, 1) (post-processing).
    """

    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    steps: int
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm!r}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form sent with a training task."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "sampling_rate": self.sampling_rate,
            "steps": self.steps,
            "momentum": self.momentum,
        }


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters, sent by the server with each training task.

    Parameters
    ----------
    epochs : int
        Passes over the local data (>= 1).
    batch_size : int
        Mini-batch size (>= 1).
    learning_rate : float
        SGD step size (finite, > 0).
    dp : DPSGDConfig, optional
        Patient-level DP-SGD; ``None`` (default) trains without DP (``epochs`` and
        ``batch_size`` are then used; with DP, ``dp.steps`` and ``dp.sampling_rate``).
    """

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    dp: DPSGDConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dp, dict):  # JSON form, as a task carries it
            object.__setattr__(self, "dp", DPSGDConfig(**self.dp))
        self._validate()

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TrainConfig:
        """Build a config from its JSON form (a task's ``config``).

        Parameters
        ----------
        doc : dict
            ``epochs``, ``batch_size``, ``learning_rate`` and optionally ``dp`` (a dict of
            :class:`DPSGDConfig` fields, or ``None``).

        Returns
        -------
        TrainConfig
            The validated config.
        """
        fields = dict(doc)
        dp = fields.pop("dp", None)
        return cls(**fields, dp=None if dp is None else DPSGDConfig(**dp))

    def _validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate!r}")


@dataclass(frozen=True)
class FitResult:
    """What one call to ``fit`` did.

    Parameters
    ----------
    num_examples : int
        Local training examples (the FedAvg weight).
    loss : float
        Mean training loss over the last epoch.
    num_steps : int
        SGD steps taken.
    """

    num_examples: int
    loss: float
    num_steps: int


@runtime_checkable
class Trainer(Protocol):
    """What the federated client needs from a training engine."""

    @property
    def manifest(self) -> Manifest:
        """Names and shapes of the flat parameter vector."""
        ...

    def get_weights(self) -> NDArray[np.float32]:
        """Return a copy of the flat parameter vector."""
        ...

    def set_weights(self, vector: NDArray[np.float32]) -> None:
        """Replace the parameters with ``vector`` (copied)."""
        ...

    def fit(
        self,
        x: NDArray[np.float32],
        y: NDArray[np.int64],
        config: TrainConfig,
        seed: int,
        *,
        patient_ids: NDArray[Any] | None = None,
    ) -> FitResult:
        """Train locally on ``(x, y)``; ``seed`` fixes the batch order.

        ``patient_ids`` (one per row) groups records by patient for patient-level DP-SGD.
        """
        ...

    def evaluate(self, x: NDArray[np.float32], y: NDArray[np.int64]) -> dict[str, float]:
        """Return at least ``loss``, ``accuracy`` and ``num_examples`` on ``(x, y)``."""
        ...


def _check_xy(
    x: NDArray[Any], y: NDArray[Any], n_features: int, n_classes: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"x must have shape (n, {n_features}), got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},), got {y.shape}")
    if x.shape[0] == 0:
        raise ValueError("x and y must hold at least one example")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got [{y.min()}, {y.max()}]")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        raise ValueError("x contains NaN or Inf")
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
    >>> t = NumpyTrainer.create("logistic", n_features=3, n_classes=2, seed=0)
    >>> _ = t.fit(x, y, TrainConfig(epochs=20, batch_size=16, learning_rate=0.5), seed=1)
    >>> t.evaluate(x, y)["accuracy"] > 0.9
    True
    >>> t.per_sample_gradients(x[:5], y[:5]).shape
    (5, 4)
    """

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
        )
        if expected != manifest:
            raise ManifestError("manifest tensors do not match its numpy spec")
        self._manifest = manifest
        self._kind: str = spec["kind"]
        self._n_features = int(spec["n_features"])
        self._n_classes = int(spec["n_classes"])
        self._activation = str(spec.get("activation", "tanh"))
        self._n_layers = len(manifest.tensors) // 2
        self._vec = np.zeros(manifest.size, dtype=np.float32)
        if weights is not None:
            self.set_weights(weights)

    @staticmethod
    def build_manifest(
        kind: str,
        n_features: int,
        n_classes: int,
        hidden: tuple[int, ...] = (),
        activation: str = "tanh",
    ) -> Manifest:
        """Return the manifest of a numpy model.

        Parameters
        ----------
        kind : {"logistic", "softmax", "mlp"}
            Binary logistic regression (one sigmoid output), softmax regression, or an MLP
            with softmax output.
        n_features : int
            Input width (>= 1).
        n_classes : int
            Number of classes (2 for ``logistic``; >= 2 otherwise).
        hidden : tuple of int
            Hidden layer widths; must be empty unless ``kind == "mlp"`` (then non-empty).
        activation : {"tanh", "relu"}
            Hidden activation.

        Returns
        -------
        Manifest
            Names, shapes and spec.
        """
        if kind not in _KINDS:
            raise ManifestError(f"kind must be one of {_KINDS}, got {kind!r}")
        if activation not in _ACTIVATIONS:
            raise ManifestError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if n_features < 1 or n_classes < 2:
            raise ManifestError(
                f"need n_features >= 1 and n_classes >= 2, got {n_features}, {n_classes}"
            )
        if kind == "logistic" and n_classes != 2:
            raise ManifestError(f"logistic regression is binary, got n_classes={n_classes}")
        if (kind == "mlp") != bool(hidden) or any(h < 1 for h in hidden):
            raise ManifestError(f"hidden={hidden} does not fit kind={kind!r}")
        outputs = 1 if kind == "logistic" else n_classes
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
    ) -> NumpyTrainer:
        """Build a model with Glorot-uniform weights and zero biases.

        Parameters
        ----------
        kind, n_features, n_classes, hidden, activation
            See :meth:`build_manifest`.
        seed : int
            Seed of the (non-privacy) initialisation generator.

        Returns
        -------
        NumpyTrainer
            The initialised trainer.
        """
        manifest = cls.build_manifest(kind, n_features, n_classes, hidden, activation)
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
        self, logits: NDArray[Any], y: NDArray[np.int64]
    ) -> tuple[NDArray[Any], NDArray[Any]]:
        """Per-example loss and d(loss_i)/d(logits_i)."""
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
        self, x: NDArray[np.float32], y: NDArray[np.int64], per_sample: bool
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
        xf, yi = _check_xy(x, y, self._n_features, self._n_classes)
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
        xf, yi = _check_xy(x, y, self._n_features, self._n_classes)
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
        xf, _ = _check_xy(x, np.zeros(len(x), np.int64), self._n_features, self._n_classes)
        logits = self._forward(xf)[1][-1]
        if self._kind == "logistic":
            p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1).astype(np.float32)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs: NDArray[np.float32] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return probs

    def fit(
        self,
        x: NDArray[np.float32],
        y: NDArray[np.int64],
        config: TrainConfig,
        seed: int,
        *,
        patient_ids: NDArray[Any] | None = None,
        rng: SecureRng | None = None,
    ) -> FitResult:
        """Mini-batch SGD over ``(x, y)``, or patient-level DP-SGD when ``config.dp`` is set.

        Parameters
        ----------
        x : numpy.ndarray
            ``(n, n_features)`` inputs.
        y : numpy.ndarray
            ``(n,)`` integer labels.
        config : TrainConfig
            Epochs, batch size, learning rate; ``dp`` for DP-SGD.
        seed : int
            Seeds the shuffling (``numpy.random.default_rng``; it protects no secret).
            Unused by DP-SGD, whose sampling and noise come from ``rng``.
        patient_ids : numpy.ndarray, optional
            ``(n,)`` patient of each row (DP-SGD only): a patient's rows are sampled
            together and their gradients summed before clipping. Without it every row is
            its own patient.
        rng : SecureRng, optional
            DP-SGD sampling and noise generator; a fresh OS-keyed one by default (pass a
            seeded one in tests only).

        Returns
        -------
        FitResult
            Examples, last-epoch mean loss (NaN under DP), steps.
        """
        xf, yi = _check_xy(x, y, self._n_features, self._n_classes)
        if config.dp is not None:
            return self._fit_dpsgd(xf, yi, config, patient_ids, rng)
        if patient_ids is not None and np.asarray(patient_ids).shape != (xf.shape[0],):
            raise ValueError("patient_ids must hold one id per row")
        shuffler = np.random.default_rng(seed)
        n = xf.shape[0]
        steps = 0
        epoch_loss = 0.0
        for _ in range(config.epochs):
            order = shuffler.permutation(n)
            total = 0.0
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                loss, grad = self._backward(xf[idx], yi[idx], per_sample=False)
                self._vec -= np.float32(config.learning_rate) * grad
                total += loss * len(idx)
                steps += 1
            epoch_loss = total / n
        if not np.isfinite(self._vec).all():
            raise ManifestError("training diverged: weights became NaN or Inf", code="non_finite")
        return FitResult(num_examples=n, loss=epoch_loss, num_steps=steps)

    def _fit_dpsgd(
        self,
        xf: NDArray[np.float32],
        yi: NDArray[np.int64],
        config: TrainConfig,
        patient_ids: NDArray[Any] | None,
        rng: SecureRng | None,
    ) -> FitResult:
        """``config.dp.steps`` steps of patient-level DP-SGD (see the module docstring)."""
        dp = config.dp
        assert dp is not None
        n = xf.shape[0]
        ids = np.arange(n) if patient_ids is None else np.asarray(patient_ids)
        if ids.shape != (n,):
            raise ValueError(f"patient_ids must have shape ({n},), got {ids.shape}")
        n_patients = int(np.unique(ids).size)
        gen = rng if rng is not None else SecureRng()
        opt = DPSGD(
            clip_norm=dp.clip_norm,
            noise_multiplier=dp.noise_multiplier,
            expected_batch_size=dp.sampling_rate * n_patients,
            momentum=dp.momentum,
            rng=gen,
        )
        for _ in range(dp.steps):
            rows = poisson_sample_patients(ids, dp.sampling_rate, gen)
            if rows.size:
                grads = self._backward(xf[rows], yi[rows], per_sample=True)[1]
            else:  # an empty batch still takes a (pure-noise) step: it is accounted
                grads = np.zeros((0, self._manifest.size), dtype=np.float32)
            self._vec[...] = opt.step(self._vec, grads, config.learning_rate, ids[rows])
        if not np.isfinite(self._vec).all():
            raise ManifestError("training diverged: weights became NaN or Inf", code="non_finite")
        return FitResult(num_examples=n, loss=float("nan"), num_steps=dp.steps)

    def evaluate(self, x: NDArray[np.float32], y: NDArray[np.int64]) -> dict[str, float]:
        """Mean loss and accuracy on ``(x, y)``.

        Parameters
        ----------
        x : numpy.ndarray
            ``(n, n_features)`` inputs.
        y : numpy.ndarray
            ``(n,)`` integer labels.

        Returns
        -------
        dict of str to float
            ``loss``, ``accuracy`` and ``num_examples``.
        """
        xf, yi = _check_xy(x, y, self._n_features, self._n_classes)
        _, pre = self._forward(xf)
        loss, _ = self._loss_and_dlogits(pre[-1], yi)
        logits = pre[-1]
        pred = (logits[:, 0] > 0).astype(np.int64) if self._kind == "logistic" else logits.argmax(1)
        return {
            "loss": float(loss.mean()),
            "accuracy": float((pred == yi).mean()),
            "num_examples": float(len(yi)),
        }
