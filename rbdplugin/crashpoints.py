"""Crash points: TEST ONLY hooks that make the daemon SIGKILL itself at a named step.

``RBDPLUGIN_TEST_CRASH_AT=POINT[@N][,POINT[@N]...]`` in the daemon's environment makes
it kill itself with SIGKILL the Nth time (default: the first) it reaches POINT, as a
power cut or an OOM kill would. tests/integration/test_crash_points.py uses it to
prove that a restarted daemon finishes or undoes every verb from any of these steps.
The variable is read once, when this module is first imported (at start-up); it is
never set in production, and then every hook is one look-up in an empty frozenset.
A name not listed here makes the import fail, so a typo never goes unnoticed.

The points, each between two side effects of a verb:

Create
    create.after-image          the image exists, without our metadata yet
    create.after-metadata       the image and its metadata exist; Docker has no answer
Remove
    remove.after-format-marks   delete policy: our format marks are gone, the image not yet
    remove.after-image          delete policy: both are gone; Docker has no answer
    remove.after-trash          trash policy: the image is in the trash; Docker has no answer
Mount
    mount.after-record          the mount table has the new record (phase mapping)
    lease.after-presence        our presence handle watches the image; no claim yet
    fence.after-blocklist       a dead writer's first address is blocklisted, others not yet
    takeover.after-fence        a dead writer is fenced; its claim is still in the lease
    lease.after-claim           our claim is in the lease; nothing is mapped
    map.after-export            the export process serves the image; no loop device yet
    map.after-loop              the loop device is attached; the lease lacks its address
    lease.after-record-mapping  the lease names the mapping's address; the table does not
    mount.after-mapped-saved    the table says mapped, with the device
    mkfs.after-mark-started     the "formatting" mark is set; mkfs has not run
    mkfs.after-mkfs             mkfs ran; the mark still says "formatting"
    mkfs.after-mark-done        the mark says "formatted"; nothing is mounted
    mount.after-mount-syscall   the filesystem is mounted; the table still says mapped
    mount.after-mounted-saved   the table says mounted; Docker has no answer
    mount.after-reference-saved another ID's reference is counted; Docker has no answer
Unmount (and every teardown: roll-back, reconcile)
    unmount.after-reference-saved one reference fewer is saved; others remain
    unmount.after-unmounting-saved the table says unmounting; still mounted
    unmount.after-umount        the filesystem is unmounted; the device is still there
    unmap.after-loop-detach     the loop device is gone; the export process still runs
    unmap.after-export-stop     the export process is gone; its file may remain
    unmount.after-unmap         the mapping is gone; our claim is still in the lease
    lease.after-release         our claim is gone; the presence handle is still open
    lease.after-presence-close  the presence handle is closed; the table still has the record
    unmount.after-record-drop   the record is gone; Docker has no answer
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "RBDPLUGIN_TEST_CRASH_AT"

POINTS = frozenset({
    "create.after-image", "create.after-metadata",
    "remove.after-format-marks", "remove.after-image", "remove.after-trash",
    "mount.after-record", "lease.after-presence", "fence.after-blocklist",
    "takeover.after-fence", "lease.after-claim", "map.after-export", "map.after-loop",
    "lease.after-record-mapping", "mount.after-mapped-saved", "mkfs.after-mark-started",
    "mkfs.after-mkfs", "mkfs.after-mark-done", "mount.after-mount-syscall",
    "mount.after-mounted-saved", "mount.after-reference-saved",
    "unmount.after-reference-saved", "unmount.after-unmounting-saved", "unmount.after-umount",
    "unmap.after-loop-detach", "unmap.after-export-stop", "unmount.after-unmap",
    "lease.after-release", "lease.after-presence-close", "unmount.after-record-drop",
})  # fmt: skip


def parse(value: str) -> dict[str, int]:
    """``POINT[@N],...`` as {point: N}; :class:`ValueError` naming what is wrong."""
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, count = item.partition("@")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown crash point {name!r}; known: {sorted(POINTS)}")
        if count and not (count.isdigit() and int(count) > 0):
            raise ValueError(f"{ENV}: {item!r}: the count after @ must be a positive integer")
        armed[name] = int(count or 1)
    return armed


_AT = parse(os.environ.get(ENV, ""))
_ARMED = frozenset(_AT)
_reached: dict[str, int] = {}
_lock = threading.Lock()  # some points are reached in the Ceph thread pool


def crash_point(name: str) -> None:
    """SIGKILL this process here if the test environment asked for it (else nothing)."""
    if name in _ARMED:
        _reach(name)


def _reach(name: str) -> None:
    with _lock:
        _reached[name] = times = _reached.get(name, 0) + 1
    if times == _AT[name]:
        os.write(2, f"rbdplugin: test crash point {name} (time {times}): SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
