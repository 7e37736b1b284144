"""Argument checks shared by the public wrappers (the Rust core checks everything else)."""

from __future__ import annotations

from typing import Any


def as_bytes(value: Any, name: str) -> bytes:
    """Return ``value`` as ``bytes`` if it is a bytes-like object, else raise ``TypeError``.

    ``bytes(n)`` on an integer would silently build an ``n``-byte zero buffer, so integers
    and other objects are refused explicitly.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
