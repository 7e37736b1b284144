#!/usr/bin/env python3
"""confide kernels vs numpy (and vs Flower when installed), end to end from Python.

For every size (default: 1,235,496 float32 parameters = SqueezeNet 1.1, and 100,000) each
public confide function is timed next to a numpy baseline measured in the same run and, when
``import flwr`` works, next to Flower's own function for the same job. Times are the median of
``--repeat`` repeats of ``time.perf_counter``; ratios are ``confide / other`` (below 1 means
confide is faster). The performance targets of issue 2 are stated for ONE core, so run with
``--threads 1`` for the "met?" column to be meaningful: it re-executes this script with
``RAYON_NUM_THREADS=1`` (and one BLAS/OpenMP thread for numpy) set before anything is
imported. ``make bench`` runs it both ways. See benches/README.md for what each row measures.

Usage::

    python benches/python/bench_core.py [--sizes 1235496,100000] [--repeat 11]
        [--threads 1|all] [--only SUBSTRING] [--json results.json] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import confide

# Flower is optional: it is installed only in the separate .venv-peers (it pins dependencies
# that must not leak into the development environment).
try:
    import flwr
    from flwr.common.secure_aggregation.crypto.shamir import (
        combine_shares as flwr_combine_shares,
    )
    from flwr.common.secure_aggregation.crypto.shamir import (
        create_shares as flwr_create_shares,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_addition as flwr_parameters_addition,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_mod as flwr_parameters_mod,
    )
    from flwr.common.secure_aggregation.quantization import quantize as flwr_quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen as flwr_pseudo_rand_gen,
    )
    from flwr.supercore.differential_privacy import (
        add_gaussian_noise_inplace as flwr_add_gaussian_noise_inplace,
    )
    from flwr.supercore.differential_privacy import (
        clip_inputs_inplace as flwr_clip_inputs_inplace,
    )

    FLWR_VERSION: str | None = flwr.__version__
except ImportError:  # pragma: no cover - depends on the environment
    FLWR_VERSION = None

SQUEEZENET = 1_235_496
SMALL = 100_000
CLIP_ROWS = 32  # per-example clipping of a batch of 32 gradients
MAX_NORM = 1.0
SIGMA = 1.0
DG_SIGMA = 1000.0  # discrete Gaussian scale in quantized units
QUANT_BITS = 16
QUANT_RANGE = 1.0
MASK_BITS = 32
NARROW_BITS = 24  # a ring narrower than the u32 word: inputs must be range-checked
MANY_SEEDS = 17  # a self mask + 16 pairwise masks (SecAgg+ neighbourhood of 16)
PACK_BITS = 20  # not byte aligned: the general case of the bit packer
SHAMIR_N, SHAMIR_T = 100, 51
MASK_GBPS_TARGET = 5.0
MERSENNE61 = (1 << 61) - 1

THREAD_ENV = ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ---------------------------------------------------------------------------- timing


def measure(
    fn: Callable[[], object],
    repeat: int,
    setup: Callable[[], object] | None = None,
    min_time: float = 0.005,
) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` repeats.

    Without ``setup`` each repeat runs ``fn`` enough times to last ``min_time`` (so that
    microsecond calls are not lost in timer noise) and divides. With ``setup`` (restoring an
    input that ``fn`` modifies in place) each repeat is ``setup(); t0; fn(); t1``, untimed
    setup. The garbage collector is off while timing, as in ``timeit``.
    """
    fn()  # warm-up: first-touch page faults, lazy tables, imports
    number = 1
    if setup is None:
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        number = max(1, min(10_000, int(min_time / max(once, 1e-9))))
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - t0) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times)


# ---------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the report: a confide kernel next to its baselines (times in ms)."""

    kernel: str
    size: str
    confide_ms: float
    baseline: str = "-"
    baseline_ms: float | None = None
    flwr: str = "-"
    flwr_ms: float | None = None
    target: str = "-"
    met: bool | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def baseline_ratio(self) -> float | None:
        return None if self.baseline_ms is None else self.confide_ms / self.baseline_ms

    @property
    def flwr_ratio(self) -> float | None:
        return None if self.flwr_ms is None else self.confide_ms / self.flwr_ms


def _ms(seconds: float) -> float:
    return seconds * 1e3


def measure_flwr(
    fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None
) -> float | None:
    """:func:`measure` of a Flower call; ``None`` (its columns stay ``-``) without flwr."""
    return measure(fn, repeat, setup) if FLWR_VERSION else None


