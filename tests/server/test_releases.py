"""Server-side signed releases: the release key, the release book, the HTTP endpoints."""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from confide.errors import ConfigError
from confide.protocol.release import (
    DevicePolicy,
    DPGuarantee,
    VersionStore,
    key_fingerprint,
    verify_release,
)
from confide_server.releases import (
    ReleaseBook,
    enrolment_fields,
    head_release_onnx,
    load_or_create_release_key,
    setup_release_routes,
)

POLICY = DevicePolicy(max_epsilon=8.0, max_delta=1e-5)
DP = DPGuarantee(3.2, 1e-5, "patient")


def _release(book: ReleaseBook, model: bytes, dp: DPGuarantee | None = DP) -> Any:
    return book.release(
        job_id="job", model=model, manifest_sha256="ab" * 32, classes=["a", "b"], dp=dp
    )


def test_release_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    key = load_or_create_release_key(tmp_path)
    path = tmp_path / "release_key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_release_key(tmp_path).public_key_b64 == key.public_key_b64
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="0600"):
        load_or_create_release_key(tmp_path)


def test_versions_grow_and_survive_a_restart(tmp_path: Path) -> None:
    book = ReleaseBook(tmp_path)
    assert book.latest() is None
    assert [_release(book, b"m%d" % i).record.version for i in range(3)] == [1, 2, 3]
    reopened = ReleaseBook(tmp_path)
    assert reopened.versions() == [1, 2, 3]
    assert _release(reopened, b"m3").record.version == 4
    assert reopened.model(2) == b"m1"
    assert reopened.model(99) is None
    assert not list((tmp_path / "releases").glob("*.tmp"))


def test_enrolment_fields_pin_the_release_key(tmp_path: Path) -> None:
    book = ReleaseBook(tmp_path)
    fields = enrolment_fields(book)
    assert fields["release_public_key"] == book.public_key_b64
    assert fields["release_key_fingerprint"] == key_fingerprint(book.public_key_b64)


@pytest.fixture
async def http(
    tmp_path: Path, aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
) -> tuple[TestClient[Any, Any], ReleaseBook]:
    app = web.Application()
    setup_release_routes(app, state_dir=tmp_path)
    from confide_server.releases import releases_key

    client = await aiohttp_client(app)
    return client, app[releases_key]


async def test_endpoints_serve_verifiable_releases(http: Any) -> None:
    client, book = http
    resp = await client.get("/v1/releases/latest")
    assert resp.status == 404
    _release(book, b"first model")
    _release(book, b"second model", DPGuarantee(5.0, 1e-5, "patient"))
    key_doc = await (await client.get("/v1/releases/key")).json()
    assert key_doc["public_key"] == book.public_key_b64
    versions = VersionStore()
    for path, model in (
        ("/v1/releases/1", b"first model"),
        ("/v1/releases/latest", b"second model"),
    ):
        doc = await (await client.get(path)).json()
        got = await (await client.get(doc["model_url"])).read()
        assert got == model
        record = verify_release(
            doc["record"].encode(),
            base64.b64decode(doc["signature"]),
            got,
            key_doc["public_key"],
            POLICY,
            versions,
        )
        assert record.version == doc["version"]
        assert record.model_sha256 == doc["model_sha256"]
    assert (await client.get("/v1/releases/7")).status == 404
    assert (await client.get("/v1/releases/7/model")).status == 404
    assert (await client.get("/v1/releases/x")).status == 404


