"""The kernel RBD client: ``rbd device map``, devices found under /sys/bus/rbd."""

from __future__ import annotations

import re

from rbdplugin.errors import CephUnavailable, PermissionDenied, ProcessError, VolumeBusy
from rbdplugin.mapping import HostPaths, ImageRef, MappedDevice, MapperUnavailable
from rbdplugin.mapping.scan import read
from rbdplugin.process import Command, Runner

# Kernel map options we always pass: noudev because a stuck udev must not hang a
# Mount (the /dev/rbdN node comes from devtmpfs anyway).
MAP_OPTIONS = ("noudev",)


class KrbdMapper:
    name = "krbd"

    def __init__(self, runner: Runner, host: HostPaths, timeout: float) -> None:
        self.runner = runner
        self.host = host
        self.timeout = timeout

    def map_command(self, image: ImageRef, read_only: bool = False) -> list[str]:
        argv = ["rbd", "device", "map", "--id", image.user, "--keyring", str(image.keyring),
                "--conf", str(image.conf), "--pool", image.pool]  # fmt: skip
        if image.namespace:
            argv += ["--namespace", image.namespace]
        argv += ["--image", image.image, "--options", ",".join(MAP_OPTIONS)]
        if read_only:
            argv.append("--read-only")
        return argv

    async def map(self, image: ImageRef, read_only: bool = False) -> MappedDevice:
        try:
            await self.runner(Command(self.map_command(image, read_only), timeout=self.timeout))
        except ProcessError as exc:
            raise translate_map_error(image, exc.output) from exc
        found = await self.find(image)
        if found is None:
            raise ProcessError(f"rbd device map of {image.spec} succeeded but no device appeared")
        return found

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
                return MappedDevice(
                    self.name, image.spec, f"/dev/rbd{entry.name}", {"id": int(entry.name)}
                )
        return None

    async def unmap(self, mapped: MappedDevice) -> None:
        if (
            not mapped.device
            or not (
                self.host.sys / "bus" / "rbd" / "devices" / str(mapped.details.get("id"))
            ).exists()
        ):
            return
        try:
            await self.runner(
                Command(["rbd", "device", "unmap", mapped.device], timeout=self.timeout)
            )
        except ProcessError as exc:
            if "(16)" in exc.output or "busy" in exc.output.lower():
                raise VolumeBusy(
                    f"cannot unmap {mapped.device} ({mapped.image}): the device is still in use"
                ) from exc
            raise


_SUGGESTION = re.compile(r'"(rbd feature disable [^"]+)"')


def translate_map_error(image: ImageRef, output: str) -> Exception:
    """``rbd device map`` failures as actionable errors, never "exit status 2"."""
    if "Module rbd not found" in output or ("modprobe" in output and "(2)" in output):
        return MapperUnavailable(
            f"cannot map {image.spec}: this kernel has no rbd module; "
            'set [daemon] mapper = "nbd" or "fuse", or install a kernel with rbd'
        )
    if "feature set mismatch" in output or "unsupported features" in output:
        fix = _SUGGESTION.search(output)
        how = fix.group(1) if fix else f"rbd feature disable {image.spec} <features>"
        return MapperUnavailable(
            f"cannot map {image.spec}: the kernel does not support some of the image's features; "
            f"disable them with `{how}`, or create volumes with "
            "--opt features=layering,exclusive-lock"
        )
    if "(1) Operation not permitted" in output or "(13) Permission denied" in output:
        return PermissionDenied(
            f"cannot map {image.spec} as client.{image.user}: permission denied (check the "
            "tenant's caps, and whether this host's address is blocklisted: ceph osd blocklist ls)"
        )
    if "(16) Device or resource busy" in output:
        return VolumeBusy(f"cannot map {image.spec}: the image is held exclusively elsewhere")
    if "(110)" in output or "timed out" in output:
        return CephUnavailable(
            f"cannot map {image.spec}: Ceph did not answer (connection timed out)"
        )
    last = [line for line in output.splitlines() if line.strip()]
    return ProcessError(
        f"rbd device map {image.spec} failed: {last[-1] if last else 'no output'}", output=output
    )
