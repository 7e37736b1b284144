"""The one loader of known-answer vectors (JSON files next to this module).

Each file is ``{"description": str, "vectors": [ {...}, ... ]}``; byte strings are hex.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTOR_DIR = Path(__file__).parent


def load_vectors(name: str) -> list[dict[str, Any]]:
    """Return the vectors of ``<name>.json``."""
    with (VECTOR_DIR / f"{name}.json").open() as f:
        data = json.load(f)
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors
