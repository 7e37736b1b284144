"""The patient app in a real browser, against a real confide server with a released model.

Processes (all real, on loopback): ``confide-server run`` with a signed release in its state
folder (written before the server starts by :class:`confide_server.releases.ReleaseBook`, the
same files ``python -m confide_server.releases`` writes; releasing at commit time is not yet
wired into the round engine), a recording proxy in front of it (confide-server keeps no
access log; the proxy writes every request, body included, before forwarding it), and the
patient app
(``python -m patient_app``) configured with the proxy as its server. Debian's headless
Chromium, driven by selenium through ``/usr/bin/chromedriver`` (no Selenium Manager, no
download), uploads images through the page's file input and reads the diagnosis from the
page. The request log then shows that no request to the server carried the image.

The browser tests skip, with the reason, when selenium or Debian's ``chromium`` and
``chromium-driver`` are missing; the training tests (HTTP only) still run. Set
``CONFIDE_SCREENSHOT=path.png`` to keep the page's screenshot (the app README's
``screenshot.png`` is made that way).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "mobile_examples" / "patient_app"
FIXTURES = REPO / "tests" / "inference" / "fixtures"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytest.importorskip("onnxruntime")
pytest.importorskip("PIL")

pytestmark = pytest.mark.slow

CLASSES = ("benign naevus", "melanoma", "keratosis")


class Proc:
    """A child process whose stdout is read by a thread; readiness is a printed line."""

    def __init__(self, name: str, cmd: list[str], logs: Path, ready: str, env: dict[str, str]):
        self.name = name
        self.lines: list[str] = []
        self._ready = ready
        self._event = threading.Event()
        self.url: str | None = None
        self.log_path = logs / f"{name}.log"
        self.p = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.p.stdout:
                log.write(line)
                log.flush()
                self.lines.append(line)
                if self._ready in line and self.url is None:
                    self.url = line.split()[-1].rstrip("/")
                    self._event.set()
        self.p.stdout.close()
        self._event.set()  # exited: wake the waiter, which then sees no URL

    def wait_ready(self, timeout: float = 300.0) -> str:
        self._event.wait(timeout)
        if self.url is None:
            raise AssertionError(f"{self.name} did not start:\n{''.join(self.lines)[-4000:]}")
        return self.url

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._reader.join(10)


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    """Poll a health URL (the server prints nothing when ready), failing fast if it exits."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            threading.Event().wait(0.05)
    raise AssertionError(f"{url} not ready after {timeout} s")


@contextmanager
def _server_and_proxy(
    config: Path, work: Path, env: dict[str, str]
) -> Iterator[tuple[str, str, Path, list[Proc]]]:
    """Start ``confide-server run`` and the recording proxy in front of it.

    Yields the server's URL, the proxy's URL, the proxy's request log and the list of child
    processes (the caller appends its apps); all of them and the server stop on exit.
    """
    logs = work / "logs"
    procs: list[Proc] = []
    with (logs / "server.log").open("wb") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "confide_server", "run", "--config", str(config)],
            cwd=REPO,
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
    try:
        port = int(config.read_text().split("port = ")[1].split()[0])
        server_url = f"http://127.0.0.1:{port}"
        _wait_http(server_url + "/v1/health", server)
        request_log = work / "requests.jsonl"
        proxy = Proc(
            "proxy",
            [
                sys.executable,
                "-m",
                "tests.e2e.recording_proxy",
                "--upstream",
                server_url,
                "--log",
                str(request_log),
            ],
            logs,
            "proxy listening on",
            env,
        )
        procs.append(proxy)
        yield server_url, proxy.wait_ready(), request_log, procs
    finally:
        for p in reversed(procs):
            p.stop()
        _stop(server)


@dataclass
class Stack:
    app_url: str
    server_url: str
    proxy_url: str
    request_log: Path
    release_key: str
    model_bytes: bytes
    config: Path
    work: Path
    env: dict[str, str]


