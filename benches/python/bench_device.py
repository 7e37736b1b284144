"""Patient-device footprint: inference overhead, a head-training round, install size.

One run measures:

1. **Inference at 224x224**, batch 1: ``confide.inference.LocalModel.predict`` (input
   validation + engine) against the engine called directly (``InferenceSession.run`` /
   ``Interpreter.set_tensor+invoke+get_tensor``), timed in alternation so that drift of a
   shared CPU hits both alike, for ONNX Runtime and LiteRT, on the same
   small CNN (3 stride-2 conv layers, 16/32/64 channels, global mean, softmax head; ~1 ms)
   written in both formats from the same weights (``tests/inference/builders.py``); also
   with the NaN/Inf scan off, and SqueezeNet 1.1 (random weights, exported by
   ``confide.export``; ONNX only) when torch is installed. Target: confide / direct <= 1.10.
2. **One on-device training round** on 50 images at 224x224, in a fresh child process:
   backbone features for 50 images (ONNX Runtime), then patient-level DP-SGD on a softmax
   head (``NumpyTrainer`` via ``confide.inference.train_head``). Reported: wall time of the
   round (features + DP-SGD), and the child's peak RSS, which includes the
   interpreter, numpy, onnxruntime and confide (``VmHWM``; run before torch is loaded in
   the parent). Target: RSS <= 250 MB.
3. **Install size** of the device extras, summed over the files each installed
   distribution lists in its ``RECORD`` (the dependency closure of ``confide[onnx]`` /
   ``confide[litert]`` resolved from installed metadata, confide itself included). Target:
   ``confide[onnx]`` <= 150 MB.

Run::

    python benches/python/bench_device.py            # writes benches/results/device.json
    python benches/python/bench_device.py --quick

Needs ``onnx`` and ``ai-edge-litert`` (to write the models) and ``onnxruntime``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.inference.builders import cnn_to_onnx, cnn_to_tflite, make_cnn  # noqa: E402

CHANNELS = (16, 32, 64)
N_IMAGES = 50


def _paired_us(direct: Any, via: Any, repeat: int) -> tuple[float, float]:
    """Median microseconds of two callables timed in alternation, in a shuffled order.

    Alternating cancels the drift of a shared CPU; shuffling which one goes first cancels
    the cache advantage of running second.
    """
    order = np.random.default_rng(0).integers(0, 2, size=repeat)
    for _ in range(max(5, repeat // 10)):
        direct()
        via()
    times: dict[int, list[float]] = {0: [], 1: []}
    fns = (direct, via)
    for first in order:
        for k in (int(first), 1 - int(first)):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


def bench_inference(repeat: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    from confide.inference import available_engines, load_model

    cnn = make_cnn(seed=0, channels=CHANNELS, image=224, n_classes=3)
    x = np.random.default_rng(0).uniform(size=(1, 3, 224, 224)).astype(np.float32)
    out: dict[str, Any] = {}
    onnx_bytes = cnn_to_onnx(cnn)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    model = load_model(onnx_bytes, "onnx", num_threads=threads)
    direct, via = _paired_us(
        lambda: sess.run(["probabilities"], {"image": x}), lambda: model.predict(x), repeat
    )
    check = _paired_us(lambda: None, lambda: model.check_input(x), repeat)[1]
    out["onnx"] = {
        "direct_us": direct,
        "confide_us": via,
        "ratio": via / direct,
        "input_validation_us": check,
    }
    if "litert" in available_engines():
        from ai_edge_litert.interpreter import Interpreter

        tfl = cnn_to_tflite(cnn)
        interp = Interpreter(model_content=tfl, num_threads=threads)
        inp = interp.get_input_details()[0]
        interp.resize_tensor_input(inp["index"], [1, 3, 224, 224])
        interp.allocate_tensors()
        outs = {d["name"]: d["index"] for d in interp.get_output_details()}

        def run_direct() -> Any:
            interp.set_tensor(inp["index"], x)
            interp.invoke()
            return interp.get_tensor(outs["probabilities"])

        lmodel = load_model(tfl, "litert", num_threads=threads)
        np.testing.assert_allclose(lmodel.predict(x), model.predict(x), atol=1e-5)
        direct, via = _paired_us(run_direct, lambda: lmodel.predict(x), repeat)
        out["litert"] = {"direct_us": direct, "confide_us": via, "ratio": via / direct}
    # The same input with the finiteness scan off (shape/dtype checks only).
    fast = load_model(onnx_bytes, "onnx", num_threads=threads, check_finite=False)
    direct, via = _paired_us(
        lambda: sess.run(["probabilities"], {"image": x}), lambda: fast.predict(x), repeat
    )
    out["onnx_no_finite_scan"] = {"direct_us": direct, "confide_us": via, "ratio": via / direct}
    out["model"] = {"onnx_bytes": len(onnx_bytes), "channels": list(CHANNELS), "image": 224}
    squeeze = _squeezenet_onnx()
    if squeeze is not None:
        sq_sess = ort.InferenceSession(
            squeeze, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        sq = load_model(squeeze, "onnx", num_threads=threads)
        name = sq.input.name
        direct, via = _paired_us(
            lambda: sq_sess.run(["probabilities"], {name: x}),
            lambda: sq.predict(x),
            max(20, repeat // 10),
        )
        out["onnx_squeezenet"] = {"direct_us": direct, "confide_us": via, "ratio": via / direct}
    return out


def _squeezenet_onnx() -> bytes | None:
    """SqueezeNet 1.1 at 224x224 (random weights) through confide.export, if torch is here."""
    try:
        import torch

        from confide.export import export_onnx
        from confide.training.torch_models import squeezenet1_1
    except ImportError:
        return None
    torch.manual_seed(0)
    module = squeezenet1_1(3, (3, 224, 224)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(module, Path(tmp) / "squeezenet.onnx", input_shape=(3, 224, 224))
        return path.read_bytes()


def _peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (per address space, so not inherited through
    fork + exec like ``ru_maxrss``, which would count the parent's torch), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def round_child(model_path: str, threads: int) -> None:
    """Run one device round in this (fresh) process and print its JSON measurements."""
    from confide.inference import FeatureExtractor, device_dataset, load_model, train_head
    from confide.training.base import DPSGDConfig, TrainConfig
    from confide.training.numpy_engine import NumpyTrainer

    rss_start = _peak_rss_mb()
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    model = load_model(model_path, num_threads=threads)
    extractor = FeatureExtractor(model, batch_size=8)
    feats = []
    for _start in range(0, N_IMAGES, 10):  # images arrive one by one on a device
        batch = rng.uniform(size=(10, 3, 224, 224)).astype(np.float32)
        feats.append(extractor(batch))
    x = np.concatenate(feats)
    t1 = time.perf_counter()
    y = (x[:, 0] > np.median(x[:, 0])).astype(np.int64)
    head = NumpyTrainer.create("softmax", n_features=x.shape[1], n_classes=3, seed=0)
    dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=1.0, steps=20)
    train_head(head, device_dataset(x, y), TrainConfig(learning_rate=0.1, dp=dp))
    t2 = time.perf_counter()
    print(
        json.dumps(
            {
                "images": N_IMAGES,
                "features_s": t1 - t0,
                "dpsgd_s": t2 - t1,
                "round_s": t2 - t0,
                "dpsgd_steps": dp.steps,
                "rss_after_imports_mb": rss_start,
                "peak_rss_mb": _peak_rss_mb(),
            }
        )
    )


def bench_round(threads: int) -> dict[str, Any]:
    cnn = make_cnn(seed=0, channels=CHANNELS, image=224, n_classes=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "device.onnx"
        path.write_bytes(cnn_to_onnx(cnn))
        out = subprocess.run(
            [sys.executable, __file__, "--round-child", str(path), "--threads", str(threads)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _closure(root: str, extras: set[str]) -> set[str]:
    """Installed distributions ``root[extras]`` needs, following markers as pip would."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo: list[tuple[str, set[str]]] = [(root, extras)]
    while todo:
        name, ex = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(key)
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, set(req.extras)))
    return seen


