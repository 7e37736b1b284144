"""Per-round PLD cost of a long sample-DP job: the inverse-FFT reader vs the band-limited one.

What ``JobPrivacy`` computes ahead of every round of the soak's sample-DP job (``q = 0.01``,
``z = 1.1``, 10 steps a round, delta = 1e-5): the cumulative epsilon of ``n`` steps,
``account(acc.ledger(next_round))``. For ``n`` in 10k, 40k, 80k and 160k steps (rounds
1,000 .. 16,000) it times, per part and summed over the two PMFs (remove, add):

* the previous path: ``_bounds``, the one-step log-spectrum at the FFT length (cached per
  length), ``exp(n * log F)``, ``irfft``, ``power`` (bounds + power + irfft with the
  spectrum cached), ``_pmf_epsilon`` (the walk down the window), the RDP cross-check;
* the shipped path: ``_StepPmf.epsilon`` with the live bins of the length cached (a round
  after the previous one), ``account`` (caches cleared, so one full accounting), a new FFT
  length (live bins recomputed: one rfft), and ``record_round`` after the prefetch;
* with ``--gil``: a 1 ms asyncio tick probe and a pure-Python counter in the main thread,
  idle and while a worker thread accounts in a loop (does the worker hold the GIL?).

Run::

    python benches/python/bench_pld_round.py [--gil]   # ~1 min on a 2-core VM

Best of 5 (3 for the log-spectrum), one thread. Prints Markdown; numbers in
benches/README.md with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from confide.privacy import accountant as acct
from confide.privacy.accountant import PrivacyAccountant, account, dpsgd_event

Q, Z, DISC, DELTA = 0.01, 1.1, 1e-4, 1e-5
NS = (10_000, 40_000, 80_000, 160_000)


def _best(f: Callable[[], Any], reps: int = 5) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, out


def _clear() -> None:
    for cache in (acct._account_cached, acct._pld_cached, acct._rdp_cached):
        cache.cache_clear()


def _old_parts(n: int) -> dict[str, float]:
    tot: dict[str, float] = {}
    for step in acct._sampled_step(Q, Z, DISC):
        size = step._window(n)[2]
        parts: dict[str, float] = {}
        parts["bounds"], _ = _best(lambda s=step: s._bounds(n))
        step._log_spectra.clear()
        parts["log spectrum"], log_spec = _best(lambda s=step, m=size: s._log_spectrum(m), 3)
        parts["exp(n log F)"], g = _best(lambda ls=log_spec: np.exp(n * ls))
        parts["irfft"], _ = _best(lambda gg=g, m=size: np.fft.irfft(gg, m))
        step._log_spectra[size] = log_spec
        parts["power (cached F)"], pmf = _best(lambda s=step: s.power(n))
        parts["_pmf_epsilon"], _ = _best(lambda p=pmf: acct._pmf_epsilon(p, DELTA, DISC))
        for k, v in parts.items():
            tot[k] = tot.get(k, 0.0) + v
    ev = (dpsgd_event(Q, Z, n),)
    tot["RDP"], _ = _best(
        lambda: (acct._rdp_cached.cache_clear(), acct._rdp_cached(ev, DELTA, "add_or_remove"))
    )
    tot["old account"] = tot["power (cached F)"] + tot["_pmf_epsilon"] + tot["RDP"]
    return tot


def _new_parts(n: int) -> dict[str, float]:
    steps = acct._sampled_step(Q, Z, DISC)
    account([dpsgd_event(Q, Z, n - 10)], DELTA)  # the previous round: live bins cached
    _clear()
    out: dict[str, float] = {"band-limited epsilon": 0.0}
    for step in steps:
        ms, _ = _best(lambda s=step: s.epsilon(n, DELTA, DISC))
        out["band-limited epsilon"] += ms
    k = [0]

    def one() -> float:
        _clear()
        k[0] += 10
        return account([dpsgd_event(Q, Z, n + k[0])], DELTA).epsilon

    out["account"], _ = _best(one)
    for step in steps:
        step._live = None
        step._log_spectra.clear()
    _clear()
    out["account, new FFT length"], _ = _best(lambda: account([dpsgd_event(Q, Z, n)], DELTA), 1)
    acc = PrivacyAccountant(DELTA)
    acc.record_round(0, [dpsgd_event(Q, Z, n - 20)])
    acc.record_round(1, [dpsgd_event(Q, Z, 10)])
    account(acc.ledger([dpsgd_event(Q, Z, 10)]), DELTA)  # the prefetch
    t0 = time.perf_counter()
    acc.record_round(2, [dpsgd_event(Q, Z, 10)])
    out["record_round"] = (time.perf_counter() - t0) * 1e3
    return out


async def _probe(seconds: float) -> tuple[float, float, float]:
    late: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        late.append(time.perf_counter() - t0 - 0.001)
    late.sort()
    return late[len(late) // 2] * 1e3, late[int(len(late) * 0.99)] * 1e3, late[-1] * 1e3


def _counter(seconds: float) -> int:
    c, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        c += 1
    return c


def _gil(n: int, band: bool) -> None:
    saved = acct._MAX_LIVE
    for step in acct._sampled_step(Q, Z, DISC):
        step._live = None
    if not band:
        acct._MAX_LIVE = -1  # every step declines: the previous (inverse-FFT) path
    try:
        stop = threading.Event()

        def work() -> None:
            k = 0
            while not stop.is_set():
                _clear()
                account([dpsgd_event(Q, Z, n + k)], DELTA)
                k += 10

        idle_p, idle_c = asyncio.run(_probe(3)), _counter(2)
        th = threading.Thread(target=work)
        th.start()
        busy_p, busy_c = asyncio.run(_probe(3)), _counter(2)
        stop.set()
        th.join()
    finally:
        acct._MAX_LIVE = saved
    name = "band-limited" if band else "inverse FFT"
    print(
        f"| {name} | {idle_p[0]:.2f} / {idle_p[1]:.2f} / {idle_p[2]:.1f} "
        f"| {busy_p[0]:.2f} / {busy_p[1]:.2f} / {busy_p[2]:.1f} "
        f"| {idle_c / 1e6:.1f} M | {busy_c / 1e6:.1f} M |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--gil", action="store_true", help="also run the GIL probe (~25 s)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    rows = {n: {**_old_parts(n), **_new_parts(n)} for n in NS}
    cols = list(next(iter(rows.values())))
    print("| ms (both PMFs) | " + " | ".join(f"n = {n:,}" for n in NS) + " |")
    print("|---|" + "---:|" * len(NS))
    for c in cols:
        print(f"| {c} | " + " | ".join(f"{rows[n][c]:.2f}" for n in NS) + " |")
    if args.gil:
        print(
            "\n| worker | tick p50 / p99 / max ms, idle | same, worker busy | counter, idle "
            "| counter, busy |\n|---|---|---|---|---|"
        )
        for band in (False, True):
            _gil(80_000, band)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
