#!/usr/bin/env python3
"""Summarise the last ``cargo bench -p confide-benches`` run as a Markdown table.

Reads criterion's ``target/criterion/**/new/{estimates,benchmark}.json`` (standard library
only) and prints, per bench, the median time with its 95% confidence interval and the
throughput at the median: GB/s (10^9 bytes, not criterion's GiB/s) for byte throughputs,
millions of elements per second for element throughputs. ``make bench-rust`` runs it after
the benches; the output is what benches/README.md's Rust table is pasted from.

Usage::

    python3 benches/python/criterion_table.py [CRITERION_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt_ns(ns: float) -> str:
    return f"{ns / 1e6:.3f} ms" if ns >= 1e5 else f"{ns / 1e3:.1f} µs"


def rows(root: Path) -> list[tuple[str, str, str, str]]:
    out = []
    for est_path in sorted(root.glob("**/new/estimates.json")):
        bench = json.loads((est_path.parent / "benchmark.json").read_text())
        median = json.loads(est_path.read_text())["median"]
        ns = median["point_estimate"]
        ci = median["confidence_interval"]
        thr = ""
        for kind, amount in (bench.get("throughput") or {}).items():
            if kind in ("Bytes", "BytesDecimal"):
                thr = f"{amount / ns:.2f} GB/s"
            elif kind == "Elements":
                thr = f"{amount / ns * 1e3:.0f} Melem/s"
        out.append(
            (
                bench["full_id"],
                _fmt_ns(ns),
                f"{_fmt_ns(ci['lower_bound'])} - {_fmt_ns(ci['upper_bound'])}",
                thr,
            )
        )
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "target" / "criterion"
    table = rows(root)
    if not table:
        print(f"no criterion results under {root}; run `make bench-rust` first", file=sys.stderr)
        return 1
    print("| bench | median | 95% CI of median | throughput |")
    print("|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
