"""The Dopamine experiment, done properly: ``confide-server dopamine``.

Dopamine (Malekzadeh et al. 2021) proposed federated patient-level DP-SGD under secure
aggregation for SqueezeNet on medical images, with server-side momentum; its code never had
the secure aggregation, and its noise came from a non-cryptographic generator. This command
runs the same design with confide's real parts, on the offline lesion task of
:mod:`confide.data.lesions` (real scans bundled with pydicom and scikit-image, **synthetic**
lesions), three arms on the same patient split:

1. **distributed DP-SGD** (``privacy.mode = "sample_distributed"``): ``sites`` hospitals
   over HTTP on loopback, real SecAgg+; each round is one DP-SGD step whose noise every
   hospital adds to its sum of clipped per-patient gradients inside the ring, calibrated so
   the secure sum carries the accounted noise even with only the threshold number of
   honest survivors; the server divides by the public expected batch and applies momentum
   (``fedavgm``, post-processing). Epsilon per round from the PLD accountant (central
   DP-SGD over the union of patients).
2. **non-private FedAvg**: the same hospitals and split, local SGD epochs, no DP.
3. **central**: the same model and initial weights trained on the pooled training split.

It prints the accuracy and epsilon of every round, writes ``dopamine.json`` (every number)
and ``dopamine.png`` (accuracy per round of both federations, the central line, epsilon on
a second axis). The final DP model can be signed as a device release (``--release``), which
``make app`` opens in the patient app.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from confide.errors import ConfigError
from confide.training import TrainConfig, build_trainer
from confide_server.config import load_config
from confide_server.simulate import SimulationOptions, prepare_job, run_simulation
from confide_server.store import Store

__all__ = ["DopamineOptions", "main_dopamine", "run_dopamine"]


@dataclass(frozen=True)
class DopamineOptions:
    """The experiment's knobs (defaults: ``make demo-images``, under 10 minutes on 2 cores).

    Parameters
    ----------
    sites : int
        Hospitals (>= 3).
    model : {"squeezenet", "small_cnn"}
        SqueezeNet 1.1 (the experiment) or the small CNN (fast tests).
    rounds : int
        Rounds of the DP arm: one DP-SGD step each.
    fedavg_rounds : int
        Rounds of the non-private FedAvg arm (``local_epochs`` local epochs each).
    image_size, patients_per_site, tiles_per_patient, seed
        The lesion task and its split by patient.
    sampling_rate : float
        Poisson rate ``q`` of a patient per step.
    noise_multiplier : float
        ``z`` of the worst-case secure sum.
    clip_norm : float
        Per-patient clip ``C``.
    dp_learning_rate, momentum : float
        The server's DP-SGD step size and momentum (``fedavgm``).
    learning_rate, local_epochs, batch_size
        Local SGD of the FedAvg arm; the central arm trains ``fedavg_rounds * local_epochs``
        epochs with the same SGD.
    """

    sites: int = 10
    model: str = "squeezenet"
    rounds: int = 12
    fedavg_rounds: int = 3
    image_size: int = 64
    patients_per_site: int = 60
    tiles_per_patient: int = 1
    seed: int = 0
    sampling_rate: float = 0.2
    noise_multiplier: float = 0.9
    clip_norm: float = 1.0
    dp_learning_rate: float = 0.1
    momentum: float = 0.9
    learning_rate: float = 0.05
    local_epochs: int = 1
    batch_size: int = 16
    release: bool = False

    def __post_init__(self) -> None:
        if self.model not in ("squeezenet", "small_cnn"):
            raise ConfigError(f"model must be 'squeezenet' or 'small_cnn', got {self.model!r}")
        if self.sites < 3:
            raise ConfigError(f"sites must be >= 3 (SecAgg+ needs a cohort), got {self.sites}")
        names = (
            "rounds",
            "fedavg_rounds",
            "patients_per_site",
            "tiles_per_patient",
            "local_epochs",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ConfigError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("noise_multiplier", "clip_norm", "dp_learning_rate", "learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")

    def _split(self) -> SimulationOptions:
        """Return what both federations share: sites, model, lesion task and its split."""
        return SimulationOptions(
            clients=self.sites,
            model=self.model,
            data="lesions",
            image_size=self.image_size,
            patients_per_site=self.patients_per_site,
            tiles_per_patient=self.tiles_per_patient,
            seed=self.seed,
            batch_size=self.batch_size,
            train_deadline=300.0,
            evaluate_deadline=120.0,
        )

    def dp_arm(self) -> SimulationOptions:
        """Return the distributed DP-SGD federation's options."""
        return replace(
            self._split(),
            rounds=self.rounds,
            learning_rate=self.dp_learning_rate,
            dp="sample_distributed",
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            sampling_rate=self.sampling_rate,
            secagg=True,
            strategy="fedavgm",
            extra_strategy={"momentum": self.momentum},
            release=self.release,
        )

    def fedavg_arm(self) -> SimulationOptions:
        """Return the non-private FedAvg federation's options (same sites, same split)."""
        return replace(
            self._split(),
            rounds=self.fedavg_rounds,
            epochs=self.local_epochs,
            learning_rate=self.learning_rate,
            dp="none",
            secagg=False,
        )


