"""Fewer glibc malloc arenas: the same work in flat, lower resident memory.

glibc gives threads their own arenas (up to 8 per core). With a batcher thread per variant, torch's
threads and varied tensor sizes, freed memory stays scattered over those arenas: measured here, the
default config's RSS after warm-up was ~1.37 GB and crept up ~40 MB per 2000 requests; with 2
arenas it was ~1.07 GB and levelled off (bench/RESULTS.md, soak). ``MALLOC_ARENA_MAX`` in the
environment wins (glibc reads it at start); this only sets the default for ``python -m service``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Call before threads start allocating; True if glibc took the setting."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to tune
        return False
