"""The patient app's HTTP API in process: diagnosis, bad uploads, verification, consent."""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

pytest.importorskip("onnxruntime")
pytest.importorskip("PIL")

from patient_app import AppConfig, create_app
from patient_app.imaging import ImageError, decode_image, sniff_format

from confide.protocol.release import DevicePolicy, DPGuarantee
from confide_server.releases import ReleaseBook, setup_release_routes

FIXTURES = Path(__file__).parents[1] / "inference" / "fixtures"
MODEL = (FIXTURES / "tiny_cnn64.onnx").read_bytes()
CLASSES = ["a", "b", "c"]
POST = {"X-Patient-App": "1"}

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


def _png(size: tuple[int, int] = (120, 90), seed: int = 0) -> bytes:
    from PIL import Image

    arr = (np.random.default_rng(seed).uniform(size=(size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _dicom(rows: int = 80, cols: int = 80) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 4096).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
async def release_server(tmp_path: Path) -> Any:
    app = web.Application()
    setup_release_routes(app, state_dir=tmp_path / "server")
    server = TestServer(app)
    await server.start_server()
    yield server, ReleaseBook(tmp_path / "server")
    await server.close()


@pytest.fixture
def make_app(
    tmp_path: Path, aiohttp_client: Callable[[web.Application], Awaitable[Client]]
) -> MakeClient:
    async def make(server: Any, book: ReleaseBook, **kw: Any) -> Client:
        cfg = AppConfig(
            state_dir=tmp_path / "device",
            release_key=kw.pop("release_key", book.public_key_b64),
            server_url=str(server.make_url("")).rstrip("/"),
            policy=kw.pop("policy", DevicePolicy(max_epsilon=4.0, max_delta=1e-5)),
            **kw,
        )
        return await aiohttp_client(create_app(cfg))

    return make


def _release(book: ReleaseBook, eps: float = 2.0, model: bytes = MODEL) -> None:
    book.release(
        job_id="j",
        model=model,
        manifest_sha256="ab" * 32,
        classes=CLASSES,
        dp=DPGuarantee(eps, 1e-5, "patient"),
    )


async def test_update_then_diagnose_on_device(release_server: Any, make_app: MakeClient) -> None:
    server, book = release_server
    _release(book)
    app = await make_app(server, book)
    status = await (await app.get("/api/status")).json()
    assert status["model"] is None
    assert status["consent"] is False
    resp = await app.post("/api/diagnose", data=_png(), headers=POST)
    assert resp.status == 409
    assert "No verified model" in (await resp.json())["error"]
    resp = await app.post("/api/update", headers=POST)
    assert resp.status == 200, await resp.text()
    model = (await resp.json())["model"]
    assert model["version"] == 1
    assert model["dp"]["epsilon"] == 2.0
    assert model["trainable"]
    for data in (_png(), _dicom()):
        resp = await app.post("/api/diagnose", data=data, headers=POST)
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
        probs = [c["probability"] for c in doc["classes"]]
        assert sorted(c["name"] for c in doc["classes"]) == CLASSES
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert "label_key" not in doc  # no consent: no features are kept


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 422, "empty"),
        (b"GIF89a" + bytes(100), 422, "not a PNG, JPEG or DICOM"),
        (b"\xff\xd8\xff\xe0" + bytes(40), 422, "damaged or truncated"),
        (None, 422, "too small"),
        (bytes(128) + b"DICM" + b"\x02\x00\x10\x00" + b"\xff" * 50, 422, "DICOM file"),
    ],
)
async def test_bad_uploads_get_a_message_not_a_traceback(
    release_server: Any, make_app: MakeClient, data: bytes | None, status: int, message: str
) -> None:
    server, book = release_server
    _release(book)
    app = await make_app(server, book)
    await app.post("/api/update", headers=POST)
    body = _png(size=(30, 30)) if data is None else data
    resp = await app.post("/api/diagnose", data=body, headers=POST)
    assert resp.status == status
    doc = await resp.json()
    assert message in doc["error"]
    assert "Traceback" not in doc["error"]


async def test_huge_upload_is_413_with_a_message(release_server: Any, make_app: MakeClient) -> None:
    server, book = release_server
    _release(book)
    app = await make_app(server, book)
    await app.post("/api/update", headers=POST)
    resp = await app.post("/api/diagnose", data=io.BytesIO(bytes(21 << 20)), headers=POST)
    assert resp.status == 413
    assert "larger than 20 MB" in (await resp.json())["error"]


def test_dicom_without_pixels_and_compressed_ones_are_explained() -> None:
    data = _dicom()
    assert sniff_format(data) == "DICOM"
    assert decode_image(data).pixels.shape == (80, 80, 3)
    for broken in (data[:200], data[:140] + b"\xff" * 64, data[:-500]):
        with pytest.raises(ImageError, match="DICOM"):
            decode_image(broken)


