"""The client's local training step: the one place that decides how a round is trained.

A task without ``dp`` is trained by the engine's own ``fit``. A task with ``dp``
(patient-level DP-SGD, privacy mode ``"sample"``) is trained by
:func:`confide.privacy.run_dpsgd` on the engine's per-sample gradients; an engine that
cannot give them is refused with :class:`~confide.errors.PrivacyUnsupportedError` before
anything is trained or uploaded. A custom engine cannot get a patient-level epsilon reported
for training it did not do under DP.

A distributed DP-SGD round (privacy mode ``"sample_distributed"``) trains nothing locally:
:func:`sample_ddg_step` computes the site's noised, ring-encoded share of one DP-SGD step
(:func:`confide.privacy.distributed_dpsgd.site_step`), again only on an engine with
per-sample gradients.

Two strategy fields of the task are honoured here too. ``proximal_mu`` (FedProx) is the
engine's business without DP (an engine says it implements it with ``supports_proximal =
True``; one that does not is refused rather than silently training plain FedAvg) and
:func:`~confide.privacy.run_dpsgd`'s with DP. ``update_clip_norm`` (norm bounding) is applied
to the delta after local training by :func:`bound_update`, before it is uploaded or masked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from confide.errors import ConfigError, PrivacyUnsupportedError
from confide.noise import SecureRng
from confide.privacy.dpsgd import run_dpsgd
from confide.training.base import FitResult, PerSampleTrainer, SiteData, TrainConfig, Trainer

if TYPE_CHECKING:
    from confide.privacy.distributed_dpsgd import SampleDDGParams

__all__ = [
    "bound_update",
    "check_per_sample",
    "check_trainable",
    "fit_round",
    "sample_ddg_step",
    "train_delta",
]


def check_per_sample(trainer: Trainer, what: str) -> None:
    """Refuse an engine without exact per-sample gradients for a patient-level DP round.

    Raises
    ------
    PrivacyUnsupportedError
        ``trainer`` is not a :class:`~confide.training.PerSampleTrainer`, or says its model
        has no exact per-sample gradients (``check_per_sample()``, e.g. torch BatchNorm).
    """
    if not isinstance(trainer, PerSampleTrainer):
        raise PrivacyUnsupportedError(
            f"this round asks for {what}, but {type(trainer).__name__} gives no "
            "per-sample gradients (confide.training.PerSampleTrainer); the round is refused "
            "and nothing is uploaded"
        )
    # An engine may know that its model has no exact per-sample gradients (e.g. torch with
    # BatchNorm, which mixes the records of a batch): it raises PrivacyUnsupportedError.
    check = getattr(trainer, "check_per_sample", None)
    if callable(check):
        check()


def check_trainable(trainer: Trainer, config: TrainConfig) -> None:
    """Refuse a round the engine cannot train with the protection the task asks for.

    Raises
    ------
    PrivacyUnsupportedError
        ``config.dp`` is set and ``trainer`` gives no per-sample gradients, or its manifest
        has a trainable subset (local DP-SGD would noise the frozen part too).
    ConfigError
        ``config.proximal_mu > 0`` without DP and ``trainer`` does not implement the
        proximal term (``supports_proximal``), or the task keeps local momentum across
        rounds and ``trainer`` cannot hold a buffer (``set_momentum_buffer``).
    """
    if config.dp is None:
        keeps = config.momentum > 0 and not config.momentum_restart
        if keeps and not callable(getattr(trainer, "set_momentum_buffer", None)):
            raise ConfigError(
                "this round keeps local momentum across rounds (momentum_restart = false), "
                f"but {type(trainer).__name__} has no momentum_buffer/set_momentum_buffer; the "
                "round is refused and nothing is uploaded. Use NumpyTrainer or TorchTrainer"
            )
        if config.proximal_mu > 0 and not getattr(trainer, "supports_proximal", False):
            raise ConfigError(
                f"this round asks for FedProx (proximal_mu={config.proximal_mu}), but "
                f"{type(trainer).__name__} does not implement the proximal term (it sets no "
                "supports_proximal = True); the round is refused and nothing is uploaded. "
                "Use NumpyTrainer or TorchTrainer, or add mu * (w - w_global) to the gradient"
            )
        return
    check_per_sample(trainer, "patient-level DP-SGD")
    from confide.training.trainable import trainable_index

    if trainable_index(trainer.manifest) is not None:
        # Local DP-SGD noises the whole vector: the pinned frozen part would move.
        raise PrivacyUnsupportedError(
            "this job trains a subset of the model (spec 'trainable'), which local DP-SGD "
            "(privacy mode 'sample') does not honour; use mode 'sample_distributed'. The "
            "round is refused and nothing is uploaded"
        )


def fit_round(
    trainer: Trainer,
    data: SiteData,
    config: TrainConfig,
    seed: int,
    *,
    rng: SecureRng | None = None,
) -> FitResult:
    """Train one round: ``trainer.fit`` without DP, :func:`~confide.privacy.run_dpsgd` with.

    Parameters
    ----------
    trainer : Trainer
        The local engine.
    data : SiteData
        Local records.
    config : TrainConfig
        The task's training config.
    seed : int
        Batch-order seed (no secret).
    rng : SecureRng, optional
        DP-SGD sampling/noise generator (tests only; OS-keyed by default).

    Returns
    -------
    FitResult
        What the round did.
    """
    check_trainable(trainer, config)
    if config.dp is not None:
        if not isinstance(trainer, PerSampleTrainer):  # re-checked: -O must not skip it
            raise PrivacyUnsupportedError("engine gives no per-sample gradients")
        return run_dpsgd(trainer, data, config, rng=rng)
    return trainer.fit(data, config, seed)


def train_delta(
    trainer: Trainer, weights: NDArray[np.float32], data: SiteData, config: TrainConfig, seed: int
) -> tuple[NDArray[np.float32], int, float]:
    """Train from ``weights``; return ``(new - weights, num_examples, loss)`` (a worker thread).

    Parameters
    ----------
    trainer : Trainer
        The local engine (its weights are overwritten).
    weights : numpy.ndarray
        The announced model.
    data : SiteData
        Local training data.
    config : TrainConfig
        Epochs, batch size, learning rate, and ``dp`` for patient-level DP-SGD.
    seed : int
        Training seed.

    Returns
    -------
    tuple
        The delta, the number of examples and the final training loss (NaN under DP).
    """
    trainer.set_weights(weights)
    result = fit_round(trainer, data, config, seed)
    delta = bound_update((trainer.get_weights() - weights).astype(np.float32), config)
    return delta, int(result.num_examples), float(result.loss)


def bound_update(delta: NDArray[np.float32], config: TrainConfig) -> NDArray[np.float32]:
    """Scale ``delta`` down to L2 norm ``config.update_clip_norm`` (norm bounding); else as is.

    Uses the Rust clipping kernel (:func:`confide.clip_l2`) on a copy, so the result's norm
    is at most the bound.

    Examples
    --------
    >>> import numpy as np
    >>> from confide.training import TrainConfig
    >>> d = np.array([3.0, 4.0], np.float32)
    >>> out = bound_update(d, TrainConfig(update_clip_norm=1.0))
    >>> bool(np.linalg.norm(out) <= 1.0), bool(np.allclose(out, [0.6, 0.8], atol=1e-5))
    (True, True)
    >>> bound_update(d, TrainConfig()) is d
    True
    """
    if config.update_clip_norm is None:
        return delta
    from confide.clip import clip_l2

    out = np.array(delta, dtype=np.float32, copy=True)
    clip_l2(out, float(config.update_clip_norm))
    return out


def sample_ddg_step(
    trainer: Trainer,
    weights: NDArray[np.float32],
    data: SiteData,
    params: SampleDDGParams,
    *,
    rng: SecureRng | None = None,
) -> NDArray[Any]:
    """Return the ring vector of one distributed DP-SGD step at ``weights`` (worker thread).

    Parameters
    ----------
    trainer : Trainer
        The local engine (must give per-sample gradients; its weights are overwritten).
    weights : numpy.ndarray
        The announced model.
    data : SiteData
        Local records.
    params : SampleDDGParams
        The round's checked parameters.
    rng : SecureRng, optional
        Sampling, rounding and noise generator (tests only; OS-keyed by default).

    Returns
    -------
    numpy.ndarray
        ``(dim,)`` ring vector to mask with weight 1 (``dim``: the trainable count).

    Raises
    ------
    IntegrityError
        The manifest has a trainable subset and the frozen part of ``weights`` is not the
        pinned one (:func:`confide.training.trainable.check_frozen`).
    """
    from confide.privacy.distributed_dpsgd import site_step
    from confide.training.trainable import check_frozen

    check_per_sample(trainer, "distributed patient-level DP-SGD")
    # A trainable subset: the announced frozen part must be the one the job's manifest
    # pinned (frozen_sha256), or the server could move the trunk without noise.
    check_frozen(trainer.manifest, weights)
    trainer.set_weights(weights)
    return site_step(trainer, data, params, rng=rng)
