"""Attack 5 over real HTTP: a malicious operator shows different sites different rosters.

A real ``confide-server`` process, five real ``confide client`` processes in malicious-server
mode (``[secagg] consistency_check = true``; each site's policy requires it) and, between
them, the operator's proxy (:mod:`tests.security.split_view_proxy`, a real process). The
parameters the server derives for five sites (complete graph, ``t = 4``, up to 1 dropout,
``C = 1``) give a roster quorum of ``floor((5 + 1) / 2) + 1 = 4``.

The attack: three of the victim's peers are told the victim dropped (they would release
its mask-key shares), the victim and the two others that everyone is alive (they would
release its self-mask shares); each roster is self-consistent and each group gets back the
signatures of its own roster. Three (and two) signatures are below the quorum, so every honest site
refuses to unmask (``too-few-signatures`` in its log), the operator holds no share of the
victim of either kind (fewer than ``t``), and nothing is committed. The control (the same
processes, honest forwarding) commits the round, and the proxy then records the unmask
uploads it passed, so the counting is real.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confide_server.simulate import JobFiles, SimulationOptions, prepare_job
from tests.e2e.conftest import ENTRY, Procs

N = 5
VICTIM = "site-1"
T = 4  # what the server derives for five sites at these fractions (asserted below)
SECAGG = {
    "consistency_check": True,
    "adversarial_fraction": 0.1,
    "dropout_fraction": 0.34,
    "consistency": 120.0,  # generous: the stage must not close while the attack runs
    "unmask": 120.0,
    "advertise": 60.0,
    "share": 60.0,
}
POLICY = """\
allow_no_dp = true              # the round's privacy is not what this test is about
dp_kinds = ["central"]          # (and no accountant to load)
peer_trust = "tofu"             # certified peers: tests/security/test_certified_peers.py
require_consistency_check = true
adversarial_fraction = 0.1
dropout_fraction = 0.34
min_cohort_size = 3
"""


def _job(tmp: Path) -> JobFiles:
    opts = SimulationOptions(
        clients=N,
        rounds=1,
        seed=5,
        min_clients=N,
        secagg=True,
        extra_secagg=dict(SECAGG),
        train_deadline=120.0,
    )
    return prepare_job(tmp, opts)


class _Run:
    """The server, the operator's proxy and the five sites of one job."""

    def __init__(self, tmp: Path, attack: bool) -> None:
        self.files = _job(tmp)
        self.procs = Procs(self.files)
        self.events = tmp / "proxy-events.jsonl"
        self.events.touch()
        self.policy = tmp / "site-policy.toml"
        self.policy.write_text(POLICY)
        self.attack = attack
        self.sites: list[Any] = []

    def start(self) -> None:
        procs = self.procs
        procs.server()
        cmd = [
            sys.executable,
            "-m",
            "tests.security.split_view_proxy",
            "--upstream",
            self.files.server_url,
            "--log",
            str(self.events),
            "--victim",
            VICTIM,
            *(["--attack"] if self.attack else []),
        ]
        proxy = procs.launcher.spawn("proxy", cmd)
        procs.wait_until(
            lambda: "proxy listening on" in procs.log("proxy") or proxy.poll() is not None
        )
        url = procs.log("proxy").split("proxy listening on ")[1].split()[0]
        tokens = procs.tokens(N)
        for k, tok in enumerate(tokens, start=1):
            cmd = [
                *ENTRY,
                "site",
                "--server",
                url,
                "--data",
                str(self.files.site_train[k - 1]),
                "--state",
                str(self.files.workdir / "clients" / f"site-{k}"),
                "--retry-timeout",
                "120",
                "--poll-wait",
                "2",
                "--policy",
                str(self.policy),
                "--token",
                tok,
                "--client-id",
                f"site-{k}",
            ]
            self.sites.append(procs.launcher.spawn(f"site-{k}", cmd))

    def read_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[list[_Run]]:
    made: list[_Run] = []
    yield made
    for r in made:
        r.procs.kill_all()


def _shares(uploads: list[dict[str, Any]], kind: str, owner: str) -> int:
    return sum(1 for u in uploads if owner in dict(u["body"][kind]))


@pytest.mark.slow
@pytest.mark.timeout(900)  # seven processes on a busy machine; every wait has its own deadline
def test_split_view_over_http_is_refused_and_the_operator_collects_nothing(
    tmp_path: Path, runs: list[_Run]
) -> None:
    run = _Run(tmp_path, attack=True)
    runs.append(run)
    run.start()
    procs = run.procs
    sites = [f"site-{k}" for k in range(1, N + 1)]

    def refused(cid: str) -> bool:
        return "too-few-signatures" in procs.log(cid)

    procs.wait_until(lambda: all(refused(c) for c in sites), timeout=600.0)
    events = run.read_events()
    shown = {e["client"]: e["survivors"] for e in events if e["event"] == "consistency_task"}
    # The split really happened: two self-consistent rosters, the victim dead in one.
    assert set(shown) == set(sites), events
    rosters = {tuple(s) for s in shown.values()}
    assert rosters == {tuple(sites), tuple(c for c in sites if c != VICTIM)}
    signed = [e for e in events if e["event"] == "signature"]
    assert {e["client"] for e in signed} == set(sites)  # every site signed the roster it saw
    assert {e["client"] for e in events if e["event"] == "unmask_task"} == set(sites)
    # Every honest site refused the unmask request: 3 (or 2) signatures, the quorum is 4.
    for cid in sites:
        assert re.search(r"[23] consistency signatures, at least 4 needed", procs.log(cid))
    # What the operator received: no unmask upload at all, so no share of the victim of
    # either kind (the attack needs t of both).
    uploads = [e for e in events if e["event"] == "unmask_upload"]
    assert uploads == []
    assert _shares(uploads, "self_shares", VICTIM) < T
    assert _shares(uploads, "key_shares", VICTIM) < T
    status = procs.status()
    assert status is not None
    assert all(r["status"] != "committed" for r in status["rounds"]), status


@pytest.mark.slow
@pytest.mark.timeout(900)  # seven processes on a busy machine; every wait has its own deadline
def test_control_honest_forwarding_commits(tmp_path: Path, runs: list[_Run]) -> None:
    run = _Run(tmp_path, attack=False)
    runs.append(run)
    run.start()
    procs = run.procs
    assert [procs.wait_exit(p, timeout=600.0) for p in run.sites] == [0] * N, procs.all_logs()
    events = run.read_events()
    uploads = [e for e in events if e["event"] == "unmask_upload"]
    # One roster for everyone, and the proxy saw the shares pass: the counting works.
    assert {tuple(e["survivors"]) for e in events if e["event"] == "consistency_task"} == {
        tuple(f"site-{k}" for k in range(1, N + 1))
    }
    assert _shares(uploads, "self_shares", VICTIM) >= T
    assert _shares(uploads, "key_shares", VICTIM) == 0
    rows = procs.final_status()["rounds"]
    assert [r["status"] for r in rows] == ["committed"], rows
    assert rows[0]["metrics"]["secagg"]["t"] == T
