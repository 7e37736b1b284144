"""Soak test of confide-server: many small rounds; does the server stay flat?

Runs the server as a subprocess (``confide-server run``) and, in this process, N asyncio
clients that enrol, long-poll for tasks, upload a tiny float32 delta (signed safetensors)
for every training stage and a metrics JSON for every evaluation stage, as fast as the
server takes them. While it runs, a thread samples the server's RSS (``/proc/<pid>/status``
``VmRSS``) and open file descriptors (``/proc/<pid>/fd``) and times ``GET /v1/health``
(what a stalled event loop shows). At the end it reads the round history through the
paginated ``GET /v1/status`` and fits least-squares lines twice: over the whole run, and
after a warm-up window (the first ``--warmup`` share of the rounds, 20 % by default, and at
least every round that committed before the replay cache's window was full, see below).
Each fit gives

* RSS against the round count: the growth it predicts over the window's rounds, in % of
  the fitted RSS at its first round (target <= 5 %);
* round time (``ended_at - started_at``) and round period (wall time from one commit to
  the next: what a site sees, including the work between a commit and the next start,
  such as retention) against the round: the drift each predicts from the window's first
  to its last round, in % (target <= 10 %);
* open FDs against the round: FDs gained per 1,000 rounds (reported).

The after-window fit gives the verdicts (``met`` / ``missed`` / ``not measured`` with
fewer than 10 rounds in it) and ``targets_met``; the whole-run fit is reported beside it.

Wall time on a shared machine moves with the other jobs' load, which can fake a drift,
so the sampler also reads the server's CPU time (``utime + stime`` of every thread, from
``/proc/<pid>/stat``), this process's own (the sites), and the 1-minute load average. Per
round (from one commit to the next, interpolated between samples) both CPU times are
fitted like the round period (``cpu_whole_run``, ``cpu_after_window``: ms per round at
the window's first and last round, drift in %), and a table per ``--block`` rounds
(``blocks``: fastest and median round, median period, CPU ms per round, load min /
median / max) and the load over the run (``load_1min``) are reported. Each block also
holds the sites' HTTP requests per round (``requests_per_round``: a slower server can make
sites poll more, so CPU rising in both processes is not by itself the host) and the
machine's CPU steal in % of all CPU time (``steal_pct``, ``/proc/stat``: time a shared
host's other guests took from this VM, which inflates both CPU times). **The targets are
judged on wall time** (what the issue asks); CPU time per round is the load-insensitive
diagnostic: a CPU drift is work that grows, a wall drift with flat CPU is the load.
It also reports the files left in the state folder (``updates/``, ``models/``: bounded
with ``[retention]``), the database size, the size of the default status page, the
``/v1/health`` latencies and the load average at the end. ``--mode sample`` runs
sample-level DP (the accountant runs at every round start), ``--mode central`` central
DP (the server noises each round's sum). Exit status 0 when every target is met.

One server structure grows with the request count, not the round count, until it is
full: the replay cache keeps each signed request's nonce for ``2 x max_clock_skew_s``
(600 s by default). A fit that starts inside the fill measures part of it (about 17
bytes a request) as RSS growth, so the after-window fit starts after it; a run shorter
than the window has no after-window rounds (``not measured``), and ``--max-clock-skew
30`` (a 60 s window) fills it early.

    python benches/federation/soak.py --rounds 1000 --clients 4
    python benches/federation/soak.py --mode sample --rounds 150 --clients 4 --json
    python benches/federation/soak.py --mode central --rounds 2000 --clients 8 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from sites import enroll_tokens, headers

from confide.protocol.manifest import encode_tensors, sha256_hex
from confide.protocol.signing import Identity
from confide.training import NumpyTrainer
from confide_server.auth import operator_token
from confide_server.config import ServerConfig
from confide_server.simulate import free_port

RSS_TARGET_PCT = 5.0
DRIFT_TARGET_PCT = 10.0


def write_job(work: Path, args: argparse.Namespace, port: int) -> Path:
    trainer = NumpyTrainer.create("logistic", args.params - 1, 2, seed=0)
    trainer.manifest.save(work / "model.json")
    (work / "init.safetensors").write_bytes(encode_tensors(trainer.manifest, trainer.get_weights()))
    privacy = ""
    if args.mode == "sample":
        privacy = """
