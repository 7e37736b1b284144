"""Signed model releases, the server side: the release key and the release book.

No aiohttp here (the engine may call it where it commits a model); the HTTP endpoints are
in :mod:`confide_server.releases`.

The server signs every model version it releases to devices with its **release key**, an
Ed25519 key created once in the state directory (``release_key.pem``, mode 0600) and never
sent anywhere; its public key (also written to ``release_key.pub``) is what sites and
devices pin. ``GET /v1/releases/key`` serves it; :func:`enrolment_fields` gives the fields
the enrolment answer is to carry (not wired into the enrol handler yet). Each release is a
:class:`confide.protocol.release.ReleaseRecord` (model SHA-256, version, manifest SHA-256,
classes, the accounted DP guarantee) and its signature; the book keeps them as files::

    <state_dir>/releases/<version>.record    canonical record bytes (what is signed)
    <state_dir>/releases/<version>.sig       64-byte Ed25519 signature
    <state_dir>/releases/<version>.model     the model file (ONNX)

written model first, record last, each atomically (temporary file, ``fsync``,
``os.replace``), so a crash never leaves a record whose model is missing. Versions start at
1 and grow by one per release, across jobs, for the lifetime of the key.

:func:`head_release_onnx` builds the device model of a frozen-backbone job: the backbone
ONNX (output ``features``) followed by the trained numpy head, with outputs
``probabilities`` and ``features`` (it needs the ``onnx`` package on the server).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide._fsio import write_atomic
from confide.errors import ConfigError
from confide.protocol.manifest import Manifest, sha256_hex
from confide.protocol.release import (
    DPGuarantee,
    ReleaseRecord,
    key_fingerprint,
    sign_release,
)
from confide.protocol.signing import Identity

__all__ = [
    "Release",
    "ReleaseBook",
    "device_model_onnx",
    "dp_guarantee",
    "enrolment_fields",
    "head_release_onnx",
    "load_or_create_release_key",
    "release_model_version",
]

log = logging.getLogger("confide_server.releases")

_KEY_FILE = "release_key.pem"
_PUB_FILE = "release_key.pub"
_VERSION_RE = re.compile(r"([0-9]{1,12})\.record")


def load_or_create_release_key(state_dir: Path) -> Identity:
    """Return the server's release key, creating it (mode 0600) on first use.

    Parameters
    ----------
    state_dir : Path
        The server's state directory.

    Returns
    -------
    Identity
        The Ed25519 release key. Its public key (base64) is also written to
        ``release_key.pub`` when the key is created.

    Raises
    ------
    ConfigError
        The key file exists with a mode wider than 0600, or is not an Ed25519 key.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / _KEY_FILE
    if path.exists():
        return Identity.load(path)
    key = Identity.generate()
    key.save(path)
    # The public half, for operators to hand to devices (``patient-app --release-key-file``).
    (state_dir / _PUB_FILE).write_text(key.public_key_b64 + "\n")
    log.info("created release key %s (fingerprint %s)", path, key_fingerprint(key.public_key_b64))
    return key


@dataclass(frozen=True)
class Release:
    r"""One signed release as stored.

    Parameters
    ----------
    record_bytes : bytes
        Canonical record (the signed bytes).
    signature : bytes
        Ed25519 signature of ``confide-release/1\\n`` + ``record_bytes``.
    record : ReleaseRecord
        The parsed record.
    """

    record_bytes: bytes
    signature: bytes
    record: ReleaseRecord

    def to_json(self) -> dict[str, Any]:
        """Return the JSON body of ``GET /v1/releases/{version}``."""
        v = self.record.version
        return {
            "version": v,
            "record": self.record_bytes.decode("ascii"),
            "signature": base64.b64encode(self.signature).decode(),
            "model_sha256": self.record.model_sha256,
            "model_url": f"/v1/releases/{v}/model",
        }


