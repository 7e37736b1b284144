"""The HTTP API over real loopback sockets: rounds, identity, replay and bad-input handling."""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from confide.protocol.manifest import decode_tensors, encode_tensors
from confide.protocol.signing import Identity
from tests.server.conftest import Fed
from tests.server.util import delta_body, eval_body, signed, tiny_manifest

MANIFEST = tiny_manifest()


def _error(doc: dict[str, Any]) -> str:
    assert set(doc["error"]) == {"code", "message"}
    return str(doc["error"]["code"])


async def test_round_trip_fedavg_and_evaluation(fed: Fed) -> None:
    task = await fed.task("alice")
    assert task["action"] == "train"
    assert task["round"] == 1
    base_sha = task["model_sha256"]
    headers = signed(fed.ids["alice"], "alice", "GET", f"/v1/models/{base_sha}", 0, "model", b"")
    resp = await fed.http.get(f"/v1/models/{base_sha}", headers=headers)
    assert resp.status == 200
    base, _ = decode_tensors(MANIFEST, await resp.read())

    status, doc = await fed.put("alice", 1, "train", delta_body(MANIFEST, 1.0, num_examples=30))
    assert status == 200, doc
    assert doc["receipt"]["client_id"] == "alice"
    assert doc["duplicate"] is False
    status, doc = await fed.put("bob", 1, "train", delta_body(MANIFEST, -1.0, num_examples=10))
    assert status == 200, doc

    task = await fed.wait_for("alice", "evaluate")
    new_sha = task["model_sha256"]
    assert new_sha != base_sha
    row = fed.engine.store.get_round(1)
    assert row is not None
    assert row.stage == "evaluate"
    path = fed.engine.store.model_path(new_sha)
    assert path is not None
    new, _ = decode_tensors(MANIFEST, fed.engine.blobs.read(path))
    # Weighted FedAvg of the deltas: (30 * 1 + 10 * -1) / 40 = 0.5.
    np.testing.assert_allclose(new, base + 0.5, rtol=0, atol=1e-6)

    assert (await fed.put("alice", 1, "evaluate", eval_body(0.9, 30)))[0] == 200
    assert (await fed.put("bob", 1, "evaluate", eval_body(0.5, 10)))[0] == 200
    await fed.wait_for("alice", "train")  # round 2 opened
    resp = await fed.http.get("/v1/status", headers=fed.operator())
    status_doc = await resp.json()
    r1 = status_doc["rounds"][0]
    assert r1["status"] == "committed"
    assert r1["metrics"]["eval_accuracy"] == pytest.approx(0.8)
    assert r1["metrics"]["train_clients"] == 2
    assert status_doc["current_model"] == new_sha


async def test_identical_retry_gets_same_receipt(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.25)
    s1, d1 = await fed.put("alice", 1, "train", body)
    s2, d2 = await fed.put("alice", 1, "train", body)  # re-signed: new nonce, same body
    assert (s1, s2) == (200, 200)
    assert d1["receipt"] == d2["receipt"]
    assert d2["duplicate"] is True
    assert fed.engine.store.count_submissions() == 1


async def test_different_second_upload_is_rejected(fed: Fed) -> None:
    assert (await fed.put("alice", 1, "train", delta_body(MANIFEST, 0.25)))[0] == 200
    status, doc = await fed.put("alice", 1, "train", delta_body(MANIFEST, 0.5))
    assert status == 409
    assert _error(doc) == "duplicate"
    assert fed.engine.store.count_submissions() == 1


async def test_replayed_request_is_rejected(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.25)
    path = "/v1/rounds/1/train"
    headers = signed(fed.ids["alice"], "alice", "PUT", path, 1, "train", body)
    assert (await fed.put("alice", 1, "train", body, headers))[0] == 200
    status, doc = await fed.put("alice", 1, "train", body, headers)
    assert status == 409
    assert _error(doc) == "replay"
    assert fed.engine.store.count_submissions() == 1


async def test_stale_timestamp_is_rejected(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.25)
    ident = fed.ids["alice"]
    headers = ident.sign_request(
        "alice", "PUT", "/v1/rounds/1/train", 1, "train", body, timestamp_ms=1_000
    )
    status, doc = await fed.put("alice", 1, "train", body, headers)
    assert status == 401
    assert _error(doc) == "stale_request"
    assert fed.engine.store.count_submissions() == 0


async def test_impersonation_is_rejected(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.25)
    # bob signs with his own key but claims to be alice
    headers = signed(fed.ids["bob"], "alice", "PUT", "/v1/rounds/1/train", 1, "train", body)
    status, doc = await fed.put("alice", 1, "train", body, headers)
    assert status == 401
    assert _error(doc) == "bad_signature"
    assert fed.engine.store.count_submissions() == 0