[privacy]
mode = "sample"
noise_multiplier = 1.1
sampling_rate = 0.01
local_steps = 10
"""
    elif args.mode == "central":  # the sites' deltas (norm ~0.03) are inside clip_norm
        privacy = """
[privacy]
mode = "central"
noise_multiplier = 1.1
clip_norm = 1.0
"""
    retention = "" if args.no_retention else "[retention]\nkeep_models = 10\nprune_updates = true\n"
    cfg = work / "job.toml"
    cfg.write_text(
        f"""
[job]
name = "soak"
rounds = {args.rounds}
cohort_size = {args.clients}
min_clients = {args.clients}
wait_for_clients = {args.clients}
active_window_s = 600.0
[model]
manifest = "model.json"
weights = "init.safetensors"
[deadlines]
train = 60.0
evaluate = 60.0
[server]
port = {port}
state_dir = "state"
long_poll_max_s = 30.0
max_clock_skew_s = {args.max_clock_skew}
{privacy}
{retention}
"""
    )
    return cfg


#: HTTP requests the sites have sent so far (read by the sampler thread; one writer).
REQUESTS = [0]


async def client(session: aiohttp.ClientSession, url: str, token: str, k: int, body: bytes) -> None:
    ident = Identity.generate()
    cid = f"c{k:03d}"
    digest = sha256_hex(body)
    enroll = json.dumps(
        {"token": token, "client_id": cid, "public_key": ident.public_key_b64}
    ).encode()
    h = headers(ident, cid, "POST", "/v1/enroll", 0, "enroll", sha256_hex(enroll))
    async with session.post(url + "/v1/enroll", data=enroll, headers=h) as r:
        assert r.status == 200, await r.text()
    empty = sha256_hex(b"")
    done: set[tuple[int, str]] = set()
    while True:
        h = headers(ident, cid, "GET", "/v1/task", 0, "task", empty)
        REQUESTS[0] += 1
        async with session.get(url + "/v1/task", params={"wait": "20"}, headers=h) as r:
            task = await r.json()
        if task["action"] in ("finished", "failed"):
            return
        if task["action"] == "wait":
            continue
        rnd, action = int(task["round"]), str(task["action"])
        if (rnd, action) in done:
            continue
        path = f"/v1/rounds/{rnd}/{action}"
        if action == "train":
            data, dig = body, digest
        else:
            data = json.dumps({"num_examples": 10, "metrics": {"accuracy": 0.5}}).encode()
            dig = sha256_hex(data)
        while True:
            h = headers(ident, cid, "PUT", path, rnd, action, dig)
            REQUESTS[0] += 1
            async with session.put(url + path, data=data, headers=h) as r:
                await r.read()
                status = r.status
            if status == 503:
                await asyncio.sleep(0.05)
                continue
            if status == 409:  # the stage closed under us: poll again
                break
            assert status == 200, (status, action, rnd)
            break
        done.add((rnd, action))


async def run_clients(url: str, tokens: list[str], body: bytes) -> None:
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(*(client(session, url, t, k, body) for k, t in enumerate(tokens)))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used so far.

    Fields 14 and 15 of ``/proc/<pid>/stat``, counted after the ``comm`` field (which
    may hold spaces, so split after its closing parenthesis).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def host_ticks() -> tuple[int, int]:
    """The machine's CPU steal and total CPU time so far, in clock ticks (``/proc/stat``,
    the ``cpu`` line: user nice system idle iowait irq softirq steal; guest time is already
    inside user)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    fields += [0] * (8 - len(fields))
    return fields[7], sum(fields)


def own_cpu_s() -> float:
    """CPU seconds this process (the soak's sites, its sampler) has used so far."""
    t = os.times()
    return t.user + t.system


#: The tables a long job's database holds per request or per round (reported by size).
DB_TABLES = ("submissions", "nonces", "pruned_blobs", "ledger", "rounds", "round_uploads")


