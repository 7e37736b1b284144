"""HTTP handlers: parse, authenticate, call the round engine, answer JSON. Nothing else."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from aiohttp import web

from confide.errors import FederationError, SignatureError, WireFormatError
from confide.protocol.jsonio import loads_bounded
from confide.protocol.manifest import sha256_hex
from confide.protocol.signing import SignedRequest, decode_public_key, verify_request
from confide.protocol.tasks import Task
from confide_server.auth import (
    authenticate,
    bound_client_id,
    check_body,
    check_operator,
    signed_headers,
)
from confide_server.blobs import StagedUpload
from confide_server.connections import read_body_to, release_client
from confide_server.engine.releases import enrolment_fields
from confide_server.engine.rounds import (
    STATUS_PAGE_DEFAULT,
    STATUS_PAGE_MAX,
    EnrollmentError,
    RoundEngine,
)
from confide_server.engine.secure import secure_upload_limit
from confide_server.keys import (
    config_key,
    engine_key,
    enrol_limiter_key,
    notifier_key,
    upload_gate_key,
    wake_key,
)
from confide_server.middlewares import (
    RequestError,
    error_response,
    json_error,
    refuse_encoded_body,
    storage_error,
)
from confide_server.releases import releases_key

if TYPE_CHECKING:
    from confide.protocol.certs import SiteCertificate
    from confide_server.config import ServerConfig

__all__ = [
    "enroll_client",
    "expect_upload",
    "get_health",
    "get_manifest",
    "get_model",
    "get_status",
    "get_task",
    "put_submission",
]

_MAX_ENROLL_BYTES = 8192
_MAX_EVAL_BYTES = 65536
#: JSON submissions (evaluation metrics, SecAgg+ messages) up to this size are read into
#: memory instead of being staged to a file: each is decoded and kept as a row, never
#: stored as a blob, so the file was only a round trip through the disk. At most this many
#: bytes per upload slot (``server.max_concurrent_uploads``); larger ones (a SecAgg+
#: masked input of a big model) and every tensor upload are streamed to disk as before.
IN_MEMORY_BODY_BYTES = 262144


#: The largest round id ``?before=`` takes (SQLite's INTEGER is 64-bit; ids count from 1).
_MAX_ROUND_ID = 2**62


def _query_int(request: web.Request, name: str, lo: int, hi: int) -> int | None:
    """Parse an optional ``?name=`` of ASCII digits in ``[lo, hi]``; 400 with what is expected."""
    raw = request.query.get(name)
    if raw is None:
        return None
    # str.isdigit() accepts other scripts' digits and int() would take them: ASCII only,
    # and bounded before int() so no huge string is converted.
    if not (0 < len(raw) <= 19 and raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
        raise RequestError(
            f"query parameter {name}={raw[:40]!r} is not valid: expected a whole number "
            f"from {lo} to {hi} in ASCII digits (e.g. ?{name}={lo}); the status answer's "
            "'next' is the value to pass as ?before= for the next page"
        )
    return int(raw)


async def get_health(request: web.Request) -> web.Response:
    """Liveness probe."""
    return web.json_response({"ok": True})


async def get_status(request: web.Request) -> web.Response:
    """Job status and per-round metrics: for the operator only (``Authorization: Bearer``).

    Cohorts and per-round total weights over several rounds would give each site's sample
    count, so only the operator token sees them (:func:`~confide_server.auth.check_operator`).
    """
    await asyncio.to_thread(check_operator, request)
    engine = request.app[engine_key]
    limit = _query_int(request, "limit", 1, STATUS_PAGE_MAX)
    before = _query_int(request, "before", 1, _MAX_ROUND_ID)
    doc = await asyncio.to_thread(
        engine.status_dict, STATUS_PAGE_DEFAULT if limit is None else limit, before
    )
    # Strict JSON: a non-finite number would make the answer unreadable to JSON parsers.
    return web.json_response(doc, dumps=_strict_dumps)


async def get_manifest(request: web.Request) -> web.Response:
    """Return the model manifest (names, shapes, spec) and its SHA-256."""
    manifest = request.app[engine_key].manifest
    return web.json_response({"sha256": manifest.sha256, "manifest": manifest.to_dict()})


async def enroll_client(request: web.Request) -> web.Response:
    """Consume a one-time token and register the client's Ed25519 key.

    The request is signed with the key being registered (proof of possession).
    """
    refuse_encoded_body(request)
    limiter, address = request.app[enrol_limiter_key], request.remote or "unknown"
    wait = limiter.retry_after(address)
    if wait is not None:
        resp = json_error(
            429,
            "too_many_enrolments",
            f"too many failed enrolments from this address; retry in {wait:.0f} s with a "
            "valid token from the operator (confide-server enroll)",
        )
        resp.headers["Retry-After"] = str(math.ceil(wait))
        return resp
    length = request.content_length
    if length is None:
        raise RequestError("Content-Length is required", "length_required")
    if length > _MAX_ENROLL_BYTES:
        raise RequestError(f"enrolment body over {_MAX_ENROLL_BYTES} B", "payload_too_large")
    chunks: list[bytes] = []
    await read_body_to(request, length, chunks.append)  # a stalled body: 408, not forever
    body = b"".join(chunks)
    doc = loads_bounded(body, max_bytes=_MAX_ENROLL_BYTES, max_depth=4)
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), str) for k in ("token", "client_id", "public_key")
    ):
        raise WireFormatError('expected {"token", "client_id", "public_key"} strings')
    signed = signed_headers(request)
    if signed.client_id != doc["client_id"] or signed.stage != "enroll":
        raise SignatureError("signed client id/stage differ from the enrolment request")
    verify_request(
        decode_public_key(doc["public_key"]),
        signed,
        request.method,
        request.path,
        sha256_hex(body),
        now_ms=int(time.time() * 1000),
        max_skew_ms=int(request.app[config_key].server.max_clock_skew_s * 1000),
    )
    certificate = _enrolment_certificate(doc, request.app[config_key].server)
    engine = request.app[engine_key]
    bound = bound_client_id(doc["token"])
    try:
        if bound is not None and bound != doc["client_id"]:
            raise EnrollmentError(
                "this enrolment token was made for another client id: enrol with the id the "
                "operator made it for (confide-server enroll --client-id)",
                "bad_token",
            )
        await asyncio.to_thread(
            engine.enroll, doc["token"], doc["client_id"], doc["public_key"], certificate
        )
    except EnrollmentError as exc:
        if exc.code == "bad_token":
            limiter.failed(address)
        raise
    answer: dict[str, Any] = {
        "client_id": doc["client_id"],
        "job": engine.config.job.name,
        "manifest_sha256": engine.manifest.sha256,
    }
    book = request.app.get(releases_key)
    if book is not None:  # the site pins the model-release key at enrolment
        answer.update(enrolment_fields(book))
    return web.json_response(answer)


def _enrolment_certificate(doc: dict[str, Any], server: ServerConfig) -> str | None:
    """Return the enrolment's consortium certificate as JSON text (``None``: none sent).

    The server cannot check it against a root (the sites hold the roots, the server is not
    trusted with them); it refuses only a certificate that is malformed or names another id
    or key than the enrolment, so a site learns of a provisioning mistake at once. With
    ``[server] consortium_root`` and ``revocation_list`` it also refuses a certificate the
    consortium's list revokes (re-read at every enrolment: a new list needs no restart).
    """
    from confide.protocol.certs import SiteCertificate

    raw = doc.get("certificate")
    if raw is None:
        return None
    try:
        cert = SiteCertificate.from_json(raw)
    except SignatureError as exc:
        raise WireFormatError(
            f"enrolment certificate: {exc.message}; send the certificate.json from "
            "`confide provision sign`"
        ) from None
    if cert.site_id != doc["client_id"] or cert.identity_key != base64.b64decode(doc["public_key"]):
        raise WireFormatError(
            "the enrolment certificate is for another client id or identity key: have the "
            "provisioner sign this site's key (`confide identity`) for this id"
        )
    if server.consortium_root is not None and server.revocation_list is not None:
        _refuse_revoked(cert, server.consortium_root, server.revocation_list)
    return json.dumps(cert.to_json(), sort_keys=True, separators=(",", ":"))


def _refuse_revoked(cert: SiteCertificate, root_path: Path, list_path: Path) -> None:
    """Refuse (400) a certificate revoked by the consortium's list the server was given."""
    from confide.errors import ConfigError
    from confide.protocol.certs import ConsortiumRoot, RevocationList, verify_revocation_list

    try:
        lst = verify_revocation_list(RevocationList.load(list_path), ConsortiumRoot.load(root_path))
    except (ConfigError, SignatureError) as exc:
        raise ConfigError(
            f"this server cannot check its revocation list ({exc.message}); enrolment is "
            "refused until its operator fixes [server] revocation_list"
        ) from None
    entry = lst.revocation_of(cert.site_id, cert.identity_key)
    if entry is not None:
        why = f" ({entry.reason})" if entry.reason else ""
        raise ConfigError(
            f"the certificate of {cert.site_id!r} is revoked by the consortium's revocation "
            f"list version {lst.version}{why}: ask the provisioner for a new certificate"
        )


