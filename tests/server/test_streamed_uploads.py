"""Streamed uploads: staged to disk while they arrive, per-client slots, body timeouts, 415s.

Raw sockets on loopback against the in-process server, so a body can be sent in part, late
or never. Waits are on the server's answer, with generous deadlines, never tight timings.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.protocol.signing import Identity
from confide_server.blobs import BlobStore
from confide_server.config import Config
from confide_server.connections import BODY_IDLE_TIMEOUT_S
from confide_server.events import BusyError, UploadGate
from confide_server.keys import upload_gate_key
from tests.server.conftest import Fed
from tests.server.util import delta_body, signed, tiny_manifest, until, write_job

MANIFEST = tiny_manifest()

#: Generous upper bound on anything the server must do "promptly" on a busy machine.
DEADLINE_S = 60.0


def _head(ident: Identity, cid: str, body: bytes, *, expect: bool, port: int) -> bytes:
    path = "/v1/rounds/1/train"
    headers = signed(ident, cid, "PUT", path, 1, "train", body)
    headers["Content-Length"] = str(len(body))
    headers["Content-Type"] = "application/octet-stream"
    if expect:
        headers["Expect"] = "100-continue"
    lines = [f"PUT {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _open(fed: Fed) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    server = fed.http.server
    assert server.port is not None
    return await asyncio.open_connection("127.0.0.1", server.port)


async def _status_line(reader: asyncio.StreamReader) -> str:
    line = await asyncio.wait_for(reader.readline(), DEADLINE_S)
    return line.decode().strip()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response (status, lower-cased headers, body)."""
    status = await _status_line(reader)
    headers: dict[str, str] = {}
    while True:
        line = (await asyncio.wait_for(reader.readline(), DEADLINE_S)).decode().strip()
        if not line:
            break
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status.split()[1]), headers, body


def _staged_files(fed: Fed) -> list[Path]:
    return sorted((fed.engine.blobs.root / "updates").glob(".upload-*.tmp"))


async def test_an_update_is_stored_from_its_staged_file_and_no_temporary_is_left(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.5)
    status, doc = await fed.put("alice", 1, "train", body)
    assert status == 200, doc
    assert doc["receipt"]["sha256"] == hashlib.sha256(body).hexdigest()
    stored = list((fed.engine.blobs.root / "updates" / "r1" / "train").glob("alice-*"))
    assert [p.read_bytes() for p in stored] == [body]
    assert _staged_files(fed) == []
    # a body that fails validation leaves no file either
    status, doc = await fed.put("bob", 1, "train", b"\x00" * 64)
    assert status == 422, doc
    assert _staged_files(fed) == []
    assert fed.http.app[upload_gate_key].held_by("bob") == 0


