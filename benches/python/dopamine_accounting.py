"""Dopamine's published privacy numbers, recomputed with confide's accountant.

Dopamine (Malekzadeh et al., 2021, "Dopamine: Differentially Private Federated Learning on
Medical Data") reports epsilon at delta = 1e-4 for two DP-SGD settings on the diabetic-
retinopathy task, from the settings in its repository's README:

* CDP (centralized DP-SGD): noise multiplier 1.0, batch 50 of the ~2,930 training images
  (q = 50/2930), 100 epochs (5,860 steps);
* FSCDP (Dopamine: federated, semi-central DP, 10 hospitals under secure aggregation):
  noise multiplier 1.15 on the secure sum, Poisson rate q = 0.03425 over the union of
  patients, 100 epochs = 100/q = 2,920 steps.

It reported 9.13 (CDP) and 10.71 (FSCDP) using the classic RDP-to-(eps, delta) conversion
``eps = min_a rdp(a) + log(1/delta)/(a - 1)``. confide accounts the same mechanisms with
dp-accounting's PLD accountant (tight) and cross-checks with its RDP accountant (the modern
conversion); the classic conversion is recomputed here to show where the published numbers
come from. Run: ``python benches/python/dopamine_accounting.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math

import dp_accounting

from confide.privacy.accountant import account, dpsgd_event

DELTA = 1e-4
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]
SETTINGS = [
    # name, q, z, steps, published epsilon
    ("CDP (central DP-SGD)", 50 / 2930, 1.0, 5860, 9.13),
    ("FSCDP (Dopamine, 10 hospitals + SecAgg)", 0.03425, 1.15, 2920, 10.71),
]


def classic_rdp_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    """Epsilon with the classic conversion (Mironov 2017, Prop. 3), as Opacus < 1.0 did."""
    acc = dp_accounting.rdp.RdpAccountant(ORDERS)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    rdp = acc._rdp  # the per-order RDP curve after composition
    return min(r + math.log(1 / delta) / (a - 1) for a, r in zip(ORDERS, rdp, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name, q, z, steps, published in SETTINGS:
        res = account([dpsgd_event(q, z, steps)], DELTA)
        classic = classic_rdp_epsilon(q, z, steps, DELTA)
        rows.append(
            {
                "setting": name,
                "q": q,
                "noise_multiplier": z,
                "steps": steps,
                "published": published,
                "classic_rdp": classic,
                "rdp": res.epsilon_rdp,
                "pld": res.epsilon,
            }
        )
    print(f"delta = {DELTA}")
    print(
        f"{'setting':<42} {'q':>8} {'z':>5} {'steps':>6} {'published':>9} "
        f"{'classic RDP':>11} {'RDP':>6} {'PLD':>6}"
    )
    for r in rows:
        print(
            f"{r['setting']:<42} {r['q']:>8.5f} {r['noise_multiplier']:>5.2f} "
            f"{r['steps']:>6} {r['published']:>9.2f} {r['classic_rdp']:>11.2f} "
            f"{r['rdp']:>6.2f} {r['pld']:>6.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
