"""Real :class:`confide.client.Client` sites against ``make_fed``'s server, over real HTTP.

Each site holds 40 records of ``N_FEATURES`` normal features labelled by the sign of the
first one, drawn from the generator the test passes (one generator shared by several
sites draws their data in the order they start).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confide.client import Client, SitePolicy
from confide.data import Dataset
from confide.training import NumpyTrainer
from tests.server.util import N_FEATURES
from tests.support import PermissivePolicy


def server_url(fed: Any) -> str:
    """The base URL of ``make_fed``'s server (a real socket)."""
    server = fed.http.server
    return f"http://{server.host}:{server.port}"


def site_data(rng: np.random.Generator, n: int = 40) -> Dataset:
    """``n`` records: normal features, label 1 where the first feature is positive."""
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    return Dataset(x, (x[:, 0] > 0).astype(np.int64))


async def run_site(
    fed: Any,
    state: Path,
    cid: str,
    policy: SitePolicy,
    rng: np.random.Generator,
    *,
    on_task: Callable[[Any], None] | None = None,
    **client: Any,
) -> Any:
    """Enrol ``cid`` (state in ``state``) with a fresh token and run it to the job's end.

    ``client`` goes to :class:`Client` (``retry_timeout``, ``poll_wait``, ``log``, ...).
    Returns the client's result; its exceptions propagate.
    """
    data = site_data(rng)
    trainer = NumpyTrainer.from_manifest(fed.engine.manifest)
    async with Client(server_url(fed), state, policy=policy, **client) as c:
        await c.enroll(fed.engine.create_tokens(1)[0], cid)
        return await c.run(trainer, data, on_task=on_task)


async def run_sites(
    fed: Any,
    tmp: Path,
    ids: Sequence[str],
    rng: np.random.Generator,
    timeout: float,
    on_task: Callable[[Any], None] | None = None,
) -> list[str]:
    """Run one permissive site per id (state in ``tmp / id``) at once; return their statuses."""

    async def status(cid: str) -> str:
        policy = PermissivePolicy()  # runtime tests: plain, non-DP jobs
        result = await run_site(
            fed, tmp / cid, cid, policy, rng, on_task=on_task, retry_timeout=5.0
        )
        return str(result.status)

    return list(await asyncio.wait_for(asyncio.gather(*(status(c) for c in ids)), timeout))
