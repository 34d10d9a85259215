"""This host as the plugin sees it: where /sys, /proc and /dev are, and what is mounted.

Both sides of the back-end seam use it: the generic mount code (which device is
mounted where) and the back-ends' attach code (mappers read /sys and /proc). Every
path comes from :class:`HostPaths`, so tests point it at fixture trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostPaths:
    sys: Path = Path("/sys")
    proc: Path = Path("/proc")
    dev: Path = Path("/dev")


def read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


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


def mount_points_of(host: HostPaths, device: str) -> list[str]:
    """Where block device ``device`` is mounted on this host."""
    return [target for target, entry in mounts(host).items() if entry[0] == device]
