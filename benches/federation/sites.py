"""The simulated site both federation benches run: enrol, long-poll, upload, retry.

``load.py`` (ingest throughput) and ``memory.py`` (peak RSS, hostile connections) drive the
same N asyncio sites against a ``confide-server run`` subprocess; this is that site.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from confide.protocol.manifest import sha256_hex
from confide.protocol.signing import Identity, signing_payload


def enroll_tokens(cfg: Path, n: int) -> list[str]:
    """``confide-server enroll -n N`` for the job at ``cfg``: N one-time enrolment tokens."""
    cmd = [sys.executable, "-m", "confide_server", "enroll", "--config", str(cfg), "-n", str(n)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()


def headers(
    ident: Identity, cid: str, method: str, path: str, rnd: int, stage: str, digest: str
) -> dict[str, str]:
    ts = int(time.time() * 1000)
    nonce = secrets.token_hex(16)
    sig = ident.sign(signing_payload(method, path, cid, rnd, stage, digest, nonce, ts))
    return {
        "X-Confide-Client": cid,
        "X-Confide-Round": str(rnd),
        "X-Confide-Stage": stage,
        "X-Confide-Content-SHA256": digest,
        "X-Confide-Nonce": nonce,
        "X-Confide-Timestamp": str(ts),
        "X-Confide-Signature": base64.b64encode(sig).decode(),
        "Content-Type": "application/octet-stream",
    }


@dataclass
class Outcome:
    """What the legitimate sites saw."""

    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)  # train uploads
    by_round: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # train

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


async def site(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    k: int,
    body: bytes,
    out: Outcome,
    retry_s: float,
) -> None:
    """One site: enrol, then every task until the job ends; failures counted, not raised."""
    ident = Identity.generate()
    cid = f"c{k:05d}"
    enroll = json.dumps(
        {"token": token, "client_id": cid, "public_key": ident.public_key_b64}
    ).encode()
    for _ in range(100):
        try:
            h = headers(ident, cid, "POST", "/v1/enroll", 0, "enroll", sha256_hex(enroll))
            h["Content-Type"] = "application/json"
            async with session.post(url + "/v1/enroll", data=enroll, headers=h) as r:
                if r.status == 200:
                    break
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    else:
        out.fail("enrol")
        return
    empty = sha256_hex(b"")
    digest = sha256_hex(body)
    while True:
        try:
            h = headers(ident, cid, "GET", "/v1/task", 0, "task", empty)
            async with session.get(url + "/v1/task", params={"wait": "50"}, headers=h) as r:
                task = await r.json() if r.status == 200 else {"action": "wait"}
        except aiohttp.ClientError:
            await asyncio.sleep(0.2)
            continue
        if task["action"] in ("finished", "failed"):
            return
        if task["action"] == "wait":
            continue
        rnd = int(task["round"])
        path = f"/v1/rounds/{rnd}/{task['action']}"
        if task["action"] == "train":
            data, dig = body, digest
        else:
            data = json.dumps({"num_examples": 10, "metrics": {"accuracy": 0.5}}).encode()
            dig = sha256_hex(data)
        t0 = time.perf_counter()
        last = "?"
        while time.perf_counter() - t0 < retry_s:
            try:
                h = headers(ident, cid, "PUT", path, rnd, task["action"], dig)
                async with session.put(url + path, data=data, headers=h, expect100=True) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError as exc:  # a reset connection: the site retries it
                last = type(exc).__name__
                await asyncio.sleep(0.05)
                continue
            if status in (429, 503):
                last = str(status)
                await asyncio.sleep(0.05)
                continue
            last = str(status)
            break
        if last == "200":
            out.ok += 1
            if task["action"] == "train":
                out.latencies_ms.append((time.perf_counter() - t0) * 1000)
                out.windows.append((t0, time.perf_counter()))
                out.by_round.setdefault(rnd, []).append(out.windows[-1])
        else:
            out.fail(last)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