def row(
    kernel: str,
    size: str,
    t_confide: float,
    baseline: str,
    t_baseline: float,
    flwr_name: str = "-",
    t_flwr: float | None = None,
    **rest: Any,
) -> Row:
    """A :class:`Row` from times in seconds; the Flower columns only where ``t_flwr`` is set."""
    return Row(
        kernel,
        size,
        _ms(t_confide),
        baseline,
        _ms(t_baseline),
        flwr_name if t_flwr else "-",
        _ms(t_flwr) if t_flwr else None,
        **rest,
    )


def target_at(big: bool, target: str, met: bool) -> dict[str, Any]:
    """``Row`` keywords for a target stated at SqueezeNet size only (``-`` at other sizes)."""
    return {"target": target, "met": met} if big else {}


# ---------------------------------------------------------------------------- references


def numpy_pack_bits(x: np.ndarray, bits: int) -> bytes:
    """The general numpy equivalent of ``confide.pack_bits``: explode to bits, packbits."""
    planes = ((x[:, None] >> np.arange(bits, dtype=x.dtype)) & 1).astype(np.uint8)
    return np.packbits(planes, axis=None, bitorder="little").tobytes()


def numpy_quantize(
    x: np.ndarray, clip_range: float, bits: int, rng: np.random.Generator
) -> np.ndarray:
    """Stochastic-rounding quantizer in numpy (non-cryptographic randomness)."""
    y = (np.clip(x, -clip_range, clip_range) + clip_range) * ((2**bits - 1) / (2 * clip_range))
    fl = np.floor(y)
    up = rng.random(x.shape[0], dtype=np.float32) < (y - fl)
    return (fl + up).astype(np.uint32)


def py_shamir_split(secret: bytes, n: int, t: int) -> list[tuple[int, list[int]]]:
    """Pure-Python Shamir over GF(2^61 - 1), 7-byte chunks (the same scheme as confide)."""
    chunks = [int.from_bytes(secret[i : i + 7], "big") for i in range(0, len(secret), 7)]
    polys = [[c] + [secrets.randbelow(MERSENNE61) for _ in range(t - 1)] for c in chunks]
    shares = []
    for x in range(1, n + 1):
        ys = []
        for coeffs in polys:
            acc = 0
            for a in reversed(coeffs):
                acc = (acc * x + a) % MERSENNE61
            ys.append(acc)
        shares.append((x, ys))
    return shares


def py_shamir_combine(shares: list[tuple[int, list[int]]], secret_len: int) -> bytes:
    """Lagrange interpolation at 0 of :func:`py_shamir_split` shares."""
    p = MERSENNE61
    xs = [x for x, _ in shares]
    lambdas = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % p
                den = den * (xm - xj) % p
        lambdas.append(num * pow(den, -1, p) % p)
    out = b""
    for k in range(len(shares[0][1])):
        c = sum(ys[k] * lam for (_, ys), lam in zip(shares, lambdas, strict=True)) % p
        out += c.to_bytes(7, "big")[-min(7, secret_len - 7 * k) :]
    return out


# ---------------------------------------------------------------------------- benches


def bench_clip(n: int, repeat: int, gen: np.random.Generator) -> list[Row]:
    rows = []
    orig = gen.standard_normal(n, dtype=np.float32)
    x = orig.copy()

    def reset() -> None:
        np.copyto(x, orig)

    def np_clip() -> None:
        norm = np.linalg.norm(x)
        if norm > MAX_NORM:
            np.multiply(x, np.float32(MAX_NORM / norm), out=x)

    t_c = measure(lambda: confide.clip_l2(x, MAX_NORM), repeat, reset)
    t_np = measure(np_clip, repeat, reset)
    t_fl = measure_flwr(lambda: flwr_clip_inputs_inplace([x], MAX_NORM), repeat, reset)
    rows.append(row("clip_l2", f"{n:,}", t_c, "np norm+scale", t_np, "clip_inputs_inplace", t_fl))

    # Per-example clipping of a (32, n) matrix, in place; every row is clipped (the input is
    # restored before each repeat, untimed). The target compares it with ONE copy of the
    # matrix, i.e. memory bandwidth: clipping must read it twice and write it once.
    mat0 = gen.standard_normal((CLIP_ROWS, n), dtype=np.float32)
    mat = mat0.copy()

    def reset_mat() -> None:
        np.copyto(mat, mat0)

    def np_clip_rows() -> None:
        norms = np.linalg.norm(mat, axis=1)
        factors = np.minimum(1.0, MAX_NORM / norms).astype(np.float32)
        np.multiply(mat, factors[:, None], out=mat)

    t_rows = measure(lambda: confide.clip_rows(mat, MAX_NORM), repeat, reset_mat)
    t_copy = measure(mat0.copy, repeat)
    t_nprows = measure(np_clip_rows, repeat, reset_mat)
    size = f"{CLIP_ROWS}x{n:,}"
    gbps = mat.nbytes / t_rows / 1e9
    big = n == SQUEEZENET
    rows.append(
        row(
            "clip_rows",
            size,
            t_rows,
            "x.copy()",
            t_copy,
            **target_at(big, "<= 1.5x copy", t_rows <= 1.5 * t_copy),
            note=f"{gbps:.1f} GB/s of matrix",
        )
    )
    rows.append(row("clip_rows", size, t_rows, "np norm+scale", t_nprows))
    return rows


