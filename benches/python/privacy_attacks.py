"""Measured privacy attacks: trap weights against confide's trainer, SecAgg+ and DP-SGD.

Runs the harness of ``tests/attacks/harness.py`` (a malicious server sends a crafted first
layer to 10 small sites of standardized breast-cancer records; one local step of confide's
own trainer; the server inverts what it sees) over several seeds and four arms:
``unprotected`` (the server sees every site's update), ``secagg`` (only the SecAgg+ sum),
``secagg_clip_only`` (the sum, each site running the DP-SGD path with per-sample clipping
and no noise, ``z = 0``) and ``secagg_dp`` (the sum, each site running sample-mode DP-SGD
with ``z = 1``, ``C = 1``). Two first layers: ``binned`` (Fowl et al. 2022) and ``trap``
(Boenisch et al. 2021). The main runs use 32-bit SecAgg+ quantization (the server chooses
it); the binned SecAgg+ arms are rerun at the server's config defaults (16 bits,
``clip_range = 1``), matched at 5 % relative error as well. Then the binned attack once more
on flattened 32x32 lesion tiles (:mod:`confide.data.lesions`; synthetic lesions on real
scans), for a picture: ``trap_weights_images.png``.

Writes ``trap_weights.json`` (every figure), ``trap_weights.png`` (bar chart of the
re-identification rate per arm, with the chance level) and ``trap_weights_records.png``
(a few true records against what the server recovered from the SecAgg+ sum, without and
with DP) into ``--out`` (default ``docs/figures``).

Run from the repository root: ``python benches/python/privacy_attacks.py [--seeds 5]
[--out docs/figures] [--no-images]``. Needs scikit-learn (the data set), matplotlib (the
plots) and, for the tiles, the ``lesions`` extra (pillow, pydicom, scikit-image); takes
about two minutes on one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the harness lives in tests/attacks (shared with the tests)
    sys.path.insert(0, str(ROOT))

from tests.attacks.harness import (  # noqa: E402
    MATCH_REL_ERR,
    Arm,
    ArmResult,
    Kind,
    make_federation,
    make_image_federation,
    reidentification,
    run_arm,
    trap_model,
)

ARMS: tuple[Arm, ...] = ("unprotected", "secagg", "secagg_clip_only", "secagg_dp")
LABELS = {
    "unprotected": "no SecAgg, no DP\n(server sees each update)",
    "secagg": "SecAgg+ only\n(server sees the sum of 10)",
    "secagg_clip_only": "SecAgg+ and per-sample\nclipping, no noise",
    "secagg_dp": "SecAgg+ and DP-SGD\n(z = 1, C = 1)",
}
KINDS: tuple[Kind, ...] = ("binned", "trap")
LOOSE = 5e-2  # the looser match used at the server's default 16-bit quantization


def _summary(rates: list[float]) -> dict[str, float]:
    a = np.asarray(rates)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def run(seeds: int, n_hidden: int) -> tuple[dict[str, Any], dict[str, ArmResult]]:
    """Run every kind, arm and seed; return the JSON document and seed 0's binned results."""
    rows: list[dict[str, Any]] = []
    keep: dict[str, ArmResult] = {}
    for kind in KINDS:
        for seed in range(seeds):
            fed = make_federation(seed)
            model = trap_model(fed.public, kind, n_hidden, seed=seed)
            for arm in ARMS:
                t0 = time.perf_counter()
                res = run_arm(fed, model, arm, seed=seed)
                row = {"kind": kind, "seed": seed, **res.to_json()}
                row["seconds"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
                if kind == "binned" and seed == 0:
                    keep[arm] = res
                print(
                    f"{kind:7s} seed {seed} {arm:17s} re-identified {res.reidentified:6.1%} "
                    f"chance {res.chance:5.1%} ({res.n_records} records)",
                    flush=True,
                )
    # The server's config defaults (secagg.quant_bits = 16, clip_range = 1): a step of
    # 2 / 2^16 blurs the records; the server scales the learning rate down by 10 so the
    # updates fit in [-1, 1], and matches at a looser relative error.
    defaults: list[dict[str, Any]] = []
    for seed in range(seeds):
        fed = make_federation(seed)
        model = trap_model(fed.public, "binned", n_hidden, seed=seed)
        model = dataclasses.replace(model, learning_rate=model.learning_rate * 0.1)
        default_arms: tuple[Arm, ...] = ("secagg", "secagg_dp")
        for arm in default_arms:
            res = run_arm(fed, model, arm, seed=seed, clip_range=1.0, quant_bits=16)
            row = {
                "seed": seed,
                "arm": arm,
                "reidentified_1e-3": res.reidentified,
                "reidentified_5e-2": float((res.errors < LOOSE).mean()),
                "chance_5e-2": reidentification(res.candidates, fed.held_out, LOOSE),
                "median_best_rel_error": float(np.median(res.errors)),
            }
            defaults.append(row)
            print(
                f"16-bit  seed {seed} {arm:17s} re-identified {row['reidentified_5e-2']:6.1%} "
                f"at 5e-2 ({res.reidentified:5.1%} at 1e-3), chance {row['chance_5e-2']:5.1%}",
                flush=True,
            )
    summary = {
        kind: {
            arm: {
                "reidentified": _summary(
                    [r["reidentified"] for r in rows if r["kind"] == kind and r["arm"] == arm]
                ),
                "chance": _summary(
                    [r["chance"] for r in rows if r["kind"] == kind and r["arm"] == arm]
                ),
            }
            for arm in ARMS
        }
        for kind in KINDS
    }
    doc = {
        "what": "re-identification rate of the sites' records from one FedSGD round",
        "match": f"relative L2 error < {MATCH_REL_ERR:g}",
        "chance": "the same matching against 150 held-out records no site holds",
        "sites": 10,
        "records_per_site": [8, 16],
        "n_hidden": n_hidden,
        "dp": {"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 1.0, "steps": 1},
        "secagg": {"quant_bits": 32, "clip_range": 64.0, "weights": "example counts"},
        "seeds": seeds,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "summary": summary,
        "rows": rows,
        "server_defaults": {
            "secagg": {"quant_bits": 16, "clip_range": 1.0},
            "kind": "binned",
            "learning_rate_scale": 0.1,
            "summary": {
                arm: {
                    key: _summary([r[key] for r in defaults if r["arm"] == arm])
                    for key in ("reidentified_1e-3", "reidentified_5e-2", "chance_5e-2")
                }
                for arm in ("secagg", "secagg_dp")
            },
            "rows": defaults,
        },
    }
    return doc, keep


def run_images(seed: int = 0, size: int = 32, n_hidden: int = 512) -> tuple[dict[str, Any], Any]:
    """The binned attack on flattened lesion tiles (one seed): figures and the arms' results."""
    fed = make_image_federation(seed, size=size)
    model = trap_model(fed.public, "binned", n_hidden, seed=seed)
    results: dict[str, ArmResult] = {}
    image_arms: tuple[Arm, ...] = ("unprotected", "secagg", "secagg_dp")
    for arm in image_arms:
        results[arm] = run_arm(fed, model, arm, seed=seed)
        print(
            f"images  seed {seed} {arm:17s} re-identified {results[arm].reidentified:6.1%} "
            f"chance {results[arm].chance:5.1%} ({results[arm].n_records} tiles)",
            flush=True,
        )
    doc = {
        "data": f"synthetic-lesion tiles on real scans (confide.data.lesions), {size}x{size}, "
        "flattened to [0, 1]",
        "seed": seed,
        "n_hidden": n_hidden,
        "arms": [r.to_json() for r in results.values()],
    }
    return doc, (fed, results)


def plot_images(fed: Any, results: dict[str, ArmResult], size: int, out: Path) -> None:
    """True tiles against the closest vectors recovered from the SecAgg+ sum, without/with DP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = fed.records
    picks = list(range(0, len(records), max(1, len(records) // 8)))[:8]
    rows = (("true tile", None), ("SecAgg+ only", "secagg"), ("SecAgg+ and DP-SGD", "secagg_dp"))
    fig, axes = plt.subplots(3, len(picks), figsize=(1.4 * len(picks), 4.6))
    for col, i in enumerate(picks):
        x = records[i]
        for row, (name, arm) in enumerate(rows):
            ax = axes[row, col]
            if arm is None:
                img, title = x, f"tile {i}"
            else:
                cand = results[arm].candidates
                j = int(np.argmin(np.linalg.norm(cand - x[None, :], axis=1)))
                img = cand[j]
                title = f"err {np.linalg.norm(img - x) / np.linalg.norm(x):.0e}"
            ax.imshow(np.clip(img, 0, 1).reshape(size, size), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(
        "Lesion tiles recovered by the server from the SecAgg+ sum of 10 sites (binned trap "
        "layer): closest recovered vector per tile",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out / "trap_weights_images.png", dpi=110)
    plt.close(fig)


def plot(doc: dict[str, Any], keep: dict[str, ArmResult], out: Path) -> None:
    """Write the bar chart and the recovered-records figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.38
    xs = np.arange(len(ARMS))
    for k, (kind, name) in enumerate(
        [("binned", "binned first layer"), ("trap", "random trap neurons")]
    ):
        s = doc["summary"][kind]
        mean = np.array([s[a]["reidentified"]["mean"] for a in ARMS]) * 100
        lo = mean - np.array([s[a]["reidentified"]["min"] for a in ARMS]) * 100
        hi = np.array([s[a]["reidentified"]["max"] for a in ARMS]) * 100 - mean
        bars = ax.bar(xs + (k - 0.5) * width, mean, width, yerr=[lo, hi], capsize=3, label=name)
        for b, m, h in zip(bars, mean, hi, strict=True):
            ax.text(
                b.get_x() + b.get_width() / 2, m + h + 1.5, f"{m:.0f}%", ha="center", fontsize=8
            )
    chance = max(doc["summary"][k][a]["chance"]["max"] for k in KINDS for a in ARMS) * 100
    ax.axhline(
        chance, color="k", lw=0.8, ls="--", label=f"chance (held-out records): {chance:.0f}%"
    )
    ax.set_xticks(xs, [LABELS[a] for a in ARMS], fontsize=8)
    ax.set_ylabel("sites' records re-identified (%)")
    ax.set_ylim(0, 110)
    ax.set_title(
        f"Trap-weight attack on one FedSGD round, 10 sites ({doc['seeds']} seeds; bars: mean, "
        "whiskers: min-max)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "trap_weights.png", dpi=120)
    plt.close(fig)

    fed = make_federation(0)
    records = fed.records
    fig, axes = plt.subplots(2, 3, figsize=(10, 4.8), sharex=True)
    for ax, i in zip(axes.ravel(), range(0, len(records), len(records) // 6), strict=False):
        x = records[i]
        ax.plot(x, "k-", lw=1.2, label="true record")
        for arm, style in (("secagg", "o"), ("secagg_dp", "x")):
            cand = keep[arm].candidates
            j = int(np.argmin(np.linalg.norm(cand - x[None, :], axis=1)))
            err = np.linalg.norm(cand[j] - x) / np.linalg.norm(x)
            ax.plot(
                np.clip(cand[j], -6, 6),
                style,
                ms=3.5,
                label=f"{'SecAgg+ only' if arm == 'secagg' else 'SecAgg+ and DP'} (err {err:.0e})",
            )
        ax.set_title(f"record {i}", fontsize=8)
        ax.legend(fontsize=6)
        ax.set_ylim(-6.5, 6.5)
    fig.suptitle(
        "True records (30 standardized features) vs the closest vector the server recovered "
        "from the SecAgg+ sum (binned, seed 0);\nwith DP the closest vector is about as far "
        "as the zero vector (relative error 1)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "trap_weights_records.png", dpi=110)
    plt.close(fig)


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-images", action="store_true", help="skip the lesion-tile run")
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    doc, keep = run(args.seeds, args.hidden)
    if not args.no_images:
        doc["images"], (image_fed, image_results) = run_images(size=args.image_size)
    (args.out / "trap_weights.json").write_text(json.dumps(doc, indent=1) + "\n")
    if not args.no_plot:
        plot(doc, keep, args.out)
        if not args.no_images:
            plot_images(image_fed, image_results, args.image_size, args.out)
    print(json.dumps(doc["summary"], indent=1))
    print(json.dumps(doc["server_defaults"]["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
