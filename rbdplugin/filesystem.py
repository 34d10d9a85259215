"""Filesystems on volumes' block devices: probe, format once, mount, unmount, measure.

The rule that protects data: a device that carries any signature (filesystem,
partition table, RAID or LVM member, LUKS, swap...) is never formatted. The
only exception is our own mkfs that was interrupted, which the caller proves
from the image's metadata and passes as ``force``.

Blank is proven, never inferred: we read the regions where every signature
blkid knows lives (the first and last MiB) ourselves, and only all zeros there is
blank. Anything else is shown to ``blkid`` (which exits 2 both when it found
nothing and when it could not read the device, so it never decides "blank"). A
read error is an error; data that no probe recognises is :data:`UNRECOGNISED`,
which is never formatted either.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from rbdplugin.errors import DeadlineExceeded, InvalidArgument, ProcessError, VolumeBusy
from rbdplugin.host import HostPaths, mount_points_of, mounts
from rbdplugin.process import Command, Completed, Runner

# What blkid may report that we mount, and as which filesystem type.
MOUNTABLE = {"ext4": "ext4", "ext3": "ext4", "ext2": "ext4", "xfs": "xfs"}
# Fast flags: only for images we created and found blank (FACTS §5): little I/O, no discard.
# -G 1024 packs the metadata of 1024 block groups together (default 16): mke2fs then writes
# a few large runs instead of thousands of small ones, and a fresh 1 TiB volume formats in
# ~0.1 s instead of ~0.45 s over the FUSE export (10 GiB: no change, ~35 ms).
FAST_MKFS = {
    "ext4": ("-m0", "-G", "1024", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"),
    "xfs": ("-K",),
}
FORCE_MKFS = {"ext4": "-F", "xfs": "-f"}
BLKID_NOTHING_FOUND = 2
# Every signature blkid knows sits in the first or the last MiB (GPT backup, md 0.90/1.0
# superblocks and ZFS labels at the end; the rest at the start).
SIGNATURE_REGION = 1024 * 1024
UNRECOGNISED = "unrecognised data"
# e2fsck's exit codes for "clean" and "errors corrected" (its safe, preening fixes).
E2FSCK_CLEAN = (0, 1)
XFS_DIRTY_LOG = 2  # xfs_repair -n: the log must be replayed (mounted) first

log = logging.getLogger(__name__)


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
        """The device's signature, or None when it is proven blank.

        The signature regions are read first: a fresh volume is all zeros there, and
        then no signature can exist and blkid has nothing to find (a fresh Mount saves
        its run). Only a device with data there is shown to blkid.
        """
        if await self._reads_blank(device):
            return None
        argv = ["blkid", "--probe", "--output", "export", device]
        done = await self.runner(Command(argv, timeout=self.timeout, check=False))
        if done.returncode == BLKID_NOTHING_FOUND:
            return Signature({"TYPE": UNRECOGNISED})  # data, but nothing blkid knows
        if done.returncode != 0:
            raise ProcessError(f"blkid could not probe {device}: {done.output}", output=done.output)
        fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        fields.pop("DEVNAME", None)
        return Signature(fields)

    async def _reads_blank(self, device: str) -> bool:
        """Whether the first and the last MiB read as zeros.

        Read here rather than by a tool: two cmp runs cost a fresh Mount ~10 ms of its
        ~100. A read that outlives the deadline is left to its thread, which ends with
        an I/O error once the roll-back takes the mapping down.
        """
        size = self.device_size(device)
        head = min(SIGNATURE_REGION, size)
        tail_start = max(size - SIGNATURE_REGION, head)
        regions = [(start, length) for start, length in ((0, head), (tail_start, size - tail_start))
                   if length]  # fmt: skip
        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.to_thread(_reads_zeros, device, regions)
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"reading {device} to prove it blank did not finish within {self.timeout:.0f} s"
            ) from exc
        except OSError as exc:
            raise ProcessError(
                f"cannot read {device} to prove it blank, so it is not formatted: {exc}"
            ) from exc

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

    @asynccontextmanager
    async def frozen(self, target: Path, limit: float) -> AsyncIterator[None]:
        """``target``'s filesystem frozen for the block: dirty data written out and new
        writes held, so a snapshot taken meanwhile is consistent. Thawed after it in
        every case, also when freezing itself ran out of time (the kernel may have
        frozen it all the same) or the block did; the block gets ``limit`` seconds."""
        try:
            await self.runner(Command(["fsfreeze", "--freeze", str(target)], timeout=limit))
            async with asyncio.timeout(limit):
                yield
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"{target} stayed frozen longer than {limit:g} s (Ceph slow or away); "
                "it was thawed, and writes go on"
            ) from exc
        finally:
            await self._thaw(target)

    async def _thaw(self, target: Path) -> None:
        done = await self.runner(
            Command(["fsfreeze", "--unfreeze", str(target)], timeout=self.timeout, check=False)
        )
        # EINVAL: it was not frozen (the freeze itself failed); nothing to undo.
        if done.returncode != 0 and "invalid argument" not in done.output.lower():
            log.error("could not thaw %s (writes there wait): %s; run fsfreeze --unfreeze %s",
                      target, done.output, target)  # fmt: skip

    async def renew_uuid(self, device: str, fstype: str, scratch: Path) -> None:
        """Give the unmounted filesystem on ``device`` a new random UUID.

        A clone carries its origin's UUID, and XFS refuses to mount a second filesystem
        with a UUID already mounted. The tools refuse a filesystem whose journal needs
        replaying (a snapshot of a mounted one): ext4's is replayed by a preening
        e2fsck (also required before tune2fs rewrites metadata checksums), XFS's by a
        mount with nouuid at ``scratch`` and an unmount.
        """
        if fstype == "xfs":
            await self._replay_xfs_log(device, scratch)
            argv = ["xfs_admin", "-U", "generate", device]
        else:
            done = await self.runner(
                Command(["e2fsck", "-f", "-p", device], timeout=self.timeout, check=False)
            )
            if done.returncode not in E2FSCK_CLEAN:
                raise ProcessError(
                    f"e2fsck -f -p {device} found problems it does not fix by itself "
                    f"(exit {done.returncode}); nothing was changed beyond its safe fixes. "
                    f"Check it by hand: e2fsck -f {device}. {done.output}",
                    output=done.output,
                )
            argv = ["tune2fs", "-U", "random", device]
        await self.runner(Command(argv, timeout=self.timeout))

    async def _replay_xfs_log(self, device: str, scratch: Path) -> None:
        # nouuid: the origin of a clone may be mounted with the same UUID.
        scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.runner(Command(["mount", "-t", "xfs", "-o", "nouuid,nosuid,nodev,noexec",
                                   device, str(scratch)], timeout=self.timeout))  # fmt: skip
        await self.unmount(scratch)
        scratch.rmdir()

    async def check(self, device: str, fstype: str, scratch: Path) -> str | None:
        """fsck=auto: check the unmounted filesystem on ``device`` if it was not cleanly
        unmounted; what was found (None: it was clean). Only the tools' safe modes run
        (e2fsck -p, xfs_repair -n); problems they leave raise :class:`FsckProblems`.

        ext4 says in its superblock whether it was cleanly unmounted (its state and the
        needs_recovery feature, read with dumpe2fs -h). XFS keeps no such flag: its
        read-only check runs every time, after a dirty log (xfs_repair -n exits 2 on
        one) was replayed by a private mount."""
        limit = self.timeout / 2  # within the Mount's own deadline, with room to mount
        if fstype == "xfs":
            done = await self._xfs_repair_n(device, limit)
            if done.returncode == XFS_DIRTY_LOG:
                await self._replay_xfs_log(device, scratch)
                done = await self._xfs_repair_n(device, limit)
                found = "log replayed, then xfs_repair -n found no problem"
            else:
                found = "xfs_repair -n found no problem"
            if done.returncode != 0:
                raise FsckProblems(_problems(device, "xfs_repair -n", done.returncode,
                                             done.output, "xfs_repair"))  # fmt: skip
            return found
        header = await self.runner(
            Command(["dumpe2fs", "-h", device], timeout=self.timeout, check=False)
        )
        fields = dict(line.split(":", 1) for line in header.stdout.splitlines() if ":" in line)
        state = fields.get("Filesystem state", "").strip()
        if state == "clean" and "needs_recovery" not in fields.get("Filesystem features", ""):
            return None
        done = await self.runner(Command(["e2fsck", "-p", device], timeout=limit, check=False))
        if done.returncode not in E2FSCK_CLEAN:
            raise FsckProblems(_problems(device, "e2fsck -p", done.returncode, done.output,
                                         "e2fsck -f"))  # fmt: skip
        what = _last_line(done.output) or "clean"
        return f"was {state or 'not clean'}; e2fsck -p (exit {done.returncode}): {what}"

    async def _xfs_repair_n(self, device: str, limit: float) -> Completed:
        return await self.runner(Command(["xfs_repair", "-n", device], timeout=limit, check=False))

    def mounted_from(self, target: Path) -> str | None:
        """The source device mounted at ``target``, if it is a mount point."""
        entry = mounts(self.host).get(str(target))
        return entry[0] if entry else None

    def mount_points_of(self, device: str) -> list[str]:
        return mount_points_of(self.host, device)

    async def room_to_grow(self, device: str, fstype: str) -> bool:
        """Whether the filesystem on ``device`` is smaller than the device by more than
        its own rounding (a volume grown while unmounted, or online where the kernel
        refused); read from its superblock, without a tool."""
        try:
            async with asyncio.timeout(self.timeout):
                head = await asyncio.to_thread(_read_head, device)
        except (TimeoutError, OSError):
            return False  # never a reason to fail a Mount: it mounts at its present size
        slack = _slack(head, fstype)
        return slack is not None and self.device_size(device) - slack[0] >= slack[1]

    async def grow(self, device: str, fstype: str, target: Path | None) -> None:
        """Grow the filesystem to fill ``device``: mounted at ``target`` (online), or
        unmounted (``target`` None; ext4 only: xfs grows mounted only)."""
        if fstype == "xfs":
            if target is None:
                raise ValueError("xfs grows only while mounted")
            argv = ["xfs_growfs", str(target)]
        elif target is None:
            # Offline resize2fs insists on a freshly checked filesystem. e2fsck exits 1
            # when it corrected something, which -p does only where that is safe.
            check = ["e2fsck", "-f", "-p", device]
            done = await self.runner(Command(check, timeout=self.timeout, check=False))
            if done.returncode not in (0, 1):
                raise ProcessError(
                    f"e2fsck -f -p {device} exited {done.returncode}: {done.output}",
                    output=done.output,
                )
            argv = ["resize2fs", device]
        else:
            argv = ["resize2fs", device]
        await self.runner(Command(argv, timeout=self.timeout))

    def usage(self, target: Path) -> Usage:
        st = os.statvfs(target)
        size = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return Usage(size=size, used=size - st.f_bfree * st.f_frsize, free=free)


def _reads_zeros(device: str, regions: list[tuple[int, int]]) -> bool:
    """Whether every byte of ``regions`` (start, length) of ``device`` is zero."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, length in regions:
            data = os.pread(fd, length, start)
            if len(data) != length:  # shorter than sysfs says: never a verdict
                raise OSError(errno.EIO, f"read {len(data)} of {length} bytes at offset {start}")
            if data.count(0) != length:
                return False
    finally:
        os.close(fd)
    return True


