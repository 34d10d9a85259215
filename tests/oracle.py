"""What the host really has, read straight from /proc and /sys.

Test oracles must not reuse the product's own parsers (rbdplugin.mapping.scan):
a bug there would hide itself. These readers are written independently, match
paths exactly (never by prefix), and are deliberately plain.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _octal_unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[dict[str, str]]:
    """Every line of /proc/self/mountinfo as a dict: target, source, fstype, options."""
    entries = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            before, after = line.rstrip("\n").split(" - ", 1)
            left, right = before.split(" "), after.split(" ")
            entries.append(
                {
                    "target": _octal_unescape(left[4]),
                    "mount_options": left[5],
                    "fstype": right[0],
                    "source": _octal_unescape(right[1]),
                    "super_options": right[2] if len(right) > 2 else "",
                }
            )
    return entries


def mount_at(target: str | Path) -> dict[str, str] | None:
    """The last (visible) mount at exactly ``target``, or None."""
    found = [e for e in mountinfo() if e["target"] == str(target)]
    return found[-1] if found else None


def is_mounted(target: str | Path) -> bool:
    return mount_at(target) is not None


def loop_devices() -> dict[str, str]:
    """/dev/loopN -> its backing file, for every attached loop device (from sysfs)."""
    found = {}
    for name in os.listdir("/sys/block"):
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as fh:
                backing = fh.read().strip()
        except OSError:
            continue
        if backing:
            found[f"/dev/{name}"] = backing.removesuffix(" (deleted)")
    return found


def orphan_loops() -> set[str]:
    """Loop devices whose backing file shows as "/": a FUSE export (mounted on its export
    file) whose mount went away under a loop device still attached to it. Nothing can
    tie such a device to its volume or folder any more: a leak, if it is new."""
    return {dev for dev, backing in loop_devices().items() if backing == "/"}


def loops_backed_by(path: str | Path) -> list[str]:
    return sorted(dev for dev, backing in loop_devices().items() if backing == str(path))


def argv_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def pids_with_argument(program: str, argument_part: str) -> list[int]:
    """Pids of ``program`` that have ``argument_part`` as an exact comma-separated item of
    one of their arguments (e.g. ``mountpoint=/x/y``, not a prefix of ``mountpoint=/x/yz``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = argv_of(int(entry))
        if not argv or os.path.basename(argv[0]) != program:
            continue
        if any(argument_part in arg.split(",") for arg in argv[1:]):
            found.append(int(entry))
    return sorted(found)


def pids_of_program_with(program: str, substring: str) -> list[int]:
    """Pids of ``program`` whose arguments contain ``substring`` anywhere (for wrappers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = argv_of(int(entry))
            if argv and os.path.basename(argv[0]) == program and substring in " ".join(argv[1:]):
                found.append(int(entry))
    return sorted(found)


def process_state(pid: int) -> str:
    """One-letter state (R, S, D, Z, ...) of ``pid``, or "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def fstype_at(target: str | Path) -> str:
    """The filesystem type mounted at exactly ``target``, or "" if nothing is."""
    entry = mount_at(target)
    return entry["fstype"] if entry else ""


def source_at(target: str | Path) -> str:
    entry = mount_at(target)
    return entry["source"] if entry else ""


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def krbd_devices() -> dict[str, str]:
    """/dev/rbdN -> the image it maps ("pool/image" or "pool/ns/image"), from sysfs."""
    root = "/sys/bus/rbd/devices"
    found = {}
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        pool, ns, name = (_read(f"{root}/{entry}/{a}") for a in ("pool", "pool_ns", "name"))
        found[f"/dev/rbd{entry}"] = f"{pool}/{ns}/{name}" if ns else f"{pool}/{name}"
    return found


def nbd_devices() -> dict[str, list[str]]:
    """/dev/nbdN -> the command line of the process serving it, for connected devices."""
    found = {}
    for name in os.listdir("/sys/block"):
        pid = _read(f"/sys/block/{name}/pid") if name.startswith("nbd") else ""
        if pid.isdigit():
            found[f"/dev/{name}"] = argv_of(int(pid))
    return found


def mappings_of(spec: str, export: str | Path) -> list[str]:
    """Every block device that maps image ``spec`` ("pool/image"): loop devices on its
    FUSE ``export``, krbd devices, rbd-nbd devices."""
    return sorted(
        loops_backed_by(export)
        + [dev for dev, image in krbd_devices().items() if image == spec]
        + [dev for dev, argv in nbd_devices().items() if spec in argv]
    )


def fs_uuid_at(mountpoint: str | Path) -> str:
    """The filesystem UUID of what is mounted there, as blkid reads it from the device."""
    done = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", source_at(mountpoint)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip()
