"""A secure stage's task is built and JSON-encoded once per stage (per payload), not per poll.

The body served is byte for byte what ``json.dumps(task.to_json())`` gives (what
``web.json_response`` wrote before), every site of a broadcast stage gets the same task, and
a new stage (or round) builds new ones.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from confide.protocol.tasks import SecureTask
from tests.server.test_secagg_rounds import IDS, Fed, _config, _start


def _body(fed: Fed, cid: str) -> tuple[SecureTask, bytes]:
    task = fed.eng.task_for(cid)
    assert isinstance(task, SecureTask), task
    return task, fed.eng.task_body(task)


def test_a_broadcast_stage_builds_one_task_for_the_cohort(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    first, body = _body(fed, "a")
    assert first.stage == "advertise"
    assert body == json.dumps(first.to_json()).encode()
    for cid in IDS:
        task, again = _body(fed, cid)
        assert task is first  # one task object (and one encoding) for every site
        assert again is body
    fed.run_stage()  # advertise closes: the share stage has its own task
    share, share_body = _body(fed, "b")
    assert share.stage == "share"
    assert share is not first
    assert json.loads(share_body) == share.to_json()
    assert _body(fed, "c")[0] is share


def test_the_mask_stage_encodes_each_sites_own_deliveries_once(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    fed.run_stages("advertise", "share")
    tasks = {cid: _body(fed, cid) for cid in IDS}
    assert len({id(t.payload) for t, _ in tasks.values()}) == len(IDS)  # per-site payloads
    for cid, (task, body) in tasks.items():
        assert task.stage == "mask"
        assert body == json.dumps(task.to_json()).encode()
        again, again_body = _body(fed, cid)
        assert again is task
        assert again_body is body


def test_a_task_not_from_the_cache_is_encoded_as_is(tmp_path: Path) -> None:
    fed = Fed(tmp_path, _config(tmp_path))
    _start(fed)
    cached, _ = _body(fed, "a")
    # another task with the very same payload object (a stale one, a hand-made one)
    other = replace(cached, deadline=cached.deadline + 1.0)
    assert other.payload is cached.payload
    assert fed.eng.task_body(other) == json.dumps(other.to_json()).encode()
    assert json.loads(fed.eng.task_body(other))["deadline"] == cached.deadline + 1.0
    wait = fed.eng.task_for("a")
    assert fed.eng.task_body(wait) == json.dumps(wait.to_json()).encode()