async def get_task(request: web.Request) -> web.Response:
    """Return what this client should do now, long-polling up to ``?wait=`` seconds."""
    signed = await authenticate(request, round_id=0, stage="task", durable_nonce=False)
    engine = request.app[engine_key]
    try:
        wait = float(request.query.get("wait", "0"))
    except ValueError:
        wait = 0.0
    if not math.isfinite(wait):  # NaN would slip through min/max below
        wait = 0.0
    wait = min(max(wait, 0.0), request.app[config_key].server.long_poll_max_s)
    deadline = time.monotonic() + wait
    while True:
        if engine.idle:
            # A client that is (still) polling may complete the set a round is waiting for.
            request.app[wake_key].set()
        # Taken before the state is read: a stage that closes while the task is worked out
        # (the round timer notifies before this coroutine resumes) still wakes us.
        ticket = request.app[notifier_key].ticket()
        round_ticket = request.app[notifier_key].round_ticket()
        # A plain wait is answered here; anything else in a worker thread (the engine
        # lock may be held by a durable commit, and a task takes work to build).
        task: Task | None = engine.wait_task_nowait(signed.client_id)
        if task is None:
            task = await asyncio.to_thread(engine.task_for, signed.client_id)
        remaining = deadline - time.monotonic()
        if task.action != "wait" or remaining <= 0:
            # A secure stage's task is encoded once for the cohort, not once per poll.
            return web.Response(
                body=engine.task_body(task), content_type="application/json", charset="utf-8"
            )
        # Outside the open round's cohort: only a round change can change the answer.
        outside = engine.outside_open_round(signed.client_id)
        await request.app[notifier_key].wait(remaining, round_ticket if outside else ticket)
        # Still polling after a state change (e.g. a round closed): this client is alive.
        engine.touch(signed.client_id)


