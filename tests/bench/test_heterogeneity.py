"""The heterogeneity bench (benches/python/heterogeneity.py) in its ``--quick`` mode.

It is a script, not a package module: it is loaded from its path. The quick run (2 alphas,
3 rounds, 1 seed) checks the document's shape and the properties that must hold whatever
the machine: uploads shrink with the shared fraction, accuracies are accuracies, and the
run is deterministic.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benches" / "python" / "heterogeneity.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("heterogeneity_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json_and_png(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    bench = _load()
    doc = bench.main(["--quick", "--out", str(tmp_path / "het")])
    saved = json.loads((tmp_path / "het.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    assert (tmp_path / "het.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["in_process"] is True
    rows = doc["rows"]
    studies = {r["study"] for r in rows}
    assert studies == {"strategy", "momentum", "partial"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    part = sorted((r for r in rows if r["study"] == "partial"), key=lambda r: r["fraction"])
    assert [r["fraction"] for r in part] == [0.2, 1.0]
    small, full = (r["upload_bytes_per_site_round"] for r in part)
    assert small < 0.35 * full  # 20 % of the values plus a header
    # a near-IID federation of an easy task learns it
    iid = [r for r in rows if r["study"] == "strategy" and r["alpha"] == 100.0]
    assert all(r["accuracy"] > 0.85 for r in iid)
    # fixed seeds: the same rows again
    again = bench.run(quick=True)
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in rows]
