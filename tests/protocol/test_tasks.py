"""Typed tasks: one definition for server and client, parsed strictly on the client."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confide.errors import WireFormatError
from confide.protocol.tasks import (
    STAGES,
    DPSGDConfig,
    EvaluateTask,
    FailedTask,
    FinishedTask,
    PrivacyTask,
    SecureTask,
    TrainConfig,
    TrainTask,
    WaitTask,
    parse_task,
)

SHA = "ab" * 32
DP = DPSGDConfig(noise_multiplier=1.1, clip_norm=1.0, sampling_rate=0.1, steps=3, momentum=0.9)
EXAMPLES = [
    WaitTask(2.5),
    FinishedTask(SHA, 10),
    FailedTask("too many consecutive aborted rounds"),
    TrainTask(3, 100.0, 7, SHA, TrainConfig(2, 16, 0.1)),
    TrainTask(3, 100.0, 7, SHA, TrainConfig(1, 16, 0.1, DP), PrivacyTask("sample", 1e-5, dp=DP)),
    TrainTask(1, 5.0, 0, SHA, TrainConfig(), PrivacyTask("central", 1e-5, update_clip_norm=0.5)),
    EvaluateTask(4, 9.0, 1, SHA),
    SecureTask(2, "advertise", 9.0, 1, {"type": "RoundSetup"}, SHA, TrainConfig()),
    SecureTask(2, "share", 9.0, 1, {"type": "KeyBroadcast"}),
    SecureTask(2, "unmask", 9.0, 1, {"type": "UnmaskRequest"}),
]


@pytest.mark.parametrize("task", EXAMPLES, ids=lambda t: t.action)
def test_every_task_round_trips_through_json(task: Any) -> None:
    wire = json.loads(json.dumps(task.to_json()))
    assert parse_task(wire) == task


def test_the_stage_list_is_one_definition() -> None:
    assert STAGES == ("advertise", "share", "mask", "train", "consistency", "unmask", "evaluate")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(extra=1), "unexpected keys"),
        (lambda d: d.pop("seed"), "missing keys"),
        (lambda d: d.update(round=0), "round"),
        (lambda d: d.update(round=True), "round"),
        (lambda d: d.update(deadline=float("nan")), "finite"),
        (lambda d: d.update(model_sha256="XYZ"), "hex"),
        (lambda d: d.update(stage="evaluate"), "differs"),
        (lambda d: d.update(action="teleport"), "unknown task action"),
        (lambda d: d["config"].update(learning_rate=-1.0), "learning_rate"),
        (lambda d: d["config"].update(surprise=1), "config"),
        (lambda d: d.update(privacy={"mode": "sample", "delta": 1e-5}), "lacks its parameters"),
        (lambda d: d.update(privacy={"mode": "none", "delta": 1e-5}), "privacy mode"),
    ],
)
def test_malformed_tasks_are_refused(mutate: Any, match: str) -> None:
    doc = EXAMPLES[3].to_json()
    mutate(doc)
    with pytest.raises(WireFormatError, match=match):
        parse_task(doc)


def test_secure_payload_must_be_an_object() -> None:
    doc = SecureTask(2, "share", 9.0, 1, {"type": "KeyBroadcast"}).to_json()
    doc["broadcast"] = "not an object"
    with pytest.raises(WireFormatError, match="JSON object"):
        parse_task(doc)
    adv = SecureTask(2, "advertise", 9.0, 1, {}, SHA, TrainConfig()).to_json()
    del adv["config"]
    with pytest.raises(WireFormatError, match="advertise task needs"):
        parse_task(adv)


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_arbitrary_json_never_raises_anything_but_wire_format_error(doc: Any) -> None:
    with contextlib.suppress(WireFormatError):
        parse_task(doc)
