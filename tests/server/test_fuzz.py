"""No client input produces an HTTP 500: a seeded fuzz over every route.

Requests mix validly signed and forged headers with random, truncated, mutated and
type-confused bodies. Every answer must be < 500 and, when it is an error, a JSON body with a
code and a message. The accepted model must not change because of any of them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tests.server.conftest import Fed
from tests.server.util import delta_body, eval_body, signed, tiny_manifest

ROUTES = [
    ("GET", "/v1/health"),
    ("GET", "/v1/status"),
    ("GET", "/v1/manifest"),
    ("POST", "/v1/enroll"),
    ("GET", "/v1/task"),
    ("GET", "/v1/models/" + "0" * 64),
    ("PUT", "/v1/rounds/1/train"),
    ("PUT", "/v1/rounds/1/evaluate"),
    ("PUT", "/v1/rounds/99999999999999999999/train"),
    ("PUT", "/v1/rounds/-1/train"),
    ("PUT", "/v1/rounds/1/%00"),
    ("PUT", "/v1/rounds/abc/train"),
]


def _bodies(rng: np.random.Generator) -> list[bytes]:
    good = delta_body(tiny_manifest(), 0.1)
    junk_json: list[Any] = [None, 1, "x", [], {}, {"token": 1}, {"num_examples": -1}]
    return [
        b"",
        good,
        good[: len(good) // 2],
        good[:8],
        bytes(rng.integers(0, 256, 64, dtype=np.uint8)),
        good.replace(b"F32", b"F64"),
        good.replace(b"shape", b"shapf"),
        b"\xff" * 8 + b"{}",
        eval_body(0.5),
        b'{"num_examples": 1e309, "metrics": {"accuracy": NaN}}',
        *(json.dumps(j).encode() for j in junk_json),
    ]


def _mutate(rng: np.random.Generator, body: bytes) -> bytes:
    if not body or rng.random() < 0.5:
        return body
    b = bytearray(body)
    for _ in range(int(rng.integers(1, 4))):
        b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
    return bytes(b)


async def test_fuzz_never_500(fed: Fed) -> None:
    rng = np.random.default_rng(2026)  # test inputs only
    model_before = fed.engine.status_dict()["current_model"]
    bodies = _bodies(rng)
    ident = fed.ids["alice"]
    for i in range(400):
        method, path = ROUTES[int(rng.integers(0, len(ROUTES)))]
        body = _mutate(rng, bodies[int(rng.integers(0, len(bodies)))])
        mode = int(rng.integers(0, 4))
        headers: dict[str, str]
        if mode == 0:
            headers = {}
        elif mode == 1:
            headers = signed(ident, "alice", method, path, 1, "train", body)
        elif mode == 2:  # signed, then one header corrupted
            headers = signed(ident, "alice", method, path, 1, "train", body)
            key = sorted(headers)[int(rng.integers(0, len(headers)))]
            headers[key] = ["", "0", "-1", "\u00e9", "A" * 300, "1e999"][int(rng.integers(0, 6))]
        else:  # forged identity
            headers = signed(ident, "mallory", method, path, 1, "train", body)
        resp = await fed.http.request(method, path, data=body, headers=headers)
        text = await resp.text()
        assert resp.status < 500, (i, method, path, mode, resp.status, text[:300])
        if resp.status >= 400:
            doc = json.loads(text)
            assert set(doc["error"]) >= {"code", "message"}, doc
    assert fed.engine.status_dict()["current_model"] == model_before
