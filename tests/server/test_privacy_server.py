"""Differential privacy in the round engine: budget, write-ahead accounting, central noise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.errors import ConfigError
from confide.privacy.accountant import account, client_poisson_event, dpsgd_event
from confide.protocol.manifest import decode_tensors
from confide_server.app import open_engine
from confide_server.cli import main as server_main
from confide_server.config import Config
from confide_server.engine.privacy import BUDGET_EXHAUSTED, JobPrivacy, PrivacyConfig, read_privacy
from confide_server.engine.rounds import RoundEngine
from tests.server.conftest import FakeClock
from tests.server.util import (
    Crash,
    delta_body,
    enrolled_engine,
    eval_body,
    tiny_manifest,
    write_job,
)

MANIFEST = tiny_manifest()
Z = 2.0


def _config(tmp: Path, rounds: int = 3, **privacy: Any) -> Config:
    kw: dict[str, Any] = {
        "job__cohort_size": 3,
        "job__min_clients": 2,
        "job__wait_for_clients": 3,
        "job__rounds": rounds,
    }
    kw.update({f"privacy__{k}": v for k, v in privacy.items()})
    return write_job(tmp, **kw)


def _train_answers(eng: RoundEngine) -> None:
    """The three sites' round-1 updates."""
    for cid in "abc":
        eng.commit_submission(eng.prepare(cid, 1, "train", delta_body(MANIFEST, 1.0)), f"n{cid}")


def _killed_after_noised_write(cfg: Config, clock: FakeClock) -> RoundEngine:
    """Round 1 of a central job, killed between its noised model's write and its transaction."""
    eng = enrolled_engine(cfg, clock, crash_at="model_written")
    assert eng.tick()
    _train_answers(eng)
    with pytest.raises(Crash):
        eng.tick()  # the noised blob exists on disk, unregistered: the intent is pending
    return eng


def _round(engine: RoundEngine, r: int, value: float = 10.0) -> None:
    """Play one full round from its start (all three clients answer)."""
    assert engine.tick()
    for cid in "abc":
        prepared = engine.prepare(cid, r, "train", delta_body(MANIFEST, value))
        engine.commit_submission(prepared, nonce=f"{cid}-train-{r}")
    assert engine.tick()
    for cid in "abc":
        prepared = engine.prepare(cid, r, "evaluate", eval_body(0.5))
        engine.commit_submission(prepared, nonce=f"{cid}-eval-{r}")
    assert engine.tick()


def _model(engine: RoundEngine, sha: str | None = None) -> np.ndarray:
    path = engine.store.model_path(sha or engine.current_model)
    assert path is not None
    return decode_tensors(MANIFEST, engine.blobs.read(path))[0]


def test_budget_stops_the_job_before_it_is_exceeded(tmp_path: Path) -> None:
    eps2 = account([client_poisson_event(1.0, Z, 2)], 1e-5).epsilon
    eps3 = account([client_poisson_event(1.0, Z, 3)], 1e-5).epsilon
    budget = (eps2 + eps3) / 2  # room for exactly two rounds
    cfg = _config(tmp_path, rounds=5, mode="central", noise_multiplier=Z, epsilon_budget=budget)
    eng = enrolled_engine(cfg, FakeClock())
    _round(eng, 1)
    _round(eng, 2)
    assert eng.status == "running"
    assert eng.tick()  # the budget check refuses round 3: the job finishes cleanly
    assert eng.status == "finished"
    assert eng.status_reason == BUDGET_EXHAUSTED
    assert eng.store.get_round(3) is None
    assert eng.task_for("a").action == "finished"
    doc = eng.status_dict()
    assert doc["reason"] == BUDGET_EXHAUSTED
    assert doc["rounds_completed"] == 2
    assert doc["privacy"]["epsilon"] == pytest.approx(eps2, rel=1e-6)
    assert doc["privacy"]["epsilon"] <= budget
    assert [r["privacy"]["epsilon"] for r in doc["rounds"]] == pytest.approx(
        [account([client_poisson_event(1.0, Z, 1)], 1e-5).epsilon, eps2], rel=1e-6
    )
    assert doc["rounds"][1]["metrics"]["epsilon"] == pytest.approx(eps2, rel=1e-6)


