"""Per-round metrics files: ``<state>/metrics/rounds.csv``, ``rounds.jsonl`` and TensorBoard events.

One row per closed round (committed or aborted), built from the database: the files are
rewritten whole at a process's first export (start-up) and the new rows appended after
every round closes, so a close costs the same in round 10 and round 10,000 (a crash never
leaves a row missing for long, and a round is never written twice)::

    round, status (committed | aborted), reason, started_at, ended_at, duration_s,
    participants (cohort size), survivors (updates that entered the sum), epsilon,
    epsilon_round, upload_bytes, stage_<name>_s ..., train_loss, eval_<metric> ...

``survivors`` is the round's ``train_clients`` when it committed (under SecAgg+ the
protocol's survivors) and the number of accepted updates when it aborted.
``upload_bytes`` counts the accepted submissions as stored: update files and JSON messages
(SecAgg+ unmask answers are never stored, so they are not counted). ``stage_<name>_s`` is the
time from the stage's opening (the previous stage's close, or the round start) to its close;
stage closes are appended to ``metrics/stages.jsonl`` as they happen.

TensorBoard event files go to ``metrics/tensorboard/`` (one scalar per numeric column, step =
round; one file per server process, started with every round so far, older files removed,
then appended to), encoded by this module (:func:`event_bytes`, :func:`tfrecord`): no
tensorboardX, protobuf or torch is imported by the server to write them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import struct
import time
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide._fsio import append_durably, write_atomic
from confide_server.ledger import LedgerSigner, append_export, write_export

if TYPE_CHECKING:
    from confide_server.store import RoundRow, Store

log = logging.getLogger("confide_server")

__all__ = [
    "BASE_COLUMNS",
    "UPDATE_STAGES",
    "MetricsLog",
    "crc32c",
    "event_bytes",
    "export_records",
    "masked_crc32c",
    "plot_rounds",
    "round_rows",
    "tfrecord",
]

#: Columns every row has, in this order (then stage durations and reported metrics, sorted).
BASE_COLUMNS = (
    "round",
    "status",
    "reason",
    "started_at",
    "ended_at",
    "duration_s",
    "participants",
    "survivors",
    "epsilon",
    "epsilon_round",
    "upload_bytes",
)
#: Stages whose submissions are model updates (counted as a round's ``updates``).
UPDATE_STAGES = ("train", "mask")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _stage_durations(r: RoundRow, closes: Mapping[str, float]) -> dict[str, float]:
    """``stage_<name>_s`` of one round from its recorded stage closes and its end."""
    out: dict[str, float] = {}
    prev = r.started_at
    for stage, at in sorted(closes.items(), key=lambda kv: kv[1]):
        out[f"stage_{stage}_s"] = max(0.0, at - prev)
        prev = at
    if r.ended_at is not None and f"stage_{r.stage}_s" not in out:
        out[f"stage_{r.stage}_s"] = max(0.0, r.ended_at - prev)
    return out


def round_rows(
    store: Store,
    stage_closes: Mapping[int, Mapping[str, float]] | None = None,
    state_dir: Path | None = None,
    skip: Container[int] = (),
    since: int = 1,
) -> list[dict[str, Any]]:
    """Build one row per closed round from the database.

    Parameters
    ----------
    store : Store
        The job's database.
    stage_closes : mapping, optional
        ``{round: {stage: closed_at}}`` (from ``metrics/stages.jsonl``).
    state_dir : Path, optional
        The state folder (update files' sizes count as upload bytes).
    skip : container of int, optional
        Rounds not to build (already built: a closed round's row never changes).
    since : int, default 1
        The oldest round to read (after a close: the first one not built yet).

    Returns
    -------
    list of dict
        Rows, oldest round first (see the module documentation for the columns).
    """
    from confide_server.engine.privacy import read_privacy_range

    _, per_round = read_privacy_range(store, since, 2**62)
    stages_of = stage_closes or {}
    rows: list[dict[str, Any]] = []
    for r in store.rounds_since(since):
        if r.status not in ("committed", "aborted") or r.round in skip:
            continue
        closes = stages_of.get(r.round, {})
        stage_names = list(dict.fromkeys([*closes, r.stage, *UPDATE_STAGES, "evaluate"]))
        upload = 0
        updates = 0
        seen = False
        for stage in stage_names:
            for s in store.submissions(r.round, stage):
                seen = True
                if stage in UPDATE_STAGES:
                    updates += 1
                if s.blob is not None and state_dir is not None:
                    try:
                        upload += (state_dir / s.blob).stat().st_size
                    except OSError:  # deleted by [retention]: its size was recorded
                        upload += store.pruned_size(s.blob) or 0
                elif s.payload is not None:
                    upload += len(json.dumps(s.payload).encode())
        if not seen:  # rows forgotten by [retention] prune_updates: their totals were kept
            kept = store.round_upload(r.round)
            if kept is not None:
                updates, upload = kept
        metrics = r.metrics or {}
        privacy = per_round.get(r.round) or {}
        row: dict[str, Any] = {
            "round": r.round,
            "status": r.status,
            "reason": r.reason or "",
            "started_at": r.started_at,
            "ended_at": r.ended_at,
            "duration_s": None if r.ended_at is None else max(0.0, r.ended_at - r.started_at),
            "participants": len(r.cohort),
            "survivors": metrics.get("train_clients", updates)
            if r.status == "committed"
            else updates,
            "epsilon": privacy.get("epsilon"),
            "epsilon_round": privacy.get("epsilon_round"),
            "upload_bytes": upload,
            **_stage_durations(r, closes),
        }
        for key, value in sorted(metrics.items()):
            if (key == "train_loss" or key.startswith("eval_")) and _finite(value):
                row[key] = value
        rows.append(row)
    return rows


class MetricsLog:
    """Writes ``<state>/metrics/``: ``rounds.csv``, ``rounds.jsonl``, ``tensorboard/``.

    Parameters
    ----------
    state_dir : Path
        The server's state folder.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.folder = state_dir / "metrics"
        # Nothing per round is kept in memory (a long job stays flat): the newest round
        # whose row this process wrote, the columns it wrote them with (None: the next
        # write rewrites both files whole), and the newest TensorBoard step it appended.
        self._last = 0
        self._columns: list[str] | None = None
        self._tb: Path | None = None
        self._tb_last = -1
        # stages.jsonl read so far (bytes) and the closes of rounds not written yet: a
        # close reads only new lines, and a round's entry goes once its row is written.
        self._closes: dict[int, dict[str, float]] = {}
        self._closes_at = 0

    @property
    def stages_path(self) -> Path:
        """``metrics/stages.jsonl``: one ``{"round", "stage", "closed_at"}`` a closed stage."""
        return self.folder / "stages.jsonl"

    def stage_closed(self, round_id: int, stage: str, at: float) -> None:
        """Record that ``round_id``'s ``stage`` closed at ``at`` (best effort, appended)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            line = json.dumps({"round": round_id, "stage": stage, "closed_at": at}) + "\n"
            fd = os.open(self.stages_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("could not record a stage close in %s: %s", self.stages_path, exc)

    def stage_closes(self) -> dict[int, dict[str, float]]:
        """Stage closes in ``stages.jsonl`` of rounds whose row is not written yet.

        The first close of each round's stage; bad lines skipped. Incremental: each call
        reads the lines appended since the last one (up to the last complete line), so a
        close does not re-read the job's history.
        """
        self._closes_at = _read_closes(self.stages_path, self._closes_at, self._closes)
        return self._closes

    def write(self, store: Store) -> list[dict[str, Any]]:
        """Write the new rounds' rows to the CSV and JSON Lines files and events; return them.

        The first write of a process rewrites both files whole; later ones append the new
        rows (O(new rounds) per close), unless a new column appeared (then rewrite, with
        every row rebuilt from the database). Written rows are not kept in memory.
        """
        closes = self.stage_closes()
        since = self._last + 1
        new = round_rows(store, closes, self.state_dir, (), since)
        known = set(BASE_COLUMNS if self._columns is None else self._columns)
        extra = sorted(known.union(*(row.keys() for row in new)) - set(BASE_COLUMNS))
        columns = list(BASE_COLUMNS)
        columns += [k for k in extra if k.startswith("stage_")]
        columns += [k for k in extra if not k.startswith("stage_")]
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        rows = new
        if since > 1 and (columns != self._columns or self._tb is None):
            # A new column, or a new event file: every row, rebuilt from the database and
            # the whole stages file (transient, and rare: once a new column appears).
            everything: dict[int, dict[str, float]] = {}
            _read_closes(self.stages_path, 0, everything)
            rows = round_rows(store, everything, self.state_dir)
        if columns == self._columns:
            if new:
                append_durably(self.folder / "rounds.csv", _csv(new, columns, header=False))
                append_durably(self.folder / "rounds.jsonl", _jsonl(new))
        else:
            write_atomic(self.folder / "rounds.csv", _csv(rows, columns, header=True))
            write_atomic(self.folder / "rounds.jsonl", _jsonl(rows))
            self._columns = columns
        self._write_tensorboard(rows if self._tb is None else new)
        if new:
            self._last = max(self._last, max(int(row["round"]) for row in new))
        for rnd in [r for r in closes if r <= self._last]:  # written: forget its closes
            del closes[rnd]
        return new

    def _write_tensorboard(self, rows: Sequence[Mapping[str, Any]]) -> None:
        records: list[bytes] = []
        if self._tb is None:
            folder = self.folder / "tensorboard"
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The first write of a process starts one new file with every round and removes
            # the older files, so a restart never duplicates a step; later closes append.
            old = list(folder.glob("events.out.tfevents.*"))
            self._tb = folder / f"events.out.tfevents.{int(time.time())}.{os.getpid()}.confide"
            self._tb_last = -1
            for path in old:
                path.unlink(missing_ok=True)
            records.append(event_bytes(time.time(), 0, file_version="brain.Event:2"))
        now = time.time()
        for row in rows:
            step = int(row["round"])
            if step <= self._tb_last:  # rows come oldest first; never a step twice
                continue
            values = [("round/committed", 1.0 if row["status"] == "committed" else 0.0)]
            values += [
                (f"round/{key}", float(value))
                for key, value in row.items()
                if key not in ("round", "started_at", "ended_at") and _finite(value)
            ]
            for tag, value in values:
                records.append(event_bytes(now, step, scalar=(tag, value)))
            self._tb_last = step
        # TFRecord framing, written synchronously and closed at once (a reader right after a
        # close sees every scalar of the round).
        with open(self._tb, "ab") as fh:
            fh.write(b"".join(tfrecord(data) for data in records))

    def close(self) -> None:
        """Forget the TensorBoard file (every write is already closed on disk)."""
        self._tb = None


def _read_closes(path: Path, offset: int, into: dict[int, dict[str, float]]) -> int:
    """Read ``stages.jsonl`` from byte ``offset`` into ``into``; return the new offset.

    Only complete lines are read (a line still being appended is read next time); a
    round's stage keeps its first close; bad lines (cut short by a crash) are skipped.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except OSError:
        return offset
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].decode("utf-8", "replace").splitlines():
        try:
            doc = json.loads(line)
            rnd, stage, at = int(doc["round"]), str(doc["stage"]), float(doc["closed_at"])
        except (ValueError, KeyError, TypeError):
            continue
        into.setdefault(rnd, {}).setdefault(stage, at)
    return offset + end


def _csv(rows: Sequence[Mapping[str, Any]], columns: list[str], *, header: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return buf.getvalue().encode()


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), TFRecord's checksum: ``crc32c(b"123456789") == 0xE3069283``."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add ``0xA282EAD8`` (mod 2^32)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(
    wall_time: float,
    step: int,
    *,
    scalar: tuple[str, float] | None = None,
    file_version: str | None = None,
) -> bytes:
    """Serialize one TensorBoard ``Event`` protobuf (``tensorboard/compat/proto/event.proto``).

    ``Event{wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5
    (Summary{value = 1 (Value{tag = 1, simple_value = 2 (float)})})}``: the few fields a scalar
    needs, encoded here so the server needs neither protobuf nor tensorboardX (which imports
    torch) to write them.
    """
    out = b"\x09" + struct.pack("<d", wall_time)  # field 1, 64-bit
    if step:
        out += b"\x10" + _varint(step)  # field 2, varint (step >= 0)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalar is not None:
        tag, value = scalar
        entry = _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)
        out += _field(5, _field(1, entry))
    return out


