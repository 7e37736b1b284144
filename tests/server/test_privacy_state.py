"""The accountant's persisted state costs O(1) a round and restores exactly (issue 12).

``meta.privacy_accountant`` holds the accountant's constant-size header; each round's
record is its ``privacy_rounds`` row, written in the same transaction. Before, the whole
state (every round's record) was re-encoded and rewritten inside every round: 686 KB at
round 2,000 of a sample-DP soak, 28-43 ms of the round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from confide.privacy.accountant import PrivacyAccountant
from confide_server.config import Config
from confide_server.engine.rounds import RoundEngine
from confide_server.store import Store
from tests.server.conftest import FakeClock
from tests.server.test_privacy_server import _config, _round
from tests.server.util import enrolled_engine

Z = 2.0


def _played(
    tmp: Path, rounds: int, played: int, mode: str = "central", **privacy: Any
) -> tuple[Config, FakeClock, RoundEngine]:
    """A DP job of ``rounds`` rounds whose first ``played`` rounds have been played."""
    cfg = _config(tmp, rounds=rounds, mode=mode, noise_multiplier=Z, **privacy)
    clock = FakeClock()
    eng = enrolled_engine(cfg, clock)
    for r in range(1, played + 1):
        _round(eng, r)
    return cfg, clock, eng


def _restarted(eng: RoundEngine, cfg: Config, clock: FakeClock) -> RoundEngine:
    eng.store.close()
    return enrolled_engine(cfg, clock)


def _meta_state(store: Store) -> str:
    raw = store.get_meta("privacy_accountant")
    assert raw is not None
    return raw


@pytest.mark.parametrize("mode", ["central", "sample"])
def test_state_size_is_constant_and_a_restart_restores_every_round(
    tmp_path: Path, mode: str
) -> None:
    extra = {"sampling_rate": 0.25} if mode == "sample" else {}
    cfg, clock, eng = _played(tmp_path, 12, 0, mode, **extra)
    sizes = []
    for r in range(1, 13):
        _round(eng, r)
        sizes.append(len(_meta_state(eng.store)))
    assert len(set(sizes)) == 1, f"the persisted accountant state grows with rounds: {sizes}"
    assert "rounds" not in json.loads(_meta_state(eng.store))
    before = eng.privacy.accountant.to_state()
    assert len(before["rounds"]) == 12
    eng = _restarted(eng, cfg, clock)  # the rounds come back from privacy_rounds
    assert eng.privacy.accountant.to_state() == before
    assert eng.privacy.accountant.round_record(7) == PrivacyAccountant.from_state(
        before
    ).round_record(7)
    eng.store.close()


def test_a_database_with_the_whole_state_in_meta_is_read_and_then_kept_small(
    tmp_path: Path,
) -> None:
    cfg, clock, eng = _played(tmp_path, 6, 3)
    full = eng.privacy.accountant.to_state()
    with eng.store.transaction() as cur:  # what the previous version wrote every round
        Store.set_meta(cur, "privacy_accountant", json.dumps(full))
    eng = _restarted(eng, cfg, clock)
    assert eng.privacy.accountant.to_state() == full
    for r in range(4, 7):
        _round(eng, r)
    assert "rounds" not in json.loads(_meta_state(eng.store))
    after = eng.privacy.accountant.to_state()
    assert [r["round"] for r in after["rounds"]] == [1, 2, 3, 4, 5, 6]
    eng = _restarted(eng, cfg, clock)
    assert eng.privacy.accountant.to_state() == after
    eng.store.close()


def test_a_restart_never_lowers_the_spent_budget_read_from_the_rows(tmp_path: Path) -> None:
    # The rows are the record: a restored accountant's cumulative epsilon is the last row's
    # (or the re-accounted ledger's, whichever is larger), never less.
    cfg, clock, eng = _played(tmp_path, 4, 4)
    spent = eng.privacy.accountant.epsilon()
    with eng.store.transaction() as cur:  # an inflated stored value (e.g. an older library)
        cur.execute("UPDATE privacy_rounds SET epsilon = ? WHERE round = 4", (spent * 2,))
    eng = _restarted(eng, cfg, clock)
    assert eng.privacy.accountant.epsilon() == spent * 2
    eng.store.close()
