"""Per-request work the server does once: enrolled keys decoded once, small JSON bodies
read into memory (never staged to a file), with every check of the streamed path kept."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from confide.errors import SignatureError
from confide.protocol.signing import Identity
from confide_server.auth import public_key_object
from confide_server.blobs import StagedUpload
from confide_server.handlers import IN_MEMORY_BODY_BYTES
from confide_server.keys import upload_gate_key
from tests.server.conftest import Fed
from tests.server.util import delta_body, eval_body, signed, tiny_manifest, until

MANIFEST = tiny_manifest()
DEADLINE_S = 60.0  # generous bound on anything the server must do "promptly"


def test_an_enrolled_key_is_decoded_once() -> None:
    ident, other = Identity.generate(), Identity.generate()
    first = public_key_object(ident.public_key_b64)
    hits = public_key_object.cache_info().hits
    assert public_key_object(ident.public_key_b64) is first
    assert public_key_object.cache_info().hits == hits + 1
    assert public_key_object(other.public_key_b64) is not first
    for _ in range(2):  # a key that does not decode is refused every time, never remembered
        with pytest.raises(SignatureError, match="public key"):
            public_key_object("not base64!")


async def test_a_cached_key_still_refuses_another_keys_signature(fed: Fed) -> None:
    await fed.task("alice")  # alice's key is decoded (and remembered) by now
    mallory = Identity.generate()
    headers = signed(mallory, "alice", "GET", "/v1/task", 0, "task", b"")
    resp = await fed.http.get("/v1/task", headers=headers)
    assert resp.status == 401, await resp.text()
    assert (await fed.task("alice"))["action"] in ("train", "wait")


def _count_staging(fed: Fed, monkeypatch: pytest.MonkeyPatch) -> list[StagedUpload]:
    made: list[StagedUpload] = []
    real = fed.engine.blobs.stage

    def stage() -> StagedUpload:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(fed.engine.blobs, "stage", stage)
    return made


async def _to_evaluate(fed: Fed) -> None:
    for cid in ("alice", "bob"):
        status, doc = await fed.put(cid, 1, "train", delta_body(MANIFEST, 0.5))
        assert status == 200, doc
    fed.wake()
    await fed.wait_for("alice", "evaluate")


async def test_small_json_bodies_are_read_in_memory_tensors_are_staged(
    fed: Fed, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = _count_staging(fed, monkeypatch)
    await _to_evaluate(fed)
    assert len(staged) == 2  # the two tensor uploads went through a staged file
    body = eval_body(0.75)
    assert len(body) <= IN_MEMORY_BODY_BYTES
    status, doc = await fed.put("alice", 1, "evaluate", body)
    assert status == 200, doc
    assert doc["receipt"]["stage"] == "evaluate"
    assert len(staged) == 2  # no file for the evaluation body
    # an identical retry gets the stored receipt
    status, again = await fed.put("alice", 1, "evaluate", body)
    assert (status, again["duplicate"], again["receipt"]) == (200, True, doc["receipt"])


async def test_an_in_memory_body_keeps_every_check(fed: Fed) -> None:
    await _to_evaluate(fed)
    path = "/v1/rounds/1/evaluate"
    # the body is not the one signed: 401, nothing recorded
    headers = signed(fed.ids["bob"], "bob", "PUT", path, 1, "evaluate", eval_body(0.5))
    status, doc = await fed.put("bob", 1, "evaluate", eval_body(0.9), headers=headers)
    assert status == 401, doc
    # over the route's cap: 413 before anything is read
    big = json.dumps({"num_examples": 1, "metrics": {"a": 1.0}, "pad": "x" * 70000}).encode()
    status, doc = await fed.put("bob", 1, "evaluate", big)
    assert status == 413, doc
    # malformed JSON: 422 with what was expected
    status, doc = await fed.put("bob", 1, "evaluate", b'{"num_examples": 3}')
    assert status == 422, doc
    assert "metrics" in doc["error"]["message"]
    status, doc = await fed.put("bob", 1, "evaluate", eval_body(0.5))
    assert status == 200, doc
    assert fed.http.app[upload_gate_key].held_by("bob") == 0


async def _raw_put_head(fed: Fed, cid: str, body: bytes) -> bytes:
    path = "/v1/rounds/1/evaluate"
    headers: dict[str, Any] = signed(fed.ids[cid], cid, "PUT", path, 1, "evaluate", body)
    headers["Content-Length"] = str(len(body))
    headers["Content-Type"] = "application/json"
    port = fed.http.server.port
    lines = [f"PUT {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_an_in_memory_body_cut_short_frees_its_slot(fed: Fed) -> None:
    await _to_evaluate(fed)
    body = eval_body(0.5)
    port = fed.http.server.port
    assert port is not None
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(await _raw_put_head(fed, "alice", body))
    writer.write(body[: len(body) // 2])
    await writer.drain()
    gate = fed.http.app[upload_gate_key]
    # the upload holds a slot while its body arrives
    await until(lambda: gate.held_by("alice") == 1, DEADLINE_S)
    assert gate.held_by("alice") == 1
    writer.close()  # the peer goes away mid-body
    await until(lambda: gate.held_by("alice") == 0, DEADLINE_S)
    assert gate.held_by("alice") == 0
    status, doc = await fed.put("alice", 1, "evaluate", body)  # and the site can send again
    assert status == 200, doc
