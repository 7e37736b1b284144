"""Per-round metrics files (CSV, JSON Lines, TensorBoard) and the simulate accuracy/epsilon plot."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide_server.engine.rounds import RoundEngine
from confide_server.metrics import (
    BASE_COLUMNS,
    MetricsLog,
    crc32c,
    event_bytes,
    masked_crc32c,
    plot_rounds,
    tfrecord,
)
from tests.server.conftest import FakeClock
from tests.server.test_privacy_server import _config
from tests.server.util import delta_body, enrolled_engine, eval_body, tiny_manifest

MANIFEST = tiny_manifest()
TRAIN_S, EVAL_S = 7.0, 3.0
ACCURACY = {1: 0.6, 3: 0.8}


def _play(eng: RoundEngine, clock: FakeClock, r: int, answering: str = "abc") -> None:
    """One round: ``answering`` train (TRAIN_S later), all evaluate (EVAL_S later)."""
    for cid in "abc":
        eng.touch(cid)
    assert eng.tick()
    for cid in answering:
        prepared = eng.prepare(cid, r, "train", delta_body(MANIFEST, 1.0))
        eng.commit_submission(prepared, nonce=f"{cid}-train-{r}")
    clock.now += TRAIN_S if len(answering) == 3 else 31.0
    assert eng.tick()
    if eng.store.get_round(r).status != "open":  # type: ignore[union-attr]
        return  # aborted: no quorum
    for cid in "abc":
        prepared = eng.prepare(cid, r, "evaluate", eval_body(ACCURACY[r]))
        eng.commit_submission(prepared, nonce=f"{cid}-eval-{r}")
    clock.now += EVAL_S
    assert eng.tick()
    clock.now += 10.0  # past the cohort grace before the next round


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RoundEngine:
    """Central DP, 3 rounds: round 2 is aborted (one update of three, min_clients=2)."""
    tmp = tmp_path_factory.mktemp("metrics")
    clock = FakeClock()
    eng = enrolled_engine(_config(tmp, rounds=2, mode="central", noise_multiplier=1.0), clock)
    _play(eng, clock, 1)
    _play(eng, clock, 2, answering="a")
    _play(eng, clock, 3)
    assert eng.status == "finished"
    return eng


def _read(eng: RoundEngine, name: str) -> Path:
    return eng.config.server.state_dir / "metrics" / name


def test_rows_match_the_status(run: RoundEngine) -> None:
    rows = [json.loads(x) for x in _read(run, "rounds.jsonl").read_text().splitlines()]
    status = run.status_dict()["rounds"]
    assert (
        [(r["round"], r["status"]) for r in rows]
        == [(s["round"], s["status"]) for s in status]
        == [(1, "committed"), (2, "aborted"), (3, "committed")]
    )
    for row, s in zip(rows, status, strict=True):
        assert row["participants"] == len(s["cohort"]) == 3
        assert row["reason"] == (s["reason"] or "")
        assert row["started_at"] == s["started_at"]
        assert row["ended_at"] == s["ended_at"]
        if s["status"] == "committed":
            assert row["survivors"] == s["metrics"]["train_clients"] == 3
            assert row["eval_accuracy"] == pytest.approx(s["metrics"]["eval_accuracy"])
            assert row["eval_accuracy"] == pytest.approx(ACCURACY[row["round"]])
            assert row["epsilon"] == pytest.approx(s["privacy"]["epsilon"])
            assert row["epsilon_round"] == pytest.approx(s["privacy"]["epsilon_round"])
            assert row["stage_train_s"] == pytest.approx(TRAIN_S)
            assert row["stage_evaluate_s"] == pytest.approx(EVAL_S)
            assert row["duration_s"] == pytest.approx(TRAIN_S + EVAL_S)
            uploads = [
                s
                for stage in ("train", "evaluate")
                for s in run.store.submissions(row["round"], stage)
            ]
            train = len(delta_body(MANIFEST, 1.0))
            json_bytes = sum(len(json.dumps(u.payload).encode()) for u in uploads if u.blob is None)
            assert row["upload_bytes"] == 3 * train + json_bytes
        else:
            assert "min_clients=2" in row["reason"]
            assert row["survivors"] == 1  # one update accepted, none entered a model
            assert row["epsilon"] is None  # never released: nothing spent
            assert row["stage_train_s"] == pytest.approx(31.0)
            assert row["upload_bytes"] == len(delta_body(MANIFEST, 1.0))
    assert rows[2]["epsilon"] > rows[0]["epsilon"] > 0


def test_csv_has_the_same_rows(run: RoundEngine) -> None:
    with _read(run, "rounds.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames is not None
        assert tuple(reader.fieldnames[: len(BASE_COLUMNS)]) == BASE_COLUMNS
        table = list(reader)
    rows = [json.loads(x) for x in _read(run, "rounds.jsonl").read_text().splitlines()]
    assert [int(t["round"]) for t in table] == [r["round"] for r in rows]
    assert [t["status"] for t in table] == ["committed", "aborted", "committed"]
    assert float(table[2]["eval_accuracy"]) == pytest.approx(0.8)
    assert float(table[0]["epsilon"]) == pytest.approx(rows[0]["epsilon"])
    assert table[1]["epsilon"] == ""
    assert {"stage_train_s", "stage_evaluate_s", "train_loss"} - set(table[0]) == {"train_loss"}


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Parse TFRecord event files by hand (length, masked CRCs, Event protos)."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    files = sorted(folder.glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # rewritten whole: never an old file beside the new
    data = files[0].read_bytes()
    out: dict[str, dict[int, float]] = {}
    i = 0
    while i < len(data):
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8 : i + 12])[0] == masked_crc32c(header)
        body = data[i + 12 : i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] == masked_crc32c(body)
        i += 16 + n
        event = event_pb2.Event.FromString(body)
        for v in event.summary.value:
            out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_tensorboard_events_read_back(run: RoundEngine) -> None:
    pytest.importorskip("tensorboardX")
    scalars = _scalars(_read(run, "tensorboard"))
    rows = [json.loads(x) for x in _read(run, "rounds.jsonl").read_text().splitlines()]
    assert scalars["round/committed"] == {1: 1.0, 2: 0.0, 3: 1.0}
    assert scalars["round/participants"] == {1: 3.0, 2: 3.0, 3: 3.0}
    assert scalars["round/eval_accuracy"] == pytest.approx({1: 0.6, 3: 0.8})
    assert scalars["round/epsilon"] == pytest.approx({1: rows[0]["epsilon"], 3: rows[2]["epsilon"]})
    assert scalars["round/upload_bytes"][2] == rows[1]["upload_bytes"]
    assert scalars["round/stage_train_s"][1] == pytest.approx(TRAIN_S)


def test_rewrite_after_restart_keeps_one_event_file(run: RoundEngine) -> None:
    pytest.importorskip("tensorboardX")
    log = MetricsLog(run.config.server.state_dir)
    first = log.write(run.store)  # a process's first write: every closed round
    assert [row["round"] for row in first] == [1, 2, 3]
    assert log.write(run.store) == []  # nothing new: nothing appended
    assert len(_scalars(_read(run, "tensorboard"))["round/committed"]) == 3


def test_crc32c_known_answers() -> None:
    # RFC 3720 B.4 and the usual check value of CRC-32C.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


@settings(max_examples=50, deadline=None)
@given(
    step=st.integers(0, 2**62),
    tag=st.text(min_size=1, max_size=40),
    value=st.floats(allow_nan=False, allow_infinity=False, width=32),
    wall=st.floats(0, 4e9),
)
def test_event_bytes_parse_as_tensorboard_events(
    step: int, tag: str, value: float, wall: float
) -> None:
    """tensorboardX's generated protobuf classes (an independent decoder) read our bytes."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    from tensorboardX.record_writer import masked_crc32c as reference_crc

    data = event_bytes(wall, step, scalar=(tag, value))
    event = event_pb2.Event.FromString(data)
    assert (event.wall_time, event.step) == (wall, step)
    assert [(v.tag, v.simple_value) for v in event.summary.value] == [(tag, value)]
    assert masked_crc32c(data) == reference_crc(data)
    framed = tfrecord(data)
    assert framed[12:-4] == data
    assert len(framed) == len(data) + 16
    header = event_pb2.Event.FromString(event_bytes(wall, 0, file_version="brain.Event:2"))
    assert header.file_version == "brain.Event:2"