def tfrecord(data: bytes) -> bytes:
    """Frame one record: length (u64 LE), its masked CRC, the data, the data's masked CRC."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def export_records(store: Store, ledger: LedgerSigner, metrics: MetricsLog) -> None:
    """Rewrite ``ledger.jsonl`` and the metrics files from the database (best effort).

    The database is the record; these are exports, so a failed write is logged, never
    fatal, and the next close (or restart) rewrites them.
    """
    try:
        if ledger.exported_round is None:  # this process's first export: the whole file
            lines = store.ledger()
            write_export(ledger.export_path, lines)
        else:  # then only the entries committed since
            lines = store.ledger_since(ledger.exported_round + 1)
            if lines:
                append_export(ledger.export_path, lines)
        if lines:
            ledger.exported_round = int(lines[-1]["entry"]["round"])
        elif ledger.exported_round is None:
            ledger.exported_round = 0
        metrics.write(store)
    except Exception as exc:  # an export never fails a committed round
        log.warning("could not export the ledger or metrics: %s: %s", type(exc).__name__, exc)


def plot_rounds(rounds: Sequence[Mapping[str, Any]], png: Path) -> bool:
    """Plot accuracy and epsilon per committed round; write the points beside the PNG.

    ``png.with_suffix(".json")`` always gets ``{"round": [...], "accuracy": [...],
    "epsilon": [...]}`` (one point per committed round; ``null`` where not reported); the
    PNG (two panels) is written only when matplotlib is installed (``[demo]``).

    Parameters
    ----------
    rounds : sequence of mapping
        The status's ``rounds`` (``GET /v1/status`` or ``confide-server status --json``).
    png : Path
        The PNG to write.

    Returns
    -------
    bool
        Whether the PNG was written.
    """
    done = [r for r in rounds if r.get("status") == "committed"]
    xs = [int(r["round"]) for r in done]
    acc = [(r.get("metrics") or {}).get("eval_accuracy") for r in done]
    eps = [(r.get("privacy") or {}).get("epsilon") for r in done]
    points = {"round": xs, "accuracy": acc, "epsilon": eps}
    png.with_suffix(".json").write_text(json.dumps(points, indent=1) + "\n")
    try:
        import matplotlib
    except ModuleNotFoundError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def nan(values: list[Any]) -> list[float]:
        return [float("nan") if v is None else float(v) for v in values]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    top.plot(xs, nan(acc), marker="o", color="tab:blue")
    top.set_ylabel("eval accuracy")
    top.set_title("confide: accuracy and privacy per round")
    top.grid(alpha=0.3)
    bottom.plot(xs, nan(eps), marker="s", color="tab:red")
    bottom.set_ylabel("epsilon (cumulative)")
    bottom.set_xlabel("round")
    bottom.grid(alpha=0.3)
    if all(v is None for v in eps):
        bottom.text(0.5, 0.5, "no differential privacy", ha="center", transform=bottom.transAxes)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True
