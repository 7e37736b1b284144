"""Heterogeneity study: non-IID label skew x aggregation strategy, momentum restarting, and
partial model sharing, on scikit-learn's breast-cancer set.

The shape of NVIDIA FLARE's non-IID study (Dirichlet alpha in {0.1, 0.5, 1.0, 100} x
{FedAvg, FedProx, FedAdam, FedAvgM}, accuracy of the global model after a fixed number of
rounds), plus two ablations:

* **momentum restarting** (as the Clara FL work studied): local heavy-ball momentum 0.9,
  reset at every round (``momentum_restart = true``) or kept per site across rounds
  (``false``), FedAvg, every alpha;
* **partial model sharing**: 10/20/40/100 % of the parameters shared per round
  (:mod:`confide.protocol.sharing`), FedAvg, alpha 0.5; upload bytes are the encoded
  safetensors bodies a site would send (:func:`confide.protocol.sharing.shared_manifest`),
  accuracy both of the global model and of the sites' own (partly local) models.

**In-process**: no server, no HTTP, no SecAgg. The loop is FedAvg's (every site trains from
the round's model, deltas go to the strategy in client-id order), with confide's real
strategies (:func:`confide.strategies.get_strategy`), the real numpy trainer
(:class:`confide.training.NumpyTrainer`, MLP 30-16-2, tanh), the real Dirichlet split
(:func:`confide.data.partition_dirichlet`) and the real partial-sharing selection, so the
numbers are the algorithms', not the federation runtime's. All seeds are fixed: the run is
deterministic on one machine.

Run::

    python benches/python/heterogeneity.py            # ~1-3 min on a busy 2-core VM
    python benches/python/heterogeneity.py --quick    # seconds; used by tests/bench

Writes ``benches/results/heterogeneity.json`` and ``.png`` (``--out`` to choose the stem).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.data import Dataset, load_breast_cancer, partition_dirichlet, train_test_split
from confide.data.tabular import Standardizer
from confide.protocol.manifest import encode_tensors
from confide.protocol.sharing import (
    local_start,
    round_seed,
    scatter,
    select,
    shared_indices,
    shared_manifest,
)
from confide.strategies import client_train_options, get_strategy
from confide.training import NumpyTrainer, TrainConfig

ALPHAS = (0.1, 0.5, 1.0, 100.0)
#: name -> (registry name, options): confide.strategies names and their [strategy] keys.
STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "FedAvg": ("fedavg", {}),
    "FedProx": ("fedprox", {"mu": 0.1}),
    "FedAdam": ("fedadam", {"server_learning_rate": 0.03}),
    "FedAvgM": ("fedavgm", {"server_learning_rate": 1.0, "momentum": 0.5}),
}
FRACTIONS = (0.1, 0.2, 0.4, 1.0)
HIDDEN = (16,)


@dataclass(frozen=True)
class Setup:
    """One experiment's fixed knobs."""

    sites: int = 5
    rounds: int = 20
    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 0.05
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass
class Row:
    """One row of the table (means over seeds)."""

    study: str
    alpha: float
    strategy: str
    accuracy: float
    accuracy_std: float
    momentum: float = 0.0
    momentum_restart: bool = True
    fraction: float = 1.0
    upload_bytes_per_site_round: float = 0.0
    site_accuracy: float | None = None


def _data(seed: int) -> tuple[Dataset, Dataset]:
    train, test = train_test_split(load_breast_cancer(), 0.25, seed=seed)
    std = Standardizer.fit(train.x)
    return std.apply(train), std.apply(test)


def _accuracy(weights: NDArray[np.float32], manifest: Any, test: Dataset) -> float:
    return float(NumpyTrainer.from_manifest(manifest, weights).evaluate(test)["accuracy"])


