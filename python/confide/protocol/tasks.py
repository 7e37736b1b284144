"""The stages of a round and every task the server sends, as typed objects.

One definition for both sides: the server builds a task object and sends ``to_json()``;
the client parses the JSON once with :func:`parse_task` (strictly: unknown or missing keys,
wrong types and non-finite numbers are a :class:`~confide.errors.WireFormatError`) and then
works with typed fields only.

=============  ==========================================================================
action         task
=============  ==========================================================================
``train``      :class:`TrainTask` -- train on the model ``model_sha256``, upload the delta
``evaluate``   :class:`EvaluateTask` -- evaluate the new model, upload metrics
secure stages  :class:`SecureTask` -- one SecAgg+ stage (``advertise`` ... ``unmask``)
``wait``       :class:`WaitTask` -- nothing to do now; poll again after ``retry_after``
``finished``   :class:`FinishedTask` -- the job is over; ``model_sha256`` is the final model
``failed``     :class:`FailedTask` -- the job failed (``reason``)
=============  ==========================================================================

The training hyper-parameters (:class:`TrainConfig`, with :class:`DPSGDConfig` for
patient-level DP-SGD) and the privacy parameters (:class:`PrivacyTask`) travel with
training tasks; they are part of this contract, and engines receive them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from confide.errors import ConfigError, WireFormatError

__all__ = [
    "PLAIN_STAGES",
    "PRIVACY_MODES",
    "SECURE_STAGES",
    "STAGES",
    "DPSGDConfig",
    "EvaluateTask",
    "FailedTask",
    "FinishedTask",
    "PrivacyTask",
    "SecureTask",
    "Task",
    "TrainConfig",
    "TrainTask",
    "WaitTask",
    "parse_task",
]

#: Stages of a plain (not secure) round, in order.
PLAIN_STAGES: tuple[str, ...] = ("train", "evaluate")
#: Stages of a SecAgg+ round before ``evaluate``, in order (``consistency`` is optional).
SECURE_STAGES: tuple[str, ...] = ("advertise", "share", "mask", "consistency", "unmask")
#: Every stage name a task or an upload route may carry.
STAGES: tuple[str, ...] = (*SECURE_STAGES[:3], "train", *SECURE_STAGES[3:], "evaluate")
#: Privacy modes a task may announce.
PRIVACY_MODES: tuple[str, ...] = ("sample", "central", "distributed", "sample_distributed")

# The key that carries each secure stage's protocol message.
_SECURE_PAYLOAD = {
    "advertise": "setup",
    "share": "broadcast",
    "mask": "delivery",
    "consistency": "request",
    "unmask": "request",
}


# --- validation helpers ---------------------------------------------------------------


def _check_float(name: str, value: Any, *, low: float, low_open: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if low_open else value >= low
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


def _fields(
    doc: Any, what: str, required: set[str], optional: set[str] | frozenset[str] = frozenset()
) -> None:
    if not isinstance(doc, dict):
        raise WireFormatError(f"{what} must be a JSON object, got {type(doc).__name__}")
    missing = required - doc.keys()
    extra = doc.keys() - required - optional
    if missing or extra:
        raise WireFormatError(
            f"{what}: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}"
        )


def _int(doc: dict[str, Any], key: str, what: str, low: int = 0) -> int:
    v = doc[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise WireFormatError(f"{what}.{key} must be an int >= {low}, got {v!r}")
    return v


def _num(doc: dict[str, Any], key: str, what: str) -> float:
    v = doc[key]
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise WireFormatError(f"{what}.{key} must be a finite number, got {v!r}")
    return float(v)


def _str(doc: dict[str, Any], key: str, what: str) -> str:
    v = doc[key]
    if not isinstance(v, str):
        raise WireFormatError(f"{what}.{key} must be a string, got {type(v).__name__}")
    return v


def _sha(doc: dict[str, Any], key: str, what: str) -> str:
    v = _str(doc, key, what)
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise WireFormatError(f"{what}.{key} must be 64 lowercase hex digits, got {v[:80]!r}")
    return v


# --- training configuration -----------------------------------------------------------


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

    Examples
    --------
    >>> DPSGDConfig(noise_multiplier=1.1, clip_norm=1.0, sampling_rate=0.1, steps=5).steps
    5
    """

    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    steps: int
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _check_float("noise_multiplier", self.noise_multiplier, low=0.0, low_open=False)
        _check_float("clip_norm", self.clip_norm, low=0.0, low_open=True)
        _check_float("sampling_rate", self.sampling_rate, low=0.0, low_open=True)
        if self.sampling_rate > 1.0:
            raise ConfigError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        _check_int("steps", self.steps, 1)
        _check_float("momentum", self.momentum, low=0.0, low_open=False)
        if self.momentum >= 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")

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
    proximal_mu : float, default 0.0
        FedProx: add ``mu/2 ||w - w_global||^2`` to the local objective (finite, >= 0;
        ``w_global`` is the round's model). 0 trains exactly as without it.
    update_clip_norm : float, optional
        Norm bounding: the site scales its delta down to this L2 norm (finite, > 0) before
        uploading or masking it. ``None`` (default): no such clip.
    momentum : float, default 0.0
        Local heavy-ball momentum in [0, 1) of non-private training (``v = m v + g``,
        ``w -= lr v``, as ``torch.optim.SGD`` with no dampening). 0 trains plain SGD; the
        torch engine then uses its own constructor ``momentum``.
    momentum_restart : bool, default True
        Start every round's local training from a zero momentum buffer (``True``), or keep
        the site's buffer across rounds (``False``; the client persists it in its state
        folder, so it survives a restart).
    share_fraction : float, default 1.0
        Partial model sharing (:mod:`confide.protocol.sharing`): only this share of the
        parameters, in (0, 1], is uploaded this round; 1.0 uploads everything.
    share_seed : str, optional
        The round's public selection seed (64 hex digits); required when
        ``share_fraction < 1``.

    Examples
    --------
    >>> TrainConfig.from_dict({"epochs": 2, "batch_size": 8, "learning_rate": 0.1}).epochs
    2
    >>> TrainConfig(proximal_mu=0.1).to_dict()["proximal_mu"]
    0.1
    """

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    dp: DPSGDConfig | None = None
    proximal_mu: float = 0.0
    update_clip_norm: float | None = None
    momentum: float = 0.0
    momentum_restart: bool = True
    share_fraction: float = 1.0
    share_seed: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dp, dict):  # JSON form, as a task carries it
            object.__setattr__(self, "dp", DPSGDConfig(**self.dp))
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_float("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_float("proximal_mu", self.proximal_mu, low=0.0, low_open=False)
        if self.update_clip_norm is not None:
            _check_float("update_clip_norm", self.update_clip_norm, low=0.0, low_open=True)
        _check_float("momentum", self.momentum, low=0.0, low_open=False)
        if self.momentum >= 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.momentum_restart, bool):
            raise ConfigError(
                f"momentum_restart must be true or false, got {self.momentum_restart!r}"
            )
        if self.dp is not None and (self.momentum != 0.0 or not self.momentum_restart):
            # DP-SGD's momentum is dp.momentum (post-processing inside run_dpsgd); a second,
            # engine-side buffer would never run under DP, so it is refused, not ignored.
            raise ConfigError(
                "local momentum / momentum_restart = false apply to non-private training; "
                "with patient-level DP-SGD set the DP-SGD momentum ([privacy] momentum) instead"
            )
        _check_float("share_fraction", self.share_fraction, low=0.0, low_open=True)
        if self.share_fraction > 1.0:
            raise ConfigError(f"share_fraction must be in (0, 1], got {self.share_fraction!r}")
        if self.share_fraction < 1.0:
            seed = self.share_seed
            if not (
                isinstance(seed, str)
                and len(seed) == 64
                and all(c in "0123456789abcdef" for c in seed)
            ):
                raise ConfigError(
                    f"share_fraction < 1 needs share_seed, 64 lowercase hex digits; got {seed!r}"
                )

    @classmethod
    def from_dict(cls, doc: Any) -> TrainConfig:
        """Build a config from its JSON form (a task's ``config``).

        Parameters
        ----------
        doc : dict
            ``epochs``, ``batch_size``, ``learning_rate`` and optionally ``dp`` (a dict of
            :class:`DPSGDConfig` fields, or ``None``), ``proximal_mu`` and
            ``update_clip_norm``.

        Returns
        -------
        TrainConfig
            The validated config.
        """
        if not isinstance(doc, dict):
            raise ConfigError(f"a training config must be a JSON object, got {doc!r}")
        fields = dict(doc)
        dp = fields.pop("dp", None)
        try:
            return cls(**fields, dp=None if dp is None else DPSGDConfig(**dp))
        except TypeError as exc:  # unknown or missing keys
            raise ConfigError(f"invalid training config {doc!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (optional fields omitted at their defaults)."""
        out: dict[str, Any] = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
        }
        if self.dp is not None:
            out["dp"] = self.dp.to_dict()
        # Omitted at their defaults, so a plain FedAvg task reads the same as before.
        if self.proximal_mu != 0.0:
            out["proximal_mu"] = self.proximal_mu
        if self.update_clip_norm is not None:
            out["update_clip_norm"] = self.update_clip_norm
        if self.momentum != 0.0:
            out["momentum"] = self.momentum
        if not self.momentum_restart:
            out["momentum_restart"] = False
        if self.share_fraction != 1.0:
            out["share_fraction"] = self.share_fraction
        if self.share_seed is not None:
            out["share_seed"] = self.share_seed
        return out