async def get_model(request: web.Request) -> web.Response:
    """Return a model version (safetensors) by SHA-256."""
    await authenticate(request, round_id=0, stage="model", durable_nonce=False)
    engine = request.app[engine_key]
    sha = request.match_info["sha256"]
    relpath = await asyncio.to_thread(engine.store.model_path, sha)
    if relpath is None:
        raise RequestError(f"no model version {sha}", "unknown_model")
    if await asyncio.to_thread(engine.store.is_pruned, relpath):
        raise RequestError(
            f"model version {sha} was deleted by the job's retention policy "
            "([retention] keep_models); ask GET /v1/task for the current model",
            "unknown_model",
        )
    data = await asyncio.to_thread(engine.blobs.read, relpath)
    return web.Response(
        body=data,
        content_type="application/octet-stream",
        headers={"X-Confide-Model-SHA256": sha},
    )


def _finite(doc: Any) -> Any:
    """``doc`` with every non-finite float replaced by ``None`` (JSON has no Infinity)."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_finite(v) for v in doc]
    return doc


def _strict_dumps(doc: Any) -> str:
    # Inputs are bounded so no metric is infinite; an accountant's epsilon may be (a budget
    # that cannot be met): such a value reads as null, and the answer stays strict JSON.
    return json.dumps(_finite(doc), allow_nan=False)


def _path_int(text: str, name: str) -> int:
    """Parse a positive path integer: ASCII digits only (``int()`` also takes Unicode digits)."""
    if not (text.isascii() and text.isdigit() and 1 <= len(text) <= 9) or int(text) < 1:
        raise RequestError(f"{name} must be a positive integer of ASCII digits", "not_found")
    return int(text)


class _Pre(NamedTuple):
    round_id: int
    stage: str
    length: int
    signed: SignedRequest
    prior: dict[str, Any] | None
    #: The stage's payload kind: ``"tensors"``, ``"json"`` or ``"secagg"``.
    kind: str


_PRE = web.RequestKey("confide_precheck", _Pre)


async def _precheck(request: web.Request) -> _Pre:
    """Check everything that needs no body: route, size, signature, round and stage."""
    refuse_encoded_body(request)
    round_id = _path_int(request.match_info["round"], "round")
    stage = request.match_info["stage"]
    engine = request.app[engine_key]
    payload_kind = engine.stage_payload(stage)
    limit = request.app[config_key].server.max_upload_bytes or (engine.manifest.nbytes + 65536)
    if payload_kind == "json":
        limit = _MAX_EVAL_BYTES
    elif payload_kind == "secagg":
        limit = max(limit, secure_upload_limit(engine.secure_vector_length))
    length = request.content_length
    if length is None:
        raise RequestError("Content-Length is required", "length_required")
    if length > limit:
        raise RequestError(f"{length} bytes > limit of {limit}", "payload_too_large")
    signed = await authenticate(request, round_id=round_id, stage=stage, durable_nonce=True)
    # In a worker thread: an identical retry or an old round reads SQLite.
    prior = await asyncio.to_thread(
        engine.check_submission, signed.client_id, round_id, stage, signed.body_sha256
    )
    return _Pre(round_id, stage, length, signed, prior, payload_kind)


async def expect_upload(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` only once the upload is sure to be read.

    All checks that need no body run here and an upload slot is taken, so the client sends
    its body only when the server is ready for it: bodies do not pile up in the server's
    buffers while uploads wait (memory stays bounded by the upload cap).
    """
    try:
        resp = await _expect_upload(request)
    except BaseException:
        release_client(request)
        raise
    if resp is not None:  # answered here: the handler (and its middlewares) never run
        release_client(request)
    return resp


