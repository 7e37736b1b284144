"""No client input produces an HTTP 500: a seeded fuzz that reaches the decoders.

Most requests are what a real, enrolled client would send (its own Ed25519 identity, the
open round and stage, correct signature headers) with random, truncated, mutated and
type-confused bodies, so they pass authentication and the round checks and reach the
tensor and JSON decoders; the rest mix unsigned, corrupted and forged headers and odd
routes. The fake clock advances, so stages close, rounds commit or abort and new rounds
start during the fuzz.

Every answer must be < 500 and, when it is an error, a JSON body with a code and a message.
At the end, every committed model must be exactly the FedAvg of the train bodies the server
accepted (and nothing else), every aborted round must have accepted none, and most eligible
bodies must have reached the decoder.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.protocol.manifest import decode_tensors
from confide_server.engine.rounds import Prepared, RoundEngine
from tests.server.conftest import Fed
from tests.server.util import delta_body, eval_body, signed, tiny_manifest, write_job

MANIFEST = tiny_manifest()
CLIENTS = ("alice", "bob", "carol", "dave")
ITERATIONS = 600

ODD_ROUTES = [
    ("GET", "/v1/health"),
    ("GET", "/v1/status"),
    ("GET", "/v1/manifest"),
    ("POST", "/v1/enroll"),
    ("GET", "/v1/task"),
    ("GET", "/v1/models/" + "0" * 64),
    ("PUT", "/v1/rounds/99999999999999999999/train"),
    ("PUT", "/v1/rounds/-1/train"),
    ("PUT", "/v1/rounds/1/%00"),
    ("PUT", "/v1/rounds/abc/train"),
]


def _bodies(rng: np.random.Generator) -> list[bytes]:
    good = delta_body(MANIFEST, 0.1)
    junk_json: list[Any] = [None, 1, "x", [], {}, {"token": 1}, {"num_examples": -1}]
    return [
        b"",
        good,
        delta_body(MANIFEST, -0.3, num_examples=7),
        good[: len(good) // 2],
        good[:8],
        bytes(rng.integers(0, 256, 64, dtype=np.uint8)),
        good.replace(b"F32", b"F64"),
        good.replace(b"shape", b"shapf"),
        b"\xff" * 8 + b"{}",
        eval_body(0.5),
        b'{"num_examples": 1e309, "metrics": {"accuracy": NaN}}',
        b'{"num_examples": 3, "metrics": {"accuracy": 0.25, "auc": "x"}}',
        *(json.dumps(j).encode() for j in junk_json),
    ]


def _mutate(rng: np.random.Generator, body: bytes) -> bytes:
    if not body or rng.random() < 0.3:
        return body
    b = bytearray(body)
    for _ in range(int(rng.integers(1, 4))):
        b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
    return bytes(b)


def _open_round(engine: RoundEngine) -> tuple[int, str] | None:
    for r in reversed(engine.status_dict()["rounds"]):
        if r["status"] == "open":
            return int(r["round"]), str(r["stage"])
    return None


def _model(engine: RoundEngine, sha: str) -> NDArray[np.float32]:
    path = engine.store.model_path(sha)
    assert path is not None, sha
    return decode_tensors(MANIFEST, engine.blobs.read(path))[0]


def _fedavg(base: NDArray[np.float32], bodies: dict[str, bytes]) -> NDArray[np.float32]:
    acc = np.zeros(MANIFEST.size, dtype=np.float64)
    total = 0
    for cid in sorted(bodies):  # the server's order
        delta, meta = decode_tensors(MANIFEST, bodies[cid])
        n = int(meta["num_examples"])
        acc += n * delta.astype(np.float64)
        total += n
    out: NDArray[np.float32] = (base.astype(np.float64) + acc / total).astype(np.float32)
    return out


async def test_fuzz_never_500(make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path) -> None:
    rng = np.random.default_rng(2026)  # test inputs only
    cfg = write_job(
        tmp_path,
        job__cohort_size=len(CLIENTS),
        job__wait_for_clients=len(CLIENTS),
        job__min_clients=1,
        job__rounds=1000,
    )
    fed = await make_fed(cfg)
    for cid in CLIENTS:
        await fed.enroll(cid)
    for cid in CLIENTS:
        await fed.task(cid)
    await fed.wait_for("alice", "train")
    engine = fed.engine

    reached: list[tuple[int, str, str]] = []
    real_prepare = engine.prepare

    def counting_prepare(client_id: str, round_id: int, stage: str, body: bytes) -> Prepared:
        reached.append((round_id, stage, client_id))
        return real_prepare(client_id, round_id, stage, body)

    engine.prepare = counting_prepare  # type: ignore[method-assign]

    bodies = _bodies(rng)
    accepted: dict[tuple[int, str], dict[str, bytes]] = {}
    eligible = 0
    stats = {"signed": 0, "odd": 0, "unsigned": 0, "corrupted": 0, "forged": 0}
    for i in range(ITERATIONS):
        if i % 40 == 39:
            # time passes: sometimes past the open stage's deadline (30 s)
            fed.clock.now += float(rng.choice([1.0, 10.0, 31.0]))
            await asyncio.to_thread(engine.tick)
        body = _mutate(rng, bodies[int(rng.integers(0, len(bodies)))])
        opened = _open_round(engine)
        pending = [c for c in CLIENTS if opened is None or c not in accepted.get(opened, {})]
        # mostly a client the open stage still waits for, sometimes any (duplicates, retries)
        pool = pending if pending and rng.random() < 0.9 else list(CLIENTS)
        cid = pool[int(rng.integers(0, len(pool)))]
        ident = fed.ids[cid]
        mode = rng.choice(
            ["signed", "odd", "unsigned", "corrupted", "forged"], p=[0.7, 0.1, 0.1, 0.05, 0.05]
        )
        stats[str(mode)] += 1
        round_id, stage = opened if opened is not None else (1, "train")
        if mode == "odd":
            method, path = ODD_ROUTES[int(rng.integers(0, len(ODD_ROUTES)))]
        else:
            method, path = "PUT", f"/v1/rounds/{round_id}/{stage}"
        headers = signed(ident, cid, method, path, round_id, stage, body)
        if mode == "unsigned":
            headers = {}
        elif mode == "corrupted":  # signed, then one header corrupted
            key = sorted(headers)[int(rng.integers(0, len(headers)))]
            headers[key] = ["", "0", "-1", "\u00e9", "A" * 300, "1e999"][int(rng.integers(0, 6))]
        elif mode == "forged":  # signed by alice's key for another id
            headers = signed(fed.ids["alice"], "mallory", method, path, round_id, stage, body)
        is_eligible = (
            mode == "signed"
            and opened is not None
            and cid not in accepted.get((round_id, stage), {})
            and fed.clock.now < engine.status_dict()["rounds"][-1]["deadline"]
        )
        before = len(reached)
        resp = await fed.http.request(method, path, data=body, headers=headers)
        text = await resp.text()
        assert resp.status < 500, (i, method, path, mode, resp.status, text[:300])
        if resp.status >= 400:
            doc = json.loads(text)
            assert set(doc["error"]) >= {"code", "message"}, doc
        if is_eligible:
            eligible += 1
            assert len(reached) == before + 1, (i, resp.status, text[:300])
        if method == "PUT" and resp.status == 200 and not json.loads(text)["duplicate"]:
            assert mode == "signed", (i, mode)
            accepted.setdefault((round_id, stage), {})[cid] = body
        await asyncio.to_thread(engine.tick)  # a stage everyone answered closes now

    engine.prepare = real_prepare  # type: ignore[method-assign]
    # finish the open round: past every deadline, no more submissions
    for _ in range(4):
        fed.clock.now += 31.0
        await asyncio.to_thread(engine.tick)
    status = engine.status_dict()
    assert _open_round(engine) is None or status["rounds"][-1]["stage"] == "train"

    model_sha = engine.store.get_meta("initial_model") or ""
    model = _model(engine, model_sha)
    committed = 0
    for r in status["rounds"]:
        train = accepted.get((r["round"], "train"), {})
        assert r["base_model"] == model_sha, r  # each round starts from the last commit
        if r["status"] == "committed":
            assert train, r
            expected = _fedavg(model, train)
            got = _model(engine, r["new_model"])
            np.testing.assert_array_equal(got, expected)
            assert r["metrics"]["train_clients"] == len(train)
            model, model_sha = got, r["new_model"]
            committed += 1
        elif r["status"] == "aborted":
            assert not train, r
    assert status["current_model"] == model_sha
    np.testing.assert_array_equal(_model(engine, status["current_model"]), model)
    # the fuzz did its work: rounds moved on, and the bodies reached the decoders
    assert committed >= 2, status["rounds"]
    assert eligible >= ITERATIONS // 2, (eligible, stats)
    assert len(reached) >= eligible
    decoded_stages = {stage for _, stage, _ in reached}
    assert decoded_stages == {"train", "evaluate"}, decoded_stages