@dataclass(frozen=True)
class PrivacyTask:
    """The privacy parameters a training task carries.

    Parameters
    ----------
    mode : {"sample", "central", "distributed", "sample_distributed"}
        Patient-level DP-SGD on the site; client-level DP with server-side noise (the site
        clips its update to ``update_clip_norm``); client-level DP with the distributed
        discrete Gaussian inside SecAgg+ (``ddg`` parameters and ``rotation_seed``); or
        patient-level DP-SGD distributed under SecAgg+ (``sample_ddg``: one step per round,
        each site masks its noised sum of clipped per-patient gradients).
    delta : float
        The job's delta.
    dp : DPSGDConfig, optional
        ``sample`` mode only.
    update_clip_norm : float, optional
        ``central`` mode only.
    ddg : dict, optional
        ``distributed`` mode only: the round's DDG parameters (checked by the client).
    rotation_seed : str, optional
        ``distributed`` mode only: hex seed of the round's public random rotation.
    sample_ddg : dict, optional
        ``sample_distributed`` mode only: the round's
        :class:`~confide.privacy.distributed_dpsgd.SampleDDGParams` (checked by the client).
    rounds : int, optional
        The job's planned rounds. A site recomputes the job's epsilon from it and the
        round's parameters (:class:`confide.client.SitePolicy`), never trusting an epsilon
        the server states; a site with a policy refuses a DP task without it.
    """

    mode: Literal["sample", "central", "distributed", "sample_distributed"]
    delta: float
    dp: DPSGDConfig | None = None
    update_clip_norm: float | None = None
    ddg: dict[str, Any] | None = None
    rotation_seed: str | None = None
    sample_ddg: dict[str, Any] | None = None
    rounds: int | None = None

    def __post_init__(self) -> None:
        if self.rounds is not None:
            _check_int("rounds", self.rounds, 1)
        if self.mode not in PRIVACY_MODES:
            raise ConfigError(f"privacy mode must be one of {PRIVACY_MODES}, got {self.mode!r}")
        _check_float("delta", self.delta, low=0.0, low_open=False)
        need = {
            "sample": self.dp is not None,
            "central": self.update_clip_norm is not None,
            "distributed": self.ddg is not None and self.rotation_seed is not None,
            "sample_distributed": self.sample_ddg is not None,
        }
        if not need[self.mode]:
            raise ConfigError(f"privacy mode {self.mode!r} lacks its parameters")

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        out: dict[str, Any] = {"mode": self.mode, "delta": self.delta}
        if self.dp is not None:
            out["dp"] = self.dp.to_dict()
        if self.update_clip_norm is not None:
            out["update_clip_norm"] = self.update_clip_norm
        if self.ddg is not None:
            out["ddg"] = dict(self.ddg)
        if self.rotation_seed is not None:
            out["rotation_seed"] = self.rotation_seed
        if self.sample_ddg is not None:
            out["sample_ddg"] = dict(self.sample_ddg)
        if self.rounds is not None:
            out["rounds"] = self.rounds
        return out

    @classmethod
    def from_json(cls, doc: Any) -> PrivacyTask:
        """Parse the JSON form (strict)."""
        what = "task.privacy"
        _fields(
            doc,
            what,
            {"mode", "delta"},
            {"dp", "update_clip_norm", "ddg", "rotation_seed", "sample_ddg", "rounds"},
        )
        try:
            dp = None if doc.get("dp") is None else DPSGDConfig(**doc["dp"])
            clip = doc.get("update_clip_norm")
            ddg = doc.get("ddg")
            if ddg is not None and not isinstance(ddg, dict):
                raise WireFormatError(f"{what}.ddg must be a JSON object")
            sample_ddg = doc.get("sample_ddg")
            if sample_ddg is not None and not isinstance(sample_ddg, dict):
                raise WireFormatError(f"{what}.sample_ddg must be a JSON object")
            return cls(
                mode=doc["mode"],
                delta=_num(doc, "delta", what),
                dp=dp,
                update_clip_norm=None if clip is None else _num(doc, "update_clip_norm", what),
                ddg=ddg,
                rotation_seed=None
                if doc.get("rotation_seed") is None
                else _str(doc, "rotation_seed", what),
                sample_ddg=sample_ddg,
                rounds=None if doc.get("rounds") is None else _int(doc, "rounds", what, 1),
            )
        except (ConfigError, TypeError) as exc:
            raise WireFormatError(f"{what}: {exc}") from None


