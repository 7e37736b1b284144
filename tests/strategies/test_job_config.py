"""Strategies in the job config and the round engine: selection, refusals, what tasks carry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.client.training import bound_update
from confide.errors import ConfigError
from confide.protocol.tasks import TrainConfig, parse_task
from confide.strategies import FedAdam, FedAvg, FedProx, NormBounding
from confide_server.app import open_engine
from tests.server.conftest import FakeClock
from tests.server.test_secagg_rounds import IDS, Fed
from tests.server.test_secagg_rounds import _config as secagg_config
from tests.server.util import write_job

SECAGG = {
    "secagg__enabled": True,
    "secagg__adversarial_fraction": 0.0,
    "secagg__dropout_fraction": 0.34,
    "job__cohort_size": 3,
    "job__min_clients": 2,
    "job__wait_for_clients": 3,
}


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize(
    ("setting", "says"),
    [
        (SECAGG, r"\[secagg\] enabled = true"),
        ({"privacy__mode": "central", "privacy__noise_multiplier": 1.0}, "'central'"),
        (
            {**SECAGG, "privacy__mode": "distributed", "privacy__noise_multiplier": 1.0},
            r"\[secagg\] enabled = true",
        ),
    ],
)
def test_clear_only_rules_are_refused_where_only_sums_are_seen(
    tmp_path: Path, rule: str, setting: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{rule}.*in the clear.*{says}.*only ever sees"):
        write_job(tmp_path, strategy__name=rule, **setting)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "norm_bounding"])
def test_robust_rules_run_in_the_clear_and_with_sample_dp(tmp_path: Path, rule: str) -> None:
    assert write_job(tmp_path / "plain", strategy__name=rule).strategy.name == rule
    cfg = write_job(
        tmp_path / "dp",
        strategy__name=rule,
        privacy__mode="sample",
        privacy__noise_multiplier=1.0,
        privacy__sampling_rate=0.5,
    )
    assert cfg.strategy.build().name == rule


def test_secure_compatible_strategies_run_with_secagg(tmp_path: Path) -> None:
    for name in ("fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "norm_bounding"):
        assert write_job(tmp_path / name, strategy__name=name, **SECAGG).secagg.enabled


def test_options_and_defaults_reach_the_strategy(tmp_path: Path) -> None:
    adam = write_job(tmp_path, strategy__name="fedadam", strategy__beta1=0.5).strategy.build()
    assert isinstance(adam, FedAdam)
    assert (adam.beta1, adam.server_learning_rate) == (0.5, 0.1)  # the strategy's own eta
    prox = write_job(tmp_path, strategy__name="fedprox", strategy__mu=0.25).strategy.build()
    assert isinstance(prox, FedProx)
    assert prox.mu == 0.25
    nb = write_job(tmp_path, strategy__name="norm_bounding", strategy__max_norm=2).strategy
    assert isinstance(nb.build(), NormBounding)
    assert isinstance(write_job(tmp_path).strategy.build(), FedAvg)
    with pytest.raises(ConfigError, match="mu must be >= 0"):
        write_job(tmp_path, strategy__name="fedprox", strategy__mu=-1.0)


@pytest.mark.parametrize(
    ("name", "options", "field", "value"),
    [
        ("fedprox", {"strategy__mu": 0.5}, "proximal_mu", 0.5),
        ("norm_bounding", {"strategy__max_norm": 0.75}, "update_clip_norm", 0.75),
    ],
)
def test_train_tasks_carry_what_the_strategy_asks_sites_for(
    tmp_path: Path, name: str, options: dict[str, Any], field: str, value: float
) -> None:
    cfg = write_job(tmp_path, strategy__name=name, job__wait_for_clients=1, **options)
    eng = open_engine(cfg, clock=FakeClock())
    eng.enroll(eng.create_tokens(1)[0], "a", "key-a")
    eng.touch("a")
    assert eng.tick()
    doc = eng.task_for("a").to_json()
    assert doc["action"] == "train"
    assert doc["config"][field] == value
    task = parse_task(doc)  # the client's strict parser takes it back
    assert getattr(task.config, field) == value  # type: ignore[union-attr]


def test_fedavg_tasks_read_as_before(tmp_path: Path) -> None:
    """Default fields are omitted, so sites of an older release still parse FedAvg tasks."""
    cfg = write_job(tmp_path, job__wait_for_clients=1)
    eng = open_engine(cfg, clock=FakeClock())
    eng.enroll(eng.create_tokens(1)[0], "a", "key-a")
    eng.touch("a")
    eng.tick()
    assert set(eng.task_for("a").to_json()["config"]) == {"epochs", "batch_size", "learning_rate"}


def test_norm_bounding_under_secagg_clips_on_the_sites(tmp_path: Path) -> None:
    """The advertise task asks for the clip; sites that honour it mask clipped deltas, and the
    server's aggregate is the weighted mean of the clipped deltas."""
    fed = Fed(
        tmp_path, secagg_config(tmp_path, strategy__name="norm_bounding", strategy__max_norm=0.5)
    )
    base = fed.model()
    assert fed.eng.tick()
    task = fed.eng.task_for("a").to_json()
    assert task["action"] == "advertise"
    cfg = TrainConfig.from_dict(task["config"])
    assert cfg.update_clip_norm == 0.5
    raw = dict(fed.updates)
    assert max(float(np.linalg.norm(u)) for u in raw.values()) > 0.5  # the clip bites
    fed.updates = {c: bound_update(u, cfg) for c, u in raw.items()}
    assert all(float(np.linalg.norm(u)) <= 0.5 * (1 + 1e-6) for u in fed.updates.values())
    for _ in ("advertise", "share", "mask", "unmask"):
        fed.run_stage()
    fed.finish_evaluate()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed"
    np.testing.assert_allclose(fed.model(), fed.expected(IDS, base), atol=2e-4)


