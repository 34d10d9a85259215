"""This host as the plugin sees it: where /sys, /proc and /dev are, and what is mounted.

Both sides of the back-end seam use it: the generic mount code (which device is
mounted where) and the back-ends' attach code (mappers read /sys and /proc). Every
path comes from :class:`HostPaths`, so tests point it at fixture trees.
"""

from __future__ import annotations

import io
import select
import threading
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


MountTable = dict[str, tuple[str, str, str]]


def mounts(host: HostPaths) -> MountTable:
    """Mount point -> (source, fstype, super options) from /proc/self/mountinfo; last one
    wins. On the real /proc, the table is re-read only after the kernel reports a mount
    or unmount (see :class:`_Watched`); super options may then be those of the last such
    event (a filesystem remounting itself read-only after errors is not one)."""
    if host.proc == REAL_PROC:
        return dict(_WATCHED.table())
    return _parse(read(host.proc / "self" / "mountinfo"))


def _parse(text: str) -> MountTable:
    found = {}
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 2:
            found[unescape(fields[4])] = (
                unescape(tail[1]),
                tail[0],
                tail[2] if len(tail) > 2 else "",
            )
    return found


class _Watched:
    """This process's mount table, kept from one mount or unmount to the next.

    Reading mountinfo makes the kernel print every mount (1 ms here, with a few hundred)
    and the daemon asks often: every mounted volume at start-up and each health check,
    every 5 ms while an export comes up. An open mountinfo polls with POLLPRI after the
    namespace's table changed since the last poll, so an unchanged table is one poll.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._poll: select.poll | None = None
        self._file: io.FileIO | None = None
        self._table: MountTable = {}
        self.reads = 0

    def table(self) -> MountTable:
        with self._lock:
            if self._poll is None:
                self._open()
            elif self._poll.poll(0):  # changed since the last poll: read it again
                self._read()
            return self._table

    def _open(self) -> None:
        self._file = io.FileIO(self.path, "r")  # kept open: its polls tell of changes
        self._poll = select.poll()
        self._poll.register(self._file, select.POLLPRI)
        self._read()  # after open: a change from here on shows at the next poll

    def _read(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._table = _parse(self._file.readall().decode(errors="replace"))
            self.reads += 1


REAL_PROC = Path("/proc")
_WATCHED = _Watched(REAL_PROC / "self" / "mountinfo")


def mount_points_of(host: HostPaths, device: str) -> list[str]:
    """Where block device ``device`` is mounted on this host."""
    return [target for target, entry in mounts(host).items() if entry[0] == device]