class FsckProblems(InvalidArgument):
    """A check found what its safe mode does not repair: nothing is mounted."""


def _problems(device: str, tool: str, code: int, output: str, by_hand: str) -> str:
    return (
        f"{tool} {device} found problems it does not repair by itself (exit {code}); the "
        f"volume is not mounted. Repairing is an operator's explicit decision: map the image "
        f"and run {by_hand} on it. {tool} said: {_last_line(output)}"
    )


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _read_head(device: str) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


def _slack(head: bytes, fstype: str) -> tuple[int, int] | None:
    """The filesystem's size in bytes by its superblock, and how much larger its device
    must be before growing it adds anything (mkfs and the growers drop a last block
    group or allocation group too small to hold its own metadata); None if unreadable."""
    if fstype == "xfs":
        if head[:4] != b"XFSB":
            return None
        block_size, blocks = struct.unpack_from(">IQ", head, 4)
        return block_size * blocks, 16 * 1024 * 1024  # XFS_MIN_AG_BYTES
    sb = head[1024:2048]
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return None
    blocks_lo, _, _, _, _, log_block = struct.unpack_from("<IIIIII", sb, 0x4)
    block_size = 1024 << log_block
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & 0x80 else 0
    inodes_per_group = struct.unpack_from("<I", sb, 0x28)[0]
    inode_size = struct.unpack_from("<H", sb, 0x58)[0] or 128
    reserved_gdt = struct.unpack_from("<H", sb, 0xCE)[0]
    # mke2fs and resize2fs: a last group of fewer than overhead + 50 blocks is dropped.
    overhead = 3 + inodes_per_group * inode_size // block_size + reserved_gdt + 50
    return ((blocks_hi << 32) | blocks_lo) * block_size, overhead * block_size