async def test_unenrolled_client_is_rejected(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.25)
    headers = signed(Identity.generate(), "mallory", "PUT", "/v1/rounds/1/train", 1, "train", body)
    status, doc = await fed.put("mallory", 1, "train", body, headers)
    assert status == 401
    assert _error(doc) == "unknown_client"
    resp = await fed.http.get("/v1/task")  # no signature at all
    assert resp.status == 401
    assert _error(await resp.json()) == "unauthenticated"
    assert fed.engine.store.count_submissions() == 0


async def test_tampered_body_is_rejected(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.25)
    headers = signed(fed.ids["alice"], "alice", "PUT", "/v1/rounds/1/train", 1, "train", body)
    status, doc = await fed.put("alice", 1, "train", delta_body(MANIFEST, 9.0), headers)
    assert status == 401
    assert _error(doc) == "bad_signature"
    assert fed.engine.store.count_submissions() == 0


async def test_oversize_upload_is_413(fed: Fed) -> None:
    body = b"\0" * (MANIFEST.nbytes + 65536 + 1)
    status, doc = await fed.put("alice", 1, "train", body)
    assert status == 413
    assert _error(doc) == "payload_too_large"
    assert fed.engine.store.count_submissions() == 0


def _raw_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _malformed() -> dict[str, bytes]:
    good = delta_body(MANIFEST, 0.1)
    w = np.zeros((4, 1), np.float32)
    b = np.zeros(1, np.float32)
    meta = {"num_examples": "10"}
    return {
        "wrong_shape": safetensors.numpy.save(
            {"layer0.weight": np.zeros((5, 1), np.float32), "layer0.bias": b}, meta
        ),
        "wrong_dtype": safetensors.numpy.save(
            {"layer0.weight": w.astype(np.float64), "layer0.bias": b}, meta
        ),
        "wrong_names": safetensors.numpy.save({"weight": w, "layer0.bias": b}, meta),
        "missing_tensor": safetensors.numpy.save({"layer0.weight": w}, meta),
        "nan": encode_tensors(MANIFEST, np.array([0, np.nan, 0, 0, 0], np.float32), meta),
        "inf": encode_tensors(MANIFEST, np.array([0, 0, 0, 0, np.inf], np.float32), meta),
        "truncated": good[:-3],
        "header_overflow": struct.pack("<Q", 2**40) + good[8:],
        "garbage": b"not a safetensors file at all",
        "empty_header": _raw_safetensors({}, b""),
        "bad_offsets": _raw_safetensors(
            {"layer0.weight": {"dtype": "F32", "shape": [4, 1], "data_offsets": [0, 999]}},
            b"\0" * 20,
        ),
        "no_num_examples": encode_tensors(MANIFEST, np.zeros(5, np.float32)),
        "bad_num_examples": encode_tensors(
            MANIFEST, np.zeros(5, np.float32), {"num_examples": "-3"}
        ),
        "pickle": b"\x80\x04\x95" + b"\0" * 40,
    }


@pytest.mark.parametrize("kind", sorted(_malformed()))
async def test_malformed_uploads_are_422(fed: Fed, kind: str) -> None:
    status, doc = await fed.put("alice", 1, "train", _malformed()[kind])
    assert status == 422, doc
    assert _error(doc) in {"manifest_mismatch", "malformed_body", "non_finite", "invalid_payload"}
    assert fed.engine.store.count_submissions() == 0
    # the client can still submit a good update afterwards
    assert (await fed.put("alice", 1, "train", delta_body(MANIFEST, 0.1)))[0] == 200


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"num_examples": 1}',
        b'{"num_examples": 0, "metrics": {}}',
        b'{"num_examples": 5, "metrics": {"accuracy": "NaN"}}',
        b'{"num_examples": 5, "metrics": {"accuracy": true}}',
    ],
)
async def test_malformed_metrics_are_422(fed: Fed, body: bytes) -> None:
    await fed.put("alice", 1, "train", delta_body(MANIFEST, 0.1))
    await fed.put("bob", 1, "train", delta_body(MANIFEST, 0.1))
    await fed.wait_for("alice", "evaluate")
    status, doc = await fed.put("alice", 1, "evaluate", body)
    assert status == 422, doc
    assert len(fed.engine.store.submissions(1, "evaluate")) == 0


async def test_wrong_round_and_stage_are_409(fed: Fed) -> None:
    status, doc = await fed.put("alice", 7, "train", delta_body(MANIFEST, 0.1))
    assert status == 409
    assert _error(doc) == "wrong_round"
    status, doc = await fed.put("alice", 1, "evaluate", eval_body(0.5))
    assert status == 409
    assert _error(doc) == "wrong_stage"
    status, doc = await fed.put("alice", 1, "bogus", b"x")
    assert status == 409
    assert _error(doc) == "wrong_stage"
    assert fed.engine.store.count_submissions() == 0


