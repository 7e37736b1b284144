"""The one error -> HTTP status table (confide_server.middlewares.HTTP_STATUS)."""

from __future__ import annotations

import pytest

from confide.errors import (
    ConfigError,
    FederationError,
    IntegrityError,
    ManifestError,
    SignatureError,
    WireFormatError,
)
from confide_server.engine.rounds import EnrollmentError, InvalidSubmissionError, RoundError
from confide_server.events import BusyError
from confide_server.middlewares import HTTP_STATUS, RequestError, status_for


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (RequestError("round must be an integer", "not_found"), 404),
        (RequestError("no model version", "unknown_model"), 404),
        (RequestError("Content-Length is required", "length_required"), 411),
        (RequestError("too big", "payload_too_large"), 413),
        (RequestError("only 100-continue", "expectation_failed"), 417),
        (SignatureError("stale"), 401),
        (SignatureError("unknown client", "unknown_client"), 401),
        (SignatureError("nonce already used", "replay"), 409),
        (EnrollmentError("used token", "bad_token"), 401),
        (EnrollmentError("taken", "client_exists"), 409),
        (EnrollmentError("taken", "key_exists"), 409),
        (EnrollmentError("bad id", "bad_client_id"), 422),
        (RoundError("late", "stage_closed"), 409),
        (RoundError("dup", "duplicate"), 409),
        (InvalidSubmissionError("bad", "protocol_violation"), 422),
        (ManifestError("shape"), 422),
        (WireFormatError("not JSON"), 422),
        (IntegrityError("hash"), 422),
        (BusyError("retry"), 503),
        (BusyError("one client's slots", "client_busy"), 429),
        (RequestError("body stalled", "body_timeout"), 408),
        (ConfigError("bad"), 400),
        (FederationError("other"), 400),
    ],
)
def test_status_of_each_error(exc: FederationError, status: int) -> None:
    assert status_for(exc) == status


def test_the_table_is_the_only_source() -> None:
    # the engine's and events' errors carry no HTTP status of their own
    for cls in (RoundError, InvalidSubmissionError, EnrollmentError, BusyError, RequestError):
        assert not hasattr(cls, "http_status"), cls
        assert (cls, None) in HTTP_STATUS or any(k[0] is cls for k in HTTP_STATUS), cls
