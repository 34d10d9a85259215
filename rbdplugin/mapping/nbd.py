"""rbd-nbd: ``rbd device map -t nbd``; devices found through /sys/block/nbdN/pid."""

from __future__ import annotations

from rbdplugin.mapping import ImageRef, MappedDevice, MapperUnavailable
from rbdplugin.mapping.rbdcli import RbdDeviceMapper, translate_map_error
from rbdplugin.mapping.scan import cmdline, read


class NbdMapper(RbdDeviceMapper):
    name = "nbd"

    def map_command(self, image: ImageRef, read_only: bool = False) -> list[str]:
        argv = ["rbd", "device", "map", "--device-type", "nbd", "--id", image.user,
                "--keyring", str(image.keyring), "--conf", str(image.conf), image.spec]  # fmt: skip
        if read_only:
            argv.append("--read-only")
        return argv

    def unmap_command(self, mapped: MappedDevice) -> list[str]:
        return ["rbd", "device", "unmap", "--device-type", "nbd", mapped.device]

    def still_mapped(self, mapped: MappedDevice) -> bool:
        return bool(read(self.host.sys / "block" / mapped.device.removeprefix("/dev/") / "pid"))

    def map_error(self, image: ImageRef, output: str) -> Exception:
        if "failed to find unused device" in output or "(22)" in output:
            return MapperUnavailable(
                f"cannot map {image.spec} with rbd-nbd: no free nbd device (is the nbd module "
                "loaded with enough devices? modprobe nbd nbds_max=64)"
            )
        return translate_map_error(image, output)

    async def find(self, image: ImageRef) -> MappedDevice | None:
        for entry in sorted((self.host.sys / "block").glob("nbd*")):
            pid = read(entry / "pid")
            if not pid.isdigit():
                continue
            argv = cmdline(self.host, int(pid))
            if argv and image.spec in argv:
                return MappedDevice(self.name, image.spec, f"/dev/{entry.name}", {"pid": int(pid)})
        return None
