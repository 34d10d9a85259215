"""What a process holds, read straight from /proc (not through the product's parsers)."""

from __future__ import annotations

import os
from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class Footprint:
    rss: int  # bytes
    fds: int
    threads: int


def footprint(pid: int) -> Footprint:
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return Footprint(
        rss=rss,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=len(os.listdir(f"/proc/{pid}/task")),
    )


def mounted(target: str) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split(" ")[4] == target for line in fh)


def loop_backing(device: str) -> str:
    """The backing file of loop ``device`` ("" once detached)."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as fh:
            return fh.read().strip()
    except OSError:
        return ""
