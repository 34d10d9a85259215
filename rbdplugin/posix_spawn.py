"""``posix_spawn(3)`` through ctypes, so that starting a program lets go of the GIL.

Python's own ways to start a program (``subprocess``, ``os.posix_spawn``) hold the
GIL until the child has called exec. On a busy machine that wait is milliseconds
(the new child queues for a CPU), and the daemon's event loop and every other
thread of ours stand still meanwhile: with 20 Mounts in parallel on 2 cores they
stood still a fifth of the time (measured with ``py-spy --gil``). A foreign call
through ctypes releases the GIL, and glibc's ``posix_spawn`` is a vfork (no copy
of our address space).

Only :mod:`rbdplugin.process` calls this. Where the C library lacks what is needed
(glibc before 2.34 has no ``addclosefrom_np``; musl), :data:`AVAILABLE` is false and
the caller uses ``os.posix_spawn`` instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping, Sequence

# glibc's <spawn.h>.
SETSIGDEF = 0x04
SETSIGMASK = 0x08
SETSID = 0x80
# Opaque glibc structures, with room to spare: file actions are 80 bytes, attributes
# 336, a sigset_t 128.
_STRUCT_BYTES = 1024


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    needed = (
        "posix_spawn", "posix_spawn_file_actions_init", "posix_spawn_file_actions_destroy",
        "posix_spawn_file_actions_adddup2", "posix_spawn_file_actions_addopen",
        "posix_spawn_file_actions_addclosefrom_np", "posix_spawnattr_init",
        "posix_spawnattr_destroy", "posix_spawnattr_setflags", "posix_spawnattr_setsigmask",
        "posix_spawnattr_setsigdefault", "sigemptyset", "sigaddset",
    )  # fmt: skip
    return libc if all(hasattr(libc, name) for name in needed) else None


_LIBC = _libc()
AVAILABLE = _LIBC is not None


def _strings(items: Sequence[str]) -> ctypes.Array[ctypes.c_char_p]:
    array = (ctypes.c_char_p * (len(items) + 1))()
    array[:-1] = [os.fsencode(item) for item in items]
    array[-1] = None
    return array


def _check(err: int, what: str) -> None:
    if err != 0:
        raise OSError(err, f"{what}: {os.strerror(err)}")


def spawn(
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    stdin: int | None,
    stdout: int,
    stderr: int,
    signals_to_default: Sequence[int],
) -> int:
    """Start ``path`` in a new session with ``stdin`` (None: /dev/null), ``stdout`` and
    ``stderr`` as its 0-2, no other descriptor of ours, an empty signal mask and
    ``signals_to_default`` at their defaults; its pid. Blocks (without the GIL) until
    the child has called exec; an exec that failed raises ``OSError``."""
    libc = _LIBC
    if libc is None:
        raise OSError("posix_spawn with addclosefrom_np is not available in this C library")
    actions = ctypes.create_string_buffer(_STRUCT_BYTES)
    attributes = ctypes.create_string_buffer(_STRUCT_BYTES)
    _check(libc.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
    try:
        _check(libc.posix_spawnattr_init(attributes), "posix_spawnattr_init")
        try:
            _file_actions(libc, actions, stdin, stdout, stderr)
            _attributes(libc, attributes, signals_to_default)
            pid = ctypes.c_int(0)
            err = libc.posix_spawn(
                ctypes.byref(pid), os.fsencode(path), actions, attributes,
                _strings(list(argv)), _strings([f"{k}={v}" for k, v in env.items()]),
            )  # fmt: skip
            if err != 0:
                raise OSError(err, os.strerror(err), path)
            return pid.value
        finally:
            libc.posix_spawnattr_destroy(attributes)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)


def _file_actions(
    libc: ctypes.CDLL, actions: ctypes.Array[ctypes.c_char], stdin: int | None, stdout: int,
    stderr: int,
) -> None:  # fmt: skip
    if stdin is None:
        err = libc.posix_spawn_file_actions_addopen(
            actions, 0, os.fsencode(os.devnull), os.O_RDONLY, 0
        )
    else:
        err = libc.posix_spawn_file_actions_adddup2(actions, stdin, 0)
    _check(err, "posix_spawn_file_actions (stdin)")
    _check(libc.posix_spawn_file_actions_adddup2(actions, stdout, 1), "adddup2 (stdout)")
    _check(libc.posix_spawn_file_actions_adddup2(actions, stderr, 2), "adddup2 (stderr)")
    # Like Popen(close_fds=True): a library's descriptor without close-on-exec stays ours.
    _check(libc.posix_spawn_file_actions_addclosefrom_np(actions, 3), "addclosefrom_np")


def _attributes(
    libc: ctypes.CDLL, attributes: ctypes.Array[ctypes.c_char], signals_to_default: Sequence[int]
) -> None:
    empty = ctypes.create_string_buffer(_STRUCT_BYTES)
    defaults = ctypes.create_string_buffer(_STRUCT_BYTES)
    libc.sigemptyset(empty)
    libc.sigemptyset(defaults)
    for signum in signals_to_default:
        libc.sigaddset(defaults, signum)
    _check(libc.posix_spawnattr_setsigmask(attributes, empty), "posix_spawnattr_setsigmask")
    _check(libc.posix_spawnattr_setsigdefault(attributes, defaults), "setsigdefault")
    flags = ctypes.c_short(SETSID | SETSIGMASK | SETSIGDEF)
    _check(libc.posix_spawnattr_setflags(attributes, flags), "posix_spawnattr_setflags")
