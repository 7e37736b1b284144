"""``[retention]`` prunes the SecAgg+ state of closed rounds; restarts after it still work.

Engine level with a real SQLite file and real SecAgg+ participants (the sites of
``test_secagg_rounds``); a kill is a ``BaseException`` from the crash hook, and a restart
reopens the same state folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from confide_server.config import RetentionConfig
from confide_server.engine.secure import SECURE_STAGES
from tests.server.test_secagg_rounds import IDS, Crash, Fed, _config
from tests.server.util import eval_body

ROUNDS = 6


def _open_stage(fed: Fed, r: int) -> str:
    row = fed.eng.store.get_round(r)
    assert row is not None
    return row.stage if row.status == "open" else row.status


def _step(fed: Fed, r: int) -> None:
    """Every site answers round ``r``'s open stage, then the engine ticks."""
    stage = _open_stage(fed, r)
    if stage in SECURE_STAGES:
        for c in IDS:
            fed.answer(c)
    elif stage == "evaluate":
        for c in IDS:
            prepared = fed.eng.prepare(c, r, "evaluate", eval_body(0.5))
            fed.eng.commit_submission(prepared, nonce=f"{c}-eval-{r}")
    fed.eng.tick()


def _start(fed: Fed, r: int) -> None:
    fed.clock.now += 60.0  # past the cohort grace after the last round
    for c in IDS:
        fed.eng.touch(c)
    assert fed.eng.tick(), f"round {r} did not start"
    assert _open_stage(fed, r) == "advertise"


def _finish(fed: Fed, r: int) -> None:
    for _ in range(12):
        if _open_stage(fed, r) in ("committed", "aborted"):
            break
        _step(fed, r)
    assert _open_stage(fed, r) == "committed"


def _rows(fed: Fed) -> list[int]:
    with fed.eng.store.transaction() as cur:
        return [int(r[0]) for r in cur.execute("SELECT round FROM secagg_state ORDER BY round")]


def _state_bytes(fed: Fed) -> int:
    with fed.eng.store.transaction() as cur:
        row = cur.execute("SELECT COALESCE(SUM(LENGTH(state)), 0) FROM secagg_state").fetchone()
    return int(row[0])


def test_a_long_secure_job_keeps_only_the_open_rounds_state(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path, job__rounds=ROUNDS))
    sizes = []
    for r in range(1, ROUNDS + 1):
        _start(fed, r)
        assert _rows(fed) == [r]  # the open round's snapshot, nothing older
        _step(fed, r)  # advertise
        assert _open_stage(fed, r) == "share"
        sizes.append(_state_bytes(fed))
        fed.restart()  # a restart mid-round recovers from the kept snapshot
        assert _open_stage(fed, r) == "share"
        _finish(fed, r)
        assert _rows(fed) == []  # the closed round's snapshot went with its close
    assert fed.eng.status == "finished"
    assert fed.eng.store.count_secagg_states() == 0
    assert min(sizes) > 0
    assert max(sizes) == min(sizes)  # one round's worth, whatever the job's length


def test_a_kill_before_the_prune_is_caught_up_at_start(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path, job__rounds=2), crash_at="prune_start")
    _start(fed, 1)
    with pytest.raises(Crash):
        _finish(fed, 1)
    # Killed after round 1's commit, before its prune: the snapshot is still there.
    assert _open_stage(fed, 1) == "committed"
    assert _rows(fed) == [1]
    fed.restart()  # no crash hook: the start-up sweep deletes it
    assert _rows(fed) == []
    _start(fed, 2)  # the job goes on
    _finish(fed, 2)
    assert _rows(fed) == []
    assert fed.eng.status == "finished"


def test_prune_updates_off_keeps_the_secure_state(tmp_path: Path) -> None:
    cfg = _config(tmp_path, job__rounds=3, retention__prune_updates=False)
    fed = Fed(tmp_path, cfg)
    for r in (1, 2):
        _start(fed, r)
        _finish(fed, r)
    assert _rows(fed) == [1, 2]
    # Turned on later (same state folder): the sweep at start catches up on both.
    fed.cfg = replace(cfg, retention=RetentionConfig(prune_updates=True))
    fed.restart()
    assert _rows(fed) == []
    assert fed.eng.store.prune_secagg_states(10) == 0  # nothing left: no write
    _start(fed, 3)
    _finish(fed, 3)
    assert _rows(fed) == []
