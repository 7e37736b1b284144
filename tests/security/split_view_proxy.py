"""A malicious operator in front of a real confide-server: the split view at unmask (a process).

Test-only. Every request is forwarded to the real server unchanged except, with
``--attack``, the consistency and unmask stages of a secure round: the proxy plays the
server's part there. Each cohort member receives a self-consistent roster, but not the same
one: ``G1`` (three of the victim's peers) is told the victim dropped (``R1`` = everyone but
the victim; they would release the victim's mask-key shares), ``G2`` (the victim and its other
peers) that everyone is alive (``R2``; they would release the victim's self-mask
shares). The signatures each group returns are kept here (the real server, which expects one
roster, never sees them) and each group gets an unmask request for its roster with the
signatures of its roster. With both answers the server would unmask the victim's upload alone.

Without ``--attack`` every request is forwarded as is (the control). In both modes every
unmask upload that passes is recorded, body included, before it is forwarded, so the test can
count the shares the operator actually collected. The log (``--log``) is one JSON object a
line: ``consistency_task``, ``signature``, ``unmask_task``, ``unmask_upload``.

Run::

    python -m tests.security.split_view_proxy --upstream URL --log events.jsonl \
        --victim site-1 [--attack]

Prints ``proxy listening on http://127.0.0.1:PORT`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from confide.protocol.signing import HEADER_CLIENT
from confide.secagg.messages import ConsistencyRequest, ConsistencySignature, UnmaskRequest
from tests.e2e.recording_proxy import serve

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect"}
#: How long a client's task poll is held while the other signatures come in.
_HOLD_S = 2.0


class _Session:
    """One attacked consistency stage: the rosters shown and the signatures collected."""

    def __init__(self, round_id: int, session_id: bytes, cohort: tuple[str, ...], victim: str):
        self.round = round_id
        self.session_id = session_id
        self.cohort = cohort
        others = [c for c in cohort if c != victim]
        g1 = tuple(others[:3])
        self.roster = {c: tuple(c2 for c2 in cohort if c2 != victim) for c in g1}
        self.roster.update({c: cohort for c in cohort if c not in g1})
        self.signatures: dict[tuple[str, ...], dict[str, bytes]] = {}
        self.signed: set[str] = set()
        self.delivered: set[str] = set()
        self.ready = asyncio.Event()
        self.task: dict[str, Any] = {}

    def unmask_task(self, cid: str) -> dict[str, Any]:
        alive = self.roster[cid]
        everyone = self.cohort
        req = UnmaskRequest(
            round=self.round,
            session_id=self.session_id,
            alive=alive,
            dead=tuple(c for c in everyone if c not in alive),
            signatures=tuple(sorted(self.signatures.get(alive, {}).items())),
        )
        return {
            "action": "unmask",
            "round": self.round,
            "stage": "unmask",
            "deadline": time.time() + 60.0,
            "seed": self.task.get("seed", 0),
            "request": req.to_json(),
        }


def make_app(upstream: str, log_path: Path, victim: str, attack: bool) -> web.Application:
    box: dict[str, Any] = {"sessions": {}, "current": None}

    def log(event: str, **fields: Any) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")
            f.flush()

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        box["http"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await box["http"].close()

    async def upstream_call(request: web.Request, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with box["http"].request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as up:
            data = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            return up.status, data, out

    def receipt(cid: str, stage: str) -> web.Response:
        return web.json_response(
            {"receipt": {"client_id": cid, "stage": stage, "proxy": True}, "duplicate": False}
        )

    async def task(request: web.Request, body: bytes) -> web.StreamResponse | None:
        cid = request.headers.get(HEADER_CLIENT, "")
        sess: _Session | None = box["current"]
        if sess is not None and cid in sess.signed and cid not in sess.delivered:
            try:
                await asyncio.wait_for(sess.ready.wait(), _HOLD_S)
            except asyncio.TimeoutError:
                return web.json_response({"action": "wait", "retry_after": 0.2})
            sess.delivered.add(cid)
            doc = sess.unmask_task(cid)
            log("unmask_task", client=cid, alive=list(doc["request"]["alive"]), round=sess.round)
            return web.json_response(doc)
        status, data, headers = await upstream_call(request, body)
        if status != 200:
            return web.Response(status=status, body=data, headers=headers)
        doc = json.loads(data)
        if doc.get("action") != "consistency":
            return web.Response(status=status, body=data, headers=headers)
        req = ConsistencyRequest.from_json(doc["request"])
        if attack:
            key = (req.round, req.session_id)
            if key not in box["sessions"]:
                box["sessions"][key] = _Session(req.round, req.session_id, req.survivors, victim)
            sess = box["sessions"][key]
            box["current"] = sess
            sess.task = doc
            shown = ConsistencyRequest(
                round=req.round, session_id=req.session_id, survivors=sess.roster[cid]
            )
            doc = {**doc, "request": shown.to_json()}
        log(
            "consistency_task",
            client=cid,
            round=req.round,
            survivors=list(doc["request"]["survivors"]),
        )
        return web.json_response(doc)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parts = request.path.strip("/").split("/")
        cid = request.headers.get(HEADER_CLIENT, "")
        if request.method == "GET" and request.path == "/v1/task":
            answer = await task(request, body)
            if answer is not None:
                return answer
        if request.method == "PUT" and len(parts) == 4 and parts[:2] == ["v1", "rounds"]:
            stage = parts[3]
            if stage == "unmask":
                log("unmask_upload", client=cid, body=json.loads(body))
                if attack:
                    return receipt(cid, stage)
            sess = box["current"]
            if stage == "consistency" and attack and sess is not None:
                sig = ConsistencySignature.from_json(json.loads(body))
                roster = sess.roster[cid]
                sess.signatures.setdefault(roster, {})[cid] = sig.signature
                sess.signed.add(cid)
                log("signature", client=cid, roster=list(roster), round=sess.round)
                if sess.signed >= set(sess.roster):
                    sess.ready.set()
                return receipt(cid, stage)
        status, data, headers = await upstream_call(request, body)
        return web.Response(status=status, body=data, headers=headers)

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", forward)
    app.cleanup_ctx.append(lifecycle)
    return app


async def _main(args: argparse.Namespace) -> None:
    app = make_app(args.upstream.rstrip("/"), args.log, args.victim, args.attack)
    await serve(app, args.port)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--victim", required=True)
    p.add_argument("--attack", action="store_true")
    p.add_argument("--port", type=int, default=0)
    asyncio.run(_main(p.parse_args()))
