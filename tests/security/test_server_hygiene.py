"""Attacks 7 and 8: the status page, enrolment tokens, file modes, tokens on argv.

Over real HTTP (the in-process aiohttp server of the server tests): an anonymous
``GET /v1/status`` is refused, a token bound to one site id enrols no other, repeated failed
enrolments from one address get 429, the state folder and database are private to the
server's user, and ``confide client`` takes its token from a file or the environment.
"""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from confide.cli import _enrolment_token
from confide.errors import ConfigError
from confide.protocol.signing import Identity
from confide_server.auth import OPERATOR_TOKEN_FILE, operator_token
from confide_server.engine.rounds import hash_token, new_token
from confide_server.enrolment import ENROL_MAX_FAILURES, EnrolLimiter
from tests.server.util import signed


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _enroll(fed: Any, token: str, cid: str) -> Any:
    ident = Identity.generate()
    body = json.dumps({"token": token, "client_id": cid, "public_key": ident.public_key_b64})
    headers = signed(ident, cid, "POST", "/v1/enroll", 0, "enroll", body.encode())
    return await fed.http.post("/v1/enroll", data=body.encode(), headers=headers)


async def test_status_needs_the_operator_token(make_fed: Any) -> None:
    """Attack 7: cohorts and total weights per round would give each site's sample count."""
    fed = await make_fed()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        resp = await fed.http.get("/v1/status", headers=headers)
        assert resp.status == 401
        doc = await resp.json()
        assert doc["error"]["code"] == "operator_token_required"
        assert "Authorization: Bearer" in doc["error"]["message"]
    resp = await fed.http.get("/v1/status", headers=fed.operator())
    assert resp.status == 200
    assert "rounds" in await resp.json()
    state = fed.engine.config.server.state_dir
    assert _mode(state / OPERATOR_TOKEN_FILE) == 0o600
    assert operator_token(state) == operator_token(state)  # created once, then read


async def test_state_folder_and_database_are_private(make_fed: Any) -> None:
    fed = await make_fed()
    cfg = fed.engine.config.server
    assert _mode(cfg.state_dir) == 0o700
    assert _mode(cfg.database) == 0o600


async def test_a_bound_token_enrols_only_its_site(make_fed: Any) -> None:
    """Attack 8: a token made for site-a must not enrol an id of the holder's choosing."""
    fed = await make_fed()
    token = new_token() + ".site-a"  # what `confide-server enroll --client-id site-a` prints
    fed.engine.store.add_token_hashes([hash_token(token)])
    resp = await _enroll(fed, token, "intruder")
    assert resp.status == 401
    assert "made for another client id" in (await resp.json())["error"]["message"]
    assert "intruder" not in fed.engine.store.clients()
    resp = await _enroll(fed, token, "site-a")
    assert resp.status == 200, await resp.text()


async def test_repeated_failed_enrolments_get_429(make_fed: Any) -> None:
    """Attack 8: guessing tokens is cut off after a few failures from one address."""
    fed = await make_fed()
    for _ in range(ENROL_MAX_FAILURES):
        assert (await _enroll(fed, "ct_guess", "site-x")).status == 401
    good = fed.engine.create_tokens(1)[0]
    resp = await _enroll(fed, good, "site-x")
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "too_many_enrolments"
    assert "site-x" not in fed.engine.store.clients()


def test_the_failure_table_is_bounded_and_forgets() -> None:
    now = [0.0]
    limiter = EnrolLimiter(max_failures=2, window_s=10.0, size=3, clock=lambda: now[0])
    for addr in ("a", "a", "b", "c", "d"):
        limiter.failed(addr)
    assert limiter.retry_after("a") is None  # evicted: the table holds 3 addresses
    limiter.failed("d")
    assert limiter.retry_after("d") == pytest.approx(10.0)
    now[0] = 10.5
    assert limiter.retry_after("d") is None


def test_client_token_comes_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack 8: a token on argv is visible to every user in `ps`."""
    path = tmp_path / "token"
    path.write_text("ct_from_file\n")
    args = argparse.Namespace(token_file=str(path), token=None)
    monkeypatch.setenv("CONFIDE_TOKEN", "ct_from_env")
    assert _enrolment_token(args) == "ct_from_file"
    assert _enrolment_token(argparse.Namespace(token_file=None, token=None)) == "ct_from_env"
    monkeypatch.delenv("CONFIDE_TOKEN")
    assert _enrolment_token(argparse.Namespace(token_file=None, token="ct_argv")) == "ct_argv"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        _enrolment_token(args)


def test_enroll_client_id_prints_a_bound_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from confide_server.cli import main
    from confide_server.launcher import free_port
    from confide_server.simulate import SimulationOptions, prepare_job
    from confide_server.store import Store

    files = prepare_job(tmp_path, SimulationOptions(clients=2, rounds=1, port=free_port()))
    assert main(["enroll", "--config", str(files.config), "--client-id", "hospital-1"]) == 0
    (token,) = capsys.readouterr().out.split()
    assert token.startswith("ct_")
    assert token.endswith(".hospital-1")
    assert main(["enroll", "--config", str(files.config), "--client-id", "bad id!"]) == 2
    assert "--client-id must be 1-64 characters" in capsys.readouterr().err
    assert files.job is not None
    store = Store(files.job.server.database)
    try:
        assert store.count_tokens() == (1, 0)
    finally:
        store.close()
