"""The README's examples run as written.

Python blocks outside the walkthrough run in-process. The bring-your-own-data walkthrough
(between the ``walkthrough:start`` and ``walkthrough:end`` markers) runs block by block in
one scratch folder, bash blocks with ``bash -euo pipefail`` and Python blocks with this
interpreter, with real ``confide`` and ``confide-server`` processes on loopback; only its
port is replaced by a free one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from confide_server.launcher import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"```(python|bash)\n(.*?)```", flags=re.DOTALL)


def _split() -> tuple[str, str]:
    text = README.read_text()
    start, end = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"
    head, rest = text.split(start)
    walk, tail = rest.split(end)
    return head + tail, walk


def test_readme_python_blocks_run() -> None:
    outside, _ = _split()
    blocks = [code for lang, code in _BLOCK.findall(outside) if lang == "python"]
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_walkthrough_runs(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    _, walk = _split()
    blocks = _BLOCK.findall(walk)
    assert [lang for lang, _ in blocks].count("bash") >= 5
    port = str(free_port())
    # `python`, `confide` and `confide-server` are this interpreter's (the README's venv).
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for i, (lang, code) in enumerate(blocks):
        code = code.replace("8765", port)
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable]
        p = subprocess.run(
            cmd,
            input=None if lang == "bash" else code,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
            check=False,
        )
        log = tmp_path / "server.log"
        server_log = log.read_text() if log.exists() else ""
        assert p.returncode == 0, (
            f"block {i} ({lang}):\n{code}\n{p.stdout}\n{p.stderr}\n{server_log}"
        )
        assert "Traceback" not in p.stderr
        outputs.append(p.stdout)
    text = "\n".join(outputs)
    # Steps 5 and 6: the job finished, epsilon is reported, the model was exported and used.
    assert "'my-first-job': finished, 3/3 rounds, 3 clients enrolled" in text
    assert "privacy: mode=sample (patient-level), epsilon=" in text
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert "-> P(outcome = 1) =" in text
