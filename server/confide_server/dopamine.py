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
   DP-SGD over the union of patients). By default this is DP fine-tuning: only the
   classifier is DP-trained (ring, sensitivity and noise over its parameters only), on a
   trunk trained beforehand on a public task (:func:`public_lesions`: scikit-image's
   natural photographs, none of the hospitals' scans), frozen and pinned in the manifest.
2. **non-private FedAvg**: the same hospitals and split, local SGD epochs, no DP; from the
   same public trunk, training the same classifier (the whole network from the random
   start with ``public_trunk=False``), so the two federations differ only by DP.
3. **central**: the same start and parameters trained on the pooled training split.

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
from confide_server.simulate import (
    _MARKER,
    JobFiles,
    SimulationOptions,
    prepare_job,
    run_simulation,
)
from confide_server.store import Store

__all__ = [
    "HEADS",
    "PUBLIC_IMAGES",
    "DopamineOptions",
    "main_dopamine",
    "pretrain_public_trunk",
    "public_lesions",
    "run_dopamine",
]

#: The classifier of each model: what the DP arm trains by default.
HEADS: dict[str, tuple[str, ...]] = {"squeezenet": ("classifier",), "small_cnn": ("head",)}

#: scikit-image's bundled natural photographs (no medical image among them): the public
#: backgrounds of the pretraining task. The hospitals' scans (pydicom's CT/MR slices,
#: scikit-image's retina and microaneurysms) are not used.
PUBLIC_IMAGES = (
    "camera",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "moon",
    "coins",
    "grass",
    "gravel",
    "brick",
)


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
        epochs of the pooled split with the same SGD at ``learning_rate / sites``.
    dp_trainable : tuple of str, optional
        Parameter-name prefixes the DP arm trains, the rest frozen and pinned (spec
        ``trainable``); default the model's classifier (:data:`HEADS`); ``()``: all.
    public_trunk : bool
        Start the DP arm from a model trained centrally on :func:`public_lesions` (public
        natural images only; its classifier is reset to the random initialisation).
    public_patients, public_epochs : int
        Size of that public task (one tile per public "patient") and its training epochs.
    public_learning_rate : float
        Adam's peak step of the public pretraining (:func:`_public_fit`).
    """

    sites: int = 10
    model: str = "squeezenet"
    rounds: int = 20
    fedavg_rounds: int = 3
    image_size: int = 64
    patients_per_site: int = 60
    tiles_per_patient: int = 1
    seed: int = 0
    sampling_rate: float = 0.2
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    dp_learning_rate: float = 0.3
    momentum: float = 0.9
    learning_rate: float = 0.05
    local_epochs: int = 1
    batch_size: int = 16
    release: bool = False
    dp_trainable: tuple[str, ...] | None = None
    public_trunk: bool = True
    public_patients: int = 1200
    public_epochs: int = 6
    public_learning_rate: float = 1e-3

    @property
    def trainable(self) -> tuple[str, ...]:
        """Parameter-name prefixes the DP arm trains (``()``: the whole network)."""
        if self.dp_trainable is None:
            return HEADS[self.model]
        return tuple(self.dp_trainable)

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
            "public_patients",
            "public_epochs",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ConfigError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in (
            "noise_multiplier",
            "clip_norm",
            "dp_learning_rate",
            "learning_rate",
            "public_learning_rate",
        ):
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

    def dp_arm(self, init_weights: str | None = None) -> SimulationOptions:
        """Return the distributed DP-SGD federation's options (``init_weights``: its start)."""
        return replace(
            self._split(),
            trainable=self.trainable,
            init_weights=init_weights,
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

    def fedavg_arm(self, init_weights: str | None = None) -> SimulationOptions:
        """Return the non-private FedAvg federation's options (same sites, same split).

        With ``init_weights`` (the public trunk) it starts where the DP arm starts and
        trains the same parameters (:attr:`trainable`), so the two federations differ only
        by DP; without, it trains the whole network from the random initialisation.
        """
        return replace(
            self._split(),
            trainable=self.trainable if init_weights is not None else (),
            init_weights=init_weights,
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


def public_lesions(n_patients: int, size: int, seed: int) -> Any:
    """Return the public pretraining task: synthetic lesions on :data:`PUBLIC_IMAGES`.

    The same lesion generator as the hospitals' task (:mod:`confide.data.lesions`), one
    tile per public "patient", but its backgrounds are scikit-image's natural photographs,
    none of the scans the hospitals' tiles are cut from, and its seed is separated from
    theirs: no patient record is involved.

    Returns
    -------
    confide.data.images.ArrayDataset
        ``n_patients`` tiles ``(3, size, size)``.
    """
    import numpy as np
    import skimage.data

    from confide.data.lesions import _normalise, _shrink, lesion_dataset

    scans = {}
    for name in PUBLIC_IMAGES:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if img.ndim == 3:
            img = img[..., :3].mean(axis=-1)
        scans[name] = _shrink(_normalise(img))
    return lesion_dataset(n_patients, 1, size, seed=10_000 + seed, scans=scans)


def _public_fit(trainer: Any, data: Any, opts: DopamineOptions) -> None:
    """Train every parameter of ``trainer`` on the public task (no DP: no patient data).

    Adam at ``public_learning_rate`` with a linear warm-up over the first 5 % of the steps
    and a cosine decay to zero, batches of 32, a random horizontal flip and quarter turn
    per batch, gradient norm clipped at 5. Plain SGD at a constant step (the previous
    recipe) left SqueezeNet, which has no BatchNorm, anywhere from a good feature
    extractor to a poor one depending on the public seed; this recipe is steadier (the
    measurements are in the README). Deterministic from ``opts.seed`` on CPU.
    """
    import numpy as np
    import torch
    from torch.nn.functional import cross_entropy

    from confide.training.torch_engine import TorchTrainer

    if not isinstance(trainer, TorchTrainer):  # pragma: no cover - image jobs are torch jobs
        raise ConfigError(f"public pretraining needs a torch job, got {type(trainer).__name__}")
    x_np, y_np = data.batch(np.arange(len(data), dtype=np.int64))
    x_all = torch.from_numpy(np.ascontiguousarray(x_np)).to(trainer.device)
    y_all = torch.from_numpy(np.asarray(y_np, dtype=np.int64)).to(trainer.device)
    module = trainer.module
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.public_learning_rate)
    batch = 32
    n = len(data)
    total = opts.public_epochs * math.ceil(n / batch)
    warm = max(1, round(0.05 * total))
    gen = torch.Generator().manual_seed(10_000 + opts.seed)
    module.train()
    step = 0
    for _ in range(opts.public_epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start : start + batch].to(trainer.device)
            x = x_all[idx]
            if bool(torch.rand(1, generator=gen) < 0.5):
                x = x.flip(3)
            x = torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), (2, 3))
            frac = step / total
            scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * frac))
            for group in optimizer.param_groups:
                group["lr"] = opts.public_learning_rate * scale
            loss = cross_entropy(module(x), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            step += 1
    module.eval()
    if not bool(torch.isfinite(trainer.flat_parameters).all()):
        raise ConfigError("public pretraining diverged (NaN or Inf weights); lower --public-lr")


def pretrain_public_trunk(files: JobFiles, opts: DopamineOptions, path: Path) -> dict[str, Any]:
    """Train the job's initial model on :func:`public_lesions`; write it to ``path``.

    The trained model's trainable part (the DP arm's classifier) is reset to the initial
    weights, so everything the DP arm's classifier learns it learns under DP; its frozen
    trunk is then what the public task taught (:func:`_public_fit`). Returns what was done
    (for the JSON).
    """
    from confide.protocol.manifest import encode_tensors
    from confide.training.trainable import is_trainable

    t0 = time.monotonic()
    public = public_lesions(opts.public_patients, opts.image_size, opts.seed)
    trainer = build_trainer(files.trainer.manifest)
    init = files.trainer.get_weights()
    trainer.set_weights(init)
    _public_fit(trainer, public, opts)
    public_acc = float(trainer.evaluate(public)["accuracy"])
    weights = trainer.get_weights()
    offset = 0
    prefixes = opts.trainable or None
    for t in files.trainer.manifest.tensors:
        n = math.prod(t.shape)
        if prefixes is not None and is_trainable(t.name, prefixes):
            weights[offset : offset + n] = init[offset : offset + n]
        offset += n
    path.write_bytes(encode_tensors(files.trainer.manifest, weights))
    return {
        "backgrounds": list(PUBLIC_IMAGES),
        "tiles": len(public),
        "epochs": opts.public_epochs,
        "optimizer": f"adam lr {opts.public_learning_rate:g}, warm-up + cosine, batch 32",
        "train_accuracy": public_acc,
        "seconds": round(time.monotonic() - t0, 1),
    }


def _central(files: JobFiles, opts: DopamineOptions, init: Path | None) -> float:
    """Accuracy of the same model trained on the pooled training split (no DP).

    With ``init`` (the public trunk) it starts there and trains the DP arm's parameters
    only, as both federations do; without, the whole network from the initial weights.
    The pooled split gives ``sites`` times as many SGD steps per epoch as one site's, so the
    step is ``learning_rate / sites``: per epoch the model moves as far as FedAvg's average
    of the sites' epochs (at the sites' own step the head diverged to one class, 0.51).
    """
    from confide.protocol.manifest import decode_tensors
    from confide.training.trainable import with_trainable

    manifest = files.trainer.manifest
    weights = files.trainer.get_weights()
    if init is not None:
        weights = decode_tensors(manifest, init.read_bytes())[0]
        if opts.trainable:
            manifest = with_trainable(manifest, opts.trainable, weights)
    trainer = build_trainer(manifest)
    trainer.set_weights(weights)
    lr = opts.learning_rate / opts.sites
    cfg = TrainConfig(opts.fedavg_rounds * opts.local_epochs, opts.batch_size, lr)
    trainer.fit(files.train, cfg, seed=opts.seed)
    return float(trainer.evaluate(files.test)["accuracy"])


def _describe_trainable(files: JobFiles, opts: DopamineOptions) -> dict[str, Any]:
    """Which parameters the DP arm trains: names, count, total."""
    from confide.training.trainable import is_trainable

    prefixes = opts.trainable or None
    tensors = files.trainer.manifest.tensors
    names = [t.name for t in tensors if is_trainable(t.name, prefixes)]
    count = sum(math.prod(t.shape) for t in tensors if t.name in names)
    return {
        "prefixes": list(opts.trainable),
        "names": names if prefixes is not None else ["all"],
        "count": count,
        "total": files.trainer.manifest.size,
    }


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
    if work.is_dir() and not (work / _MARKER).exists() and any(work.iterdir()):
        raise ConfigError(
            f"--out {work}: the folder is not empty and was not written by confide-server "
            "dopamine; pass a new or empty folder (earlier output is replaced)"
        )
    work.mkdir(parents=True, exist_ok=True)
    (work / _MARKER).touch()
    t0 = time.monotonic()
    # The central arm's files are the job's split and initial model (all arms share them).
    central_files = prepare_job(work / "central", opts.fedavg_arm())
    public: dict[str, Any] | None = None
    init: str | None = None
    if opts.public_trunk:
        print(
            f"== public pretraining: {opts.public_patients} synthetic-lesion tiles on "
            f"scikit-image's natural photographs ({', '.join(PUBLIC_IMAGES)}), "
            f"{opts.public_epochs} epochs, no patient data",
            flush=True,
        )
        path = work / "central" / "public_trunk.safetensors"
        public = pretrain_public_trunk(central_files, opts, path)
        init = str(path)
        print(
            f"   public train accuracy {public['train_accuracy']:.3f} [{public['seconds']:.0f} s]"
        )
    t_pub = time.monotonic() - t0
    dp_opts = opts.dp_arm(init)
    trainable = _describe_trainable(central_files, opts)
    print(
        "== arm 1/3: distributed patient-level DP-SGD under SecAgg+; DP-trained parameters: "
        f"{', '.join(trainable['names'])} ({trainable['count']} of {trainable['total']}; "
        f"the rest frozen at the {'public-pretrained' if opts.public_trunk else 'initial'} "
        "values, pinned in the manifest)",
        flush=True,
    )
    rc = run_simulation(work, dp_opts, timeout=timeout, central=False)
    if rc != 0:
        return rc
    t_dp = time.monotonic() - t0 - t_pub
    start = (
        f"from the public trunk, training {', '.join(trainable['names'])}"
        if opts.public_trunk
        else "from the random start, training the whole network"
    )
    print(f"== arm 2/3: FedAvg without DP (same sites, same split; {start})", flush=True)
    rc = run_simulation(work / "fedavg", opts.fedavg_arm(init), timeout=timeout, central=False)
    if rc != 0:
        return rc
    t_fa = time.monotonic() - t0 - t_pub - t_dp
    print(f"== arm 3/3: central training without DP (pooled training split; {start})", flush=True)
    central = _central(central_files, opts, None if init is None else Path(init))
    t_c = time.monotonic() - t0 - t_pub - t_dp - t_fa
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
            "trainable": trainable,
            "public_pretraining": public,
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
    p.add_argument(
        "--lr", type=float, default=d.learning_rate, help="FedAvg SGD lr (central: lr / sites)"
    )
    p.add_argument(
        "--dp-trainable",
        default=None,
        help="comma-separated parameter-name prefixes the DP arm trains, or 'all' "
        "(default: the model's classifier)",
    )
    p.add_argument(
        "--public-trunk",
        action=argparse.BooleanOptionalAction,
        default=d.public_trunk,
        help="pretrain the frozen trunk on the public natural-image task (default on)",
    )
    p.add_argument("--public-patients", type=int, default=d.public_patients)
    p.add_argument("--public-epochs", type=int, default=d.public_epochs)
    p.add_argument(
        "--public-lr", type=float, default=d.public_learning_rate, help="Adam, public task"
    )
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
            dp_trainable=None
            if a.dp_trainable is None
            else ()
            if a.dp_trainable == "all"
            else tuple(x.strip() for x in a.dp_trainable.split(",") if x.strip()),
            public_trunk=a.public_trunk,
            public_patients=a.public_patients,
            public_epochs=a.public_epochs,
            public_learning_rate=a.public_lr,
        )
    except ConfigError as exc:
        p.error(str(exc))
    return run_dopamine(a.out, opts, timeout=a.timeout)
