"""Differential privacy end to end: real server and client processes over loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from confide.privacy.accountant import account, client_poisson_event, dpsgd_event
from confide_server.config import load_config
from confide_server.engine.privacy import BUDGET_EXHAUSTED, read_privacy
from confide_server.simulate import SimulationOptions, prepare_job
from confide_server.store import Store
from tests.e2e.conftest import Procs


def _job(tmp: Path, **kw: Any) -> Any:
    base: dict[str, Any] = {"clients": 3, "rounds": 3, "seed": 5, "train_deadline": 30.0}
    return prepare_job(tmp, SimulationOptions(**{**base, **kw}))


def _stored(files: Any) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]], list[Any]]:
    store = Store(load_config(files.config).server.database)
    try:
        summary, per_round = read_privacy(store)
        return summary, per_round, store.rounds()
    finally:
        store.close()


@pytest.mark.slow
def test_dpsgd_budget_stops_a_real_federation(tmp_path: Path, procs_factory: Any) -> None:
    z, q, steps = 1.5, 0.25, 4
    eps = [account([dpsgd_event(q, z, steps * k)], 1e-5).epsilon for k in (1, 2, 3)]
    budget = (eps[1] + eps[2]) / 2  # two of the three planned rounds fit
    files = _job(
        tmp_path,
        dp="sample",
        noise_multiplier=z,
        sampling_rate=q,
        local_steps=steps,
        epsilon_budget=budget,
    )
    procs: Procs = procs_factory(files)
    doc = procs.run_to_end()
    assert doc["status"] == "finished"
    assert doc["reason"] == BUDGET_EXHAUSTED
    assert [r["status"] for r in doc["rounds"]] == ["committed", "committed"]
    assert doc["privacy"]["epsilon"] == pytest.approx(eps[1], rel=1e-9)
    assert doc["privacy"]["epsilon"] <= budget
    assert [r["privacy"]["epsilon"] for r in doc["rounds"]] == pytest.approx(eps[:2], rel=1e-9)
    assert "train_loss" not in doc["rounds"][0]["metrics"]  # DP clients report no raw loss


@pytest.mark.slow
def test_server_killed_after_release_restarts_without_redrawing(
    tmp_path: Path, procs_factory: Any
) -> None:
    z = 3.0
    files = _job(tmp_path, dp="central", noise_multiplier=z, clip_norm=0.5)
    procs: Procs = procs_factory(files)
    # killed right after round 2's noised model and privacy record were committed
    server = procs.server("stage_committed:2")
    clients = procs.sites(3)
    procs.killed(server)
    _, before, rows_before = _stored(files)
    released = {r.round: r.new_model for r in rows_before if r.new_model}
    assert sorted(released) == [1, 2]
    assert sorted(before) == [1, 2]
    server = procs.server()
    assert procs.wait_exit(server) == 0, procs.all_logs()
    assert [procs.wait_exit(c) for c in clients] == [0, 0, 0], procs.all_logs()
    summary, after, rows = _stored(files)
    assert {r.round: r.new_model for r in rows if r.round in released} == released
    assert [r.status for r in rows] == ["committed"] * 3
    assert {k: after[k] for k in before} == before
    assert summary is not None
    assert summary["epsilon"] == pytest.approx(
        account([client_poisson_event(1.0, z, 3)], 1e-5).epsilon, rel=1e-9
    )
    # and a restart of the finished run reports the same epsilon
    doc = procs.final_status()
    assert doc["privacy"]["epsilon"] == summary["epsilon"]


@pytest.mark.slow
def test_sample_dp_server_down_longer_than_a_stage_keeps_epsilon(
    tmp_path: Path, procs_factory: Any
) -> None:
    """A SIGKILL, then downtime beyond the train deadline: no round lost, epsilon unchanged.

    With absolute deadlines the restarted server closed the stage at once with 2 of 3
    updates (< min_clients = 3), aborted the round and accounted a third round start.
    """
    z, q, steps = 1.5, 0.25, 4
    files = _job(
        tmp_path,
        rounds=2,
        min_clients=3,
        dp="sample",
        noise_multiplier=z,
        sampling_rate=q,
        local_steps=steps,
    )
    procs: Procs = procs_factory(files)
    # 2 of 3 train updates acknowledged, then the injected downtime, longer than the 30 s
    # train deadline.
    doc = procs.run_to_end("submission_committed:2", downtime=35.0)
    assert [r["status"] for r in doc["rounds"]] == ["committed", "committed"]
    assert [r["metrics"]["train_clients"] for r in doc["rounds"]] == [3, 3]
    expected = account([dpsgd_event(q, z, steps * 2)], 1e-5).epsilon
    assert doc["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)


def _simulated_privacy(out: Path) -> tuple[Any, Any, list[Any], list[Any]]:
    """A ``simulate --out out`` run's privacy summary and per-round epsilons, its rounds, and
    the (round, params) rows of its distributed-noise rounds."""
    store = Store(load_config(out / "job.toml").server.database)
    try:
        summary, per_round = read_privacy(store)
        rows = store.rounds()
        with store.transaction() as cur:
            stored = cur.execute("SELECT round, params FROM ddg_rounds ORDER BY round").fetchall()
    finally:
        store.close()
    return summary, per_round, rows, stored


@pytest.mark.slow
def test_simulate_dp_distributed_runs_under_secagg(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``confide-server simulate --dp distributed``: real processes, DDG shares under SecAgg+."""
    from confide.privacy.accountant import PrivacyEvent
    from confide.privacy.client_dp import DDGParams, ddg_event
    from confide_server.simulate import main_simulate

    out = tmp_path / "sim"
    argv = ["--dp", "distributed", "--rounds", "2", "--noise-multiplier", "0.5"]
    assert main_simulate([*argv, "--out", str(out), "--timeout", "120"]) == 0
    printed = capsys.readouterr().out
    assert "distributed discrete Gaussian" in printed
    summary, per_round, rows, stored = _simulated_privacy(out)
    assert [r.status for r in rows] == ["committed", "committed"]
    assert all(r.metrics and r.metrics["train_clients"] == 3 for r in rows)
    assert summary is not None
    assert summary["mode"] == "distributed"
    events: list[PrivacyEvent] = [ddg_event(DDGParams(**json.loads(p))) for _, p in stored]
    assert [r for r, _ in stored] == [1, 2]
    assert summary["epsilon"] == pytest.approx(account(events, 1e-5).epsilon, rel=1e-9)
    assert sorted(per_round) == [1, 2]


