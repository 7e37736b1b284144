"""The job configuration (TOML), parsed into frozen dataclasses and validated.

A job config names the initial model (manifest + safetensors weights), the strategy, the
number of rounds, the cohort size, ``min_clients``, the stage deadlines, where state lives and
the TLS files. Relative paths are resolved against the config file's folder. Example::

    [job]
    name = "breast-cancer"
    rounds = 10
    seed = 42
    cohort_size = 3          # clients asked per round
    min_clients = 2          # quorum: fewer survivors abort the round
    wait_for_clients = 3     # active clients needed before the first round starts (later
                             # rounds: see docs/operations.md, "Cohorts after sites die")
    max_consecutive_aborts = 5
    max_weight = 10000000    # plain rounds: a larger num_examples is refused (422)
    max_update_norm = 0.0    # plain rounds: a larger delta L2 norm is refused; 0: no bound

    [model]
    manifest = "model.json"
    weights = "init.safetensors"

    [strategy]
    name = "fedavg"          # a registered confide.strategies name (default "fedavg"):
                             # fedavg fedprox fedavgm fedadam fedyogi fedadagrad median
                             # trimmed_mean norm_bounding (docs/strategies.md)
    epochs = 1
    batch_size = 32
    learning_rate = 0.1
    # server_learning_rate = 1.0, and the strategy's own keys (mu, momentum, beta1,
    # beta2, tau, trim_fraction, max_norm) go here too
    # local_momentum = 0.9     # sites' heavy-ball SGD momentum (0: plain SGD)
    # momentum_restart = true  # false: each site keeps its buffer across rounds

    [deadlines]              # seconds each stage stays open at most
    train = 30.0
    evaluate = 15.0

    [server]
    host = "127.0.0.1"
    port = 8765
    state_dir = "state"      # SQLite file, model versions and updates live here
    max_upload_bytes = 0     # 0: derived from the manifest
    max_concurrent_uploads = 32
    exit_when_finished = false
    # consortium_root = "root.json"       # optional, both or neither: refuse enrolment of a
    # revocation_list = "revoked.json"    #   certificate the consortium's list revokes

    [tls]                    # optional
    cert = "server.pem"
    key = "server.key"
    client_ca = "clients-ca.pem"   # set for mutual TLS

    [secagg]                 # optional: SecAgg+ secure aggregation (off unless enabled)
    enabled = true
    adversarial_fraction = 0.1   # threat model: k, t and the modulus are derived from it
    dropout_fraction = 0.1
    quant_bits = 16
    clip_range = 1.0         # update elements are clipped to [-clip_range, clip_range]
    max_weight = 1000        # a site's weight is min(num_examples, max_weight)
    consistency_check = false
    advertise = 10.0         # per-stage deadlines (seconds)
    share = 10.0
    mask = 30.0              # includes local training
    consistency = 10.0
    unmask = 10.0

    [privacy]                # optional: differential privacy (see docs/privacy.md)
    mode = "sample"          # "none" | "sample" (patient-level DP-SGD) | "central"
                             # | "distributed" (DDG; needs [secagg] enabled = true)
                             # | "sample_distributed" (patient-level DP-SGD under
                             #   SecAgg+, one step per round; needs [secagg])
    delta = 1e-5
    noise_multiplier = 1.1   # or target_epsilon = 4.0 (calibrated for job.rounds rounds)
    epsilon_budget = 8.0     # 0: target_epsilon if set, else no budget
    clip_norm = 1.0
    sampling_rate = 0.2      # sample mode: Poisson rate of a patient per step
    local_steps = 0          # sample mode: steps per round; 0 = epochs * ceil(1/q)
    momentum = 0.0           # sample mode: local heavy-ball momentum
    ddg_bits = 0             # ring modes: the SecAgg+ ring is Z_(2**ddg_bits);
                             # 0 = 32 (distributed) or 48 (sample_distributed)
    expected_batch_size = 0  # sample_distributed: public q * (patients of all sites)
    site_clip_norm = 0       # sample_distributed: bound on a site's gradient sum
                             # (0 = clip_norm * expected_batch_size)

    [sharing]                # optional: partial model sharing (docs/strategies.md)
    fraction = 0.2           # share of parameters aggregated per round, in (0, 1];
                             # 1.0 (default) shares everything
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from confide.errors import ConfigError
from confide.protocol.sharing import check_fraction
from confide.protocol.tasks import DPSGDConfig, TrainConfig
from confide.secagg import (
    InfeasibleConfigError,
    SecAggParams,
    ThreatModel,
    derive_params,
)
from confide.strategies import (
    Strategy,
    available_strategies,
    client_train_options,
    get_strategy,
)
from confide_server.engine.privacy import PrivacyConfig, parse_privacy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "Config",
    "JobConfig",
    "RetentionConfig",
    "SecAggConfig",
    "ServerConfig",
    "StrategyConfig",
    "TLSConfig",
    "load_config",
    "parse_config",
    "render_toml",
]


@dataclass(frozen=True)
class JobConfig:
    """What the federation does: rounds, cohort and quorum."""

    name: str = "job"
    rounds: int = 10
    seed: int = 0
    cohort_size: int = 10
    min_clients: int = 2
    wait_for_clients: int = 0  # 0 means min_clients
    max_consecutive_aborts: int = 5
    # A client counts as available for cohort selection if it was seen this recently.
    active_window_s: float = 60.0
    # Plain rounds: a train upload with more examples is refused (422), so one site cannot
    # outweigh all others; and, when > 0, a delta whose L2 norm exceeds it is refused.
    max_weight: int = 10_000_000
    max_update_norm: float = 0.0

    @property
    def start_threshold(self) -> int:
        """Available clients needed before a round starts."""
        return self.wait_for_clients or self.min_clients


@dataclass(frozen=True)
class StrategyConfig:
    """Aggregation strategy and the local training it asks clients for.

    ``name`` selects a :mod:`confide.strategies` strategy; ``server_learning_rate`` and any
    other key of the ``[strategy]`` table (kept in ``options``, scalars only) are passed to
    its constructor, which refuses options it does not know. A new strategy with its own
    options therefore needs no change here.
    """

    name: str = "fedavg"
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    # None: the strategy's own default (1.0 for FedAvg, 0.1 for the adaptive optimizers).
    server_learning_rate: float | None = None
    # The sites' local heavy-ball momentum, and whether each round restarts it from zero
    # (TrainConfig.momentum / momentum_restart; `momentum` is FedAvgM's server momentum).
    local_momentum: float = 0.0
    momentum_restart: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Strategy:
        """Build the configured strategy.

        Raises
        ------
        ConfigError
            Unknown name, or options the strategy does not take or refuses.
        """
        options = dict(self.options)
        if self.server_learning_rate is not None:
            options["server_learning_rate"] = self.server_learning_rate
        return get_strategy(self.name, **options)

    def train_config(self, strategy: Strategy, dp: DPSGDConfig | None) -> TrainConfig:
        """Return the local-training config of a round's task.

        ``epochs``, ``batch_size`` and ``learning_rate`` of this section, the round's DP-SGD
        parameters, and what the strategy asks the sites for
        (:func:`~confide.strategies.client_train_options`: FedProx's ``proximal_mu``, norm
        bounding's ``update_clip_norm``).
        """
        extra = client_train_options(strategy)
        if self.local_momentum != 0.0:
            extra["momentum"] = self.local_momentum
        if not self.momentum_restart:
            extra["momentum_restart"] = False
        return TrainConfig(self.epochs, self.batch_size, self.learning_rate, dp, **extra)


@dataclass(frozen=True)
class SharingConfig:
    """Partial model sharing (``[sharing]``): the share of parameters aggregated per round.

    ``fraction`` in (0, 1]; 1.0 (the default) shares every parameter and changes nothing.
    Below 1 each round shares a public, round-seeded subset (:mod:`confide.protocol.sharing`),
    the same for every site; the rest of the model stays on the sites.
    """

    fraction: float = 1.0

    @property
    def partial(self) -> bool:
        """Whether only part of the model is shared."""
        return self.fraction < 1.0


@dataclass(frozen=True)
class RetentionConfig:
    """What a long job keeps on disk (``[retention]``).

    ``keep_models``: the newest model versions kept (>= 1); older ones are deleted, except
    the initial and current models and an open round's base and new model. The ledger
    keeps every model's hash, and a release keeps its own copy of its model, so receipts
    and releases still verify. ``prune_updates``: delete a round's update files once the
    round is committed or aborted (its ledger entry, with every receipt hash, is written
    by then); once the replay window (twice the largest accepted clock skew plus 60 s)
    has passed, also its submission rows and the nonces of the requests accepted before
    it (:meth:`confide_server.engine.retention.Retention.forget`).
    """

    keep_models: int = 10
    prune_updates: bool = True

    def __post_init__(self) -> None:
        if self.keep_models < 1:
            raise ConfigError(
                f"retention.keep_models must be >= 1 (the current model is always kept), "
                f"got {self.keep_models}"
            )


#: Strategies that keep per-coordinate server state (moments): their state would follow the
#: shared subset, which changes every round, so partial sharing refuses them.
_STATEFUL_STRATEGIES = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class TLSConfig:
    """TLS files; all ``None`` means plain HTTP (loopback and tests only)."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    """Network, storage and resource limits."""

    host: str = "127.0.0.1"
    port: int = 8765
    state_dir: Path = Path("state")
    max_upload_bytes: int = 0  # 0: derived from the manifest
    max_concurrent_uploads: int = 32
    max_queued_uploads: int = 1024
    max_requests_per_client: int = 4  # in progress at once per authenticated site; more: 429
    max_clock_skew_s: float = 300.0
    long_poll_max_s: float = 30.0
    exit_when_finished: bool = False
    linger_s: float = 2.0
    #: The consortium's root and revocation list: enrolment of a revoked certificate is
    #: refused (400). The sites check the list themselves; this only reports it early.
    consortium_root: Path | None = None
    revocation_list: Path | None = None

    @property
    def database(self) -> Path:
        """The SQLite file."""
        return self.state_dir / "confide.sqlite"


#: Largest ``[secagg] stage_grace_factor``: a quiet period ten times as long as the stage
#: took to reach its threshold is already longer than any useful grace.
MAX_STAGE_GRACE_FACTOR = 10.0


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ round mode: threat model, quantization and per-stage deadlines."""

    enabled: bool = False
    adversarial_fraction: float = 0.1
    dropout_fraction: float = 0.1
    quant_bits: int = 16
    clip_range: float = 1.0
    max_weight: int = 1000
    consistency_check: bool = False
    advertise: float = 10.0
    share: float = 10.0
    mask: float = 30.0
    consistency: float = 10.0
    unmask: float = 10.0
    #: Close a secure stage before its deadline once enough answers for the protocol arrived
    #: and none came for this many seconds (0: off, every stage waits for its deadline or
    #: for every expected client); docs/operations.md, "SecAgg+ deadlines".
    stage_grace_s: float = 0.0
    #: Adaptive grace (0: off): a stage that reached its threshold of answers after ``d``
    #: seconds closes once none came for ``max(stage_grace_floor_s, factor x d)`` seconds
    #: (at most ``stage_grace_s`` when that is set too); in (0, MAX_STAGE_GRACE_FACTOR].
    stage_grace_factor: float = 0.0
    #: The adaptive grace's lower bound in seconds (used only with ``stage_grace_factor``).
    stage_grace_floor_s: float = 0.5

    def params(self, n: int) -> SecAggParams:
        """Derive k, t and the modulus for a cohort of ``n`` clients.

        Raises
        ------
        InfeasibleConfigError
            The threat model cannot be met with ``n`` clients.
        """
        threat = ThreatModel(self.adversarial_fraction, self.dropout_fraction)
        return derive_params(
            n,
            threat,
            quant_bits=self.quant_bits,
            clip_range=self.clip_range,
            max_weight=self.max_weight,
            malicious=self.consistency_check,
        )

    def validate(self, cohort_sizes: tuple[int, ...]) -> None:
        """Check ranges and that every cohort size in ``cohort_sizes`` is feasible.

        Raises
        ------
        ConfigError
            A value is out of range or the threat model is infeasible.
        """
        for name in ("adversarial_fraction", "dropout_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"secagg.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 1 <= self.quant_bits <= 32:
            raise ConfigError(f"secagg.quant_bits must be in [1, 32], got {self.quant_bits}")
        if not self.clip_range > 0 or not 1 <= self.max_weight <= 10**9:
            raise ConfigError("secagg.clip_range must be > 0 and secagg.max_weight in [1, 1e9]")
        for stage in ("advertise", "share", "mask", "consistency", "unmask"):
            if not getattr(self, stage) > 0:
                raise ConfigError(f"secagg.{stage} (deadline) must be > 0 seconds")
        if not 0.0 <= self.stage_grace_s < float("inf"):
            raise ConfigError(
                f"secagg.stage_grace_s must be >= 0 seconds (0: off), got {self.stage_grace_s}"
            )
        factor = self.stage_grace_factor
        if not (factor == 0.0 or 0.0 < factor <= MAX_STAGE_GRACE_FACTOR):
            raise ConfigError(
                "secagg.stage_grace_factor must be 0 (off) or a finite number in "
                f"(0, {MAX_STAGE_GRACE_FACTOR:g}], got {factor}"
            )
        if not 0.0 < self.stage_grace_floor_s < float("inf"):
            raise ConfigError(
                "secagg.stage_grace_floor_s must be a finite number of seconds > 0, got "
                f"{self.stage_grace_floor_s}"
            )
        if not self.enabled:
            return
        for n in cohort_sizes:
            try:
                self.params(n)
            except (InfeasibleConfigError, ValueError) as exc:
                raise ConfigError(
                    f"[secagg] is infeasible for a cohort of {n} clients: {exc} (change "
                    "job.cohort_size/wait_for_clients or the secagg fractions)"
                ) from None


@dataclass(frozen=True)
class Config:
    """A whole job configuration."""

    manifest: Path
    weights: Path
    job: JobConfig = field(default_factory=JobConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    deadlines: dict[str, float] = field(default_factory=lambda: {"train": 60.0, "evaluate": 30.0})
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    def __post_init__(self) -> None:
        job = self.job
        if job.rounds < 1:
            raise ConfigError(f"job.rounds must be >= 1, got {job.rounds}")
        if not 1 <= job.min_clients <= job.cohort_size:
            raise ConfigError(
                f"need 1 <= job.min_clients <= job.cohort_size, got {job.min_clients}, "
                f"{job.cohort_size}"
            )
        if job.wait_for_clients and job.wait_for_clients < job.min_clients:
            raise ConfigError("job.wait_for_clients must be 0 or >= job.min_clients")
        if job.max_consecutive_aborts < 1 or job.active_window_s <= 0:
            raise ConfigError("job.max_consecutive_aborts and job.active_window_s must be > 0")
        if not 1 <= job.max_weight <= 10**9:
            raise ConfigError(f"job.max_weight must be in [1, 1e9], got {job.max_weight}")
        if not (math.isfinite(job.max_update_norm) and job.max_update_norm >= 0):
            raise ConfigError(
                f"job.max_update_norm must be >= 0 (0: no bound), got {job.max_update_norm}"
            )
        if self.strategy.name not in available_strategies():
            raise ConfigError(
                f"strategy.name must be one of {list(available_strategies())} "
                f"(confide.strategies), got {self.strategy.name!r}"
            )
        built = self.strategy.build()  # the strategy validates its own options
        s = self.strategy
        if s.epochs < 1 or s.batch_size < 1 or not s.learning_rate > 0:
            raise ConfigError("strategy epochs, batch_size and learning_rate must be > 0")
        if s.server_learning_rate is not None and not s.server_learning_rate > 0:
            raise ConfigError("strategy.server_learning_rate must be > 0")
        s.train_config(built, None)  # what it asks the sites for must be a valid task
        if self.privacy.mode in ("sample", "sample_distributed") and (
            s.local_momentum != 0.0 or not s.momentum_restart
        ):
            raise ConfigError(
                "strategy.local_momentum / momentum_restart apply to non-private local "
                f"training; privacy.mode = {self.privacy.mode!r} trains by DP-SGD, whose "
                "momentum is [privacy] momentum: set that instead"
            )
        if not built.secure_compatible:
            hides = (
                "[secagg] enabled = true"
                if self.secagg.enabled
                else f"privacy.mode = {self.privacy.mode!r}"
                if self.privacy.mode in ("central", "distributed")
                else None
            )
            if hides is not None:
                raise ConfigError(
                    f"strategy {s.name!r} needs every site's update in the clear (a "
                    f"coordinate-wise rule over individual updates), but with {hides} the "
                    "server only ever sees their sum; turn secure aggregation / client-level "
                    "DP off, or choose a strategy that works on the sum (fedavg, fedprox, "
                    "fedavgm, fedadam, fedyogi, fedadagrad, norm_bounding)"
                )
        self._check_sharing()
        for stage in ("train", "evaluate"):
            if not self.deadlines.get(stage, 0) > 0:
                raise ConfigError(f"deadlines.{stage} must be a number of seconds > 0")
        srv = self.server
        if not 0 <= srv.port <= 65535:
            raise ConfigError(f"server.port out of range: {srv.port}")
        if srv.max_upload_bytes < 0 or srv.max_concurrent_uploads < 1 or srv.max_queued_uploads < 0:
            raise ConfigError("server upload limits must be positive")
        if srv.max_requests_per_client < 2:
            raise ConfigError(
                f"server.max_requests_per_client must be >= 2 (a site's long-poll and its "
                f"upload run at once), got {srv.max_requests_per_client}"
            )
        if (self.tls.cert is None) != (self.tls.key is None):
            raise ConfigError("tls.cert and tls.key go together")
        if self.tls.client_ca is not None and self.tls.cert is None:
            raise ConfigError("tls.client_ca (mutual TLS) needs tls.cert and tls.key")
        # Cohorts range from the start threshold to cohort_size; both ends must be feasible.
        self.secagg.validate(tuple(sorted({max(job.start_threshold, 2), job.cohort_size})))
        if self.privacy.mode == "central" and self.secagg.enabled:
            raise ConfigError(
                "privacy.mode = 'central' clips and noises individual updates on the server, "
                "which secure aggregation hides; use 'sample' or 'distributed' with [secagg]"
            )
        if self.privacy.mode == "distributed" and not self.secagg.enabled:
            raise ConfigError(
                "privacy.mode = 'distributed' (distributed discrete Gaussian) adds each site's "
                "noise share under secure aggregation, so only the noised sum is ever seen; "
                "it needs [secagg] enabled = true (or use 'central' without secagg)"
            )
        if self.privacy.mode == "sample_distributed" and not self.secagg.enabled:
            raise ConfigError(
                "privacy.mode = 'sample_distributed' (distributed patient-level DP-SGD) adds "
                "each site's noise share under secure aggregation; it needs [secagg] "
                "enabled = true (or use 'sample', where every site noises its own update)"
            )

    def _check_sharing(self) -> None:
        """Refuse partial sharing where its subset cannot be honoured (and say why)."""
        check_fraction(self.sharing.fraction)
        if not self.sharing.partial:
            return
        if self.strategy.name in _STATEFUL_STRATEGIES:
            raise ConfigError(
                f"sharing.fraction = {self.sharing.fraction} shares a different subset every "
                f"round, but strategy {self.strategy.name!r} keeps per-coordinate server "
                "moments that would not follow it; use fedavg, fedprox, norm_bounding, median "
                "or trimmed_mean with partial sharing, or set sharing.fraction = 1.0"
            )
        if self.privacy.mode in ("distributed", "sample_distributed"):
            raise ConfigError(
                f"sharing.fraction < 1 with privacy.mode = {self.privacy.mode!r} is not "
                "supported: the ring modes calibrate the discrete noise, the rotation and the "
                "ring to the whole model's length; use 'sample' (patient-level DP-SGD) or "
                "'central', or set sharing.fraction = 1.0"
            )


def _section(doc: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    sec = doc.get(name, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"[{name}] must be a table")
    unknown = set(sec) - allowed
    if unknown:
        raise ConfigError(f"[{name}]: unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")
    return sec


def _typed(sec: dict[str, Any], name: str, cls: type[Any], types: dict[str, type]) -> Any:
    values: dict[str, Any] = {}
    for key, value in sec.items():
        want = types[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{name}.{key} must be {want.__name__}, got {value!r}")
        values[key] = value
    return cls(**values)


def parse_config(doc: dict[str, Any], base: Path) -> Config:
    """Build a :class:`Config` from a decoded TOML document.

    Parameters
    ----------
    doc : dict
        Decoded TOML.
    base : Path
        Folder relative paths are resolved against.

    Returns
    -------
    Config
        The validated configuration.

    Raises
    ------
    ConfigError
        Missing, unknown or ill-typed keys, or inconsistent values.
    """
    sections = {
        "job",
        "model",
        "strategy",
        "deadlines",
        "server",
        "tls",
        "secagg",
        "privacy",
        "sharing",
        "retention",
    }
    unknown = set(doc) - sections
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)}")

    def path(value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty path string")
        p = Path(value)
        return p if p.is_absolute() else (base / p).resolve()

    job_types = {
        "name": str,
        "rounds": int,
        "seed": int,
        "cohort_size": int,
        "min_clients": int,
        "wait_for_clients": int,
        "max_consecutive_aborts": int,
        "active_window_s": float,
        "max_weight": int,
        "max_update_norm": float,
    }
    job = _typed(_section(doc, "job", set(job_types)), "job", JobConfig, job_types)
    strat_types = {
        "name": str,
        "epochs": int,
        "batch_size": int,
        "learning_rate": float,
        "server_learning_rate": float,
        "local_momentum": float,
        "momentum_restart": bool,
    }
    # Keys other than these are the strategy's own options (its constructor checks them).
    strat_sec = doc.get("strategy", {})
    strat_keys = set(strat_sec) if isinstance(strat_sec, dict) else set()
    strat_doc = dict(_section(doc, "strategy", strat_keys))
    options = {k: strat_doc.pop(k) for k in sorted(set(strat_doc) - set(strat_types))}
    for key, value in options.items():
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"strategy.{key} must be a number, a string or a boolean")
    strategy = _typed(strat_doc, "strategy", StrategyConfig, strat_types)
    if options:
        strategy = replace(strategy, options=options)
    model = _section(doc, "model", {"manifest", "weights"})
    if "manifest" not in model or "weights" not in model:
        raise ConfigError("[model] needs 'manifest' and 'weights'")
    deadlines_doc = _section(doc, "deadlines", {"train", "evaluate"})
    deadlines = {"train": 60.0, "evaluate": 30.0}
    for key, value in deadlines_doc.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"deadlines.{key} must be a number of seconds, got {value!r}")
        deadlines[key] = float(value)
    srv_types = {
        "host": str,
        "port": int,
        "state_dir": str,
        "max_upload_bytes": int,
        "max_concurrent_uploads": int,
        "max_queued_uploads": int,
        "max_requests_per_client": int,
        "max_clock_skew_s": float,
        "long_poll_max_s": float,
        "exit_when_finished": bool,
        "linger_s": float,
    }
    revocation_keys = ("consortium_root", "revocation_list")
    srv_doc = dict(_section(doc, "server", set(srv_types) | set(revocation_keys)))
    state_dir = path(srv_doc.pop("state_dir", "state"), "server.state_dir")
    revocation = {k: path(srv_doc.pop(k), f"server.{k}") for k in revocation_keys if k in srv_doc}
    if len(revocation) == 1:
        raise ConfigError(
            "[server] consortium_root and revocation_list go together (the list is checked "
            "against the root): set both or neither"
        )
    server = _typed(srv_doc, "server", ServerConfig, srv_types)
    server = ServerConfig(**{**server.__dict__, "state_dir": state_dir, **revocation})
    tls_doc = _section(doc, "tls", {"cert", "key", "client_ca"})
    tls = TLSConfig(**{k: path(v, f"tls.{k}") for k, v in tls_doc.items()})
    secagg_types: dict[str, type] = {
        "enabled": bool,
        "adversarial_fraction": float,
        "quant_bits": int,
        "dropout_fraction": float,
        "clip_range": float,
        "max_weight": int,
        "consistency_check": bool,
        "advertise": float,
        "share": float,
        "mask": float,
        "consistency": float,
        "unmask": float,
        "stage_grace_s": float,
        "stage_grace_factor": float,
        "stage_grace_floor_s": float,
    }
    secagg = _typed(
        _section(doc, "secagg", set(secagg_types)), "secagg", SecAggConfig, secagg_types
    )
    return Config(
        manifest=path(model["manifest"], "model.manifest"),
        weights=path(model["weights"], "model.weights"),
        job=job,
        strategy=strategy,
        deadlines=deadlines,
        server=server,
        tls=tls,
        secagg=secagg,
        privacy=parse_privacy(doc.get("privacy", {})),
        sharing=_typed(
            _section(doc, "sharing", {"fraction"}), "sharing", SharingConfig, {"fraction": float}
        ),
        retention=_typed(
            _section(doc, "retention", set(_RETENTION_TYPES)),
            "retention",
            RetentionConfig,
            _RETENTION_TYPES,
        ),
    )


_RETENTION_TYPES: dict[str, type] = {"keep_models": int, "prune_updates": bool}


def load_config(path: str | Path) -> Config:
    """Read and validate a job config file.

    Parameters
    ----------
    path : str or Path
        TOML file.

    Returns
    -------
    Config
        The configuration, paths resolved against the file's folder.

    Raises
    ------
    ConfigError
        Unreadable file, invalid TOML or invalid values.
    """
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    return parse_config(doc, p.resolve().parent)


def _toml_scalar(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's too
    raise ConfigError(f"{key}: cannot write a {type(value).__name__} to a job config")


def render_toml(doc: dict[str, dict[str, Any]], header: str = "") -> str:
    """Render a config document (the form :func:`parse_config` takes) as TOML text.

    Sections are tables of scalars (str, bool, int, float, Path). Validate the document
    with :func:`parse_config` first; :func:`load_config` reads the text back to the same
    :class:`Config`.

    Parameters
    ----------
    doc : dict
        ``{section: {key: value}}``.
    header : str
        Comment lines put first (each prefixed with ``# ``).

    Returns
    -------
    str
        The TOML text.

    Raises
    ------
    ConfigError
        A value that is not a finite scalar.

    Examples
    --------
    >>> print(render_toml({"job": {"name": "demo", "rounds": 3}, "deadlines": {"train": 30.0}}))
    [job]
    name = "demo"
    rounds = 3
    <BLANKLINE>
    [deadlines]
    train = 30.0
    <BLANKLINE>
    """
    lines = [f"# {line}" for line in header.splitlines()]
    for section, table in doc.items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_scalar(v, f'{section}.{k}')}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
