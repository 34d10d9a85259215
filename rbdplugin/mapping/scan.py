"""Reading what is mapped from /sys and /proc (paths from HostPaths, for fixture trees)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rbdplugin.mapping import HostPaths


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


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


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mounts(host: HostPaths) -> dict[str, tuple[str, str, str]]:
    """Mount point -> (source, fstype, super options) from /proc/self/mountinfo; last one wins."""
    found = {}
    for line in read(host.proc / "self" / "mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 2:
            found[unescape(fields[4])] = (
                unescape(tail[1]),
                tail[0],
                tail[2] if len(tail) > 2 else "",
            )
    return found
