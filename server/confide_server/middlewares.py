"""The one place where exceptions become HTTP responses: a JSON body with a code and a message.

Domain errors carry their status (``http_status``) and ``code``; aiohttp's own HTTP errors
(413 from ``client_max_size``, 404, 405) are re-encoded as JSON; anything unexpected is logged
and answered 500 with no detail (none is expected for any client input).
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from confide.errors import (
    ConfigError,
    FederationError,
    ManifestError,
    SignatureError,
    WireFormatError,
)

__all__ = ["RequestError", "error_middleware", "error_response", "json_error"]

log = logging.getLogger("confide_server")

_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    417: "expectation_failed",
    422: "invalid_payload",
    503: "busy",
}


def json_error(status: int, code: str, message: str) -> web.Response:
    """Build a JSON error response ``{"error": {"code", "message"}}``."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class RequestError(FederationError):
    """A request refused before its body is read (404, 411, 413, ...)."""

    def __init__(self, http_status: int, code: str, message: str) -> None:
        super().__init__(message, code)
        self.http_status = http_status


def error_response(exc: FederationError) -> web.Response:
    """Return the JSON error response of a domain error."""
    return json_error(_status_for(exc), exc.code, exc.message)


def _status_for(exc: FederationError) -> int:
    status = getattr(exc, "http_status", None)
    if isinstance(status, int):
        return status
    if isinstance(exc, SignatureError):
        return 409 if exc.code == "replay" else 401
    if isinstance(exc, (ManifestError, WireFormatError)):
        return 422
    if isinstance(exc, ConfigError):
        return 400
    return 400


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON body with a code and a message."""
    try:
        return await handler(request)
    except FederationError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _CODES.get(exc.status, "http_error")
        return json_error(exc.status, code, exc.text or exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal", "internal server error")