def bench_noise(n: int, repeat: int, gen: np.random.Generator) -> list[Row]:
    rows = []
    rng = confide.SecureRng(bytes(32))
    t_c = measure(lambda: confide.gaussian(n, SIGMA, rng=rng), repeat)
    t_np = measure(lambda: gen.standard_normal(n, dtype=np.float32), repeat)
    big = n == SQUEEZENET
    rows.append(
        row(
            "gaussian f32",
            f"{n:,}",
            t_c,
            "default_rng().standard_normal",
            t_np,
            **target_at(big, "<= numpy", t_c <= t_np),
            note="numpy's RNG is not cryptographic",
        )
    )

    x = gen.standard_normal(n, dtype=np.float32)

    def np_add() -> None:
        np.add(x, gen.standard_normal(n, dtype=np.float32), out=x)

    t_c = measure(lambda: confide.add_gaussian_noise(x, SIGMA, rng=rng, inplace=True), repeat)
    t_np = measure(np_add, repeat)
    t_fl = measure_flwr(lambda: flwr_add_gaussian_noise_inplace([x], SIGMA), repeat)
    rows.append(
        row(
            "add_gaussian_noise f32 (in place)",
            f"{n:,}",
            t_c,
            "x += standard_normal",
            t_np,
            "add_gaussian_noise_inplace",
            t_fl,
        )
    )

    t_c = measure(lambda: confide.discrete_gaussian(n, DG_SIGMA, rng=rng), repeat)
    t_np = measure(lambda: np.rint(gen.normal(0.0, DG_SIGMA, n)).astype(np.int64), repeat)
    rows.append(
        row(
            f"discrete_gaussian sigma={DG_SIGMA:g}", f"{n:,}", t_c, "rint(normal) (not exact)", t_np
        )
    )
    return rows


def bench_quantize(n: int, repeat: int, gen: np.random.Generator) -> list[Row]:
    x = gen.uniform(-1.5, 1.5, n).astype(np.float32)
    rng = confide.SecureRng(bytes(32))
    t_c = measure(lambda: confide.quantize(x, QUANT_RANGE, QUANT_BITS, rng=rng), repeat)
    t_np = measure(lambda: numpy_quantize(x, QUANT_RANGE, QUANT_BITS, gen), repeat)
    t_fl = measure_flwr(lambda: flwr_quantize([x], QUANT_RANGE, 2**QUANT_BITS - 1), repeat)
    big = n == SQUEEZENET
    return [
        row(
            f"quantize u32 {QUANT_BITS}-bit",
            f"{n:,}",
            t_c,
            "np stochastic round",
            t_np,
            "quantize",
            t_fl,
            **target_at(big, "<= 3 ms", t_c <= 3e-3),
        )
    ]


