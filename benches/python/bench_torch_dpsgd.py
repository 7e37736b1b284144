"""DP-SGD step time of the torch engine vs a plain step vs Opacus, round time, peak RSS.

Same model (SqueezeNet 1.1, 2 classes), same batch, same data (the synthetic-lesion tiles of
``confide.data.lesions``) for every method, in one run:

* ``plain``: one non-private SGD step (forward, backward, ``torch.optim.SGD`` momentum 0.9);
* ``confide``: one patient-level DP-SGD step as :func:`confide.privacy.run_dpsgd` does it:
  where the batch fits one chunk on CPU, per-patient clipping from ghost norms
  (:mod:`confide.privacy.torch_ghost`: no per-sample gradient matrix for the few-position
  layers); else per-sample gradients (layer hooks for SqueezeNet, chunked, into a reused
  workspace; the ``confide_rows`` column is that path, ``ghost_clipping=False``, and
  ``confide_vmap`` the same through ``torch.func``), per-patient sum, clipping by the Rust
  kernel through a zero-copy view (CPU) or ``confide.privacy.torch_clip`` (CUDA), Gaussian
  noise from the Rust core's CSPRNG (generated on CPU, moved to the device), expected-batch
  normalisation, momentum, in-place update. Each record is its own patient here, so 32 rows
  are clipped, as Opacus does;
* ``opacus``: one step of Opacus 1.6 (``GradSampleModule`` hooks + ``DPOptimizer``, same clip
  norm and noise multiplier; torch's non-cryptographic RNG).

Times are medians over ``--repeat`` repeats after one untimed warm-up, with the methods
interleaved in every repeat so a noisy neighbour hits them alike. Then the wall time of one
site's round at 64x64 with 300 images (60 patients x 5 tiles; expected batch 32, 10 steps,
DP and plain), and the peak RSS of a DP round at 224x224, B=32, measured in a fresh child
process.

Run::

    python benches/python/bench_torch_dpsgd.py                 # CPU, one thread (~4 min)
    python benches/python/bench_torch_dpsgd.py --quick         # 64x64 only, 3 repeats
    python benches/python/bench_torch_dpsgd.py --device cuda   # see benches/gpu/
    python benches/python/bench_torch_dpsgd.py --ghost-baseline OTHER/torch_ghost.py
        # this tree's ghost clip-and-sum vs another tree's, same run (64x64)

Writes the table to stdout and JSON to ``--json`` (default
``benches/results/torch_dpsgd_<device>.json``). Opacus is optional (``pip install
opacus==1.6.*``; it is a benchmark peer, not a confide dependency); without it the column
says ``-``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLIP = 1.0
NOISE = 1.0
LR = 0.05
MOMENTUM = 0.9


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", default="1", help="torch/rayon threads: an int or 'all'")
    p.add_argument("--sizes", default="224,64", help="image sides to time, comma-separated")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="64x64 only, 3 repeats, no RSS child")
    p.add_argument("--no-opacus", action="store_true")
    p.add_argument("--no-round", action="store_true", help="skip the 300-image round")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child")
    p.add_argument(
        "--proposed-group-fix",
        action="store_true",
        help="also time the round with a per-patient summation in place of run_dpsgd's reduceat",
    )
    p.add_argument(
        "--ghost-baseline",
        type=Path,
        default=None,
        help="a torch_ghost.py of another tree: time its ghost_clipped_sum against this tree's "
        "(64x64, interleaved with a plain step) and exit",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat, args.no_rss = "64", 3, True
    return args


def _set_threads(threads: str) -> int:
    # Before torch/confide are imported: rayon sizes its pool once, from the environment.
    n = (os.cpu_count() or 1) if threads == "all" else int(threads)
    for var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n


def _rss_mb() -> float:
    """Peak resident set size of this process in MB (VmHWM).

    Not ``getrusage``: on Linux ``ru_maxrss`` survives ``execve``, so a child started from a
    big parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _grouped_sums_per_group(g: Any, pat: Any) -> tuple[Any, Any]:
    """Drop-in for ``confide.privacy.dpsgd._group_sorted``, summing one patient at a time.

    Same float64 accumulation and identical results (checked bit for bit before use); used
    only with ``--proposed-group-fix`` to measure a proposed change to run_dpsgd.
    """
    import numpy as np

    starts = np.flatnonzero(np.r_[True, pat[1:] != pat[:-1]])
    ends = np.r_[starts[1:], len(pat)]
    out = np.empty((len(starts), g.shape[1]), np.float32)
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        out[k] = g[s] if e - s == 1 else g[s:e].sum(axis=0, dtype=np.float64)
    return out, pat[starts]


