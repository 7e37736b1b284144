"""The federated client: enrol once, then poll for work, train, upload, evaluate.

A :class:`Client` keeps its state in one folder: ``identity.pem`` (the Ed25519 key, mode
0600) and ``client.json`` (its id and server). It long-polls the server for a task; for a
``train`` task it downloads the announced model version, checks its SHA-256, trains with a
:class:`~confide.training.Trainer`, and uploads the *delta* (new minus announced weights) as
safetensors with ``num_examples`` in the metadata; for an ``evaluate`` task it evaluates the
announced model on its local test data and uploads the metrics as JSON. Every request is
signed (:mod:`confide.protocol.signing`).

Connection failures, 5xx answers and 408/425/429 are retried with exponential backoff and
jitter (at least the server's ``Retry-After``) until ``retry_timeout``; each retry is logged
with its URL and reason. A retried upload carries the same body, so the server answers with
the same receipt. Any other 4xx is a definitive refusal (:class:`~confide.errors.ServerError`);
certificate failures are never retried.

Every task is checked against the site's :class:`~confide.client.policy.SitePolicy` before
anything is trained or uploaded (strict by default: secure aggregation and DP required); a
task outside it is logged and raised as :class:`~confide.errors.PolicyViolation`, and the
client stops taking part in the job.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import numpy as np
from numpy.typing import NDArray

from confide.client.partial import train_round_delta, upload_manifest
from confide.client.policy import PrivacyLedger, SitePolicy
from confide.client.releases_log import ReleaseLog
from confide.client.secure import RngFactory, SecureParticipant
from confide.client.training import (
    check_per_sample,
    check_trainable,
    sample_ddg_step,
)
from confide.errors import (
    ConfigError,
    IntegrityError,
    PolicyViolation,
    ServerError,
    TransportError,
    WireFormatError,
)
from confide.protocol.manifest import Manifest, decode_tensors, encode_tensors, sha256_hex
from confide.protocol.signing import Identity
from confide.protocol.tasks import (
    EvaluateTask,
    FailedTask,
    FinishedTask,
    PrivacyTask,
    SecureTask,
    Task,
    TrainTask,
    parse_task,
)
from confide.secagg import SecAggError
from confide.training import SiteData, Trainer

if TYPE_CHECKING:
    from confide.noise import SecureRng
    from confide.privacy.distributed_dpsgd import SampleDDGParams

__all__ = ["Client", "ClientResult", "client_ssl_context", "loss_text"]


def loss_text(loss: float, *, secure: bool = False) -> str:
    """Say what a site's training loss was, without ever printing ``nan``.

    DP-SGD computes no un-noised loss (``nan``): under secure aggregation that reads "not
    reported under secure aggregation", otherwise "not computed under DP-SGD".

    Examples
    --------
    >>> loss_text(0.25)
    'loss 0.2500'
    >>> loss_text(float("nan"), secure=True)
    'loss not reported under secure aggregation'
    """
    if math.isfinite(loss):
        return f"loss {loss:.4f}" + (" (secure aggregation)" if secure else "")
    if secure:
        return "loss not reported under secure aggregation"
    return "loss not computed under DP-SGD"


_T = TypeVar("_T")
_IDENTITY_FILE = "identity.pem"
_STATE_FILE = "client.json"


def _provisioned_identity(
    state_dir: Path, client_id: str
) -> tuple[Identity, dict[str, Any] | None]:
    """Return the identity to enrol (existing ``identity.pem`` or fresh) and its certificate."""
    from confide.protocol.certs import CERT_FILE, SiteCertificate

    path = state_dir / _IDENTITY_FILE
    identity = Identity.load(path) if path.exists() else Identity.generate()
    cert_path = state_dir / CERT_FILE
    if not cert_path.exists():
        return identity, None
    cert = SiteCertificate.load(cert_path)
    if cert.site_id != client_id or cert.identity_key != base64.b64decode(identity.public_key_b64):
        raise ConfigError(
            f"{cert_path} certifies {cert.site_id!r} with another key than this site's "
            f"identity for {client_id!r}: have the provisioner sign the key `confide identity` "
            "prints, for this id"
        )
    return identity, cert.to_json()


def client_ssl_context(
    ca_file: str | Path | None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> ssl.SSLContext | None:
    """TLS context that verifies the server against ``ca_file`` (and presents a client cert).

    Parameters
    ----------
    ca_file : str or Path or None
        CA bundle the server's certificate must chain to; ``None`` for plain HTTP.
    cert_file, key_file : str or Path, optional
        Client certificate and key for mutual TLS.

    Returns
    -------
    ssl.SSLContext or None
        The context, or ``None`` when ``ca_file`` is ``None``.
    """
    if ca_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    return ctx


@dataclass(frozen=True)
class ClientResult:
    """How a client's participation ended.

    Parameters
    ----------
    status : str
        ``"finished"`` or ``"failed"`` (the job's final status).
    rounds_trained : int
        Training tasks this client completed.
    rounds_evaluated : int
        Evaluation tasks this client completed.
    final_model_sha256 : str or None
        The job's final model version, when finished.
    """

    status: str
    rounds_trained: int
    rounds_evaluated: int
    final_model_sha256: str | None


class Client:
    """A site taking part in a federated job.

    Parameters
    ----------
    server_url : str
        ``http://host:port`` or ``https://host:port``.
    state_dir : str or Path
        Folder for the identity key and client state (created, mode 0700).
    ssl_context : ssl.SSLContext, optional
        From :func:`client_ssl_context`; required for ``https`` URLs with a private CA.
    poll_wait : float
        Seconds one long-poll may wait on the server.
    retry_timeout : float
        Give up after the server has been unreachable this long.
    log : callable, optional
        Receives one line per event (round trained, uploaded, evaluated).
    rng_factory : callable, optional
        Source of the secure rounds' protocol randomness
        (:data:`confide.client.secure.RngFactory`); OS-keyed by default. For tests only.
    policy : SitePolicy, optional
        What the site insists on (:mod:`confide.client.policy`). ``None`` means the strict
        default ``SitePolicy()`` (the same as ``confide client`` without ``--policy``):
        secure aggregation and DP required.

    Examples
    --------
    >>> client = Client("http://127.0.0.1:8765", "/tmp/site-1")  # doctest: +SKIP
    >>> await client.enroll(token, "site-1")                    # doctest: +SKIP
    >>> await client.run(trainer, train, test)                   # doctest: +SKIP
    """

    def __init__(
        self,
        server_url: str,
        state_dir: str | Path,
        *,
        ssl_context: ssl.SSLContext | None = None,
        poll_wait: float = 20.0,
        retry_timeout: float = 120.0,
        log: Callable[[str], None] | None = None,
        rng_factory: RngFactory | None = None,
        policy: SitePolicy | None = None,
    ) -> None:
        if not server_url.startswith(("http://", "https://")):
            raise ConfigError(f"server URL must start with http:// or https://: {server_url!r}")
        self.server_url = server_url.rstrip("/")
        self.state_dir = Path(state_dir)
        self._ssl = ssl_context
        self.poll_wait = poll_wait
        self.retry_timeout = retry_timeout
        self._log = log or (lambda _line: None)
        self._session: aiohttp.ClientSession | None = None
        self._identity: Identity | None = None
        self.client_id: str | None = None
        self._model_cache: tuple[str, NDArray[np.float32]] | None = None
        self._secure: SecureParticipant | None = None
        self._rng_factory = rng_factory
        self._releases = ReleaseLog(self.state_dir)
        self.policy = policy if policy is not None else SitePolicy()
        self._ledger = PrivacyLedger(self.state_dir)
        self._warm: asyncio.Future[None] | None = None
        # (round, the mask seeds' precompute started after the share upload)
        self._precompute: tuple[int, asyncio.Future[int]] | None = None
        # (round, background fit, the advertise task that asked for it)
        self._training: (
            tuple[int, asyncio.Future[tuple[NDArray[np.float32], int, float]], SecureTask] | None
        ) = None
        self._load_state()

    # -- state -------------------------------------------------------------------------
    def _load_state(self) -> None:
        state = self.state_dir / _STATE_FILE
        if state.exists():
            doc = json.loads(state.read_text())
            self.client_id = str(doc["client_id"])
            self._identity = Identity.load(self.state_dir / _IDENTITY_FILE)
            key = doc.get("release_public_key")
            self.release_public_key = str(key) if isinstance(key, str) else None

    #: The server's model-release public key (base64 Ed25519), pinned at enrolment: every
    #: model a device runs must carry a release record signed by it
    #: (:func:`confide.protocol.release.verify_release`). ``None`` before enrolment or when
    #: the server offers no releases.
    release_public_key: str | None = None

    @property
    def enrolled(self) -> bool:
        """Whether this state folder holds an enrolled identity."""
        return self.client_id is not None

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.poll_wait + 60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- HTTP --------------------------------------------------------------------------
    async def _request(
        self,
        method: str,
        path: str,
        *,
        round_id: int = 0,
        stage: str = "task",
        body: bytes = b"",
        params: dict[str, str] | None = None,
        signed: bool = True,
        identity: Identity | None = None,
        client_id: str | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        """Send one request, re-signed on every retry; return the body and headers."""
        if self._session is None:
            raise ConfigError("use the client as 'async with Client(...) as client'")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_timeout
        url = self.server_url + path
        attempt = 0
        while True:
            headers = {"Content-Type": "application/octet-stream"}
            if signed:
                ident = identity or self._identity
                cid = client_id or self.client_id
                if ident is None or cid is None:
                    raise ConfigError("this client is not enrolled yet")
                headers.update(ident.sign_request(cid, method, path, round_id, stage, body))
            retry_after: float | None = None
            unreachable = False
            recovering = False
            try:
                async with self._session.request(
                    method,
                    url,
                    data=body or None,
                    headers=headers,
                    params=params,
                    # Large uploads wait for "100 Continue": the server reads a body only
                    # when it has a slot for it, and refuses (413, 401, 409) before it is
                    # sent. A small one goes with its headers (the server runs the same
                    # checks before it reads it): the round trip cost more than the body.
                    expect100=_expects_continue(method, body),
                ) as resp:
                    data = await resp.read()
                    if resp.status < 400:
                        return data, dict(resp.headers)
                    code, message = _error_fields(data)
                    if not _retryable(resp.status):
                        raise ServerError(resp.status, code, message)
                    reason = f"HTTP {resp.status} {code}: {message[:200]}"
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                    # A restarting server is alive: wait for it, however long the job.
                    recovering = resp.status == 503 and code == "recovering"
            except aiohttp.ClientConnectorCertificateError as exc:
                raise TransportError(f"TLS verification of the server failed: {exc}") from exc
            except aiohttp.ClientSSLError as exc:
                raise TransportError(f"TLS handshake with the server failed: {exc}") from exc
            except (
                aiohttp.ClientConnectionError,
                aiohttp.ClientPayloadError,
                asyncio.TimeoutError,
            ) as exc:
                unreachable = isinstance(exc, aiohttp.ClientConnectorError)
                reason = (
                    f"connection to {self.server_url} failed ({exc.os_error.strerror or exc}): "
                    "is confide-server running there?"
                    if isinstance(exc, aiohttp.ClientConnectorError)
                    else f"{type(exc).__name__}: {exc}"
                )
            attempt += 1
            delay = _backoff(attempt, retry_after)
            if recovering:
                give_up = max(give_up, loop.time() + delay + self.retry_timeout)
            left = give_up - loop.time()
            if left <= 0 or delay > left:
                what = "server unreachable" if unreachable else "failed"
                raise TransportError(
                    f"{method} {url}: {what} for {self.retry_timeout:.1f} s "
                    f"({attempt} attempts); last: {reason}"
                )
            # No silent waits: every retry says what failed, where, and when it tries again.
            self._log(
                f"{self.client_id or client_id or 'client'}: {method} {url}: {reason}; "
                f"retry {attempt} in {delay:.1f} s (gives up in {left:.0f} s)"
            )
            await asyncio.sleep(delay)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        data, _ = await self._request(method, path, **kwargs)
        return json.loads(data)

    # -- protocol ----------------------------------------------------------------------
    async def enroll(self, token: str, client_id: str) -> None:
        """Register a fresh identity with a one-time token (no-op if already enrolled).

        A site provisioned by a consortium (``confide identity`` made its key,
        ``confide provision sign`` its ``certificate.json``, both in the state folder)
        enrols that key and presents the certificate; otherwise a fresh key is made.

        Parameters
        ----------
        token : str
            One-time enrolment token from ``confide-server enroll``.
        client_id : str
            The id to register (1-64 characters from ``[A-Za-z0-9_.-]``).

        Raises
        ------
        ConfigError
            The state folder's certificate is unreadable or certifies another id or key.
        """
        if self.enrolled:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity, certificate = _provisioned_identity(self.state_dir, client_id)
        fields: dict[str, Any] = {
            "token": token,
            "client_id": client_id,
            "public_key": identity.public_key_b64,
        }
        if certificate is not None:
            fields["certificate"] = certificate
        body = json.dumps(fields).encode()
        data, _ = await self._request(
            "POST",
            "/v1/enroll",
            stage="enroll",
            body=body,
            identity=identity,
            client_id=client_id,
        )
        try:
            answer = json.loads(data)
        except ValueError:
            answer = {}
        key = answer.get("release_public_key") if isinstance(answer, dict) else None
        if key is not None and not isinstance(key, str):
            raise WireFormatError("enrolment answer: release_public_key must be a string")
        identity.save(self.state_dir / _IDENTITY_FILE)
        state: dict[str, Any] = {"client_id": client_id, "server": self.server_url}
        if key is not None:
            state["release_public_key"] = key
        (self.state_dir / _STATE_FILE).write_text(json.dumps(state) + "\n")
        self.release_public_key = key
        self._identity = identity
        self.client_id = client_id
        self._log(f"{client_id}: enrolled")

    async def fetch_manifest(self) -> Manifest:
        """Download the job's manifest and check it against its announced SHA-256."""
        doc = await self._json("GET", "/v1/manifest", signed=False)
        manifest = Manifest.from_dict(doc["manifest"])
        if manifest.sha256 != doc["sha256"]:
            raise IntegrityError("manifest does not hash to the announced SHA-256")
        return manifest

    async def next_task(self) -> Task:
        """Long-poll the server for this client's next task (parsed strictly, once)."""
        doc = await self._json("GET", "/v1/task", params={"wait": str(self.poll_wait)})
        return parse_task(doc)

    async def download_model(self, manifest: Manifest, sha256: str) -> NDArray[np.float32]:
        """Download a model version and verify its SHA-256 before decoding it.

        Raises
        ------
        IntegrityError
            The bytes do not hash to ``sha256``.
        """
        if self._model_cache is not None and self._model_cache[0] == sha256:
            cached: NDArray[np.float32] = self._model_cache[1].copy()
            return cached
        data, _ = await self._request("GET", f"/v1/models/{sha256}", stage="model")
        if sha256_hex(data) != sha256:
            raise IntegrityError(f"model {sha256[:12]}... does not match its SHA-256")
        vector, _ = decode_tensors(manifest, data)
        self._model_cache = (sha256, vector)
        fresh: NDArray[np.float32] = vector.copy()
        return fresh

    async def submit(self, round_id: int, stage: str, body: bytes) -> dict[str, Any]:
        """Upload a stage submission and return the server's receipt."""
        doc = await self._json(
            "PUT", f"/v1/rounds/{round_id}/{stage}", round_id=round_id, stage=stage, body=body
        )
        receipt: dict[str, Any] = doc["receipt"]
        return receipt

    def _seed(self, task_seed: int) -> int:
        digest = hashlib.sha256(f"{task_seed}:{self.client_id}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    async def run(
        self,
        trainer: Trainer,
        train: SiteData,
        test: SiteData | None = None,
        *,
        on_task: Callable[[Task], None] | None = None,
    ) -> ClientResult:
        """Take part in the job until it finishes or fails.

        Parameters
        ----------
        trainer : Trainer
            The local engine; its manifest must be the job's.
        train : SiteData
            Local training data.
        test : SiteData, optional
            Local evaluation data (defaults to ``train``).
        on_task : callable, optional
            Called with every task before it is carried out (monitoring, fault injection).

        Returns
        -------
        ClientResult
            The job's final status and this client's contribution.
        """
        manifest = await self.fetch_manifest()
        if manifest.sha256 != trainer.manifest.sha256:
            raise ConfigError("the trainer's manifest is not the job's manifest")
        self._refuse_if("the job", self.policy.check_model, manifest)
        # The accountant (dp-accounting) takes seconds to import and set up on a busy machine:
        # warm it up in the background, so the first round's epsilon check meets its deadline.
        self._warm = asyncio.ensure_future(asyncio.to_thread(self.policy.warm_up))  # never raises
        test = test or train
        trained = evaluated = 0
        while True:
            task = await self.next_task()
            action = task.action
            if isinstance(task, FinishedTask):
                self._log(f"{self.client_id}: job finished after {task.rounds} rounds")
                return ClientResult("finished", trained, evaluated, task.model_sha256)
            if isinstance(task, FailedTask):
                self._log(f"{self.client_id}: job failed: {task.reason}")
                return ClientResult("failed", trained, evaluated, None)
            if isinstance(task, SecureTask):
                if on_task is not None:
                    on_task(task)
                trained += await self._secure_step(task, manifest, trainer, train)
                continue
            if not isinstance(task, TrainTask | EvaluateTask):
                continue
            await self._settle_training()
            if on_task is not None:
                on_task(task)
            round_id = task.round
            weights = await self.download_model(manifest, task.model_sha256)
            trainer.set_weights(weights)
            try:
                if (
                    isinstance(task, TrainTask)
                    and (released := self._releases.get(round_id, "train")) is not None
                ):
                    # A redo (the server lost our upload, or we restarted): the same bytes,
                    # never a second noised release of the same round.
                    await self.submit(round_id, "train", released)
                    self._log(f"{self.client_id}: round {round_id} re-sent its recorded update")
                elif isinstance(task, TrainTask):
                    cfg = task.config
                    event = await self._refuse_in_thread(
                        f"round {round_id}",
                        self.policy.check_round,
                        task.privacy,
                        task.config,
                        self._ledger,
                        secure=False,
                    )
                    check_trainable(trainer, cfg)  # refused before anything is trained
                    # Local momentum kept across rounds and partial sharing live in the state
                    # folder; the delta is the shared coordinates only, bounded after selection.
                    delta, num_examples, loss = await asyncio.to_thread(
                        train_round_delta,
                        trainer,
                        weights,
                        train,
                        cfg,
                        self._seed(task.seed),
                        self.state_dir,
                    )
                    delta = _clip_for_privacy(delta, task.privacy)
                    meta = {"num_examples": str(num_examples)}
                    if math.isfinite(loss):  # DP-SGD reports no (un-noised) loss
                        meta["train_loss"] = repr(float(loss))
                    body = encode_tensors(upload_manifest(manifest, cfg), delta, meta)
                    self._releases.put(round_id, "train", body)  # durable before it is sent
                    self._ledger.record(round_id, event)  # before it leaves the site
                    await self.submit(round_id, "train", body)
                    trained += 1
                    self._log(
                        f"{self.client_id}: round {round_id} trained on "
                        f"{num_examples} examples, {loss_text(loss)}"
                    )
                else:
                    metrics = await asyncio.to_thread(trainer.evaluate, test)
                    num = int(metrics.pop("num_examples"))
                    clean = {k: v for k, v in metrics.items() if math.isfinite(v)}
                    body = json.dumps({"num_examples": num, "metrics": clean}).encode()
                    await self.submit(round_id, "evaluate", body)
                    evaluated += 1
                    self._log(
                        f"{self.client_id}: round {round_id} evaluated, accuracy "
                        f"{metrics.get('accuracy', float('nan')):.4f}"
                    )
            except ServerError as exc:
                if exc.status != 409:
                    raise
                # Late (the stage closed while we worked) or the round moved on: not fatal.
                self._log(f"{self.client_id}: round {round_id} {action} not accepted: {exc}")

    def _refuse_if(self, what: str, check: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a policy check; log and re-raise a violation (nothing has been uploaded)."""
        try:
            return check(*args, **kwargs)
        except PolicyViolation as exc:
            self._log(f"{self.client_id}: refused {what}: {exc}")
            raise

    async def _refuse_in_thread(
        self, what: str, check: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> _T:
        """:meth:`_refuse_if` in a worker thread (the event loop keeps serving)."""
        return await asyncio.to_thread(self._refuse_if, what, check, *args, **kwargs)

    async def _settle_training(self) -> None:
        """Wait for a secure round's background training (the trainer is not shared)."""
        if self._training is not None:
            job = self._training[1]
            self._training = None
            try:
                await job
            except Exception as exc:  # a failed fit must not stop the client
                self._log(f"{self.client_id}: background training failed: {exc}")

    async def _settle_precompute(self, round_id: int) -> None:
        """Wait for the mask seeds' precompute of ``round_id`` (another round's is dropped).

        A precompute that failed is only logged: ``masked_input`` derives the seeds itself.
        """
        if self._precompute is None or self._precompute[0] != round_id:
            self._drop_precompute()
            return
        job = self._precompute[1]
        self._precompute = None
        try:
            await job
        except Exception as exc:  # never fatal: masked_input agrees on demand
            self._precompute_failed(round_id, exc)

    def _drop_precompute(self) -> None:
        """Let go of a left round's pending mask precompute without waiting for it.

        It zeroes what it derived when it ends; its outcome is still collected (and a
        failure logged), so asyncio never reports an exception that was never retrieved.
        """
        if self._precompute is None:
            return
        round_id, job = self._precompute
        self._precompute = None

        def collect(done: asyncio.Future[int]) -> None:
            if not done.cancelled() and (exc := done.exception()) is not None:
                self._precompute_failed(round_id, exc)

        job.add_done_callback(collect)

    def _precompute_failed(self, round_id: int, exc: BaseException) -> None:
        self._log(f"{self.client_id}: round {round_id}: mask precompute failed: {type(exc)}")

    async def _secure_step(
        self, task: SecureTask, manifest: Manifest, trainer: Trainer, train: SiteData
    ) -> int:
        """Carry out one SecAgg+ task; return 1 when a masked update was accepted, else 0.

        At ``advertise`` the announced model is downloaded (hash checked) and training starts
        in the background; the masked update is sent at ``mask``. A round this process has
        no state for (it restarted) is sat out; an inconsistent request or a refused message
        drops this client from the round, never the job.
        """
        round_id, stage = task.round, task.stage
        if self._secure is None:
            if self._identity is None or self.client_id is None:
                raise ConfigError("this client is not enrolled yet")
            self._secure = SecureParticipant(
                self.client_id,
                self._identity.private_key,
                self.state_dir,
                rng_factory=self._rng_factory,
                policy=self.policy,
                ledger=self._ledger,
            )
        part = self._secure
        try:
            if stage == "advertise":
                await self._settle_training()
                self._drop_precompute()  # an earlier round's: it zeroes what it derived
                if task.model_sha256 is None or task.config is None:  # parse_task ensures it
                    raise IntegrityError("an advertise task without a model or config")
                weights = await self.download_model(manifest, task.model_sha256)
                cfg = task.config
                distributed_sgd = task.privacy is not None and (
                    task.privacy.mode == "sample_distributed"
                )
                # Refused before the advertisement is sent.
                if distributed_sgd:
                    check_per_sample(trainer, "distributed patient-level DP-SGD")
                else:
                    check_trainable(trainer, cfg)
                # In a worker thread: the policy's epsilon check may take a while.
                msg = await self._refuse_in_thread(f"round {round_id}", part.advertise, task)
                sddg = part.sample_ddg(round_id)
                if sddg is not None:
                    rng = (
                        None if self._rng_factory is None else self._rng_factory("dpsgd", round_id)
                    )
                    job = asyncio.ensure_future(
                        asyncio.to_thread(
                            _sample_ddg_job, trainer, weights, train, sddg, rng, len(train)
                        )
                    )
                else:
                    job = asyncio.ensure_future(
                        asyncio.to_thread(
                            train_round_delta,
                            trainer,
                            weights,
                            train,
                            cfg,
                            self._seed(task.seed),
                            self.state_dir,
                        )
                    )
                self._training = (round_id, job, task)
                await self.submit(round_id, stage, json.dumps(msg).encode())
                return 0
            if not part.known(round_id):
                self._log(f"{self.client_id}: round {round_id} {stage}: no state, sitting out")
                await asyncio.sleep(1.0)
                return 0
            update, weight = None, 0
            if stage == "mask":
                # The job's epsilon, before anything derived from the data leaves the site.
                await self._refuse_in_thread(f"round {round_id}", part.check_budget, round_id)
                if self._training is None or self._training[0] != round_id:
                    raise IntegrityError(f"no training result for round {round_id}")
                delta, weight, loss = await self._training[1]
                if part.sample_ddg(round_id) is not None:
                    update = delta  # the noised ring vector of one DP-SGD step
                    self._log(
                        f"{self.client_id}: round {round_id}: one distributed DP-SGD step "
                        f"over {weight} local records (noised share; loss not computed)"
                    )
                else:
                    update = _clip_for_privacy(delta, self._training[2].privacy)
                    self._log(
                        f"{self.client_id}: round {round_id} trained on {weight} examples, "
                        f"{loss_text(loss, secure=True)}"
                    )
                self._training = None
            if stage == "mask":
                await self._settle_precompute(round_id)
            msg = part.answer(task, update, weight)
            if stage == "mask":
                self._ledger.record(round_id, part.round_event(round_id))
            await self.submit(round_id, stage, json.dumps(msg).encode())
            if stage == "share":
                # The mask stage's k pairwise X25519 agreements, while we wait for it (in a
                # worker thread: the event loop keeps serving this process's other sites).
                precompute = part.mask_precompute(round_id)
                if precompute is not None:
                    self._precompute = (
                        round_id,
                        asyncio.ensure_future(asyncio.to_thread(precompute)),
                    )
            return 1 if stage == "mask" else 0
        except (SecAggError, IntegrityError) as exc:
            part.finish(round_id)
            self._log(f"{self.client_id}: round {round_id} {stage}: left the round: {exc}")
        except ServerError as exc:
            if exc.status not in (409, 422):
                raise
            part.finish(round_id)
            self._log(f"{self.client_id}: round {round_id} {stage} not accepted: {exc}")
        return 0


def _sample_ddg_job(
    trainer: Trainer,
    weights: NDArray[np.float32],
    data: SiteData,
    params: SampleDDGParams,
    rng: SecureRng | None,
    records: int,
) -> tuple[NDArray[Any], int, float]:
    """Worker-thread job of a distributed DP-SGD round, shaped like :func:`train_delta`."""
    return sample_ddg_step(trainer, weights, data, params, rng=rng), records, float("nan")


def _clip_for_privacy(
    delta: NDArray[np.float32], privacy: PrivacyTask | None
) -> NDArray[np.float32]:
    """Client-level DP (``privacy.update_clip_norm`` in the task): clip the update to ``C``."""
    clip = None if privacy is None else privacy.update_clip_norm
    if clip is None:
        return delta
    from confide.privacy.client_dp import clip_update

    clipped, _ = clip_update(delta, float(clip))
    return clipped


#: Uploads of at least this many bytes wait for ``100 Continue`` before sending the body.
EXPECT_CONTINUE_MIN_BYTES = 64 * 1024


def _expects_continue(method: str, body: bytes) -> bool:
    """Whether a request sends ``Expect: 100-continue`` (a PUT of at least 64 KiB).

    A smaller body (a SecAgg+ message of a small model, an evaluation, a small update) is
    sent with its headers: its bytes take less than the extra round trip, and the server
    checks everything that needs no body (size, signature, round, stage, an upload slot)
    before it reads it either way.

    Examples
    --------
    >>> _expects_continue("PUT", bytes(64 * 1024)), _expects_continue("PUT", b"{}")
    (True, False)
    >>> _expects_continue("GET", bytes(10**6))
    False
    """
    return method == "PUT" and len(body) >= EXPECT_CONTINUE_MIN_BYTES


#: 4xx answers that mean "later", not "no": request timeout, too early, too many requests.
_RETRYABLE_4XX = frozenset({408, 425, 429})
_BACKOFF_BASE_S = 0.2
_BACKOFF_CAP_S = 10.0


def _retryable(status: int) -> bool:
    """Whether an HTTP error status is transient (5xx, 408, 425, 429): retried, not fatal."""
    return status >= 500 or status in _RETRYABLE_4XX


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After: <int>`` header (bounded to 60 s), else ``None``."""
    if value is None or not value.isascii() or not value.strip().isdigit():
        return None
    return float(min(int(value.strip()), 60))


def _backoff(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter: ``U(1/2, 1) * min(cap, base * 2**attempt)``.

    The jitter spreads the retries of many sites after a server restart; a server's
    ``Retry-After`` is a lower bound.
    """
    ceiling = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2.0 ** min(attempt, 16))
    delay = ceiling * (0.5 + 0.5 * _JITTER.random())
    return delay if retry_after is None else max(delay, retry_after)


_JITTER = random.SystemRandom()  # timing jitter only; never used for anything secret


def _error_fields(data: bytes) -> tuple[str, str]:
    try:
        doc = json.loads(data)
        err = doc["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        return "http_error", data[:200].decode(errors="replace")