def test_central_noise_clip_and_scale_through_the_server(tmp_path: Path) -> None:
    # every delta (10 per coordinate, norm 22) is clipped to C = 0.5 by the server
    z, c = 0.3, 0.5
    cfg = _config(tmp_path, rounds=1, mode="central", noise_multiplier=z, clip_norm=c)
    eng = enrolled_engine(cfg, FakeClock())
    base = _model(eng)
    _round(eng, 1)
    step = _model(eng) - base
    clipped = np.full(MANIFEST.size, c / np.sqrt(MANIFEST.size))
    # mean of 3 identical clipped deltas + N(0, (z C)^2) / 3: 5 sigma = 0.25 per coordinate
    assert np.abs(step - clipped).max() < 5 * z * c / 3
    # the noise itself, on a wide vector: N(0, (z C)^2) on the sum, divided by the cohort
    priv = JobPrivacy(PrivacyConfig(mode="central", noise_multiplier=3.0, clip_norm=c), 1, 1)
    mean = priv.central_mean([np.zeros(200_000, np.float32)] * 4, cohort_size=4)
    assert float(mean.std()) == pytest.approx(3.0 * c / 4, rel=0.02)
    priv.noise_multiplier = 0.0
    big = np.full(1000, 5.0, np.float32)
    exact = priv.central_mean([big, -big, big], cohort_size=3)
    np.testing.assert_allclose(np.linalg.norm(exact), c / 3, rtol=1e-5)


def test_restart_after_release_never_redraws_noise_nor_changes_epsilon(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=2, mode="central", noise_multiplier=Z)
    clock = FakeClock()
    eng = enrolled_engine(cfg, clock, crash_at="stage_committed")
    assert eng.tick()
    _train_answers(eng)
    with pytest.raises(Crash):
        eng.tick()  # the noised model and the privacy record are committed, then "SIGKILL"
    row = eng.store.get_round(1)
    assert row is not None
    assert row.new_model is not None
    assert row.stage == "evaluate"
    released = row.new_model
    _, before = read_privacy(eng.store)
    eng.store.close()
    eng = enrolled_engine(cfg, clock)  # restart
    assert eng.store.get_round(1).new_model == released  # type: ignore[union-attr]
    assert eng.task_for("a").to_json()["model_sha256"] == released
    for cid in "abc":
        eng.commit_submission(eng.prepare(cid, 1, "evaluate", eval_body(0.5)), f"e{cid}")
    assert eng.tick()
    assert eng.current_model == released  # the released draw is the committed model
    _round(eng, 2)
    summary, after = read_privacy(eng.store)
    assert after[1] == before[1]
    assert summary is not None
    assert summary["epsilon"] == pytest.approx(
        account([client_poisson_event(1.0, Z, 2)], 1e-5).epsilon, rel=1e-9
    )
    finished = eng.status_dict()
    eng.store.close()
    eng = enrolled_engine(cfg, clock)  # a restart of the finished run changes nothing
    again = eng.status_dict()
    assert again["privacy"] == finished["privacy"]
    assert [r["privacy"] for r in again["rounds"]] == [r["privacy"] for r in finished["rounds"]]
    assert eng.privacy.accountant.epsilon() == pytest.approx(summary["epsilon"], rel=1e-9)


def test_crash_before_release_charges_the_intent_and_never_redraws(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=1, mode="central", noise_multiplier=Z)
    clock = FakeClock()
    eng = _killed_after_noised_write(cfg, clock)
    assert read_privacy(eng.store)[1] == {}
    eng.store.close()
    eng = enrolled_engine(cfg, clock)  # the restart charges the intent and aborts the round
    _, per_round = read_privacy(eng.store)
    assert list(per_round) == [1]
    assert eng.store.get_round(1).status == "aborted"  # type: ignore[union-attr]
    _round(eng, 2)  # the job goes on; round 1 is never recomputed (no second draw)
    _, per_round = read_privacy(eng.store)
    assert list(per_round) == [1, 2]


