"""A site's local momentum buffer across rounds (``TrainConfig.momentum_restart = False``).

With ``momentum_restart = True`` (the default) every round's local training starts from a
zero momentum buffer, and nothing here does anything. With ``False`` the site keeps its
heavy-ball buffer from round to round, as the Clara FL momentum study did: the engine holds
it in memory between fits (``momentum_buffer`` / ``set_momentum_buffer``), and this module
writes it to the site's state folder after each fit and reads it back before the next one,
so a restarted client continues with the buffer it had.

The file is ``momentum-<manifest sha256[:16]>.npy``: plain ``numpy.save`` with
``allow_pickle=False`` (no pickle is ever read), written to a temporary name and renamed, so
a crash leaves the old buffer or the new one, never half of one. A buffer of another model
(another manifest) is never loaded. An engine without the two methods cannot keep momentum:
such a task is refused with :class:`~confide.errors.ConfigError` before anything is trained.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide._fsio import write_atomic
from confide.errors import ConfigError
from confide.training.base import TrainConfig, Trainer

__all__ = ["momentum_path", "persist_momentum", "restore_momentum"]


def _keeps(config: TrainConfig) -> bool:
    return config.momentum > 0 and not config.momentum_restart


def momentum_path(state_dir: str | Path, trainer: Trainer) -> Path:
    """Return where the site keeps ``trainer``'s momentum buffer.

    Parameters
    ----------
    state_dir : str or Path
        The client's state folder.
    trainer : Trainer
        The local engine (its manifest names the file).

    Returns
    -------
    Path
        ``state_dir / "momentum-<sha16>.npy"``.
    """
    return Path(state_dir) / f"momentum-{trainer.manifest.sha256[:16]}.npy"


def restore_momentum(trainer: Trainer, config: TrainConfig, state_dir: str | Path) -> None:
    """Before a fit: reload the persisted buffer when the task keeps momentum across rounds.

    A buffer already in the engine (this process trained before) wins over the file; the
    file only matters after a restart.

    Raises
    ------
    ConfigError
        The task keeps momentum and the engine has no ``momentum_buffer`` /
        ``set_momentum_buffer`` (it could not honour it).
    """
    if not _keeps(config):
        return
    get = getattr(trainer, "momentum_buffer", None)
    put = getattr(trainer, "set_momentum_buffer", None)
    if not (callable(get) and callable(put)):
        raise ConfigError(
            f"this round keeps local momentum across rounds (momentum_restart = false), but "
            f"{type(trainer).__name__} has no momentum_buffer/set_momentum_buffer; the round "
            "is refused and nothing is uploaded. Use NumpyTrainer or TorchTrainer"
        )
    if get() is not None:
        return
    path = momentum_path(state_dir, trainer)
    if path.exists():
        buffer: NDArray[Any] = np.load(path, allow_pickle=False)
        put(np.ascontiguousarray(buffer, dtype=np.float32))


def persist_momentum(trainer: Trainer, config: TrainConfig, state_dir: str | Path) -> None:
    """After a fit: write the engine's buffer to the state folder (atomic rename)."""
    if not _keeps(config):
        return
    get = getattr(trainer, "momentum_buffer", None)
    buffer = get() if callable(get) else None
    if buffer is None:
        return
    save_vector(momentum_path(state_dir, trainer), buffer)


def save_vector(path: Path, vec: NDArray[Any]) -> None:
    """Write a float32 vector as ``.npy`` (no pickle): temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    buf = io.BytesIO()
    np.save(buf, np.asarray(vec, dtype=np.float32), allow_pickle=False)
    write_atomic(path, buf.getbuffer())
