"""Hostile bodies, signed and correctly routed, never make a 500 (issue 12 item 8).

:func:`test_5000_hostile_signed_requests` sends 5,000 requests over real HTTP, each signed by
an enrolled client for the open round and stage, with bodies built to break decoders: JSON
nested 4k-50k deep, integers of hundreds to thousands of digits, lone surrogates, NaN and
overflowing numbers, duplicate keys and tensor names, truncated and bit-flipped safetensors,
type-confused fields. Every answer must be < 500 with a JSON error body, and the job must keep
committing the rounds the honest uploads make.

:func:`test_every_secure_stage_message_refuses_hostile_bodies` does the same for every
SecAgg+ stage message (advertise, share, mask, consistency, unmask): hostile variants of the
real messages are fed to the engine before the real one, and only typed federation errors
(which the error table maps to 4xx) may come out; the round still commits.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from confide.errors import FederationError
from confide.protocol.manifest import encode_tensors, read_safetensors_header
from confide_server.engine.secure import SECURE_STAGES
from confide_server.middlewares import status_for
from tests.server.conftest import Fed
from tests.server.test_secagg_rounds import IDS
from tests.server.test_secagg_rounds import Fed as SecureFed
from tests.server.test_secagg_rounds import _config as secure_config
from tests.server.util import delta_body, eval_body, signed, tiny_manifest, write_job

MANIFEST = tiny_manifest()
CLIENTS = ("alice", "bob", "carol")
REQUESTS = 5_000

_HOSTILE_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**70,
    10**300,
    1e308,
    -1e308,
    "",
    "x" * 5000,
    "\u0661",
    [],
    {},
    [[[]]],
    {"a": {"b": {}}},
]
_RAW_VALUES = [
    b"9" * 400,
    b"9" * 5000,
    b"-" + b"1" * 4301,
    b"1e309",
    b"NaN",
    b"-Infinity",
    b'"\\ud800"',
    b'"\\udfff\\ud800"',
    b"[" * 4000 + b"]" * 4000,
]


def _hostile_json(rng: np.random.Generator, template: Any) -> bytes:
    """A hostile variant of a JSON document ``template``."""
    kind = int(rng.integers(0, 7))
    if kind == 0:  # deep nesting
        n = int(rng.choice([33, 1000, 4000, 20_000]))
        return b"[" * n + b"]" * n if rng.random() < 0.5 else b'{"a":' * n + b"1" + b"}" * n
    text = json.dumps(template)
    if kind == 1 and isinstance(template, dict) and template:  # a raw hostile literal
        key = sorted(template)[int(rng.integers(0, len(template)))]
        raw = _RAW_VALUES[int(rng.integers(0, len(_RAW_VALUES)))]
        rest = {k: v for k, v in template.items() if k != key}
        sep = ", " if rest else ""
        return (json.dumps(rest)[:-1] + sep + json.dumps(key) + ": ").encode() + raw + b"}"
    if kind == 2 and isinstance(template, dict) and template:  # duplicate key
        key = sorted(template)[int(rng.integers(0, len(template)))]
        return text[:-1].encode() + b", " + json.dumps({key: template[key]})[1:].encode()
    if kind == 3:  # type confusion at the top or at one key
        value = _HOSTILE_VALUES[int(rng.integers(0, len(_HOSTILE_VALUES)))]
        if isinstance(template, dict) and template and rng.random() < 0.8:
            doc = dict(template)
            doc[sorted(doc)[int(rng.integers(0, len(doc)))]] = value
            return json.dumps(doc).encode()
        return json.dumps(value).encode()
    if kind == 4:  # truncation / byte flips
        b = bytearray(text.encode())
        if b and rng.random() < 0.5:
            return bytes(b[: int(rng.integers(0, len(b)))])
        for _ in range(int(rng.integers(1, 4))):
            if b:
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        return bytes(b)
    if kind == 5:  # a key dropped or added
        if isinstance(template, dict) and template:
            doc = dict(template)
            if rng.random() < 0.5:
                del doc[sorted(doc)[int(rng.integers(0, len(doc)))]]
            else:
                doc["\u00e9xtra"] = _HOSTILE_VALUES[int(rng.integers(0, len(_HOSTILE_VALUES)))]
            return json.dumps(doc).encode()
        return text.encode()
    return bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8))


def _hostile_tensors(rng: np.random.Generator) -> bytes:
    good = delta_body(MANIFEST, 0.01, num_examples=int(rng.integers(1, 50)))
    header, _, start = read_safetensors_header(good)
    raw_header = good[8:start].rstrip()
    data = good[start:]
    kind = int(rng.integers(0, 6))
    if kind == 0:
        new_header = _hostile_json(rng, json.loads(raw_header))
    elif kind == 1:  # a duplicate tensor name
        name = sorted(header)[0]
        entry = json.dumps(header[name], separators=(",", ":")).encode()
        new_header = raw_header[:-1] + b',"' + name.encode() + b'":' + entry + b"}"
    elif kind == 2:  # hostile metadata
        value = rng.choice(["1e9", "1" * 500, "nan", "-3", "\u0663", "1e309", "inf"])
        doc = json.loads(raw_header)
        doc["__metadata__"] = {"num_examples": str(value), "train_loss": str(value)}
        new_header = json.dumps(doc).encode()
    elif kind == 3:  # a header length that lies
        n = int(rng.choice([0, 1, 2**31, 2**63, len(raw_header) + 100]))
        return struct.pack("<Q", n) + raw_header + data
    elif kind == 4:  # huge finite values (policy: bounded by max_weight and the norm bound)
        vec = np.full(MANIFEST.size, 3e38, dtype=np.float32)
        return encode_tensors(MANIFEST, vec, {"num_examples": str(10**9)})
    else:  # bit flips in the header
        b = bytearray(raw_header)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        new_header = bytes(b)
    return struct.pack("<Q", len(new_header)) + new_header + data


def _open_stage(fed: Fed) -> tuple[int, str] | None:
    for r in reversed(fed.engine.status_dict()["rounds"]):
        if r["status"] == "open":
            return int(r["round"]), str(r["stage"])
    return None


async def test_5000_hostile_signed_requests(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    rng = np.random.default_rng(12)  # test inputs only
    cfg = write_job(
        tmp_path,
        job__cohort_size=len(CLIENTS),
        job__wait_for_clients=len(CLIENTS),
        job__min_clients=1,
        job__rounds=10_000,
        job__max_update_norm=100.0,
    )
    fed = await make_fed(cfg)
    for cid in CLIENTS:
        await fed.enroll(cid)
        await fed.task(cid)
    await fed.wait_for("alice", "train")
    eval_template = {"num_examples": 3, "metrics": {"accuracy": 0.5, "loss": 1.0}}
    statuses: dict[int, int] = {}
    accepted = 0
    for i in range(REQUESTS):
        opened = _open_stage(fed)
        if opened is None:
            fed.clock.now += 1.0
            await asyncio.to_thread(fed.engine.tick)
            opened = _open_stage(fed) or (1, "train")
        round_id, stage = opened
        cid = CLIENTS[i % len(CLIENTS)]
        honest = rng.random() < 0.05
        if stage == "train":
            body = delta_body(MANIFEST, 0.01) if honest else _hostile_tensors(rng)
        else:
            body = eval_body(0.5) if honest else _hostile_json(rng, eval_template)
        path = f"/v1/rounds/{round_id}/{stage}"
        headers = signed(fed.ids[cid], cid, "PUT", path, round_id, stage, body)
        resp = await fed.http.put(path, data=body, headers=headers)
        text = await resp.text()
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        assert resp.status < 500, (i, stage, body[:200], text[:300])
        if resp.status >= 400:
            assert set(json.loads(text)["error"]) >= {"code", "message"}
        else:
            accepted += 1
        if i % 50 == 49:  # time passes; stages close, rounds commit or abort
            fed.clock.now += 31.0
            await asyncio.to_thread(fed.engine.tick)
            for c in CLIENTS:
                fed.engine.touch(c)
            await asyncio.to_thread(fed.engine.tick)
    status = fed.engine.status_dict()
    assert status["status"] == "running", status["reason"]
    committed = [r for r in status["rounds"] if r["status"] == "committed"]
    assert len(committed) >= 5, statuses
    assert accepted >= 50, statuses
    json.dumps(status, allow_nan=False)  # the status stays valid JSON
    resp = await fed.http.get("/v1/health")
    assert resp.status == 200


def _variants(rng: np.random.Generator, msg: dict[str, Any], n: int) -> list[bytes]:
    return [_hostile_json(rng, msg) for _ in range(n)]


def test_every_secure_stage_message_refuses_hostile_bodies(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)  # test inputs only
    fed = SecureFed(tmp_path, secure_config(tmp_path, secagg__consistency_check=True))
    assert fed.eng.tick()
    seen: set[str] = set()
    statuses: set[int] = set()
    refused = 0
    while True:
        stage = fed.stage()
        if stage not in SECURE_STAGES:
            break
        seen.add(stage)
        for c in IDS:
            task = fed.eng.task_for(c).to_json()
            assert task["action"] == stage
            if stage == "advertise":
                msg = fed.parts[c].advertise(task)
            else:
                msg = fed.parts[c].answer(task, fed.updates[c], fed.weights[c])
            for k, body in enumerate(_variants(rng, msg, 60)):
                if body == json.dumps(msg).encode():
                    continue
                try:
                    prepared = fed.eng.prepare(c, 1, stage, body)
                    fed.eng.commit_submission(prepared, nonce=f"h-{c}-{stage}-{k}")
                except FederationError as exc:
                    statuses.add(status_for(exc))
                    refused += 1
                    continue
                raise AssertionError(f"hostile {stage} message accepted: {body[:200]!r}")
            fed.submit(c, stage, msg)
        assert fed.eng.tick()
    assert seen == {"advertise", "share", "mask", "consistency", "unmask"}
    fed.finish_evaluate()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed", row.reason
    assert refused >= 5 * 3 * 50
    assert max(statuses) < 500, statuses
