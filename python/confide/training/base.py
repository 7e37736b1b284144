"""The contract between training engines and the federated machinery.

One flat float32 parameter vector described by a named :class:`~confide.protocol.Manifest`
is the only thing an engine exchanges with the rest of confide. An engine implements
:class:`Trainer`; one that can give exact per-sample gradients also implements
:class:`PerSampleTrainer`, and only such an engine can take part in a patient-level
(``mode = "sample"``) DP round: the DP-SGD loop itself (Poisson sampling, per-patient
summing, clipping, noise) is confide's privacy code (:func:`confide.privacy.run_dpsgd`),
never the engine's, so an engine cannot skip it.

The training hyper-parameters (:class:`TrainConfig`, :class:`DPSGDConfig`) are part of the
wire contract and defined in :mod:`confide.protocol.tasks`; they are re-exported here.

Data reaches an engine as a :class:`SiteData` (``len``, labels, patient ids and a
``batch(index)`` accessor), not as in-memory arrays, so an image folder that does not fit
in memory trains the same way as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from confide.protocol.manifest import Manifest
from confide.protocol.tasks import DPSGDConfig, TrainConfig

__all__ = [
    "DPSGDConfig",
    "FitResult",
    "PerSampleTrainer",
    "SiteData",
    "TrainConfig",
    "Trainer",
]


@runtime_checkable
class SiteData(Protocol):
    """A site's local records, read in batches.

    ``labels`` and ``patient_ids`` are small (one entry per record) and held in memory;
    the inputs are read on demand by :meth:`batch`.
    """

    def __len__(self) -> int:
        """Return the number of records."""
        ...

    @property
    def labels(self) -> NDArray[np.int64]:
        """``(n,)`` integer class labels."""
        ...

    @property
    def patient_ids(self) -> NDArray[Any] | None:
        """``(n,)`` patient of each record, or ``None`` (each record its own patient)."""
        ...

    def batch(self, index: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """Return the inputs and labels of the records at ``index`` (in that order)."""
        ...


@dataclass(frozen=True)
class FitResult:
    """What one call to ``fit`` did.

    Parameters
    ----------
    num_examples : int
        Local training examples (the FedAvg weight).
    loss : float
        Mean training loss over the last epoch (NaN when not reported, e.g. under DP).
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

    def fit(self, data: SiteData, config: TrainConfig, seed: int) -> FitResult:
        """Train locally without DP (``config.dp`` is ``None``); ``seed`` fixes batch order."""
        ...

    def evaluate(self, data: SiteData) -> dict[str, float]:
        """Return at least ``loss``, ``accuracy`` and ``num_examples`` on ``data``."""
        ...


@runtime_checkable
class PerSampleTrainer(Trainer, Protocol):
    """A trainer that gives exact per-sample gradients: required for sample-level DP.

    :func:`confide.privacy.run_dpsgd` drives it: it samples patients, asks for the
    per-record gradients of the sampled records (in chunks of at most
    ``per_sample_chunk`` records), sums them per patient, clips, adds noise from the Rust
    core and applies the update with ``set_weights``.
    """

    @property
    def per_sample_chunk(self) -> int:
        """Largest number of records :meth:`per_sample_gradients` is asked for at once."""
        ...

    def per_sample_gradients(self, x: NDArray[np.float32], y: NDArray[np.int64]) -> Any:
        """Gradient of each record's loss at the current weights, one row per record.

        Returns a C-contiguous ``(len(y), manifest.size)`` float32 array: a numpy array, or
        a ``torch.Tensor`` (CPU or CUDA) for the torch engine; its rows follow the
        manifest's flat order.
        """
        ...
