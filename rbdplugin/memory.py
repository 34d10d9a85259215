"""Keeping the daemon's resident memory small: glibc's malloc, told two things.

The daemon is one Python thread serving requests plus librados' and our thread
pools' threads. glibc gives every thread that mallocs an arena of its own (up to
eight per core), and never hands freed arena pages back on its own: after a burst
of Mounts, several MiB stay resident for nothing. So the process uses at most
:data:`ARENAS` arenas (set before any thread starts), and :func:`trim` returns
free pages to the kernel when the daemon is idle. Both are no-ops where glibc is
not the C library (e.g. musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def limit_arenas(arenas: int = ARENAS) -> None:
    """Use at most ``arenas`` malloc arenas; call before threads start."""
    if _LIBC is not None and not _LIBC.mallopt(M_ARENA_MAX, arenas):
        log.debug("mallopt(M_ARENA_MAX, %d) was refused", arenas)


def trim() -> None:
    """Give the kernel back the pages malloc holds free."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
