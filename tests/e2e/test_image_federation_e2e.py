"""SqueezeNet 1.1 federated over HTTP: three hospital processes, patient-level DP-SGD in
torch (confide's privacy code, Rust-core noise), SecAgg+ on, images read from PNG folders.

Small on purpose (32x32 tiles, 2 rounds) so it runs in ``make test`` on two cores; the
Dopamine-sized run (10 sites, 64x64) is ``make demo-images``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("skimage")

from confide.data.images import ImageDataset, ImageTransform
from confide.privacy.accountant import account, dpsgd_event
from confide.protocol.manifest import Manifest, decode_tensors
from confide.training.torch_engine import TorchTrainer
from confide_server.simulate import JobFiles, free_port
from confide_server.simulate_images import write_image_job_data
from tests.e2e.conftest import Procs

Z, Q, STEPS, ROUNDS = 1.1, 0.5, 2, 2


def _job(tmp: Path) -> JobFiles:
    job = write_image_job_data(
        tmp,
        model="squeezenet",
        sites=3,
        image_size=32,
        patients_per_site=4,
        tiles_per_patient=2,
        partition="iid",
        alpha=0.5,
        seed=3,
    )
    port = free_port()
    config = tmp / "job.toml"
    config.write_text(
        "\n".join(
            [
                "[job]",
                'name = "lesions-squeezenet"',
                f"rounds = {ROUNDS}",
                "seed = 5",
                "cohort_size = 3",
                "min_clients = 2",
                "wait_for_clients = 3",
                "[model]",
                'manifest = "model.json"',
                'weights = "init.safetensors"',
                "[strategy]",
                'name = "fedavg"',
                "learning_rate = 0.05",
                "[deadlines]",
                "train = 120.0",
                "evaluate = 60.0",
                "[server]",
                'host = "127.0.0.1"',
                f"port = {port}",
                'state_dir = "state"',
                "exit_when_finished = true",
                "linger_s = 1.0",
                "[privacy]",
                'mode = "sample"',
                "delta = 1e-5",
                f"noise_multiplier = {Z}",
                "clip_norm = 1.0",
                f"sampling_rate = {Q}",
                f"local_steps = {STEPS}",
                "[secagg]",
                "enabled = true",
                "mask = 120.0",
                "adversarial_fraction = 0.0",
                "dropout_fraction = 0.34",
                "",
            ]
        )
    )
    manifest = Manifest.load(job.manifest_path)
    trainer = TorchTrainer.from_manifest(
        manifest, decode_tensors(manifest, job.weights_path.read_bytes())[0]
    )
    return JobFiles(
        tmp,
        config,
        f"http://127.0.0.1:{port}",
        job.site_train,
        job.site_test,
        job.train_csv,  # type: ignore[arg-type]  # image jobs keep their data on disk
        job.test_csv,  # type: ignore[arg-type]
        trainer,  # type: ignore[arg-type]
    )


@pytest.mark.slow
def test_three_hospitals_train_squeezenet_with_dpsgd_under_secagg(
    tmp_path: Path, procs_factory: Any
) -> None:
    files = _job(tmp_path)
    procs: Procs = procs_factory(files)
    server = procs.server()
    clients = [procs.client(k, tok) for k, tok in enumerate(procs.tokens(3), start=1)]
    assert procs.wait_exit(server, timeout=600) == 0, procs.all_logs()
    assert [procs.wait_exit(c) for c in clients] == [0, 0, 0], procs.all_logs()
    doc = procs.final_status()
    rows = doc["rounds"]
    assert [r["status"] for r in rows] == ["committed"] * ROUNDS
    assert all(r["metrics"]["train_clients"] == 3 for r in rows)
    # Epsilon is the accountant's for exactly the DP-SGD that ran (per-site, patient level).
    expected = account([dpsgd_event(Q, Z, STEPS * ROUNDS)], 1e-5).epsilon
    assert rows[-1]["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-6)
    # The committed model is a real SqueezeNet that moved and evaluates on the test images.
    manifest = files.trainer.manifest
    blob = files.workdir / "state" / "models" / f"{rows[-1]['new_model']}.safetensors"
    weights, _ = decode_tensors(manifest, blob.read_bytes())
    assert not np.array_equal(weights, files.trainer.get_weights())
    assert np.isfinite(weights).all()
    trained = TorchTrainer.from_manifest(manifest, weights)
    transform = ImageTransform(size=(32, 32), channels=3)
    test = ImageDataset.from_csv(
        files.site_test[0], classes=list(manifest.spec["classes"]), transform=transform
    )
    metrics = trained.evaluate(test)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    # No site log mentions a training loss under DP (it would be an un-noised statistic).
    for k in (1, 2, 3):
        assert "secure aggregation" in procs.log(f"site-{k}")
    json.dumps(doc)  # the status document is valid JSON (no Infinity/NaN)