def _rounds(workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Return the committed rounds (round, accuracy, epsilon) and the privacy summary."""
    from confide_server.engine.privacy import read_privacy

    store = Store(load_config(workdir / "job.toml").server.database)
    try:
        summary, per_round = read_privacy(store)
        rows = store.rounds()
    finally:
        store.close()
    out = []
    for r in rows:
        if r.status != "committed":
            continue
        m = r.metrics or {}
        out.append(
            {
                "round": r.round,
                "accuracy": m.get("eval_accuracy"),
                "epsilon": per_round.get(r.round, {}).get("epsilon"),
            }
        )
    return out, summary


def _central(workdir: Path, opts: DopamineOptions) -> float:
    """Accuracy of the same model trained on the pooled training split (no DP)."""
    files = prepare_job(workdir, opts.fedavg_arm())
    trainer = build_trainer(files.trainer.manifest)
    trainer.set_weights(files.trainer.get_weights())
    cfg = TrainConfig(opts.fedavg_rounds * opts.local_epochs, opts.batch_size, opts.learning_rate)
    trainer.fit(files.train, cfg, seed=opts.seed)
    return float(trainer.evaluate(files.test)["accuracy"])


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp, fa = result["dp"]["rounds"], result["fedavg"]["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(
        [r["round"] for r in dp],
        [r["accuracy"] for r in dp],
        marker="o",
        ms=3,
        label="distributed DP-SGD under SecAgg+ (1 step/round)",
    )
    ax.plot(
        [r["round"] for r in fa],
        [r["accuracy"] for r in fa],
        marker="s",
        ms=4,
        label=f"FedAvg, no DP ({result['options']['local_epochs']} local epoch/round)",
    )
    ax.axhline(
        result["central"]["accuracy"],
        color="gray",
        linestyle="--",
        label=f"central, no DP ({result['central']['accuracy']:.3f})",
    )
    ax.axhline(0.5, color="lightgray", linestyle=":", label="chance")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax2 = ax.twinx()
    ax2.plot(
        [r["round"] for r in dp],
        [r["epsilon"] for r in dp],
        color="tab:red",
        alpha=0.6,
        label="epsilon (DP arm)",
    )
    ax2.set_ylabel(f"epsilon at delta = {result['dp']['delta']:g}", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    ax.set_title(
        f"confide: {result['options']['sites']} hospitals, {result['options']['model']} at "
        f"{result['options']['image_size']}x{result['options']['image_size']}, lesion task"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_dopamine(out: str | Path, opts: DopamineOptions, *, timeout: float = 900.0) -> int:
    """Run the three arms; return 0 when both federations finished.

    Parameters
    ----------
    out : str or Path
        Output folder: the DP arm in ``out`` itself (its ``state/`` holds the release for
        ``make app``), the FedAvg arm in ``out/fedavg``, the central arm's data in
        ``out/central``; ``dopamine.json`` and ``dopamine.png`` in ``out``.
    opts : DopamineOptions
        The experiment.
    timeout : float
        Seconds for each federation.

    Returns
    -------
    int
        Process exit code.
    """
    work = Path(out).resolve()
    t0 = time.monotonic()
    print("== arm 1/3: distributed patient-level DP-SGD under SecAgg+", flush=True)
    rc = run_simulation(work, opts.dp_arm(), timeout=timeout, central=False)
    if rc != 0:
        return rc
    t_dp = time.monotonic() - t0
    print("== arm 2/3: FedAvg without DP (same sites, same split)", flush=True)
    rc = run_simulation(work / "fedavg", opts.fedavg_arm(), timeout=timeout, central=False)
    if rc != 0:
        return rc
    t_fa = time.monotonic() - t0 - t_dp
    print("== arm 3/3: central training without DP (pooled training split)", flush=True)
    central = _central(work / "central", opts)
    t_c = time.monotonic() - t0 - t_dp - t_fa
    dp_rounds, dp_summary = _rounds(work)
    fa_rounds, _ = _rounds(work / "fedavg")
    if dp_summary is None:  # pragma: no cover - the DP arm always has a privacy summary
        raise ConfigError("the DP arm has no privacy summary")
    result = {
        "options": asdict(opts),
        "dp": {
            "rounds": dp_rounds,
            "epsilon": dp_summary["epsilon"],
            "delta": dp_summary["delta"],
            "expected_batch_size": dp_summary.get("expected_batch_size"),
            "seconds": round(t_dp, 1),
        },
        "fedavg": {"rounds": fa_rounds, "seconds": round(t_fa, 1)},
        "central": {"accuracy": central, "seconds": round(t_c, 1)},
        "seconds": round(time.monotonic() - t0, 1),
    }
    (work / "dopamine.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, work / "dopamine.png")
    last_dp = dp_rounds[-1]["accuracy"] if dp_rounds else float("nan")
    last_fa = fa_rounds[-1]["accuracy"] if fa_rounds else float("nan")
    print(
        f"\ndistributed DP-SGD ({opts.rounds} steps, epsilon {dp_summary['epsilon']:.2f} at "
        f"delta {dp_summary['delta']:g}): accuracy {last_dp:.3f}  [{t_dp:.0f} s]"
    )
    print(f"FedAvg, no DP ({opts.fedavg_rounds} rounds):   accuracy {last_fa:.3f}  [{t_fa:.0f} s]")
    print(f"central, no DP:                 accuracy {central:.3f}  [{t_c:.0f} s]")
    print(f"plot: {work / 'dopamine.png'}; numbers: {work / 'dopamine.json'}")
    print(f"done in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


def main_dopamine(argv: Sequence[str]) -> int:
    """``confide-server dopamine``: parse the options and run the experiment."""
    d = DopamineOptions()
    p = argparse.ArgumentParser(
        prog="confide-server dopamine",
        description="The Dopamine experiment: distributed patient-level DP-SGD under "
        "SecAgg+ next to non-private FedAvg and central training (SqueezeNet 1.1, lesion task).",
    )
    p.add_argument("--out", default="demo-images", help="output folder (default %(default)s)")
    p.add_argument("--sites", type=int, default=d.sites, help="hospitals (%(default)s)")
    p.add_argument("--model", choices=["squeezenet", "small_cnn"], default=d.model)
    p.add_argument("--rounds", type=int, default=d.rounds, help="DP-SGD steps (%(default)s)")
    p.add_argument("--fedavg-rounds", type=int, default=d.fedavg_rounds, help="(%(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="(%(default)s)")
    p.add_argument("--patients-per-site", type=int, default=d.patients_per_site)
    p.add_argument("--tiles-per-patient", type=int, default=d.tiles_per_patient)
    p.add_argument("--sampling-rate", type=float, default=d.sampling_rate, help="q")
    p.add_argument("--noise-multiplier", type=float, default=d.noise_multiplier, help="z")
    p.add_argument("--clip-norm", type=float, default=d.clip_norm, help="C per patient")
    p.add_argument("--dp-lr", type=float, default=d.dp_learning_rate, help="server DP-SGD step")
    p.add_argument("--momentum", type=float, default=d.momentum, help="server momentum")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="FedAvg/central SGD lr")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per federation")
    p.add_argument(
        "--release", action="store_true", help="sign the final DP model for the patient app"
    )
    a = p.parse_args(argv)
    try:
        opts = DopamineOptions(
            sites=a.sites,
            model=a.model,
            rounds=a.rounds,
            fedavg_rounds=a.fedavg_rounds,
            image_size=a.image_size,
            patients_per_site=a.patients_per_site,
            tiles_per_patient=a.tiles_per_patient,
            seed=a.seed,
            sampling_rate=a.sampling_rate,
            noise_multiplier=a.noise_multiplier,
            clip_norm=a.clip_norm,
            dp_learning_rate=a.dp_lr,
            momentum=a.momentum,
            learning_rate=a.lr,
            release=a.release,
        )
    except ConfigError as exc:
        p.error(str(exc))
    return run_dopamine(a.out, opts, timeout=a.timeout)