class ReleaseBook:
    """The server's signed releases, on disk under ``<state_dir>/releases``.

    Thread-safe; every method is synchronous (handlers call them via ``asyncio.to_thread``).

    Parameters
    ----------
    state_dir : Path
        The server's state directory (holds ``release_key.pem`` and ``releases/``).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> book = ReleaseBook(Path(tempfile.mkdtemp()))
    >>> r = book.release(job_id="derm", model=b"model", manifest_sha256="ab" * 32,
    ...                  classes=["benign", "malignant"], dp=DPGuarantee(2.0, 1e-5, "patient"))
    >>> r.record.version, book.latest().record.version
    (1, 1)
    """

    def __init__(self, state_dir: Path) -> None:
        self.key = load_or_create_release_key(state_dir)
        self.dir = state_dir / "releases"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()

    @property
    def public_key_b64(self) -> str:
        """Base64 raw release public key (what devices pin)."""
        return self.key.public_key_b64

    def versions(self) -> list[int]:
        """Released versions, ascending."""
        found = (_VERSION_RE.fullmatch(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m is not None)

    def release(
        self,
        *,
        job_id: str,
        model: bytes,
        manifest_sha256: str,
        classes: Sequence[str],
        dp: DPGuarantee | None,
        created_at: int | None = None,
        model_format: str = "onnx",
    ) -> Release:
        """Sign and store ``model`` as the next version.

        Parameters
        ----------
        job_id : str
            The job the model comes from.
        model : bytes
            The ONNX model file.
        manifest_sha256 : str
            Architecture (manifest SHA-256) of the trained parameters.
        classes : sequence of str
            Class names, in output order.
        dp : DPGuarantee or None
            The guarantee accounted for this model version (cumulative over the job).
        created_at : int, optional
            Unix seconds (now when omitted).
        model_format : {"onnx", "tflite"}, default "onnx"
            Format of ``model``.

        Returns
        -------
        Release
            The stored release.
        """
        with self._lock:
            versions = self.versions()
            version = (versions[-1] if versions else 0) + 1
            record = ReleaseRecord.create(
                job_id=job_id,
                version=version,
                model=model,
                manifest_sha256=manifest_sha256,
                classes=classes,
                dp=dp,
                created_at=created_at,
                model_format=model_format,
            )
            data = record.to_bytes()
            signature = sign_release(record, self.key)
            write_atomic(self.dir / f"{version}.model", bytes(model), sync_dir=True)
            write_atomic(self.dir / f"{version}.sig", signature, sync_dir=True)
            write_atomic(self.dir / f"{version}.record", data, sync_dir=True)
        dp_text = "no DP" if dp is None else dp.describe()
        log.info("released model version %d of job %s, %s", version, job_id, dp_text)
        return Release(data, signature, record)

    def get(self, version: int) -> Release | None:
        """Return a stored release, or ``None``."""
        path = self.dir / f"{int(version)}.record"
        if not path.exists():
            return None
        data = path.read_bytes()
        signature = (self.dir / f"{int(version)}.sig").read_bytes()
        return Release(data, signature, ReleaseRecord.from_bytes(data))

    def latest(self) -> Release | None:
        """Return the newest release, or ``None`` before the first."""
        versions = self.versions()
        return self.get(versions[-1]) if versions else None

    def model(self, version: int) -> bytes | None:
        """Return the model bytes of a release, or ``None``."""
        if (self.dir / f"{int(version)}.record").exists():
            return (self.dir / f"{int(version)}.model").read_bytes()
        return None


def enrolment_fields(book: ReleaseBook) -> dict[str, str]:
    """Fields the enrolment answer adds so the client pins the release key.

    Parameters
    ----------
    book : ReleaseBook
        The server's release book.

    Returns
    -------
    dict
        ``{"release_public_key": base64, "release_key_fingerprint": hex}``.
    """
    return {
        "release_public_key": book.public_key_b64,
        "release_key_fingerprint": key_fingerprint(book.public_key_b64),
    }


# --- device model of a frozen-backbone job ------------------------------------------------


def head_release_onnx(
    backbone: bytes,
    manifest: Manifest,
    weights: NDArray[np.float32],
    features_output: str = "features",
) -> bytes:
    """Append a trained numpy head to a frozen backbone: the model devices run.

    Parameters
    ----------
    backbone : bytes
        ONNX backbone with a ``(N, d)`` output named ``features_output``.
    manifest : Manifest
        The head's manifest (a ``NumpyTrainer`` spec: logistic, softmax or MLP).
    weights : numpy.ndarray
        The head's flat float32 vector (a committed model version).
    features_output : str, default "features"
        The backbone output the head reads.

    Returns
    -------
    bytes
        ONNX model with outputs ``probabilities`` (softmax over classes; a logistic head
        gives ``[1 - p, p]``, as ``NumpyTrainer.predict_proba``) and ``features``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = dict(manifest.spec)
    if spec.get("engine") != "numpy":
        raise ConfigError(f"head_release_onnx needs a numpy head manifest, got {spec!r}")
    views = manifest.unflatten(np.ascontiguousarray(weights, np.float32))
    n = len(manifest.tensors) // 2
    model = onnx.load_from_string(backbone)
    graph = model.graph
    if features_output not in [o.name for o in graph.output]:
        raise ConfigError(f"backbone has no output {features_output!r}")
    # Keep only what computes the features (a released model's own head is dropped).
    needed = {features_output}
    kept = []
    for node in reversed(list(graph.node)):
        if needed & set(node.output):
            kept.append(node)
            needed |= set(node.input)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    prefix = "release_head."
    names = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer}
    if any(n.startswith(prefix) or n == "probabilities" for n in names):
        raise ConfigError(f"backbone tensor names clash with {prefix!r} or 'probabilities'")
    a = features_output
    for i in range(n):
        w = np.array(views[f"layer{i}.weight"], np.float32)
        b = np.array(views[f"layer{i}.bias"], np.float32)
        if i == n - 1 and w.shape[1] == 1:  # logistic: logits [0, z] give [1 - s(z), s(z)]
            w = np.concatenate([np.zeros_like(w), w], axis=1)
            b = np.concatenate([np.zeros_like(b), b])
        wn, bn, zn = f"{prefix}layer{i}.weight", f"{prefix}layer{i}.bias", f"{prefix}z{i}"
        graph.initializer.extend([numpy_helper.from_array(w, wn), numpy_helper.from_array(b, bn)])
        graph.node.append(helper.make_node("Gemm", [a, wn, bn], [zn]))
        a = zn
        if i < n - 1:
            act = "Tanh" if spec.get("activation", "tanh") == "tanh" else "Relu"
            graph.node.append(helper.make_node(act, [a], [f"{prefix}h{i}"]))
            a = f"{prefix}h{i}"
    graph.node.append(helper.make_node("Softmax", [a], ["probabilities"], axis=1))
    k = max(2, int(spec["n_classes"]))
    keep = [o for o in graph.output if o.name == features_output]
    del graph.output[:]
    graph.output.extend(
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]), *keep]
    )
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString(deterministic=True)
    return data


# --- releasing a committed model version ---------------------------------------------------


def dp_guarantee(privacy_summary: Mapping[str, Any] | None) -> DPGuarantee | None:
    """Return the guarantee to record for a job's current model, from its privacy summary.

    Parameters
    ----------
    privacy_summary : mapping or None
        ``read_privacy(store)[0]``: ``mode``, ``delta`` and the cumulative ``epsilon``.

    Returns
    -------
    DPGuarantee or None
        ``None`` without DP. The unit follows the mechanism: ``sample`` (DP-SGD with
        Poisson sampling and clipping per patient id) is ``"patient"``; ``central`` and
        ``distributed`` (clipping and noising each site's update) are ``"site"``.

    Examples
    --------
    >>> dp_guarantee({"mode": "sample", "epsilon": 1.25, "delta": 1e-5}).describe()
    '(epsilon=1.25, delta=1e-05) patient-level DP'
    >>> dp_guarantee(None) is None
    True
    """
    if privacy_summary is None or privacy_summary.get("mode", "none") == "none":
        return None
    unit = "patient" if privacy_summary["mode"] == "sample" else "site"
    return DPGuarantee(float(privacy_summary["epsilon"]), float(privacy_summary["delta"]), unit)


def device_model_onnx(
    manifest: Manifest, weights: NDArray[np.float32], backbone: bytes | None = None
) -> bytes:
    """Return the ONNX file devices run for a model version.

    Parameters
    ----------
    manifest : Manifest
        The job's manifest.
    weights : numpy.ndarray
        The version's flat float32 vector.
    backbone : bytes, optional
        Frozen ONNX backbone (output ``features``) of a head job: the device model is
        :func:`head_release_onnx`. Without it a numpy or torch model is exported on its
        own with :func:`confide.export.export_onnx` and checked against onnxruntime.

    Returns
    -------
    bytes
        The ONNX model (output ``probabilities``).

    Raises
    ------
    ConfigError
        Neither a numpy nor a torch model.
    """
    if backbone is not None:
        return head_release_onnx(backbone, manifest, weights)
    engine = dict(manifest.spec).get("engine")
    if engine not in ("numpy", "torch"):
        raise ConfigError(
            f"the server exports numpy and torch models, not engine {engine!r}; export it "
            "with confide.export.export_onnx and release the file with ReleaseBook.release"
        )
    import tempfile

    from confide.export import export_onnx, verify_onnx
    from confide.training import build_trainer

    trainer = build_trainer(manifest)
    trainer.set_weights(np.ascontiguousarray(weights, np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(trainer, Path(tmp) / "model.onnx")
        verify_onnx(trainer, path)  # what devices run must be what was trained
        return path.read_bytes()


def release_model_version(
    book: ReleaseBook,
    *,
    job_id: str,
    manifest: Manifest,
    weights: NDArray[np.float32],
    privacy_summary: Mapping[str, Any] | None,
    classes: Sequence[str],
    backbone: bytes | None = None,
) -> Release:
    """Sign and store a committed model version, unless it is already the latest release.

    Idempotent, so the engine can call it after each commit and again when it recovers
    after a crash between the commit and the release.

    Parameters
    ----------
    book : ReleaseBook
        The server's releases.
    job_id : str
        The job.
    manifest : Manifest
        The job's manifest (its SHA-256 is the release's architecture).
    weights : numpy.ndarray
        The committed flat vector.
    privacy_summary : mapping or None
        The job's privacy summary at that version (see :func:`dp_guarantee`).
    classes : sequence of str
        Class names in output order.
    backbone : bytes, optional
        Frozen backbone of a head job (see :func:`device_model_onnx`).

    Returns
    -------
    Release
        The new release, or the latest one when it already holds this model.
    """
    model = device_model_onnx(manifest, weights, backbone)
    latest = book.latest()
    if (
        latest is not None
        and latest.record.job_id == job_id
        and latest.record.model_sha256 == sha256_hex(model)
    ):
        return latest
    return book.release(
        job_id=job_id,
        model=model,
        manifest_sha256=manifest.sha256,
        classes=classes,
        dp=dp_guarantee(privacy_summary),
    )