# --------------------------------------------------------------------------- the steps


class ConfideDPStep:
    """One DP-SGD step exactly as ``confide.privacy.run_dpsgd``'s loop body runs it.

    ``clipped_patient_sum`` (per-sample gradients into a workspace reused across steps,
    per-patient sum, Rust-kernel clipping in place, float64 sum), then ``DPSGD.noisy_mean``
    (Rust-core CSPRNG noise, expected-batch normalisation) and ``DPSGD.apply`` (momentum) and
    ``set_weights``: everything but the Poisson draw, so the batch is the same for every
    method.
    """

    def __init__(self, trainer: Any, expected_batch: float, seed: int = 0) -> None:
        from confide.noise import SecureRng
        from confide.privacy.dpsgd import DPSGD, _Workspace

        self.trainer = trainer
        self.opt = DPSGD(
            clip_norm=CLIP,
            noise_multiplier=NOISE,
            expected_batch_size=float(expected_batch),
            momentum=MOMENTUM,
            rng=SecureRng(bytes([seed]) * 32),
        )
        self.workspace = _Workspace()

    def __call__(self, x: Any, y: Any, patient_ids: Any | None = None) -> None:
        import numpy as np

        from confide.data.images import ArrayDataset
        from confide.privacy.dpsgd import clipped_patient_sum

        t = self.trainer
        ids = np.arange(len(y)) if patient_ids is None else np.asarray(patient_ids)
        data = ArrayDataset(x, y, ids)
        rows = np.arange(len(y), dtype=np.int64)
        clipped = clipped_patient_sum(t, data, rows, ids, CLIP, workspace=self.workspace)
        weights = t.get_weights()
        t.set_weights(self.opt.apply(weights, self.opt.noisy_mean(clipped), LR))


class PlainStep:
    """One non-private SGD step on the same trainer's module."""

    def __init__(self, trainer: Any) -> None:
        import torch

        self.module = trainer.module
        self.device = trainer.device
        self.opt = torch.optim.SGD(self.module.parameters(), lr=LR, momentum=MOMENTUM)

    def __call__(self, x: Any, y: Any, patient_ids: Any | None = None) -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812

        self.module.train()
        xt = torch.from_numpy(x).to(self.device)
        yt = torch.from_numpy(y).to(self.device)
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.module(xt), yt).backward()
        self.opt.step()