def _write_job(work: Path, devices: int = 1) -> tuple[Path, Path]:
    from confide.protocol.manifest import encode_tensors
    from confide.training.numpy_engine import NumpyTrainer

    head = NumpyTrainer.create("softmax", n_features=8, n_classes=3, seed=0)
    head.manifest.save(work / "model.json")
    (work / "init.safetensors").write_bytes(encode_tensors(head.manifest, head.get_weights()))
    port = _free_port()
    (work / "job.toml").write_text(
        "\n".join(
            [
                "[job]",
                'name = "derm-e2e"',
                "rounds = 1",
                f"cohort_size = {devices}",
                f"min_clients = {max(1, devices - 1)}",
                f"wait_for_clients = {devices}",
                "[model]",
                'manifest = "model.json"',
                'weights = "init.safetensors"',
                "[deadlines]",
                "train = 60.0",
                "evaluate = 60.0",
                "[server]",
                'host = "127.0.0.1"',
                f"port = {port}",
                'state_dir = "state"',
                # Patient-level DP-SGD on the device (its records are one patient).
                "[privacy]",
                'mode = "sample"',
                "delta = 1e-5",
                "noise_multiplier = 1.1",
                "clip_norm = 1.0",
                "sampling_rate = 0.5",
                "local_steps = 4",
                # SecAgg+ when several devices train together: a dropout-tolerant threat
                # model for three (complete graph, k = 2, t = 2).
                *(
                    [
                        "[secagg]",
                        "enabled = true",
                        "adversarial_fraction = 0.0",
                        "dropout_fraction = 0.34",
                        # Stages close as soon as every device answered; the long deadlines
                        # only keep a loaded machine's slow start from aborting the round.
                        "advertise = 120.0",
                        "share = 120.0",
                        "mask = 180.0",
                        "unmask = 120.0",
                    ]
                    if devices > 1
                    else []
                ),
            ]
        )
        + "\n"
    )
    return work / "job.toml", work / "state"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from confide.protocol.release import DPGuarantee
    from confide.training.numpy_engine import NumpyTrainer
    from confide_server.releases import ReleaseBook

    work = tmp_path_factory.mktemp("patient-e2e")
    logs = work / "logs"
    logs.mkdir()
    config, state = _write_job(work)
    # The released device model: the frozen CNN backbone and its head, outputs
    # `probabilities` and `features` (the committed 64x64 fixture).
    model = (FIXTURES / "tiny_cnn64.onnx").read_bytes()
    book = ReleaseBook(state)
    manifest = NumpyTrainer.build_manifest("softmax", 8, 3)
    book.release(
        job_id="derm-e2e",
        model=model,
        manifest_sha256=manifest.sha256,
        classes=CLASSES,
        dp=DPGuarantee(2.5, 1e-5, "patient"),
    )
    # The inherited PYTHONPATH (a worktree's python/ and server/) stays after the app's.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join([str(APP_DIR), str(REPO), *inherited])}
    with _server_and_proxy(config, work, env) as (server_url, proxy_url, request_log, procs):
        app = Proc(
            "app",
            [
                sys.executable,
                "-m",
                "patient_app",
                "--state-dir",
                str(work / "device"),
                "--release-key",
                book.public_key_b64,
                "--server",
                proxy_url,
                "--port",
                "0",
                "--max-epsilon",
                "4",
                "--update-on-start",
            ],
            logs,
            "patient-app listening on",
            env,
        )
        procs.append(app)
        yield Stack(
            app.wait_ready(),
            server_url,
            proxy_url,
            request_log,
            book.public_key_b64,
            model,
            config,
            work,
            env,
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium; the browser tests skip (with the reason) without it.

    Under CI (``CI=true``, where ``.ci/run`` installs the browser) a missing browser fails
    instead: the browser test must not silently stop running there.
    """
    missing = "Debian's chromium and chromium-driver are not installed " + (
        "(apt-get install -y chromium chromium-driver)"
    )
    if os.environ.get("CI") == "true":
        if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            pytest.fail(missing)
        from selenium import webdriver
    else:
        webdriver = pytest.importorskip("selenium.webdriver")
        if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            pytest.skip(missing)
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-extensions",
        "--window-size=900,1300",
    ):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager is not consulted and downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _png(seed: int, size: tuple[int, int] = (180, 150)) -> bytes:
    """A synthetic skin-lesion-like picture: a dark irregular blob on a skin tone."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cx, cy = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = min(w, h) * (0.25 + 0.04 * np.sin(3 * angle + rng.uniform(0, 6)))
    inside = np.hypot(xx - cx, yy - cy) < radius
    skin = np.array([224.0, 178.0, 150.0])
    lesion = np.array([92.0, 58.0, 40.0])
    img = np.where(inside[..., None], lesion, skin) + rng.normal(0, 8, size=(h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _expected(data: bytes, model_bytes: bytes) -> np.ndarray:
    sys.path.insert(0, str(APP_DIR))
    try:
        from patient_app.imaging import decode_image, to_model_input
    finally:
        sys.path.remove(str(APP_DIR))
    from confide.inference import load_model

    model = load_model(model_bytes)
    return model.predict(to_model_input(decode_image(data), model.input.shape))[0]


def _upload(driver: Any, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.ID, "diagnose").click()


def _wait_result_or_error(driver: Any) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d: Any) -> str | bool:
        if d.find_element(By.ID, "error").is_displayed():
            return "error"
        if d.find_element(By.ID, "result-box").is_displayed():
            return "result"
        return False

    outcome: str = WebDriverWait(driver, 30).until(done)
    return outcome


def _open(driver: Any, stack: Stack) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(stack.app_url + "/")
    WebDriverWait(driver, 30).until(
        lambda d: (
            "Version" in d.find_element(By.ID, "model").text
            or "No verified" in d.find_element(By.ID, "model").text
        )
    )


def test_diagnosis_in_the_browser_never_sends_the_image(
    stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, stack)
    model_text = browser.find_element(By.ID, "model").text
    assert "Version\n1" in model_text
    assert "epsilon=2.5" in model_text
    image = _png(seed=3)
    path = tmp_path / "lesion.png"
    path.write_bytes(image)
    _upload(browser, path)
    assert _wait_result_or_error(browser) == "result"
    rows = browser.find_elements(By.CSS_SELECTOR, "#result tbody tr")
    shown = {
        r.get_attribute("data-class"): float(
            r.find_element(By.CSS_SELECTOR, "td.pct").get_attribute("data-probability")
        )
        for r in rows
    }
    assert set(shown) == set(CLASSES)
    expected = dict(zip(CLASSES, _expected(image, stack.model_bytes).tolist(), strict=True))
    for name, p in expected.items():
        assert shown[name] == pytest.approx(p, abs=1e-6)
    top = max(expected, key=expected.__getitem__)
    assert browser.find_element(By.ID, "headline").get_attribute("data-top") == top
    meta = browser.find_element(By.ID, "result-model").text
    assert "model version 1" in meta
    assert "epsilon=2.5, delta=1e-05" in meta
    assert "patient-level DP" in meta
    shot = os.environ.get("CONFIDE_SCREENSHOT")
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").read_bytes().startswith(b"\x89PNG")
    if shot:
        shutil.copyfile(tmp_path / "page.png", shot)

    # The request log of everything the app sent towards the server.
    entries = [json.loads(line) for line in stack.request_log.read_text().splitlines()]
    paths = [e["path"] for e in entries]
    assert "/v1/releases/latest" in paths
    assert "/v1/releases/1/model" in paths
    for e in entries:
        body = base64.b64decode(e["body_b64"])
        assert e["method"] == "GET", e
        assert body == b"", e
        assert image[:64].hex() not in e["path"]
    raw = stack.request_log.read_bytes()
    assert base64.b64encode(image[100:160]) not in raw
    assert image[100:160] not in raw


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.png", b"this is a text file, not an image\n" * 20, "not a PNG, JPEG or DICOM"),
        ("cut.png", _png(seed=1)[:300], "damaged or truncated"),
        ("tiny.png", _png(seed=2, size=(20, 20)), "too small"),
        ("scan.dcm", bytes(128) + b"DICM" + b"\x02\x00\x10\x00garbage" * 8, "DICOM file"),
    ],
)
def test_bad_uploads_get_a_clear_message_on_the_page(
    stack: Stack, browser: Any, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, stack)
    path = tmp_path / name
    path.write_bytes(content)
    _upload(browser, path)
    assert _wait_result_or_error(browser) == "error"
    text = browser.find_element(By.ID, "error").text
    assert message in text
    assert "Traceback" not in browser.page_source
    assert "Exception" not in text


