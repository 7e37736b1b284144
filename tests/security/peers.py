"""Helpers of the cohort attacks over real HTTP: the server's puppets around one victim.

A test builds the attack (a job, a consortium, what the server relays), then
:func:`victim_among_puppets` runs the server's own sites (which accept anything) next to
the victim, and :func:`assert_nothing_stored_from` checks the victim left no message of any
stage on the server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from confide.client import SitePolicy
from tests.sites import run_site
from tests.support import PermissivePolicy

# Every stage a site can submit a message in.
STAGES = ("advertise", "share", "mask", "consistency", "unmask", "train", "evaluate")


async def victim_among_puppets(
    fed: Any, tmp: Path, victim_policy: SitePolicy, puppets: list[str], timeout: float = 120.0
) -> Any:
    """Run ``victim`` (state in ``tmp / "victim"``) next to the server's ``puppets``.

    The puppets accept any task (:class:`PermissivePolicy`); they are cancelled once the
    victim is done. Returns the victim's result, or the exception it raised.
    """

    def site(cid: str, policy: SitePolicy, seed: int) -> Any:
        rng = np.random.default_rng(seed)
        return run_site(fed, tmp / cid, cid, policy, rng, retry_timeout=10.0, poll_wait=1.0)

    tasks = [
        asyncio.ensure_future(site(s, PermissivePolicy(), seed=k)) for k, s in enumerate(puppets)
    ]
    try:
        (result,) = await asyncio.wait_for(
            asyncio.gather(site("victim", victim_policy, 9), return_exceptions=True), timeout
        )
    finally:
        for p in tasks:
            p.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def assert_nothing_stored_from(fed: Any, cid: str) -> None:
    """A round was started, and the server holds no message of any stage from ``cid``."""
    store = fed.engine.store
    rounds = store.rounds()
    assert rounds, "the attack round was started"
    assert all(
        s.client_id != cid
        for r in rounds
        for stage in STAGES
        for s in store.submissions(r.round, stage)
    )
