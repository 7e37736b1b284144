"""Inputs that used to answer HTTP 500 (issue 12 item 8), each against a real server on loopback.

Every case is sent over real HTTP to the in-process server; the answer must be the 4xx the
error table gives, as a JSON error body, and the server must go on serving.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.errors import WireFormatError
from confide.protocol.jsonio import loads_bounded
from confide.protocol.manifest import encode_tensors, read_safetensors_header
from confide.protocol.signing import Identity
from tests.server.conftest import Fed
from tests.server.util import delta_body, eval_body, signed, tiny_manifest

MANIFEST = tiny_manifest()

DEEP_ARRAY = b"[" * 50_000 + b"]" * 50_000
DEEP_OBJECT = b'{"a":' * 4_000 + b"1" + b"}" * 4_000
HUGE_INT = b'{"token": ' + b"9" * 5_000 + b', "client_id": "x", "public_key": "y"}'


async def _enroll_raw(
    fed: Fed, body: bytes, extra: dict[str, str] | None = None
) -> tuple[int, str]:
    ident = Identity.generate()
    headers = signed(ident, "eve", "POST", "/v1/enroll", 0, "enroll", body)
    headers.update(extra or {})
    resp = await fed.http.post("/v1/enroll", data=body, headers=headers)
    return resp.status, await resp.text()


def _assert_json_error(status: int, text: str, expected: int) -> None:
    assert status == expected, text[:300]
    doc = json.loads(text)
    assert set(doc["error"]) >= {"code", "message"}


@pytest.mark.parametrize("body", [DEEP_ARRAY, DEEP_OBJECT, HUGE_INT], ids=["deep", "obj", "int"])
async def test_enroll_hostile_json_is_413_or_422(fed: Fed, body: bytes) -> None:
    status, text = await _enroll_raw(fed, body)
    # deep bodies are over the enrolment size cap; the integer one is refused by the decoder
    assert status in (413, 422), text[:300]
    _assert_json_error(status, text, status)


async def test_enroll_small_hostile_json_is_422(fed: Fed) -> None:
    for body in (
        b"[" * 4_000 + b"]" * 4_000,
        b'{"token": 1' + b"0" * 500 + b', "client_id": "x", "public_key": "y"}',
        b'{"token": "\\ud800", "client_id": "x", "public_key": "y"}',
        b'{"token": "t", "token": "u", "client_id": "x", "public_key": "y"}',
        b'{"token": NaN, "client_id": "x", "public_key": "y"}',
    ):
        status, text = await _enroll_raw(fed, body)
        _assert_json_error(status, text, 422)


async def test_compressed_bodies_are_415(fed: Fed) -> None:
    good = json.dumps({"token": "t", "client_id": "eve", "public_key": "k"}).encode()
    for encoding, body in (("gzip", gzip.compress(good)), ("gzip", b"not gzip"), ("br", b"x")):
        status, text = await _enroll_raw(fed, body, {"Content-Encoding": encoding})
        _assert_json_error(status, text, 415)
    body = delta_body(MANIFEST, 0.1)
    path = "/v1/rounds/1/train"
    headers = signed(fed.ids["alice"], "alice", "PUT", path, 1, "train", body)
    headers["Content-Encoding"] = "deflate"
    resp = await fed.http.put(path, data=body, headers=headers)
    _assert_json_error(resp.status, await resp.text(), 415)
    # the same upload uncompressed is accepted: nothing was consumed by the refusal
    status, doc = await fed.put("alice", 1, "train", body)
    assert status == 200, doc


@pytest.mark.parametrize("digits", ["\u0661", "\uff11", "\u0967", "1_0", "+1", " 1", "0"])
async def test_round_path_takes_ascii_digits_only(fed: Fed, digits: str) -> None:
    body = delta_body(MANIFEST, 0.1)
    path = f"/v1/rounds/{digits}/train"
    headers = signed(fed.ids["alice"], "alice", "PUT", path, 1, "train", body)
    resp = await fed.http.put(path, data=body, headers=headers)
    _assert_json_error(resp.status, await resp.text(), 404)


async def test_non_ascii_signature_header_is_401(fed: Fed) -> None:
    body = b""
    headers = signed(fed.ids["alice"], "alice", "GET", "/v1/task", 0, "task", body)
    reader, writer = await asyncio.open_connection("127.0.0.1", fed.http.port)
    lines = [b"GET /v1/task HTTP/1.1", b"Host: x", b"Connection: close"]
    for name, value in headers.items():
        raw = value.encode()
        if name.lower() == "x-confide-nonce":
            raw = b"\xed\xa0\x80" + raw[3:]  # not UTF-8: decoded to a lone surrogate
        lines.append(name.encode() + b": " + raw)
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"401", answer[:300]
    assert json.loads(text)["error"]["code"] == "unauthenticated"


def _safetensors(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


async def test_duplicate_tensor_names_are_422(fed: Fed) -> None:
    good = delta_body(MANIFEST, 0.1)
    header, _, start = read_safetensors_header(good)
    name = sorted(header)[0]
    raw = good[8:start].decode().rstrip()  # the header is space-padded
    entry = json.dumps(header[name], separators=(",", ":"))
    # the same name twice (the second entry wins in a plain json.loads)
    dup = raw[:-1] + f',"{name}":{entry}' + "}"
    body = _safetensors(dup.encode(), good[start:])
    with pytest.raises(WireFormatError, match="twice"):
        read_safetensors_header(body)
    status, doc = await fed.put("alice", 1, "train", body)
    assert status == 422, doc


async def test_deep_and_huge_safetensors_headers_are_422(fed: Fed) -> None:
    good = delta_body(MANIFEST, 0.1)
    _, _, start = read_safetensors_header(good)
    for header in (
        b"[" * 50_000 + b"]" * 50_000,
        b'{"w":{"dtype":"F32","shape":[' + b"9" * 5_000 + b'],"data_offsets":[0,4]}}',
        b'{"w":{"dtype":"\\udfff","shape":[1],"data_offsets":[0,4]}}',
    ):
        status, doc = await fed.put("alice", 1, "train", _safetensors(header, good[start:]))
        assert status in (413, 422), doc


async def test_huge_metric_cannot_break_status_json(
    make_fed: Callable[..., Awaitable[Fed]],
) -> None:
    fed = await make_fed()
    for cid in ("alice", "bob"):
        await fed.enroll(cid)
        await fed.task(cid)
    await fed.wait_for("alice", "train")
    for cid in ("alice", "bob"):
        status, doc = await fed.put(cid, 1, "train", delta_body(MANIFEST, 0.1))
        assert status == 200, doc
    fed.wake()
    await fed.wait_for("alice", "evaluate")
    for accuracy in (1e308, -1e300, 1e13):
        status, doc = await fed.put("alice", 1, "evaluate", eval_body(accuracy))
        assert status == 422, doc
        assert "accuracy" in doc["error"]["message"]
    for cid in ("alice", "bob"):
        status, doc = await fed.put(cid, 1, "evaluate", eval_body(1e12, num_examples=10**9))
        assert status == 200, doc
    fed.wake()
    await fed.wait_for("alice", "train")
    resp = await fed.http.get("/v1/status", headers=fed.operator())
    text = await resp.text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"status holds {constant}")

    doc = json.loads(text, parse_constant=refuse)
    assert doc["rounds"][0]["metrics"]["eval_accuracy"] == pytest.approx(1e12)


def test_bounded_decoder_known_answers() -> None:
    assert loads_bounded(b'{"a": [1, -2, 2.5e3, "\\u00e9\\ud83d\\ude00", null, true]}') == {
        "a": [1, -2, 2500.0, "\u00e9\U0001f600", None, True]
    }
    assert loads_bounded(b"[" * 32 + b"]" * 32) == loads_bounded(b"[" * 32 + b"]" * 32)
    assert loads_bounded(b'"[[[[' + b"[" * 100 + b'"') == "[[[[" + "[" * 100
    for bad in (
        b"[" * 33 + b"]" * 33,
        b"1" * 65,
        b"-" + b"1" * 65,
        b"1e400",
        b"-Infinity",
        b"NaN",
        b'"\\udc00"',
        b'{"k": 1, "k": 1}',
        b"\xff",
        b'"\xed\xa0\x80"',
        b"",
        b"[1,]",
    ):
        with pytest.raises(WireFormatError):
            loads_bounded(bad)
    with pytest.raises(WireFormatError, match="6 bytes; at most 4 allowed"):
        loads_bounded(b"[1, 2]", max_bytes=4)


def test_bounded_decoder_is_linear_on_unterminated_strings() -> None:
    # many escaped quotes and no closing quote: a restart-at-each-quote scan is quadratic
    body = b'"' + b'\\"' * 200_000
    with pytest.raises(WireFormatError):
        loads_bounded(body, max_bytes=1 << 22)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=300) | _json_values.map(lambda v: json.dumps(v).encode()))
def test_bounded_decoder_raises_only_wire_format_error(data: bytes) -> None:
    """Any bytes: a value equal to ``json.loads``' answer, or a WireFormatError."""
    try:
        doc = loads_bounded(data)
    except WireFormatError:
        return
    assert doc == json.loads(data)
    json.dumps(doc, allow_nan=False)  # finite and re-encodable
    json.dumps(doc).encode("utf-8")


def test_encode_then_decode_round_trips() -> None:
    rng = np.random.default_rng(3)
    vec = rng.normal(size=MANIFEST.size).astype(np.float32)
    blob = encode_tensors(MANIFEST, vec, {"num_examples": "4"})
    header, meta, _ = read_safetensors_header(blob)
    assert set(header) == set(MANIFEST.names)
    assert meta == {"num_examples": "4"}


async def test_status_is_strict_json_even_with_an_infinite_value(fed: Fed) -> None:
    real = fed.engine.status_dict

    def with_inf(*page: int | None) -> dict[str, object]:  # (limit, before): one status page
        doc = real(*page)
        doc["privacy"] = {"epsilon": float("inf"), "rounds": [float("nan"), 1.5]}
        return doc

    fed.engine.status_dict = with_inf  # type: ignore[method-assign]
    resp = await fed.http.get("/v1/status", headers=fed.operator())
    assert resp.status == 200
    text = await resp.text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"status holds {constant}")

    doc = json.loads(text, parse_constant=refuse)
    assert doc["privacy"] == {"epsilon": None, "rounds": [None, 1.5]}
