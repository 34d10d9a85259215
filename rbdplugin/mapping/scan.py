"""Reading what is mapped from /sys and /proc (paths from HostPaths, for fixture trees)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rbdplugin.host import HostPaths, mounts, read, unescape

# read, mounts and unescape live in rbdplugin.host now; re-exported for existing callers.
__all__ = ["cmdline", "loop_backing_files", "mounts", "processes", "read", "unescape"]


def cmdline(host: HostPaths, pid: int) -> list[str]:
    try:
        raw = (host.proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def processes(host: HostPaths, program: str, match: Callable[[str], bool]) -> list[int]:
    """Pids whose argv[0] ends in ``program`` and one of whose arguments ``match``es."""
    found = []
    for entry in host.proc.iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(host, int(entry.name))
        if argv and Path(argv[0]).name == program and any(match(arg) for arg in argv[1:]):
            found.append(int(entry.name))
    return sorted(found)


def loop_backing_files(host: HostPaths) -> dict[str, str]:
    """/dev/loopN -> backing file, read from sysfs (``losetup -a`` can hang in the kernel)."""
    found = {}
    for entry in sorted((host.sys / "block").glob("loop*")):
        backing = read(entry / "loop" / "backing_file")
        if backing:
            found[f"/dev/{entry.name}"] = backing
    return found