class OpacusStep:
    """One Opacus 1.6 DP-SGD step (hooks grad sampler, per-sample clipping, Gaussian noise)."""

    def __init__(self, side: int, device: Any, batch: int) -> None:
        import warnings

        import torch
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from confide.training.torch_models import SqueezeNet11

        torch.manual_seed(0)
        self.device = device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = GradSampleModule(SqueezeNet11(num_classes=2).to(device))
            self.opt = DPOptimizer(
                torch.optim.SGD(self.module.parameters(), lr=LR, momentum=MOMENTUM),
                noise_multiplier=NOISE,
                max_grad_norm=CLIP,
                expected_batch_size=batch,
            )

    def __call__(self, x: Any, y: Any, patient_ids: Any | None = None) -> None:
        import torch
        import torch.nn.functional as F  # noqa: N812

        xt = torch.from_numpy(x).to(self.device)
        yt = torch.from_numpy(y).to(self.device)
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.module(xt), yt).backward()
        self.opt.step()


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def time_steps(side: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median step times of plain / confide / opacus at one image size."""
    import numpy as np

    from confide.data.lesions import lesion_dataset
    from confide.training.torch_engine import TorchTrainer

    batch = args.batch
    data = lesion_dataset(n_patients=batch, tiles_per_patient=1, size=side, seed=0)
    x, y = data.batch(np.arange(batch, dtype=np.int64))
    trainer_dp = TorchTrainer.create(
        "squeezenet1_1", 2, (3, side, side), seed=0, device=args.device
    )
    trainer_plain = TorchTrainer.create(
        "squeezenet1_1", 2, (3, side, side), seed=0, device=args.device
    )
    trainer_rows = TorchTrainer.create(
        "squeezenet1_1", 2, (3, side, side), seed=0, device=args.device, ghost_clipping=False
    )
    trainer_vmap = TorchTrainer.create(
        "squeezenet1_1", 2, (3, side, side), seed=0, device=args.device, per_sample_method="vmap"
    )
    methods: dict[str, Any] = {
        "plain": PlainStep(trainer_plain),
        "confide": ConfideDPStep(trainer_dp, expected_batch=batch),
        "confide_rows": ConfideDPStep(trainer_rows, expected_batch=batch),
        "confide_vmap": ConfideDPStep(trainer_vmap, expected_batch=batch),
    }
    if not args.no_opacus:
        try:
            methods["opacus"] = OpacusStep(side, trainer_dp.device, batch)
        except ImportError:
            print("opacus not installed: its column is '-'", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for step in methods.values():  # warm-up (vmap tracing, allocator, oneDNN kernels)
        step(x, y)
        _sync(trainer_dp.device)
    for _ in range(args.repeat):
        for name, step in methods.items():
            _sync(trainer_dp.device)
            c0, t0 = time.process_time(), time.perf_counter()
            step(x, y)
            _sync(trainer_dp.device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = {name: float(np.median(v)) for name, v in times.items()}
    return {
        "side": side,
        "batch": batch,
        "per_sample_chunk": trainer_dp.per_sample_chunk,
        "per_sample_method": trainer_dp.per_sample_method,
        "median_s": med,
        "all_s": times,
        "ratio_confide_vs_plain": med["confide"] / med["plain"],
        "ratio_confide_vmap_vs_plain": med["confide_vmap"] / med["plain"],
        # Ratios within each repeat (the methods run back to back), then their median: less
        # sensitive to a neighbour's load moving between repeats than a ratio of medians.
        "paired_ratio_vs_plain": {
            name: float(np.median(np.array(v) / np.array(times["plain"])))
            for name, v in times.items()
            if name != "plain"
        },
        "ratio_opacus_vs_plain": med["opacus"] / med["plain"] if "opacus" in med else None,
        # Process CPU time (all threads): on a loaded machine it leaves out the time spent
        # waiting for a core, so these ratios move less with the neighbours' load.
        "cpu_s": cpu,
        "cpu_ratio_vs_plain": {
            name: float(np.median(np.array(v) / np.array(cpu["plain"])))
            for name, v in cpu.items()
            if name != "plain"
        },
    }


def time_round(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of one site's round at 64x64 with 300 images (60 patients x 5 tiles)."""
    import numpy as np

    from confide.data.lesions import lesion_dataset
    from confide.training.base import DPSGDConfig, TrainConfig
    from confide.training.torch_engine import TorchTrainer

    data = lesion_dataset(n_patients=60, tiles_per_patient=5, size=64, seed=1)
    q = (args.batch / 5) / 60  # expected 32 records = 6.4 patients of 60
    steps = 10  # ~one epoch of 300 images at batch 32
    out: dict[str, Any] = {"images": len(data), "patients": 60, "sampling_rate": q, "steps": steps}

    plain = TorchTrainer.create(
        "squeezenet1_1", 2, (3, 64, 64), seed=0, device=args.device, momentum=MOMENTUM
    )
    plain.loss_and_gradient(*data.batch(np.arange(2, dtype=np.int64)))  # warm-up, untimed
    t0 = time.perf_counter()
    plain.fit(data, TrainConfig(epochs=1, batch_size=args.batch, learning_rate=LR), seed=0)
    _sync(plain.device)
    out["plain_round_s"] = time.perf_counter() - t0

    dp = DPSGDConfig(
        noise_multiplier=NOISE, clip_norm=CLIP, sampling_rate=q, steps=steps, momentum=MOMENTUM
    )
    from confide.noise import SecureRng
    from confide.privacy.dpsgd import run_dpsgd

    out["loop"] = "confide.privacy.run_dpsgd"
    for key, method, ghost in (
        ("dp_round_s", "auto", True),
        ("dp_round_rows_s", "auto", False),
        ("dp_round_vmap_s", "vmap", True),
    ):
        trainer = TorchTrainer.create(
            "squeezenet1_1",
            2,
            (3, 64, 64),
            seed=0,
            device=args.device,
            per_sample_method=method,
            ghost_clipping=ghost,
        )
        trainer.per_sample_gradients(*data.batch(np.arange(2, dtype=np.int64)))  # warm-up
        t0 = time.perf_counter()
        run_dpsgd(trainer, data, TrainConfig(learning_rate=LR, dp=dp), rng=SecureRng(bytes(32)))
        _sync(trainer.device)
        out[key] = time.perf_counter() - t0
        out[key.replace("_s", "_method")] = trainer.per_sample_method
    out["ratio_dp_vs_plain"] = out["dp_round_s"] / out["plain_round_s"]
    out["ratio_dp_rows_vs_plain"] = out["dp_round_rows_s"] / out["plain_round_s"]
    out["ratio_dp_vmap_vs_plain"] = out["dp_round_vmap_s"] / out["plain_round_s"]
    if args.proposed_group_fix:
        from confide.noise import SecureRng
        from confide.privacy import dpsgd

        g = np.random.default_rng(0).standard_normal((12, 1000)).astype(np.float32)
        pat = np.sort(np.random.default_rng(1).integers(0, 4, 12))
        a, b = dpsgd._group_sorted(g, pat), _grouped_sums_per_group(g, pat)
        if not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])):
            raise RuntimeError("the proposed grouping differs from run_dpsgd's")
        original = dpsgd._group_sorted
        dpsgd._group_sorted = _grouped_sums_per_group
        try:
            fixed = TorchTrainer.create("squeezenet1_1", 2, (3, 64, 64), seed=0, device=args.device)
            t0 = time.perf_counter()
            run_dpsgd(fixed, data, TrainConfig(learning_rate=LR, dp=dp), rng=SecureRng(bytes(32)))
            _sync(fixed.device)
            out["dp_round_group_fix_s"] = time.perf_counter() - t0
        finally:
            dpsgd._group_sorted = original
        out["ratio_dp_group_fix_vs_plain"] = out["dp_round_group_fix_s"] / out["plain_round_s"]
    return out