async def test_refused_releases_keep_the_device_on_its_verified_model(
    release_server: Any, make_app: MakeClient
) -> None:
    server, book = release_server
    _release(book, eps=2.0)
    app = await make_app(server, book)
    assert (await app.post("/api/update", headers=POST)).status == 200
    _release(book, eps=9.0)  # weaker than the device policy (max epsilon 4)
    resp = await app.post("/api/update", headers=POST)
    assert resp.status == 502
    assert "epsilon 9 is above the device maximum 4" in (await resp.json())["error"]
    status = await (await app.get("/api/status")).json()
    assert status["model"]["version"] == 1


async def test_a_release_signed_by_another_key_is_refused(
    release_server: Any, make_app: MakeClient, tmp_path: Path
) -> None:
    server, book = release_server
    _release(book)
    other = ReleaseBook(tmp_path / "other")
    app = await make_app(server, book, release_key=other.public_key_b64)
    resp = await app.post("/api/update", headers=POST)
    assert resp.status == 502
    assert "pinned release key" in (await resp.json())["error"]


async def test_consent_gates_feature_keeping_and_training(
    release_server: Any, make_app: MakeClient, tmp_path: Path
) -> None:
    server, book = release_server
    _release(book)
    app = await make_app(server, book)
    await app.post("/api/update", headers=POST)
    resp = await app.post("/api/train", headers=POST)
    assert resp.status == 403
    assert "Training is off" in (await resp.json())["error"]
    resp = await app.post("/api/consent", data=json.dumps({"train": True}), headers=POST)
    assert (await resp.json())["consent"] is True
    doc = await (await app.post("/api/diagnose", data=_png(), headers=POST)).json()
    key = doc["label_key"]
    resp = await app.post("/api/label", data=json.dumps({"key": key, "label": 2}), headers=POST)
    assert (await resp.json())["labelled_images"] == 1
    kept = list((tmp_path / "device" / "training").glob("*.npy"))
    row = np.load(kept[0], allow_pickle=False)
    assert row.shape == (9,)
    assert row[-1] == 2
    resp = await app.post("/api/label", data=json.dumps({"key": key, "label": 0}), headers=POST)
    assert resp.status == 404
    await app.post("/api/consent", data=json.dumps({"train": False}), headers=POST)
    doc = await (await app.post("/api/diagnose", data=_png(), headers=POST)).json()
    assert "label_key" not in doc


async def test_posts_need_the_app_header_and_a_loopback_host(
    release_server: Any, make_app: MakeClient
) -> None:
    server, book = release_server
    app = await make_app(server, book)
    resp = await app.post("/api/consent", data=json.dumps({"train": True}))
    assert resp.status == 403
    resp = await app.get("/api/status", headers={"Host": "evil.example:80"})
    assert resp.status == 403
    page = await app.get("/")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    html = await page.text()
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in html
    assert "http://" not in html
    assert "https://" not in html


async def test_offline_import_of_release_files(
    tmp_path: Path, aiohttp_client: Callable[[web.Application], Awaitable[Client]]
) -> None:
    book = ReleaseBook(tmp_path / "server")
    _release(book)
    prefix = tmp_path / "server" / "releases" / "1"
    cfg = AppConfig(
        state_dir=tmp_path / "device", release_key=book.public_key_b64, import_release=prefix
    )
    app = await aiohttp_client(create_app(cfg))
    status = await (await app.get("/api/status")).json()
    assert status["model"]["version"] == 1
    resp = await app.post("/api/update", headers=POST)
    assert resp.status == 409  # offline: no server configured
    assert "offline" in (await resp.json())["error"]
    # tampered files are refused at import, and nothing is installed
    (tmp_path / "server" / "releases" / "1.model").write_bytes(MODEL + b"x")
    cfg2 = AppConfig(
        state_dir=tmp_path / "device-2", release_key=book.public_key_b64, import_release=prefix
    )
    app2 = await aiohttp_client(create_app(cfg2))
    assert (await (await app2.get("/api/status")).json())["model"] is None


async def test_litert_engine_gives_the_onnx_diagnosis(
    release_server: Any, make_app: MakeClient, tmp_path: Path
) -> None:
    pytest.importorskip("ai_edge_litert")
    server, book = release_server
    book.release(
        job_id="j",
        model=(FIXTURES / "tiny_cnn64.tflite").read_bytes(),
        manifest_sha256="ab" * 32,
        classes=CLASSES,
        dp=DPGuarantee(2.0, 1e-5, "patient"),
        model_format="tflite",
    )
    policy = DevicePolicy(max_epsilon=4.0, max_delta=1e-5, model_formats=("tflite",))
    app = await make_app(server, book, engine="litert", policy=policy)
    resp = await app.post("/api/update", headers=POST)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["model"]["engine"] == "litert"
    image = _png(seed=5)
    lite = await (await app.post("/api/diagnose", data=image, headers=POST)).json()
    from patient_app.imaging import to_model_input

    from confide.inference import load_model

    onnx_model = load_model(MODEL)
    x = to_model_input(decode_image(image), onnx_model.input.shape)
    expected = dict(zip(CLASSES, onnx_model.predict(x)[0].tolist(), strict=True))
    for c in lite["classes"]:
        assert c["probability"] == pytest.approx(expected[c["name"]], abs=1e-5)
