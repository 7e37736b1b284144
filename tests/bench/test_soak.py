"""The soak bench (benches/federation/soak.py): its fits and verdicts, and one tiny real run.

The fitting is checked on synthetic round histories with known slopes (exact answers:
the series are straight lines, so least squares must return them), including a replay
cache that fills and then stays flat, which the whole-run fit reports as growth and the
after-window fit must not. The real run starts ``confide-server run`` and two sites for a
few rounds and checks the document's shape.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

FOLDER = Path(__file__).resolve().parents[2] / "benches" / "federation"


def _load() -> ModuleType:
    if str(FOLDER) not in sys.path:  # soak.py imports its neighbour sites.py
        sys.path.insert(0, str(FOLDER))
    spec = importlib.util.spec_from_file_location("soak_bench", FOLDER / "soak.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


soak = _load()


def _history(
    n: int, dur: Any, gap: float = 0.05, rss: Any = None, fds: Any = None
) -> tuple[list[dict[str, Any]], list[tuple[float, float, int]]]:
    """``n`` committed rounds of duration ``dur(r)`` with ``gap`` s between them, and
    samples of RSS ``rss(r)`` / FDs ``fds(r)`` taken at each commit."""
    rss = rss or (lambda r: 100.0)
    fds = fds or (lambda r: 15)
    rows, samples, t = [], [], 1000.0
    for r in range(1, n + 1):
        start = t + gap
        end = start + dur(r)
        rows.append({"round": r, "status": "committed", "started_at": start, "ended_at": end})
        samples.append((end - 1e-6, float(rss(r)), int(fds(r))))
        t = end
    return rows, samples


def test_straight_lines_are_fitted_exactly() -> None:
    rows, samples = _history(
        200, dur=lambda r: 0.1 + 0.001 * r, rss=lambda r: 50.0 + 0.02 * r, fds=lambda r: 15
    )
    doc = soak.analyse(rows, samples, warmup=0.2)
    assert doc["rounds_committed"] == 200
    assert doc["warmup_rounds"] == 40
    after, whole = doc["after_window"], doc["whole_run"]
    assert (after["first_round"], after["last_round"], after["measured_rounds"]) == (41, 200, 160)
    assert whole["first_round"] == 1
    # Round time 0.141 -> 0.300 s over rounds 41..200: +112.8 %.
    assert after["round_s_first"] == pytest.approx(0.141)
    assert after["round_s_last"] == pytest.approx(0.300)
    assert after["round_time_drift_pct"] == pytest.approx((0.300 - 0.141) / 0.141 * 100)
    # Period = gap + duration of the round: 0.05 + 0.1 + 0.001 r.
    assert after["period_s_first"] == pytest.approx(0.191)
    assert after["round_period_drift_pct"] == pytest.approx((0.350 - 0.191) / 0.191 * 100)
    # RSS 50.82 -> 54.0 MiB: 20 MiB per 1,000 rounds.
    assert after["rss_mib_per_1000_rounds"] == pytest.approx(20.0)
    assert after["rss_growth_pct"] == pytest.approx((54.0 - 50.82) / 50.82 * 100)
    assert after["fds_per_1000_rounds"] == pytest.approx(0.0, abs=1e-9)
    # 6.3 % RSS growth and +113 % / +83 % drifts: every target missed.
    assert set(doc["verdict"].values()) == {"missed"}
    assert doc["targets_met"] is False


def test_flat_series_meet_every_target() -> None:
    # A sawtooth round time around 0.2 s (noise without a trend) and a flat RSS.
    rows, samples = _history(100, dur=lambda r: 0.2 + (0.01 if r % 2 else -0.01))
    doc = soak.analyse(rows, samples, warmup=0.2)
    assert abs(doc["after_window"]["round_time_drift_pct"]) < 2.0
    assert doc["after_window"]["rss_growth_pct"] == pytest.approx(0.0, abs=1e-9)
    assert doc["verdict"] == dict.fromkeys(("rss", "round_time", "round_period"), "met")
    assert doc["targets_met"] is True


def test_the_window_leaves_out_a_replay_cache_fill() -> None:
    # RSS grows 0.05 MiB a round until round 300 (the cache fills), then stays flat.
    rows, samples = _history(
        1000, dur=lambda r: 0.1, rss=lambda r: 80.0 + 0.05 * min(r, 300), gap=0.0
    )
    full_at = float(rows[299]["ended_at"])  # round 300 commits as the window fills
    doc = soak.analyse(rows, samples, warmup=0.2, window_full_at=full_at)
    # 20 % would be 200 rounds; the window pushes the warm-up to round 300.
    assert doc["warmup_rounds"] == 299
    assert doc["after_window"]["first_round"] == 300
    assert doc["after_window"]["rss_growth_pct"] == pytest.approx(0.0, abs=1e-9)
    assert doc["verdict"]["rss"] == "met"
    assert doc["whole_run_verdict"]["rss"] == "missed"  # the fill, seen as growth
    assert doc["whole_run"]["rss_growth_pct"] > 5.0
    # Without the window the 20 % warm-up fits part of the fill.
    early = soak.analyse(rows, samples, warmup=0.2)
    assert early["warmup_rounds"] == 200
    assert early["after_window"]["rss_growth_pct"] > 0.5


def test_too_few_rounds_after_the_window_is_not_measured() -> None:
    rows, samples = _history(30, dur=lambda r: 0.1)
    # The window fills after the last commit: nothing is measured after it.
    doc = soak.analyse(rows, samples, warmup=0.2, window_full_at=1e12)
    assert doc["warmup_rounds"] == 30
    assert doc["after_window"]["measured_rounds"] == 0
    assert set(doc["verdict"].values()) == {"not measured"}
    assert doc["targets_met"] is False
    assert doc["whole_run"]["measured_rounds"] == 30
    assert set(doc["whole_run_verdict"].values()) == {"met"}
    # Aborted and open rounds are left out of every fit.
    rows[5]["status"] = "aborted"
    rows[-1]["ended_at"] = None
    assert soak.analyse(rows, samples, warmup=0.0)["rounds_committed"] == 28


def test_a_nan_drift_is_missed_not_met() -> None:
    fit = {"measured_rounds": 50, "rss_growth_pct": 1.0, "round_time_drift_pct": math.nan}
    fit["round_period_drift_pct"] = 0.0
    assert soak.verdicts(fit) == {"rss": "met", "round_time": "missed", "round_period": "met"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "central"])
def test_a_tiny_real_soak(tmp_path: Path, mode: str) -> None:
    args = soak.parse_args(
        [
            "--mode",
            mode,
            "--rounds",
            "12",
            "--clients",
            "2",
            "--params",
            "64",
            "--max-clock-skew",
            "0.5",
            # Longer than the run: the sampler's first sample and the one it takes when
            # stopped are all there is, and CPU per round must still be measured (a run
            # shorter than the interval used to leave one sample and no CPU figures).
            "--sample-every",
            "60",
            "--workdir",
            str(tmp_path / "job"),
        ]
    )
    doc = soak.run(args)
    assert doc["rounds_committed"] == 12
    assert doc["mode"] == mode
    assert doc["whole_run"]["measured_rounds"] == 12
    assert doc["whole_run"]["rss_mib_start"] > 0
    assert doc["files_left"]["updates"] == 0  # [retention] prune_updates
    assert doc["files_left"]["models"] <= 10 + 2
    assert doc["ledger_verify_rc"] == 0
    assert len(doc["load_average"]) == 3
    assert set(doc["verdict"]) == {"rss", "round_time", "round_period"}
    assert isinstance(doc["targets_met"], bool)
    assert (tmp_path / "job" / "server.log").exists()
    # The server used CPU in its rounds; the sites (this process) too.
    assert doc["cpu_whole_run"]["server_cpu_ms_median"] > 0
    assert doc["cpu_whole_run"]["sites_cpu_ms_median"] > 0
    assert doc["blocks"][0]["rounds"] == [1, 12]
    # The sites' requests were counted (the exact per-block figure: the synthetic test).
    assert doc["blocks"][0]["requests_per_round"] > 0
    assert 0 <= doc["blocks"][0]["steal_pct"] <= 100
    assert doc["load_1min"]["min"] <= doc["load_1min"]["max"]


def _cpu_samples(
    rows: list[dict[str, Any]], server_ms: Any, sites_ms: Any, load: Any
) -> list[tuple[float, float, float, float]]:
    """CPU samples at every commit: cumulative server / sites CPU seconds that grow by
    ``server_ms(r)`` / ``sites_ms(r)`` from the commit before round ``r`` to its own, and
    a 1-minute load ``load(r)``; the first sample at round 1's start."""
    out = [(float(rows[0]["started_at"]), 10.0, 2.0, float(load(1)))]
    srv, sit = 10.0, 2.0
    for row in rows:
        r = int(row["round"])
        srv += server_ms(r) / 1000
        sit += sites_ms(r) / 1000
        out.append((float(row["ended_at"]), srv, sit, float(load(r))))
    return out


