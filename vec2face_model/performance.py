"""Speed settings that touch the whole process, so the caller decides (``hsface build`` does on CPU).

``reuse_freed_memory`` is a malloc setting and changes no result. The options that change pixels
by rounding (``precision``, ``compile_generator``) live on the pipeline. Measured effects:
``bench/bench_decode.py`` and the README's performance section.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_REUSE = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}  # never trim; no mmap-backed blocks


def reuse_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory in the process for reuse instead of handing it back to the OS (glibc only).

    A CPU decode allocates and frees tens of 12-50 MB activations per batch; by default glibc
    serves each from fresh ``mmap`` pages and returns them on free, so every batch pays page faults
    on ~1 GB (decoding runs 1.06x / 1.16x / 1.25x faster without that at batch 1 / 8 / 32 on the
    project's 2-core machine). With this on, the peak footprint of a batch stays mapped and is
    reused: resident memory no longer shrinks between batches. ``enabled=False`` restores glibc's
    default values. Returns False (and does nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = _REUSE if enabled else _GLIBC_DEFAULTS
    ok = all(mallopt(param, value) == 1 for param, value in settings.items())
    if not enabled and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return ok
