"""The patient app: one page on the device's loopback, diagnosis computed on the device.

Routes (all served by this process on 127.0.0.1; the page loads nothing else):

``GET /``                 the page (inline CSS and JS, a strict Content-Security-Policy)
``GET /api/status``       the verified model (version, classes, DP guarantee), consent, training
``POST /api/diagnose``    body: the image file; answer: class probabilities (on-device)
``POST /api/update``      download, verify and switch to the server's latest release
``POST /api/consent``     ``{"train": bool}``: the patient's opt-in to training
``POST /api/label``       ``{"key", "label"}``: keep an image's *features* for training
``POST /api/train``       take part in the server's training job (opt-in only)

The image goes from the browser to this process and nowhere else: ``/api/diagnose`` never
opens a connection, and the only connections the app opens are the release downloads
(``GET``, no body) and, only after opt-in, confide's federated client, which sends
DP-noised, securely aggregated head updates, never images or features.

Errors never reach the page as tracebacks: every failure is a JSON ``{"error": message}``
with a sentence meant for the patient (the error middleware), and unexpected exceptions are
logged without the image.

POST routes require the ``X-Patient-App: 1`` header (a cross-site page cannot send it
without a CORS preflight, which this app never grants) and a loopback ``Host`` (against DNS
rebinding), so another web page cannot flip the consent or feed the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from confide.client.policy import SitePolicy
from confide.inference import device_dataset
from confide.protocol.release import DevicePolicy
from patient_app.imaging import MAX_UPLOAD_BYTES, ImageError, decode_image, to_model_input
from patient_app.models import ModelManager, UpdateError, VerifiedModel

__all__ = ["AppConfig", "create_app"]

log = logging.getLogger("patient_app")

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class AppConfig:
    """Configuration of the local app.

    Parameters
    ----------
    state_dir : Path
        The app's private folder (verified models, accepted versions, consent, features).
    release_key : str
        Base64 Ed25519 release public key of the confide server (pinned).
    server_url : str, optional
        The confide server; ``None`` runs offline on the stored model.
    policy : DevicePolicy
        The weakest DP guarantee this device accepts.
    engine : str
        ``"onnx"`` (default) or ``"litert"``.
    enroll_token : str, optional
        One-time token to enrol as a training client (only used after opt-in).
    client_id : str, optional
        Client id used at enrolment; by default ``device-`` and 12 random hex digits,
        chosen once and kept in the state folder (it names the device, not the patient).
    update_on_start : bool
        Fetch and verify the server's latest release when the app starts.
    import_release : Path, optional
        Verify and install the release files ``<path>.record|.sig|.model`` at start (the
        server's ``<state>/releases/<version>``), for a device that cannot reach it.
    site_policy : SitePolicy, optional
        What the device requires of every training task (confide's site policy); ``None``:
        the strict default (secure aggregation and DP required).
    """

    state_dir: Path
    release_key: str
    server_url: str | None = None
    policy: DevicePolicy = field(
        default_factory=lambda: DevicePolicy(max_epsilon=10.0, max_delta=1e-5)
    )
    engine: str = "onnx"
    enroll_token: str | None = None
    client_id: str | None = None
    update_on_start: bool = False
    import_release: Path | None = None
    site_policy: SitePolicy | None = None


class _Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _State:
    config: AppConfig
    models: ModelManager
    session: aiohttp.ClientSession | None = None
    consent: bool = False
    # Features of recent diagnoses, by cache key, until the patient labels (or not) them.
    pending: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    training: dict[str, Any] = field(default_factory=lambda: {"status": "idle"})
    task: asyncio.Task[None] | None = None


_state_key = web.AppKey("patient_state", _State)


def _consent_path(cfg: AppConfig) -> Path:
    return cfg.state_dir / "consent.json"


def _features_dir(cfg: AppConfig) -> Path:
    return cfg.state_dir / "training"


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        host = request.url.host
    except ValueError:  # an unparsable Host header
        host = None
    if host not in _LOOPBACK:
        return web.json_response({"error": "This app only answers on the device."}, status=403)
    if request.method == "POST" and request.headers.get("X-Patient-App") != "1":
        return web.json_response({"error": "Requests must come from the app's page."}, status=403)
    try:
        return await handler(request)
    except _Error as exc:
        return web.json_response({"error": exc.message}, status=exc.status)
    except ImageError as exc:
        return web.json_response({"error": str(exc)}, status=422)
    except web.HTTPRequestEntityTooLarge:
        mb = MAX_UPLOAD_BYTES >> 20
        return web.json_response({"error": f"The file is larger than {mb} MB."}, status=413)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return web.json_response({"error": exc.reason}, status=exc.status)
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return web.json_response(
            {"error": "Something went wrong on this device; nothing was sent anywhere."},
            status=500,
        )


def _page(nonce: str) -> str:
    text = resources.files("patient_app").joinpath("page.html").read_text(encoding="utf-8")
    return text.replace("{{NONCE}}", nonce)


async def get_page(request: web.Request) -> web.Response:
    """Serve the page with a per-response CSP nonce for its inline style and script."""
    nonce = secrets.token_urlsafe(16)
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "img-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return web.Response(
        text=_page(nonce),
        content_type="text/html",
        headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"},
    )


def _model(state: _State) -> VerifiedModel:
    if state.models.current is None:
        raise _Error(409, "No verified model is installed yet; press 'Check for a new model'.")
    return state.models.current


async def get_status(request: web.Request) -> web.Response:
    """Return the verified model, the consent and the training state."""
    state = request.app[_state_key]
    current = state.models.current
    labelled = len(list(_features_dir(state.config).glob("*.npy")))
    return web.json_response(
        {
            "model": None if current is None else current.describe(),
            "server": state.config.server_url,
            "release_key_fingerprint": state.models.fingerprint,
            "policy": {
                "max_epsilon": state.config.policy.max_epsilon,
                "max_delta": state.config.policy.max_delta,
                "min_unit": state.config.policy.min_unit,
            },
            "consent": state.consent,
            "labelled_images": labelled,
            "training": state.training,
        }
    )


def _diagnose(verified: VerifiedModel, data: bytes, keep_features: bool) -> dict[str, Any]:
    image = decode_image(data)
    meta = verified.model.metadata
    pre = json.loads(meta.get("confide.preprocess", "{}") or "{}")
    x = to_model_input(
        image,
        verified.model.input.shape,
        tuple(pre.get("mean", (0.0, 0.0, 0.0))),
        tuple(pre.get("std", (1.0, 1.0, 1.0))),
    )
    wanted = [verified.model.output]
    if keep_features and "features" in verified.model.output_names:
        wanted.append("features")
    out = verified.model.run(x, wanted)
    probs = np.asarray(out[verified.model.output], np.float64)[0]
    classes = list(verified.record.classes)
    if probs.shape != (len(classes),) or not np.isfinite(probs).all():
        raise _Error(500, "The installed model does not match its release record.")
    ranked = sorted(zip(classes, probs.tolist(), strict=True), key=lambda c: -c[1])
    answer: dict[str, Any] = {
        "kind": image.kind,
        "classes": [{"name": n, "probability": p} for n, p in ranked],
        "model": verified.describe(),
    }
    if "features" in out:
        answer["features"] = np.asarray(out["features"], np.float32)[0]
    return answer


async def post_diagnose(request: web.Request) -> web.Response:
    """Diagnose the uploaded image on the device."""
    state = request.app[_state_key]
    verified = _model(state)
    if (request.content_length or 0) > MAX_UPLOAD_BYTES:
        raise _Error(413, f"The file is larger than {MAX_UPLOAD_BYTES >> 20} MB.")
    data = await request.read()
    answer = await asyncio.to_thread(_diagnose, verified, data, state.consent)
    feats = answer.pop("features", None)
    if feats is not None:
        key = secrets.token_hex(16)
        state.pending[key] = feats
        while len(state.pending) > 32:
            state.pending.popitem(last=False)
        answer["label_key"] = key
    return web.json_response(answer)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if (request.content_length or 0) > 4096:
        raise _Error(413, "Request too large.")
    try:
        doc = json.loads(await request.read())
    except ValueError:
        raise _Error(400, "Malformed request.") from None
    if not isinstance(doc, dict):
        raise _Error(400, "Malformed request.")
    return doc


async def post_update(request: web.Request) -> web.Response:
    """Download, verify and install the latest release."""
    state = request.app[_state_key]
    if state.session is None:
        raise _Error(409, "No confide server is configured; the app runs offline.")
    try:
        verified = await state.models.update(state.session)
    except UpdateError as exc:
        raise _Error(502, str(exc)) from None
    return web.json_response({"model": verified.describe()})


async def post_consent(request: web.Request) -> web.Response:
    """Record the patient's opt-in (or opt-out) to training."""
    state = request.app[_state_key]
    doc = await _json_body(request)
    if not isinstance(doc.get("train"), bool):
        raise _Error(400, "Expected {'train': true|false}.")
    state.consent = doc["train"]
    path = _consent_path(state.config)
    path.write_text(json.dumps({"train": state.consent}))
    if not state.consent:
        state.pending.clear()
        if state.task is not None:
            state.task.cancel()
    return web.json_response({"consent": state.consent})


async def post_label(request: web.Request) -> web.Response:
    """Keep the features of a diagnosed image, with its confirmed label, for training."""
    state = request.app[_state_key]
    if not state.consent:
        raise _Error(403, "Training is off; nothing is kept.")
    doc = await _json_body(request)
    verified = _model(state)
    key, label = doc.get("key"), doc.get("label")
    if not isinstance(key, str) or key not in state.pending:
        raise _Error(404, "That diagnosis is no longer available; diagnose the image again.")
    if not isinstance(label, int) or not 0 <= label < len(verified.record.classes):
        raise _Error(400, "Unknown label.")
    feats = state.pending.pop(key)
    folder = _features_dir(state.config)
    folder.mkdir(mode=0o700, exist_ok=True)
    with open(folder / f"{key}.npy", "wb") as f:
        np.save(f, np.concatenate([feats, np.array([label], np.float32)]), allow_pickle=False)
    return web.json_response({"labelled_images": len(list(folder.glob("*.npy")))})


def _training_data(cfg: AppConfig) -> tuple[np.ndarray, np.ndarray]:
    rows = [np.load(p, allow_pickle=False) for p in sorted(_features_dir(cfg).glob("*.npy"))]
    if not rows:
        raise _Error(409, "Label at least one diagnosed image before training.")
    arr = np.stack(rows)
    return arr[:, :-1].astype(np.float32), arr[:, -1].astype(np.int64)


def _client_id(cfg: AppConfig) -> str:
    if cfg.client_id is not None:
        return cfg.client_id
    path = cfg.state_dir / "client_id"
    if not path.exists():
        path.write_text(f"device-{secrets.token_hex(6)}")
    return path.read_text().strip()


async def _participate(state: _State) -> None:
    from confide.client import Client
    from confide.training.numpy_engine import NumpyTrainer

    cfg = state.config
    x, y = _training_data(cfg)
    data = device_dataset(x, y)
    state.training = {"status": "running", "examples": len(y)}
    try:
        if cfg.server_url is None:
            raise _Error(409, "No confide server is configured; the app runs offline.")
        async with Client(
            cfg.server_url, cfg.state_dir / "client", policy=cfg.site_policy
        ) as client:
            if not client.enrolled:
                if cfg.enroll_token is None:
                    raise _Error(409, "This device is not enrolled for training.")
                await client.enroll(cfg.enroll_token, _client_id(cfg))
            manifest = await client.fetch_manifest()
            head = NumpyTrainer.from_manifest(manifest)
            result = await client.run(head, data, data)
        state.training = {"status": result.status, "rounds_trained": result.rounds_trained}
    except asyncio.CancelledError:
        state.training = {"status": "stopped"}
        raise
    except Exception as exc:  # shown on the page as a sentence, logged in full
        log.exception("training failed")
        msg = exc.message if isinstance(exc, _Error) else f"Training stopped: {exc}"
        state.training = {"status": "failed", "message": msg}


async def post_train(request: web.Request) -> web.Response:
    """Start taking part in the server's training job (opt-in only)."""
    state = request.app[_state_key]
    if not state.consent:
        raise _Error(403, "Training is off. Turn on 'Help improve the model' first.")
    if state.config.server_url is None:
        raise _Error(409, "No confide server is configured; the app runs offline.")
    verified = _model(state)
    if "features" not in verified.model.output_names:
        raise _Error(409, "The installed model cannot be trained on this device.")
    _training_data(state.config)  # refuse early, with a message, when nothing is labelled
    if state.task is not None and not state.task.done():
        raise _Error(409, "Training is already running.")
    state.task = asyncio.create_task(_participate(state))
    return web.json_response({"training": "started"})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[_state_key]
    if state.config.server_url is not None:
        timeout = aiohttp.ClientTimeout(total=120, sock_connect=10)
        state.session = aiohttp.ClientSession(timeout=timeout)
    await asyncio.to_thread(state.models.load_stored)
    if state.config.import_release is not None:
        try:
            await asyncio.to_thread(state.models.import_release, state.config.import_release)
        except UpdateError as exc:
            log.warning("release import refused: %s", exc)
    if state.config.update_on_start and state.session is not None:
        try:
            await state.models.update(state.session)
        except UpdateError as exc:  # the page shows the stored model, or none, and why
            log.warning("model update at start failed: %s", exc)
    yield
    if state.task is not None:
        state.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await state.task
    if state.session is not None:
        await state.session.close()


def create_app(config: AppConfig) -> web.Application:
    """Build the local app.

    Parameters
    ----------
    config : AppConfig
        Where the app keeps its state, the server and the pinned release key.

    Returns
    -------
    web.Application
        The application (bind it to 127.0.0.1 only).
    """
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    models = ModelManager(
        config.server_url, config.release_key, config.policy, config.state_dir, config.engine
    )
    state = _State(config, models)
    consent = _consent_path(config)
    if consent.exists():
        with contextlib.suppress(ValueError, OSError):
            state.consent = bool(json.loads(consent.read_text()).get("train", False))
    # The upload cap plus headroom; bigger bodies get a 413 with a message (middleware).
    app = web.Application(client_max_size=MAX_UPLOAD_BYTES + 65536, middlewares=[_errors])
    app[_state_key] = state
    app.router.add_get("/", get_page)
    app.router.add_get("/api/status", get_status)
    app.router.add_post("/api/diagnose", post_diagnose)
    app.router.add_post("/api/update", post_update)
    app.router.add_post("/api/consent", post_consent)
    app.router.add_post("/api/label", post_label)
    app.router.add_post("/api/train", post_train)
    app.cleanup_ctx.append(_lifecycle)
    return app
