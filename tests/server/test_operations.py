"""Operations (issue 15): the state lock, operator abort/revoke/new-job, per-stage logs.

In-process engine tests pin the rules (what an operator abort or a revocation does, and that
budget spent by aborted rounds fails the job); the ``slow`` tests run real server and site
processes over real HTTP on loopback and parse the server's log file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from confide.client.client import loss_text
from confide.errors import ConfigError
from confide.logs import JsonFormatter
from confide_server.app import open_engine
from confide_server.auth import operator_token
from confide_server.config import Config
from confide_server.engine.privacy import BUDGET_EXHAUSTED, read_privacy
from confide_server.engine.rounds import RoundError
from confide_server.engine.stagelog import secagg_tolerance
from confide_server.opscli import archive_state
from confide_server.simulate import JobFiles, SimulationOptions, prepare_job
from confide_server.statelock import LOCK_FILE, StateLock
from tests.e2e.conftest import Procs, reaped_procs
from tests.server.conftest import FakeClock
from tests.server.util import delta_body, enrolled_engine, write_job

SERVER = [sys.executable, "-m", "confide_server"]
Z = 2.0


def _config(tmp: Path, **kw: Any) -> Config:
    base: dict[str, Any] = {
        "job__cohort_size": 3,
        "job__min_clients": 2,
        "job__wait_for_clients": 3,
        "job__rounds": 3,
    }
    base.update(kw)
    return write_job(tmp, **base)


# -- in-process: the rules ------------------------------------------------------------------


def test_operator_abort_aborts_the_open_round_and_the_next_one_starts(tmp_path: Path) -> None:
    clock = FakeClock()
    eng = enrolled_engine(_config(tmp_path), clock)
    assert eng.abort_open_round("aborted by the operator: x") is None  # nothing open
    assert eng.tick()
    assert eng.abort_open_round("aborted by the operator: maintenance") == 1
    row = eng.store.get_round(1)
    assert row is not None
    assert (row.status, row.reason) == ("aborted", "aborted by the operator: maintenance")
    for cid in "abc":
        eng.touch(cid)
    assert eng.tick()  # round 2 opens at once: all three sites are back
    assert eng.store.get_round(2) is not None
    assert eng.status == "running"


def test_revoked_site_is_never_drawn_and_its_open_round_is_aborted(tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = _config(tmp_path)
    eng = enrolled_engine(cfg, clock)
    assert eng.tick()
    prepared = eng.prepare("c", 1, "train", delta_body(eng.manifest, 1.0))
    eng.commit_submission(prepared, nonce="c-train-1")
    with pytest.raises(RoundError, match="no enrolled site 'zz'"):
        eng.revoke_client("zz", "typo")
    assert eng.revoke_client("c", "key leaked") == 1  # c is in round 1's cohort
    row = eng.store.get_round(1)
    assert row is not None
    assert (row.status, row.reason) == ("aborted", "site 'c' was revoked by the operator")
    assert eng.revoked_reason("c") == "key leaked"
    for cid in "abc":
        eng.touch(cid)
    clock.now += 10.0  # past the cohort grace: the next round starts with a and b
    assert eng.tick()
    row2 = eng.store.get_round(2)
    assert row2 is not None
    assert row2.cohort == ("a", "b")
    # Durable: a restarted engine still refuses the site.
    eng.store.close()
    again = open_engine(cfg, clock=clock)
    assert again.revoked_reason("c") == "key leaked"
    assert again.revoked_reason("a") is None
    again.store.close()


def test_budget_spent_by_aborted_rounds_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    # Sample-level DP charges a round when it starts (sites release noised updates at
    # once); two rounds aborted by the operator spend the budget and produce no model.
    privacy = {
        "privacy__mode": "sample",
        "privacy__noise_multiplier": Z,
        "privacy__sampling_rate": 0.2,
        "privacy__clip_norm": 1.0,
    }
    probe = enrolled_engine(_config(tmp_path / "probe", **privacy), FakeClock())
    assert probe.tick()
    eps1 = read_privacy(probe.store)[0]["epsilon"]  # type: ignore[index]
    probe.abort_open_round("probe")
    for cid in "abc":
        probe.touch(cid)
    assert probe.tick()
    eps2 = read_privacy(probe.store)[0]["epsilon"]  # type: ignore[index]
    probe.store.close()
    assert eps2 > eps1 > 0
    cfg = _config(tmp_path / "job", **privacy, privacy__epsilon_budget=(eps2 + eps2 * 1.2) / 2)
    eng = enrolled_engine(cfg, FakeClock())
    for r in (1, 2):
        assert eng.tick()
        assert eng.abort_open_round("aborted by the operator: test") == r
        for cid in "abc":
            eng.touch(cid)
    assert eng.tick()  # round 3 would exceed the budget
    assert eng.status == "failed"
    assert eng.status_reason is not None
    assert eng.status_reason.startswith(BUDGET_EXHAUSTED + " after 0 of 3 rounds")
    assert "2 aborted round(s) were charged" in eng.status_reason
    assert "(rounds 1, 2)" in eng.status_reason
    task = eng.task_for("a")
    assert task.action == "failed"
    assert eng.store.get_round(3) is None


def test_state_lock_refuses_a_second_holder_and_is_released(tmp_path: Path) -> None:
    pid = os.getpid()
    with (
        StateLock(tmp_path / "state", "first"),
        pytest.raises(ConfigError, match=rf"in use by pid {pid} \(lock .*{LOCK_FILE}\)"),
    ):
        StateLock(tmp_path / "state", "second")
    StateLock(tmp_path / "state").release()  # released: a successor takes it


def test_new_job_refuses_an_unfinished_job_without_abandon(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    eng = enrolled_engine(cfg, FakeClock())
    eng.store.close()
    with pytest.raises(ConfigError, match=r"has not ended .* pass --abandon"):
        archive_state(cfg)
    target = archive_state(cfg, abandon=True)
    assert target is not None
    assert (target / "confide.sqlite").exists()  # archived whole, never deleted
    assert target.parent == tmp_path / "state.archive"
    assert list(cfg.server.state_dir.iterdir()) == []
    assert archive_state(cfg) is None  # nothing left to archive


def test_loss_text_never_says_nan() -> None:
    nan = float("nan")
    assert loss_text(nan, secure=True) == "loss not reported under secure aggregation"
    assert loss_text(nan) == "loss not computed under DP-SGD"
    assert loss_text(0.5, secure=True) == "loss 0.5000 (secure aggregation)"


def test_json_log_lines_are_strict_json() -> None:
    import logging

    record = logging.LogRecord("confide_server.rounds", logging.INFO, "f", 1, "m", None, None)
    record.fields = {"event": "round_committed", "epsilon": float("nan"), "round": 3}
    doc = json.loads(JsonFormatter().format(record))
    assert doc["event"] == "round_committed"
    assert doc["epsilon"] is None  # strict JSON: no NaN
    assert doc["round"] == 3


# -- real processes over real HTTP ----------------------------------------------------------


@pytest.fixture
def make_procs() -> Iterator[Callable[[JobFiles], Procs]]:
    """Real server and site processes of a job (tests.e2e.conftest), killed at teardown."""
    yield from reaped_procs()


def _post(url: str, body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=120)


def _job(tmp: Path, clients: int, **kw: Any) -> JobFiles:
    opts = SimulationOptions(clients=clients, rounds=1, seed=3, train_deadline=300.0, **kw)
    return prepare_job(tmp, opts)


def _logged_server(procs: Procs, log_file: Path, *log_format: str) -> subprocess.Popen[bytes]:
    """The shipped ``confide-server run`` (no test wrapper), logging to ``log_file``.

    Returns once the server answers ``/v1/status`` (or has exited).
    """
    cmd = [*SERVER, "run", "--config", str(procs.files.config), "--log-file", str(log_file)]
    server = procs.launcher.spawn("server", [*cmd, *log_format])
    procs.wait_until(lambda: procs.status() is not None or server.poll() is not None)
    return server


def _open_round(procs: Procs) -> dict[str, Any]:
    def open_now() -> bool:
        doc = procs.status()
        return doc is not None and any(r["status"] == "open" for r in doc["rounds"])

    procs.wait_until(open_now)
    doc = procs.status()
    assert doc is not None
    return doc


@pytest.mark.slow
def test_second_server_refused_and_sigkilled_servers_successor_starts(
    tmp_path: Path, make_procs: Any
) -> None:
    files = _job(tmp_path, 1, min_clients=1)
    procs: Procs = make_procs(files)
    first = procs.server()
    second = _run("run", "--config", str(files.config))
    assert second.returncode == 2, second.stderr
    assert f"in use by pid {first.pid}" in second.stderr
    assert LOCK_FILE in second.stderr
    assert "Traceback" not in second.stderr
    # new-job is refused while the server runs (it takes the same lock).
    refused = _run("new-job", "--config", str(files.config), "--abandon")
    assert refused.returncode == 2
    assert f"in use by pid {first.pid}" in refused.stderr
    first.send_signal(signal.SIGKILL)
    first.wait(60)
    successor = procs.server()  # the kernel released the lock with the dead process
    assert successor.poll() is None


@pytest.mark.slow
def test_operator_abort_over_http_needs_the_token_and_is_logged(
    tmp_path: Path, make_procs: Any
) -> None:
    files = _job(tmp_path, 2, min_clients=2)
    procs: Procs = make_procs(files)
    log_file = tmp_path / "server.log"
    _logged_server(procs, log_file)
    t1, t2 = procs.tokens(2)
    procs.client(1, t1)
    site2 = procs.client(2, t2, "--die-in-round", "1")  # round 1 then waits 300 s for it
    procs.wait_exit(site2)
    _open_round(procs)
    url = files.server_url + "/v1/operator/abort"
    status, body = _post(url, {"reason": "maintenance"}, None)
    assert status == 401
    assert body["error"]["code"] == "operator_token_required"
    status, body = _post(url, {"reason": "maintenance"}, "wrong")
    assert status == 401
    doc = procs.status()
    assert doc is not None
    assert doc["rounds"][0]["status"] == "open"  # refused: no effect
    cfg = files.job
    assert cfg is not None
    done = _run("abort", "--config", str(files.config), "--reason", "maintenance")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("round 1 aborted (aborted by the operator: maintenance)")
    doc = procs.status()
    assert doc is not None
    assert doc["rounds"][0]["status"] == "aborted"
    assert doc["rounds"][0]["reason"] == "aborted by the operator: maintenance"
    again = _run("abort", "--config", str(files.config))
    assert again.returncode == 2
    assert "no round is open" in again.stderr
    text = log_file.read_text()
    assert "round 1 opened: stage train, cohort of 2 sites" in text
    assert "round 1 aborted at stage train: aborted by the operator: maintenance" in text
    assert operator_token(cfg.server.state_dir) not in text
    assert t1 not in text
    assert t2 not in text


@pytest.mark.slow
def test_revoked_site_is_refused_its_round_aborted_and_json_logs_one_line_per_stage(
    tmp_path: Path, make_procs: Any
) -> None:
    files = _job(tmp_path, 3, min_clients=2)
    procs: Procs = make_procs(files)
    log_file = tmp_path / "server.jsonl"
    server = _logged_server(procs, log_file, "--log-format", "json")
    tokens = procs.tokens(3)
    site_log = tmp_path / "site-1.jsonl"
    s1 = procs.client(1, tokens[0], "--log-file", str(site_log), "--log-format", "json")
    s3 = procs.client(3, tokens[2])
    s2 = procs.client(2, tokens[1], "--die-in-round", "1")  # holds round 1 open
    procs.wait_exit(s2)
    _open_round(procs)
    cfg = files.job
    assert cfg is not None
    revoke = files.server_url + "/v1/operator/revoke"
    status, _ = _post(revoke, {"client_id": "site-2"}, None)
    assert status == 401
    status, body = _post(revoke, {"client_id": "nobody"}, operator_token(cfg.server.state_dir))
    assert status == 404
    assert "no enrolled site 'nobody'" in body["error"]["message"]
    done = _run("revoke", "--config", str(files.config), "--client-id", "site-2")
    assert done.returncode == 0, done.stderr
    assert "site 'site-2' revoked" in done.stdout
    assert "round 1 (its cohort held the site) aborted" in done.stdout
    # The revoked site comes back with its enrolled key: refused (403), it exits non-zero.
    back = procs.client(2, None)
    assert procs.wait_exit(back) != 0
    assert "revoked by the job's operator" in procs.log("site-2")
    assert procs.wait_exit(server, timeout=180) == 0, procs.all_logs()
    assert procs.wait_exit(s1) == 0
    assert procs.wait_exit(s3) == 0
    final = procs.final_status()
    assert final["status"] == "finished"
    assert [r["status"] for r in final["rounds"]] == ["aborted", "committed"]
    assert final["rounds"][0]["reason"] == "site 'site-2' was revoked by the operator"
    assert "site-2" not in final["rounds"][1]["cohort"]
    assert final["revoked"] == {"site-2": "revoked by the operator"}
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    events = [(d.get("event"), d.get("round"), d.get("stage")) for d in lines if "event" in d]
    assert events == [
        ("round_opened", 1, "train"),
        ("round_aborted", 1, "train"),
        ("round_opened", 2, "train"),
        ("stage_closed", 2, "train"),
        ("round_committed", 2, "evaluate"),
        ("job_ended", None, None),
    ]
    aborted = next(d for d in lines if d.get("event") == "round_aborted")
    assert aborted["reason"] == "site 'site-2' was revoked by the operator"
    assert aborted["privacy_spent"] is False
    committed = next(d for d in lines if d.get("event") == "round_committed")
    assert isinstance(committed["accuracy"], float)
    raw = log_file.read_text() + site_log.read_text()
    for secret in (*tokens, operator_token(cfg.server.state_dir)):
        assert secret not in raw
    site_lines = [json.loads(line) for line in site_log.read_text().splitlines()]
    messages = [d["message"] for d in site_lines]
    assert any("round 2 trained on" in m for m in messages), messages
    assert all("nan" not in m for m in messages)
    # new-job on the finished job archives the state; the next run starts anew.
    new = _run("new-job", "--config", str(files.config))
    assert new.returncode == 0, new.stderr
    assert "archived the previous job's state to" in new.stdout
    status_now = _run("status", "--config", str(files.config))
    assert status_now.stdout.startswith("no state yet")
    archives = list(
        (cfg.server.state_dir.parent / f"{cfg.server.state_dir.name}.archive").iterdir()
    )
    assert len(archives) == 1
    assert (archives[0] / "confide.sqlite").exists()


def test_secagg_config_says_whether_one_of_three_sites_may_drop(tmp_path: Path) -> None:
    strict = _config(tmp_path / "strict", secagg__enabled=True)
    ok, line = secagg_tolerance(strict) or (None, "")
    assert ok is False
    assert "threshold t=3 = n, so no site may drop" in line
    assert "dropout_fraction (3 sites: 0.34" in line
    tolerant = _config(
        tmp_path / "tolerant",
        secagg__enabled=True,
        secagg__adversarial_fraction=0.0,
        secagg__dropout_fraction=0.34,
    )
    assert secagg_tolerance(tolerant) == (
        True,
        "SecAgg+ with a cohort of 3: threshold t=2, a round survives 1 dropped site(s)",
    )
    assert secagg_tolerance(_config(tmp_path / "plain")) is None
