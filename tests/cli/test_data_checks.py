"""Own data, own job: ``confide init-model``, id-like columns, feature names in the manifest.

A site whose table has other columns than the job's model (another order, one missing) is
refused with a message naming them, before its one-time enrolment token is spent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from confide.data import Dataset, check_feature_names, id_like_columns, load_csv
from confide.errors import DataError
from confide.protocol.manifest import Manifest, decode_tensors
from confide.training import build_trainer
from confide_server.launcher import Launcher
from confide_server.simulate import SimulationOptions, prepare_job
from tests.cli.conftest import CONFIDE, SERVER, job_files, run, start_server, tokens


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_init_model_with_a_feature_count(tmp_path: Path) -> None:
    r = run([*CONFIDE, "init-model", "--features", "7", "--out", str(tmp_path / "m")])
    assert r.rc == 0, r.err
    assert "logistic model, 7 features, 2 classes, 8 parameters" in r.out
    manifest = Manifest.load(tmp_path / "m" / "model.json")
    weights, _ = decode_tensors(manifest, (tmp_path / "m" / "init.safetensors").read_bytes())
    assert weights.shape == (8,)
    assert np.all(weights[7:] == 0)  # zero bias
    assert np.any(weights[:7] != 0)  # Glorot-uniform weights
    build_trainer(manifest)  # a model a site can train
    again = run([*CONFIDE, "init-model", "--features", "7", "--out", str(tmp_path / "m")])
    assert again.rc == 2
    assert "already exist; pass --force" in again.short_error()


def test_init_model_mlp_from_a_csv_records_the_feature_names(tmp_path: Path) -> None:
    table = _write(
        tmp_path / "t.csv",
        ["pid", "age", "bp", "outcome"],
        [["p1", 50, 120.5, 0], ["p1", 51, 118.0, 2], ["p2", 63, 140.0, 1]],
    )
    out = tmp_path / "m"
    cmd = [*CONFIDE, "init-model", "--arch", "mlp", "--hidden", "4", "--from-csv", str(table)]
    r = run([*cmd, "--label-column", "outcome", "--patient-id-column", "pid", "--out", str(out)])
    assert r.rc == 0, r.err
    spec = json.loads((out / "model.json").read_text())["spec"]
    assert spec["feature_names"] == ["age", "bp"]
    assert (spec["kind"], spec["n_features"], spec["n_classes"], spec["hidden"]) == (
        "mlp",
        2,
        3,
        [4],
    )
    build_trainer(Manifest.load(out / "model.json"))


def test_init_model_needs_a_feature_source(tmp_path: Path) -> None:
    r = run([*CONFIDE, "init-model", "--out", str(tmp_path)])
    assert r.rc == 2
    assert "pass --features N or --from-csv FILE" in r.short_error()


def test_id_like_columns_known_answers() -> None:
    n = 40
    rng = np.random.default_rng(0)
    x = np.stack(
        [
            np.arange(1000, 1000 + n),  # unique integers: an MRN
            rng.integers(20, 90, n),  # ages: integers, many repeats
            rng.normal(size=n),  # a measurement
            rng.normal(size=n),  # named like an id
            rng.normal(size=n),  # "lipid": not an id
        ],
        axis=1,
    ).astype(np.float32)
    ds = Dataset(x, np.zeros(n, np.int64), ("visit_no", "age", "bp", "PatientID", "lipid"))
    assert id_like_columns(ds) == ["visit_no", "PatientID"]


def test_init_model_warns_about_an_id_like_column(tmp_path: Path) -> None:
    rows: list[list[object]] = [[10_000 + i, 0.1 * i, i % 2] for i in range(30)]
    table = _write(tmp_path / "t.csv", ["mrn", "dose", "label"], rows)
    r = run([*CONFIDE, "init-model", "--from-csv", str(table), "--out", str(tmp_path / "m")])
    assert r.rc == 0
    assert "column 'mrn' looks like an identifier" in r.err
    assert "--patient-id-column mrn" in r.err


def test_check_feature_names_names_the_columns() -> None:
    ds = Dataset(np.zeros((1, 2), np.float32), np.zeros(1, np.int64), ("b", "a"))
    check_feature_names(ds, ["b", "a"], "t.csv")
    with pytest.raises(DataError, match=r"another order \(column 1 is 'b', the job expects 'a'\)"):
        check_feature_names(ds, ["a", "b"], "t.csv")
    with pytest.raises(DataError, match=r"missing columns \['c'\]; unexpected columns \['a'\]"):
        check_feature_names(ds, ["b", "c"], "t.csv")


def _swap_first_two_features(src: Path, dst: Path) -> list[str]:
    with src.open(newline="") as fh:
        rows = list(csv.reader(fh))
    for row in rows:
        row[0], row[1] = row[1], row[0]
    _write(dst, rows[0], rows[1:])
    return rows[0]


def test_a_site_with_columns_in_another_order_is_refused_before_enrolling(
    tmp_path: Path, launcher: Launcher
) -> None:
    files = job_files(tmp_path)
    start_server(launcher, files)
    (token,) = tokens(files)
    header = _swap_first_two_features(files.site_train[0], tmp_path / "swapped.csv")
    cmd = [
        *CONFIDE,
        "client",
        "--server",
        files.server_url,
        "--data",
        str(tmp_path / "swapped.csv"),
    ]
    r = run([*cmd, "--token", token, "--client-id", "h1", "--state", str(tmp_path / "site")])
    assert r.rc == 2
    err = r.short_error()
    assert f"columns in another order (column 1 is {header[0]!r}" in err
    # The token was not spent: it is still unused.
    status = json.loads(run([*SERVER, "status", "--config", str(files.config), "--json"]).out)
    assert (status["tokens_unused"], status["tokens_used"]) == (1, 0)


def test_a_site_missing_a_column_is_refused(tmp_path: Path, launcher: Launcher) -> None:
    files = job_files(tmp_path)
    start_server(launcher, files)
    table = load_csv(files.site_train[0])
    with files.site_train[0].open(newline="") as fh:
        rows = [row[1:] for row in csv.reader(fh)]
    _write(tmp_path / "fewer.csv", rows[0], rows[1:])
    cmd = [*CONFIDE, "client", "--server", files.server_url, "--data", str(tmp_path / "fewer.csv")]
    r = run([*cmd, "--token", "t", "--client-id", "h1"])
    assert r.rc == 2
    assert f"missing columns [{table.feature_names[0]!r}]" in r.short_error()


def test_simulated_sites_keep_each_patient_on_one_site(tmp_path: Path) -> None:
    n = 120
    rng = np.random.default_rng(1)
    rows = [[f"P{i // 3:03d}", *rng.normal(size=3).round(3), int(i % 5 == 0)] for i in range(n)]
    table = _write(tmp_path / "t.csv", ["pid", "a", "b", "c", "y"], rows)
    opts = SimulationOptions(
        clients=3, rounds=1, data=str(table), label_column="y", patient_id_column="pid"
    )
    files = prepare_job(tmp_path / "job", opts)
    seen: dict[str, Path] = {}
    total = 0
    for path in [*files.site_train, *files.site_test]:
        site = load_csv(path, "y", "pid")
        assert site.feature_names == ("a", "b", "c")
        assert site.patient_ids is not None
        total += len(site)
        for pid in set(site.patient_ids.tolist()):
            assert seen.setdefault(pid, path) == path, f"{pid} on two sites"
    assert total == n
    assert json.loads((files.workdir / "model.json").read_text())["spec"]["feature_names"] == [
        "a",
        "b",
        "c",
    ]
