"""Soak test of confide-server: many small rounds; does the server stay flat?

Runs the server as a subprocess (``confide-server run``) and, in this process, N asyncio
clients that enrol, long-poll for tasks, upload a tiny float32 delta (signed safetensors)
for every training stage and a metrics JSON for every evaluation stage, as fast as the
server takes them. While it runs, a thread samples the server's RSS (``/proc/<pid>/status``
``VmRSS``) and open file descriptors (``/proc/<pid>/fd``) and times ``GET /v1/health``
(what a stalled event loop shows). At the end it reads the round history through the
paginated ``GET /v1/status`` and fits least-squares lines, after a warm-up, to

* RSS against the round count: the growth it predicts over the measured rounds, in % of
  the RSS at the end of the warm-up (target <= 5 %);
* round duration (``ended_at - started_at``) against the round: the drift it predicts
  from the first to the last measured round, in % (target <= 10 %);
* open FDs against the round: FDs gained per 1,000 rounds (reported).

It also reports the files left in the state folder (``updates/``, ``models/``: bounded
with ``[retention]``), the size of the default status page and the ``/v1/health``
latencies. ``--mode sample`` runs sample-level DP (the accountant runs at every round
start). Exit status 0 when both targets are met.

One server structure grows with the request count, not the round count, until it is
full: the replay cache keeps each signed request's nonce for ``2 x max_clock_skew_s``
(600 s by default). A run shorter than that measures part of the cache's fill (about
17 bytes a request) as RSS growth; the output says whether the run was longer than the
window, and ``--max-clock-skew 30`` (a 60 s window) fills it within the warm-up.

    python benches/federation/soak.py --rounds 1000 --clients 4
    python benches/federation/soak.py --mode sample --rounds 150 --clients 4 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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


class Sampler(threading.Thread):
    """Samples the server's RSS and FDs, and times /v1/health, until stopped."""

    def __init__(self, pid: int, url: str, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.url, self.every = pid, url, every
        self.samples: list[tuple[float, float, int]] = []  # (time, RSS MiB, open FDs)
        self.health_ms: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
                self.samples.append((time.time(), rss_mib(self.pid), fds))
            except OSError:
                return
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=30) as r:
                    r.read()
                self.health_ms.append((time.perf_counter() - t0) * 1000)
            except OSError:
                pass
            self.stop.wait(self.every)


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