def db_stats(path: Path) -> dict[str, Any]:
    """Sizes of the job's database (read-only, beside the running server).

    ``file_bytes`` / ``wal_bytes``: the database and its write-ahead log on disk;
    ``page_count`` / ``freelist_count``: pages in the file and free ones (reused before
    the file grows); ``tables``: bytes of each table with its indexes (``dbstat``) and
    ``rows`` of the tables in :data:`DB_TABLES`.
    """
    wal = path.with_name(path.name + "-wal")
    out: dict[str, Any] = {
        "file_bytes": path.stat().st_size if path.exists() else 0,
        "wal_bytes": wal.stat().st_size if wal.exists() else 0,
    }
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        out["page_count"] = int(conn.execute("PRAGMA page_count").fetchone()[0])
        out["freelist_count"] = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        tables: dict[str, int] = {}
        for _name, tbl, size in conn.execute(
            "SELECT d.name, COALESCE(m.tbl_name, d.name), SUM(d.pgsize) FROM dbstat d "
            "LEFT JOIN sqlite_schema m ON m.name = d.name GROUP BY d.name"
        ):
            tables[str(tbl)] = tables.get(str(tbl), 0) + int(size)
        out["tables"] = dict(sorted(tables.items(), key=lambda kv: -kv[1]))
        out["rows"] = {
            t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
            for t in DB_TABLES
            if t in tables
        }
    finally:
        conn.close()
    return out


class Sampler(threading.Thread):
    """Samples the server's RSS and FDs, and times /v1/health, until stopped.

    Also the database file's size at every sample, and its per-table sizes
    (:func:`db_stats`) once ``db_at`` has passed (the end of the warm-up window).
    """

    def __init__(self, pid: int, url: str, every: float, db: Path | None = None) -> None:
        super().__init__(daemon=True)
        self.pid, self.url, self.every = pid, url, every
        self.samples: list[tuple[float, float, int]] = []  # (time, RSS MiB, open FDs)
        # (time, server CPU s, this process's CPU s (the sites), 1-minute load average)
        self.cpu: list[tuple[float, float, float, float]] = []
        # (time, the sites' requests so far, machine steal ticks, machine total ticks)
        self.host: list[tuple[float, float, float, float]] = []
        self.health_ms: list[float] = []
        self.db = db
        self.db_bytes: list[tuple[float, int]] = []  # (time, database file bytes)
        self.db_at = float("inf")
        self.db_snapshot: dict[str, Any] | None = None
        self.stop = threading.Event()

    def _sample(self) -> bool:
        """One sample of RSS, FDs, CPU times and the host; False once the server is gone."""
        try:
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            now = time.time()
            self.samples.append((now, rss_mib(self.pid), fds))
            self.cpu.append((now, cpu_s(self.pid), own_cpu_s(), os.getloadavg()[0]))
            steal, total = host_ticks()
            self.host.append((now, float(REQUESTS[0]), float(steal), float(total)))
        except OSError:
            return False
        return True

    def run(self) -> None:
        while not self.stop.is_set():
            if not self._sample():
                return
            if self.db is not None:
                try:
                    self.db_bytes.append((time.time(), self.db.stat().st_size))
                    if self.db_snapshot is None and time.time() >= self.db_at:
                        self.db_snapshot = {"at": time.time(), **db_stats(self.db)}
                except (OSError, sqlite3.Error):
                    pass
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=30) as r:
                    r.read()
                self.health_ms.append((time.perf_counter() - t0) * 1000)
            except OSError:
                pass
            self.stop.wait(self.every)
        # A last sample when stopped (right after the sites finish): every commit lies
        # between two samples, however short the run was against ``every``.
        self._sample()


def get(url: str, token: str) -> tuple[dict[str, Any], int]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
    doc: dict[str, Any] = json.loads(raw)
    return doc, len(raw)


def all_rounds(url: str, token: str) -> tuple[list[dict[str, Any]], int]:
    """Every round through the paginated status (``?limit=1000&before=<next>``)."""
    _, default_page_bytes = get(url + "/v1/status", token)
    rows: list[dict[str, Any]] = []
    before: int | None = None
    while True:
        q = "?limit=1000" + ("" if before is None else f"&before={before}")
        doc, _ = get(url + "/v1/status" + q, token)
        rows = doc["rounds"] + rows
        before = doc.get("next")
        if before is None:
            return rows, default_page_bytes


