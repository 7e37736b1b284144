"""One crash-safe file writer for every piece of state confide keeps on disk.

A site's privacy spend log, its pinned peers, its identity key, a release record, a momentum
buffer: each is replaced as a whole, through a temporary file in the same folder that is
written completely, fsynced and renamed over the old file (``os.replace`` is atomic on
POSIX), so a crash or power loss leaves either the old or the new content, never a torn or
empty file. ``sync_dir`` also fsyncs the folder, which makes the rename itself durable (what
a record must have before anything that depends on it is acknowledged).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["append_durably", "write_atomic"]


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes | bytearray | memoryview,
    *,
    mode: int = 0o600,
    fsync: bool = True,
    sync_dir: bool = False,
) -> None:
    """Replace ``path`` with ``data``: unique temporary file, full write, fsync, rename.

    Parameters
    ----------
    path : str or PathLike
        The file to replace; its folder must exist.
    data : bytes-like
        The whole new content (written in a loop: ``os.write`` may write less than asked).
    mode : int
        Permission bits of the new file (default ``0o600``: state is private to its owner).
    fsync : bool
        Flush the file to stable storage before the rename (default). Only a cache whose
        entries are checked when read (and recomputed) may skip it.
    sync_dir : bool
        Also fsync the folder so that the rename survives a power loss.

    Raises
    ------
    OSError
        From the file system (disk full, permissions); the old file is then untouched and
        the temporary file removed.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def append_durably(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Append ``data`` to ``path`` (created 0600 if missing) and fsync it.

    For exports rebuilt from a database: a crash may cut the last line, which the next
    whole rewrite repairs; what must never be torn goes through :func:`write_atomic`.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