# --- tasks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainTask:
    """Train on ``model_sha256`` with ``config`` and upload the delta (``train`` stage)."""

    round: int
    deadline: float
    seed: int
    model_sha256: str
    config: TrainConfig
    privacy: PrivacyTask | None = None
    action: Literal["train"] = field(default="train", init=False)

    @property
    def stage(self) -> str:
        """The stage this task belongs to."""
        return "train"

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        out: dict[str, Any] = {
            "action": "train",
            "round": self.round,
            "stage": "train",
            "deadline": self.deadline,
            "seed": self.seed,
            "model_sha256": self.model_sha256,
            "config": self.config.to_dict(),
        }
        if self.privacy is not None:
            out["privacy"] = self.privacy.to_json()
        return out


@dataclass(frozen=True)
class EvaluateTask:
    """Evaluate the new model ``model_sha256`` and upload metrics (``evaluate`` stage)."""

    round: int
    deadline: float
    seed: int
    model_sha256: str
    action: Literal["evaluate"] = field(default="evaluate", init=False)

    @property
    def stage(self) -> str:
        """The stage this task belongs to."""
        return "evaluate"

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {
            "action": "evaluate",
            "round": self.round,
            "stage": "evaluate",
            "deadline": self.deadline,
            "seed": self.seed,
            "model_sha256": self.model_sha256,
        }


