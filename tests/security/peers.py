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

from confide.client import Client, SitePolicy
from confide.data import Dataset
from confide.training import NumpyTrainer
from tests.server.util import N_FEATURES
from tests.support import PermissivePolicy

# Every stage a site can submit a message in.
STAGES = ("advertise", "share", "mask", "consistency", "unmask", "train", "evaluate")


def server_url(fed: Any) -> str:
    """The base URL of ``make_fed``'s server (a real socket)."""
    server = fed.http.server
    return f"http://{server.host}:{server.port}"


async def run_site(url: str, fed: Any, state: Path, cid: str, policy: SitePolicy, seed: int) -> Any:
    """Enrol ``cid`` (state in ``state``) with a fresh token and run it to the end."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, N_FEATURES)).astype(np.float32)
    data = Dataset(x, (x[:, 0] > 0).astype(np.int64))
    trainer = NumpyTrainer.from_manifest(fed.engine.manifest)
    async with Client(url, state, retry_timeout=10.0, poll_wait=1.0, policy=policy) as c:
        await c.enroll(fed.engine.create_tokens(1)[0], cid)
        return await c.run(trainer, data)


async def victim_among_puppets(
    fed: Any, tmp: Path, victim_policy: SitePolicy, puppets: list[str], timeout: float = 120.0
) -> Any:
    """Run ``victim`` (state in ``tmp / "victim"``) next to the server's ``puppets``.

    The puppets accept any task (:class:`PermissivePolicy`); they are cancelled once the
    victim is done. Returns the victim's result, or the exception it raised.
    """
    url = server_url(fed)
    tasks = [
        asyncio.ensure_future(run_site(url, fed, tmp / s, s, PermissivePolicy(), seed=k))
        for k, s in enumerate(puppets)
    ]
    try:
        (result,) = await asyncio.wait_for(
            asyncio.gather(
                run_site(url, fed, tmp / "victim", "victim", victim_policy, 9),
                return_exceptions=True,
            ),
            timeout,
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
