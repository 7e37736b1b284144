"""Return freed upload buffers to the operating system (glibc's malloc).

glibc serves a large block (>= 128 KiB) from its own ``mmap`` and unmaps it when freed,
but it then raises that threshold to the size of the freed block (up to 32 MiB): after the
first 1 MiB upload body or decoded vector is freed, later ones come from the heap, where
freed memory stays in the process. Measured with ``benches/federation/memory.py rss``
(500 sites x 1 MiB, 32 slots): the server's RSS stayed at 601 MiB after the round instead
of going back to 82 MiB, and the ingest peak was 133 MiB instead of 116 MiB. Fixing the
threshold at 128 KiB (``mallopt(M_MMAP_THRESHOLD)``, which also stops the dynamic raise)
keeps every body-sized block in its own mapping, so memory is returned when it is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD", "tune_allocator"]

#: Blocks at least this large get their own mapping (glibc's initial default).
MMAP_THRESHOLD = 128 * 1024

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h

log = logging.getLogger("confide_server")


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; whether it was set.

    Does nothing (``False``) where the C library has no ``mallopt`` (musl, macOS).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed buffers may stay in the heap")
    return ok