def test_the_server_writes_event_files_without_importing_torch(tmp_path: Path) -> None:
    """The server's base memory must not carry torch for a metrics export."""
    script = (
        "import sys\n"
        "from confide_server.metrics import event_bytes, tfrecord\n"
        "open(sys.argv[1], 'wb').write(tfrecord(event_bytes(1.0, 3, scalar=('a', 2.0))))\n"
        "heavy = ('torch', 'tensorboardX', 'google.protobuf')\n"
        "bad = sorted(m for m in heavy if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    out = tmp_path / "events"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, timeout=300)
    assert out.stat().st_size > 16


def test_torn_stage_line_is_skipped(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.stage_closed(1, "train", 5.0)
    log.stage_closed(1, "train", 9.0)  # a replayed close keeps the first
    with log.stages_path.open("a") as f:
        f.write('{"round": 1, "stage": "evalu')  # cut short by a crash
    assert log.stage_closes() == {1: {"train": 5.0}}


def test_simulate_plot_and_its_points(run: RoundEngine, tmp_path: Path) -> None:
    status = run.status_dict()["rounds"]
    png = tmp_path / "rounds.png"
    plotted = plot_rounds(status, png)
    points = json.loads(png.with_suffix(".json").read_text())
    assert points["round"] == [1, 3]  # committed rounds only
    assert points["accuracy"] == pytest.approx([0.6, 0.8])
    assert points["epsilon"] == pytest.approx(
        [s["privacy"]["epsilon"] for s in status if s["status"] == "committed"]
    )
    if importlib.util.find_spec("matplotlib") is not None:
        assert plotted
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # pragma: no cover - matplotlib is in the dev environment
        assert not plotted