def bench_masks(n: int, repeat: int, gen: np.random.Generator) -> list[Row]:
    rows = []
    dom = confide.MaskDomain(b"bench-session", 1, "pair")
    seeds = [bytes([i]) * 32 for i in range(MANY_SEEDS)]
    x = gen.integers(0, 2**MASK_BITS, n, dtype=np.uint32)
    seed_ints = [int.from_bytes(s[:8], "little") for s in seeds]
    # Flower's quantized vectors are int32/int64 arrays; its masks are int64.
    x_fl = x.astype(np.int64)
    budget_s = n * 4 / (MASK_GBPS_TARGET * 1e9)

    def np_mask(k: int, bits: int) -> Callable[[], np.ndarray]:
        xb = x & np.uint32(2**bits - 1)

        def run() -> np.ndarray:
            y = xb
            for s in seed_ints[:k]:
                # uint32 addition wraps mod 2^32, then reduce mod 2^bits. numpy's PCG64 is
                # not a cryptographic PRG; this is a speed reference only.
                y = y + np.random.default_rng(s).integers(0, 2**bits, n, dtype=np.uint32)
            return y if bits == 32 else y & np.uint32(2**bits - 1)

        return run

    def fl_mask(k: int, bits: int) -> Callable[[], object]:
        xb = [x_fl & (2**bits - 1)]

        def run() -> object:
            y = xb
            for s in seeds[:k]:
                y = flwr_parameters_addition(y, flwr_pseudo_rand_gen(s, 2**bits, [(n,)]))
            return flwr_parameters_mod(y, 2**bits)

        return run

    # Mask expansion alone (materialised), the closest match to Flower's pseudo_rand_gen.
    t_c = measure(lambda: confide.expand_mask(seeds[0], n, MASK_BITS, dom), repeat)
    t_np = measure(
        lambda: np.random.default_rng(seed_ints[0]).integers(0, 2**32, n, dtype=np.uint32),
        repeat,
    )
    t_fl = measure_flwr(lambda: flwr_pseudo_rand_gen(seeds[0], 2**MASK_BITS, [(n,)]), repeat)
    rows.append(
        row(
            "expand_mask b=32",
            f"{n:,}",
            t_c,
            "default_rng(seed).integers",
            t_np,
            "pseudo_rand_gen",
            t_fl,
            note=f"{n * 4 / t_c / 1e9:.2f} GB/s",
        )
    )

    # b = 32 fills the u32 word (no input range check); b = 24 is a ring narrower than the
    # word, so apply_masks must first check every input element is < 2^24.
    for bits, k in ((MASK_BITS, 1), (NARROW_BITS, 1), (MASK_BITS, MANY_SEEDS)):
        masks = [(s, 1 if i % 2 == 0 else -1) for i, s in enumerate(seeds[:k])]
        xb = x & np.uint32(2**bits - 1)
        t_c = measure(
            lambda masks=masks, xb=xb, bits=bits: confide.apply_masks(xb, masks, bits, dom),
            repeat,
        )
        t_np = measure(np_mask(k, bits), repeat)
        t_fl = measure_flwr(fl_mask(k, bits), repeat)
        gbps = k * n * 4 / t_c / 1e9
        rows.append(
            row(
                f"apply_masks u32 b={bits}, {k} seed{'s' if k > 1 else ''}",
                f"{n:,}",
                t_c,
                "x + integers (PCG64)",
                t_np,
                "pseudo_rand_gen+add+mod",
                t_fl,
                target=f">= {MASK_GBPS_TARGET:g} GB/s (<= {_ms(k * budget_s):.2f} ms)",
                met=gbps >= MASK_GBPS_TARGET,
                note=f"{gbps:.2f} GB/s of mask",
            )
        )
    return rows


def bench_pack(n: int, repeat: int, gen: np.random.Generator) -> list[Row]:
    x = gen.integers(0, 2**PACK_BITS, n, dtype=np.uint32)
    assert confide.pack_bits(x, PACK_BITS) == numpy_pack_bits(x, PACK_BITS)
    t_c = measure(lambda: confide.pack_bits(x, PACK_BITS), repeat)
    t_np = measure(lambda: numpy_pack_bits(x, PACK_BITS), repeat)
    return [
        row(
            f"pack_bits {PACK_BITS}-bit",
            f"{n:,}",
            t_c,
            "np.packbits of bit planes",
            t_np,
            note="Flower sends int64 arrays (no packing)",
        )
    ]


def bench_shamir(repeat: int) -> list[Row]:
    secret = secrets.token_bytes(32)
    rng = confide.SecureRng()
    n, t = SHAMIR_N, SHAMIR_T
    size = f"32 B, n={n}, t={t}"
    t_c = measure(lambda: confide.split_secret(secret, n, t, rng=rng), repeat)
    t_py = measure(lambda: py_shamir_split(secret, n, t), repeat)
    t_fl = measure_flwr(lambda: flwr_create_shares(secret, t, n), repeat)
    rows = [
        row(
            "split_secret",
            size,
            t_c,
            "pure Python GF(2^61-1)",
            t_py,
            "create_shares",
            t_fl,
            target="<= 1 ms",
            met=t_c <= 1e-3,
        )
    ]
    shares = confide.split_secret(secret, n, t, rng=rng)[::-1][:t]
    assert confide.combine_shares(shares) == secret
    py_shares = py_shamir_split(secret, n, t)[::-1][:t]
    assert py_shamir_combine(py_shares, len(secret)) == secret
    t_c = measure(lambda: confide.combine_shares(shares), repeat)
    t_py = measure(lambda: py_shamir_combine(py_shares, len(secret)), repeat)
    t_fl = None
    if FLWR_VERSION:
        fl_shares = flwr_create_shares(secret, t, n)[::-1][:t]
        assert flwr_combine_shares(fl_shares) == secret
        t_fl = measure(lambda: flwr_combine_shares(fl_shares), repeat)
    rows.append(
        row(
            "combine_shares",
            f"32 B, t={t}",
            t_c,
            "pure Python GF(2^61-1)",
            t_py,
            "combine_shares",
            t_fl,
        )
    )
    return rows


