"""rbd-nbd: ``rbd device map -t nbd``; devices found through /sys/block/nbdN/pid."""

from __future__ import annotations

from pathlib import Path

from rbdplugin.errors import VolumeBusy
from rbdplugin.mapping import ImageRef, MappedDevice, MapperUnavailable
from rbdplugin.mapping.rbdcli import Diagnosis, RbdDeviceMapper, translate_map_error
from rbdplugin.mapping.scan import cmdline, read

PROGRAM = "rbd-nbd"


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

    async def find_all(self, image: ImageRef) -> list[MappedDevice]:
        found = []
        for entry in sorted((self.host.sys / "block").glob("nbd*")):
            pid = read(entry / "pid")
            if not pid.isdigit():
                continue
            argv = cmdline(self.host, int(pid))
            if _is_rbd_nbd(argv) and _serves(argv, image.spec):
                found.append(
                    MappedDevice(self.name, image.spec, f"/dev/{entry.name}", {"pid": int(pid)})
                )
        return found


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
