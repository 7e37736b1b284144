"""confide-server memory and hostile-connection bench: peak RSS under load, and a flood.

Two modes, each starting ``confide-server run`` as a subprocess (as ``load.py`` does) with
N asyncio sites in this process that enrol, long-poll and upload a signed 1 MiB update
(``Expect: 100-continue``) every training stage:

``rss``
    Prints the server's RSS before the sites connect (*base*), its peak (``VmHWM``) over
    the run, its RSS at the end, and the bound ``base + 1.5 x S x max_body`` (S =
    ``max_concurrent_uploads``, max_body = the upload limit the server derives).

``flood``
    Runs the same job twice: once alone, once while slowloris connections (one head byte a
    second), idle connections (connect, send nothing; reopened when closed) and stalled
    bodies (Content-Length 8000, 16 bytes sent) hammer the server from the same address.
    Prints the sites' upload success rate and p99 latency in both runs, and the longest time
    the server took to close a slow head, an idle connection and a stalled body.

    python benches/federation/memory.py rss --clients 1000 --upload-cap 32
    python benches/federation/memory.py flood --clients 500 --slowloris 200 --idle 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import write_job
from sites import Outcome, enroll_tokens, peak_rss_mib, site

from confide.protocol.manifest import Manifest, encode_tensors
from confide.training import NumpyTrainer
from confide_server.simulate import free_port


def rss_mib(pid: int) -> float:
    """The process's current resident set (``VmRSS``) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Flood:
    """Hostile connections, and how long the server took to close each kind."""

    port: int
    slowloris: int
    idle: int
    stalled: int
    closed_s: dict[str, list[float]] = field(default_factory=dict)
    opened: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _one(self, kind: str) -> None:
        head = b"PUT /v1/rounds/1/train HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000
        stalled = (
            b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 8000\r\n\r\n" + b'{"token": "ct_x'
        )
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                self.refused += 1
                await asyncio.sleep(0.5)
                continue
            self.opened[kind] = self.opened.get(kind, 0) + 1
            t0 = time.monotonic()
            try:
                if kind == "stalled":
                    writer.write(stalled)
                sent = 0
                while not self.stop.is_set():
                    if kind == "slowloris" and sent < len(head):
                        writer.write(head[sent : sent + 1])
                        sent += 1
                    try:
                        data = await asyncio.wait_for(reader.read(65536), 1.0)
                    except asyncio.TimeoutError:
                        continue
                    if not data:
                        break  # the server closed it
                    # a stalled body's 408: keep reading until the close
            except (ConnectionError, OSError):
                pass
            if not self.stop.is_set():
                self.closed_s.setdefault(kind, []).append(time.monotonic() - t0)
            writer.close()

    async def run(self) -> None:
        kinds = ["slowloris"] * self.slowloris + ["idle"] * self.idle
        kinds += ["stalled"] * self.stalled
        await asyncio.gather(*(self._one(k) for k in kinds))


async def run_sites(
    url: str, tokens: list[str], body: bytes, flood: Flood | None, retry_s: float
) -> Outcome:
    out = Outcome()
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    flood_task = asyncio.create_task(flood.run()) if flood is not None else None
    if flood is not None:
        await asyncio.sleep(3.0)  # the flood is in place before the sites start
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(
            *(site(session, url, t, k, body, out, retry_s) for k, t in enumerate(tokens))
        )
    if flood is not None and flood_task is not None:
        flood.stop.set()
        await flood_task
    return out


def _job(args: argparse.Namespace) -> tuple[Path, Path, str, bytes, int]:
    work = Path(tempfile.mkdtemp(prefix="confide-mem-"))
    port = free_port()
    cfg = write_job(work, args, port)
    n_params = args.update_mib * 262144
    manifest: Manifest = NumpyTrainer.build_manifest("logistic", n_params - 1, 2)
    delta = np.random.default_rng(0).normal(0, 1e-3, n_params).astype(np.float32)
    body = encode_tensors(manifest, delta, {"num_examples": "10"})
    return work, cfg, f"http://127.0.0.1:{port}", body, manifest.nbytes + 65536


def _wait_health(url: str, server: subprocess.Popen[bytes]) -> None:
    import urllib.request

    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode})")
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server never answered /v1/health")


