"""Request authentication: Ed25519 signature, timestamp window and single-use nonces.

Checked from the headers alone, before any body is read, so an unauthenticated peer cannot
make the server buffer an upload. The body hash is compared after the body is read.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from confide.errors import SignatureError
from confide.protocol.signing import SignedRequest, decode_public_key, verify_request
from confide_server.keys import config_key, engine_key, nonce_cache_key

__all__ = ["authenticate", "check_body", "signed_headers"]


def signed_headers(request: web.Request) -> SignedRequest:
    """Parse the signature headers, refusing any that is not ASCII (401).

    aiohttp decodes header bytes that are not UTF-8 into lone surrogates, which cannot be
    encoded again for the signature check; every confide header is ASCII by construction.
    """
    for name, value in request.headers.items():
        if name.lower().startswith("x-confide-") and not value.isascii():
            raise SignatureError(f"header {name[:40]} is not ASCII", "unauthenticated")
    return SignedRequest.from_headers(request.headers)


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
        decode_public_key(key),
        signed,
        request.method,
        request.path,
        signed.body_sha256,
        now_ms=int(time.time() * 1000),
        max_skew_ms=skew_ms,
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
