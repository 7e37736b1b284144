"""The engine aggregates through the Strategy seam and persists its state with the round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from numpy.typing import NDArray

from confide.errors import ConfigError
from confide.protocol.manifest import decode_tensors
from confide.strategies import FedAvg, StrategyState, Update
from confide_server.app import open_engine
from confide_server.blobs import BlobStore
from confide_server.engine.rounds import RoundEngine
from confide_server.store import Store
from tests.server.conftest import FakeClock
from tests.server.util import delta_body, eval_body, tiny_manifest, write_job

MANIFEST = tiny_manifest()


class CountingAvg(FedAvg):
    """FedAvg that counts its rounds and remembers the last total weight (test strategy)."""

    name: ClassVar[str] = "counting_avg"
    calls: ClassVar[list[StrategyState]] = []

    def initial_state(self) -> StrategyState:
        return {"rounds": 0, "weights": []}

    def aggregate(
        self, base: NDArray[np.float32], updates: Sequence[Update], state: StrategyState
    ) -> tuple[NDArray[np.float32], StrategyState]:
        self.calls.append(state)
        new, _ = super().aggregate(base, updates, state)
        total = sum(w for _, w in updates)
        return new, {"rounds": state["rounds"] + 1, "weights": [*state["weights"], total]}


def _engine(tmp: Path, clock: FakeClock, strategy: Any = None) -> RoundEngine:
    cfg = write_job(tmp, job__cohort_size=2, job__min_clients=1, job__rounds=3)
    if strategy is None:
        eng = open_engine(cfg, clock=clock)
    else:
        eng = RoundEngine(
            cfg,
            Store(cfg.server.database),
            BlobStore(cfg.server.state_dir),
            MANIFEST,
            clock=clock,
            strategy=strategy,
        )
        eng.initialise(cfg.weights.read_bytes())
    for cid in ("a", "b"):
        if eng.public_key(cid) is None:
            eng.enroll(eng.create_tokens(1)[0], cid, f"key-{cid}")
        eng.touch(cid)
    return eng


def _round(eng: RoundEngine, r: int, values: dict[str, tuple[float, int]]) -> None:
    assert eng.tick()
    for cid, (value, n) in values.items():
        p = eng.prepare(cid, r, "train", delta_body(MANIFEST, value, n))
        eng.commit_submission(p, f"{cid}-t-{r}")
    assert eng.tick()  # both answered: train closes
    for cid in values:
        p = eng.prepare(cid, r, "evaluate", eval_body(0.5))
        eng.commit_submission(p, f"{cid}-e-{r}")
    assert eng.tick()


def _model(eng: RoundEngine) -> NDArray[np.float32]:
    path = eng.store.model_path(eng.current_model)
    assert path is not None
    return decode_tensors(MANIFEST, eng.blobs.read(path))[0]


def test_default_fedavg_matches_hand_computed_mean(tmp_path: Path) -> None:
    eng = _engine(tmp_path, FakeClock())
    base = _model(eng)
    _round(eng, 1, {"a": (1.0, 10), "b": (3.0, 30)})
    # (10 * 1 + 30 * 3) / 40 = 2.5 per coordinate, server_learning_rate 1
    np.testing.assert_allclose(_model(eng) - base, 2.5, rtol=1e-6)
    assert isinstance(eng.strategy, FedAvg)
    assert eng.store.committed_strategy_state() == {}


def test_strategy_state_is_persisted_and_restored_after_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    CountingAvg.calls = []
    eng = _engine(tmp_path, clock, CountingAvg())
    assert eng.store.committed_strategy_state() is None
    _round(eng, 1, {"a": (1.0, 10), "b": (3.0, 30)})
    assert eng.store.committed_strategy_state() == {"rounds": 1, "weights": [40.0]}
    eng.store.close()
    # a fresh process: the state of the last committed round goes to the next call
    eng = _engine(tmp_path, clock, CountingAvg())
    _round(eng, 2, {"a": (0.0, 5), "b": (0.0, 5)})
    assert CountingAvg.calls == [
        {"rounds": 0, "weights": []},
        {"rounds": 1, "weights": [40.0]},
    ]
    assert eng.store.committed_strategy_state() == {"rounds": 2, "weights": [40.0, 10.0]}


def test_unknown_strategy_name_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.name must be one of.*fedavg"):
        write_job(tmp_path, strategy__name="fedmedian")


def test_strategy_options_go_to_the_strategy_which_checks_them(tmp_path: Path) -> None:
    cfg = write_job(tmp_path, strategy__server_learning_rate=0.5)
    assert cfg.strategy.options == {}
    strategy = cfg.strategy.build()
    assert isinstance(strategy, FedAvg)
    assert strategy.server_learning_rate == 0.5
    # a key the strategy does not take is refused when the config is read
    with pytest.raises(ConfigError, match=r"'fedavg' does not take options \['beta1'\]"):
        write_job(tmp_path, strategy__beta1=0.9)
    with pytest.raises(ConfigError, match="must be a number, a string or a boolean"):
        write_job(tmp_path, strategy__beta1=[0.9])