@dataclass(frozen=True)
class SecureTask:
    """One SecAgg+ stage: ``payload`` is that stage's protocol message (JSON).

    ``advertise`` tasks also carry the round's model, training config and privacy
    parameters (training runs while keys are exchanged), and the cohort members' consortium
    certificates by client id (:mod:`confide.protocol.certs`; each site verifies them against
    its own root, see :meth:`confide.client.policy.SitePolicy.check_peers`).
    """

    round: int
    stage: str
    deadline: float
    seed: int
    payload: dict[str, Any]
    model_sha256: str | None = None
    config: TrainConfig | None = None
    privacy: PrivacyTask | None = None
    certificates: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.stage not in _SECURE_PAYLOAD:
            raise ConfigError(f"not a secure stage: {self.stage!r}")
        if self.stage == "advertise" and (self.model_sha256 is None or self.config is None):
            raise ConfigError("an advertise task needs model_sha256 and config")

    @property
    def action(self) -> str:
        """The task's action (the stage name)."""
        return self.stage

    def task_sha256(self) -> bytes:
        """Return the hash of what every site of the round must be given alike.

        SHA-256 of the canonical JSON (sorted keys, no spaces, shortest round-trip floats)
        of the round, its seed, the setup (cohort, identity keys, SecAgg+ parameters, model
        hash, vector length, consistency check), the model hash, the training config and the
        privacy parameters. The deadline is left out (timing, not content). A site signs this
        hash with its advertisement and checks it on every peer's (``task-mismatch``).

        Examples
        --------
        >>> t = SecureTask(1, "advertise", 0.0, 7, {}, "00" * 32, TrainConfig())
        >>> t.task_sha256() == SecureTask(1, "advertise", 9.0, 7, {}, "00" * 32,
        ...                               TrainConfig()).task_sha256()
        True
        >>> t.task_sha256() == SecureTask(1, "advertise", 0.0, 7, {}, "00" * 32,
        ...                               TrainConfig(learning_rate=1e-9)).task_sha256()
        False
        """
        import hashlib
        import json

        doc = {
            "kind": "confide/task/v1",
            "round": self.round,
            "seed": self.seed,
            "setup": self.payload,
            "model_sha256": self.model_sha256,
            "config": None if self.config is None else self.config.to_dict(),
            "privacy": None if self.privacy is None else self.privacy.to_json(),
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).digest()

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        out: dict[str, Any] = {
            "action": self.stage,
            "round": self.round,
            "stage": self.stage,
            "deadline": self.deadline,
            "seed": self.seed,
            _SECURE_PAYLOAD[self.stage]: self.payload,
        }
        if self.model_sha256 is not None:
            out["model_sha256"] = self.model_sha256
        if self.config is not None:
            out["config"] = self.config.to_dict()
        if self.privacy is not None:
            out["privacy"] = self.privacy.to_json()
        if self.certificates is not None:
            out["certificates"] = self.certificates
        return out


