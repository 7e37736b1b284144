"""Fixtures for the in-process server tests (pytest-aiohttp, real HTTP on loopback)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from confide.protocol.signing import Identity
from confide_server.app import create_app, open_engine
from confide_server.auth import operator_token
from confide_server.config import Config
from confide_server.engine.rounds import RoundEngine
from confide_server.keys import config_key, engine_key, wake_key
from tests.server.util import signed, write_job


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Fed:
    """One in-process server plus helpers to act as enrolled clients."""

    def __init__(self, client: TestClient[Any, Any], engine: RoundEngine, clock: FakeClock):
        self.http = client
        self.engine = engine
        self.clock = clock
        self.ids: dict[str, Identity] = {}

    def operator(self) -> dict[str, str]:
        """The operator's ``Authorization`` header (``GET /v1/status`` needs it)."""
        state_dir = self.http.app[config_key].server.state_dir
        return {"Authorization": f"Bearer {operator_token(state_dir)}"}

    async def enroll(self, cid: str) -> Identity:
        token = self.engine.create_tokens(1)[0]
        ident = Identity.generate()
        body = json.dumps(
            {"token": token, "client_id": cid, "public_key": ident.public_key_b64}
        ).encode()
        headers = signed(ident, cid, "POST", "/v1/enroll", 0, "enroll", body)
        resp = await self.http.post("/v1/enroll", data=body, headers=headers)
        assert resp.status == 200, await resp.text()
        self.ids[cid] = ident
        return ident

    async def task(self, cid: str, wait: float = 0.0) -> dict[str, Any]:
        headers = signed(self.ids[cid], cid, "GET", "/v1/task", 0, "task", b"")
        resp = await self.http.get("/v1/task", params={"wait": str(wait)}, headers=headers)
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc

    async def put(
        self,
        cid: str,
        round_id: int,
        stage: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        path = f"/v1/rounds/{round_id}/{stage}"
        if headers is None:
            headers = signed(self.ids[cid], cid, "PUT", path, round_id, stage, body)
        resp = await self.http.put(path, data=body, headers=headers)
        return resp.status, await resp.json()

    def wake(self) -> None:
        self.http.app[wake_key].set()

    async def wait_for(self, cid: str, action: str) -> dict[str, Any]:
        for _ in range(50):
            task = await self.task(cid, wait=0.2)
            if task["action"] == action:
                return task
        raise AssertionError(f"{cid} never got a {action!r} task")


@pytest.fixture
def job_config(tmp_path: Path) -> Config:
    return write_job(tmp_path)


@pytest.fixture
def make_fed(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], tmp_path: Path
) -> Callable[..., Awaitable[Fed]]:
    async def make(config: Config | None = None) -> Fed:
        cfg = config or write_job(tmp_path)
        clock = FakeClock()
        engine = open_engine(cfg, clock=clock)
        client = await aiohttp_client(create_app(cfg, engine=engine))
        assert client.app[engine_key] is engine
        return Fed(client, engine, clock)

    return make


@pytest.fixture
async def fed(make_fed: Callable[..., Awaitable[Fed]]) -> Fed:
    """A server with two enrolled, active clients and round 1 open in stage ``train``."""
    f = await make_fed()
    await f.enroll("alice")
    await f.enroll("bob")
    await f.task("alice")
    await f.task("bob")
    await f.wait_for("alice", "train")
    return f