def test_simulate_distributed_dpsgd_runs_under_secagg(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--dp sample_distributed``: real processes, one noised DP-SGD step per secure round."""
    from confide.privacy.distributed_dpsgd import SampleDDGParams, event
    from confide_server.simulate import main_simulate

    out = tmp_path / "sim"
    argv = ["--dp", "sample_distributed", "--rounds", "2", "--noise-multiplier", "1.0"]
    argv += ["--sampling-rate", "0.5", "--lr", "1.0"]
    assert main_simulate([*argv, "--out", str(out), "--timeout", "240"]) == 0
    printed = capsys.readouterr().out
    assert "distributed DP-SGD" in printed
    summary, per_round, rows, stored = _simulated_privacy(out)
    assert [r.status for r in rows] == ["committed", "committed"]
    for r in rows:
        assert r.metrics is not None
        assert r.metrics["train_clients"] == 3
        assert r.metrics["train_examples"] == 3  # weight 1 per site: no record counts
        assert r.metrics["sample_ddg"]["honest_shares"] >= 1
    assert summary is not None
    assert summary["mode"] == "sample_distributed"
    assert summary["unit"] == "patient"
    # 456 training records, one per patient: E = q * 456, fixed before the job.
    assert summary["expected_batch_size"] == pytest.approx(0.5 * 456)
    params = [SampleDDGParams(**json.loads(p)) for _, p in stored]
    assert [r for r, _ in stored] == [1, 2]
    assert all(p.effective_noise_multiplier >= 1.0 * (1 - 1e-9) for p in params)
    assert summary["epsilon"] == pytest.approx(
        account([event(p) for p in params], 1e-5).epsilon, rel=1e-9
    )
    assert sorted(per_round) == [1, 2]
