"""``confide-server simulate --backend ray``: large federations, many virtual clients per process.

The processes backend (:mod:`confide_server.simulate`) starts one OS process per site, about
63 MB each. This backend starts the same real ``confide-server`` process (through
:class:`~confide_server.launcher.Launcher`) and a few Ray actors, one per CPU given to Ray;
each actor runs many *virtual clients* as asyncio tasks in one process. Every virtual client
is the real :class:`confide.client.Client` talking real, signed HTTP to the real server: the
real trainer, DP-SGD, SecAgg+ participant and signing; nothing of the round engine or of
the client is re-implemented, and every check the handlers do is done.

Only the cohort of the current round is materialised. Between its rounds a virtual client
is idle: a bare :class:`~confide.client.Client` with its identity and an HTTP session doing
the real signed long poll (which keeps it selectable), no trainer, data or SecAgg+ state.
When a task names it, the actor builds the full client from the site's state folder for that
round (:class:`_RoundClient`, running :meth:`Client.run` from that task) and drops it after
the round's last stage for the site. State that must survive between rounds (the identity
key, ``client.json``, the consortium certificate ``certificate.json``, pinned peers, the
local momentum buffer, partial sharing's local model, the release log, the privacy ledger)
lives in that folder on disk, as it does for a real site. ``RayOptions(live_clients=True)``
keeps every client materialised for the whole run instead (the same final model).

Faults are injected by the simulator through the hooks the client offers
(``Client.run(on_task=...)``) and a thin subclass, never by a switch in shipped code:

* **dropout** ``f`` per stage: in every round, ``round(f * m)`` of the ``m`` clients still
  in the round at each droppable stage (the SecAgg+ stages, or ``train``) stop answering
  it: the client's task for that stage raises, the client is dropped (idle again), and it
  sits the rest of that round out (it has no round state any more).
* **stragglers** (a fraction, fixed per run): every training upload (``train``, ``mask``)
  is delayed by ``straggler_delay`` seconds; past the stage deadline they count as dropouts.
* **failures** (a fraction): the client task dies for good at its first task of a round
  chosen per client (round 1 .. rounds); the job's ``wait_for_clients`` is lowered by the
  number of planned failures so that the next rounds can start.

At the end the run reports the memory of the actors (RSS after the imports, peak RSS, and
their difference per virtual client), the throughput (rounds/s, accepted updates/s,
wall time per round from the server's own round timestamps), and per Ray node the actors,
virtual clients and updates sent there (the actors are spread over the nodes).

Only the breast-cancer table is supported (the image task needs torch per client).
Federations larger than the data set (455 training rows) draw each site's rows with
replacement (sites then overlap); smaller ones get the same disjoint split as the
processes backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from confide.client import Client, ClientResult
from confide.client.policy import SitePolicy
from confide.data import (
    Standardizer,
    load_breast_cancer,
    load_csv,
    partition_dirichlet,
    partition_iid,
    save_csv,
    train_test_split,
)
from confide.errors import ConfigError, TransportError
from confide.protocol.manifest import Manifest, encode_tensors
from confide.protocol.tasks import (
    EvaluateTask,
    FailedTask,
    FinishedTask,
    SecureTask,
    Task,
    TrainTask,
    WaitTask,
)
from confide.training import NumpyTrainer, build_trainer
from confide_server.auth import operator_token
from confide_server.config import parse_config, render_toml
from confide_server.launcher import Launcher, free_port
from confide_server.simulate import (
    SimulationOptions,
    clear_output,
    job_document,
    start_job,
    watch_rounds,
)

__all__ = [
    "FaultOptions",
    "RayOptions",
    "RayReport",
    "SiteSpec",
    "add_ray_arguments",
    "plan_faults",
    "run_from_args",
    "run_ray_simulation",
    "run_sites",
]

_MARKER = ".confide-simulate"
#: Stages a dropout can hit: SecAgg+ (consistency only when the job checks it) or plain.
SECURE_DROP_STAGES = ("advertise", "share", "mask", "consistency", "unmask")
PLAIN_DROP_STAGES = ("train",)
#: Stages whose upload is the trained update (what a straggler is slow at).
_UPLOAD_STAGES = ("train", "mask")
#: Sites of one actor enrolling at once, and how long one keeps retrying its enrolment.
_JOIN_CONCURRENCY = 32
_JOIN_RETRY_S = 120.0


@dataclass(frozen=True)
class RayOptions:
    """Where and how the virtual clients run.

    Parameters
    ----------
    address : str or None
        An existing Ray cluster (``ray://host:10001`` or ``host:6379``, or ``"auto"``);
        ``None`` starts a local Ray instance with ``num_cpus`` CPUs.
    num_cpus : int
        CPUs given to a local Ray (0: this machine's cores); one actor per CPU. On an
        existing cluster: the number of actors (0: the cluster's CPUs).
    num_gpus : float
        GPUs reserved per actor (fractions allowed).
    cohort : int
        Clients asked per round (0: every client).
    poll_wait : float
        Seconds one long poll of a virtual client may wait on the server.
    server_host : str
        Address the server listens on and the clients dial (``127.0.0.1``; on a cluster, an
        address of the head node that the other nodes reach).
    live_clients : bool
        Keep every virtual client materialised (a live :class:`Client` with its trainer and
        data) for the whole run, instead of only the cohort of the current round; for
        comparison (the final model is the same, see docs/simulation.md).
    """

    address: str | None = None
    num_cpus: int = 0
    num_gpus: float = 0.0
    cohort: int = 0
    poll_wait: float = 25.0
    server_host: str = "127.0.0.1"
    live_clients: bool = False


@dataclass(frozen=True)
class FaultOptions:
    """Faults the simulator injects (fractions in ``[0, 1)``; see the module docstring)."""

    dropout: float = 0.0
    stragglers: float = 0.0
    straggler_delay: float = 0.0
    failures: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SiteSpec:
    """One virtual client: what an actor needs to run it (plain data, sent to the actor).

    ``drop`` maps a round to the stage at which this client stops answering;
    ``fail_round`` is the round whose first task kills it for good (0: never).
    """

    client_id: str
    token: str
    state_dir: str
    train_csv: str
    test_csv: str
    drop: dict[int, str] = field(default_factory=dict)
    fail_round: int = 0
    delay_s: float = 0.0
    policy_path: str = ""  # the sites' site-policy.toml ("": the client's strict default)
    source_addr: str = ""  # the loopback address this site dials from ("": the OS's choice)


class _Dropout(Exception):  # noqa: N818 - an injected event, not an error
    """Raised by the injection hook: the client stops answering this stage."""


class _Failure(Exception):  # noqa: N818
    """Raised by the injection hook: the client task dies for good."""


class _SimClient(Client):
    """The real client; a straggler's training uploads are held back ``delay_s`` seconds.

    With ``source_addr`` (a loopback address, :func:`loopback_source`) its connections come
    from that address, as a real site's come from its own: the server's per-address limits
    (the connection cap per peer, the failed-enrolment lockout) then apply per site, not to
    the whole simulated federation at once.
    """

    def __init__(
        self,
        *args: Any,
        delay_s: float = 0.0,
        source_addr: str = "",
        session: aiohttp.ClientSession | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._delay_s = delay_s
        self._source_addr = source_addr
        self._shared_session = session

    async def __aenter__(self) -> Client:
        if self._shared_session is not None:  # the site's idle client's (one site, one pool)
            self._session = self._shared_session
            return self
        if not self._source_addr:
            return await super().__aenter__()
        # Client.__aenter__'s session (plain HTTP), bound to this site's source address.
        connector = aiohttp.TCPConnector(local_addr=(self._source_addr, 0))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.poll_wait + 60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._shared_session is not None:
            self._session = None  # its owner closes it
            return
        await super().__aexit__(*exc)

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The open HTTP session (inside ``async with``), for the site's round clients."""
        return self._session

    async def submit(self, round_id: int, stage: str, body: bytes) -> dict[str, Any]:
        if self._delay_s > 0 and stage in _UPLOAD_STAGES:
            await asyncio.sleep(self._delay_s)
        return await super().submit(round_id, stage, body)


def loopback_source(server_host: str, k: int) -> str:
    """Return the address site ``k`` (1-based) dials from: ``127.0.a.b`` on loopback, else "".

    Every ``127.x.y.z`` is this machine on Linux, so each simulated site gets its own peer
    address (up to 62,500 sites); a server that is not on loopback gets ``""`` (the OS
    picks the address, as for sites on other hosts).
    """
    if not server_host.startswith("127.") or not 1 <= k <= 250 * 250:
        return ""
    return f"127.0.{1 + (k - 1) // 250}.{1 + (k - 1) % 250}"


def plan_faults(
    client_ids: Sequence[str],
    rounds: int,
    stages: Sequence[str],
    faults: FaultOptions,
) -> tuple[dict[str, dict[int, str]], dict[str, int], set[str]]:
    """Decide, from ``faults.seed``, who drops out where, who fails and who straggles.

    Per round, the clients are shuffled; at each stage in ``stages`` the next
    ``round(dropout * m)`` of the ``m`` not yet dropped stop answering. With every client
    in the cohort, the number answering each stage is therefore known in advance
    (:func:`expected_answers`).

    Returns
    -------
    tuple
        ``(drops, fail_rounds, stragglers)``: ``drops[client][round] = stage``,
        ``fail_rounds[client] = round``, and the set of stragglers.
    """
    for name in ("dropout", "stragglers", "failures"):
        value = getattr(faults, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"fault fraction {name} must be in [0, 1), got {value}")
    if faults.straggler_delay < 0:
        raise ConfigError(f"straggler delay must be >= 0 s, got {faults.straggler_delay}")
    rng = np.random.default_rng([faults.seed, 16])
    ids = list(client_ids)
    n = len(ids)
    failing = [ids[int(i)] for i in rng.permutation(n)[: round(faults.failures * n)]]
    fail_rounds = {c: int(rng.integers(1, rounds + 1)) for c in failing}
    slow = {ids[int(i)] for i in rng.permutation(n)[: round(faults.stragglers * n)]}
    drops: dict[str, dict[int, str]] = {c: {} for c in ids}
    if faults.dropout > 0:
        for r in range(1, rounds + 1):
            order = [ids[int(i)] for i in rng.permutation(n)]
            at = 0
            for stage in stages:
                k = round(faults.dropout * (n - at))
                for c in order[at : at + k]:
                    drops[c][r] = stage
                at += k
    return drops, fail_rounds, slow


def expected_answers(n: int, stages: Sequence[str], dropout: float) -> dict[str, int]:
    """Clients answering each stage when all ``n`` are in the cohort (see :func:`plan_faults`)."""
    out: dict[str, int] = {}
    left = n
    for stage in stages:
        left -= round(dropout * left)
        out[stage] = left
    return out


# -- inside an actor -----------------------------------------------------------------------
def _rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; else the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class _RoundOver(Exception):  # noqa: N818 - control flow, not an error
    """Raised by :class:`_RoundClient` when its round is over for this site.

    ``task`` is a task of another round that the round client fetched (handed to the next
    materialisation), or ``None``.
    """

    def __init__(self, task: Task | None) -> None:
        super().__init__("round over")
        self.task = task


class _RoundClient(_SimClient):
    """The full client of one round, materialised when a task names the site.

    It starts with the task the idle poller fetched (handed over through :meth:`next_task`,
    the one call :meth:`Client.run` makes to get work) and ends, by raising
    :class:`_RoundOver`, after the round's last stage for this site: once its evaluation is
    uploaded, when a poll finds nothing to do and the site holds no SecAgg+ state for the
    round (a plain round between ``train`` and ``evaluate``: the next stage materialises a
    fresh client; nothing is lost, the state that lasts is in the state folder), or when a
    task of another round arrives. Everything else is :class:`Client`'s own code.
    """

    def __init__(
        self,
        *args: Any,
        first: Task,
        manifest: Manifest,
        counts: dict[str, Any],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._first: Task | None = first
        self._manifest = manifest
        self._round = int(getattr(first, "round", 0))
        self._evaluated = False
        self._counts = counts

    async def fetch_manifest(self) -> Manifest:
        # The site's idle client fetched it (hash checked) once this run, as a live client
        # does once per run: not once per round.
        return self._manifest

    async def next_task(self) -> Task:
        if self._first is not None:
            task, self._first = self._first, None
            return task
        if self._evaluated:
            raise _RoundOver(None)
        task = await super().next_task()
        if isinstance(task, WaitTask):
            if self._secure is None or not self._secure.known(self._round):
                raise _RoundOver(None)
            return task
        if isinstance(task, TrainTask | EvaluateTask | SecureTask) and task.round != self._round:
            raise _RoundOver(task)
        return task

    async def submit(self, round_id: int, stage: str, body: bytes) -> dict[str, Any]:
        receipt = await super().submit(round_id, stage, body)
        if stage in _UPLOAD_STAGES:
            self._counts["trained"] += 1
        if stage == "evaluate":
            self._evaluated = True
        return receipt


def _fault_hook(spec: SiteSpec) -> Callable[[Task], None]:
    """Return the ``on_task`` hook that injects this site's planned dropouts and failure."""

    def on_task(task: Task) -> None:
        if not isinstance(task, TrainTask | EvaluateTask | SecureTask):
            return
        r = task.round
        if spec.fail_round and r >= spec.fail_round:
            raise _Failure(f"injected failure in round {r}")
        if spec.drop.get(r) == task.action:  # every time: a rebuilt client must not answer
            raise _Dropout(f"injected dropout at round {r} {task.action}")

    return on_task


class _Meter:
    """An actor's live count of materialised clients, and its RSS when the first one came."""

    def __init__(self) -> None:
        self.joining = asyncio.Semaphore(_JOIN_CONCURRENCY)
        self.live = 0
        self.max_live = 0
        self.materialised = 0
        self.rss_idle: int | None = None

    def enter(self) -> None:
        if self.rss_idle is None:  # every client of this actor is idle (and polling) now
            self.rss_idle = _rss_bytes()
        self.live += 1
        self.materialised += 1
        self.max_live = max(self.max_live, self.live)

    def leave(self) -> None:
        self.live -= 1


async def _virtual_client(
    server_url: str,
    spec: SiteSpec,
    poll_wait: float,
    retry_timeout: float,
    log: Callable[[str], None] | None,
    meter: _Meter | None = None,
) -> dict[str, Any]:
    """Run one site until the job ends: idle between rounds, materialised for its rounds.

    Idle, the site is a bare :class:`Client` (its identity and an HTTP session: no trainer,
    no data, no SecAgg+ state) doing the real signed long poll, which keeps it selectable.
    When a task names it, a :class:`_RoundClient` is built from the state folder (manifest,
    trainer, the site's CSVs, policy) and runs :meth:`Client.run` with that task until the
    round is over for it; then it is dropped. With ``meter`` ``None`` (``live_clients``) the
    site is one always-live client instead, as before.
    """
    if meter is None:
        return await _live_client(server_url, spec, poll_wait, retry_timeout, log)
    outcome: dict[str, Any] = {"client_id": spec.client_id, "dropouts": 0, "trained": 0}
    dropped: set[str] = set()
    on_task = _fault_hook(spec)
    idle = _SimClient(
        server_url,
        spec.state_dir,
        poll_wait=poll_wait,
        retry_timeout=retry_timeout,
        source_addr=spec.source_addr,
        log=log,
    )
    try:
        async with idle:
            # Sites join a few at a time (a federation's sites do not all start in the same
            # second), each with a real site's patience: thousands of simultaneous enrolments
            # overflow the server's listen backlog and outlast a 20 s retry window.
            async with meter.joining:
                idle.retry_timeout = max(retry_timeout, _JOIN_RETRY_S)
                if not idle.enrolled:
                    await idle.enroll(spec.token, spec.client_id)
                manifest = await idle.fetch_manifest()  # hash checked; once per run
                idle.retry_timeout = retry_timeout
            pending: Task | None = None
            while True:
                try:
                    task = pending or await idle.next_task()
                except TransportError as exc:
                    # The server dropped this long poll and the retries ran out of the poll's
                    # window (a busy server, thousands of polls): it is alive, poll again. A
                    # server that is gone (connection refused: the job ended) ends the site.
                    if "server unreachable" in str(exc):
                        raise
                    continue
                pending = None
                if isinstance(task, FinishedTask):
                    outcome["status"] = "finished"
                    return outcome
                if isinstance(task, FailedTask):
                    outcome["status"] = "failed"
                    return outcome
                if not isinstance(task, TrainTask | EvaluateTask | SecureTask):
                    continue  # wait: poll again
                try:
                    on_task(task)  # a site that stops answering builds nothing
                    meter.enter()
                    try:
                        got = await _materialised_round(
                            server_url,
                            spec,
                            task,
                            manifest,
                            idle.session,
                            poll_wait,
                            retry_timeout,
                            log,
                            on_task,
                            outcome,
                        )
                    finally:
                        meter.leave()
                except TransportError as exc:
                    # The round client's retries ran out on a busy server that is still up:
                    # the site missed (part of) this round; idle again, as a real site would.
                    if "server unreachable" in str(exc):
                        raise
                    if log is not None:
                        log(f"{spec.client_id}: left the round: {exc}")
                    continue
                except _Dropout as exc:
                    if log is not None:
                        log(f"{spec.client_id}: {exc}")
                    if str(exc) not in dropped:
                        dropped.add(str(exc))
                        outcome["dropouts"] += 1
                    await asyncio.sleep(1.0)  # as the client itself waits when it sits out
                    continue
                if isinstance(got, ClientResult):
                    outcome["status"] = got.status
                    return outcome
                pending = got
    except _Failure:
        outcome["status"] = "failed (injected)"
    except Exception as exc:  # reported to the driver, which fails the run
        outcome["status"] = f"error: {type(exc).__name__}: {exc}"
    return outcome


def _site_client_args(
    spec: SiteSpec,
    poll_wait: float,
    retry_timeout: float,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Return the keyword arguments every full client of ``spec``'s site is built with.

    One place for the round client (:func:`_materialised_round`) and the always-live one
    (:func:`_live_client`): the site's policy, polling, retries, straggler delay, source
    address and log.
    """
    return {
        "policy": SitePolicy.load(spec.policy_path) if spec.policy_path else None,
        "poll_wait": poll_wait,
        "retry_timeout": retry_timeout,
        "delay_s": spec.delay_s,
        "source_addr": spec.source_addr,
        "log": log,
    }


async def _materialised_round(
    server_url: str,
    spec: SiteSpec,
    first: Task,
    manifest: Manifest,
    session: aiohttp.ClientSession | None,
    poll_wait: float,
    retry_timeout: float,
    log: Callable[[str], None] | None,
    on_task: Callable[[Task], None],
    outcome: dict[str, Any],
) -> Task | ClientResult | None:
    """Build the site's full client from its state folder, run its round, drop it.

    Returns the next round's task when the round client fetched one, the client's result
    when the job ended inside the round, else ``None``.
    """
    client = _RoundClient(
        server_url,
        spec.state_dir,
        **_site_client_args(spec, poll_wait, retry_timeout, log),
        session=session,
        first=first,
        manifest=manifest,
        counts=outcome,
    )
    async with client:
        trainer = build_trainer(manifest)
        train = load_csv(spec.train_csv)
        test = load_csv(spec.test_csv)
        try:
            result = await client.run(trainer, train, test, on_task=on_task)
        except _RoundOver as over:
            return over.task
    return result  # the job ended inside the round (run returned)


async def _live_client(
    server_url: str,
    spec: SiteSpec,
    poll_wait: float,
    retry_timeout: float,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """Run one site as one always-live client; rebuilt from its state folder after a dropout."""
    train = load_csv(spec.train_csv)
    test = load_csv(spec.test_csv)
    dropped: set[str] = set()
    outcome: dict[str, Any] = {"client_id": spec.client_id, "dropouts": 0, "trained": 0}
    on_task = _fault_hook(spec)
    while True:
        client = _SimClient(
            server_url, spec.state_dir, **_site_client_args(spec, poll_wait, retry_timeout, log)
        )
        try:
            async with client:
                manifest = await client.fetch_manifest()
                trainer = build_trainer(manifest)
                if not client.enrolled:
                    await client.enroll(spec.token, spec.client_id)
                result = await client.run(trainer, train, test, on_task=on_task)
        except _Dropout as exc:
            if log is not None:
                log(f"{spec.client_id}: {exc}")
            if str(exc) not in dropped:
                dropped.add(str(exc))
                outcome["dropouts"] += 1
            await asyncio.sleep(1.0)  # as the client itself waits when it sits a round out
            continue
        except _Failure:
            outcome["status"] = "failed (injected)"
            return outcome
        except Exception as exc:  # reported to the driver, which fails the run
            outcome["status"] = f"error: {type(exc).__name__}: {exc}"
            return outcome
        outcome["status"] = result.status
        outcome["trained"] += result.rounds_trained
        return outcome


async def run_sites(
    server_url: str,
    sites: Sequence[SiteSpec],
    *,
    poll_wait: float = 25.0,
    retry_timeout: float = 20.0,
    log_file: str | Path | None = None,
    live_clients: bool = False,
) -> dict[str, Any]:
    """Run ``sites`` as asyncio tasks in this process; return their outcomes and memory.

    This is what each Ray actor does; it runs without Ray too (one process, many clients).
    The clients' event lines go to ``log_file`` (appended) when given. Each site is idle
    between its rounds and materialised for them (:func:`_virtual_client`), or with
    ``live_clients`` one always-live :class:`Client` for the whole run.
    """
    rss_base = _rss_bytes()
    meter = None if live_clients else _Meter()
    out = None if log_file is None else open(log_file, "a", buffering=1)  # noqa: SIM115
    log = None if out is None else (lambda line: print(line, file=out))
    try:
        outcomes = await asyncio.gather(
            *(_virtual_client(server_url, s, poll_wait, retry_timeout, log, meter) for s in sites)
        )
    finally:
        if out is not None:
            out.close()
    rss_end = _rss_bytes()
    return {
        "pid": os.getpid(),
        "clients": len(sites),
        "rss_base": rss_base,
        "rss_end": rss_end,
        "rss_peak": _peak_rss_bytes(),
        # Idle clients only (RSS just before the first materialisation), and how many were
        # materialised at once at most / in all (0 for always-live clients).
        "rss_idle": rss_end if meter is None or meter.rss_idle is None else meter.rss_idle,
        "max_materialised": 0 if meter is None else meter.max_live,
        "materialisations": 0 if meter is None else meter.materialised,
        "outcomes": list(outcomes),
    }


class SiteWorker:
    """The Ray actor's class (wrapped with ``ray.remote`` by the driver)."""

    def __init__(
        self,
        server_url: str,
        sites: list[dict[str, Any]],
        poll_wait: float,
        log_file: str | None = None,
        live_clients: bool = False,
    ) -> None:
        # Imports done before the baseline RSS is taken (a fresh worker imports lazily).
        import confide.client.secure
        import confide.training  # noqa: F401

        self.server_url = server_url
        self.sites = [
            SiteSpec(**{**s, "drop": {int(k): v for k, v in s["drop"].items()}}) for s in sites
        ]
        self.poll_wait = poll_wait
        self.log_file = log_file
        self.live_clients = live_clients

    async def run(self) -> dict[str, Any]:
        """Run every virtual client of this actor until the job ends."""
        import ray

        out = await run_sites(
            self.server_url,
            self.sites,
            poll_wait=self.poll_wait,
            log_file=self.log_file,
            live_clients=self.live_clients,
        )
        out["node_id"] = ray.get_runtime_context().get_node_id()  # the driver adds its IP
        return out


# -- the driver ------------------------------------------------------------------------------
@dataclass
class RayReport:
    """What a Ray simulation did (``rc`` 0 = success); :meth:`lines` prints it."""

    rc: int
    clients: int
    actors: int
    status: dict[str, Any] | None
    wall_s: float
    rounds_s: list[float]
    actors_info: list[dict[str, Any]]
    server_peak_rss: int
    expected: dict[str, int]
    errors: list[str]
    #: Seconds to start the server, make the enrolment tokens and provision the sites.
    setup_s: float = 0.0
    #: Seconds from the actors' start to round 1 (every site enrolled and polling).
    to_first_round_s: float = 0.0

    @property
    def committed(self) -> list[dict[str, Any]]:
        """The committed rounds of the final status."""
        rows = [] if self.status is None else self.status["rounds"]
        return [r for r in rows if r["status"] == "committed"]

    @property
    def updates(self) -> int:
        """Updates aggregated over the run (survivors of every committed round)."""
        return sum(int((r["metrics"] or {}).get("train_clients", 0)) for r in self.committed)

    def memory(self) -> dict[str, float]:
        """Actor memory in MiB: totals, and per idle / per materialised virtual client.

        ``idle_per_client_mib``: RSS just before an actor's first materialisation (all its
        clients idle and polling) above the post-import baseline, per client;
        ``materialised_per_client_mib``: peak RSS above that, per client materialised at
        the same time (at most); ``per_client_mib``: peak above the baseline, per client.
        """
        mib = 1024.0 * 1024.0
        info = self.actors_info
        peak = sum(a["rss_peak"] for a in info)
        grown = sum(max(0, a["rss_peak"] - a["rss_base"]) for a in info)
        n = max(1, sum(a["clients"] for a in info))
        idle = sum(max(0, a.get("rss_idle", a["rss_base"]) - a["rss_base"]) for a in info)
        live = sum(a.get("max_materialised", 0) for a in info)
        above = sum(max(0, a["rss_peak"] - a.get("rss_idle", a["rss_peak"])) for a in info)
        return {
            "actors_peak_mib": peak / mib,
            "actors_base_mib": sum(a["rss_base"] for a in info) / mib,
            "per_client_mib": grown / n / mib,
            "per_client_all_in_mib": peak / n / mib,
            "idle_per_client_mib": idle / n / mib,
            "max_materialised": float(live),
            "materialised_per_client_mib": above / max(1, live) / mib,
            "server_peak_mib": self.server_peak_rss / mib,
        }

    def nodes(self) -> dict[str, dict[str, int]]:
        """Per Ray node (its IP, else its id): actors, virtual clients, updates they sent."""
        out: dict[str, dict[str, int]] = {}
        for a in self.actors_info:
            key = a.get("node_ip") or a.get("node_id") or "?"
            row = out.setdefault(key, {"actors": 0, "clients": 0, "updates": 0})
            row["actors"] += 1
            row["clients"] += int(a["clients"])
            row["updates"] += sum(int(o["trained"]) for o in a["outcomes"])
        return out

    def lines(self) -> list[str]:
        """Return the end-of-run report, one line per item."""
        mem = self.memory()
        n_rounds = len(self.committed)
        per_round = sum(self.rounds_s) / len(self.rounds_s) if self.rounds_s else float("nan")
        wall = max(self.wall_s, 1e-9)
        out = [
            f"ray backend: {self.clients} virtual clients on {self.actors} actors",
            f"memory: actors' peak RSS {mem['actors_peak_mib']:.0f} MiB "
            f"(after imports {mem['actors_base_mib']:.0f} MiB), "
            f"{mem['per_client_mib']:.2f} MiB per virtual client above that "
            f"({mem['per_client_all_in_mib']:.2f} MiB all-in); "
            f"server peak RSS {mem['server_peak_mib']:.0f} MiB",
            f"materialised: at most {mem['max_materialised']:.0f} clients at once, "
            f"{mem['materialised_per_client_mib']:.3f} MiB each; idle clients "
            f"{mem['idle_per_client_mib']:.3f} MiB each",
            f"throughput: {n_rounds} rounds committed in {self.wall_s:.1f} s "
            f"({n_rounds / wall:.3f} rounds/s, {self.updates / wall:.2f} updates/s), "
            f"{per_round:.1f} s per round (server round timestamps)",
            f"setup: server, tokens and site certificates {self.setup_s:.1f} s; "
            f"{self.to_first_round_s:.1f} s from the actors' start to round 1 "
            "(every site enrolled and polling)",
        ]
        out.extend(
            f"node {key}: {row['actors']} actor{'s' * (row['actors'] != 1)}, "
            f"{row['clients']} virtual clients, {row['updates']} updates sent"
            for key, row in sorted(self.nodes().items())
        )
        priv = None if self.status is None else self.status.get("privacy")
        if priv is not None:
            out.append(f"privacy: epsilon = {priv['epsilon']:.3f} at delta = {priv['delta']:g}")
        return out


def _sites_for(opts: SimulationOptions, work: Path) -> tuple[list[Path], list[Path], int]:
    """Write each site's train/test CSV; return the paths and the training-set size."""
    full = load_breast_cancer()
    train, test = train_test_split(full, 0.2, seed=opts.seed)
    scaler = Standardizer.fit(train.x)
    train, test = scaler.apply(train), scaler.apply(test)
    n = opts.clients
    rng = np.random.default_rng(opts.seed)
    if n <= len(train) // 2:
        if opts.partition == "dirichlet":
            parts = partition_dirichlet(train.y, n, opts.alpha, seed=opts.seed)
        else:
            parts = partition_iid(len(train), n, seed=opts.seed)
    else:  # more sites than the data holds: each draws its rows with replacement
        if opts.partition != "iid":
            raise ConfigError(f"partition {opts.partition!r} needs clients <= {len(train) // 2}")
        parts = [np.sort(rng.integers(0, len(train), size=4)) for _ in range(n)]
    if n <= len(test):
        test_parts = partition_iid(len(test), n, seed=opts.seed + 1)
    else:
        test_parts = [np.sort(rng.integers(0, len(test), size=2)) for _ in range(n)]
    sites = work / "sites"
    sites.mkdir(exist_ok=True)
    tr_paths, te_paths = [], []
    for k in range(1, n + 1):
        tr_paths.append(sites / f"site-{k}-train.csv")
        te_paths.append(sites / f"site-{k}-test.csv")
        save_csv(train.subset(parts[k - 1]), tr_paths[-1])
        save_csv(test.subset(test_parts[k - 1]), te_paths[-1])
    trainer = NumpyTrainer.create(
        opts.model, train.n_features, 2, opts.hidden if opts.model == "mlp" else (), seed=opts.seed
    )
    trainer.manifest.save(work / "model.json")
    (work / "init.safetensors").write_bytes(encode_tensors(trainer.manifest, trainer.get_weights()))
    return tr_paths, te_paths, len(train)


def _job_doc(
    opts: SimulationOptions, ray_opts: RayOptions, faults: FaultOptions, port: int, failing: int
) -> dict[str, dict[str, Any]]:
    doc = job_document(opts, port)
    job = doc["job"]
    cohort = ray_opts.cohort or opts.clients
    if not 1 <= cohort <= opts.clients:
        raise ConfigError(f"cohort must be in [1, clients={opts.clients}], got {cohort}")
    job["cohort_size"] = cohort
    if not opts.min_clients:
        job["min_clients"] = max(1, math.ceil(cohort / 2))
    job["min_clients"] = min(job["min_clients"], cohort)
    # Every client must be up before round 1 (less those planned to fail, for later rounds).
    job["wait_for_clients"] = max(job["min_clients"], opts.clients - failing)
    # A virtual client in the cohort may be busy: count it as available for a long window.
    job.setdefault("active_window_s", 120.0)
    doc["server"]["host"] = ray_opts.server_host
    # Clients sitting a stage out poll once a second: let them all hear that the job ended.
    doc["server"].setdefault("linger_s", 5.0)
    doc["server"]["linger_s"] = max(5.0, float(doc["server"]["linger_s"]))
    if opts.secagg and faults.dropout > 0 and "dropout_fraction" not in opts.extra_secagg:
        lost = 1.0 - (1.0 - faults.dropout) ** 4 + faults.stragglers + faults.failures
        doc["secagg"]["dropout_fraction"] = min(0.6, round(lost + 0.05, 2))
    return doc


def _proc_rss(pid: int) -> int:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _round_seconds(rounds: list[dict[str, Any]]) -> list[float]:
    out = []
    for r in rounds:
        if r["status"] == "committed" and r.get("started_at") and r.get("ended_at"):
            out.append(float(r["ended_at"]) - float(r["started_at"]))
    return out


def _first_round_s(status: dict[str, Any] | None, since: float) -> float:
    rows = [] if status is None else status["rounds"]
    return max(0.0, float(rows[0]["started_at"]) - since) if rows else 0.0


def _server_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "confide_server", *args]


def run_ray_simulation(
    workdir: str | Path,
    opts: SimulationOptions,
    ray_opts: RayOptions | None = None,
    faults: FaultOptions | None = None,
    *,
    timeout: float = 600.0,
    quiet: bool = False,
) -> RayReport:
    """Run a federation of virtual clients on Ray against a real ``confide-server``.

    Parameters
    ----------
    workdir : str or Path
        Output folder (earlier simulation output in it is replaced).
    opts : SimulationOptions
        The job (``data`` must be ``"breast_cancer"``).
    ray_opts : RayOptions, optional
        Ray placement, cohort and polling.
    faults : FaultOptions, optional
        Injected dropouts, stragglers and failures.
    timeout : float
        Seconds before the run is declared failed.
    quiet : bool
        Print nothing (the report is returned).

    Returns
    -------
    RayReport
        Final status, per-round times, memory and throughput; ``rc`` 0 on success.

    Raises
    ------
    ConfigError
        An unsupported job, or ``ray`` is not installed (``pip install 'confide[ray]'``).
    """
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "the ray backend needs Ray: pip install 'confide[ray]' (or use --backend processes)"
        ) from exc
    ray_opts = ray_opts or RayOptions()
    faults = faults or FaultOptions(seed=opts.seed)
    if opts.data != "breast_cancer":
        raise ConfigError(
            "the ray backend runs the breast-cancer table only (--data breast_cancer)"
        )
    if opts.clients < 2 or opts.rounds < 1:
        raise ConfigError("the ray backend needs clients >= 2 and rounds >= 1")

    def say(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    t0 = time.monotonic()
    work = Path(workdir).resolve()
    clear_output(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / _MARKER).touch()
    ids = [f"hospital-{k}" for k in range(1, opts.clients + 1)]
    port = opts.port or free_port()
    probe = parse_config(_job_doc(opts, ray_opts, faults, port, 0), work)
    stages: tuple[str, ...] = PLAIN_DROP_STAGES
    if probe.secagg.enabled:
        stages = tuple(
            s for s in SECURE_DROP_STAGES if s != "consistency" or probe.secagg.consistency_check
        )
    drops, fail_rounds, slow = plan_faults(ids, opts.rounds, stages, faults)
    doc = _job_doc(opts, ray_opts, faults, port, len(fail_rounds))
    job = parse_config(doc, work)
    train_csv, test_csv, _ = _sites_for(opts, work)
    config = work / "job.toml"
    config.write_text(
        render_toml(doc, header="Written by `confide-server simulate --backend ray`.")
    )
    server_url = f"http://{ray_opts.server_host}:{port}"
    status_url = server_url + "/v1/status"
    expected = expected_answers(job.job.cohort_size, stages, faults.dropout)
    say(
        f"confide-server simulate --backend ray: {opts.clients} virtual clients, cohort "
        f"{job.job.cohort_size}, {opts.rounds} rounds, model {opts.model}, "
        f"secagg {'on' if job.secagg.enabled else 'off'}, dp {opts.dp}, server {server_url}"
    )
    launcher = Launcher(work / "logs")
    errors: list[str] = []
    status: dict[str, Any] | None = None
    actors_info: list[dict[str, Any]] = []
    server_peak = 0
    n_actors = 0
    started_ray = False
    actors: list[Any] = []
    try:
        # The virtual sites accept exactly the protections this job was configured with.
        t_enrol = time.monotonic()
        started = start_job(
            launcher, work, config, job, server_url, opts.clients, ready_timeout=240.0
        )
        if started is None:
            errors.append(f"server did not start:\n{launcher.tail('server')}")
            return RayReport(1, opts.clients, 0, None, 0.0, [], [], 0, expected, errors)
        server, tokens, policy = started.server, started.tokens, started.policy
        setup_s = time.monotonic() - t_enrol
        specs = [
            SiteSpec(
                client_id=cid,
                token=tokens[k],
                state_dir=str(work / "clients" / cid),
                train_csv=str(train_csv[k]),
                test_csv=str(test_csv[k]),
                drop=drops[cid],
                fail_round=fail_rounds.get(cid, 0),
                delay_s=faults.straggler_delay if cid in slow else 0.0,
                policy_path=str(policy),
                source_addr=loopback_source(ray_opts.server_host, k + 1),
            )
            for k, cid in enumerate(ids)
        ]
        if not ray.is_initialized():
            if ray_opts.address is None:
                cpus = ray_opts.num_cpus or os.cpu_count() or 1
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=ray_opts.address, log_to_driver=False)
            started_ray = True
        n_actors = ray_opts.num_cpus or int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        n_actors = max(1, min(n_actors, opts.clients))
        # Spread over the nodes: Ray's default packs actors onto the driver's node first
        # (two actors on a cluster of two 4-CPU nodes both landed on the head).
        actor_cls: Any = ray.remote(
            num_cpus=1, num_gpus=ray_opts.num_gpus, scheduling_strategy="SPREAD"
        )(SiteWorker)
        actors_at = time.time()  # the server's round timestamps are wall-clock
        actors = [
            actor_cls.remote(
                server_url,
                [asdict(s) for s in specs[a::n_actors]],
                ray_opts.poll_wait,
                str(work / "logs" / f"actor-{a}.log"),
                ray_opts.live_clients,
            )
            for a in range(n_actors)
        ]
        pending = [actor.run.remote() for actor in actors]
        say(f"{n_actors} Ray actors, {math.ceil(opts.clients / n_actors)} virtual clients each")
        token = operator_token(job.server.state_dir)
        peaks = [0]

        def show(r: dict[str, Any]) -> None:
            m = r["metrics"] or {}
            eps = (r.get("privacy") or {}).get("epsilon")
            say(
                f"round {r['round']:>3} {r['status']:<9} "
                f"{m.get('train_clients', 0)}/{len(r['cohort'])} updates, "
                f"accuracy {m.get('eval_accuracy', float('nan')):.4f}, "
                f"epsilon {'-' if eps is None else f'{eps:.3f}'}, "
                f"{time.monotonic() - t0:.1f} s"
            )

        def sample_rss() -> None:
            peaks[0] = max(peaks[0], _proc_rss(server.pid))

        status, timed_out = watch_rounds(
            server,
            status_url,
            token,
            show,
            t0=t0,
            timeout=timeout,
            on_poll=sample_rss,
            interval=0.2,
        )
        server_peak = peaks[0]
        if timed_out:
            errors.append(f"timed out after {timeout} s")
        server_rc = server.wait(timeout=30) if server.poll() is None and not errors else None
        server_rc = server.poll() if server_rc is None else server_rc
        wall = time.monotonic() - t0
        final = subprocess.run(  # noqa: S603
            _server_cmd("status", "--config", str(config), "--json"),
            capture_output=True,
            text=True,
        )
        if final.returncode == 0:
            status = json.loads(final.stdout)
        finished = status is not None and status["status"] == "finished"
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=60.0)
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}  # type: ignore[no-untyped-call]
        for ref in ready:
            info = ray.get(ref)
            info["node_ip"] = ips.get(info.get("node_id"), "")
            actors_info.append(info)
        if len(ready) < len(pending):
            errors.append(f"{len(pending) - len(ready)} actors did not finish")
        bad = [
            f"{o['client_id']}: {o['status']}"
            for a in actors_info
            for o in a["outcomes"]
            if o["status"] not in ("finished", "failed (injected)")
            # Sitting a stage out when the server exited: it missed the end, nothing else.
            and not (finished and o["status"].startswith("error: TransportError"))
        ]
        errors.extend(bad[:10])
        if server_rc != 0:
            errors.append(f"server exited with {server_rc}:\n{launcher.tail('server')}")
        if status is None or status["status"] != "finished":
            errors.append(f"job status {None if status is None else status['status']}")
        report = RayReport(
            0 if not errors else 1,
            opts.clients,
            n_actors,
            status,
            wall,
            _round_seconds([] if status is None else status["rounds"]),
            actors_info,
            server_peak,
            expected,
            errors,
            setup_s,
            _first_round_s(status, actors_at),
        )
        for line in report.lines():
            say(line)
        for line in errors:
            say(f"error: {line}")
        return report
    finally:
        launcher.stop_all()
        for actor in actors:  # on a shared cluster too: no virtual client outlives the run
            ray.kill(actor)
        if started_ray:
            ray.shutdown()


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--backend`` and the ``--ray-*`` options to ``confide-server simulate``."""
    parser.add_argument(
        "--backend",
        choices=["processes", "ray"],
        default="processes",
        help="one OS process per site (default), or many virtual clients per Ray actor "
        "(pip install 'confide[ray]'; docs/simulation.md)",
    )
    ray_group = parser.add_argument_group("ray backend (--backend ray)")
    ray_group.add_argument("--ray-address", default=None, help="an existing Ray cluster")
    ray_group.add_argument(
        "--ray-num-cpus", type=int, default=0, help="CPUs = actors (0: all cores/the cluster's)"
    )
    ray_group.add_argument(
        "--ray-server-host",
        default="127.0.0.1",
        help="address the server listens on and clients dial (a cluster: the head's)",
    )
    ray_group.add_argument("--ray-num-gpus", type=float, default=0.0, help="GPUs per actor")
    ray_group.add_argument("--ray-cohort", type=int, default=0, help="clients per round (0: all)")
    ray_group.add_argument(
        "--ray-dropout", type=float, default=0.0, help="fraction dropping out per stage"
    )
    ray_group.add_argument("--ray-stragglers", type=float, default=0.0, help="slow fraction")
    ray_group.add_argument(
        "--ray-straggler-delay", type=float, default=5.0, help="seconds a straggler is late"
    )
    ray_group.add_argument(
        "--ray-failures", type=float, default=0.0, help="fraction of clients that die"
    )
    ray_group.add_argument(
        "--ray-live-clients",
        action="store_true",
        help="keep every virtual client materialised for the whole run (default: only the "
        "cohort of the current round; idle sites just poll)",
    )


def run_from_args(args: argparse.Namespace, opts: SimulationOptions) -> int:
    """Run ``simulate --backend ray`` with parsed arguments; return the exit code."""
    if opts.data != "breast_cancer":
        print("--backend ray runs --data breast_cancer only", file=sys.stderr)
        return 2
    ray_opts = RayOptions(
        address=args.ray_address,
        num_cpus=args.ray_num_cpus,
        num_gpus=args.ray_num_gpus,
        cohort=args.ray_cohort,
        server_host=args.ray_server_host,
        live_clients=args.ray_live_clients,
    )
    faults = FaultOptions(
        dropout=args.ray_dropout,
        stragglers=args.ray_stragglers,
        straggler_delay=args.ray_straggler_delay,
        failures=args.ray_failures,
        seed=opts.seed,
    )
    try:
        report = run_ray_simulation(args.out, opts, ray_opts, faults, timeout=args.timeout)
    except ConfigError as exc:
        print(f"confide-server simulate: {exc}", file=sys.stderr)
        return 2
    return report.rc
