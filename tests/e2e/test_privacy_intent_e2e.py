"""The server's privacy ledger never under-counts a release across a SIGKILL at the unmask.

Real server and site processes over loopback, distributed DP (DDG) under SecAgg+. The server
runs through the test-only entry point (:mod:`tests.e2e.entry`), whose crash hook SIGKILLs
the process at a named durable step: ``after_unmask`` is right after the SecAgg+ sum was
unmasked and before the transaction that stores the model and charges the round. The
restarted server finds the write-ahead intent pending and charges the round once (then asks
the unmask again; the round aborts if the answers never come); its epsilon then equals what
every site's own ledger (``privacy-ledger.json``) charged.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from confide.client.policy import PrivacyLedger
from confide.privacy.accountant import account
from confide_server.config import load_config
from confide_server.engine.privacy import read_privacy
from confide_server.ledger import load_public_key, read_ledger, verify_ledger
from confide_server.simulate import JobFiles, SimulationOptions, prepare_job
from confide_server.store import Store
from tests.e2e.conftest import Procs
from tests.e2e.test_secagg_e2e import TOLERANT

DELTA = 1e-5


def _job(tmp: Path) -> JobFiles:
    opts = SimulationOptions(
        clients=3,
        rounds=2,
        seed=11,
        min_clients=2,
        secagg=True,
        extra_secagg=dict(TOLERANT),
        dp="distributed",
        noise_multiplier=1.0,
        delta=DELTA,
    )
    return prepare_job(tmp, opts)


def _server_privacy(files: JobFiles) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    store = Store(load_config(files.config).server.database)
    try:
        return read_privacy(store)
    finally:
        store.close()


def _check_sites(files: JobFiles, epsilon: float) -> int:
    """Check the server never charged less than any site; return how many match it exactly.

    A site's ledger (``privacy-ledger.json``) holds the rounds whose masked input left it.
    The server must have charged each of those rounds with the same event; a site that
    was in every charged round has exactly the server's epsilon (one that dropped out of a
    round under load has less, which is right: its data was not in that sum).
    """
    store = Store(load_config(files.config).server.database)
    try:
        charged = {r.round: r.events for r in store.privacy_rounds()}
    finally:
        store.close()
    released: set[int] = set()
    full = 0
    for k in (1, 2, 3):
        path = files.workdir / "clients" / f"site-{k}" / "privacy-ledger.json"
        site = {int(e["round"]): e["event"] for e in json.loads(path.read_text())["rounds"]}
        assert set(site) <= set(charged), (k, sorted(site), sorted(charged))
        for r, event in site.items():
            assert charged[r] == [event], (k, r)
        released |= set(site)
        site_epsilon = account(list(PrivacyLedger(path.parent).events), DELTA).epsilon
        assert site_epsilon <= epsilon * (1 + 1e-9), (k, site_epsilon, epsilon)
        if set(site) == set(charged):
            full += 1
            assert site_epsilon == pytest.approx(epsilon, rel=1e-9)
    assert released == set(charged)  # and nothing no site released
    return full


def _check_ledger(files: JobFiles, status: dict[str, Any], epsilon: float) -> None:
    state = load_config(files.config).server.state_dir
    lines = read_ledger(state / "ledger.jsonl")
    result = verify_ledger(lines, load_public_key(str(state / "release_key.pub")))
    assert result.ok, result.describe()
    committed = [r for r in status["rounds"] if r["status"] == "committed"]
    assert [x["entry"]["round"] for x in lines] == [r["round"] for r in committed]
    assert [x["entry"]["model_hash"] for x in lines] == [r["new_model"] for r in committed]
    # The last signed entry carries the job's epsilon, charged aborted rounds included.
    assert lines[-1]["entry"]["dp"]["epsilon"] == pytest.approx(epsilon, rel=1e-12)


def _start(procs: Procs, crash_at: str) -> list[Any]:
    server = procs.server(crash_at)
    clients = procs.sites(3)
    procs.killed(server, timeout=300)
    return clients


def _finish(procs: Procs, clients: list[Any]) -> dict[str, Any]:
    server = procs.server()
    assert procs.wait_exit(server, timeout=300) == 0, procs.all_logs()
    assert [procs.wait_exit(c, timeout=120) for c in clients] == [0, 0, 0], procs.all_logs()
    return procs.final_status()


@pytest.mark.slow
def test_sigkill_at_the_unmask_with_the_sites_gone_charges_the_aborted_round(
    tmp_path: Path, procs_factory: Any
) -> None:
    """The gap this closes: the re-asked unmask gets no answers, the round aborts."""
    files = _job(tmp_path)
    procs: Procs = procs_factory(files)
    clients = _start(procs, "after_unmask:1")
    # Killed after the unmask of round 1, before the storing transaction: not charged yet,
    # but the write-ahead intent is on disk.
    _, per_round = _server_privacy(files)
    assert per_round == {}
    with sqlite3.connect(load_config(files.config).server.database) as conn:
        (intent,) = conn.execute("SELECT value FROM meta WHERE key='privacy_intent'").fetchone()
    assert '"round": 1' in intent
    for c in clients:  # the sites die too while the server is down (their secrets with them)
        c.send_signal(signal.SIGKILL)
        assert procs.wait_exit(c) == -signal.SIGKILL
    server = procs.server()
    clients = [procs.client(k, None) for k in (1, 2, 3)]  # back, enrolled, without round 1
    assert procs.wait_exit(server, timeout=300) == 0, procs.all_logs()
    assert [procs.wait_exit(c, timeout=120) for c in clients] == [0, 0, 0], procs.all_logs()
    status = procs.final_status()
    assert status["status"] == "finished"
    assert [r["status"] for r in status["rounds"]] == ["aborted", "committed", "committed"]
    summary, per_round = _server_privacy(files)
    assert summary is not None
    # Each site charged the rounds whose masked input left it; the server all of them.
    _check_sites(files, summary["epsilon"])
    assert sorted(per_round) == [1, 2, 3]  # the aborted round is charged, each round once
    assert status["privacy"]["epsilon"] == pytest.approx(summary["epsilon"], rel=1e-12)
    assert procs.log("server").count("was stopped between computing its noised aggregate") == 1
    _check_ledger(files, status, summary["epsilon"])


@pytest.mark.slow
def test_sigkill_between_unmask_and_its_commit_charges_the_round_once(
    tmp_path: Path, procs_factory: Any
) -> None:
    """The sites stay: the restarted server charges round 1, asks the unmask again, commits."""
    files = _job(tmp_path)
    procs: Procs = procs_factory(files)
    clients = _start(procs, "after_unmask:1")
    assert _server_privacy(files)[1] == {}
    status = _finish(procs, clients)
    assert status["status"] == "finished"
    assert [r["status"] for r in status["rounds"]] == ["committed", "committed"]
    assert procs.log("server").count("was stopped between computing its noised aggregate") == 1
    summary, per_round = _server_privacy(files)
    assert sorted(per_round) == [1, 2]  # charged at restart, not again at the commit
    assert per_round[1]["epsilon_round"] == per_round[2]["epsilon_round"]
    assert summary is not None
    _check_sites(files, summary["epsilon"])
    _check_ledger(files, status, summary["epsilon"])


@pytest.mark.slow
def test_sigkill_after_the_unmask_commit_charges_the_round_exactly_once(
    tmp_path: Path, procs_factory: Any
) -> None:
    files = _job(tmp_path)
    procs: Procs = procs_factory(files)
    # advertise, share, mask, unmask: the 4th stage commit stores round 1's unmasked model
    clients = _start(procs, "stage_committed:4")
    _, per_round = _server_privacy(files)
    assert sorted(per_round) == [1]  # charged in the storing transaction
    status = _finish(procs, clients)
    rounds = status["rounds"]
    assert [r["status"] for r in rounds] == ["committed", "committed"]
    assert "was stopped between computing" not in procs.log("server")
    summary, after = _server_privacy(files)
    assert sorted(after) == [1, 2]
    assert after[1] == per_round[1]  # never re-charged
    assert summary is not None
    _check_sites(files, summary["epsilon"])
    _check_ledger(files, status, summary["epsilon"])