def one_run(
    args: argparse.Namespace, flood_on: bool
) -> tuple[Outcome, dict[str, float], Flood | None]:
    work, cfg, url, body, max_body = _job(args)
    env = dict(os.environ)
    if args.mmap_threshold:
        # glibc: big blocks always from mmap (returned to the OS when freed), no dynamic raise.
        # The server fixes it at 128 KiB itself (confide_server.memory), which overrides this
        # for servers of this tree; kept to measure older trees.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    server = subprocess.Popen(
        [sys.executable, "-m", "confide_server", "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "server.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    try:
        tokens = enroll_tokens(cfg, args.clients)
        _wait_health(url, server)
        time.sleep(1.0)
        base = rss_mib(server.pid)
        flood = None
        if flood_on:
            port = int(url.rsplit(":", 1)[1])
            flood = Flood(port, args.slowloris, args.idle, args.stalled)
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:  # the server's RSS every 10 ms
            while not done.is_set():
                samples.append((time.perf_counter(), rss_mib(server.pid)))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        out = asyncio.run(run_sites(url, tokens, body, flood, args.retry_s))
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        mem = {
            "base": base,
            "ingest_peak": _ingest_peak(samples, out.windows),
            "peak": peak_rss_mib(server.pid),
            "end": rss_mib(server.pid),
            "max_body_mib": max_body / 2**20,
            "wall": wall,
        }
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return out, mem, flood


def _ingest_peak(samples: list[tuple[float, float]], windows: list[tuple[float, float]]) -> float:
    """Highest sampled RSS while some train upload was in flight (aggregation excluded)."""
    if not windows:
        return float("nan")
    spans = sorted(windows)
    merged = [list(spans[0])]
    for a, b in spans[1:]:
        if a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    inside = [r for t, r in samples if any(a <= t <= b for a, b in merged)]
    return max(inside, default=float("nan"))


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _verdict(value: float, bound: float) -> str:
    return "met" if value <= bound else "MISSED"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["rss", "flood"])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--update-mib", type=int, default=1)
    ap.add_argument("--upload-cap", type=int, default=32, help="max_concurrent_uploads (S)")
    ap.add_argument("--queue", type=int, default=1024)
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--idle", type=int, default=200)
    ap.add_argument("--stalled", type=int, default=50)
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="set the server's MALLOC_MMAP_THRESHOLD_ (bytes; 0: glibc's dynamic default)",
    )
    ap.add_argument("--retry-s", type=float, default=120.0, help="a site's retry budget")
    args = ap.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # sites + flood in one process
    print(
        f"mode={args.mode} clients={args.clients} rounds={args.rounds} "
        f"update={args.update_mib} MiB S={args.upload_cap} cpus={os.cpu_count()} "
        f"env_mmap_threshold={args.mmap_threshold or '-'} "
        f"load={os.getloadavg()[0]:.1f}"
    )
    if args.mode == "rss":
        out, mem, _ = one_run(args, flood_on=False)
        bound = mem["base"] + 1.5 * args.upload_cap * mem["max_body_mib"]
        print(
            f"uploads ok={out.ok} failed={out.failed} {out.errors} wall={mem['wall']:.1f}s "
            f"p99={_p(out.latencies_ms, 99):.0f} ms"
        )
        print(
            f"RSS base={mem['base']:.0f} MiB, peak while uploads are in flight="
            f"{mem['ingest_peak']:.0f} MiB ({_verdict(mem['ingest_peak'], bound)}), peak over "
            f"the run incl. aggregation (VmHWM)={mem['peak']:.0f} MiB "
            f"({_verdict(mem['peak'], bound)}), at the end={mem['end']:.0f} MiB; "
            f"bound=base+1.5*{args.upload_cap}*{mem['max_body_mib']:.2f}={bound:.0f} MiB"
        )
        return 0 if out.failed == 0 and mem["ingest_peak"] <= bound else 1
    quiet, qmem, _ = one_run(args, flood_on=False)
    loud, lmem, flood = one_run(args, flood_on=True)
    assert flood is not None
    rows = [("alone", quiet, qmem), ("flooded", loud, lmem)]
    for name, out, mem in rows:
        total = out.ok + out.failed
        print(
            f"{name:>8}: success {out.ok}/{total} = {100 * out.ok / max(total, 1):.2f} % "
            f"{out.errors} p50={_p(out.latencies_ms, 50):.0f} ms "
            f"p99={_p(out.latencies_ms, 99):.0f} ms wall={mem['wall']:.1f}s "
            f"peak RSS={mem['peak']:.0f} MiB"
        )
    ratio = _p(loud.latencies_ms, 99) / _p(quiet.latencies_ms, 99)
    print(f"p99 flooded / alone = {ratio:.2f} (target <= 1.20)")
    for kind in ("slowloris", "idle", "stalled"):
        closes = flood.closed_s.get(kind, [])
        print(
            f"{kind:>9}: opened {flood.opened.get(kind, 0)}, closed by the server "
            f"{len(closes)}, longest {max(closes, default=float('nan')):.1f} s, "
            f"median {_p(closes, 50):.1f} s"
        )
    print(f"flood connections refused at connect: {flood.refused}")
    total = loud.ok + loud.failed
    return 0 if loud.ok / max(total, 1) >= 0.999 else 1


if __name__ == "__main__":
    sys.exit(main())
