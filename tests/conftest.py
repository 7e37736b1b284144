"""Shared fixtures for confide's test suites."""

from __future__ import annotations

import pytest
from hypothesis import settings

import confide

# Hypothesis' default 200 ms per-example deadline is a wall-clock threshold: on a busy machine
# it fails tests whose code is correct. Tests check correctness, never time.
settings.register_profile("confide", deadline=None)
settings.load_profile("confide")


@pytest.fixture
def rng() -> confide.SecureRng:
    """A reproducible generator (fixed seed), so statistical tests cannot flake."""
    return confide.SecureRng(bytes(range(32)))