def slope(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of y on x."""
    a, b = np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), 1)
    return float(a), float(b)


def line_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Fit y on x: the fitted values at the first and last x and the change between them.

    ``change_pct`` is the fitted change over the whole x range in % of the fitted start
    (NaN when the fitted start is not positive).
    """
    a, b = slope(x, y)
    first, last = a * x[0] + b, a * x[-1] + b
    change = (last - first) / first * 100 if first > 0 else float("nan")
    return {"slope": a, "first": first, "last": last, "change_pct": change}


#: Fewer measured rounds than this and a window's verdicts read "not measured".
MIN_MEASURED = 10


def fit_window(
    done: list[dict[str, Any]], samples: list[tuple[float, float, int]], first: int
) -> dict[str, Any]:
    """Fits over the committed rounds ``done[first:]`` (``done`` oldest first).

    * round time: ``ended_at - started_at`` of each round against its round number;
    * round period: the wall time from the previous commit to this one (what a site
      sees; it also holds the work between a commit and the next round's start, such as
      retention), against the round number;
    * RSS and open FDs at each round's commit (the last sample before it).
    """
    meas = done[first:]
    out: dict[str, Any] = {"first_round": None, "measured_rounds": len(meas)}
    if len(meas) < 3 or not samples:
        return out
    rounds = [float(r["round"]) for r in meas]
    dur = [float(r["ended_at"] - r["started_at"]) for r in meas]
    ends = [float(r["ended_at"]) for r in done]
    # Periods: each measured round from the commit before it (the run's first round has
    # none before it and is left out of this fit).
    p_from = max(first, 1)
    per = [ends[i] - ends[i - 1] for i in range(p_from, len(done))]
    p_rounds = [float(done[i]["round"]) for i in range(p_from, len(done))]
    times = np.asarray([s[0] for s in samples])
    at = [int(max(0, np.searchsorted(times, r["ended_at"]) - 1)) for r in meas]
    rss = [samples[i][1] for i in at]
    fds = [float(samples[i][2]) for i in at]
    rt, rs = line_fit(rounds, dur), line_fit(rounds, rss)
    pr = line_fit(p_rounds, per) if len(per) >= 2 else dict.fromkeys(("first", "last"), math.nan)
    pr.setdefault("change_pct", math.nan)
    f_slope, _ = slope(rounds, fds)
    out.update(
        first_round=int(rounds[0]),
        last_round=int(rounds[-1]),
        round_s_first=rt["first"],
        round_s_last=rt["last"],
        round_s_median=float(np.median(dur)),
        round_time_drift_pct=rt["change_pct"],
        period_s_first=pr["first"],
        period_s_last=pr["last"],
        period_s_median=float(np.median(per)),
        round_period_drift_pct=pr["change_pct"],
        rss_mib_start=rs["first"],
        rss_mib_end_fit=rs["last"],
        rss_growth_pct=rs["change_pct"],
        rss_mib_per_1000_rounds=rs["slope"] * 1000,
        fds_start=fds[0],
        fds_end=fds[-1],
        fds_per_1000_rounds=f_slope * 1000,
        # RSS at the end of each tenth of the window's rounds (the shape behind the slope).
        rss_mib_tenths=[rss[min(len(rss) - 1, (len(rss) * k) // 10)] for k in range(1, 11)],
    )
    return out


CpuSample = tuple[float, float, float, float]
#: ``(time, the sites' requests so far, machine steal ticks, machine total ticks)``
HostSample = tuple[float, float, float, float]


def _cum(cpu: list[CpuSample], col: int, at: list[float]) -> np.ndarray:
    """Column ``col`` of the CPU samples (cumulative seconds), interpolated at ``at``."""
    t = np.asarray([c[0] for c in cpu])
    return np.interp(np.asarray(at), t, np.asarray([c[col] for c in cpu]))


def cpu_fit(done: list[dict[str, Any]], cpu: list[CpuSample], first: int) -> dict[str, Any]:
    """CPU time per round over the committed rounds ``done[first:]``, fitted on the round.

    A round's CPU is what the process used from the previous commit to this one (its
    cumulative CPU, sampled every ``--sample-every`` s, interpolated at the commits): the
    CPU counterpart of the round period. ``server``: the server process, every thread;
    ``sites``: this process (the asyncio sites and the sampler). Unlike wall time, CPU
    time does not grow when other jobs take the cores, so a drift here is work that grows.
    """
    p_from = max(first, 1)
    out: dict[str, Any] = {"measured_rounds": max(0, len(done) - p_from)}
    if len(done) - p_from < 3 or len(cpu) < 2:
        return out
    ends = [float(r["ended_at"]) for r in done[p_from - 1 :]]
    rounds = [float(r["round"]) for r in done[p_from:]]
    for name, col in (("server", 1), ("sites", 2)):
        per = np.diff(_cum(cpu, col, ends)) * 1000
        fit = line_fit(rounds, [float(v) for v in per])
        out[f"{name}_cpu_ms_first"] = fit["first"]
        out[f"{name}_cpu_ms_last"] = fit["last"]
        out[f"{name}_cpu_ms_median"] = float(np.median(per))
        out[f"{name}_cpu_drift_pct"] = fit["change_pct"]
    return out


def blocks(
    done: list[dict[str, Any]],
    cpu: list[CpuSample],
    size: int,
    host: list[HostSample] | None = None,
) -> list[dict[str, Any]]:
    """Per block of ``size`` committed rounds: wall time (fastest and median round, median
    period), CPU per round (server, sites; as in :func:`cpu_fit`) and the 1-minute load
    average sampled during the block (min / median / max). With ``host`` samples also the
    sites' requests per round and the machine's CPU steal in % of its CPU time."""
    host = host or []
    out: list[dict[str, Any]] = []
    if not done or size < 1:
        return out
    ends = [float(r["ended_at"]) for r in done]
    dur = [float(r["ended_at"] - r["started_at"]) for r in done]
    t = np.asarray([c[0] for c in cpu]) if cpu else np.asarray([])
    for a in range(0, len(done), size):
        b = min(len(done), a + size)
        lo = ends[a - 1] if a else float(done[0]["started_at"])
        per = [ends[i] - ends[i - 1] for i in range(max(a, 1), b)]
        blk: dict[str, Any] = {
            "rounds": [int(done[a]["round"]), int(done[b - 1]["round"])],
            "round_s_min": min(dur[a:b]),
            "round_s_median": float(np.median(dur[a:b])),
            "period_s_median": float(np.median(per)) if per else math.nan,
        }
        if len(cpu) >= 2:
            for name, col in (("server", 1), ("sites", 2)):
                c0, c1 = _cum(cpu, col, [lo, ends[b - 1]])
                blk[f"{name}_cpu_ms_per_round"] = float(c1 - c0) * 1000 / (b - a)
            inside = [c[3] for c, ti in zip(cpu, t, strict=True) if lo < ti <= ends[b - 1]]
            if inside:
                blk["load"] = [min(inside), float(np.median(inside)), max(inside)]
        if len(host) >= 2:
            req0, req1 = _cum(host, 1, [lo, ends[b - 1]])
            blk["requests_per_round"] = float(req1 - req0) / (b - a)
            (s0, s1), (t0, t1) = _cum(host, 2, [lo, ends[b - 1]]), _cum(host, 3, [lo, ends[b - 1]])
            blk["steal_pct"] = float(100 * (s1 - s0) / (t1 - t0)) if t1 > t0 else 0.0
        out.append(blk)
    return out


def verdicts(fit: dict[str, Any]) -> dict[str, str]:
    """``met`` / ``missed`` per target, or ``not measured`` (too few rounds in the window).

    RSS growth <= 5 %, and the fitted round time and round period at the window's last
    round <= 10 % above the first (a negative drift, faster rounds, is met).
    """
    if fit["measured_rounds"] < MIN_MEASURED or fit.get("rss_growth_pct") is None:
        return dict.fromkeys(("rss", "round_time", "round_period"), "not measured")

    def one(value: float, target: float) -> str:
        return "met" if value <= target else "missed"  # NaN: missed

    return {
        "rss": one(fit["rss_growth_pct"], RSS_TARGET_PCT),
        "round_time": one(fit["round_time_drift_pct"], DRIFT_TARGET_PCT),
        "round_period": one(fit["round_period_drift_pct"], DRIFT_TARGET_PCT),
    }


def warmup_rounds(done: list[dict[str, Any]], share: float, window_full_at: float) -> int:
    """Rounds left out of the after-window fit: at least ``share`` of them, and every
    round that committed before the replay cache's window was full (``window_full_at``,
    the first signed request plus ``2 x max_clock_skew_s``: until then the cache grows
    with the request count)."""
    skip = int(len(done) * share)
    filling = next(
        (i for i, r in enumerate(done) if float(r["ended_at"]) >= window_full_at), len(done)
    )
    return max(skip, filling)


def analyse(
    rows: list[dict[str, Any]],
    samples: list[tuple[float, float, int]],
    warmup: float,
    window_full_at: float = float("-inf"),
    cpu: list[CpuSample] | None = None,
    block: int = 1000,
    host: list[HostSample] | None = None,
) -> dict[str, Any]:
    """Both fits: over the whole run, and after the warm-up window; the verdicts (on wall
    time and RSS). With ``cpu`` samples also the CPU time per round (both windows), the
    per-block table (``block`` rounds each) and the load average over the run; with
    ``host`` samples the requests per round and CPU steal (per block and over the run)."""
    done = [r for r in rows if r["status"] == "committed" and r["ended_at"] is not None]
    done.sort(key=lambda r: int(r["round"]))
    skip = warmup_rounds(done, warmup, window_full_at)
    whole, after = fit_window(done, samples, 0), fit_window(done, samples, skip)
    verdict = verdicts(after)
    cpu = cpu or []
    load = [c[3] for c in cpu]
    return {
        "cpu_whole_run": cpu_fit(done, cpu, 0),
        "cpu_after_window": cpu_fit(done, cpu, skip),
        "blocks": blocks(done, cpu, block, host),
        "steal_pct": _steal_pct(host or []),
        "block_rounds": block,
        "load_1min": (
            {"min": min(load), "median": float(np.median(load)), "max": max(load)} if load else None
        ),
        "rounds_committed": len(done),
        "warmup_rounds": skip,
        "warmup_share": warmup,
        "rss_mib_peak": max((s[1] for s in samples), default=float("nan")),
        "whole_run": whole,
        "whole_run_verdict": verdicts(whole),
        "after_window": after,
        "verdict": verdict,
        "targets_met": all(v == "met" for v in verdict.values()),
    }


def _steal_pct(host: list[HostSample]) -> float | None:
    """The machine's CPU steal over the whole run, in % of its CPU time (None: no samples)."""
    if len(host) < 2 or host[-1][3] <= host[0][3]:
        return None
    return 100 * (host[-1][2] - host[0][2]) / (host[-1][3] - host[0][3])


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--mode", choices=("plain", "sample", "central"), default="plain")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--params", type=int, default=1024, help="model size (float32 values)")
    ap.add_argument(
        "--warmup",
        type=float,
        default=0.2,
        help="share of rounds not in the after-window fit (it also waits for the replay "
        "cache's window to fill)",
    )
    ap.add_argument("--sample-every", type=float, default=0.25, help="seconds between samples")
    ap.add_argument(
        "--block", type=int, default=1000, help="rounds per block in the per-block table"
    )
    ap.add_argument("--no-retention", action="store_true", help="omit the [retention] section")
    ap.add_argument(
        "--max-clock-skew",
        type=float,
        default=ServerConfig().max_clock_skew_s,
        help="[server] max_clock_skew_s: the replay cache keeps a nonce twice this long; "
        "a small value fills it within the warm-up, so the fit shows what else grows",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    ap.add_argument("--workdir", default=None, help="keep the job folder here")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one soak; return the result document (what ``--json`` prints)."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="confide-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = write_job(work, args, port)
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [sys.executable, "-m", "confide_server", "run", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sampler = Sampler(server.pid, url, args.sample_every, work / "state" / "confide.sqlite")
    window = 2 * args.max_clock_skew
    try:
        tokens = enroll_tokens(cfg, args.clients)
        manifest = NumpyTrainer.build_manifest("logistic", args.params - 1, 2)
        delta = np.random.default_rng(0).normal(0, 1e-3, args.params).astype(np.float32)
        body = encode_tensors(manifest, delta, {"num_examples": "10"})
        deadline = time.time() + 300  # a loaded machine: imports alone can take a minute
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start; see server.log") from None
                time.sleep(0.2)
        sampler.start()
        started_at = time.time()  # the first signed request: the replay window starts
        # Retention forgets nonces and closed rounds' rows 2 x skew + 60 s after them: the
        # database's per-table sizes once that has passed twice (then flat, if bounded).
        sampler.db_at = started_at + 2 * (window + 60.0)
        t0 = time.perf_counter()
        asyncio.run(run_clients(url, tokens, body))
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join(30)
        token = operator_token(work / "state")
        rows, page_bytes = all_rounds(url, token)
        state = work / "state"
        files = {"updates": count_files(state / "updates"), "models": count_files(state / "models")}
        db_bytes = sum(p.stat().st_size for p in state.glob("confide.sqlite*") if p.is_file())
        db_end = db_stats(state / "confide.sqlite")
        verify = subprocess.run(
            [
                sys.executable,
                "-m",
                "confide_server",
                "ledger",
                "verify",
                "--ledger",
                str(state / "ledger.jsonl"),
                "--server-key",
                str(state / "release_key.pub"),
            ],
            capture_output=True,
            text=True,
        )
    finally:
        sampler.stop.set()
        server.terminate()
        server.wait(60)
        log.close()
    result = analyse(
        rows,
        sampler.samples,
        args.warmup,
        started_at + window,
        sampler.cpu,
        args.block,
        sampler.host,
    )
    health = np.asarray(sampler.health_ms or [float("nan")])
    result.update(
        mode=args.mode,
        clients=args.clients,
        rounds=args.rounds,
        params=args.params,
        retention=not args.no_retention,
        wall_s=wall,
        replay_window_s=window,
        run_outlasted_window=bool(wall > window),
        files_left=files,
        database_bytes=db_bytes,
        database_end=db_end,
        database_after_warmup=sampler.db_snapshot,
        database_file_bytes=_db_series(sampler.db_bytes, started_at),
        status_page_bytes=page_bytes,
        health_ms_p50=float(np.percentile(health, 50)),
        health_ms_p99=float(np.percentile(health, 99)),
        health_ms_max=float(health.max()),
        ledger_verify_rc=verify.returncode,
        rss_target_pct=RSS_TARGET_PCT,
        drift_target_pct=DRIFT_TARGET_PCT,
        cpus=os.cpu_count(),
        load_average=list(os.getloadavg()),
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _db_series(samples: list[tuple[float, int]], t0: float) -> list[tuple[float, int]]:
    """The database file's size at about 20 points of the run: ``(seconds, bytes)``."""
    if not samples:
        return []
    step = max(1, len(samples) // 20)
    picked = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    return [(round(t - t0, 1), n) for t, n in picked]


def _describe_db(name: str, db: dict[str, Any] | None) -> str:
    if db is None:
        return f"database {name}: not sampled (the run was shorter than 2 x (window + 60 s))"
    tables = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in list(db["tables"].items())[:6])
    return (
        f"database {name}: file {db['file_bytes'] / 1e6:.2f} MB ({db['page_count']} pages, "
        f"{db['freelist_count']} free), wal {db['wal_bytes'] / 1e6:.2f} MB; {tables}; "
        f"rows {db['rows']}"
    )


def _describe(name: str, fit: dict[str, Any], verdict: dict[str, str]) -> list[str]:
    if fit.get("rss_growth_pct") is None:
        return [f"{name}: {fit['measured_rounds']} round(s), too few to fit"]
    return [
        f"{name}: rounds {fit['first_round']}-{fit['last_round']} ({fit['measured_rounds']})",
        f"  round time {fit['round_s_first']:.3f} -> {fit['round_s_last']:.3f} s: drift "
        f"{fit['round_time_drift_pct']:+.1f} % (target <= {DRIFT_TARGET_PCT:.0f} %: "
        f"{verdict['round_time']})",
        f"  round period {fit['period_s_first']:.3f} -> {fit['period_s_last']:.3f} s: drift "
        f"{fit['round_period_drift_pct']:+.1f} % (target <= {DRIFT_TARGET_PCT:.0f} %: "
        f"{verdict['round_period']})",
        f"  RSS {fit['rss_mib_start']:.1f} -> {fit['rss_mib_end_fit']:.1f} MiB: growth "
        f"{fit['rss_growth_pct']:+.1f} % (target <= {RSS_TARGET_PCT:.0f} %: {verdict['rss']}); "
        f"{fit['rss_mib_per_1000_rounds']:+.2f} MiB per 1000 rounds",
        f"  open FDs {fit['fds_start']:.0f} -> {fit['fds_end']:.0f} "
        f"({fit['fds_per_1000_rounds']:+.1f} per 1000 rounds)",
    ]


def _describe_cpu(name: str, fit: dict[str, Any]) -> str:
    if "server_cpu_drift_pct" not in fit:
        return f"{name} CPU: {fit['measured_rounds']} round(s), too few to fit"
    return (
        f"{name} CPU per round (diagnostic, not the target): server "
        f"{fit['server_cpu_ms_first']:.1f} -> {fit['server_cpu_ms_last']:.1f} ms "
        f"({fit['server_cpu_drift_pct']:+.1f} %), sites {fit['sites_cpu_ms_first']:.1f} -> "
        f"{fit['sites_cpu_ms_last']:.1f} ms ({fit['sites_cpu_drift_pct']:+.1f} %)"
    )


def _describe_block(b: dict[str, Any]) -> str:
    load = b.get("load")
    cpu = (
        f"; CPU ms/round server {b['server_cpu_ms_per_round']:.1f} sites "
        f"{b['sites_cpu_ms_per_round']:.1f}"
        if "server_cpu_ms_per_round" in b
        else ""
    )
    host = (
        f"; requests/round {b['requests_per_round']:.1f}, steal {b['steal_pct']:.2f} %"
        if "requests_per_round" in b
        else ""
    )
    return (
        f"  rounds {b['rounds'][0]}-{b['rounds'][1]}: round s min {b['round_s_min']:.3f} "
        f"median {b['round_s_median']:.3f}, period median {b['period_s_median']:.3f}{cpu}"
        + (f"; load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}" if load else "")
        + host
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    r = run(args)
    doc = json.dumps(r, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(doc + "\n")
    if args.json:
        print(doc)
    else:
        window = r["replay_window_s"]
        inside = "full after it" if r["run_outlasted_window"] else "the run was shorter"
        lines = [
            f"mode={r['mode']} clients={r['clients']} rounds={r['rounds_committed']} "
            f"(warm-up {r['warmup_rounds']}) params={r['params']} retention={r['retention']} "
            f"wall={r['wall_s']:.0f}s cpus={r['cpus']} load={r['load_average']} "
            f"(replay-cache window {window:.0f} s: {inside})",
            *_describe("whole run", r["whole_run"], r["whole_run_verdict"]),
            *_describe("after warm-up", r["after_window"], r["verdict"]),
            _describe_cpu("whole run", r["cpu_whole_run"]),
            _describe_cpu("after warm-up", r["cpu_after_window"]),
            "load average (1 min) over the run: "
            + (
                "{min:.1f} min, {median:.1f} median, {max:.1f} max".format(**r["load_1min"])
                if r["load_1min"]
                else "not sampled"
            )
            + (
                f"; CPU steal {r['steal_pct']:.2f} % of the machine's CPU time"
                if r["steal_pct"] is not None
                else ""
            )
            + f"; per block of {r['block_rounds']} rounds (min/median/max load):",
            *(_describe_block(b) for b in r["blocks"]),
            f"targets met (after warm-up, on wall time and RSS): {r['targets_met']}; peak RSS "
            f"{r['rss_mib_peak']:.1f} MiB; files left {r['files_left']}; database "
            f"{r['database_bytes']} B; status page {r['status_page_bytes']} B; /v1/health "
            f"p50 {r['health_ms_p50']:.1f} p99 {r['health_ms_p99']:.1f} max "
            f"{r['health_ms_max']:.1f} ms; ledger verify rc={r['ledger_verify_rc']}",
            _describe_db("after warm-up", r["database_after_warmup"]),
            _describe_db("at the end", r["database_end"]),
            f"database file (s, bytes): {r['database_file_bytes']}",
        ]
        print("\n".join(lines))
    return 0 if r["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