async def test_a_body_cut_short_frees_the_slot_and_the_temporary(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.5)
    _reader, writer = await _open(fed)
    port = fed.http.server.port or 0
    writer.write(_head(fed.ids["alice"], "alice", body, expect=False, port=port))
    writer.write(body[: len(body) // 2])
    await writer.drain()
    gate = fed.http.app[upload_gate_key]
    # the upload holds a slot while its body arrives
    await until(lambda: gate.held_by("alice") == 1, DEADLINE_S)
    assert gate.held_by("alice") == 1
    writer.close()  # the peer goes away mid-body
    await until(lambda: gate.held_by("alice") == 0 and not _staged_files(fed), DEADLINE_S)
    assert gate.held_by("alice") == 0
    assert _staged_files(fed) == []
    status, doc = await fed.put("alice", 1, "train", body)  # and the site can upload again
    assert status == 200, doc


@pytest.mark.slow
async def test_a_stalled_body_is_answered_408_and_its_slot_freed(fed: Fed) -> None:
    body = delta_body(MANIFEST, 0.5)
    reader, writer = await _open(fed)
    port = fed.http.server.port or 0
    # Content-Length larger than what is sent, then silence: was held forever
    writer.write(_head(fed.ids["alice"], "alice", body, expect=False, port=port))
    writer.write(body[:10])
    await writer.drain()
    status, headers, answer = await _answer(reader)
    assert status == 408, answer
    assert json.loads(answer)["error"]["code"] == "body_timeout"
    assert headers.get("connection", "").lower() == "close"
    assert fed.http.app[upload_gate_key].held_by("alice") == 0
    assert _staged_files(fed) == []
    writer.close()
    status, doc = await fed.put("alice", 1, "train", body)
    assert status == 200, doc
    assert BODY_IDLE_TIMEOUT_S <= 10.0  # the bound the operations guide states


@pytest.fixture
async def few_slots(make_fed: object, tmp_path: Path) -> Fed:
    config: Config = write_job(tmp_path / "job", server__max_concurrent_uploads=4)
    f: Fed = await make_fed(config)  # type: ignore[operator]
    for cid in ("alice", "bob"):
        await f.enroll(cid)
        await f.task(cid)
    await f.wait_for("alice", "train")
    return f


async def test_one_clients_stalled_uploads_cannot_block_another(few_slots: Fed) -> None:
    fed = few_slots
    body = delta_body(MANIFEST, 0.5)
    port = fed.http.server.port or 0
    conns = []
    answers: list[str] = []
    for _ in range(32):  # a cohort member opens 32 uploads and never sends their bodies
        reader, writer = await _open(fed)
        writer.write(_head(fed.ids["alice"], "alice", body, expect=True, port=port))
        await writer.drain()
        answers.append(await _status_line(reader))
        conns.append(writer)
    gate = fed.http.app[upload_gate_key]
    assert sum("100 Continue" in a for a in answers) == gate.per_client == 2, answers
    assert sum(" 429 " in a + " " for a in answers) == 30, answers
    assert gate.held_by("alice") == 2
    # four slots in all, alice holds two: bob's upload goes through at once
    status, doc = await asyncio.wait_for(fed.put("bob", 1, "train", body), DEADLINE_S)
    assert status == 200, doc
    for writer in conns:
        writer.close()


async def test_compressed_bodies_are_refused_415_and_the_server_still_answers(fed: Fed) -> None:
    bomb = gzip.compress(b"\x00" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 1 << 17
    resp = await fed.http.post(
        "/v1/enroll",
        data=bomb[:8000],
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert resp.status == 415, await resp.text()
    assert "uncompressed" in (await resp.json())["error"]["message"]
    body = gzip.compress(delta_body(MANIFEST, 0.5))
    headers = signed(fed.ids["alice"], "alice", "PUT", "/v1/rounds/1/train", 1, "train", body)
    headers["Content-Encoding"] = "gzip"
    resp = await fed.http.put("/v1/rounds/1/train", data=body, headers=headers)
    assert resp.status == 415, await resp.text()
    many = [
        fed.http.post("/v1/enroll", data=bomb[:8000], headers={"Content-Encoding": "gzip"})
        for _ in range(50)
    ]
    assert {r.status for r in await asyncio.gather(*many)} == {415}
    assert (await (await fed.http.get("/v1/health")).json()) == {"ok": True}


@settings(max_examples=50, deadline=None)
@given(chunks=st.lists(st.binary(min_size=2, max_size=5000), min_size=1, max_size=20))
def test_a_staged_upload_hashes_and_stores_exactly_its_chunks(
    tmp_path_factory: pytest.TempPathFactory, chunks: list[bytes]
) -> None:
    blobs = BlobStore(tmp_path_factory.mktemp("blobs"))
    staged = blobs.stage()
    for chunk in chunks:
        staged.write(chunk)
    whole = b"".join(chunks)
    assert staged.sha256 == hashlib.sha256(whole).hexdigest()
    assert staged.size == len(whole)
    data = blobs.read_staged(staged)
    assert data == whole
    final = blobs.write("updates/r1/train/x.safetensors", data)
    assert final.read_bytes() == whole
    assert not staged.path.exists()  # renamed into place, not written twice
    blobs.discard_staged(staged)
    assert final.exists()
    # bytes equal to a staged body but not the very object are written normally (an empty
    # or one-byte bytes object may be a shared singleton, hence min_size=2)
    other = blobs.stage()
    other.write(whole)
    blobs.read_staged(other)
    blobs.write("updates/r1/train/y.safetensors", bytes(bytearray(whole)))
    assert other.path.exists()
    blobs.discard_staged(other)
    assert not other.path.exists()


async def test_upload_gate_counts_slots_per_client() -> None:
    gate = UploadGate(concurrent=3, queued=10, per_client=2)
    await gate.acquire("a")
    await gate.acquire("a")
    with pytest.raises(BusyError) as err:
        await gate.acquire("a")
    assert err.value.code == "client_busy"
    await gate.acquire("b")
    waiting = asyncio.ensure_future(gate.acquire("c"))  # all three slots taken: c queues
    await asyncio.sleep(0)
    assert not waiting.done()
    assert gate.held_by("c") == 1
    gate.release("a")
    await asyncio.wait_for(waiting, DEADLINE_S)
    assert (gate.held_by("a"), gate.held_by("b"), gate.held_by("c")) == (1, 1, 1)
    cancelled = asyncio.ensure_future(gate.acquire("d"))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert gate.held_by("d") == 0  # a waiter that gave up holds nothing
