"""The per-client request cap against a real server process, over real HTTP.

An authenticated site may have ``server.max_requests_per_client`` requests in progress at
once; one more is answered 429 ``client_busy`` with ``Retry-After``. Long-polls count while
they are held, requests without a valid signature never count, and a site's own pattern
(one long-poll and one upload) always fits. Waits are on the server's answers with generous
deadlines (the machine is busy), never tight timings.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from confide.protocol.signing import Identity
from confide_server.launcher import get_json
from confide_server.simulate import SimulationOptions, prepare_job
from tests.e2e.conftest import ENTRY, Procs
from tests.server.util import signed

CAP = 3
LONG_POLL_S = 20.0
DEADLINE_S = 90.0


def _server(tmp_path: Path, procs_factory: Any) -> tuple[Procs, str, int]:
    # Three sites wanted, at most two enrol: no round ever starts, so polls are held.
    opts = SimulationOptions(
        clients=3,
        rounds=1,
        seed=5,
        extra_server={"max_requests_per_client": CAP, "long_poll_max_s": LONG_POLL_S},
    )
    files = prepare_job(tmp_path, opts)
    procs: Procs = procs_factory(files)
    server = procs.launcher.spawn(
        "server", [*ENTRY, "server", "run", "--config", str(files.config)]
    )
    procs.wait_until(lambda: procs.status() is not None or server.poll() is not None)
    assert server.poll() is None, procs.log("server")
    return procs, files.server_url, int(files.server_url.rsplit(":", 1)[1])


def _enroll(url: str, token: str, cid: str) -> Identity:
    ident = Identity.generate()
    body = json.dumps({"token": token, "client_id": cid, "public_key": ident.public_key_b64})
    data = body.encode()
    headers = signed(ident, cid, "POST", "/v1/enroll", 0, "enroll", data)
    headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url + "/v1/enroll", data=data, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=DEADLINE_S) as r:
        assert r.status == 200
    return ident


def _request(
    ident: Identity | None, cid: str, method: str, path: str, port: int, body: bytes = b""
) -> bytes:
    stage = "task" if path.startswith("/v1/task") else "train"
    rnd = 0 if stage == "task" else 1
    signer = ident or Identity.generate()  # None: a forged request (someone else's key)
    headers = signed(signer, cid, method, path.split("?")[0], rnd, stage, body)
    if method == "PUT":
        headers["Content-Length"] = str(len(body))
        headers["Content-Type"] = "application/octet-stream"
        headers["Expect"] = "100-continue"
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status = (await reader.readline()).decode()
    headers: dict[str, str] = {}
    while True:
        line = (await reader.readline()).decode().strip()
        if not line:
            break
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status.split()[1]), headers, body


class Poll:
    """One request on its own connection; its answer arrives as a task."""

    def __init__(self, port: int, head: bytes) -> None:
        self.port, self.head = port, head
        self.answer: asyncio.Task[tuple[int, dict[str, str], bytes]] | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def start(self) -> Poll:
        reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(self.head)
        await self.writer.drain()
        self.answer = asyncio.create_task(asyncio.wait_for(_answer(reader), DEADLINE_S))
        return self

    def close(self) -> None:
        assert self.writer is not None
        self.writer.close()
        if self.answer is not None:
            self.answer.cancel()


async def _scenario(url: str, port: int, a: Identity, b: Identity) -> None:
    task = "/v1/task?wait=60"
    # Forged requests in a's name (bad signatures) are 401s and never count against a.
    for _ in range(2 * CAP):
        forged = await Poll(port, _request(None, "site-a", "GET", task, port)).start()
        assert forged.answer is not None
        status, _, _ = await forged.answer
        assert status == 401
        forged.close()
    # cap + 1 long-polls from a at once: exactly one is refused, at once, while the rest wait
    polls = [
        await Poll(port, _request(a, "site-a", "GET", task, port)).start() for _ in range(CAP + 1)
    ]
    done, pending = await asyncio.wait(
        [p.answer for p in polls if p.answer is not None], return_when=asyncio.FIRST_COMPLETED
    )
    assert len(done) == 1
    status, headers, body = done.pop().result()
    assert status == 429, body
    assert headers.get("retry-after") == "2"
    err = json.loads(body)["error"]
    assert err["code"] == "client_busy"
    assert "max_requests_per_client" in err["message"]
    assert len(pending) == CAP  # still held: the round cannot start (LONG_POLL_S = 20 s)
    # Another site is not affected by a's cap.
    other = await Poll(port, _request(b, "site-b", "GET", "/v1/task?wait=0", port)).start()
    assert other.answer is not None
    assert (await other.answer)[0] == 200
    other.close()
    # The held polls end when their wait does (LONG_POLL_S) and give their counts back.
    for answer in pending:
        assert (await answer)[0] == 200
    for p in polls:
        p.close()
    # A site's own pattern fits: one long-poll held and an upload at the same time; an
    # upload answered at its Expect (here a 4xx: no round is open) gives its count back at
    # once, so several in a row never add up (p, plus 2 x CAP uploads, > CAP).
    held = await Poll(port, _request(a, "site-a", "GET", task, port)).start()
    upload = b"x" * 64
    for _ in range(2 * CAP):
        up = Poll(port, _request(a, "site-a", "PUT", "/v1/rounds/1/train", port, upload))
        await up.start()
        assert up.answer is not None
        status, _, body = await up.answer
        up.close()
        assert 400 <= status < 500, body
        assert status != 429, body  # refused for what it is, never for the cap
    assert held.answer is not None
    assert not held.answer.done()  # the long-poll was in progress all along
    held.close()


@pytest.mark.slow
def test_a_client_beyond_its_request_cap_gets_429_and_its_pattern_fits(
    tmp_path: Path, procs_factory: Any
) -> None:
    procs, url, port = _server(tmp_path, procs_factory)
    tokens = procs.tokens(2)
    a = _enroll(url, tokens[0], "site-a")
    b = _enroll(url, tokens[1], "site-b")
    asyncio.run(_scenario(url, port, a, b))
    assert get_json(url + "/v1/health") == {"ok": True}
    log = procs.log("server")
    assert log.count("requests in progress (cap 3)") == 1  # one line per 10 s at most
    assert "Traceback" not in log
