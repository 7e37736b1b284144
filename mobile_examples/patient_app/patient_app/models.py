r"""The device's model: download a release from the confide server, verify it, keep it.

A release is accepted only after :func:`confide.protocol.release.verify_release` has
checked, against the release key pinned in the app's configuration: the signature, the
model's SHA-256, the device's DP policy and that the version is not older than one already
accepted (the highest accepted version is kept in ``<state>/versions.json``). The verified
bytes are what is loaded (``load_model(..., expected_sha256=...)``), and they are kept in
``<state>/release/`` so the app starts offline with the last verified model; on start they
are verified again.

The only requests this module makes go to the configured server, and they are ``GET``\\ s
without a body: nothing about the patient leaves the device here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from confide.inference import LocalModel, load_model
from confide.protocol.release import (
    DevicePolicy,
    ReleaseError,
    ReleaseRecord,
    VersionStore,
    key_fingerprint,
    verify_release,
)

__all__ = ["ModelManager", "UpdateError", "VerifiedModel"]

log = logging.getLogger("patient_app.models")

# A device model is a few MB; refuse to download more than this from anyone.
MAX_MODEL_BYTES = 256 << 20


class UpdateError(Exception):
    """A model update failed; the message is meant for the patient."""


@dataclass
class VerifiedModel:
    """A release that passed verification, opened for inference."""

    record: ReleaseRecord
    model: LocalModel

    def describe(self) -> dict[str, Any]:
        """JSON summary shown on the page."""
        dp = self.record.dp
        return {
            "version": self.record.version,
            "job_id": self.record.job_id,
            "classes": list(self.record.classes),
            "sha256": self.record.model_sha256,
            "engine": self.model.engine,
            "dp": None if dp is None else {**dp.to_dict(), "text": dp.describe()},
            "created_at": self.record.created_at,
            "input": self.model.input.describe(),
            "trainable": "features" in self.model.output_names,
        }


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class ModelManager:
    """Holds the verified model and updates it from the server.

    Parameters
    ----------
    server_url : str or None
        The confide server (``None``: offline, only the stored release is used).
    release_key : str
        Base64 raw Ed25519 release public key, pinned at enrolment / installation.
    policy : DevicePolicy
        The weakest DP guarantee this device accepts.
    state_dir : Path
        Where verified releases and accepted versions are kept.
    engine : str, default "onnx"
        Inference engine.
    """

    def __init__(
        self,
        server_url: str | None,
        release_key: str,
        policy: DevicePolicy,
        state_dir: Path,
        engine: str = "onnx",
    ) -> None:
        self.server_url = None if server_url is None else server_url.rstrip("/")
        self.release_key = release_key
        self.fingerprint = key_fingerprint(release_key)
        self.policy = policy
        self.dir = state_dir / "release"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.versions = VersionStore(state_dir / "versions.json")
        self.engine = engine
        self.current: VerifiedModel | None = None
        self._lock = asyncio.Lock()

    def load_stored(self) -> VerifiedModel | None:
        """Re-verify and open the release kept on disk, if any."""
        paths = [self.dir / n for n in ("record", "signature", "model")]
        if not all(p.exists() for p in paths):
            return None
        record_bytes, signature, model = (p.read_bytes() for p in paths)
        try:
            self.current = self._accept(record_bytes, signature, model)
        except ReleaseError as exc:
            log.warning("stored release refused: %s", exc)
            return None
        return self.current

    def _accept(self, record_bytes: bytes, signature: bytes, model: bytes) -> VerifiedModel:
        record = verify_release(
            record_bytes, signature, model, self.release_key, self.policy, self.versions
        )
        opened = load_model(model, self.engine, expected_sha256=record.model_sha256)
        return VerifiedModel(record, opened)

    def import_release(self, prefix: Path) -> VerifiedModel:
        """Verify and install a release from files (``<prefix>.record``, ``.sig``, ``.model``).

        ``prefix`` may also be the server's ``releases`` folder: its newest version is used.

        For a device without a connection to the server (or ``make app`` after a finished
        demo job): the files are the server's ``<state>/releases/<version>.*``; they are
        checked exactly as a download is.

        Raises
        ------
        UpdateError
            A file is missing, or the release is refused (the message says why).
        """
        if prefix.is_dir():  # the releases folder itself: its newest version
            versions = [int(p.stem) for p in prefix.glob("*.record") if p.stem.isdigit()]
            if not versions:
                raise UpdateError(f"There is no release in {prefix}.")
            prefix = prefix / str(max(versions))
        try:
            record_bytes, signature, model = (
                Path(f"{prefix}{ext}").read_bytes() for ext in (".record", ".sig", ".model")
            )
        except OSError as exc:
            raise UpdateError(f"The release files cannot be read: {exc}") from None
        try:
            verified = self._accept(record_bytes, signature, model)
        except ReleaseError as exc:
            raise UpdateError(f"The model was refused: {exc}") from None
        self._store(record_bytes, signature, model)
        self.current = verified
        return verified

    def _store(self, record_bytes: bytes, signature: bytes, model: bytes) -> None:
        for name, data in (("model", model), ("signature", signature), ("record", record_bytes)):
            _write(self.dir / name, data)

    async def update(self, session: aiohttp.ClientSession) -> VerifiedModel:
        """Fetch the latest release, verify it and switch to it.

        Raises
        ------
        UpdateError
            The server is not configured or not reachable, has no release, or the release
            was refused (the message says why).
        """
        if self.server_url is None:
            raise UpdateError("No confide server is configured; the app runs offline.")
        async with self._lock:
            try:
                doc = await self._get_json(session, "/v1/releases/latest")
                if not isinstance(doc, dict) or not all(
                    isinstance(doc.get(k), str) for k in ("record", "signature", "model_url")
                ):
                    raise UpdateError("The server's release answer is malformed.")
                model = await self._get_bytes(session, doc["model_url"])
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise UpdateError(f"The confide server cannot be reached ({exc}).") from None
            record_bytes = doc["record"].encode("ascii", errors="replace")
            try:
                signature = base64.b64decode(doc["signature"], validate=True)
            except ValueError:
                signature = b""
            try:
                verified = await asyncio.to_thread(self._accept, record_bytes, signature, model)
            except ReleaseError as exc:
                log.warning("release refused: %s", exc)
                raise UpdateError(f"The new model was refused: {exc}") from None
            for name, data in (
                ("model", model),
                ("signature", signature),
                ("record", record_bytes),
            ):
                _write(self.dir / name, data)
            self.current = verified
            log.info("switched to model version %d", verified.record.version)
            return verified

    def _url(self, path: str) -> str:
        if self.server_url is None:
            raise UpdateError("No confide server is configured; the app runs offline.")
        return self.server_url + path

    async def _get_json(self, session: aiohttp.ClientSession, path: str) -> Any:
        async with session.get(self._url(path)) as resp:
            if resp.status == 404:
                raise UpdateError("The confide server has not released a model yet.")
            if resp.status != 200:
                raise UpdateError(f"The confide server answered HTTP {resp.status}.")
            return json.loads(await resp.read())

    async def _get_bytes(self, session: aiohttp.ClientSession, path: str) -> bytes:
        if not path.startswith("/v1/releases/"):
            raise UpdateError("The server's release points outside the release API.")
        async with session.get(self._url(path)) as resp:
            if resp.status != 200:
                raise UpdateError(f"The model download failed (HTTP {resp.status}).")
            if (resp.content_length or 0) > MAX_MODEL_BYTES:
                raise UpdateError("The model is larger than this device accepts.")
            chunks = []
            total = 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                total += len(chunk)
                if total > MAX_MODEL_BYTES:
                    raise UpdateError("The model is larger than this device accepts.")
                chunks.append(chunk)
            return b"".join(chunks)
