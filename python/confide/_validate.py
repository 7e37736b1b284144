"""Argument checks shared by the public wrappers (the Rust core checks everything else)."""

from __future__ import annotations

from typing import Any

from confide.errors import ArrayTypeError


def as_bytes(value: Any, name: str) -> bytes:
    """Return ``value`` as ``bytes`` if it is bytes-like, else raise ``ArrayTypeError``.

    ``bytes(n)`` on an integer would silently build an ``n``-byte zero buffer, so integers
    and other objects are refused explicitly.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise ArrayTypeError(f"{name} must be bytes, got {type(value).__name__}")
