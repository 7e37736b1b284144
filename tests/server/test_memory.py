"""The allocator setting that returns freed upload buffers to the OS."""

from __future__ import annotations

import platform

import pytest

from confide_server.memory import tune_allocator


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc"
)
def test_the_mmap_threshold_is_set_on_glibc() -> None:
    assert tune_allocator() is True
    assert tune_allocator() is True  # idempotent: create_app calls it for every app