def test_simulate_passes_strategy_options_into_the_job(tmp_path: Path) -> None:
    import argparse

    from confide_server.simulate import SimulationOptions, _strategy_options, prepare_job

    parser = argparse.ArgumentParser()
    opts = _strategy_options(parser, ["mu=0.05", "flag=true", "name=x", "n=3"])
    assert opts == {"mu": 0.05, "flag": True, "name": "x", "n": 3}
    with pytest.raises(SystemExit):
        _strategy_options(parser, ["mu"])
    files = prepare_job(
        tmp_path,
        SimulationOptions(clients=3, rounds=1, strategy="fedprox", extra_strategy={"mu": 0.05}),
    )
    assert files.job is not None
    assert files.job.strategy.build().client_options() == {"proximal_mu": 0.05}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "options"),
    [("norm_bounding", {"strategy__max_norm": 0.01}), ("fedprox", {"strategy__mu": 0.5})],
)
async def test_real_clients_honour_the_strategy_fields(
    make_fed: Any, tmp_path: Path, name: str, options: dict[str, Any]
) -> None:
    """Two confide.Client sites over real HTTP run a 2-round job: every task carries the
    strategy's field, and with norm bounding every stored update is within the bound."""
    from confide.protocol.manifest import decode_tensors
    from confide.protocol.tasks import TrainTask
    from tests.sites import run_sites

    # The test reads the stored updates after the round closes: keep them (retention).
    cfg = write_job(
        tmp_path / "job",
        strategy__name=name,
        strategy__learning_rate=1.0,
        retention__prune_updates=False,
        **options,
    )
    fed = await make_fed(cfg)
    seen: list[TrainConfig] = []

    def watch(task: Any) -> None:
        if isinstance(task, TrainTask):
            seen.append(task.config)

    rng = np.random.default_rng(5)
    statuses = await run_sites(fed, tmp_path, "ab", rng, timeout=240, on_task=watch)
    assert statuses == ["finished", "finished"]
    assert len(seen) == 4
    if name == "norm_bounding":
        assert all(c.update_clip_norm == 0.01 for c in seen)
        for r in (1, 2):
            subs = fed.engine.store.submissions(r, "train")
            assert len(subs) == 2
            for s in subs:
                assert s.blob is not None
                delta = decode_tensors(fed.engine.manifest, fed.engine.blobs.read(s.blob))[0]
                assert float(np.linalg.norm(delta.astype(np.float64))) <= 0.01 * (1 + 1e-6)
    else:
        assert all(c.proximal_mu == 0.5 and c.update_clip_norm is None for c in seen)
