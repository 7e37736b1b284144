"""Accuracy vs epsilon on the breast-cancer federation (3 sites), delta = 1e-5.

Trains a logistic-regression model (31 parameters) with in-process FedAvg, using the
internal reference driver ``tests.privacy.reference`` (the real ``confide.training`` is
not wired to the privacy layer yet), for every epsilon in {0.5, 1, 2, 4, 8, inf} with

* patient-level DP-SGD at every site (Poisson sampling of patients, per-patient clipping,
  noise calibrated with the PLD accountant for the whole run), and
* client-level DP with the distributed discrete Gaussian (each site adds its noise share
  before secure aggregation, calibrated for the worst case of t = 2 of 3 survivors,
  RDP-accounted),

next to non-private federated and central (pooled data) baselines. Writes
``benches/results/privacy_accuracy.{csv,md,png}``.

Run::

    python benches/python/bench_privacy.py            # full grid, ~1-2 min on 2 cores
    python benches/python/bench_privacy.py --quick    # one repeat, fewer rounds

Needs scikit-learn (the data set) and matplotlib (the plot), plus the ``privacy`` extra.
Data splits use numpy's generator (data only); every privacy-relevant random draw comes
from ``confide.SecureRng`` (seeded per repeat so the table is reproducible).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np

from confide import SecureRng
from confide.privacy import (
    DPSGD,
    DDGConfig,
    PrivacyAccountant,
    calibrate_ddg,
    calibrate_noise_multiplier,
    ddg_event,
    dpsgd_event,
)
from confide.privacy.accountant import calibrate
from tests.privacy.reference import Site, accuracy, fedavg, local_dpsgd, local_sgd

DELTA = 1e-5
EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0, math.inf]
RESULTS = Path(__file__).resolve().parents[1] / "results"


def load_sites(n_sites: int = 3, seed: int = 0) -> tuple[list[Site], np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype(np.float64)
    y = data.target.astype(np.float32)
    gen = np.random.default_rng(seed)  # data split only
    perm = gen.permutation(len(y))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    # Feature scaling from public ranges would be the private choice; for the benchmark we
    # standardise with training statistics (not charged to the privacy budget).
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-12
    x = ((x - mu) / sd).astype(np.float32)
    sites = [Site(x[idx], y[idx]) for idx in np.array_split(train, n_sites)]
    return sites, x[test], y[test]


def run_central(
    sites: list[Site], xt: np.ndarray, yt: np.ndarray, steps: int, rng: SecureRng
) -> float:
    pooled = Site(np.concatenate([s.x for s in sites]), np.concatenate([s.y for s in sites]))
    p = local_sgd(np.zeros(pooled.x.shape[1] + 1, np.float32), pooled, steps, 0.5, 32, rng)
    return accuracy(p, xt, yt)


def run_fedavg(
    sites: list[Site], xt: np.ndarray, yt: np.ndarray, rounds: int, local: int, rng: SecureRng
) -> float:
    p = np.zeros(sites[0].x.shape[1] + 1, np.float32)
    for _ in range(rounds):
        ups = [local_sgd(p, s, local, 0.5, 32, rng) - p for s in sites]
        p = fedavg(p, ups, weights=[len(s.y) for s in sites])
    return accuracy(p, xt, yt)


def run_dpsgd(
    sites: list[Site],
    xt: np.ndarray,
    yt: np.ndarray,
    eps: float,
    rounds: int,
    local: int,
    rng: SecureRng,
    batch: float = 32.0,
    clip: float = 1.0,
) -> tuple[float, float]:
    q = max(batch / s.n_patients for s in sites)  # worst site sets the guarantee
    steps = rounds * local
    z = 0.0 if math.isinf(eps) else calibrate_noise_multiplier(eps, DELTA, q, steps, tol=1e-2)
    acc = PrivacyAccountant(DELTA)
    p = np.zeros(sites[0].x.shape[1] + 1, np.float32)
    for r in range(rounds):
        ups = []
        for s in sites:
            qs = batch / s.n_patients
            opt = DPSGD(clip, z, expected_batch_size=batch, momentum=0.5, rng=rng)
            ups.append(local_dpsgd(p, s, local, 0.5, opt, qs, rng) - p)
        if z > 0:
            acc.record_round(r, [dpsgd_event(q, z, local)])
        p = fedavg(p, ups, weights=[len(s.y) for s in sites])
    return accuracy(p, xt, yt), (acc.epsilon() if z > 0 else math.inf)


def run_ddg(
    sites: list[Site],
    xt: np.ndarray,
    yt: np.ndarray,
    eps: float,
    rounds: int,
    local: int,
    rng: SecureRng,
    clip: float = 1.0,
) -> tuple[float, float]:
    n = len(sites)
    dim = sites[0].x.shape[1] + 1

    def params(z: float) -> object:
        return calibrate_ddg(DDGConfig(dim, clip, z, num_clients=n, threshold=2, bits=32))

    if math.isinf(eps):
        ddg = calibrate_ddg(DDGConfig(dim, clip, 0.0, num_clients=n, threshold=2, bits=32))
    else:
        z = calibrate(lambda z: [ddg_event(params(z), rounds)], eps, DELTA)  # type: ignore[arg-type]
        ddg = calibrate_ddg(DDGConfig(dim, clip, z, num_clients=n, threshold=2, bits=32))
    acc = PrivacyAccountant(DELTA)
    p = np.zeros(dim, np.float32)
    for r in range(rounds):
        ups = [local_sgd(p, s, local, 0.5, 32, rng) - p for s in sites]
        if not math.isinf(eps):
            acc.record_round(r, [ddg_event(ddg)])
        p = fedavg(p, ups, clip_norm=clip, ddg=ddg, round_id=r, rng=rng)
    return accuracy(p, xt, yt), (acc.epsilon() if not math.isinf(eps) else math.inf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer rounds")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    rounds, local = (5, 5) if args.quick else (20, 5)
    ddg_rounds = 5 if args.quick else 10
    sites, xt, yt = load_sites()
    t0 = time.time()

    rows: list[dict[str, object]] = []

    def add(setting: str, eps: float, accs: list[float], spent: float) -> None:
        rows.append(
            {
                "setting": setting,
                "target_epsilon": eps,
                "spent_epsilon": spent,
                "accuracy_mean": float(np.mean(accs)),
                "accuracy_std": float(np.std(accs)),
            }
        )
        print(
            f"{setting:>28} eps={eps:>4} spent={spent:8.3f} "
            f"acc={np.mean(accs):.3f}±{np.std(accs):.3f}"
        )

    seeds = [SecureRng(bytes([i]) * 32) for i in range(repeats)]
    add(
        "central (pooled, no DP)",
        math.inf,
        [run_central(sites, xt, yt, rounds * local * 3, s) for s in seeds],
        math.inf,
    )
    seeds = [SecureRng(bytes([i]) * 32) for i in range(repeats)]
    add(
        "federated (FedAvg, no DP)",
        math.inf,
        [run_fedavg(sites, xt, yt, rounds, local, s) for s in seeds],
        math.inf,
    )
    for eps in EPSILONS:
        seeds = [SecureRng(bytes([i]) * 32) for i in range(repeats)]
        res = [run_dpsgd(sites, xt, yt, eps, rounds, local, s) for s in seeds]
        add("patient-level DP-SGD", eps, [a for a, _ in res], res[0][1])
    for eps in EPSILONS:
        seeds = [SecureRng(bytes([i]) * 32) for i in range(repeats)]
        res = [run_ddg(sites, xt, yt, eps, ddg_rounds, local, s) for s in seeds]
        add("client-level DDG (t=2 of 3)", eps, [a for a, _ in res], res[0][1])
    print(f"total {time.time() - t0:.1f}s")
    write(rows, repeats, rounds, local, ddg_rounds)


def write(
    rows: list[dict[str, object]], repeats: int, rounds: int, local: int, ddg_rounds: int
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "privacy_accuracy.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"Breast cancer, 3 IID sites, logistic regression, delta=1e-5, mean ± std over {repeats} "
        f"repeats; DP-SGD: {rounds} rounds x {local} local steps; DDG: {ddg_rounds} rounds.",
        "",
        "| setting | target ε | accounted ε | test accuracy |",
        "|---|---|---|---|",
    ]
    for r in rows:
        te = "∞" if math.isinf(float(r["target_epsilon"])) else f"{r['target_epsilon']:g}"  # type: ignore[arg-type]
        sp = "∞" if math.isinf(float(r["spent_epsilon"])) else f"{r['spent_epsilon']:.3f}"  # type: ignore[arg-type]
        lines.append(
            f"| {r['setting']} | {te} | {sp} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} |"
        )
    (RESULTS / "privacy_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [e for e in EPSILONS if not math.isinf(e)]
    pos = list(range(len(EPSILONS)))
    for setting, marker in (("patient-level DP-SGD", "o"), ("client-level DDG (t=2 of 3)", "s")):
        sel = [r for r in rows if r["setting"] == setting]
        ax.errorbar(
            pos,
            [r["accuracy_mean"] for r in sel],
            yerr=[r["accuracy_std"] for r in sel],
            marker=marker,
            capsize=3,
            label=setting,
        )
    for setting, style in (("central (pooled, no DP)", "--"), ("federated (FedAvg, no DP)", ":")):
        val = next(r["accuracy_mean"] for r in rows if r["setting"] == setting)
        ax.axhline(val, linestyle=style, color="gray", label=setting)  # type: ignore[arg-type]
    ax.set_xticks(pos, [f"{e:g}" for e in xs] + ["∞"])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Breast cancer, 3 sites: accuracy vs ε")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "privacy_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