def time_ghost_ab(baseline: Path, args: argparse.Namespace) -> dict[str, Any]:
    """This tree's ghost clip-and-sum vs another tree's ``torch_ghost.py``, same run.

    Interleaved in every repeat with a plain step (the baseline of the ratios): one
    64x64 batch of ``args.batch`` records, one patient each, ``C = 1``, the same weights and
    dropout seed for both. Also the relative difference of the two sums (the margin ``C'``
    makes them differ by about ``2^-16`` where patients are clipped).
    """
    import importlib.util
    import inspect

    import numpy as np
    import torch

    import confide.privacy.torch_ghost as current
    from confide.training.torch_engine import TorchTrainer

    spec = importlib.util.spec_from_file_location("baseline_torch_ghost", baseline)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {baseline}")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    side = 64
    t = TorchTrainer.create("squeezenet1_1", 2, (3, side, side), seed=4)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(args.batch, 3, side, side)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 2, args.batch))
    offsets, dim, pat = t._per_sample_offsets(False), t.manifest.size, np.arange(args.batch)
    kw: dict[str, Any] = {}
    if "max_records" in inspect.signature(old.ghost_clipped_sum).parameters:
        kw = {"max_records": t.per_sample_chunk}
    plain = PlainStep(t)
    t.module.train()
    fns = {
        "plain": lambda: plain(x.numpy(), y.numpy()),
        "baseline": lambda: old.ghost_clipped_sum(t.module, x, y, pat, CLIP, offsets, dim, **kw),
        "current": lambda: current.ghost_clipped_sum(
            t.module, x, y, pat, CLIP, offsets, dim, max_records=t.per_sample_chunk
        ),
    }
    plain.opt.param_groups[0]["lr"] = 0.0  # the same weights for every call
    plain.opt.param_groups[0]["momentum"] = 0.0
    sums = []
    for k in ("baseline", "current"):
        torch.manual_seed(9)
        sums.append(fns[k]())
        t.module.train()
    rel = float(np.linalg.norm(sums[1] - sums[0]) / np.linalg.norm(sums[0]))
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(args.repeat, 9)):
        for k, f in fns.items():
            c0 = time.process_time()
            f()
            t.module.train()
            cpu[k].append(time.process_time() - c0)
    med = {k: float(np.median(v)) for k, v in cpu.items()}
    paired = float(np.median(np.array(cpu["current"]) / np.array(cpu["baseline"])))
    return {
        "baseline": str(baseline),
        "cpu_median_s": med,
        "baseline_vs_plain": med["baseline"] / med["plain"],
        "current_vs_plain": med["current"] / med["plain"],
        "current_vs_baseline": med["current"] / med["baseline"],
        "paired_current_vs_baseline": paired,
        "relative_difference_of_sums": rel,
    }


