"""The one place where exceptions become HTTP responses: a JSON body with a code and a message.

:data:`HTTP_STATUS` is the one table from a domain error (its class, optionally narrowed by
its ``code``) to an HTTP status; the engine's errors know nothing of HTTP. aiohttp's own HTTP
errors (413 from ``client_max_size``, 404, 405) are re-encoded as JSON; anything unexpected
is logged and answered 500 with no detail (none is expected for any client input).
"""

from __future__ import annotations

import logging
import sqlite3

from aiohttp import web
from aiohttp.typedefs import Handler

from confide.errors import (
    ConfigError,
    FederationError,
    IntegrityError,
    ManifestError,
    SignatureError,
    WireFormatError,
)
from confide_server.blobs import DamagedBlobError
from confide_server.engine.rounds import EnrollmentError, InvalidSubmissionError, RoundError
from confide_server.events import BusyError
from confide_server.store import StorageError

__all__ = [
    "HTTP_STATUS",
    "RequestError",
    "error_middleware",
    "error_response",
    "json_error",
    "refuse_encoded_body",
    "status_for",
    "storage_error",
]

log = logging.getLogger("confide_server")


class RequestError(FederationError):
    """A request refused by the HTTP layer before the engine sees it (its ``code`` says why)."""

    code = "bad_request"


#: ``(error class, code or None) -> HTTP status``. :func:`status_for` walks the error's MRO
#: and takes, per class, the entry for its code first, then the class's own (``None``).
HTTP_STATUS: dict[tuple[type[FederationError], str | None], int] = {
    # the HTTP layer: route, size and protocol checks before the body is read
    (RequestError, None): 400,
    (RequestError, "not_found"): 404,
    (RequestError, "unknown_model"): 404,
    (RequestError, "length_required"): 411,
    (RequestError, "body_timeout"): 408,
    (RequestError, "payload_too_large"): 413,
    (RequestError, "expectation_failed"): 417,
    (RequestError, "unsupported_encoding"): 415,
    # identity
    (SignatureError, None): 401,
    (SignatureError, "replay"): 409,
    (SignatureError, "revoked"): 403,  # the operator revoked this site (confide_server.operator)
    (EnrollmentError, None): 409,  # client_exists, key_exists
    (EnrollmentError, "bad_token"): 401,
    (EnrollmentError, "bad_client_id"): 422,
    # rounds and submissions
    (RoundError, None): 409,
    (RoundError, "unknown_client"): 404,
    (InvalidSubmissionError, None): 422,
    (ManifestError, None): 422,
    (WireFormatError, None): 422,
    (IntegrityError, None): 422,
    (BusyError, None): 503,
    (BusyError, "client_busy"): 429,
    (StorageError, None): 503,  # transient disk trouble: retry; nothing was acknowledged
    (DamagedBlobError, None): 503,
    (ConfigError, None): 400,
    (FederationError, None): 400,
}

# aiohttp's own HTTP errors: the code put in their JSON body
_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_encoding",
    417: "expectation_failed",
    422: "invalid_payload",
    429: "client_busy",
    503: "busy",
}


def status_for(exc: FederationError) -> int:
    """Return the HTTP status of a domain error (from :data:`HTTP_STATUS`)."""
    for cls in type(exc).__mro__:
        for key in ((cls, exc.code), (cls, None)):
            status = HTTP_STATUS.get(key)
            if status is not None:
                return status
    return 400  # unreachable: FederationError is in the table


def json_error(status: int, code: str, message: str) -> web.Response:
    """Build a JSON error response ``{"error": {"code", "message"}}``."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


#: Seconds a client is told to wait before retrying a 503.
RETRY_AFTER_S = 2


def error_response(exc: FederationError) -> web.Response:
    """Return the JSON error response of a domain error (503s and 429s carry ``Retry-After``)."""
    resp = json_error(status_for(exc), exc.code, exc.message)
    if resp.status in (429, 503):
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    return resp


def storage_error(exc: BaseException) -> StorageError:
    """Wrap an OS or SQLite error from a durable step as a (503) :class:`StorageError`."""
    log.warning("storage error, answered 503: %s: %s", type(exc).__name__, exc)
    return StorageError(f"the server could not store this durably ({type(exc).__name__}); retry")


def refuse_encoded_body(request: web.Request) -> None:
    """Refuse a compressed request body (415): no route takes one.

    aiohttp inflates ``Content-Encoding: gzip/deflate/br`` bodies on read, so a small
    upload could become a large one in memory (a decompression bomb) and an invalid stream
    fails inside the framework. Upload-handling code (the ``Expect`` handler, which runs
    before middlewares) calls this too.
    """
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(
            f"Content-Encoding {encoding[:32]!r} is not accepted; send the body uncompressed",
            "unsupported_encoding",
        )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON body with a code and a message."""
    try:
        refuse_encoded_body(request)
        return await handler(request)
    except FederationError as exc:
        resp = error_response(exc)
        if exc.code == "body_timeout":
            # Send the 408 now and close: aiohttp would otherwise wait up to its lingering
            # time (10 s) for the rest of a body that is not coming.
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            request.protocol.force_close()
        return resp
    except (sqlite3.OperationalError, OSError) as exc:  # a full or failing disk: transient
        return error_response(storage_error(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _CODES.get(exc.status, "http_error")
        return json_error(exc.status, code, exc.text or exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal", "internal server error")