def run_one(
    alpha: float,
    strategy: str,
    seed: int,
    setup: Setup,
    *,
    momentum: float = 0.0,
    momentum_restart: bool = True,
    fraction: float = 1.0,
) -> tuple[float, float, float]:
    """One federation; return (global accuracy, mean site accuracy, upload bytes/site/round)."""
    train, test = _data(seed)
    parts = partition_dirichlet(train.y, setup.sites, alpha, seed=seed, min_size=8)
    sites = [train.subset(p) for p in parts]
    name, options = STRATEGIES[strategy]
    strat = get_strategy(name, **options)
    init = NumpyTrainer.create("mlp", train.n_features, 2, HIDDEN, seed=seed)
    manifest = init.manifest
    cfg = TrainConfig(
        setup.epochs,
        setup.batch_size,
        setup.learning_rate,
        momentum=momentum,
        momentum_restart=momentum_restart,
        **client_train_options(strat),
    )
    trainers = [NumpyTrainer.from_manifest(manifest) for _ in sites]  # one per site: buffers
    local: list[NDArray[np.float32] | None] = [None] * len(sites)
    model = init.get_weights()
    state = strat.initial_state()
    sent = 0
    for rnd in range(1, setup.rounds + 1):
        idx = shared_indices(round_seed("heterogeneity", seed, rnd), manifest.size, fraction)
        updates = []
        for s, (trainer, data) in enumerate(zip(trainers, sites, strict=True)):
            start = local_start(model, local[s], idx) if fraction < 1.0 else model
            trainer.set_weights(start)
            res = trainer.fit(data, cfg, seed=seed * 1000 + rnd * 10 + s)
            after = trainer.get_weights()
            local[s] = after
            delta = select(after - start, idx)
            body_manifest = shared_manifest(len(idx)) if fraction < 1.0 else manifest
            sent += len(encode_tensors(body_manifest, delta, {"num_examples": str(len(data))}))
            updates.append((delta, float(res.num_examples)))
        new_sub, state = strat.aggregate(select(model, idx), updates, state)
        model = scatter(model, idx, new_sub)
    site_acc = float(np.mean([_accuracy(w, manifest, test) for w in local if w is not None]))
    return _accuracy(model, manifest, test), site_acc, sent / (setup.rounds * len(sites))


def _row(study: str, alpha: float, strategy: str, setup: Setup, **kw: Any) -> Row:
    runs = [run_one(alpha, strategy, seed, setup, **kw) for seed in setup.seeds]
    acc = np.array([r[0] for r in runs])
    return Row(
        study=study,
        alpha=alpha,
        strategy=strategy,
        accuracy=float(acc.mean()),
        accuracy_std=float(acc.std()),
        momentum=float(kw.get("momentum", 0.0)),
        momentum_restart=bool(kw.get("momentum_restart", True)),
        fraction=float(kw.get("fraction", 1.0)),
        upload_bytes_per_site_round=float(np.mean([r[2] for r in runs])),
        site_accuracy=float(np.mean([r[1] for r in runs])),
    )


def run(quick: bool = False) -> dict[str, Any]:
    """Run the study; return the JSON document."""
    setup = Setup(rounds=3, seeds=(0,)) if quick else Setup()
    alphas = (0.1, 100.0) if quick else ALPHAS
    strategies = ("FedAvg", "FedAdam") if quick else tuple(STRATEGIES)
    t0 = time.perf_counter()
    rows: list[Row] = []
    for alpha in alphas:
        for strategy in strategies:
            rows.append(_row("strategy", alpha, strategy, setup))
    for alpha in alphas:
        for restart in (True, False):
            rows.append(
                _row("momentum", alpha, "FedAvg", setup, momentum=0.9, momentum_restart=restart)
            )
    partial_alpha = 0.5
    for fraction in (0.2, 1.0) if quick else FRACTIONS:
        rows.append(_row("partial", partial_alpha, "FedAvg", setup, fraction=fraction))
    return {
        "bench": "heterogeneity",
        "in_process": True,
        "dataset": "breast_cancer (sklearn; 75/25 stratified split, standardized)",
        "model": f"NumpyTrainer mlp 30-{'-'.join(map(str, HIDDEN))}-2 tanh",
        "setup": asdict(setup),
        "strategies": {k: {"name": v[0], **v[1]} for k, v in STRATEGIES.items()},
        "quick": quick,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": [asdict(r) for r in rows],
    }


