"""SitePolicy.warm_up runs the accountant one caller at a time per process.

Hundreds of virtual sites in one Ray actor each warm up at start; concurrently they would
all compute the same (cached) PLD at once and starve the thread pool.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import confide.privacy.accountant as accountant
from confide.client.policy import SitePolicy


def test_concurrent_warm_ups_enter_the_accountant_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inside = threading.Event()
    go = threading.Event()
    probe = threading.Lock()
    overlaps: list[int] = []
    calls: list[int] = []

    def fake_account(*_a: Any, **_k: Any) -> None:
        if not probe.acquire(blocking=False):
            overlaps.append(1)  # another warm-up is inside the accountant right now
            return
        try:
            calls.append(1)
            inside.set()
            go.wait(60.0)  # the first caller stays inside until the others were started
        finally:
            probe.release()

    monkeypatch.setattr(accountant, "account", fake_account)
    policy = SitePolicy()
    first = threading.Thread(target=policy.warm_up)
    first.start()
    assert inside.wait(60.0)
    others = [threading.Thread(target=policy.warm_up) for _ in range(8)]
    for t in others:
        t.start()
    for t in others:
        t.join(0.2)  # give them the chance to reach the accountant (they must block)
    go.set()
    for t in [first, *others]:
        t.join(60.0)
    assert not overlaps
    assert len(calls) == 9  # each still ran (the real accountant answers from its cache)
