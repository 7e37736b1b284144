"""The coverage-guided fuzz target runs (short) and finds nothing (issue 12 item 8).

``tests/server/fuzz_decoders.py`` is an atheris (libFuzzer) harness; libFuzzer exits the
process when it is done, so it runs in a child process. A finding makes the child exit
non-zero and print the crashing input.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]


def test_atheris_short_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.server.fuzz_decoders",
            "-runs=1500",
            "-seed=12",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "DONE" in out, out[-3000:]
    assert len(list(corpus.iterdir())) > 5  # the seeds, plus what coverage found
