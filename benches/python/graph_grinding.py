"""How much a server gains by grinding the Harary graph seed (issue 11, attack 6's residue).

The seed is the session id, a SHA-256 of the round setup and every signed advertisement that
enters the session (``confide.secagg.crypto.session_id``). Honest sites sign one advertisement
per round, but the server still chooses *which* of them enter (any subset of at least
``min_survivors``), and a colluding site can sign as many fresh advertisements as it likes.
Each choice is a fresh, independent graph; a server that evaluates ``G`` of them and keeps
one where the bad event of ``confide.secagg.params`` happens turns the per-graph bound ``p``
into at most ``G * p`` (a union bound; ``1 - (1 - p)**G`` for independent seeds).

Prints, for the server's default threat model (``adversarial_fraction = dropout_fraction =
0.1``, 2^-40), per cohort size: the derived ``k``, ``t``, the per-graph bound split into its
two events (leak and disconnection), ``log2`` of the number of advertisement subsets the
server may choose, and the bound after grinding for one core-day at the measured rate of
``session_id`` + ``harary_graph`` + the leak check in this process. Then a toy check at a
size where the per-graph probability is measurable: the frequency of a leaking graph over
random seeds, and the number of re-drawn colluder advertisements until the first one.

Run from the repository root in the dev environment (imports confide):
``python benches/python/graph_grinding.py [--json out.json]``; about a minute on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import time
from typing import Any

from confide.secagg.crypto import session_id
from confide.secagg.graph import harary_graph
from confide.secagg.params import (
    ThreatModel,
    _log2_add,
    _log2_disconnect,
    _log2_hyp_tails,
    _tail,
    derive_params,
)

BLOB = 32 * 5 + 64  # an advertisement: ~5 length-prefixed 32-byte fields and a signature
SIZES = (50, 100, 200, 300, 500, 1000)
CORE_DAY = 86400.0


def log2_subsets(n: int, at_least: int) -> float:
    """``log2`` of the number of subsets of ``n`` advertisements with ``>= at_least`` members."""
    total = sum(math.comb(n, m) for m in range(at_least, n + 1))
    return math.log2(total)


def ids_for(n: int) -> list[str]:
    return [f"site-{i:04d}" for i in range(n)]


def leaks(graph: dict[str, tuple[str, ...]], colluders: set[str], need: int) -> bool:
    """The bound's leak event: an honest client with ``>= need`` colluding share holders."""
    return any(
        sum(j in colluders for j in nbrs) >= need
        for owner, nbrs in graph.items()
        if owner not in colluders
    )


def grind_rate(n: int, k: int, need: int, colluders: set[str], seconds: float) -> float:
    """Graphs per second: re-draw one advertisement, hash the session, build, check."""
    ids = ids_for(n)
    blobs = {i: os.urandom(BLOB) for i in ids}
    digest = hashlib.sha256(b"setup").digest()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        blobs[ids[0]] = os.urandom(BLOB)  # a colluder's fresh advertisement
        seed = session_id(digest, 1, blobs.items())
        leaks(harary_graph(ids, k, seed), colluders, need)
        count += 1
    return count / (time.perf_counter() - t0)


def defaults_table(seconds: float) -> list[dict[str, Any]]:
    rows = []
    threat = ThreatModel(0.1, 0.1)
    for n in SIZES:
        p = derive_params(n, threat, quant_bits=16, clip_range=1.0, max_weight=1000)
        need = 2 * p.t - p.k - 1
        tails = _log2_hyp_tails(n - 1, p.corrupt, p.k)
        leak = math.log2(n) + _tail(tails, need)
        # With a unique roster every honest holder releases the same kind of share of an
        # owner, so the server needs t colluding holders of one kind, not 2t - k - 1.
        leak_unique = math.log2(n) + _tail(tails, p.t)
        disconnect = _log2_disconnect(n, p.corrupt + p.max_dropouts, p.k)
        rate = grind_rate(n, p.k, need, set(ids_for(n)[: p.corrupt]), seconds)
        per_day = math.log2(rate * CORE_DAY)
        bound = p.log2_privacy_failure
        bound_unique = min(0.0, _log2_add(leak_unique, disconnect))
        rows.append(
            {
                "n": n,
                "k": p.k,
                "t": p.t,
                "corrupt": p.corrupt,
                "max_dropouts": p.max_dropouts,
                "min_survivors": p.min_survivors,
                "log2_leak": leak,
                "log2_disconnect": disconnect,
                "log2_bound": bound,
                "log2_graphs_to_reach_2^-40": max(0.0, -40.0 - bound),
                "log2_leak_unique_roster": leak_unique,
                "log2_bound_unique_roster": bound_unique,
                "log2_bound_unique_roster_after_core_day": min(0.0, bound_unique + per_day),
                "log2_subsets": log2_subsets(n, p.min_survivors),
                "graphs_per_second": rate,
                "log2_graphs_per_core_day": per_day,
                "log2_bound_after_core_day": min(0.0, bound + per_day),
            }
        )
    return rows


