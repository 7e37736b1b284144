"""The patient app is a self-contained example, not installed: import it from its folder."""

from __future__ import annotations

import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[2] / "mobile_examples" / "patient_app"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))