def analyse(
    rows: list[dict[str, Any]], samples: list[tuple[float, float, int]], warmup: float
) -> dict[str, Any]:
    done = [r for r in rows if r["status"] == "committed" and r["ended_at"] is not None]
    skip = int(len(done) * warmup)
    meas = done[skip:]
    if len(meas) < 10 or not samples:
        raise SystemExit(f"too few measured rounds ({len(meas)}) to fit a slope")
    rounds = [float(r["round"]) for r in meas]
    dur = [float(r["ended_at"] - r["started_at"]) for r in meas]
    d_slope, d_icpt = slope(rounds, dur)
    d_start = d_slope * rounds[0] + d_icpt
    d_end = d_slope * rounds[-1] + d_icpt
    drift = (d_end - d_start) / d_start * 100 if d_start > 0 else float("nan")
    # RSS and FDs at each measured round's end (the last sample before it).
    times = np.asarray([s[0] for s in samples])
    at = [int(max(0, np.searchsorted(times, r["ended_at"]) - 1)) for r in meas]
    rss = [samples[i][1] for i in at]
    fds = [float(samples[i][2]) for i in at]
    r_slope, r_icpt = slope(rounds, rss)
    r_start = r_slope * rounds[0] + r_icpt
    growth = r_slope * (rounds[-1] - rounds[0]) / r_start * 100
    f_slope, _ = slope(rounds, fds)
    return {
        "rounds_committed": len(done),
        "warmup_rounds": skip,
        "measured_rounds": len(meas),
        "round_s_first": d_start,
        "round_s_last": d_end,
        "round_s_median": float(np.median(dur)),
        "round_time_drift_pct": drift,
        "rss_mib_start": r_start,
        "rss_mib_end_fit": r_start + r_slope * (rounds[-1] - rounds[0]),
        "rss_mib_peak": max(s[1] for s in samples),
        "rss_growth_pct": growth,
        "rss_mib_per_1000_rounds": r_slope * 1000,
        "fds_start": fds[0],
        "fds_end": fds[-1],
        "fds_per_1000_rounds": f_slope * 1000,
        # RSS at the end of each tenth of the measured rounds (the shape behind the slope).
        "rss_mib_tenths": [rss[min(len(rss) - 1, (len(rss) * k) // 10)] for k in range(1, 11)],
    }


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("plain", "sample"), default="plain")
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--params", type=int, default=1024, help="model size (float32 values)")
    ap.add_argument("--warmup", type=float, default=0.2, help="share of rounds not fitted")
    ap.add_argument("--sample-every", type=float, default=0.25, help="seconds between samples")
    ap.add_argument("--no-retention", action="store_true", help="omit the [retention] section")
    ap.add_argument(
        "--max-clock-skew",
        type=float,
        default=ServerConfig().max_clock_skew_s,
        help="[server] max_clock_skew_s: the replay cache keeps a nonce twice this long; "
        "a small value fills it within the warm-up, so the fit shows what else grows",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--workdir", default=None, help="keep the job folder here")
    args = ap.parse_args()
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
    sampler = Sampler(server.pid, url, args.sample_every)
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
        t0 = time.perf_counter()
        asyncio.run(run_clients(url, tokens, body))
        wall = time.perf_counter() - t0
        token = operator_token(work / "state")
        rows, page_bytes = all_rounds(url, token)
        sampler.stop.set()
        sampler.join(10)
        state = work / "state"
        files = {"updates": count_files(state / "updates"), "models": count_files(state / "models")}
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
    result = analyse(rows, sampler.samples, args.warmup)
    health = np.asarray(sampler.health_ms or [float("nan")])
    result.update(
        mode=args.mode,
        clients=args.clients,
        rounds=args.rounds,
        params=args.params,
        retention=not args.no_retention,
        wall_s=wall,
        replay_window_s=2 * args.max_clock_skew,
        files_left=files,
        status_page_bytes=page_bytes,
        health_ms_p50=float(np.percentile(health, 50)),
        health_ms_p99=float(np.percentile(health, 99)),
        health_ms_max=float(health.max()),
        ledger_verify_rc=verify.returncode,
        rss_target_pct=RSS_TARGET_PCT,
        drift_target_pct=DRIFT_TARGET_PCT,
        rss_met=bool(result["rss_growth_pct"] <= RSS_TARGET_PCT),
        drift_met=bool(result["round_time_drift_pct"] <= DRIFT_TARGET_PCT),
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        r = result
        window = r["replay_window_s"]
        inside = "the run was shorter" if r["wall_s"] <= window else "full after it"
        print(
            f"mode={r['mode']} clients={r['clients']} rounds={r['rounds_committed']} "
            f"(warm-up {r['warmup_rounds']}) params={r['params']} retention={r['retention']} "
            f"wall={r['wall_s']:.0f}s cpus={os.cpu_count()} (replay-cache window "
            f"{window:.0f} s: {inside})"
        )
        print(
            f"round time {r['round_s_first']:.3f} -> {r['round_s_last']:.3f} s: drift "
            f"{r['round_time_drift_pct']:+.1f} % (target <= {DRIFT_TARGET_PCT:.0f} %: "
            f"{'met' if r['drift_met'] else 'MISSED'})"
        )
        print(
            f"RSS {r['rss_mib_start']:.1f} -> {r['rss_mib_end_fit']:.1f} MiB: growth "
            f"{r['rss_growth_pct']:+.1f} % (target <= {RSS_TARGET_PCT:.0f} %: "
            f"{'met' if r['rss_met'] else 'MISSED'}); peak {r['rss_mib_peak']:.1f} MiB"
        )
        print(
            f"open FDs {r['fds_start']:.0f} -> {r['fds_end']:.0f} "
            f"({r['fds_per_1000_rounds']:+.1f} per 1000 rounds); files left {r['files_left']}; "
            f"status page {r['status_page_bytes']} B; /v1/health p50 {r['health_ms_p50']:.1f} "
            f"p99 {r['health_ms_p99']:.1f} max {r['health_ms_max']:.1f} ms; ledger verify "
            f"rc={r['ledger_verify_rc']}"
        )
    return 0 if result["rss_met"] and result["drift_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