def test_sample_mode_ships_dpsgd_and_accounts_at_round_start(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        rounds=2,
        mode="sample",
        noise_multiplier=1.5,
        sampling_rate=0.25,
        clip_norm=0.7,
        momentum=0.5,
    )
    eng = enrolled_engine(cfg, FakeClock())
    assert eng.tick()
    task = eng.task_for("a").to_json()
    dp = task["config"]["dp"]
    assert dp == {
        "noise_multiplier": 1.5,
        "clip_norm": 0.7,
        "sampling_rate": 0.25,
        "steps": 4,  # epochs * ceil(1 / q)
        "momentum": 0.5,
    }
    assert task["privacy"]["mode"] == "sample"
    _, per_round = read_privacy(eng.store)  # write-ahead: recorded with the round's start
    assert per_round[1]["epsilon"] == pytest.approx(
        account([dpsgd_event(0.25, 1.5, 4)], 1e-5).epsilon, rel=1e-9
    )


def test_status_cli_reports_epsilon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, rounds=1, mode="central", noise_multiplier=Z)
    eng = enrolled_engine(cfg, FakeClock())
    _round(eng, 1)
    eng.store.close()
    (tmp_path / "job.toml").write_text(
        "[job]\nname='test'\nrounds=1\nseed=1\ncohort_size=3\nmin_clients=2\n"
        "wait_for_clients=3\n[model]\nmanifest='model.json'\nweights='init.safetensors'\n"
        f"[server]\nstate_dir='state'\n[privacy]\nmode='central'\nnoise_multiplier={Z}\n"
    )
    assert server_main(["status", "--config", str(tmp_path / "job.toml")]) == 0
    text = capsys.readouterr().out
    assert "privacy: mode=central" in text
    assert "epsilon_round=" in text
    assert server_main(["status", "--config", str(tmp_path / "job.toml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["privacy"]["epsilon"] == pytest.approx(
        account([client_poisson_event(1.0, Z, 1)], 1e-5).epsilon, rel=1e-9
    )
    assert doc["rounds"][0]["privacy"]["delta"] == 1e-5


@pytest.mark.parametrize(
    ("privacy", "secagg", "match"),
    [
        ({"mode": "distributed", "noise_multiplier": 1.0}, {}, "distributed"),
        ({"mode": "central", "noise_multiplier": 1.0}, {"enabled": True}, "secure aggregation"),
        ({"mode": "sample"}, {}, "exactly one"),
        ({"mode": "sample", "noise_multiplier": 1.0, "target_epsilon": 2.0}, {}, "exactly one"),
        ({"mode": "sample", "noise_multiplier": 1.0, "sampling_rate": 0.0}, {}, "sampling_rate"),
        ({"mode": "magic"}, {}, "privacy.mode"),
        ({"noise": 1.0}, {}, "unknown keys"),
    ],
)
def test_bad_privacy_configs_are_refused(
    tmp_path: Path, privacy: dict[str, Any], secagg: dict[str, Any], match: str
) -> None:
    kw: dict[str, Any] = {f"secagg__{k}": v for k, v in secagg.items()}
    if secagg:  # a cohort secure aggregation can serve
        kw.update(job__cohort_size=10, job__min_clients=5, job__wait_for_clients=10)
    with pytest.raises(ConfigError, match=match):
        write_job(tmp_path, **kw, **{f"privacy__{k}": v for k, v in privacy.items()})


def test_target_epsilon_is_calibrated_once_and_kept(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=4, mode="central", target_epsilon=3.0)
    eng = enrolled_engine(cfg, FakeClock())
    z = eng.privacy.noise_multiplier
    assert account([client_poisson_event(1.0, z, 4)], 1e-5).epsilon <= 3.0
    assert account([client_poisson_event(1.0, z * 0.98, 4)], 1e-5).epsilon > 3.0
    eng.store.close()
    eng = enrolled_engine(cfg, FakeClock())
    assert eng.privacy.noise_multiplier == z


def test_privacy_mode_cannot_change_once_the_job_has_rounds(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=2, mode="central", noise_multiplier=Z)
    eng = enrolled_engine(cfg, FakeClock())
    _round(eng, 1)
    eng.store.close()
    with pytest.raises(ConfigError, match="cannot change"):
        open_engine(_config(tmp_path, rounds=2), clock=FakeClock())
