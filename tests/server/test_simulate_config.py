"""confide-server simulate writes its job config from a typed, validated document."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.errors import ConfigError
from confide_server.config import load_config, parse_config, render_toml
from confide_server.simulate import SimulationOptions, job_document, prepare_job


def test_prepare_job_writes_the_typed_config(tmp_path: Path) -> None:
    opts = SimulationOptions(
        clients=4,
        rounds=2,
        dp="central",
        noise_multiplier=1.0,
        extra_strategy={"server_learning_rate": 0.5},
        extra_server={"max_upload_bytes": 123456},
    )
    files = prepare_job(tmp_path, opts)
    assert files.job is not None
    assert load_config(files.config) == files.job
    job = files.job
    assert (job.job.cohort_size, job.job.min_clients, job.job.rounds) == (4, 3, 2)
    assert job.strategy.name == "fedavg"
    assert job.strategy.server_learning_rate == 0.5
    assert job.privacy.mode == "central"
    assert job.server.max_upload_bytes == 123456
    assert files.config.read_text().startswith("# Written by `confide-server simulate`.")


def test_bad_options_fail_before_anything_is_written(tmp_path: Path) -> None:
    doc = job_document(SimulationOptions(extra_strategy={"momentum": 0.9}), 1234)
    with pytest.raises(ConfigError, match=r"does not take options \['momentum'\]"):
        parse_config(doc, tmp_path)
    with pytest.raises(ValueError, match="needs secure aggregation"):
        job_document(SimulationOptions(dp="distributed"), 1234)


def test_render_toml_round_trips_and_refuses_what_toml_cannot_hold(tmp_path: Path) -> None:
    doc = job_document(SimulationOptions(secagg=True, dp="sample", noise_multiplier=1.5), 4321)
    (tmp_path / "job.toml").write_text(render_toml(doc))
    assert load_config(tmp_path / "job.toml") == parse_config(doc, tmp_path)
    with pytest.raises(ConfigError, match=r"job\.rounds must be finite"):
        render_toml({"job": {"rounds": float("nan")}})
    with pytest.raises(ConfigError, match="cannot write a list"):
        render_toml({"job": {"rounds": [1]}})
