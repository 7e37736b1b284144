"""ClientRequestCap: requests in progress per authenticated client, and its config key."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from confide.errors import ConfigError
from confide_server.connections import REQUESTS_PER_CLIENT, ClientRequestCap
from confide_server.events import BusyError
from tests.server.util import write_job


def test_the_cap_counts_per_client_and_once_per_request() -> None:
    cap = ClientRequestCap(3)
    reqs = [make_mocked_request("GET", "/v1/task") for _ in range(4)]
    for r in reqs[:3]:
        cap.enter(r, "a")
    cap.enter(reqs[0], "a")  # the same request again (Expect, then its handler): no-op
    assert cap.held_by("a") == 3
    with pytest.raises(BusyError, match=r"3 requests in progress .*max_requests_per_client") as e:
        cap.enter(reqs[3], "a")
    assert e.value.code == "client_busy"
    cap.enter(make_mocked_request("GET", "/v1/task"), "b")  # others are not affected
    assert cap.held_by("b") == 1
    cap.leave(reqs[0])
    cap.leave(reqs[0])  # twice: no-op
    cap.leave(reqs[3])  # never counted: no-op
    assert cap.held_by("a") == 2
    cap.enter(reqs[3], "a")
    for r in reqs[1:]:
        cap.leave(r)
    assert cap.held_by("a") == 0
    assert cap.refused == 1


def test_max_requests_per_client_defaults_to_4_and_needs_room_for_poll_and_upload(
    tmp_path: Path,
) -> None:
    assert write_job(tmp_path).server.max_requests_per_client == REQUESTS_PER_CLIENT == 4
    assert (
        write_job(tmp_path, server__max_requests_per_client=2).server.max_requests_per_client == 2
    )
    with pytest.raises(ConfigError, match=r"max_requests_per_client must be >= 2.*got 1"):
        write_job(tmp_path, server__max_requests_per_client=1)
