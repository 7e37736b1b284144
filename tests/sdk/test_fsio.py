"""The one crash-safe writer (confide._fsio.write_atomic) every piece of on-disk state uses."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide._fsio import write_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@settings(max_examples=30, deadline=None)
@given(first=st.binary(max_size=4096), second=st.binary(max_size=4096))
def test_replaces_the_whole_content_private_and_leaves_no_temporary(
    tmp_path_factory: pytest.TempPathFactory, first: bytes, second: bytes
) -> None:
    folder = tmp_path_factory.mktemp("w")
    path = folder / "state.json"
    write_atomic(path, first)
    assert path.read_bytes() == first
    write_atomic(path, memoryview(second), sync_dir=True)
    assert path.read_bytes() == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _leftovers(folder) == []


def test_mode_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    write_atomic(path, b"x", mode=0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands in for the OS (outside our control): os.write may write fewer bytes than asked.
    real = os.write

    def one_byte(fd: int, data: bytes | memoryview) -> int:
        return real(fd, bytes(data[:1]))

    monkeypatch.setattr(os, "write", one_byte)
    write_atomic(tmp_path / "f", b"0123456789" * 20)
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"0123456789" * 20


def test_a_failed_fsync_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spend.json"
    write_atomic(path, b"old")

    def full(fd: int) -> None:  # stands in for a disk that is full (outside our control)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_missing_folder_is_an_oserror_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "absent" / "f", b"x")
    assert list(tmp_path.iterdir()) == []
