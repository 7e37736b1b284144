"""Request authentication: Ed25519 signature, timestamp window and single-use nonces.

Checked from the headers alone, before any body is read, so an unauthenticated peer cannot
make the server buffer an upload. The body hash is compared after the body is read.

**Operator token.** ``GET /v1/status`` (cohorts, per-round metrics, total weights) is for
the operator only: it needs ``Authorization: Bearer <token>`` with the token the server
creates in its state folder (``operator-token``, mode 0600) the first time it is needed.
``confide-server status`` reads the state directly and needs no token.

**Enrolment.** A token made with ``confide-server enroll --client-id NAME`` is bound to that
id (``ct_<random>.<NAME>``, hashed whole, so the binding cannot be edited): it enrols no
other id. Failed enrolments are counted per remote address in a bounded table
(:class:`confide_server.enrolment.EnrolLimiter`); after 5 within 10 minutes that address
is answered 429 until the window has passed.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import os
import secrets
import time
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from confide.errors import SignatureError
from confide.protocol.signing import SignedRequest, decode_public_key, verify_request
from confide_server.connections import client_cap_key
from confide_server.keys import config_key, engine_key, nonce_cache_key

__all__ = [
    "OPERATOR_TOKEN_FILE",
    "PUBLIC_KEY_CACHE_SIZE",
    "authenticate",
    "bound_client_id",
    "check_body",
    "check_operator",
    "operator_token",
    "public_key_object",
    "signed_headers",
]

#: The operator token's file name in the server's state folder.
OPERATOR_TOKEN_FILE = "operator-token"  # noqa: S105 - a file name, not a secret


def bound_client_id(token: str) -> str | None:
    """Return the client id a token is bound to (``ct_<random>.<id>``), or ``None``."""
    if token.startswith("ct_") and "." in token:
        return token.split(".", 1)[1]
    return None


def operator_token(state_dir: Path) -> str:
    """Return the job's operator token, creating it (mode 0600) if the state has none.

    Written to a temporary file and linked into place, so a concurrent reader sees either
    no file or the whole token, and two creators agree on one token.
    """
    path = Path(state_dir) / OPERATOR_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{OPERATOR_TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            tmp.unlink()
    return path.read_text().strip()


def check_operator(request: web.Request) -> None:
    """Refuse (401) a request without the operator's ``Authorization: Bearer`` token."""
    state_dir = request.app[config_key].server.state_dir
    expected = operator_token(state_dir)
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(errors="replace"), expected.encode()
    ):
        raise SignatureError(
            f"{request.path} is for the job's operator: send 'Authorization: Bearer <token>' "
            f"with the token in the server's state folder ({OPERATOR_TOKEN_FILE}), or run "
            "'confide-server status --config job.toml' on the server",
            "operator_token_required",
        )


def signed_headers(request: web.Request) -> SignedRequest:
    """Parse the signature headers, refusing any that is not ASCII (401).

    aiohttp decodes header bytes that are not UTF-8 into lone surrogates, which cannot be
    encoded again for the signature check; every confide header is ASCII by construction.
    """
    for name, value in request.headers.items():
        if name.lower().startswith("x-confide-") and not value.isascii():
            raise SignatureError(f"header {name[:40]} is not ASCII", "unauthenticated")
    return SignedRequest.from_headers(request.headers)


#: Enrolled keys kept decoded (an OpenSSL key object each, ~100 bytes): one per site of a
#: large federation, so its long polls do not decode the same key on every request.
PUBLIC_KEY_CACHE_SIZE = 32768


@functools.lru_cache(maxsize=PUBLIC_KEY_CACHE_SIZE)
def public_key_object(value: str) -> Ed25519PublicKey:
    """Return :func:`~confide.protocol.signing.decode_public_key` of ``value``, remembered.

    Keyed by the enrolled base64 text itself, so a site that enrols a new key gets a new
    entry; a key that does not decode raises each time (exceptions are not remembered).
    Public data only. The least recently used entry goes first beyond
    :data:`PUBLIC_KEY_CACHE_SIZE`.
    """
    return decode_public_key(value)


async def authenticate(
    request: web.Request, *, round_id: int, stage: str, durable_nonce: bool
) -> SignedRequest:
    """Verify the signature headers of ``request`` and consume its nonce.

    Parameters
    ----------
    request : web.Request
        The request (its body is not read).
    round_id, stage : int, str
        What the URL says; the signed values must agree.
    durable_nonce : bool
        Also look the nonce up in the database (mutating requests, so replays are caught
        across restarts too).

    Returns
    -------
    SignedRequest
        The verified headers.

    Raises
    ------
    SignatureError
        401 for missing/stale/bad signatures and unknown clients, 409 (``replay``) for a
        nonce already seen.
    """
    signed = signed_headers(request)
    if signed.round_id != round_id or signed.stage != stage:
        raise SignatureError(
            f"signed round/stage ({signed.round_id}, {signed.stage!r}) differ from the "
            f"request's ({round_id}, {stage!r})"
        )
    engine = request.app[engine_key]
    key = engine.public_key(signed.client_id)
    if key is None:
        raise SignatureError(f"unknown client {signed.client_id!r}", "unknown_client")
    skew_ms = int(request.app[config_key].server.max_clock_skew_s * 1000)
    verify_request(
        public_key_object(key),
        signed,
        request.method,
        request.path,
        signed.body_sha256,
        now_ms=int(time.time() * 1000),
        max_skew_ms=skew_ms,
    )
    # After the signature check, so only the site itself learns that it was revoked.
    revoked = engine.revoked_reason(signed.client_id)
    if revoked is not None:
        raise SignatureError(
            f"site {signed.client_id!r} was revoked by the job's operator ({revoked}): its "
            "key is no longer accepted; ask the operator",
            "revoked",
        )
    # Counted from here until the handler ends (connections.client_cap_middleware); checked
    # before the nonce is spent, so a 429 leaves the signed request retryable as is.
    cap = request.app.get(client_cap_key)
    if cap is not None:
        cap.enter(request, signed.client_id)
    if durable_nonce and signed.timestamp_ms < engine.store.nonce_floor_ms:
        # The nonces of requests signed before the floor were forgotten by [retention]
        # (engine/retention.py): a request signed that long ago is refused as stale.
        raise SignatureError(
            f"timestamp {signed.timestamp_ms} precedes the server's replay window "
            f"(requests signed before {engine.store.nonce_floor_ms} ms are refused)",
            "stale_request",
        )
    if not request.app[nonce_cache_key].add(signed.nonce) or (
        durable_nonce and await asyncio.to_thread(engine.store.nonce_seen, signed.nonce)
    ):
        raise SignatureError("nonce already used (replayed request)", "replay")
    engine.touch(signed.client_id)
    return signed


def check_body(signed: SignedRequest, body_sha256: str) -> None:
    """Raise :class:`SignatureError` if the body is not the one that was signed."""
    if signed.body_sha256 != body_sha256:
        raise SignatureError("body does not match the signed X-Confide-Content-SHA256")