def _dist_bytes(key: str) -> int:
    dist = metadata.distribution(key)
    total = 0
    for f in dist.files or []:
        p = Path(str(dist.locate_file(f)))
        if p.is_file():
            total += p.stat().st_size
    if key == "confide":  # an editable install lists no package files: count the package
        pkg = ROOT / "python" / "confide"
        total = sum(
            p.stat().st_size for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    return total


def bench_install_size() -> dict[str, Any]:
    out: dict[str, Any] = {}
    # confide[onnx] = confide's runtime dependencies + numpy + onnxruntime (the extra as
    # proposed); confide[litert] = the same with ai-edge-litert.
    base = _closure("confide", set())
    for extra, pkgs in (("onnx", ["onnxruntime"]), ("litert", ["ai-edge-litert"])):
        names = set(base)
        for p in pkgs:
            names |= _closure(p, set())
        sizes = {}
        for n in sorted(names):
            try:
                sizes[n] = _dist_bytes(n)
            except metadata.PackageNotFoundError:
                continue
        total = sum(sizes.values())
        top = sorted(sizes.items(), key=lambda kv: -kv[1])[:6]
        out[extra] = {
            "total_mb": total / 2**20,
            "largest": {k: round(v / 2**20, 1) for k, v in top},
            "distributions": sorted(sizes),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "device.json")
    args = ap.parse_args()
    if args.round_child:
        round_child(args.round_child, args.threads)
        return
    repeat = 60 if args.quick else 300
    rnd = bench_round(args.threads)  # first: a fresh child, before torch is loaded here
    inference = bench_inference(repeat, args.threads)
    size = bench_install_size()
    rows = [("metric", "value", "target", "ok")]

    def ratio_row(label: str, r: dict[str, float]) -> None:
        value = f"{r['direct_us']:.0f} / {r['confide_us']:.0f}  ({r['ratio']:.3f}x)"
        rows.append((label, value, "<= 1.10x", "yes" if r["ratio"] <= 1.10 else "NO"))

    for key, label in (
        ("onnx", "onnx: direct / confide (us, 224x224, batch 1)"),
        ("onnx_no_finite_scan", "onnx, check_finite=False: direct / confide (us)"),
        ("litert", "litert: direct / confide (us, 224x224, batch 1)"),
        ("onnx_squeezenet", "onnx, SqueezeNet 1.1: direct / confide (us)"),
    ):
        if key in inference:
            ratio_row(label, inference[key])
    rows.append(
        (
            "confide input validation (us, 1x3x224x224)",
            f"{inference['onnx']['input_validation_us']:.0f}",
            "-",
            "-",
        )
    )
    rows.append(
        (
            "round: 50 images features + 20 DP-SGD steps (s)",
            f"{rnd['round_s']:.2f} ({rnd['features_s']:.2f} + {rnd['dpsgd_s']:.3f})",
            "-",
            "-",
        )
    )
    peak = rnd["peak_rss_mb"]
    rows.append(("round: peak RSS (MB)", f"{peak:.0f}", "<= 250", "yes" if peak <= 250 else "NO"))
    for extra in ("onnx", "litert"):
        total = size[extra]["total_mb"]
        ok = ("yes" if total <= 150 else "NO") if extra == "onnx" else "-"
        target = "<= 150" if extra == "onnx" else "-"
        rows.append((f"install size confide[{extra}] (MB)", f"{total:.0f}", target, ok))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)))
    doc = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
        "inference": inference,
        "round": rnd,
        "install_size": size,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