def test_cpu_per_round_is_fitted_apart_from_wall_time() -> None:
    # Wall time grows +113 % (a loaded machine, say) while the server's CPU per round grows
    # 20 -> 20.4 ms over rounds 42..200 and the sites' stays at 5 ms.
    rows, samples = _history(200, dur=lambda r: 0.1 + 0.001 * r)
    cpu = _cpu_samples(rows, lambda r: 20.0 + 0.0025 * (r - 40), lambda r: 5.0, lambda r: r / 100)
    doc = soak.analyse(rows, samples, warmup=0.2, cpu=cpu, block=50)
    after = doc["cpu_after_window"]
    assert after["measured_rounds"] == 160
    assert after["server_cpu_ms_first"] == pytest.approx(20.0025)
    assert after["server_cpu_ms_last"] == pytest.approx(20.4)
    assert after["server_cpu_drift_pct"] == pytest.approx((20.4 - 20.0025) / 20.0025 * 100)
    assert after["sites_cpu_ms_median"] == pytest.approx(5.0)
    assert after["sites_cpu_drift_pct"] == pytest.approx(0.0, abs=1e-6)
    # The verdicts stay on wall time: the round-time target is missed.
    assert doc["verdict"]["round_time"] == "missed"
    assert doc["cpu_whole_run"]["measured_rounds"] == 199  # round 1 has no commit before it
    assert doc["load_1min"] == {"min": 0.01, "median": pytest.approx(1.0), "max": 2.0}