@dataclass(frozen=True)
class WaitTask:
    """Nothing to do now: poll again after ``retry_after`` seconds."""

    retry_after: float = 1.0
    action: Literal["wait"] = field(default="wait", init=False)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {"action": "wait", "retry_after": self.retry_after}


@dataclass(frozen=True)
class FinishedTask:
    """The job finished after ``rounds`` rounds; ``model_sha256`` is the final model."""

    model_sha256: str
    rounds: int
    action: Literal["finished"] = field(default="finished", init=False)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {"action": "finished", "model_sha256": self.model_sha256, "rounds": self.rounds}


@dataclass(frozen=True)
class FailedTask:
    """The job failed; ``reason`` says why."""

    reason: str
    action: Literal["failed"] = field(default="failed", init=False)

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form."""
        return {"action": "failed", "reason": self.reason}


Task = TrainTask | EvaluateTask | SecureTask | WaitTask | FinishedTask | FailedTask

_COMMON = {"action", "round", "stage", "deadline", "seed"}


def _config(doc: dict[str, Any], what: str) -> TrainConfig:
    try:
        return TrainConfig.from_dict(doc["config"])
    except ConfigError as exc:
        raise WireFormatError(f"{what}.config: {exc}") from None


def _privacy(doc: dict[str, Any]) -> PrivacyTask | None:
    return None if doc.get("privacy") is None else PrivacyTask.from_json(doc["privacy"])


def parse_task(doc: Any) -> Task:
    """Parse a task the server sent (strictly) into its typed form.

    Parameters
    ----------
    doc : Any
        The decoded JSON body of ``GET /v1/task``.

    Returns
    -------
    Task
        One of the task classes above.

    Raises
    ------
    WireFormatError
        Unknown action, missing or unexpected keys, wrong types, non-finite numbers.

    Examples
    --------
    >>> parse_task({"action": "wait", "retry_after": 2.0})
    WaitTask(retry_after=2.0, action='wait')
    >>> t = parse_task({"action": "evaluate", "round": 3, "stage": "evaluate",
    ...                 "deadline": 10.0, "seed": 1, "model_sha256": "ab" * 32})
    >>> t.round, t.stage
    (3, 'evaluate')
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("action"), str):
        raise WireFormatError("a task must be a JSON object with a string 'action'")
    action = doc["action"]
    what = f"task[{action}]"
    if action == "wait":
        _fields(doc, what, {"action", "retry_after"})
        return WaitTask(_num(doc, "retry_after", what))
    if action == "finished":
        _fields(doc, what, {"action", "model_sha256", "rounds"})
        return FinishedTask(_sha(doc, "model_sha256", what), _int(doc, "rounds", what))
    if action == "failed":
        _fields(doc, what, {"action", "reason"})
        return FailedTask(_str(doc, "reason", what))
    if action == "train":
        _fields(doc, what, _COMMON | {"model_sha256", "config"}, {"privacy"})
    elif action == "evaluate":
        _fields(doc, what, _COMMON | {"model_sha256"})
    elif action in _SECURE_PAYLOAD:
        optional = (
            {"model_sha256", "config", "privacy", "certificates"}
            if action == "advertise"
            else set()
        )
        _fields(doc, what, _COMMON | {_SECURE_PAYLOAD[action]}, optional)
    else:
        raise WireFormatError(f"unknown task action {action!r}; expected one of {STAGES}")
    if doc["stage"] != action:
        raise WireFormatError(f"{what}: stage {doc['stage']!r} differs from the action")
    rnd, deadline = _int(doc, "round", what, 1), _num(doc, "deadline", what)
    seed = _int(doc, "seed", what)
    if action == "train":
        return TrainTask(
            rnd, deadline, seed, _sha(doc, "model_sha256", what), _config(doc, what), _privacy(doc)
        )
    if action == "evaluate":
        return EvaluateTask(rnd, deadline, seed, _sha(doc, "model_sha256", what))
    payload = doc[_SECURE_PAYLOAD[action]]
    if not isinstance(payload, dict):
        raise WireFormatError(f"{what}.{_SECURE_PAYLOAD[action]} must be a JSON object")
    model = None if doc.get("model_sha256") is None else _sha(doc, "model_sha256", what)
    config = None if doc.get("config") is None else _config(doc, what)
    certs = doc.get("certificates")
    if certs is not None and not (
        isinstance(certs, dict)
        and all(isinstance(k, str) and isinstance(v, dict) for k, v in certs.items())
    ):
        raise WireFormatError(f"{what}.certificates must map client ids to JSON objects")
    try:
        return SecureTask(rnd, action, deadline, seed, payload, model, config, _privacy(doc), certs)
    except ConfigError as exc:
        raise WireFormatError(f"{what}: {exc}") from None