def test_head_release_onnx_equals_the_numpy_trainer(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from confide.inference import load_model
    from confide.training.numpy_engine import NumpyTrainer

    backbone = Path(__file__).parents[1] / "inference" / "fixtures" / "tiny_cnn64.onnx"
    for kind, hidden in (("logistic", ()), ("mlp", (6,))):
        head = NumpyTrainer.create(kind, 8, 2, hidden, seed=2)
        data = head_release_onnx(backbone.read_bytes(), head.manifest, head.get_weights())
        model = load_model(data)
        x = np.random.default_rng(0).uniform(size=(3, 3, 64, 64)).astype(np.float32)
        out = model.run(x)
        np.testing.assert_allclose(
            out["probabilities"], head.predict_proba(out["features"]), atol=1e-6
        )
    from confide.protocol.manifest import Manifest

    not_a_head = Manifest.from_shapes([("w", (2,))])
    with pytest.raises(ConfigError, match="numpy head"):
        head_release_onnx(backbone.read_bytes(), not_a_head, np.zeros(2, np.float32))


def test_dp_guarantee_follows_the_mechanism() -> None:
    from confide_server.engine.releases import dp_guarantee

    assert dp_guarantee({"mode": "none"}) is None
    sample = dp_guarantee({"mode": "sample", "epsilon": 2.0, "delta": 1e-5})
    assert sample == DPGuarantee(2.0, 1e-5, "patient")
    for mode in ("central", "distributed"):
        assert dp_guarantee({"mode": mode, "epsilon": 1.0, "delta": 1e-6}).unit == "site"


def _write_job(tmp: Path) -> Path:
    from confide.protocol.manifest import encode_tensors
    from confide.training.numpy_engine import NumpyTrainer

    head = NumpyTrainer.create("softmax", n_features=8, n_classes=3, seed=0)
    head.manifest.save(tmp / "model.json")
    (tmp / "init.safetensors").write_bytes(encode_tensors(head.manifest, head.get_weights()))
    (tmp / "job.toml").write_text(
        '[job]\nname = "cli-job"\nrounds = 1\ncohort_size = 1\nmin_clients = 1\n'
        'wait_for_clients = 1\n[model]\nmanifest = "model.json"\nweights = "init.safetensors"\n'
        '[server]\nstate_dir = "state"\n'
    )
    return tmp / "job.toml"


def test_the_cli_releases_the_current_model_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from confide.inference import load_model
    from confide_server.app import open_engine
    from confide_server.config import load_config
    from confide_server.releases import main

    config = _write_job(tmp_path)
    open_engine(load_config(config)).store.close()  # creates the state and version 0
    backbone = Path(__file__).parents[1] / "inference" / "fixtures" / "tiny_cnn64.onnx"
    argv = ["--config", str(config), "--classes", "a", "b", "c", "--backbone", str(backbone)]
    main(argv)
    out = capsys.readouterr().out
    assert "released version 1 of job cli-job (no DP)" in out
    main(argv)  # idempotent: the same model is not released twice
    assert "released version 1" in capsys.readouterr().out
    book = ReleaseBook(tmp_path / "state")
    assert book.versions() == [1]
    release = book.latest()
    assert release is not None
    model = load_model(book.model(1) or b"")
    assert set(model.output_names) == {"probabilities", "features"}
    assert book.public_key_b64 in out


async def test_enrolment_answer_pins_the_release_key(make_fed: Any, tmp_path: Path) -> None:
    """A site learns the model-release public key when it enrols and keeps it on disk."""
    from confide.client import Client
    from confide_server.releases import releases_key

    fed = await make_fed()
    server = fed.http.server
    url = f"http://{server.host}:{server.port}"
    token = fed.engine.create_tokens(1)[0]
    async with Client(url, tmp_path / "site") as client:
        await client.enroll(token, "site-x")
        key = client.release_public_key
    assert key == fed.http.app[releases_key].public_key_b64
    again = Client(url, tmp_path / "site")  # a restarted site reads it back from its state
    assert again.release_public_key == key


def test_torch_model_versions_are_released_as_checked_onnx() -> None:
    """A torch job's committed model becomes the ONNX devices run, equal to the trainer."""
    pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from confide.training.torch_engine import TorchTrainer
    from confide_server.engine.releases import device_model_onnx

    t = TorchTrainer.create("small_cnn", 2, (1, 8, 8), seed=4)
    model = device_model_onnx(t.manifest, t.get_weights())
    x = np.random.default_rng(1).normal(size=(5, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    probs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(probs, t.predict_proba(x).detach().numpy(), atol=1e-5)
