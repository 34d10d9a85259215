"""The kernel RBD client: ``rbd device map``, devices found under /sys/bus/rbd."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from rbdplugin.devices import Devices
from rbdplugin.errors import VolumeBusy
from rbdplugin.mapping import HostPaths, ImageRef, MappedDevice, MapperUnavailable
from rbdplugin.mapping.rbdcli import Diagnosis, RbdDeviceMapper, translate_map_error
from rbdplugin.mapping.scan import read
from rbdplugin.process import Runner

# Without a timeout the kernel retries an OSD request forever: with the cluster gone,
# every process touching the volume (umount and unmap too) hangs in D state until a
# reboot. 60 s rides out an ordinary OSD failover (osd_heartbeat_grace 20 s, then
# peering), so only a cluster that is really gone turns into I/O errors. 0 keeps the
# kernel's default, wait forever.
OSD_REQUEST_TIMEOUT = 60

_UNKNOWN_OPTION = re.compile(r"unknown map option '([^']*)'")


class KrbdMapper(RbdDeviceMapper):
    name = "krbd"

    def __init__(
        self,
        runner: Runner,
        host: HostPaths,
        timeout: float,
        osd_request_timeout: int = OSD_REQUEST_TIMEOUT,
        devices: Devices | None = None,
    ) -> None:
        super().__init__(runner, host, timeout, devices)
        if osd_request_timeout < 0:
            raise ValueError(f"osd_request_timeout must be 0 or more, not {osd_request_timeout}")
        self.osd_request_timeout = osd_request_timeout

    def map_options(self, image: ImageRef, read_only: bool) -> list[str]:
        # noudev: a stuck udev must not hang a Mount (devtmpfs makes /dev/rbdN anyway).
        options = ["noudev"]
        if self.osd_request_timeout:
            options.append(f"osd_request_timeout={self.osd_request_timeout}")
        if not read_only:
            # noshare: a Ceph client instance of its own, so fencing (blocklisting) this
            # writer never cuts the host's other volumes off.
            options.append("noshare")
            # exclusive: the kernel holds the lock and refuses any other writer; it
            # refuses the map itself on an image without the exclusive-lock feature.
            if image.exclusive_lock:
                options.append("exclusive")
        return options

    def map_command(self, image: ImageRef, read_only: bool = False) -> list[str]:
        argv = ["rbd", "device", "map", "--id", image.user, "--keyring", str(image.keyring),
                "--conf", str(image.conf), "--pool", image.pool]  # fmt: skip
        if image.namespace:
            argv += ["--namespace", image.namespace]
        argv += ["--image", image.image, "--options", ",".join(self.map_options(image, read_only))]
        if read_only:
            argv.append("--read-only")
        return argv

    def unmap_command(self, mapped: MappedDevice) -> list[str]:
        # noudev as for map: a stuck udev must not hang the unmap (a roll-back included).
        return ["rbd", "device", "unmap", "--options", "noudev", mapped.device]

    def map_error(self, image: ImageRef, read_only: bool, output: str) -> Exception:
        unknown = _UNKNOWN_OPTION.search(output)
        if unknown:
            return MapperUnavailable(
                f"cannot map {image.spec}: this rbd tool does not know the map option "
                f"'{unknown.group(1)}'; upgrade ceph-common on this host"
            )
        if "(22) Invalid argument" in output and "dmesg" in output:
            options = ",".join(self.map_options(image, read_only))
            return MapperUnavailable(
                f"the kernel refused to map {image.spec} with options {options}: either it does "
                "not know one of them (exclusive and osd_request_timeout need Linux 4.12 or "
                "later; upgrade the kernel), or the image lacks the exclusive-lock feature "
                f"(rbd feature enable {image.spec} exclusive-lock). `dmesg | tail` says which: "
                "'bad option' or 'exclusive-lock feature is not enabled'"
            )
        if "(30) Read-only file system" in output:
            # An exclusive map waits for the lock; an owner that holds it exclusively
            # itself refuses to hand it over, and the kernel fails the map with EROFS.
            return VolumeBusy(
                f"cannot map {image.spec}: another client holds the exclusive lock of "
                f"{image.spec} and will not release it (mapped exclusively elsewhere?); "
                f"see rbd status {image.spec}"
            )
        return translate_map_error(image, output)

    def diagnose(self, mapped: MappedDevice) -> Diagnosis | None:
        entry = self._sysfs_entry(mapped)
        now = _spec_of(entry) if entry else ""
        if not now:
            return Diagnosis(f"its device {mapped.device} is gone", gone=True)
        if now != mapped.image:
            return Diagnosis(f"{mapped.device} now maps {now}, not {mapped.image}")
        return None

    async def refresh(self, mapped: MappedDevice) -> None:
        # The kernel refreshes on the header's resize notification; writing its refresh
        # attribute makes it re-read the header now (and once more after a lost notify).
        entry = self._sysfs_entry(mapped)
        if entry is not None and self.diagnose(mapped) is None:
            await asyncio.to_thread((entry / "refresh").write_text, "1")

    def _sysfs_entry(self, mapped: MappedDevice) -> Path | None:
        number = str(mapped.details.get("id", mapped.device.removeprefix("/dev/rbd")))
        return self.host.sys / "bus" / "rbd" / "devices" / number if number.isdigit() else None

    async def find_all(self, image: ImageRef) -> list[MappedDevice]:
        devices = self.host.sys / "bus" / "rbd" / "devices"
        if not devices.is_dir():
            return []
        entries = sorted(devices.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
        return [
            MappedDevice(self.name, image.spec, f"/dev/rbd{entry.name}", {"id": int(entry.name)})
            for entry in entries
            if _spec_of(entry) == image.spec
        ]


def _spec_of(entry: Path) -> str:
    """What /sys/bus/rbd/devices/N maps, spelt as ImageRef.spec ("" if nothing).

    A snapshot mapping gets "@snap", so it never equals an image's spec. Kernels
    without namespace support have no pool_ns file: read as the default namespace.
    """
    pool, name = read(entry / "pool"), read(entry / "name")
    if not (pool and name):
        return ""
    namespace, snap = read(entry / "pool_ns"), read(entry / "current_snap")
    spec = f"{pool}/{namespace}/{name}" if namespace else f"{pool}/{name}"
    return spec if snap in ("-", "") else f"{spec}@{snap}"