# ---------------------------------------------------------------------------- report


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[Row], markdown: bool = False) -> None:
    head = [
        "kernel",
        "size",
        "confide ms",
        "numpy/ref baseline",
        "base ms",
        "ratio",
        "flwr function",
        "flwr ms",
        "ratio",
        "target",
        "met?",
        "note",
    ]
    body = [
        [
            r.kernel,
            r.size,
            _fmt(r.confide_ms),
            r.baseline,
            _fmt(r.baseline_ms),
            _fmt(r.baseline_ratio, ".3g"),
            r.flwr,
            _fmt(r.flwr_ms),
            _fmt(r.flwr_ratio, ".3g"),
            r.target,
            {None: "-", True: "yes", False: "NO"}[r.met],
            r.note,
        ]
        for r in rows
    ]
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for b in body:
            print("| " + " | ".join(b) + " |")
        return
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    line = " | ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head))
    print("-+-".join("-" * w for w in widths))
    for b in body:
        print(line.format(*b).rstrip())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        default=f"{SQUEEZENET},{SMALL}",
        help="comma-separated element counts (default: %(default)s)",
    )
    p.add_argument("--repeat", type=int, default=11, help="repeats per timing (median)")
    p.add_argument(
        "--threads",
        choices=["1", "all"],
        default="all",
        help="1: re-run with RAYON_NUM_THREADS=1 (the 'one core' targets); all: every core",
    )
    p.add_argument("--only", default="", help="run only kernels whose group contains this")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads == "1" and os.environ.get("RAYON_NUM_THREADS") != "1":
        # rayon sizes its global pool from the environment the first time a kernel runs and
        # BLAS at import: set both for the whole process by re-executing it.
        env = dict(os.environ, **dict.fromkeys(THREAD_ENV, "1"))
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    if args.threads == "all" and "RAYON_NUM_THREADS" in os.environ:
        # An inherited one-thread setting would silently turn "all" into one core.
        env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    threads = os.environ.get("RAYON_NUM_THREADS") or f"all ({os.cpu_count()})"
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "rayon_threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "confide": confide.__version__,
        "flwr": FLWR_VERSION,
        "repeat": args.repeat,
    }
    print(
        f"confide {meta['confide']} | numpy {meta['numpy']}"
        f" | flwr {FLWR_VERSION or 'not installed'}"
        f" | python {meta['python']} | {meta['cpu']} ({meta['cpu_count']} cpus)"
        f" | rayon threads: {threads} | median of {args.repeat}"
    )
    print("ratio = confide / other (< 1: confide faster). Targets are for ONE core (--threads 1).")
    if FLWR_VERSION is None:
        print("flwr is not importable: Flower columns are '-' (see benches/README.md).")
    gen = np.random.default_rng(12345)
    groups: list[tuple[str, Callable[[], list[Row]]]] = []
    for n in sizes:
        groups += [
            ("clip", lambda n=n: bench_clip(n, args.repeat, gen)),
            ("noise", lambda n=n: bench_noise(n, args.repeat, gen)),
            ("quantize", lambda n=n: bench_quantize(n, args.repeat, gen)),
            ("masks", lambda n=n: bench_masks(n, args.repeat, gen)),
            ("pack", lambda n=n: bench_pack(n, args.repeat, gen)),
        ]
    groups.append(("shamir", lambda: bench_shamir(args.repeat)))
    rows: list[Row] = []
    for name, run in groups:
        if args.only in name:
            rows += run()
    print()
    print_table(rows, markdown=args.markdown)
    if args.json:
        out = {
            "meta": meta,
            "rows": [
                asdict(r) | {"baseline_ratio": r.baseline_ratio, "flwr_ratio": r.flwr_ratio}
                for r in rows
            ],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
