"""Operator endpoints: abort the open round, revoke a site (``/v1/operator/*``).

Both need ``Authorization: Bearer <token>`` with the job's operator token
(``<state_dir>/operator-token``, :func:`confide_server.auth.check_operator`); without it
they answer 401 and change nothing. ``confide-server abort`` and ``confide-server revoke``
send them for the operator (docs/operations.md, "Operator commands").

``POST /v1/operator/abort`` (body optional: ``{"reason": "..."}``)
    Aborts the open round now with the reason ``aborted by the operator: <reason>``.
    Answers ``{"aborted_round": N}``; 409 ``no_open_round`` when no round is open.
``POST /v1/operator/revoke`` (body ``{"client_id": "...", "reason": "..."}``)
    Records the revocation durably; from then on every request signed by that site is
    answered 403 ``revoked``, it is never drawn into a cohort, and its id and key cannot
    enrol again. If it is in the open round's cohort, that round is aborted (what it
    submitted must not count). Answers ``{"revoked": id, "aborted_round": N or null}``;
    404 ``unknown_client`` for an id that never enrolled.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from confide.errors import WireFormatError
from confide.protocol.jsonio import loads_bounded
from confide_server.auth import check_operator
from confide_server.engine.rounds import RoundError
from confide_server.keys import engine_key, wake_key
from confide_server.middlewares import RequestError

__all__ = ["abort_round", "revoke_client", "setup_operator_routes"]

_MAX_BODY = 4096
_MAX_REASON = 200


async def _body(request: web.Request) -> dict[str, Any]:
    length = request.content_length
    if length is not None and length > _MAX_BODY:
        raise RequestError(f"operator request body over {_MAX_BODY} B", "payload_too_large")
    body = await request.read()
    if not body.strip():
        return {}
    doc = loads_bounded(body, max_bytes=_MAX_BODY, max_depth=2, what="operator request")
    if not isinstance(doc, dict):
        raise WireFormatError('expected a JSON object, e.g. {"reason": "..."}')
    return doc


def _reason(doc: dict[str, Any], default: str) -> str:
    reason = doc.get("reason", default)
    if not isinstance(reason, str) or not 1 <= len(reason) <= _MAX_REASON:
        raise WireFormatError(f'"reason" must be a string of 1-{_MAX_REASON} characters')
    # One log line per event: no control characters from the request reach the log.
    return "".join(ch if ch.isprintable() else " " for ch in reason)


async def abort_round(request: web.Request) -> web.Response:
    """Abort the open round (operator token required)."""
    await asyncio.to_thread(check_operator, request)
    doc = await _body(request)
    reason = "aborted by the operator: " + _reason(doc, "no reason given")
    engine = request.app[engine_key]
    aborted = await asyncio.to_thread(engine.abort_open_round, reason)
    if aborted is None:
        raise RoundError(
            "no round is open: nothing to abort (see 'confide-server status')", "no_open_round"
        )
    request.app[wake_key].set()  # the round timer starts the next round
    return web.json_response({"aborted_round": aborted, "reason": reason})


async def revoke_client(request: web.Request) -> web.Response:
    """Revoke a site's key (operator token required)."""
    await asyncio.to_thread(check_operator, request)
    doc = await _body(request)
    client_id = doc.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise WireFormatError('expected {"client_id": "<enrolled site id>", "reason": "..."}')
    reason = _reason(doc, "revoked by the operator")
    engine = request.app[engine_key]
    aborted = await asyncio.to_thread(engine.revoke_client, client_id, reason)
    request.app[wake_key].set()
    return web.json_response({"revoked": client_id, "aborted_round": aborted})


def setup_operator_routes(app: web.Application) -> None:
    """Register ``POST /v1/operator/abort`` and ``POST /v1/operator/revoke``."""
    app.router.add_post("/v1/operator/abort", abort_round)
    app.router.add_post("/v1/operator/revoke", revoke_client)
