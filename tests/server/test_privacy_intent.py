"""Write-ahead privacy charge: a server stopped between a noised release and its commit.

The engine writes a privacy intent (the round's events) before the noised aggregate first
exists: before the SecAgg+ unmask of a ring mode, before central noise is drawn. A restart
that finds it pending charges the round once; a ring round then asks its unmask again (the
same sum), a central round is aborted (docs/privacy.md, "Write-ahead charge"). In-process
engines with a crash hook that raises stand in for SIGKILL here; the real-process version is
tests/e2e/test_privacy_intent_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.privacy.accountant import account, client_poisson_event
from confide_server.engine.privacy import read_privacy
from tests.server.test_ddg_post_unmask import _next_round_starts, _to_unmask
from tests.server.test_ddg_rounds import _ddg_config
from tests.server.test_privacy_server import Z, _config, _killed_after_noised_write
from tests.server.test_sample_ddg_rounds import SampleFed, _sddg_config
from tests.server.test_secagg_rounds import IDS, Fed
from tests.server.util import Crash, enrolled_engine


def _fed(tmp: Path, mode: str) -> Fed:
    if mode == "distributed":
        return Fed(tmp, _ddg_config(tmp, job__rounds=2))
    return SampleFed(tmp, _sddg_config(tmp, job__rounds=2))


def _charged(fed: Fed) -> dict[int, dict[str, object]]:
    return read_privacy(fed.eng.store)[1]


@pytest.mark.parametrize("mode", ["distributed", "sample_distributed"])
@pytest.mark.parametrize("point", ["after_unmask", "model_written"])
def test_a_kill_between_unmask_and_its_commit_is_charged_at_restart_once(
    tmp_path: Path, mode: str, point: str
) -> None:
    fed = _fed(tmp_path, mode)
    _to_unmask(fed)
    fed.restart(crash_at=point)
    with pytest.raises(Crash):
        fed.answer_all_and_tick()  # every share in: the close unmasks, then "SIGKILL"
    pending = fed.eng.store.privacy_intent()
    assert pending is not None
    assert (pending["round"], pending["stage"], pending["mode"]) == (1, "unmask", mode)
    assert _charged(fed) == {}  # the kill came before the storing transaction
    fed.restart(crash_at=point)  # charged at start; the unmask is asked again ...
    charged = _charged(fed)
    assert sorted(charged) == [1]
    stored = fed.eng.store.privacy_round(1)
    assert stored is not None
    assert stored.events == pending["events"]  # charged with the intent's mechanism
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert (row.status, row.stage) == ("open", "unmask")
    with pytest.raises(Crash):
        fed.answer_all_and_tick()  # ... and killed again after the same unmask
    fed.restart()  # replaying the intent charges nothing twice
    assert _charged(fed) == charged
    fed.answer_all_and_tick()  # the same sum: the round goes on
    assert fed.stage() == "evaluate"
    fed.finish_evaluate()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed"
    assert _charged(fed) == charged
    assert fed.eng.store.privacy_intent() is None
    assert fed.eng.privacy.accountant.epsilon() == pytest.approx(
        float(charged[1]["epsilon"]), rel=1e-12
    )


def test_a_killed_unmask_whose_answers_never_come_back_aborts_charged(tmp_path: Path) -> None:
    fed = _fed(tmp_path, "distributed")
    base = fed.eng.current_model
    _to_unmask(fed)
    fed.restart(crash_at="after_unmask")
    with pytest.raises(Crash):
        fed.answer_all_and_tick()
    fed.restart()
    fed.clock.now += 1000  # the sites are gone: the re-asked unmask closes unanswered
    assert fed.eng.tick()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "aborted"
    assert fed.eng.current_model == base
    assert sorted(_charged(fed)) == [1]  # paid for once, although no model came of it
    assert fed.eng.store.privacy_intent() is None
    _next_round_starts(fed)


@pytest.mark.parametrize("mode", ["distributed", "sample_distributed"])
def test_a_kill_after_the_commit_is_charged_exactly_once(tmp_path: Path, mode: str) -> None:
    fed = _fed(tmp_path, mode)
    _to_unmask(fed)
    fed.restart(crash_at="stage_committed")
    with pytest.raises(Crash):
        fed.answer_all_and_tick()
    before = _charged(fed)
    assert sorted(before) == [1]
    assert fed.eng.store.privacy_intent() is None  # settled in the storing transaction
    fed.restart()
    assert fed.stage() == "evaluate"  # the round goes on: nothing pending, nothing re-charged
    fed.finish_evaluate()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "committed"
    assert _charged(fed) == before


def test_an_abort_before_anything_was_unmasked_clears_the_intent_uncharged(
    tmp_path: Path,
) -> None:
    fed = _fed(tmp_path, "distributed")
    _to_unmask(fed)

    def refuse() -> None:
        from confide.errors import SecAggAbortError

        raise SecAggAbortError("too-few-shares", "injected before the unmask")

    assert fed.eng.secure is not None
    assert fed.eng.secure.server is not None
    fed.eng.secure.server.close_unmask = refuse  # type: ignore[assignment,method-assign]
    fed.run_stage()
    row = fed.eng.store.get_round(1)
    assert row is not None
    assert row.status == "aborted"
    assert _charged(fed) == {}  # this process knows nothing was unmasked
    assert fed.eng.store.privacy_intent() is None
    fed.restart()
    assert _charged(fed) == {}


def test_operator_abort_after_a_failed_commit_of_an_unmasked_sum_charges_it(
    tmp_path: Path,
) -> None:
    import sqlite3

    fed = _fed(tmp_path, "distributed")
    _to_unmask(fed)
    for c in IDS:
        fed.answer(c)
    real = fed.eng.store.transaction
    calls = {"n": 0}

    def failing():  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # the intent's transaction passes; the storing one fails
            raise sqlite3.OperationalError("disk I/O error")
        return real()

    fed.eng.store.transaction = failing  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        fed.eng.tick()
    fed.eng.store.transaction = real  # type: ignore[method-assign]
    assert _charged(fed) == {}
    assert fed.eng.abort_open_round("operator") == 1
    assert sorted(_charged(fed)) == [1]  # the sum was unmasked in this process: paid for
    assert fed.eng.store.privacy_intent() is None


def test_central_kill_after_the_noised_write_is_charged_once_and_never_redrawn(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path, rounds=1, mode="central", noise_multiplier=Z)
    from tests.server.conftest import FakeClock

    clock = FakeClock()
    eng = _killed_after_noised_write(cfg, clock)
    drawn = set(eng.blobs.model_files()) - {eng.current_model}
    assert len(drawn) == 1  # the noised aggregate is on disk, unregistered
    assert eng.store.privacy_intent() is not None
    eng.store.close()
    eng = enrolled_engine(cfg, clock)
    row = eng.store.get_round(1)
    assert row is not None
    assert row.status == "aborted"
    assert row.new_model is None
    assert set(eng.blobs.model_files()) == {eng.current_model}  # the draw is deleted
    one = account([client_poisson_event(1.0, Z, 1)], 1e-5).epsilon
    summary, per_round = read_privacy(eng.store)
    assert sorted(per_round) == [1]
    assert summary is not None
    assert summary["epsilon"] == pytest.approx(one, rel=1e-9)
    eng.store.close()
    eng = enrolled_engine(cfg, clock)  # a second restart: nothing pending, nothing re-charged
    assert read_privacy(eng.store)[1] == per_round
    assert eng.store.get_round(1).status == "aborted"  # type: ignore[union-attr]
    eng.store.close()
