"""Shared fixtures for confide's test suites."""

from __future__ import annotations

import pytest

import confide


@pytest.fixture
def rng() -> confide.SecureRng:
    """A reproducible generator (fixed seed), so statistical tests cannot flake."""
    return confide.SecureRng(bytes(range(32)))