def toy_check(trials: int, victims: int) -> dict[str, Any]:
    """n = 100, k = 8, t = 6, C = 3: leak iff all 3 colluders hold one honest client's shares."""
    n, k, t, c = 100, 8, 6, 3
    need = 2 * t - k - 1
    ids = ids_for(n)
    colluders = set(ids[:c])
    bound = math.log2(n) + _tail(_log2_hyp_tails(n - 1, c, k), need)
    digest = hashlib.sha256(b"toy").digest()
    blobs = {i: os.urandom(BLOB) for i in ids}
    hits = 0
    for _ in range(trials):
        blobs[ids[0]] = os.urandom(BLOB)
        hits += leaks(harary_graph(ids, k, session_id(digest, 1, blobs.items())), colluders, need)
    tries = []
    for _ in range(victims):  # re-draw until the graph leaks: what a grinding server does
        count = 0
        while True:
            count += 1
            blobs[ids[0]] = os.urandom(BLOB)
            g = harary_graph(ids, k, session_id(digest, 1, blobs.items()))
            if leaks(g, colluders, need):
                break
        tries.append(count)
    return {
        "n": n,
        "k": k,
        "t": t,
        "corrupt": c,
        "leak_needs_colluding_holders": need,
        "log2_bound_per_graph": bound,
        "leaking_fraction": hits / trials,
        "trials": trials,
        "tries_to_first_leak_median": statistics.median(tries),
        "tries_to_first_leak_max": max(tries),
        "victims": victims,
    }


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and math.isinf(x) else x


def fmt(x: float) -> str:
    return "-inf" if x == -math.inf else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per cohort size")
    args = ap.parse_args(argv)
    rows = defaults_table(args.seconds)
    print(
        "| n | k | t | C | D | log2 subsets | log2 leak | log2 disconnect | log2 bound "
        "| log2 graphs to 2^-40 | graphs/s (1 core) | log2 bound after 1 core-day "
        "| log2 bound, unique roster | same after 1 core-day |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        to40 = "-" if r["log2_bound"] == -math.inf else f"{r['log2_graphs_to_reach_2^-40']:.1f}"
        print(
            f"| {r['n']} | {r['k']} | {r['t']} | {r['corrupt']} | {r['max_dropouts']} "
            f"| {r['log2_subsets']:.1f} | {fmt(r['log2_leak'])} | {fmt(r['log2_disconnect'])} "
            f"| {fmt(r['log2_bound'])} | {to40} | {r['graphs_per_second']:.0f} "
            f"| {fmt(r['log2_bound_after_core_day'])} | {fmt(r['log2_bound_unique_roster'])} "
            f"| {fmt(r['log2_bound_unique_roster_after_core_day'])} |"
        )
    toy = toy_check(trials=4000, victims=15)
    print(
        f"\ntoy n={toy['n']} k={toy['k']} t={toy['t']} C={toy['corrupt']}: per-graph bound "
        f"2^{toy['log2_bound_per_graph']:.2f}, measured leaking fraction "
        f"{toy['leaking_fraction']:.4f} over {toy['trials']} seeds; re-drawn colluder "
        f"advertisements until a leaking graph: median {toy['tries_to_first_leak_median']}, "
        f"max {toy['tries_to_first_leak_max']} ({toy['victims']} runs)"
    )
    if args.json:
        doc = {
            "python": platform.python_version(),
            "note": "log2 values of -inf (impossible) are written as null",
            "defaults": [{k: _finite(v) for k, v in r.items()} for r in rows],
            "toy": toy,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, allow_nan=False)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
