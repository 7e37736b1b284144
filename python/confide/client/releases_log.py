"""A site's durable record of what it released: a redo re-sends the same bytes, never a new draw.

A noised update is a privacy release. When the server loses a submission it had
acknowledged (a rolled-back write-ahead log, a restored backup) or the site itself restarts
mid-round, the site is asked for the same ``(round, stage)`` again; training again would
draw fresh noise and release a second, unaccounted noised update of the same data. So a
site writes every upload body here, durably (written to a temporary file, fsynced, renamed,
directory fsynced), *before* it is sent, and answers a redo with the recorded bytes.

Records live in ``<state_dir>/releases/r<round>-<stage>.bin`` next to a SHA-256 of their
bytes; only the last :data:`KEEP_ROUNDS` rounds are kept (a redo only ever concerns the open
round, or the one before after a lost commit).

Examples
--------
>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp:
...     log = ReleaseLog(tmp)
...     log.get(3, "train") is None
...     log.put(3, "train", b"noised update")
...     ReleaseLog(tmp).get(3, "train")
True
b'noised update'
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from confide._fsio import write_atomic
from confide.errors import ConfigError

__all__ = ["KEEP_ROUNDS", "ReleaseLog"]

#: Rounds whose records are kept: the newest round written and the one before it.
KEEP_ROUNDS = 2

_STAGE = re.compile(r"[a-z_]{1,32}")
_RECORD = re.compile(r"r([0-9]{1,12})-([a-z_]{1,32})\.bin")


class ReleaseLog:
    """The upload bodies a site has released, per ``(round, stage)``, kept durably.

    Parameters
    ----------
    state_dir : str or Path
        The site's state folder; records go to its ``releases`` subfolder (created on the
        first :meth:`put`, mode 0700).
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "releases"

    def _path(self, round_id: int, stage: str) -> Path:
        if round_id < 0 or not _STAGE.fullmatch(stage):
            raise ConfigError(
                f"a release is keyed by a round >= 0 and a lower-case stage name, "
                f"got ({round_id!r}, {stage!r})"
            )
        return self.root / f"r{round_id}-{stage}.bin"

    def get(self, round_id: int, stage: str) -> bytes | None:
        """Return the bytes released for ``(round_id, stage)``, or ``None`` if none were.

        A record whose bytes do not match its hash was never sent (records are complete
        and fsynced before an upload starts): it is treated as absent.
        """
        path = self._path(round_id, stage)
        try:
            data = path.read_bytes()
            digest = path.with_suffix(".sha256").read_text().strip()
        except FileNotFoundError:
            return None
        return data if hashlib.sha256(data).hexdigest() == digest else None

    def put(self, round_id: int, stage: str, body: bytes) -> None:
        """Record ``body`` as the release of ``(round_id, stage)``, durably, before it is sent.

        Records of rounds older than the last :data:`KEEP_ROUNDS` are removed.
        """
        path = self._path(round_id, stage)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The hash first: a record file only ever appears complete and with its hash.
        write_atomic(path.with_suffix(".sha256"), hashlib.sha256(body).hexdigest().encode())
        write_atomic(path, body, sync_dir=True)
        self._prune(round_id)

    def _prune(self, newest: int) -> None:
        for entry in self.root.iterdir():
            m = _RECORD.fullmatch(entry.name)
            if m is not None and int(m.group(1)) <= newest - KEEP_ROUNDS:
                entry.with_suffix(".sha256").unlink(missing_ok=True)
                entry.unlink(missing_ok=True)
