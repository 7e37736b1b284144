"""On-device learning, the light default: a frozen backbone and a small trained head.

A patient's device cannot train a CNN, but it can run one. The released model's backbone
(an ONNX model run by ONNX Runtime, frozen) turns each image into a feature vector once;
the features are cached per image, and a small head (logistic, softmax or MLP:
:class:`confide.training.numpy_engine.NumpyTrainer`) is trained on them with exact
per-sample gradients and patient-level DP-SGD (:func:`train_head`, which runs
:func:`confide.privacy.run_dpsgd`). The device is then one more client of a federated
round with few records.

On a device every record belongs to its owner, so :func:`device_dataset` gives them all
one patient id: DP-SGD then samples and clips the owner's records *together*, which is
patient-level DP per device owner, whatever the number of images.

Examples
--------
>>> import numpy as np
>>> cache = FeatureCache()
>>> image = np.zeros((3, 8, 8), np.float32)
>>> key = cache.key("backbone-sha", image)
>>> cache.get(key) is None
True
>>> cache.put(key, np.ones(4, np.float32))
>>> cache.get(key).tolist()
[1.0, 1.0, 1.0, 1.0]
>>> data = device_dataset(np.ones((3, 4), np.float32), np.array([0, 1, 0]))
>>> sorted(set(data.patient_ids.tolist()))
['device-owner']
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide._fsio import write_atomic
from confide.data import Dataset
from confide.errors import ConfigError, DataError, ShapeError
from confide.inference.model import LocalModel
from confide.noise import SecureRng
from confide.training.base import FitResult, SiteData, TrainConfig, Trainer

__all__ = ["FeatureCache", "FeatureExtractor", "device_dataset", "train_head"]

_KEY_RE = re.compile(r"[0-9a-f]{64}")


class FeatureCache:
    """Features per image, keyed by the backbone and the image's pixels.

    In memory (a bounded LRU) and optionally on disk, one ``.npy`` file per image written
    without pickle, so an image seen in an earlier round is not run through the backbone
    again.

    Parameters
    ----------
    directory : str or Path, optional
        Where to persist features (created with mode 0700: features are derived from the
        patient's images and stay on the device).
    max_items : int, default 4096
        Entries kept in memory.
    """

    def __init__(self, directory: str | Path | None = None, max_items: int = 4096) -> None:
        if not isinstance(max_items, int) or max_items < 1:
            raise ConfigError(f"max_items must be an int >= 1, got {max_items!r}")
        self._dir = None if directory is None else Path(directory)
        if self._dir is not None:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._mem: OrderedDict[str, NDArray[np.float32]] = OrderedDict()
        self._max = max_items
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(backbone_sha256: str, image: NDArray[Any]) -> str:
        """Return the cache key of one preprocessed image under one backbone.

        Parameters
        ----------
        backbone_sha256 : str
            Hex SHA-256 of the backbone model (:attr:`LocalModel.sha256`).
        image : numpy.ndarray
            The preprocessed image, as it is fed to the backbone.

        Returns
        -------
        str
            Hex SHA-256 over the backbone hash, the shape and the float32 pixels.
        """
        arr = np.ascontiguousarray(image, dtype=np.float32)
        h = hashlib.sha256()
        h.update(backbone_sha256.encode() + b"\n" + repr(arr.shape).encode() + b"\n")
        h.update(arr.tobytes())
        return h.hexdigest()

    def get(self, key: str) -> NDArray[np.float32] | None:
        """Return the cached features of ``key``, or ``None``."""
        with self._lock:
            hit = self._mem.get(key)
            if hit is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return hit
        if self._dir is not None and _KEY_RE.fullmatch(key):
            path = self._dir / f"{key}.npy"
            if path.exists():
                value: NDArray[np.float32] | None
                try:
                    value = np.load(path, allow_pickle=False)
                except (OSError, ValueError):
                    value = None  # a torn or corrupt file is recomputed, never trusted
                if value is not None and value.dtype == np.float32 and value.ndim == 1:
                    self._remember(key, value)
                    with self._lock:
                        self.hits += 1
                    return value
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, features: NDArray[np.float32]) -> None:
        """Store the 1-D float32 features of ``key``."""
        value = np.ascontiguousarray(features, dtype=np.float32).reshape(-1)
        self._remember(key, value)
        if self._dir is not None and _KEY_RE.fullmatch(key):
            path = self._dir / f"{key}.npy"
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            write_atomic(path, buf.getbuffer(), fsync=False)  # a cache: see get

    def _remember(self, key: str, value: NDArray[np.float32]) -> None:
        with self._lock:
            self._mem[key] = value
            self._mem.move_to_end(key)
            while len(self._mem) > self._max:
                self._mem.popitem(last=False)


class FeatureExtractor:
    """A frozen backbone: one output of a :class:`LocalModel` used as features.

    Parameters
    ----------
    model : LocalModel
        The released model (or a backbone-only model).
    output : str, default "features"
        The model output that holds ``(N, d)`` features.
    batch_size : int, default 8
        Images per backbone call (bounds peak memory at 224x224: one float32 image is
        0.6 MB).
    cache : FeatureCache, optional
        Where features are looked up before running the backbone.
    """

    def __init__(
        self,
        model: LocalModel,
        output: str = "features",
        batch_size: int = 8,
        cache: FeatureCache | None = None,
    ) -> None:
        if output not in model.output_names:
            raise ConfigError(f"model has no output {output!r}; it has {model.output_names}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        info = next(o for o in model.outputs if o.name == output)
        if len(info.shape) != 2:
            raise ConfigError(f"output {output!r} must be (N, d) features, got {info.describe()}")
        self.model = model
        self.output = output
        self.batch_size = batch_size
        self.cache = cache
        self.dim: int | None = info.shape[1]

    def __call__(self, images: NDArray[Any]) -> NDArray[np.float32]:
        """Return the ``(n, d)`` float32 features of a stack of preprocessed images.

        Parameters
        ----------
        images : numpy.ndarray
            ``(n, *image_shape)`` as the model's input.

        Returns
        -------
        numpy.ndarray
            One feature row per image.
        """
        if not isinstance(images, np.ndarray) or images.ndim < 1 or len(images) == 0:
            raise ShapeError("images must be a non-empty numpy array, one image per row")
        n = len(images)
        rows: list[NDArray[np.float32] | None] = [None] * n
        keys = [""] * n
        todo: list[int] = []
        for i in range(n):
            if self.cache is not None:
                keys[i] = self.cache.key(self.model.sha256, images[i])
                rows[i] = self.cache.get(keys[i])
            if rows[i] is None:
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            feats = self.model.run(images[idx], [self.output])[self.output]
            feats = np.asarray(feats, np.float32)
            for j, i in enumerate(idx):
                row = feats[j].copy()
                rows[i] = row
                if self.cache is not None:
                    self.cache.put(keys[i], row)
        out = np.stack([r for r in rows if r is not None]).astype(np.float32, copy=False)
        if self.dim is None:
            self.dim = int(out.shape[1])
        if not np.isfinite(out).all():
            raise DataError("the backbone produced NaN or Inf features")
        return out


def device_dataset(
    features: NDArray[np.float32],
    labels: NDArray[np.integer[Any]],
    owner: str = "device-owner",
) -> Dataset:
    """Wrap a device's features as a :class:`confide.data.Dataset` of one patient.

    Parameters
    ----------
    features : numpy.ndarray
        ``(n, d)`` float32 features.
    labels : numpy.ndarray
        ``(n,)`` integer labels.
    owner : str, default "device-owner"
        The patient id given to every record (only its equality matters).

    Returns
    -------
    Dataset
        Records whose ``patient_ids`` are all ``owner``.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    y = np.asarray(labels).astype(np.int64)
    return Dataset(x, y, patient_ids=np.full(len(y), owner))


def train_head(
    trainer: Trainer,
    data: SiteData,
    config: TrainConfig,
    *,
    seed: int = 0,
    rng: SecureRng | None = None,
) -> FitResult:
    """Train a head on features: patient-level DP-SGD when ``config.dp`` is set.

    The same local step a federated round runs
    (:func:`confide.client.training.fit_round`): a DP config goes through
    :func:`confide.privacy.run_dpsgd` on the head's exact per-sample gradients, so the
    engine cannot skip clipping and noise; without ``dp`` the engine's own ``fit`` runs.

    Parameters
    ----------
    trainer : Trainer
        The head, e.g. :class:`confide.training.numpy_engine.NumpyTrainer`.
    data : SiteData
        Features and labels, e.g. from :func:`device_dataset`.
    config : TrainConfig
        Local training; ``config.dp`` selects DP-SGD.
    seed : int, default 0
        Batch order without DP (protects nothing).
    rng : SecureRng, optional
        DP-SGD sampling and noise (tests only; OS-keyed when omitted).

    Returns
    -------
    FitResult
        What the round did.

    Examples
    --------
    >>> import numpy as np
    >>> from confide.training.base import DPSGDConfig, TrainConfig
    >>> from confide.training.numpy_engine import NumpyTrainer
    >>> feats = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    >>> data = device_dataset(feats, (feats[:, 0] > 0).astype(np.int64))
    >>> head = NumpyTrainer.create("softmax", n_features=4, n_classes=2, seed=0)
    >>> before = head.get_weights()
    >>> dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=1.0, steps=3)
    >>> result = train_head(head, data, TrainConfig(learning_rate=0.5, dp=dp),
    ...                     rng=SecureRng(bytes(32)))
    >>> result.num_steps, bool((head.get_weights() != before).any())
    (3, True)
    """
    from confide.client.training import fit_round

    return fit_round(trainer, data, config, seed, rng=rng)