async def _expect_upload(request: web.Request) -> web.StreamResponse | None:
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(RequestError("only 100-continue is supported", "expectation_failed"))
    try:
        pre = await _precheck(request)
        if pre.prior is not None:
            return web.json_response({"receipt": pre.prior, "duplicate": True})
        await request.app[upload_gate_key].acquire(pre.signed.client_id)
    except FederationError as exc:
        return error_response(exc)
    except (sqlite3.OperationalError, OSError) as exc:  # runs before the error middleware
        return error_response(storage_error(exc))
    request[_PRE] = pre
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


async def put_submission(request: web.Request) -> web.Response:
    """Accept one stage submission (tensors or JSON), durably, then return its receipt.

    The body is streamed to a temporary file in the blob store while it arrives (hashed on
    the way, cut off at Content-Length, 408 when it stalls); it is read back as one
    ``bytes`` object only in the worker thread that decodes it, and a tensor update's file
    is then fsynced and renamed into place (:meth:`~confide_server.blobs.BlobStore.stage`).
    A JSON submission of at most :data:`IN_MEMORY_BODY_BYTES` is read the same way into
    memory instead (it is never stored as a file).
    """
    engine = request.app[engine_key]
    gate = request.app[upload_gate_key]
    pre: _Pre | None = request.get(_PRE)
    holding = pre is not None  # expect_upload already took a slot
    client = pre.signed.client_id if pre is not None else None
    try:
        if pre is None:
            pre = await _precheck(request)
            if pre.prior is not None:
                return web.json_response({"receipt": pre.prior, "duplicate": True})
            client = pre.signed.client_id
            await gate.acquire(client)
            holding = True
        if pre.kind != "tensors" and pre.length <= IN_MEMORY_BODY_BYTES:
            # The same reading (Content-Length, stall and time limits), into memory.
            chunks: list[bytes] = []
            await read_body_to(request, pre.length, chunks.append)
            body = b"".join(chunks)
            del chunks
            check_body(pre.signed, sha256_hex(body))
            receipt = await asyncio.to_thread(_prepare_and_commit_body, engine, pre, body)
        else:
            staged = engine.blobs.stage()
            try:
                await read_body_to(request, pre.length, staged.write)
                staged.close()
                check_body(pre.signed, staged.sha256)
                receipt = await asyncio.to_thread(_prepare_and_commit, engine, pre, staged)
            finally:
                engine.blobs.discard_staged(staged)
    finally:
        if holding:
            gate.release(client)
    request.app[wake_key].set()
    return web.json_response({"receipt": receipt, "duplicate": False})


def _prepare_and_commit_body(engine: RoundEngine, pre: _Pre, body: bytes) -> dict[str, Any]:
    """Decode, validate and durably store a JSON submission read into memory (worker thread)."""
    prepared = engine.prepare(pre.signed.client_id, pre.round_id, pre.stage, body)
    return engine.commit_submission(prepared, pre.signed.nonce)


def _prepare_and_commit(engine: RoundEngine, pre: _Pre, staged: StagedUpload) -> dict[str, Any]:
    """Read a staged body, decode and validate it, and store it durably (worker thread).

    One call, so a body is in memory only while a worker thread decodes it: at most the
    thread pool's size of bodies at once, however many uploads hold slots.
    """
    body = engine.blobs.read_staged(staged)
    prepared = engine.prepare(pre.signed.client_id, pre.round_id, pre.stage, body)
    del body
    return engine.commit_submission(prepared, pre.signed.nonce)
