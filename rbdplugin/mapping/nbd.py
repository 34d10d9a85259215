"""rbd-nbd: ``rbd device map -t nbd``; devices found through /sys/block/nbdN/pid.

rbd-nbd prints its device and exits (its daemon goes on) *before* that daemon has
started serving the device (the kernel's NBD_DO_IT, which writes the device's pid file).
Usually the daemon is there by the time we look; under load it may not be yet. And the
kernel can let it set up a device that a mapping whose rbd-nbd died still holds open
(mounted): its check is that the same task set the device up, compared by a task
pointer the dead rbd-nbd left behind, which a new task may be given again. The daemon
then finds the device taken (the dead mapping's pid) and exits, having printed it. So
the device counts as ours only once its pid file names a live rbd-nbd serving the image,
and when our daemon is gone without that, the map is run again: the kernel then skips
the held device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from rbdplugin.errors import ProcessError, VolumeBusy
from rbdplugin.mapping import ImageRef, MappedDevice, MapperUnavailable
from rbdplugin.mapping.rbdcli import (
    Diagnosis,
    RbdDeviceMapper,
    printed_devices,
    translate_map_error,
)
from rbdplugin.mapping.scan import cmdline, processes, read

log = logging.getLogger(__name__)

PROGRAM = "rbd-nbd"
MAP_ATTEMPTS = 3  # a held device is skipped the next time; three runs leave no doubt
POLL = 0.05  # seconds between looks at a starting rbd-nbd


class NbdMapper(RbdDeviceMapper):
    name = "nbd"

    def map_command(self, image: ImageRef, read_only: bool = False) -> list[str]:
        argv = ["rbd", "device", "map", "--device-type", "nbd", "--id", image.user,
                "--keyring", str(image.keyring), "--conf", str(image.conf), image.spec]  # fmt: skip
        if read_only:
            argv.append("--read-only")
        elif image.exclusive_lock:  # rbd-nbd holds the lock: no other client may write
            argv.append("--exclusive")
        return argv

    def unmap_command(self, mapped: MappedDevice) -> list[str]:
        return ["rbd", "device", "unmap", "--device-type", "nbd", mapped.device]

    def map_error(self, image: ImageRef, read_only: bool, output: str) -> Exception:
        if "failed to acquire exclusive lock" in output:
            if "(22)" in output:
                return MapperUnavailable(
                    f"cannot map {image.spec} exclusively: the image lacks the exclusive-lock "
                    f"feature (rbd feature enable {image.spec} exclusive-lock)"
                )
            return VolumeBusy(
                f"cannot map {image.spec}: another client holds its exclusive lock "
                f"(see rbd status {image.spec})"
            )
        if "failed to find unused device" in output or "(22)" in output:
            return MapperUnavailable(
                f"cannot map {image.spec} with rbd-nbd: no free nbd device (is the nbd module "
                "loaded with enough devices? modprobe nbd nbds_max=64)"
            )
        return translate_map_error(image, output)

    def diagnose(self, mapped: MappedDevice) -> Diagnosis | None:
        pid = read(self.host.sys / "block" / mapped.device.removeprefix("/dev/") / "pid")
        if not pid.isdigit():
            return Diagnosis(
                f"{mapped.device} is no longer connected to rbd-nbd "
                "(rbd-nbd exited or the device was unmapped)",
                gone=True,
            )
        argv = cmdline(self.host, int(pid))
        if not _is_rbd_nbd(argv):
            return Diagnosis(
                f"the rbd-nbd process behind {mapped.device} (pid {pid}) is not running"
            )
        if not _serves(argv, mapped.image):
            return Diagnosis(
                f"{mapped.device} now serves {_served(argv)} (rbd-nbd pid {pid}), "
                f"not {mapped.image}"
            )
        return None

    async def map_and_find(self, image: ImageRef, read_only: bool, deadline: float) -> MappedDevice:
        attempt = 1
        while True:
            held = self._pid_files()
            done = await self.run_map(image, read_only, deadline)
            printed = printed_devices(done.stdout)
            if not printed:
                raise ProcessError(f"rbd-nbd mapped {image.spec} but printed no device",
                                   output=done.stdout + done.stderr)  # fmt: skip
            device = printed[-1]
            holder = held.get(device, "")
            found = await self._await_server(image, device, holder, deadline)
            if found is not None:
                return found
            if not holder or attempt == MAP_ATTEMPTS:
                raise ProcessError(self._not_served(image, device, holder, attempt))
            log.warning("image %s: rbd-nbd chose %s, which a mapping whose rbd-nbd "
                        "(pid %s) is gone still holds open, and could not serve it there; "
                        "mapping again (attempt %d of %d)",
                        image.spec, device, holder, attempt + 1, MAP_ATTEMPTS)  # fmt: skip
            attempt += 1

    async def _await_server(
        self, image: ImageRef, device: str, held_by: str, deadline: float
    ) -> MappedDevice | None:
        """The mapping once ``device``'s pid file names a new rbd-nbd serving ``image``;
        None when no rbd-nbd of ``image`` is left starting (it gave up) or time is up."""
        pid_file = self.host.sys / "block" / device.removeprefix("/dev/") / "pid"
        while True:
            pid = read(pid_file)
            if pid != held_by and self._serves_image(pid, image):
                return MappedDevice(self.name, image.spec, device, {"pid": int(pid)})
            if not self._starting(image) or time.monotonic() >= deadline:
                return None
            await asyncio.sleep(POLL)

    def _pid_files(self) -> dict[str, str]:
        """/dev/nbdN -> its pid file's text, for every nbd device that has one."""
        found = {}
        for entry in sorted((self.host.sys / "block").glob("nbd*")):
            pid = read(entry / "pid")
            if pid:
                found[f"/dev/{entry.name}"] = pid
        return found

    def _starting(self, image: ImageRef) -> list[int]:
        """rbd-nbd daemons of ``image`` that serve no device (yet)."""
        serving = set(self._pid_files().values())
        return [
            pid
            for pid in processes(self.host, PROGRAM, lambda arg: arg == image.spec)
            if str(pid) not in serving and self._serves_image(str(pid), image)
        ]

    def _serves_image(self, pid: str, image: ImageRef) -> bool:
        """``pid`` (a pid file's text) is a live rbd-nbd serving ``image``."""
        if not pid.isdigit():
            return False
        argv = cmdline(self.host, int(pid))
        return _is_rbd_nbd(argv) and _serves(argv, image.spec)

    def _not_served(self, image: ImageRef, device: str, holder: str, attempts: int) -> str:
        where = f"rbd-nbd mapped {image.spec} at {device}, but no rbd-nbd serves it there"
        if not holder:
            return f"{where} (its daemon exited, or was not serving it in time; see its log)"
        return (
            f"{where} after {attempts} attempt(s): {device} is still held open by a mapping "
            f"whose rbd-nbd (pid {holder}) is gone; unmount what uses it (findmnt {device}) "
            f"and unmap it (rbd device unmap -t nbd {device})"
        )

    async def find_all(self, image: ImageRef) -> list[MappedDevice]:
        return [
            MappedDevice(self.name, image.spec, device, {"pid": int(pid)})
            for device, pid in self._pid_files().items()
            if self._serves_image(pid, image)
        ]


