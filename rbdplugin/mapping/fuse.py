"""Images as block devices without krbd or nbd: a FUSE export plus a loop device.

qemu-storage-daemon opens the image with librbd as the tenant's cephx user and
exports it as a regular file over FUSE; ``losetup`` turns that file into a block
device. One export process per mapped image, started in its own session so that
it (and the container's data path) outlives a daemon restart; a restarted daemon
finds it again by its export path. The key never appears on a command line:
librbd reads the tenant's keyring named in ``CEPH_KEYRING``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from rbdplugin.crashpoints import crash_point
from rbdplugin.errors import (
    CephUnavailable,
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
    ProcessError,
)
from rbdplugin.mapping import HostPaths, ImageRef, MappedDevice, await_device_size
from rbdplugin.mapping.scan import cmdline, loop_backing_files, mounts, processes, read
from rbdplugin.process import (
    KILL_WAIT,
    Command,
    Runner,
    pid_ended,
    reap_spawned,
    spawn_async,
    stop_pid_async,
)

log = logging.getLogger(__name__)
PROGRAM = "qemu-storage-daemon"
POLL = 0.005  # loop detach: usually tens of ms
# Export readiness, every Mount waits for it (~40 ms): a look at the mount table is
# one poll(2) until it changes (see rbdplugin.host), so the wait can look often.
EXPORT_POLL = 0.001


# sysfs shows a loop device's backing file with this suffix once the file is unlinked.
DELETED = " (deleted)"


def _qemu_escape(value: str) -> str:
    return value.replace(",", ",,")  # QEMU option syntax: a literal comma is doubled


def _qemu_options(arg: str) -> list[str]:
    """The key=value items of one QEMU option string, commas still escaped as ",,"."""
    marker = "\0"  # cannot occur in a command-line argument
    return [item.replace(marker, ",,") for item in arg.replace(",,", marker).split(",")]


class FuseMapper:
    name = "fuse"
    # qemu's librbd takes the exclusive lock at the first write, not at open or reads
    # (losetup, blkid): measured with `rbd lock ls` on an export of an image.
    locks_image = False

    def __init__(self, runner: Runner, host: HostPaths, exports: Path, timeout: float) -> None:
        self.runner = runner
        self.host = host
        self.exports = exports
        self.timeout = timeout

    def export_path(self, image: ImageRef) -> Path:
        # "-" cannot be a namespace name (those start with a letter or digit).
        return self.exports / image.pool / (image.namespace or "-") / image.image

    def export_command(self, image: ImageRef, export: Path, read_only: bool = False) -> list[str]:
        blockdev = [
            "driver=rbd", "node-name=n0", f"pool={image.pool}", f"image={image.image}",
            f"conf={_qemu_escape(str(image.conf))}", f"user={image.user}",
            "cache.direct=on", "discard=unmap",
        ]  # fmt: skip
        if image.namespace:
            blockdev.insert(3, f"namespace={image.namespace}")
        if read_only:
            blockdev.append("read-only=on")
        writable = "off" if read_only else "on"
        target = _qemu_escape(str(export))
        return [
            PROGRAM,
            "--blockdev", ",".join(blockdev),
            "--export", f"type=fuse,id=e0,node-name=n0,mountpoint={target},writable={writable}",
        ]  # fmt: skip

    async def map(self, image: ImageRef, read_only: bool = False) -> MappedDevice:
        export = self.export_path(image)
        export.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        export.touch(mode=0o600, exist_ok=True)
        logfile = export.with_name(export.name + ".log")
        logfile.unlink(missing_ok=True)
        env = {**os.environ, "CEPH_KEYRING": str(image.keyring)}
        pid = await spawn_async(self.export_command(image, export, read_only), logfile, env=env)
        mapped = MappedDevice(self.name, image.spec, "", {"pid": pid, "export": str(export)})
        try:
            await self._wait_exported(image, export, pid, logfile)
            crash_point("map.after-export")
            argv = [
                "losetup",
                "--find",
                "--show",
                *(["--read-only"] if read_only else []),
                str(export),
            ]
            done = await self.runner(Command(argv, timeout=self.timeout))
            crash_point("map.after-loop")
        except BaseException:
            await asyncio.shield(self.unmap(mapped))
            raise
        return replace(mapped, device=done.stdout.strip())

    async def _wait_exported(self, image: ImageRef, export: Path, pid: int, logfile: Path) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            entry = mounts(self.host).get(str(export))
            if entry is not None and entry[1].startswith("fuse"):
                return
            # Asked every millisecond by every Mount under way: a waitpid(), not a read
            # of /proc (100 µs each, on the event loop).
            if pid_ended(pid):
                raise _export_error(image, logfile.read_text(errors="replace"))
            await asyncio.sleep(EXPORT_POLL)
        raise DeadlineExceeded(
            f"the FUSE export of {image.spec} was not ready within {self.timeout:.0f} s"
        )

    def _export_pids(self, export: str) -> list[int]:
        """The export processes serving exactly ``export`` (never ``export`` + a suffix)."""
        wanted = f"mountpoint={_qemu_escape(export)}"
        return processes(self.host, PROGRAM, lambda arg: wanted in _qemu_options(arg))

    def _loops_of(self, export: str) -> list[str]:
        return [
            dev
            for dev, backing in loop_backing_files(self.host).items()
            if backing.removesuffix(DELETED) == export
        ]

    def _recorded_loop(self, mapped: MappedDevice, export: str) -> list[str]:
        """The recorded loop device, if it still shows ``export``: every Unmount would
        otherwise read the backing file of every loop device on the host (hundreds).
        A mapping has one loop device; only one cut short before it was recorded (its
        device is "") or already detached by an earlier try is looked for by a scan."""
        name = mapped.device.removeprefix("/dev/")
        backing = read(self.host.sys / "block" / name / "loop" / "backing_file") if name else ""
        return [mapped.device] if backing.removesuffix(DELETED) == export else []

    async def find(self, image: ImageRef) -> MappedDevice | None:
        export = self.export_path(image)
        if not os.path.lexists(export):
            # An export process serves a FUSE mount on the export file, and a loop device
            # is attached to that file; unmap() removes the file last. No file: nothing
            # to find, without reading every process and loop device (every fresh Mount
            # asks, and a host may have hundreds of loop devices).
            return None
        loops = self._loops_of(str(export))
        pids = self._export_pids(str(export))
        exported = str(export) in mounts(self.host)
        if not (pids or loops or exported):
            return None
        whole = bool(pids and loops and exported) and len(loops) == 1
        details: dict[str, str | int] = {"pid": pids[0] if pids else 0, "export": str(export)}
        return MappedDevice(self.name, image.spec, loops[0] if whole else "", details)

    async def broken(self, mapped: MappedDevice) -> str | None:
        # Asked for every mounted volume at start-up and every few seconds: it reads the
        # recorded process and loop device only, not every process and loop device.
        export = str(mapped.details.get("export", ""))
        if not self._serves(mapped.details.get("pid"), export) and not self._export_pids(export):
            return f"its export process ({PROGRAM} for {export}) is gone"
        if export not in mounts(self.host):
            return f"its FUSE export {export} is no longer mounted"
        name = mapped.device.removeprefix("/dev/")
        backing = read(self.host.sys / "block" / name / "loop" / "backing_file")
        if not name or backing.removesuffix(DELETED) != export:
            return f"{mapped.device} is no longer attached to its export {export}"
        return None

    def _serves(self, pid: object, export: str) -> bool:
        """Whether process ``pid`` is the export process of ``export``."""
        if not isinstance(pid, int) or pid <= 0:
            return False
        argv = cmdline(self.host, pid)
        wanted = f"mountpoint={_qemu_escape(export)}"
        return (
            bool(argv)
            and Path(argv[0]).name == PROGRAM
            and any(wanted in _qemu_options(arg) for arg in argv[1:])
        )

    async def grow(self, mapped: MappedDevice, size: int) -> None:
        # qemu-storage-daemon keeps the image size it read at start: a resize by another
        # librbd client does not reach its export. Truncating the export file to the new
        # size is its block_resize (librbd's resize to the size the image already has is
        # a no-op), after which the file shows the new size; the loop device then re-reads
        # its backing file's size on LOOP_SET_CAPACITY.
        export = str(mapped.details.get("export", ""))
        if not export or not mapped.device:
            raise ProcessError(f"the mapping of {mapped.image} is incomplete; cannot grow it")
        # ">": at least this size, never smaller (a process: a stuck export is killed).
        argv = ["truncate", "--no-create", f"--size=>{size}", export]
        await self.runner(Command(argv, timeout=self.timeout))
        await self.runner(
            Command(["losetup", "--set-capacity", mapped.device], timeout=self.timeout)
        )
        await await_device_size(self.host, mapped.device, size, self.timeout)

    async def unmap(self, mapped: MappedDevice) -> None:
        export = str(mapped.details.get("export", ""))
        if not export:
            return
        for device in self._recorded_loop(mapped, export) or self._loops_of(export):
            await self._detach(device, export)
        crash_point("unmap.after-loop-detach")
        recorded = self._recorded_export(mapped, export)
        await self._stop_exports(mapped, recorded or self._export_pids(export))
        if recorded and export in mounts(self.host):
            # Still served after its recorded process ended: another one serves it too.
            await self._stop_exports(mapped, self._export_pids(export))
        crash_point("unmap.after-export-stop")
        # An export that exited on its own (its zombie has no command line, so the
        # search above cannot name it) is reaped now, not at the next 5 s sweep.
        reap_spawned()
        if export in mounts(self.host):
            # The export's server is gone; only a dead FUSE mount is left to drop.
            await self.runner(Command(["umount", "--lazy", export], timeout=self.timeout))
        for path in (Path(export), Path(export + ".log")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _recorded_export(self, mapped: MappedDevice, export: str) -> list[int]:
        """The recorded export process, if it still serves ``export``: every Unmount
        would otherwise read the command line of every process on the host, on the event
        loop. A mapping recorded without one (cut short by a crash) is looked for by a scan."""
        pid = mapped.details.get("pid")
        return [pid] if isinstance(pid, int) and self._serves(pid, export) else []

    async def _stop_exports(self, mapped: MappedDevice, pids: list[int]) -> None:
        for pid in pids:
            if not await stop_pid_async(pid, timeout=self.timeout / 2):
                raise DeadlineExceeded(
                    f"the export process {pid} of {mapped.image} did not stop within "
                    f"{self.timeout / 2 + KILL_WAIT:.0f} s of SIGTERM and SIGKILL"
                )

    async def _detach(self, device: str, export: str) -> None:
        done = await self.runner(
            Command(["losetup", "--detach", device], timeout=self.timeout, check=False)
        )
        if done.returncode != 0 and "No such device" not in done.output:
            raise ProcessError(
                f"losetup --detach {device} failed: {done.output}", output=done.output
            )
        # Detach completes asynchronously; the export cannot be stopped while the loop
        # holds it. Done once the device no longer shows this export: a Mount running
        # beside may take the freed number for its own export at once, and would hold it
        # for as long as it stays mounted.
        backing = self.host.sys / "block" / device.removeprefix("/dev/") / "loop" / "backing_file"
        deadline = time.monotonic() + self.timeout
        while read(backing).removesuffix(DELETED) == export:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"{device} was still attached {self.timeout:.0f} s after losetup --detach"
                )
            await asyncio.sleep(POLL)


def _export_error(image: ImageRef, output: str) -> Exception:
    tail = " ".join(line.strip() for line in output.splitlines()[-3:] if line.strip())
    lowered = output.lower()
    if "permission denied" in lowered or "operation not permitted" in lowered:
        return PermissionDenied(
            f"cannot open {image.spec} as client.{image.user}: permission denied by Ceph ({tail})"
        )
    if "no such file or directory" in lowered and "error opening image" in lowered:
        return NotFound(f"cannot open {image.spec}: the image does not exist")
    if "timed out" in lowered or "error connecting" in lowered:
        return CephUnavailable(f"cannot open {image.spec}: Ceph did not answer ({tail})")
    return ProcessError(
        f"the FUSE export of {image.spec} failed to start: {tail or 'no output'}", output=output
    )
