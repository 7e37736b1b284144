"""docs/job.md lists every job.toml key with its default, checked against the config code."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

from confide_server.config import (
    Config,
    JobConfig,
    RetentionConfig,
    SecAggConfig,
    ServerConfig,
    SharingConfig,
    StrategyConfig,
    TLSConfig,
    parse_config,
)
from confide_server.engine.privacy import PrivacyConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DOC = Path(__file__).resolve().parents[2] / "docs" / "job.md"

SECTIONS: dict[str, Any] = {
    "job": JobConfig,
    "strategy": StrategyConfig,
    "server": ServerConfig,
    "tls": TLSConfig,
    "secagg": SecAggConfig,
    "privacy": PrivacyConfig,
    "sharing": SharingConfig,
    "retention": RetentionConfig,
}


def _block() -> str:
    (block,) = re.findall(r"```toml\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return block


def _defaults(cls: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "options":  # [strategy]: the strategy's own keys, not a key itself
            continue
        value = f.default
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def test_every_key_is_documented_with_its_default(tmp_path: Path) -> None:
    block = _block()
    doc = tomllib.loads(block)
    commented = dict(re.findall(r"^# (\w+) = (.*?)\s+#", block, flags=re.MULTILINE))
    for name, cls in SECTIONS.items():
        defaults = _defaults(cls)
        written = doc.get(name, {})
        if name == "tls":  # no default files: every key is shown commented out
            assert {k for k in commented if k in defaults} == set(defaults)
            assert all(v is None for v in defaults.values())
            continue
        # A key without a default value (None) is shown commented out, with an example.
        unset = {k for k, v in defaults.items() if v is None}
        assert set(written) == set(defaults) - unset, f"[{name}]"
        assert unset <= set(commented), f"[{name}] {sorted(unset - set(commented))}"
        for key, value in defaults.items():
            if key in unset:
                continue
            assert written[key] == value, f"{name}.{key}: doc {written[key]!r}, code {value!r}"
    deadlines = Config.__dataclass_fields__["deadlines"].default_factory()  # type: ignore[misc]
    assert doc["deadlines"] == deadlines
    assert set(doc["model"]) == {"manifest", "weights"}
    assert set(doc) == {*SECTIONS, "model", "deadlines"}
    # The block is a valid job config: parse_config accepts it as written.
    parse_config(doc, tmp_path)


def test_every_key_has_a_comment() -> None:
    for line in _block().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line.split("=", 1)[1], f"no comment: {line}"
