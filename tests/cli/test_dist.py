"""The wheels `make dist` builds install into a fresh virtualenv and run a federation.

No compiler is on the PATH of the install or the run (the wheel carries the compiled core),
the source tree is not importable (the run starts outside it, without PYTHONPATH), and the
confide wheel is tagged abi3 for manylinux_2_28. Dependencies come from PyPI (pip's cache
makes repeat runs fast). `make test` builds the wheels first and sets CONFIDE_REQUIRE_DIST,
so there a missing wheel fails the test instead of skipping it.
"""

from __future__ import annotations

import csv
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.cli.conftest import REPO

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]

DIST = REPO / "dist"


def _one(pattern: str) -> Path:
    found = sorted(DIST.glob(pattern))
    if not found:
        if os.environ.get("CONFIDE_REQUIRE_DIST"):
            pytest.fail(f"no {pattern} in {DIST}: `make dist` did not build it")
        pytest.skip(f"no {pattern} in {DIST}: run `make dist` first")
    return found[-1]


def _table(path: Path, n: int = 240) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4))
    y = (x @ np.array([1.5, -1.0, 0.5, 0.0]) > 0).astype(int)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "age_z", "bp_z", "hr_z", "noise", "outcome"])
        for i in range(n):
            w.writerow([f"P{i // 2:04d}", *x[i].round(4), y[i]])


def test_wheel_tags() -> None:
    wheel = _one(f"confide-*-abi3-manylinux_2_28_{platform.machine()}.whl")
    with zipfile.ZipFile(wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/WHEEL"))
        tags = zf.read(info).decode()
        names = zf.namelist()
    assert f"Tag: cp310-abi3-manylinux_2_28_{platform.machine()}" in tags
    assert "confide/_core.abi3.so" in names
    _one("confide-*.tar.gz")
    _one("confide_server-*-py3-none-any.whl")


def test_wheels_install_and_federate_without_a_compiler(tmp_path: Path) -> None:
    wheel = _one(f"confide-*-abi3-manylinux_2_28_{platform.machine()}.whl")
    server = _one("confide_server-*-py3-none-any.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = str(bin_dir)  # python, pip, confide: nothing else, no cc, no cargo
    for tool in ("cc", "gcc", "cargo", "rustc", "zig"):
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "-q", "--only-binary", ":all:", wheel, server],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    where = subprocess.run(
        [bin_dir / "python", "-c", "import confide, confide_server; print(confide.__file__)"],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout
    assert str(venv) in where, where
    _table(tmp_path / "hospital.csv")
    columns = ["--label-column", "outcome", "--patient-id-column", "patient"]
    job = ["--clients", "3", "--rounds", "2", "--out", "sim", "--timeout", "600"]
    run = subprocess.run(
        [bin_dir / "confide-server", "simulate", "--data", "hospital.csv", *columns, *job],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=700,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "federated accuracy" in run.stdout
    assert "privacy: patient-level DP-SGD, epsilon = " in run.stdout
