"""Load test of confide-server: many asyncio clients upload 1 MiB updates over loopback.

Runs the server as a subprocess (``confide-server run``) and, in this process, N simulated
clients that enrol, long-poll for tasks, upload a 1 MiB float32 delta (safetensors, signed)
for every training stage and a metrics JSON for every evaluation stage. Clients do not download
the model (the benchmark is about ingest). Prints per-round time, ingest MB/s, p50/p99 upload
latency and the server's peak RSS (VmHWM).

    python benches/federation/load.py --clients 1000 --rounds 3
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
import time
from pathlib import Path

import aiohttp
import numpy as np

from confide.protocol.manifest import encode_tensors
from confide.training import NumpyTrainer
from confide_server.simulate import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sites import Outcome, enroll_tokens, peak_rss_mib, site


def write_job(work: Path, args: argparse.Namespace, port: int) -> Path:
    n_params = args.update_mib * 262144
    trainer = NumpyTrainer.create("logistic", n_params - 1, 2, seed=0)
    trainer.manifest.save(work / "model.json")
    (work / "init.safetensors").write_bytes(encode_tensors(trainer.manifest, trainer.get_weights()))
    cfg = work / "job.toml"
    cfg.write_text(
        f"""
[job]
name = "load"
rounds = {args.rounds}
cohort_size = {args.clients}
min_clients = {args.clients}
wait_for_clients = {args.clients}
active_window_s = 600.0
[model]
manifest = "model.json"
weights = "init.safetensors"
[deadlines]
train = 300.0
evaluate = 120.0
[server]
port = {port}
state_dir = "state"
max_concurrent_uploads = {args.upload_cap}
max_queued_uploads = {args.queue}
long_poll_max_s = 60.0
"""
    )
    return cfg


async def run_clients(url: str, tokens: list[str], body: bytes) -> Outcome:
    out = Outcome()
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(
            *(site(session, url, t, k, body, out, retry_s=120.0) for k, t in enumerate(tokens))
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--update-mib", type=int, default=1)
    ap.add_argument("--upload-cap", type=int, default=64)
    ap.add_argument(
        "--queue", type=int, default=1024, help="uploads waiting for a slot; more get 503"
    )
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="confide-load-"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = write_job(work, args, port)
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "confide_server", "run", "--config", str(cfg)])
    try:
        tokens = enroll_tokens(cfg, args.clients)
        n_params = args.update_mib * 262144
        manifest = NumpyTrainer.build_manifest("logistic", n_params - 1, 2)
        delta = np.random.default_rng(0).normal(0, 1e-3, n_params).astype(np.float32)
        body = encode_tensors(manifest, delta, {"num_examples": "10"})
        time.sleep(1.0)
        t0 = time.perf_counter()
        out = asyncio.run(run_clients(url, tokens, body))
        latencies = out.by_round
        wall = time.perf_counter() - t0
        rss = peak_rss_mib(server.pid)
        status = json.loads(
            subprocess.run(
                [sys.executable, "-m", "confide_server", "status", "--config", str(cfg), "--json"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
    finally:
        server.terminate()
        server.wait(30)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)  # ~1 GB of updates per round at 1000 clients
    mb = len(body) / 1e6
    print(
        f"clients={args.clients} rounds={args.rounds} update={len(body) / 2**20:.2f} MiB "
        f"upload_cap={args.upload_cap} queue={args.queue} cpus={os.cpu_count()} wall={wall:.1f}s"
    )
    print(f"{'round':>5} {'round_s':>8} {'ingest_s':>8} {'MB/s':>8} {'p50_ms':>8} {'p99_ms':>8}")
    for row in status["rounds"]:
        lat = latencies.get(row["round"], [])
        if not lat:
            continue
        start = min(a for a, _ in lat)
        end = max(b for _, b in lat)
        durs = np.array([b - a for a, b in lat]) * 1000
        print(
            f"{row['round']:>5} {row['ended_at'] - row['started_at']:>8.2f} {end - start:>8.2f} "
            f"{len(lat) * mb / (end - start):>8.1f} {np.percentile(durs, 50):>8.1f} "
            f"{np.percentile(durs, 99):>8.1f}"
        )
    print(
        f"server peak RSS: {rss:.0f} MiB; job status: {status['status']}; "
        f"uploads failed: {out.failed} {out.errors}"
    )
    return 0 if status["status"] == "finished" and out.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