def rss_child(side: int, batch: int, device: str) -> None:
    """Child process: RSS after imports, then peak RSS over a 3-step DP round."""
    import numpy as np

    from confide.data.lesions import lesion_dataset
    from confide.training.torch_engine import TorchTrainer

    base = _rss_mb()
    data = lesion_dataset(n_patients=batch, tiles_per_patient=1, size=side, seed=0)
    trainer = TorchTrainer.create("squeezenet1_1", 2, (3, side, side), seed=0, device=device)
    step = ConfideDPStep(trainer, expected_batch=batch)
    after_setup = _rss_mb()
    for _ in range(3):
        x, y = data.batch(np.arange(batch, dtype=np.int64))
        step(x, y)
    print(
        json.dumps(
            {
                "rss_after_import_mb": base,
                "rss_after_setup_mb": after_setup,
                "peak_rss_mb": _rss_mb(),
                "per_sample_chunk": trainer.per_sample_chunk,
            }
        )
    )


def measure_rss(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--rss-child",
        "224",
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--threads",
        args.threads,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]), side=224, batch=args.batch)


def _fmt(v: float | None, unit: str = "s") -> str:
    if v is None:
        return "-"
    return f"{v:.3f} {unit}" if unit else f"{v:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    threads = _set_threads(args.threads)
    import torch

    torch.set_num_threads(threads)
    if args.rss_child:
        rss_child(args.rss_child, args.batch, args.device)
        return {}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA requested but not available; nothing to do")
        return {}
    if args.ghost_baseline is not None:
        ab = time_ghost_ab(args.ghost_baseline, args)
        print(
            f"ghost clip-and-sum, 64x64, B={args.batch}, process CPU time, medians: "
            f"baseline {ab['baseline_vs_plain']:.3f}x plain, this tree "
            f"{ab['current_vs_plain']:.3f}x plain; this/baseline "
            f"{ab['current_vs_baseline']:.3f} (paired {ab['paired_current_vs_baseline']:.3f}); "
            f"sums differ by {ab['relative_difference_of_sums']:.1e} relative"
        )
        return ab
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = None
    result: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "opacus": opacus_version,
        "python": platform.python_version(),
        "clip_norm": CLIP,
        "noise_multiplier": NOISE,
        "steps": [],
    }
    print(
        f"# torch {torch.__version__}, opacus {opacus_version}, device {args.device}, "
        f"{threads} thread(s), SqueezeNet 1.1 (2 classes), B={args.batch}, "
        f"median of {args.repeat}"
    )
    print(
        "| input | plain step | confide DP step | confide (rows) | confide (vmap) "
        "| Opacus DP step | confide/plain | rows/plain | vmap/plain | Opacus/plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side in [int(s) for s in args.sizes.split(",") if s]:
        r = time_steps(side, args)
        result["steps"].append(r)
        m = r["median_s"]
        print(
            f"| {side}x{side} | {_fmt(m['plain'])} | {_fmt(m['confide'])} | "
            f"{_fmt(m['confide_rows'])} | {_fmt(m['confide_vmap'])} | "
            f"{_fmt(m.get('opacus'))} | "
            f"{_fmt(r['ratio_confide_vs_plain'], '')}x | "
            f"{_fmt(m['confide_rows'] / m['plain'], '')}x | "
            f"{_fmt(r['ratio_confide_vmap_vs_plain'], '')}x | "
            f"{_fmt(r['ratio_opacus_vs_plain'], '')}x |",
            flush=True,
        )
        paired = ", ".join(f"{k} {v:.2f}x" for k, v in r["paired_ratio_vs_plain"].items())
        print(f"  median of per-repeat ratios to plain: {paired}", flush=True)
        cpu = ", ".join(f"{k} {v:.2f}x" for k, v in r["cpu_ratio_vs_plain"].items())
        print(f"  same, in process CPU time: {cpu}", flush=True)
    if not args.no_round:
        rd = time_round(args)
        result["round_64"] = rd
        print(
            f"\nround at 64x64, {rd['images']} images, {rd['steps']} steps: "
            f"plain {rd['plain_round_s']:.2f} s, DP {rd['dp_round_s']:.2f} s "
            f"({rd['ratio_dp_vs_plain']:.2f}x; {rd['loop']}, {rd['dp_round_method']}); "
            f"DP with materialised rows {rd['dp_round_rows_s']:.2f} s "
            f"({rd['ratio_dp_rows_vs_plain']:.2f}x); "
            f"DP with vmap {rd['dp_round_vmap_s']:.2f} s ({rd['ratio_dp_vmap_vs_plain']:.2f}x)"
        )
        if "dp_round_group_fix_s" in rd:
            print(
                "  with the proposed per-patient summation in run_dpsgd: "
                f"{rd['dp_round_group_fix_s']:.2f} s ({rd['ratio_dp_group_fix_vs_plain']:.2f}x)"
            )
    if not args.no_rss and not args.device.startswith("cuda"):
        rss = measure_rss(args)
        result["rss_224"] = rss
        print(
            f"peak RSS of a DP round at 224x224 B={args.batch}: {rss['peak_rss_mb']:.0f} MB "
            f"(torch + confide imported: {rss['rss_after_import_mb']:.0f} MB; "
            f"chunk {rss['per_sample_chunk']})"
        )
    if args.device.startswith("cuda"):
        result["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out = (
        args.json or ROOT / "benches" / "results" / f"torch_dpsgd_{args.device.split(':')[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nJSON: {out}")
    return result


if __name__ == "__main__":
    main()