async def test_late_submission_is_rejected_and_not_aggregated(fed: Fed) -> None:
    assert (await fed.put("alice", 1, "train", delta_body(MANIFEST, 1.0)))[0] == 200
    fed.clock.now += 31.0  # past the train deadline
    status, doc = await fed.put("bob", 1, "train", delta_body(MANIFEST, 5.0))
    assert status == 409
    assert _error(doc) == "stage_closed"
    fed.wake()
    await fed.wait_for("alice", "evaluate")
    subs = fed.engine.store.submissions(1, "train")
    assert [s.client_id for s in subs] == ["alice"]
    # after the stage closed, the late client still cannot submit
    status, doc = await fed.put("bob", 1, "train", delta_body(MANIFEST, 5.0))
    assert status == 409
    assert _error(doc) == "stage_closed"


async def test_enrolment_rules(make_fed: Callable[..., Awaitable[Fed]]) -> None:
    f = await make_fed()
    token = f.engine.create_tokens(1)[0]

    async def enroll(tok: str, cid: str, ident: Identity) -> tuple[int, str]:
        body = json.dumps(
            {"token": tok, "client_id": cid, "public_key": ident.public_key_b64}
        ).encode()
        headers = signed(ident, cid, "POST", "/v1/enroll", 0, "enroll", body)
        resp = await f.http.post("/v1/enroll", data=body, headers=headers)
        doc = await resp.json()
        return resp.status, doc.get("error", {}).get("code", "")

    assert await enroll("not-a-token", "a", Identity.generate()) == (401, "bad_token")
    assert await enroll(token, "bad id!", Identity.generate()) == (422, "bad_client_id")
    assert (await enroll(token, "a", Identity.generate()))[0] == 200
    assert await enroll(token, "b", Identity.generate()) == (401, "bad_token")  # one-time
    token2 = f.engine.create_tokens(1)[0]
    assert await enroll(token2, "a", Identity.generate()) == (409, "client_exists")
    # proof of possession: a signature by another key than the one registered
    body = json.dumps(
        {"token": token2, "client_id": "c", "public_key": Identity.generate().public_key_b64}
    ).encode()
    headers = signed(Identity.generate(), "c", "POST", "/v1/enroll", 0, "enroll", body)
    resp = await f.http.post("/v1/enroll", data=body, headers=headers)
    assert resp.status == 401
    # tokens are stored only as hashes
    rows = f.engine.store._db.execute("SELECT token_hash FROM tokens").fetchall()
    assert token not in {r[0] for r in rows}


async def test_every_error_is_json(make_fed: Callable[..., Awaitable[Fed]]) -> None:
    f = await make_fed()
    for method, path in [("GET", "/nope"), ("POST", "/v1/task"), ("GET", "/v1/models/abc")]:
        resp = await f.http.request(method, path)
        assert resp.status in (404, 405)
        assert _error(await resp.json())
    resp = await f.http.post("/v1/enroll", data=b"\xff\xfe")
    assert resp.status == 422
    resp = await f.http.put("/v1/rounds/x/train", data=b"")
    assert resp.status == 404
    assert _error(await resp.json()) == "not_found"


async def test_expect_100_continue_path(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.5)
    path = "/v1/rounds/1/train"
    headers = signed(fed.ids["alice"], "alice", "PUT", path, 1, "train", body)
    resp = await fed.http.put(path, data=body, headers=headers, expect100=True)
    assert resp.status == 200
    first = (await resp.json())["receipt"]
    # an identical retry is answered before the body is sent
    headers = signed(fed.ids["alice"], "alice", "PUT", path, 1, "train", body)
    resp = await fed.http.put(path, data=body, headers=headers, expect100=True)
    assert resp.status == 200
    assert (await resp.json())["receipt"] == first
    # refusals come back as JSON errors instead of "100 Continue"
    big = b"\0" * (MANIFEST.nbytes + 65536 + 1)
    headers = signed(fed.ids["bob"], "bob", "PUT", path, 1, "train", big)
    resp = await fed.http.put(path, data=big, headers=headers, expect100=True)
    assert resp.status == 413
    assert _error(await resp.json()) == "payload_too_large"
    headers = signed(Identity.generate(), "bob", "PUT", path, 1, "train", body)
    resp = await fed.http.put(path, data=body, headers=headers, expect100=True)
    assert resp.status == 401
    assert fed.engine.store.count_submissions() == 1
