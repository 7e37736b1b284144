"""Local momentum restarting (``TrainConfig.momentum_restart``): known answers, persistence,
refusals, the job config, and real clients over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from confide.client.momentum import momentum_path, persist_momentum, restore_momentum
from confide.data.tabular import RegressionDataset
from confide.errors import ConfigError, ManifestError
from confide.protocol.tasks import DPSGDConfig, TrainConfig, parse_task
from confide.training import NumpyTrainer
from confide_server.app import open_engine
from tests.server.conftest import FakeClock
from tests.server.util import write_job
from tests.sites import run_sites

LR, M = 0.1, 0.5


def _quadratic() -> tuple[NumpyTrainer, RegressionDataset]:
    """One record x = 0, y = 1 under (w x + b - y)^2: the bias sees g = 2 (b - 1), w none."""
    trainer = NumpyTrainer.create("linear", n_features=1, n_classes=1)
    data = RegressionDataset(np.zeros((1, 1), np.float32), np.ones(1, np.float32))
    return trainer, data


def _round(trainer: NumpyTrainer, data: Any, cfg: TrainConfig) -> float:
    """One round from the same global model (b = 0); return the bias delta."""
    trainer.set_weights(np.zeros(2, np.float32))
    trainer.fit(data, cfg, seed=0)
    return float(trainer.get_weights()[1])


def test_restart_vs_keep_on_a_hand_computable_quadratic() -> None:
    """Round 1: v = g = -2, b = 0.2. Round 2 from b = 0 again: restart gives v = -2 (b = 0.2);
    keeping gives v = M * (-2) + (-2) = -3 (b = 0.3)."""
    restart = TrainConfig(1, 1, LR, momentum=M)
    keep = TrainConfig(1, 1, LR, momentum=M, momentum_restart=False)
    t, data = _quadratic()
    assert [_round(t, data, restart) for _ in range(2)] == pytest.approx([0.2, 0.2], abs=1e-6)
    t, data = _quadratic()
    assert [_round(t, data, keep) for _ in range(3)] == pytest.approx(
        [0.2, 0.3, 0.35], abs=1e-6
    )  # v3 = M * (-3) - 2 = -3.5
    assert t.momentum_buffer() == pytest.approx([0.0, -3.5], abs=1e-6)
    # momentum 0 is plain SGD whatever momentum_restart says, and leaves no buffer
    t, data = _quadratic()
    assert _round(t, data, TrainConfig(1, 1, LR, momentum_restart=False)) == pytest.approx(0.2)
    assert t.momentum_buffer() is None


def test_two_steps_within_a_round_use_momentum_either_way() -> None:
    """Two epochs of one step: b1 = 0.2 (v = -2), g2 = -1.6, v = -2.6, b2 = 0.46."""
    t, data = _quadratic()
    assert _round(t, data, TrainConfig(2, 1, LR, momentum=M)) == pytest.approx(0.46, abs=1e-6)


def test_torch_engine_keeps_its_buffer_in_the_known_way() -> None:
    """x = 0 and label 0: only the bias moves; from b = 0 the gradient is g = (-0.5, 0.5), so a
    round moves b by -LR g = (0.05, -0.05), and a kept buffer makes round 2 move 1.5 times that."""
    torch = pytest.importorskip("torch")
    from confide.training.torch_engine import TorchTrainer

    class Zeros:
        labels = np.zeros(1, dtype=np.int64)
        patient_ids = None

        def __len__(self) -> int:
            return 1

        def batch(self, index: Any) -> tuple[Any, Any]:
            return np.zeros((len(index), 1), np.float32), self.labels[index]

    def rounds(cfg: TrainConfig, n: int) -> list[list[float]]:
        torch.manual_seed(0)
        t = TorchTrainer(torch.nn.Sequential(torch.nn.Linear(1, 2)), (1,), 2)
        out = []
        for _ in range(n):
            t.set_weights(np.zeros(t.manifest.size, np.float32))
            t.fit(Zeros(), cfg, seed=0)
            out.append(t.get_weights()[-2:].tolist())  # the bias
        return out

    restart = rounds(TrainConfig(1, 1, LR, momentum=M), 2)
    np.testing.assert_allclose(restart, [[0.05, -0.05], [0.05, -0.05]], atol=1e-6)
    keep = rounds(TrainConfig(1, 1, LR, momentum=M, momentum_restart=False), 2)
    np.testing.assert_allclose(keep, [[0.05, -0.05], [0.075, -0.075]], atol=1e-6)


def test_the_buffer_survives_a_client_restart(tmp_path: Path) -> None:
    """persist after a fit, a fresh trainer (a restarted client) restores it: the next round
    equals the one an uninterrupted site trains."""
    keep = TrainConfig(1, 1, LR, momentum=M, momentum_restart=False)
    t, data = _quadratic()
    restore_momentum(t, keep, tmp_path)  # nothing on disk yet: starts from zero
    assert _round(t, data, keep) == pytest.approx(0.2, abs=1e-6)
    persist_momentum(t, keep, tmp_path)
    path = momentum_path(tmp_path, t)
    assert path.exists()
    assert path.name.startswith("momentum-")
    stored = np.load(path, allow_pickle=False)  # a plain .npy, no pickle
    assert stored.dtype == np.float32
    assert stored.tolist() == pytest.approx([0.0, -2.0])
    fresh, _ = _quadratic()
    restore_momentum(fresh, keep, tmp_path)
    assert _round(fresh, data, keep) == pytest.approx(0.3, abs=1e-6)
    # another model's buffer lives under another name and is never loaded
    other = NumpyTrainer.create("linear", n_features=2, n_classes=1)
    restore_momentum(other, keep, tmp_path)
    assert other.momentum_buffer() is None
    # with momentum_restart (the default) nothing is read or written
    default = TrainConfig(1, 1, LR, momentum=M)
    fresh, _ = _quadratic()
    restore_momentum(fresh, default, tmp_path)
    assert fresh.momentum_buffer() is None


def test_bad_settings_are_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\)"):
        TrainConfig(momentum=1.0)
    with pytest.raises(ConfigError, match="momentum_restart must be true or false"):
        TrainConfig(momentum_restart="no")  # type: ignore[arg-type]
    dp = DPSGDConfig(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.5, steps=2)
    with pytest.raises(ConfigError, match=r"DP-SGD momentum \(\[privacy\] momentum\)"):
        TrainConfig(dp=dp, momentum=0.9)
    t, _ = _quadratic()
    with pytest.raises(ManifestError, match="momentum buffer contains NaN or Inf"):
        t.set_momentum_buffer(np.array([np.nan, 0.0], np.float32))

    class NoBuffer:
        manifest = t.manifest

    with pytest.raises(ConfigError, match="has no momentum_buffer/set_momentum_buffer"):
        restore_momentum(NoBuffer(), TrainConfig(momentum=0.5, momentum_restart=False), ".")  # type: ignore[arg-type]
    from confide.client.training import check_trainable

    keep = TrainConfig(momentum=0.5, momentum_restart=False)
    with pytest.raises(ConfigError, match="refused and nothing is uploaded"):
        check_trainable(NoBuffer(), keep)  # type: ignore[arg-type]  # before training starts


def test_wire_form_omits_defaults_and_round_trips() -> None:
    assert set(TrainConfig().to_dict()) == {"epochs", "batch_size", "learning_rate"}
    cfg = TrainConfig(momentum=0.9, momentum_restart=False)
    assert cfg.to_dict()["momentum"] == 0.9
    assert cfg.to_dict()["momentum_restart"] is False
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_job_config_reaches_the_tasks(tmp_path: Path) -> None:
    cfg = write_job(
        tmp_path,
        job__wait_for_clients=1,
        strategy__local_momentum=0.9,
        strategy__momentum_restart=False,
    )
    eng = open_engine(cfg, clock=FakeClock())
    eng.enroll(eng.create_tokens(1)[0], "a", "key-a")
    eng.touch("a")
    assert eng.tick()
    task = parse_task(eng.task_for("a").to_json())
    assert task.config.momentum == 0.9  # type: ignore[union-attr]
    assert task.config.momentum_restart is False  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"strategy\.momentum_restart must be bool"):
        write_job(tmp_path / "bad", strategy__momentum_restart=1)
    with pytest.raises(ConfigError, match=r"DP-SGD, whose momentum is \[privacy\] momentum"):
        write_job(
            tmp_path / "dp",
            strategy__local_momentum=0.9,
            privacy__mode="sample",
            privacy__noise_multiplier=1.0,
            privacy__sampling_rate=0.5,
        )


async def test_real_clients_keep_their_buffers_on_disk(make_fed: Any, tmp_path: Path) -> None:
    """Two confide.Client sites over real HTTP, 2 rounds with momentum_restart = false: each
    site's state folder holds its buffer, and it differs between sites (their data differ)."""
    cfg = write_job(
        tmp_path / "job",
        strategy__local_momentum=0.9,
        strategy__momentum_restart=False,
        strategy__learning_rate=0.5,
    )
    fed = await make_fed(cfg)
    statuses = await run_sites(fed, tmp_path, "ab", np.random.default_rng(7), timeout=240)
    assert statuses == ["finished", "finished"]
    probe = NumpyTrainer.from_manifest(fed.engine.manifest)
    bufs = [np.load(momentum_path(tmp_path / c, probe), allow_pickle=False) for c in "ab"]
    assert all(b.shape == (fed.engine.manifest.size,) and np.abs(b).sum() > 0 for b in bufs)
    assert not np.array_equal(bufs[0], bufs[1])
