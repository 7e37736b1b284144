"""The distributions declare what they import, pinned to one version."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from confide import __version__

REPO = Path(__file__).resolve().parents[2]


def _toml(path: str) -> dict:  # type: ignore[type-arg]
    return tomllib.loads((REPO / path).read_text())


def test_the_server_depends_on_confide_privacy_at_the_same_version() -> None:
    server = _toml("server/pyproject.toml")["project"]
    cargo = _toml("Cargo.toml")["workspace"]["package"]["version"]
    assert server["version"] == cargo == __version__
    pins = [d for d in server["dependencies"] if re.match(r"confide\b(?!-)", d)]
    assert pins == [f"confide[privacy]=={cargo}"]
    assert server["optional-dependencies"]["demo"] == [f"confide[demo]=={cargo}"]


def test_the_extras_the_readme_documents_exist() -> None:
    extras = _toml("pyproject.toml")["project"]["optional-dependencies"]
    readme = (REPO / "README.md").read_text()
    for name in ("privacy", "server", "demo", "torch", "export", "onnx", "litert", "images"):
        assert name in extras, name
        assert f"| `{name}`" in readme, name
    assert any(d.startswith("dp-accounting") for d in extras["privacy"])
