"""A site's side of partial model sharing (:mod:`confide.protocol.sharing`).

Start from the global model on the subset and the local one elsewhere; upload only the
shared coordinates.

A task with ``config.share_fraction < 1`` names the round's public selection seed. The site

1. derives the round's shared indices (the same on every site and on the server);
2. starts training from the announced model on those indices and from **its own model after
   its previous round** everywhere else (:func:`~confide.protocol.sharing.local_start`); the
   first round, or a site that lost its state, starts from the announced model;
3. trains as usual, then writes the model it ends with to its state folder
   (``local-model-<manifest sha256[:16]>.npy``, ``numpy.save`` with ``allow_pickle=False``,
   atomic rename), so the unshared values survive a restart;
4. uploads the shared coordinates of ``w_after - w_start``, norm-bounded / clipped **after**
   selection (``update_clip_norm`` bounds what is released), encoded with
   :func:`~confide.protocol.sharing.shared_manifest` (plain), or masked with the subset's
   length (SecAgg+).

With ``share_fraction = 1`` (the default) this is exactly
:func:`confide.client.training.train_delta` (plus the momentum buffer of
:mod:`confide.client.momentum`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from confide.client.momentum import persist_momentum, restore_momentum, save_vector
from confide.client.training import bound_update, fit_round
from confide.protocol.manifest import Manifest
from confide.protocol.sharing import (
    local_start,
    select,
    shared_indices,
    shared_manifest,
)
from confide.training.base import SiteData, TrainConfig, Trainer

__all__ = ["local_model_path", "shared_index", "train_round_delta", "upload_manifest"]


def shared_index(config: TrainConfig, size: int) -> NDArray[np.int64] | None:
    """Return the round's shared indices, or ``None`` when the whole model is shared."""
    if config.share_fraction >= 1.0 or config.share_seed is None:
        return None
    return shared_indices(config.share_seed, size, config.share_fraction)


def upload_manifest(manifest: Manifest, config: TrainConfig) -> Manifest:
    """Return the manifest a plain upload is encoded with (the model's, or the subset's)."""
    index = shared_index(config, manifest.size)
    return manifest if index is None else shared_manifest(len(index))


def local_model_path(state_dir: str | Path, trainer: Trainer) -> Path:
    """Where the site keeps its own model between partially shared rounds."""
    return Path(state_dir) / f"local-model-{trainer.manifest.sha256[:16]}.npy"


def _load_local(state_dir: str | Path, trainer: Trainer) -> NDArray[np.float32] | None:
    path = local_model_path(state_dir, trainer)
    if not path.exists():
        return None
    vec = np.load(path, allow_pickle=False)
    if vec.shape != (trainer.manifest.size,) or not np.isfinite(vec).all():
        return None  # not this model's, or damaged: start from the global model
    return np.ascontiguousarray(vec, dtype=np.float32)


def _save_local(state_dir: str | Path, trainer: Trainer, vec: NDArray[np.float32]) -> None:
    save_vector(local_model_path(state_dir, trainer), vec)


def train_round_delta(
    trainer: Trainer,
    weights: NDArray[np.float32],
    data: SiteData,
    config: TrainConfig,
    seed: int,
    state_dir: str | Path,
) -> tuple[NDArray[np.float32], int, float]:
    """Train one round (worker thread); return ``(upload delta, num_examples, loss)``.

    The delta is full-length and norm-bounded with full sharing, else the shared coordinates
    only (bounded after selection). The momentum buffer is restored and persisted as
    :mod:`confide.client.momentum` says.

    Parameters
    ----------
    trainer : Trainer
        The local engine (its weights are overwritten).
    weights : numpy.ndarray
        The announced (global) model.
    data : SiteData
        Local training data.
    config : TrainConfig
        The task's training config.
    seed : int
        Training seed (no secret).
    state_dir : str or Path
        The client's state folder.

    Returns
    -------
    tuple
        The delta to upload or mask, the number of examples and the final training loss.
    """
    index = shared_index(config, trainer.manifest.size)
    start = (
        weights if index is None else local_start(weights, _load_local(state_dir, trainer), index)
    )
    trainer.set_weights(start)
    restore_momentum(trainer, config, state_dir)
    result = fit_round(trainer, data, config, seed)
    persist_momentum(trainer, config, state_dir)
    after = trainer.get_weights()
    delta = (after - start).astype(np.float32)
    if index is not None:
        _save_local(state_dir, trainer, after)
        delta = select(delta, index)
    return bound_update(delta, config), int(result.num_examples), float(result.loss)
