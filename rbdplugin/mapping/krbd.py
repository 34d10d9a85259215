"""The kernel RBD client: ``rbd device map``, devices found under /sys/bus/rbd."""

from __future__ import annotations

from rbdplugin.mapping import ImageRef, MappedDevice
from rbdplugin.mapping.rbdcli import RbdDeviceMapper
from rbdplugin.mapping.scan import read

# Kernel map options we always pass: noudev because a stuck udev must not hang a
# Mount (the /dev/rbdN node comes from devtmpfs anyway).
MAP_OPTIONS = ("noudev",)


class KrbdMapper(RbdDeviceMapper):
    name = "krbd"

    def map_command(self, image: ImageRef, read_only: bool = False) -> list[str]:
        argv = ["rbd", "device", "map", "--id", image.user, "--keyring", str(image.keyring),
                "--conf", str(image.conf), "--pool", image.pool]  # fmt: skip
        if image.namespace:
            argv += ["--namespace", image.namespace]
        argv += ["--image", image.image, "--options", ",".join(MAP_OPTIONS)]
        if read_only:
            argv.append("--read-only")
        return argv

    def unmap_command(self, mapped: MappedDevice) -> list[str]:
        return ["rbd", "device", "unmap", mapped.device]

    def still_mapped(self, mapped: MappedDevice) -> bool:
        return (self.host.sys / "bus" / "rbd" / "devices" / str(mapped.details.get("id"))).exists()

    async def find(self, image: ImageRef) -> MappedDevice | None:
        devices = self.host.sys / "bus" / "rbd" / "devices"
        if not devices.is_dir():
            return None
        for entry in sorted(
            devices.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1
        ):
            if (
                read(entry / "pool") == image.pool
                and read(entry / "pool_ns") == image.namespace
                and read(entry / "name") == image.image
                and read(entry / "current_snap") in ("-", "")
            ):
                details: dict[str, str | int] = {"id": int(entry.name)}
                return MappedDevice(self.name, image.spec, f"/dev/rbd{entry.name}", details)
        return None
