"""``confide-server dopamine`` end to end: both federations over HTTP, central arm, JSON, PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("pydicom")
pytest.importorskip("skimage")

from confide.privacy.accountant import account
from confide.privacy.distributed_dpsgd import SampleDDGParams, event
from confide_server.config import load_config
from confide_server.dopamine import main_dopamine
from confide_server.store import Store


# Two federations, the public pretraining and the central arm: 2 minutes alone, more on a
# shared 2-core machine (the deadline is generous, no wall-clock threshold is asserted).
@pytest.mark.timeout(900)
def test_dopamine_three_arms_report_accuracy_and_epsilon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dop"
    argv = ["--out", str(out), "--sites", "3", "--model", "small_cnn", "--rounds", "2"]
    argv += ["--fedavg-rounds", "1", "--image-size", "32", "--patients-per-site", "4"]
    argv += ["--sampling-rate", "0.5", "--timeout", "400"]
    argv += ["--public-patients", "24", "--public-epochs", "1"]
    assert main_dopamine(argv) == 0
    printed = capsys.readouterr().out
    assert "distributed DP-SGD" in printed
    assert "FedAvg, no DP" in printed
    result = json.loads((out / "dopamine.json").read_text())
    assert (out / "dopamine.png").stat().st_size > 1000
    dp = result["dp"]["rounds"]
    assert [r["round"] for r in dp] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in dp)
    assert dp[0]["epsilon"] < dp[1]["epsilon"] == pytest.approx(result["dp"]["epsilon"])
    assert [r["round"] for r in result["fedavg"]["rounds"]] == [1]
    # Only the classifier is DP-trained; the rest is the public-pretrained trunk, pinned.
    assert "DP-trained parameters: head.weight, head.bias" in printed
    assert result["dp"]["trainable"]["names"] == ["head.weight", "head.bias"]
    assert result["dp"]["trainable"]["count"] == 16 * 2 + 2
    assert result["dp"]["public_pretraining"]["tiles"] == 24
    from confide.protocol.manifest import Manifest, decode_tensors
    from confide.training.trainable import check_frozen, trainable_size

    manifest = Manifest.load(out / "model.json")
    assert trainable_size(manifest) == 34
    public = out / "central" / "public_trunk.safetensors"
    check_frozen(manifest, decode_tensors(manifest, public.read_bytes())[0])
    # The FedAvg arm starts from the same public trunk and trains the same head (pinned).
    fedavg_manifest = Manifest.load(out / "fedavg" / "model.json")
    assert fedavg_manifest.spec["trainable"] == manifest.spec["trainable"] == ["head"]
    assert fedavg_manifest.spec["frozen_sha256"] == manifest.spec["frozen_sha256"]
    assert "FedAvg without DP (same sites, same split; from the public trunk" in printed
    assert result["dp"]["public_pretraining"]["optimizer"].startswith("adam")
    assert 0.0 <= result["central"]["accuracy"] <= 1.0
    # The reported epsilon is the accountant's over the rounds' stored parameters.
    store = Store(load_config(out / "job.toml").server.database)
    try:
        with store.transaction() as cur:
            stored = cur.execute("SELECT params FROM ddg_rounds ORDER BY round").fetchall()
    finally:
        store.close()
    params = [SampleDDGParams(**json.loads(p)) for (p,) in stored]
    assert all(p.dim == 34 for p in params)  # ring, sensitivity and noise: the head only
    assert result["dp"]["epsilon"] == pytest.approx(
        account([event(p) for p in params], 1e-5).epsilon, rel=1e-9
    )
    # The public expected batch: q times the training patients (3 sites x 4).
    assert result["dp"]["expected_batch_size"] == pytest.approx(0.5 * 12)


def test_dopamine_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main_dopamine(["--sites", "2"])
    assert exc.value.code == 2
    assert "sites must be >= 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"model": "resnet"}, "model must be"),
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"tiles_per_patient": 0}, "tiles_per_patient must be >= 1"),
        ({"sampling_rate": 1.5}, "sampling_rate must be in"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier must be a finite number"),
        ({"learning_rate": 0.0}, "learning_rate must be a finite number"),
    ],
)
def test_dopamine_options_refuse_bad_values(kw: dict[str, object], match: str) -> None:
    from confide.errors import ConfigError
    from confide_server.dopamine import DopamineOptions

    with pytest.raises(ConfigError, match=match):
        DopamineOptions(**kw)  # type: ignore[arg-type]
