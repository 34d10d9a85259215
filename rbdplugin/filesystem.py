"""Filesystems on mapped devices: probe, format once, mount, unmount, measure.

The rule that protects data: a device that carries any signature (filesystem,
partition table, RAID or LVM member, LUKS, swap...) is never formatted. The
only exception is our own mkfs that was interrupted, which the caller proves
from the image's metadata and passes as ``force``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rbdplugin.errors import ProcessError, VolumeBusy
from rbdplugin.mapping import HostPaths
from rbdplugin.mapping.scan import mounts
from rbdplugin.process import Command, Runner

# What blkid may report that we mount, and as which filesystem type.
MOUNTABLE = {"ext4": "ext4", "ext3": "ext4", "ext2": "ext4", "xfs": "xfs"}
# Fast flags: only for images we created and found blank (FACTS §5): little I/O, no discard.
FAST_MKFS = {
    "ext4": ("-m0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"),
    "xfs": ("-K",),
}
FORCE_MKFS = {"ext4": "-F", "xfs": "-f"}
BLKID_NOTHING_FOUND = 2


@dataclass(frozen=True)
class Signature:
    """What blkid found on a device."""

    fields: dict[str, str]

    @property
    def type(self) -> str:
        return self.fields.get("TYPE") or self.fields.get("PTTYPE", "unknown")

    @property
    def mountable_as(self) -> str | None:
        return MOUNTABLE.get(self.fields.get("TYPE", ""))


@dataclass(frozen=True)
class Usage:
    size: int
    used: int
    free: int


class Filesystems:
    def __init__(self, runner: Runner, host: HostPaths, timeout: float) -> None:
        self.runner = runner
        self.host = host
        self.timeout = timeout

    async def probe(self, device: str) -> Signature | None:
        """The device's signature, or None when it is blank."""
        argv = ["blkid", "--probe", "--output", "export", device]
        done = await self.runner(Command(argv, timeout=self.timeout, check=False))
        if done.returncode == BLKID_NOTHING_FOUND:
            return None
        if done.returncode != 0:
            raise ProcessError(f"blkid could not probe {device}: {done.output}", output=done.output)
        fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        fields.pop("DEVNAME", None)
        return Signature(fields)

    async def mkfs(
        self, device: str, fstype: str, fast: bool, extra: tuple[str, ...], force: bool = False
    ) -> None:
        argv = [f"mkfs.{fstype}", "-q"]
        if fast:
            argv += FAST_MKFS[fstype]
        if force:
            argv.append(FORCE_MKFS[fstype])
        argv += [*extra, device]  # the device always last: options cannot name another one
        await self.runner(Command(argv, timeout=self.timeout))

    async def mount(self, device: str, target: Path, fstype: str, options: tuple[str, ...]) -> None:
        target.mkdir(parents=True, exist_ok=True, mode=0o755)
        argv = ["mount", "-t", fstype]
        if options:
            argv += ["-o", ",".join(options)]
        await self.runner(Command([*argv, device, str(target)], timeout=self.timeout))

    async def unmount(self, target: Path) -> None:
        if not self.mounted_from(target):
            return
        done = await self.runner(
            Command(["umount", str(target)], timeout=self.timeout, check=False)
        )
        if done.returncode != 0 and self.mounted_from(target):
            if "busy" in done.output.lower():
                raise VolumeBusy(
                    f"{target} is still in use (a process has files open there); "
                    "stop what uses it, then unmount again"
                )
            raise ProcessError(f"umount {target} failed: {done.output}", output=done.output)

    def mounted_from(self, target: Path) -> str | None:
        """The source device mounted at ``target``, if it is a mount point."""
        entry = mounts(self.host).get(str(target))
        return entry[0] if entry else None

    def mount_points_of(self, device: str) -> list[str]:
        return [target for target, entry in mounts(self.host).items() if entry[0] == device]

    def usage(self, target: Path) -> Usage:
        st = os.statvfs(target)
        size = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return Usage(size=size, used=size - st.f_bfree * st.f_frsize, free=free)
