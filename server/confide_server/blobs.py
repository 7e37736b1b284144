"""Content-addressed blob files: model versions and client updates, written durably.

A blob is written to a temporary file, fsynced, renamed into place and its folder fsynced,
so a blob named by a committed SQLite row (:mod:`confide_server.store`) is always complete.
Model versions are named by the SHA-256 of their bytes: re-running an interrupted
aggregation rewrites the same file under the same name.

An upload body is streamed to a temporary file in ``updates/`` (:meth:`BlobStore.stage`,
hashed on the way) instead of being held in memory while it arrives. When the engine
then stores that body (:meth:`BlobStore.write` with the bytes :meth:`BlobStore.read_staged`
returned), the temporary file is fsynced and renamed into place rather than written again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from confide.errors import FederationError
from confide.protocol.manifest import sha256_hex

__all__ = ["BlobStore", "DamagedBlobError", "FaultHook", "StagedUpload"]

#: Test-only fault injection: called with a step name before each durable write step
#: (``"blob_write:<relpath>"``, ``"db_commit"``); it may raise ``OSError`` or
#: ``sqlite3.OperationalError`` to stand in for a full or failing disk. Shipped commands
#: never pass one (the e2e tests' own entry point does).
FaultHook = Callable[[str], None]


class DamagedBlobError(FederationError):
    """A stored blob is missing or its bytes do not hash to the SHA-256 recorded for it."""

    code = "corrupt_state"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Bytes a staged upload collects before one write() system call.
_BATCH = 256 * 1024


class StagedUpload:
    """An upload body being streamed to a temporary file, hashed (SHA-256) on the way.

    Made by :meth:`BlobStore.stage`; the file is named ``.upload-*.tmp`` so a crash leaves
    nothing :meth:`BlobStore.remove_temporaries` does not clean up.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []  # written in batches of _BATCH bytes (fewer syscalls)
        self._pending_n = 0
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, chunk: bytes) -> None:
        """Append ``chunk`` to the file and the hash."""
        if self._fd is None:
            raise OSError(errno.EBADF, "write to a closed staged upload", str(self.path))
        self._hash.update(chunk)
        self.size += len(chunk)
        self._pending.append(chunk)
        self._pending_n += len(chunk)
        if self._pending_n >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._fd is None or not self._pending:
            return
        view = memoryview(b"".join(self._pending))
        self._pending, self._pending_n = [], 0
        while view:
            view = view[os.write(self._fd, view) :]

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes written so far."""
        return self._hash.hexdigest()

    def close(self) -> None:
        """Write what is pending and close the file (it stays until stored or discarded)."""
        if self._fd is not None:
            try:
                self._flush()
            finally:
                os.close(self._fd)
                self._fd = None


class BlobStore:
    """Files written atomically and durably under a root folder.

    Parameters
    ----------
    root : Path
        Folder for ``models/`` and ``updates/``.
    """

    def __init__(self, root: Path, *, fault_hook: FaultHook | None = None) -> None:
        self.root = root
        self._fault = fault_hook or (lambda _step: None)
        self._lock = threading.Lock()
        # id(bytes) -> (those bytes, their staged file): write() renames instead of writing.
        self._staged: dict[int, tuple[bytes, Path]] = {}
        (root / "models").mkdir(parents=True, exist_ok=True)
        (root / "updates").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def write_file(final: Path, data: bytes) -> None:
        """Write ``data`` to ``final`` durably (tmp + fsync + rename + dir fsync), no hook."""
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def write(self, relpath: str, data: bytes) -> Path:
        """Write ``data`` to ``root/relpath`` durably (tmp + fsync + rename + dir fsync).

        Parameters
        ----------
        relpath : str
            Path relative to the root.
        data : bytes
            Content.

        Returns
        -------
        Path
            The final path.
        """
        final = self.root / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            entry = self._staged.get(id(data))
        if entry is not None and entry[0] is data:
            return self._adopt(relpath, final, entry[1])
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._fault(f"blob_write:{relpath}")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)  # a failed write leaves no partial file behind
            raise
        os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    def _adopt(self, relpath: str, final: Path, staged: Path) -> Path:
        """Store a staged upload's file as ``final``: fsync, rename, folder fsync."""
        self._fault(f"blob_write:{relpath}")
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, final)
        _fsync_dir(final.parent)
        return final

    def stage(self) -> StagedUpload:
        """Open a temporary file in ``updates/`` to stream an upload body into."""
        return StagedUpload(self.root / "updates" / f".upload-{secrets.token_hex(8)}.tmp")

    def read_staged(self, staged: StagedUpload) -> bytes:
        """Read a (closed) staged upload; :meth:`write` of these very bytes renames the file.

        The decoder needs the body as one ``bytes`` object (``safetensors`` parses bytes);
        this is the one copy of it in memory, made in the worker thread that decodes it.
        Pair with :meth:`discard_staged`.
        """
        staged.close()
        data = staged.path.read_bytes()
        with self._lock:
            self._staged[id(data)] = (data, staged.path)
        return data

    def discard_staged(self, staged: StagedUpload) -> None:
        """Forget a staged upload and delete its file unless :meth:`write` stored it."""
        staged.close()
        with self._lock:
            for key in [k for k, (_, p) in self._staged.items() if p == staged.path]:
                del self._staged[key]
        staged.path.unlink(missing_ok=True)

    def model_relpath(self, sha256: str) -> str:
        """Relative path of a model version."""
        return f"models/{sha256}.safetensors"

    def write_model(self, data: bytes) -> str:
        """Store a model version under its SHA-256 and return the hash."""
        digest = sha256_hex(data)
        if not (self.root / self.model_relpath(digest)).exists():
            self.write(self.model_relpath(digest), data)
        return digest

    def model_files(self) -> dict[str, Path]:
        """Every model file in ``models/`` by its SHA-256 name (temporary files excluded)."""
        suffix = ".safetensors"
        return {
            p.name[: -len(suffix)]: p
            for p in (self.root / "models").iterdir()
            if p.name.endswith(suffix) and not p.name.startswith(".")
        }

    def remove_model(self, sha256: str) -> bool:
        """Delete a model file durably (unlink + folder fsync); whether it existed.

        For model versions no committed row names: a noised aggregate whose commit was
        killed or failed must not stay on disk beside the one the round releases.
        """
        path = self.root / self.model_relpath(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def remove_temporaries(self) -> int:
        """Delete the temporary files of writes a crash interrupted; return how many."""
        gone = 0
        for folder in (self.root / "models", self.root / "updates"):
            for p in folder.rglob(".*.tmp"):
                p.unlink(missing_ok=True)
                gone += 1
        return gone

    def read(self, relpath: str) -> bytes:
        """Read a stored blob."""
        return (self.root / relpath).read_bytes()

    def read_verified(self, relpath: str, sha256: str, what: str) -> bytes:
        """Read a stored blob and check it against the SHA-256 recorded for it.

        Raises
        ------
        DamagedBlobError
            The file is missing or its bytes hash to something else (disk damage, an edit).
        """
        try:
            data = self.read(relpath)
        except FileNotFoundError:
            raise DamagedBlobError(
                f"{what} file {relpath} is missing from {self.root}; the state folder is damaged"
            ) from None
        got = sha256_hex(data)
        if got != sha256:
            raise DamagedBlobError(
                f"{what} file {relpath} hashes to {got[:16]}..., not the recorded "
                f"{sha256[:16]}...; the state folder is damaged"
            )
        return data