def test_blocks_report_wall_cpu_and_load() -> None:
    rows, samples = _history(100, dur=lambda r: 0.1 if r <= 50 else 0.3, gap=0.0)
    cpu = _cpu_samples(
        rows, lambda r: 10.0 if r <= 50 else 30.0, lambda r: 4.0, lambda r: 1 if r <= 50 else 3
    )
    doc = soak.analyse(rows, samples, warmup=0.0, cpu=cpu, block=50)
    first, second = doc["blocks"]
    assert first["rounds"] == [1, 50]
    assert second["rounds"] == [51, 100]
    assert first["round_s_min"] == pytest.approx(0.1)
    assert second["round_s_median"] == pytest.approx(0.3)
    assert second["period_s_median"] == pytest.approx(0.3)
    assert first["server_cpu_ms_per_round"] == pytest.approx(10.0)
    assert second["server_cpu_ms_per_round"] == pytest.approx(30.0)
    assert second["sites_cpu_ms_per_round"] == pytest.approx(4.0)
    assert first["load"] == [1.0, 1.0, 1.0]
    assert second["load"] == [3.0, 3.0, 3.0]
    # Without CPU samples the table still holds the wall-time columns.
    bare = soak.analyse(rows, samples, warmup=0.0, block=50)["blocks"]
    assert bare[1]["round_s_median"] == pytest.approx(0.3)
    assert "server_cpu_ms_per_round" not in bare[1]


def test_cpu_seconds_of_this_process_grow_with_work() -> None:
    import os

    before = soak.cpu_s(os.getpid())
    own = soak.own_cpu_s()
    x = 0
    while soak.own_cpu_s() - own < 0.05:  # burn CPU until this process has used 50 ms
        x += 1
    assert soak.cpu_s(os.getpid()) - before >= 0.04  # 1/CLK_TCK resolution


def test_blocks_report_requests_per_round_and_steal() -> None:
    # Rounds 1-50: 4 requests a round, no steal; rounds 51-100: 6 a round, and the host
    # took 1 tick in 10 (steal 10 %).
    rows, samples = _history(100, dur=lambda r: 0.1, gap=0.0)
    cpu = _cpu_samples(rows, lambda r: 10.0, lambda r: 4.0, lambda r: 1)
    host = [(float(rows[0]["started_at"]), 0.0, 0.0, 0.0)]
    req = steal = total = 0.0
    for row in rows:
        r = int(row["round"])
        req += 4 if r <= 50 else 6
        total += 10
        steal += 0 if r <= 50 else 1
        host.append((float(row["ended_at"]), req, steal, total))
    doc = soak.analyse(rows, samples, warmup=0.0, cpu=cpu, block=50, host=host)
    first, second = doc["blocks"]
    assert first["requests_per_round"] == pytest.approx(4.0)
    assert second["requests_per_round"] == pytest.approx(6.0)
    assert first["steal_pct"] == pytest.approx(0.0)
    assert second["steal_pct"] == pytest.approx(10.0)
    assert doc["steal_pct"] == pytest.approx(5.0)
    # Without host samples: no such columns, and no run-wide steal.
    bare = soak.analyse(rows, samples, warmup=0.0, cpu=cpu, block=50)
    assert "requests_per_round" not in bare["blocks"][0]
    assert bare["steal_pct"] is None


def test_host_ticks_read_this_machine() -> None:
    steal, total = soak.host_ticks()
    assert 0 <= steal <= total
    assert total > 0
