"""A long plain job keeps no per-round state in memory (issue 12: the soak's RSS growth).

Structural checks, never an RSS threshold: every dict, list, set and deque held by the
server's long-lived objects (the round engine, its metrics export, retention, ledger
signer, store, and the app's shared helpers) has the same size after a few rounds and
after many more. Real HTTP on loopback (pytest-aiohttp), rounds driven by the sites.

The replay cache is bounded by age, not by rounds; it has its own tests with an injected
clock.
"""

from __future__ import annotations

import csv
import json
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from confide_server.events import NonceCache
from confide_server.metrics import MetricsLog
from tests.server.conftest import FakeClock, Fed
from tests.server.test_privacy_server import _config
from tests.server.test_retention import _fed, _rounds
from tests.server.util import delta_body, enrolled_engine, eval_body, tiny_manifest

MANIFEST = tiny_manifest()
_CONTAINERS = (dict, list, set, frozenset, deque)


def _sizes(fed: Fed) -> dict[str, int]:
    """``{owner.attribute: len}`` of every container the server's long-lived objects hold."""
    eng = fed.engine
    owners: dict[str, object] = {
        "engine": eng,
        "metrics": eng.metrics,
        "retention": eng.retention,
        "ledger": eng.ledger,
        "store": eng.store,
        "privacy": eng.privacy,
        "blobs": eng.blobs,
    }
    app = fed.http.app
    for key in app:
        value = app[key]
        if hasattr(value, "__dict__") and not isinstance(value, NonceCache | type(eng)):
            owners[f"app[{getattr(key, 'name', key)}]"] = value
    out: dict[str, int] = {}
    for owner, obj in owners.items():
        for name, value in vars(obj).items():
            if isinstance(value, _CONTAINERS):
                out[f"{owner}.{name}"] = len(value)
    return out


async def test_no_per_round_state_accumulates(
    make_fed: Callable[..., Awaitable[Fed]], tmp_path: Path
) -> None:
    fed = await _fed(make_fed, tmp_path, job__rounds=60)
    await _rounds(fed, 4)
    early = _sizes(fed)
    await _rounds(fed, 24, first=5)
    late = _sizes(fed)
    grown = {k: (early.get(k, 0), n) for k, n in late.items() if n > early.get(k, 0)}
    assert not grown, f"grew between round 5 and round 29 (before, after): {grown}"
    # The structures that used to grow by one entry a round (or a stage) are named here
    # so a rename cannot make this test vacuous.
    assert {"engine._submitted", "metrics._closes"} <= set(late)
    assert late["engine._submitted"] <= 2  # the open round's stages only
    assert fed.engine.completed_rounds == 28
    # Nothing was lost from the exports while nothing was kept in memory.
    rows = (fed.engine.metrics.folder / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in rows] == list(range(1, 29))


def _play(eng: Any, clock: FakeClock, r: int, answering: str) -> None:
    for cid in "abc":
        eng.touch(cid)
    assert eng.tick()
    for cid in answering:
        prepared = eng.prepare(cid, r, "train", delta_body(MANIFEST, 1.0))
        eng.commit_submission(prepared, nonce=f"{cid}-train-{r}")
    clock.now += 7.0 if len(answering) == 3 else 31.0
    assert eng.tick()
    if eng.store.get_round(r).status == "open":
        for cid in "abc":
            prepared = eng.prepare(cid, r, "evaluate", eval_body(0.7))
            eng.commit_submission(prepared, nonce=f"{cid}-eval-{r}")
        clock.now += 3.0
        assert eng.tick()
    clock.now += 10.0


def test_a_new_column_rewrites_every_row(tmp_path: Path) -> None:
    """Round 1 aborts (no eval column); round 2 brings ``eval_accuracy``: both files are
    rewritten whole with the new column, rebuilt from the database (no row is in memory)."""
    clock = FakeClock()
    eng = enrolled_engine(_config(tmp_path, rounds=2), clock)
    _play(eng, clock, 1, answering="a")
    header_1 = (eng.metrics.folder / "rounds.csv").read_text().splitlines()[0].split(",")
    assert "eval_accuracy" not in header_1
    _play(eng, clock, 2, answering="abc")
    with (eng.metrics.folder / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["round"], r["status"]) for r in rows] == [("1", "aborted"), ("2", "committed")]
    assert rows[0]["eval_accuracy"] == ""
    assert float(rows[1]["eval_accuracy"]) == pytest.approx(0.7)
    assert float(rows[0]["stage_train_s"]) == pytest.approx(31.0)  # from the stages file
    jsonl = [json.loads(x) for x in (eng.metrics.folder / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in jsonl] == [1, 2]
    # A fresh process's log rebuilds the same rows.
    again = MetricsLog(eng.config.server.state_dir).write(eng.store)
    assert [r["round"] for r in again] == [1, 2]
    assert again[0]["stage_train_s"] == pytest.approx(31.0)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nonce_cache_rejects_a_replay_for_the_whole_window() -> None:
    clock = _Clock()
    cache = NonceCache(600.0, slices=8, clock=clock)
    nonce = "ab" * 16
    assert cache.add(nonce)
    for dt in (0.0, 1.0, 299.0, 599.9, 600.0):
        clock.now = 100.0 + dt
        assert not cache.add(nonce), dt
    clock.now = 100.0 + 600.0 + 600.0 / 8 + 0.01  # past the window and its slice
    assert cache.add(nonce)


def test_nonce_cache_tells_nonces_apart_across_slices() -> None:
    clock = _Clock()
    cache = NonceCache(10.0, slices=5, clock=clock)
    first = ["00ff" * 8, "00FF" * 8, "0" * 31, "\udcff" + "a" * 16]
    assert all(cache.add(n) for n in first)
    for step in range(1, 5):  # each in a later slice, the earlier ones merged and sorted
        clock.now += 2.0
        assert cache.add(f"{step:032x}")
        assert not any(cache.add(n) for n in first)
    assert len(cache) == len(first) + 4


def test_nonce_cache_is_bounded_by_rate_times_window() -> None:
    """A steady 50 nonces a second over ten windows holds at most one window and a slice."""
    clock = _Clock()
    cache = NonceCache(20.0, slices=4, clock=clock)
    most = 0
    for i in range(50 * 200):
        clock.now = 100.0 + i / 50
        assert cache.add(f"{i:032x}")
        most = max(most, len(cache))
    assert (
        most <= 50 * (20 + 2 * 5) + 1
    )  # the window, a closed slice kept one merge late, the open one
    assert len(cache) >= 50 * 20  # never forgets early
    # Every nonce of the last window is still refused.
    assert not any(cache.add(f"{i:032x}") for i in range(50 * 200 - 50 * 20, 50 * 200))
