"""Damaged state is detected at start (issue 12 item 5): never a silent new job, no traceback.

Real SQLite files and the real ``confide-server run`` command: a database whose write-ahead
log was lost (the main file copied without its ``-wal``, as after a SIGKILL and a deleted
WAL), a deleted database, a replaced database and a corrupt one. Each refuses to start with
one clear line naming the recovery steps.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from confide_server.app import open_engine
from confide_server.config import Config
from confide_server.store import DamagedStateError, Store
from tests.server.conftest import FakeClock
from tests.server.util import delta_body, eval_body, tiny_manifest, write_job

MANIFEST = tiny_manifest()
ROOT = Path(__file__).resolve().parents[2]


def _job_with_history(tmp: Path) -> Config:
    """A job with enrolments and one committed round; its engine is left open (no close).

    Not closing matters: SQLite folds the WAL into the main file on the last close, so an
    open connection is what a SIGKILLed server leaves behind.
    """
    cfg = write_job(tmp, job__wait_for_clients=2, job__min_clients=2)
    clock = FakeClock()
    engine = open_engine(cfg, clock=clock)
    for cid in ("a", "b"):
        engine.enroll(engine.create_tokens(1)[0], cid, f"key-{cid}")
        engine.touch(cid)
    assert engine.tick()
    for cid in ("a", "b"):
        p = engine.prepare(cid, 1, "train", delta_body(MANIFEST, 0.1))
        engine.commit_submission(p, f"{cid}-t")
    assert engine.tick()
    for cid in ("a", "b"):
        p = engine.prepare(cid, 1, "evaluate", eval_body(0.5))
        engine.commit_submission(p, f"{cid}-e")
    assert engine.tick()
    assert engine.completed_rounds == 1
    _OPEN.append(engine.store)
    return cfg


_OPEN: list[Store] = []


@pytest.fixture(autouse=True)
def _close_open_stores() -> object:
    yield None
    while _OPEN:
        _OPEN.pop().close()


def _copy_without_wal(cfg: Config, dest: Path) -> Config:
    """The state folder as a crash plus a deleted WAL leaves it: main DB file, no -wal."""
    state = cfg.server.state_dir
    copy = dest / "state"
    shutil.copytree(state, copy, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    assert not (copy / "confide.sqlite-wal").exists()
    return write_job(dest, job__wait_for_clients=2, job__min_clients=2)


def _run_server(cfg_dir: Path) -> subprocess.CompletedProcess[str]:
    toml = cfg_dir / "job.toml"
    toml.write_text(
        '[job]\nname = "test"\nrounds = 2\nseed = 1\ncohort_size = 2\nmin_clients = 2\n'
        'wait_for_clients = 2\n[model]\nmanifest = "model.json"\nweights = "init.safetensors"\n'
        '[server]\nstate_dir = "state"\nport = 0\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "confide_server", "run", "--config", str(toml)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_lost_wal_refuses_to_start(tmp_path: Path) -> None:
    cfg = _job_with_history(tmp_path / "live")
    copy = _copy_without_wal(cfg, tmp_path / "copy")
    with pytest.raises(DamagedStateError, match="write-ahead log") as info:
        open_engine(copy, clock=FakeClock())
    assert "restore the state folder" in info.value.message
    # the real command: one line on stderr, exit status 2, no traceback, no new job
    proc = _run_server(tmp_path / "copy")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "write-ahead log" in lines[0]
    assert "restore the state folder" in lines[0]


def test_deleted_database_refuses_to_start(tmp_path: Path) -> None:
    cfg = _job_with_history(tmp_path)
    _OPEN.pop().close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(cfg.server.database) + suffix).unlink(missing_ok=True)
    with pytest.raises(DamagedStateError, match="holds no job"):
        open_engine(cfg, clock=FakeClock())


def test_older_database_copy_refuses_to_start(tmp_path: Path) -> None:
    cfg = write_job(tmp_path, job__wait_for_clients=1, job__min_clients=1)
    engine = open_engine(cfg, clock=FakeClock())
    engine.enroll(engine.create_tokens(1)[0], "a", "key-a")
    engine.store.close()
    db = cfg.server.database
    backup = tmp_path / "backup.sqlite"
    shutil.copy(db, backup)  # closed: the WAL is folded in, the copy is complete
    engine = open_engine(cfg, clock=FakeClock())
    engine.enroll(engine.create_tokens(1)[0], "b", "key-b")  # one more commit
    engine.store.close()
    shutil.copy(backup, db)  # an older copy put back
    with pytest.raises(DamagedStateError, match="committed work is missing"):
        open_engine(cfg, clock=FakeClock())


def test_replaced_database_refuses_to_start(tmp_path: Path) -> None:
    cfg = write_job(tmp_path / "one")
    other = write_job(tmp_path / "two")
    open_engine(cfg, clock=FakeClock()).store.close()
    open_engine(other, clock=FakeClock()).store.close()
    shutil.copy(other.server.database, cfg.server.database)
    with pytest.raises(DamagedStateError, match="belongs to job"):
        open_engine(cfg, clock=FakeClock())


def test_corrupt_database_is_one_clear_line(tmp_path: Path) -> None:
    cfg = write_job(tmp_path, job__wait_for_clients=2, job__min_clients=2)
    open_engine(cfg, clock=FakeClock()).store.close()
    db = cfg.server.database
    data = bytearray(db.read_bytes())
    data[:100] = b"\x00garbage" * 12 + b"gar!"
    db.write_bytes(bytes(data))
    with pytest.raises(DamagedStateError, match="not a readable confide database"):
        Store(db)
    proc = _run_server(tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "not a readable confide database" in lines[0]


def test_clean_restarts_and_crash_between_commit_and_manifest_are_fine(tmp_path: Path) -> None:
    cfg = _job_with_history(tmp_path)
    store = _OPEN.pop()
    commits = int(store.get_meta("commit_counter") or 0)
    assert commits >= 4  # 2 enrolments, round start, round close
    store.close()
    # a manifest that is behind (crash after COMMIT, before its rewrite) is brought up to date
    manifest = cfg.server.database.with_name("confide.sqlite.job.json")
    text = manifest.read_text().replace(f'"commits": {commits}', '"commits": 1')
    manifest.write_text(text)
    engine = open_engine(cfg, clock=FakeClock())
    assert engine.completed_rounds == 1
    assert f'"commits": {commits}' in manifest.read_text()
    engine.store.close()
