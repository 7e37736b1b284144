"""One server per state folder: an exclusive ``flock`` on ``<state_dir>/server.lock``.

``confide-server run`` takes the lock before it binds its port or opens the database and
holds it for the life of the process; the kernel releases it when the process ends in any
way (SIGKILL and power loss included), so a crashed server's successor starts at once and
no stale lock file ever needs removing by hand. A second server on the same folder is
refused with the holder's pid (written into the lock file). Commands that change the state
while no server runs (``confide-server new-job``) take the same lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from confide.errors import ConfigError

__all__ = ["LOCK_FILE", "StateLock"]

#: The lock file's name in the state folder.
LOCK_FILE = "server.lock"


class StateLock:
    """An exclusive, non-blocking lock on one state folder (released by :meth:`release`).

    Parameters
    ----------
    state_dir : Path
        The job's state folder (created, mode 0700, if missing).
    what : str
        Who takes it (``"confide-server run"``), recorded as :attr:`what`.

    Raises
    ------
    ConfigError
        Another process holds the lock (the message names its pid and the lock file).
    """

    def __init__(self, state_dir: Path, what: str = "confide-server") -> None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / LOCK_FILE
        self.what = what
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(
                f"the state folder {state_dir} is in use by {who} (lock {self.path}); "
                "stop that server first, or give this job its own [server] state_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock (idempotent); the file stays, holding no pid."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            os.close(fd)

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
