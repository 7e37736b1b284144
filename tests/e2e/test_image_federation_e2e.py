"""SqueezeNet 1.1 federated over HTTP: three hospital processes, patient-level DP-SGD in
torch (confide's privacy code, Rust-core noise), SecAgg+ on, images read from PNG folders.

Small on purpose (32x32 tiles, 2 rounds) so it runs in ``make test`` on two cores; the
Dopamine-sized run (10 sites, 64x64, ``confide-server dopamine``) is ``make demo-images``.
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
from confide.protocol.manifest import decode_tensors
from confide.training.torch_engine import TorchTrainer
from confide_server.simulate import JobFiles, SimulationOptions, main_simulate, prepare_job
from tests.e2e.conftest import Procs

Z, Q, STEPS, ROUNDS = 1.1, 0.5, 2, 2


def _job(tmp: Path) -> JobFiles:
    # The same job `confide-server simulate --data lesions --model squeezenet` writes.
    opts = SimulationOptions(
        clients=3,
        rounds=ROUNDS,
        seed=3,
        data="lesions",
        model="squeezenet",
        image_size=32,
        patients_per_site=4,
        learning_rate=0.05,
        min_clients=2,
        train_deadline=120.0,
        evaluate_deadline=60.0,
        dp="sample",
        noise_multiplier=Z,
        sampling_rate=Q,
        local_steps=STEPS,
        secagg=True,
        extra_secagg={"adversarial_fraction": 0.0, "dropout_fraction": 0.34},
    )
    return prepare_job(tmp, opts)


def test_simulate_refuses_a_model_that_does_not_fit_the_data(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main_simulate(["--data", "breast_cancer", "--model", "squeezenet"])
    assert "does not fit" in capsys.readouterr().err


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
