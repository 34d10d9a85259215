"""Filesystems on volumes' block devices: probe, format once, mount, unmount, measure.

The rule that protects data: a device that carries any signature (filesystem,
partition table, RAID or LVM member, LUKS, swap...) is never formatted. The
only exception is our own mkfs that was interrupted, which the caller proves
from the image's metadata and passes as ``force``.

Blank is proven, never inferred: ``blkid`` exits 2 both when it found nothing
and when it could not read the device, so after a "nothing found" we read the
regions where signatures live (the first and last MiB) ourselves, and only all
zeros there is blank. A read error is an error; data that no probe recognises is
:data:`UNRECOGNISED`, which is never formatted either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rbdplugin.errors import ProcessError, VolumeBusy
from rbdplugin.host import HostPaths, mount_points_of, mounts
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
# Every signature blkid knows sits in the first or the last MiB (GPT backup, md 0.90/1.0
# superblocks and ZFS labels at the end; the rest at the start).
SIGNATURE_REGION = 1024 * 1024
CMP_DIFFERENT = 1
UNRECOGNISED = "unrecognised data"


def merge_extended(fast: tuple[str, ...], extra: tuple[str, ...]) -> list[str]:
    """``fast`` then ``extra`` mkfs flags, with one ``-E``: mke2fs keeps only the last
    ``-E``, so the user's sub-options follow ours inside it (and win where they clash)."""
    ours = _extended(fast)
    theirs = _extended(extra)
    if ours is None or theirs is None:
        return [*fast, *extra]
    merged = f"{ours[1]},{theirs[1]}"
    return [*_without(fast, ours[0]), *_without(extra, theirs[0]), "-E", merged]


def _extended(words: tuple[str, ...]) -> tuple[slice, str] | None:
    """Where ``-E VALUE`` (or ``-EVALUE``) sits in ``words``, and its value."""
    for i, word in enumerate(words):
        if word == "-E" and i + 1 < len(words):
            return slice(i, i + 2), words[i + 1]
        if word.startswith("-E") and len(word) > 2:
            return slice(i, i + 1), word[2:]
    return None


def _without(words: tuple[str, ...], part: slice) -> list[str]:
    return [*words[: part.start], *words[part.stop :]]


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
        """The device's signature, or None when it is proven blank."""
        argv = ["blkid", "--probe", "--output", "export", device]
        done = await self.runner(Command(argv, timeout=self.timeout, check=False))
        if done.returncode == BLKID_NOTHING_FOUND:
            return await self._zeros_or_unrecognised(device)
        if done.returncode != 0:
            raise ProcessError(f"blkid could not probe {device}: {done.output}", output=done.output)
        fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        fields.pop("DEVNAME", None)
        return Signature(fields)

    async def _zeros_or_unrecognised(self, device: str) -> Signature | None:
        size = self.device_size(device)
        head = min(SIGNATURE_REGION, size)
        tail_start = max(size - SIGNATURE_REGION, head)
        for start, length in ((0, head), (tail_start, size - tail_start)):
            if length and not await self._reads_zeros(device, start, length):
                return Signature({"TYPE": UNRECOGNISED})
        return None

    async def _reads_zeros(self, device: str, start: int, length: int) -> bool:
        argv = ["cmp", f"--ignore-initial={start}:0", f"--bytes={length}", device, "/dev/zero"]
        done = await self.runner(Command(argv, timeout=self.timeout, check=False))
        if done.returncode == CMP_DIFFERENT and "EOF" not in done.output:
            return False
        if done.returncode != 0:
            raise ProcessError(
                f"cannot read {device} to prove it blank, so it is not formatted: {done.output}",
                output=done.output,
            )
        return True

    def device_size(self, device: str) -> int:
        """The size of block device ``device`` in bytes, from sysfs."""
        name = os.path.basename(os.path.realpath(device))
        sectors = self.host.sys / "class" / "block" / name / "size"
        try:
            return int(sectors.read_text()) * 512
        except (OSError, ValueError) as exc:
            raise ProcessError(f"cannot read the size of {device} from {sectors}: {exc}") from exc

    async def mkfs(
        self, device: str, fstype: str, fast: bool, extra: tuple[str, ...], force: bool = False
    ) -> None:
        argv = [f"mkfs.{fstype}", "-q"]
        fast_flags = FAST_MKFS[fstype] if fast else ()
        if force:
            argv.append(FORCE_MKFS[fstype])
        argv += merge_extended(fast_flags, extra)
        argv.append(device)  # the device always last: options cannot name another one
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
        return mount_points_of(self.host, device)

    def usage(self, target: Path) -> Usage:
        st = os.statvfs(target)
        size = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return Usage(size=size, used=size - st.f_bfree * st.f_frsize, free=free)