def table(doc: dict[str, Any]) -> str:
    """Markdown tables of a result document."""
    rows = doc["rows"]
    out = ["| alpha | " + " | ".join(s for s in STRATEGIES) + " |", "|---" * 5 + "|"]
    alphas = sorted({r["alpha"] for r in rows if r["study"] == "strategy"})
    for a in alphas:
        cells = []
        for s in STRATEGIES:
            hit = [r for r in rows if r["study"] == "strategy" and r["alpha"] == a]
            hit = [r for r in hit if r["strategy"] == s]
            cells.append(f"{hit[0]['accuracy']:.3f} ± {hit[0]['accuracy_std']:.3f}" if hit else "")
        out.append(f"| {a:g} | " + " | ".join(cells) + " |")
    out += ["", "| alpha | momentum 0.9, restart | momentum 0.9, kept |", "|---|---|---|"]
    for a in sorted({r["alpha"] for r in rows if r["study"] == "momentum"}):
        m = {r["momentum_restart"]: r for r in rows if r["study"] == "momentum" and r["alpha"] == a}
        out.append(
            f"| {a:g} | {m[True]['accuracy']:.3f} ± {m[True]['accuracy_std']:.3f} "
            f"| {m[False]['accuracy']:.3f} ± {m[False]['accuracy_std']:.3f} |"
        )
    out += [
        "",
        "| shared | upload bytes / site / round | global accuracy | site accuracy |",
        "|---|---|---|---|",
    ]
    for r in (r for r in rows if r["study"] == "partial"):
        out.append(
            f"| {r['fraction']:.0%} | {r['upload_bytes_per_site_round']:.0f} "
            f"| {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | {r['site_accuracy']:.3f} |"
        )
    return "\n".join(out)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Accuracy vs alpha per strategy (left), momentum ablation (middle), sharing (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for s in STRATEGIES:
        pts = sorted(
            (r["alpha"], r["accuracy"])
            for r in rows
            if r["study"] == "strategy" and r["strategy"] == s
        )
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", label=s)
    axes[0].set(xscale="log", xlabel="Dirichlet alpha", ylabel="test accuracy", title="strategy")
    axes[0].legend()
    for restart, label in ((True, "restart"), (False, "kept")):
        pts = sorted(
            (r["alpha"], r["accuracy"])
            for r in rows
            if r["study"] == "momentum" and r["momentum_restart"] is restart
        )
        axes[1].plot(*zip(*pts, strict=True), marker="o", label=f"momentum 0.9, {label}")
    axes[1].set(xscale="log", xlabel="Dirichlet alpha", title="local momentum (FedAvg)")
    axes[1].legend()
    part = [r for r in rows if r["study"] == "partial"]
    x = [r["upload_bytes_per_site_round"] for r in part]
    axes[2].plot(x, [r["accuracy"] for r in part], marker="o", label="global model")
    axes[2].plot(x, [r["site_accuracy"] for r in part], marker="s", label="sites' models")
    for r in part:
        axes[2].annotate(f"{r['fraction']:.0%}", (r["upload_bytes_per_site_round"], r["accuracy"]))
    axes[2].set(xlabel="upload bytes / site / round", title="partial sharing (alpha 0.5)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: run, write JSON + PNG, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 alphas, 3 rounds, 1 seed")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "results" / "heterogeneity",
        help="output stem: writes STEM.json and STEM.png",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    doc = run(quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    if not args.no_plot:
        plot(doc, args.out.with_suffix(".png"))
    print(table(doc))
    print(f"\n{doc['seconds']} s (in-process; {'quick' if args.quick else 'full'} run)")
    return doc


if __name__ == "__main__":
    main()