def _is_rbd_nbd(argv: list[str]) -> bool:
    # An empty argv is a process gone (or a zombie); another program means a reused pid.
    return bool(argv) and Path(argv[0]).name == PROGRAM


def _serves(argv: list[str], spec: str) -> bool:
    """``argv`` (of rbd-nbd) serves exactly image ``spec``: the spec as a whole argument
    (``map <spec>`` or ``attach ... <spec>``), and not a snapshot of it (``--snap-id``)."""
    arguments = argv[1:]
    by_snap_id = any(a == "--snap-id" or a.startswith("--snap-id=") for a in arguments)
    return spec in arguments and not by_snap_id


def _served(argv: list[str]) -> str:
    """What an rbd-nbd command line serves, for messages: the first image spec after
    ``map``/``attach``, plus any --snap-id (never the whole line: it may carry a --key)."""
    arguments = argv[1:]
    verbs = [i for i, a in enumerate(arguments) if a in ("map", "attach")]
    after = arguments[verbs[0] + 1 :] if verbs else arguments
    specs = [a for a in after if "/" in a and not a.startswith(("-", "/", "."))]
    served = specs[0] if specs else "another image"
    for i, a in enumerate(arguments):
        if a.startswith("--snap-id="):
            return f"{served} {a}"
        if a == "--snap-id" and i + 1 < len(arguments):
            return f"{served} --snap-id {arguments[i + 1]}"
    return served
