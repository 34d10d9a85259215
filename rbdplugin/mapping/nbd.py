"""rbd-nbd: ``rbd device map -t nbd``; devices found through /sys/block/nbdN/pid."""

from __future__ import annotations

from rbdplugin.errors import ProcessError, VolumeBusy
from rbdplugin.mapping import HostPaths, ImageRef, MappedDevice, MapperUnavailable
from rbdplugin.mapping.krbd import translate_map_error
from rbdplugin.mapping.scan import cmdline, read
from rbdplugin.process import Command, Runner


class NbdMapper:
    name = "nbd"

    def __init__(self, runner: Runner, host: HostPaths, timeout: float) -> None:
        self.runner = runner
        self.host = host
        self.timeout = timeout

    def map_command(self, image: ImageRef, read_only: bool = False) -> list[str]:
        argv = ["rbd", "device", "map", "--device-type", "nbd", "--id", image.user,
                "--keyring", str(image.keyring), "--conf", str(image.conf), image.spec]  # fmt: skip
        if read_only:
            argv.append("--read-only")
        return argv

    async def map(self, image: ImageRef, read_only: bool = False) -> MappedDevice:
        try:
            await self.runner(Command(self.map_command(image, read_only), timeout=self.timeout))
        except ProcessError as exc:
            if "failed to find unused device" in exc.output or "(22)" in exc.output:
                raise MapperUnavailable(
                    f"cannot map {image.spec} with rbd-nbd: no free nbd device (is the nbd module "
                    "loaded with enough devices? modprobe nbd nbds_max=64)"
                ) from exc
            raise translate_map_error(image, exc.output) from exc
        found = await self.find(image)
        if found is None:
            raise ProcessError(f"rbd-nbd mapped {image.spec} but no nbd device shows it")
        return found

    async def find(self, image: ImageRef) -> MappedDevice | None:
        for entry in sorted((self.host.sys / "block").glob("nbd*")):
            pid = read(entry / "pid")
            if not pid.isdigit():
                continue
            argv = cmdline(self.host, int(pid))
            if argv and image.spec in argv:
                return MappedDevice(self.name, image.spec, f"/dev/{entry.name}", {"pid": int(pid)})
        return None

    async def unmap(self, mapped: MappedDevice) -> None:
        if not mapped.device or not read(
            self.host.sys / "block" / mapped.device.removeprefix("/dev/") / "pid"
        ):
            return
        try:
            await self.runner(
                Command(
                    ["rbd", "device", "unmap", "--device-type", "nbd", mapped.device],
                    timeout=self.timeout,
                )
            )
        except ProcessError as exc:
            if "busy" in exc.output.lower():
                raise VolumeBusy(
                    f"cannot unmap {mapped.device} ({mapped.image}): still in use"
                ) from exc
            raise
