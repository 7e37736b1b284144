"""Fixtures shared with the server tests: an in-process server over real HTTP (``make_fed``)."""

from tests.server.conftest import make_fed

__all__ = ["make_fed"]
