"""Privacy accounting cost per round: the previous full recompute vs the fast engine.

Two jobs, as the server accounts them (issue 13 item 8, issue 12 item 3):

* ``central``: client-level DP, every site every round (q = 1), z = 0.6, one Gaussian per
  round;
* ``sample``: patient-level DP-SGD, q = 0.01, z = 1.1, 1,000 steps per round.

For round R in {10, 100, 1000} it measures, with R - 1 rounds already recorded:

* ``old check``: what the pre-round check cost before (dp-accounting's ``PLDAccountant``
  on the run-length merged ledger of R rounds; the previous ``epsilon_if`` did exactly
  this, and a restart replayed it for every stored round);
* ``restore``: ``PrivacyAccountant.from_state`` of the stored state, caches cold (a fresh
  process);
* ``check``: ``Budget.check`` for round R right after the restore (what the server runs
  before the round), and ``check (cold)`` with every cache cleared first;
* ``record``: ``record_round`` of the checked round (reuses the check's accounting).

The stored state is synthetic (the R - 1 rounds' events with placeholder per-round values)
so that the bench does not first run the job; ``from_state`` only reads the history and
re-accounts the current total. Run::

    python benches/python/bench_accountant.py           # ~5 min on a busy 2-core VM
    python benches/python/bench_accountant.py --quick   # skips old checks above 20 s

Needs the ``privacy`` extra. Prints a Markdown table; numbers go to benches/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from confide.privacy import accountant as acct
from confide.privacy.accountant import (
    Budget,
    PrivacyAccountant,
    PrivacyEvent,
    client_poisson_event,
    dpsgd_event,
)

DELTA = 1e-5
ROUNDS = (10, 100, 1000)
JOBS: dict[str, PrivacyEvent] = {
    "central q=1 z=0.6": client_poisson_event(1.0, 0.6),
    "sample q=0.01 z=1.1 x1000": dpsgd_event(0.01, 1.1, 1000),
}
#: Old checks known to take longer than this (central at 1,000 rounds: ~90 s) are skipped
#: with --quick.
QUICK_SKIP = {("central q=1 z=0.6", 1000)}


def _clear_caches() -> None:
    for cache in (
        acct._account_cached,
        acct._pld_cached,
        acct._rdp_cached,
        acct._rdp_curve,
        acct._sampled_step,
    ):
        cache.cache_clear()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _state(event: PrivacyEvent, rounds: int) -> dict[str, Any]:
    rec = {"epsilon_round": 0.0, "epsilon": 0.0, "epsilon_rdp": 0.0, "method": "pld"}
    return {
        "version": 1,
        "delta": DELTA,
        "relation": "add_or_remove",
        "pld_discretization": 1e-4,
        "dp_accounting": "bench",
        "rounds": [{"round": r, "events": [event.to_dict()], **rec} for r in range(rounds)],
    }


def _row(name: str, event: PrivacyEvent, r: int, quick: bool) -> dict[str, Any]:
    state = _state(event, r - 1)
    merged = tuple(acct._run_length([event] * r))
    if quick and (name, r) in QUICK_SKIP:
        old_eps, old_s = None, None
    else:
        old_eps, old_s = _timed(lambda: acct._pld_epsilon_dp_accounting(merged, DELTA, 1e-4))
    _clear_caches()
    acc, restore_s = _timed(lambda: PrivacyAccountant.from_state(state))
    budget = Budget(1e9, DELTA)
    eps, check_s = _timed(lambda: budget.check(acc, [event]))
    _, record_s = _timed(lambda: acc.record_round(r - 1, [event]))
    _clear_caches()
    fresh = PrivacyAccountant.from_state(_state(event, r - 1))
    _clear_caches()
    _, cold_s = _timed(lambda: budget.check(fresh, [event]))
    return {
        "job": name,
        "R": r,
        "epsilon": eps,
        "old_epsilon": old_eps,
        "old_check_s": old_s,
        "restore_s": restore_s,
        "check_s": check_s,
        "cold_check_s": cold_s,
        "record_s": record_s,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "skipped" if x is None else f"{x:.{digits}f}"


def main() -> None:
    """Run the bench and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip old checks above 20 s")
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    rows = [_row(n, e, r, args.quick) for n, e in JOBS.items() for r in ROUNDS]
    load = os.getloadavg()[0]
    print(f"delta = {DELTA:g}; load average {load:.2f} on {os.cpu_count()} cores\n")
    print(
        "| job | round R | epsilon (new) | epsilon (old) | old check (s) | restore (s) "
        "| check (s) | check, cold (s) | record (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        old = row["old_epsilon"]
        print(
            f"| {row['job']} | {row['R']} | {row['epsilon']:.6f} | "
            f"{'skipped' if old is None else f'{old:.6f}'} | {_fmt(row['old_check_s'], 2)} | "
            f"{_fmt(row['restore_s'])} | {_fmt(row['check_s'])} | "
            f"{_fmt(row['cold_check_s'])} | {_fmt(row['record_s'], 4)} |"
        )


if __name__ == "__main__":
    main()