def test_a_huge_file_is_refused_in_the_page_and_by_the_app(
    stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, stack)
    path = tmp_path / "huge.png"
    path.write_bytes(_png(seed=4)[:64] + bytes(21 << 20))
    _upload(browser, path)
    assert _wait_result_or_error(browser) == "error"
    assert "larger than 20 MB" in browser.find_element(By.ID, "error").text
    # The app refuses it too when the page's check is bypassed: a clear JSON message, no 500.
    req = urllib.request.Request(
        stack.app_url + "/api/diagnose",
        data=path.read_bytes(),
        method="POST",
        headers={"X-Patient-App": "1", "Content-Type": "application/octet-stream"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 413
    assert "larger than 20 MB" in json.loads(info.value.read())["error"]


def test_the_page_loads_nothing_from_outside(stack: Stack, browser: Any) -> None:
    _open(browser, stack)
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(u.startswith(stack.app_url) for u in urls), urls
    with urllib.request.urlopen(stack.app_url + "/", timeout=10) as r:
        csp = r.headers["Content-Security-Policy"]
        html = r.read().decode()
    assert "default-src 'none'" in csp
    assert "connect-src 'self'" in csp
    assert "http://" not in html
    assert "https://" not in html


def _post(url: str, body: bytes = b"", content_type: str = "application/json") -> Any:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"X-Patient-App": "1", "Content-Type": content_type}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(url: str, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _operator(config: Path) -> dict[str, str]:
    """The operator's header for ``/v1/status`` (the token in the server's state)."""
    from confide_server.auth import operator_token
    from confide_server.config import load_config

    return {"Authorization": f"Bearer {operator_token(load_config(config).server.state_dir)}"}


def _site_policy(path: Path, **fields: Any) -> Path:
    from confide.client import SitePolicy

    path.write_text(SitePolicy(**fields).to_toml())
    return path


def test_opt_in_training_takes_part_in_a_dp_round_without_sending_images(stack: Stack) -> None:
    import time

    token = subprocess.run(
        [
            sys.executable,
            "-m",
            "confide_server",
            "enroll",
            "--config",
            str(stack.config),
            "-n",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout.split()[0]
    token_file = stack.work / "token"
    token_file.write_text(token)
    app = Proc(
        "app-train",
        [
            sys.executable,
            "-m",
            "patient_app",
            "--state-dir",
            str(stack.work / "device-2"),
            "--release-key",
            stack.release_key,
            "--server",
            stack.proxy_url,
            "--port",
            "0",
            "--max-epsilon",
            "4",
            "--update-on-start",
            "--enroll-token-file",
            str(token_file),
            # One device alone: no secure aggregation possible; it opts out of it (DP stays
            # required).
            "--site-policy",
            str(_site_policy(stack.work / "policy-1.toml", allow_plain=True)),
        ],
        stack.work / "logs",
        "patient-app listening on",
        stack.env,
    )
    try:
        url = app.wait_ready()
        assert _get(url + "/api/status")["consent"] is False
        assert _post(url + "/api/consent", json.dumps({"train": True}).encode())["consent"]
        images = [_png(seed=10 + i) for i in range(4)]
        for i, image in enumerate(images):
            doc = _post(url + "/api/diagnose", image, "application/octet-stream")
            body = json.dumps({"key": doc["label_key"], "label": i % 3}).encode()
            assert _post(url + "/api/label", body)["labelled_images"] == i + 1
        assert _post(url + "/api/train")["training"] == "started"
        end = time.monotonic() + 120
        while (training := _get(url + "/api/status")["training"])["status"] in ("idle", "running"):
            assert time.monotonic() < end, app.lines[-20:]
            threading.Event().wait(0.2)
        assert training == {"status": "finished", "rounds_trained": 1}, training
    finally:
        app.stop()
    status = _get(stack.server_url + "/v1/status", _operator(stack.config))
    assert status["rounds_completed"] == 1
    assert status["privacy"]["epsilon"] > 0  # the device's round was accounted
    # What reached the server: enrolment, tasks, the model, one DP update and the evaluation
    # metrics; never an image or a feature vector.
    raw = stack.request_log.read_bytes()
    entries = [json.loads(line) for line in raw.splitlines()]
    puts = [e for e in entries if e["method"] == "PUT"]
    assert [e["path"] for e in puts] == ["/v1/rounds/1/train", "/v1/rounds/1/evaluate"]
    for image in images:
        for chunk in (image[60:120], image[-80:-20]):
            assert base64.b64encode(chunk) not in raw
            for e in entries:
                assert chunk not in base64.b64decode(e["body_b64"])


def test_three_opted_in_devices_train_with_secagg_and_dp(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import time

    from confide.protocol.release import DPGuarantee
    from confide_server.releases import ReleaseBook

    work = tmp_path_factory.mktemp("patient-secure")
    logs = work / "logs"
    logs.mkdir()
    config, state = _write_job(work, devices=3)
    book = ReleaseBook(state)
    key = book.public_key_b64
    book.release(
        job_id="derm-e2e",
        model=(FIXTURES / "tiny_cnn64.onnx").read_bytes(),
        manifest_sha256="ab" * 32,
        classes=CLASSES,
        dp=DPGuarantee(2.5, 1e-5, "patient"),
    )
    # The inherited PYTHONPATH (a worktree's python/ and server/) stays after the app's.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {"PYTHONPATH": os.pathsep.join([str(APP_DIR), str(REPO), *inherited])}
    tokens = subprocess.run(
        [sys.executable, "-m", "confide_server", "enroll", "--config", str(config), "-n", "3"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout.split()
    with _server_and_proxy(config, work, env) as (server_url, proxy_url, request_log, procs):
        urls = []
        # The devices are provisioned by one consortium (docs/security.md section 3): each
        # has its id, identity and certificate before it enrols; its policy names the root.
        from confide.protocol.certs import init_root, provision_site

        init_root(work / "consortium", "patients")
        for k in range(len(tokens)):
            (work / f"device-{k}").mkdir(mode=0o700, parents=True, exist_ok=True)
            (work / f"device-{k}" / "client_id").write_text(f"device-{k}")
            provision_site(work / "consortium", work / f"device-{k}" / "client", f"device-{k}")
        for k, token in enumerate(tokens):
            (work / f"token-{k}").write_text(token)
            app = Proc(
                f"app-{k}",
                [
                    sys.executable,
                    "-m",
                    "patient_app",
                    "--state-dir",
                    str(work / f"device-{k}"),
                    "--release-key",
                    key,
                    "--server",
                    proxy_url,
                    "--port",
                    "0",
                    "--max-epsilon",
                    "4",
                    "--update-on-start",
                    "--enroll-token-file",
                    str(work / f"token-{k}"),
                    # The job's dropout-tolerant threat model for three (see _write_job).
                    "--site-policy",
                    str(
                        _site_policy(
                            work / "policy-3.toml",
                            adversarial_fraction=0.0,
                            dropout_fraction=0.34,
                            consortium_root=str(work / "consortium" / "root.json"),
                        )
                    ),
                ],
                logs,
                "patient-app listening on",
                {**env},
            )
            procs.append(app)
            urls.append(app.wait_ready())
        images: list[bytes] = []
        for k, url in enumerate(urls):
            _post(url + "/api/consent", json.dumps({"train": True}).encode())
            for i in range(2):
                image = _png(seed=100 + 10 * k + i)
                images.append(image)
                doc = _post(url + "/api/diagnose", image, "application/octet-stream")
                _post(
                    url + "/api/label", json.dumps({"key": doc["label_key"], "label": i}).encode()
                )
        for url in urls:
            assert _post(url + "/api/train")["training"] == "started"
        end = time.monotonic() + 240
        for url in urls:
            while (t := _get(url + "/api/status")["training"])["status"] in ("idle", "running"):
                assert time.monotonic() < end, [p.lines[-10:] for p in procs]
                threading.Event().wait(0.2)
            assert t == {"status": "finished", "rounds_trained": 1}, t
        status = _get(server_url + "/v1/status", _operator(config))
    row = status["rounds"][0]
    assert row["status"] == "committed"
    assert row["metrics"]["secagg"]["n"] == 3
    assert row["metrics"]["train_clients"] == 3
    assert status["privacy"]["epsilon"] > 0
    raw = request_log.read_bytes()
    for image in images:
        assert base64.b64encode(image[60:120]) not in raw
