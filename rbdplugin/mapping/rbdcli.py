"""Mappers driven by ``rbd device map`` / ``unmap`` (krbd and rbd-nbd).

The flow is the same for both: run the map command under the deadline, translate
its failure into an actionable error, find the device the kernel made in sysfs,
and wait (same deadline) until udev has made it ready, or roll back. Unmapping
refuses politely when the device is still in use. Subclasses say how to build the
command and where their devices show up.

A recorded mapping names its device by number (/dev/rbdN, /dev/nbdN), and the kernel
hands a freed number to the next image mapped. So before unmapping (and when asked
whether a mapping is broken) each mapper checks what the device serves *now*; a
device that serves another image is never unmapped on behalf of a stale record.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from rbdplugin.devices import Devices
from rbdplugin.errors import (
    CephUnavailable,
    DeadlineExceeded,
    PermissionDenied,
    ProcessError,
    VolumeBusy,
)
from rbdplugin.mapping import (
    HostPaths,
    ImageRef,
    MappedDevice,
    MapperUnavailable,
    await_device_size,
)
from rbdplugin.process import Command, Completed, Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Diagnosis:
    """Why a recorded mapping's device no longer serves the image the record names."""

    reason: str
    gone: bool = False  # nothing serves any image there any more (vs. another image, or unknown)


class RbdDeviceMapper(ABC):
    name: str
    locks_image = True  # both map read-write images exclusively (see the mappers)

    def __init__(
        self, runner: Runner, host: HostPaths, timeout: float, devices: Devices | None = None
    ) -> None:
        self.runner = runner
        self.host = host
        self.timeout = timeout
        self.devices = devices or Devices(udev=False)

    @abstractmethod
    def map_command(self, image: ImageRef, read_only: bool = False) -> list[str]: ...

    @abstractmethod
    def unmap_command(self, mapped: MappedDevice) -> list[str]: ...

    @abstractmethod
    def diagnose(self, mapped: MappedDevice) -> Diagnosis | None:
        """Why ``mapped.device`` no longer serves ``mapped.image``; None while it does."""

    @abstractmethod
    async def find_all(self, image: ImageRef) -> list[MappedDevice]:
        """Every device of this kind that maps ``image`` now (another client's too)."""

    async def find(self, image: ImageRef) -> MappedDevice | None:
        found = await self.find_all(image)
        return found[0] if found else None

    def map_error(self, image: ImageRef, read_only: bool, output: str) -> Exception:
        return translate_map_error(image, output)

    async def map(self, image: ImageRef, read_only: bool = False) -> MappedDevice:
        """Map, then wait (one deadline in all) until udev has made the device ready."""
        deadline = time.monotonic() + self.timeout
        # Watch before mapping: the device's udev event must not slip by unseen.
        async with self.devices.watch() as watch:
            found = await self.map_and_find(image, read_only, deadline)
            left = max(deadline - time.monotonic(), 0.0)
            node = str(self.host.dev / found.device.removeprefix("/dev/"))
            try:
                await watch.wait_for(node, f"the {self.name} map of {image.spec}", left)
            except BaseException:
                await asyncio.shield(self.unmap(found))
                raise
        return found

    async def map_and_find(self, image: ImageRef, read_only: bool, deadline: float) -> MappedDevice:
        """Run the map command once; the device it made (rbd-nbd's mapper says more)."""
        before = {m.device for m in await self.find_all(image)}
        done = await self.run_map(image, read_only, deadline)
        return self._made(image, done.stdout, before, await self.find_all(image))

    async def run_map(self, image: ImageRef, read_only: bool, deadline: float) -> Completed:
        """The map command, within what is left of ``deadline``; failures translated."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(
                f"cannot map {image.spec}: no time left of the {self.timeout:.0f} s deadline"
            )
        try:
            return await self.runner(Command(self.map_command(image, read_only), timeout=left))
        except ProcessError as exc:
            raise self.map_error(image, read_only, exc.output) from exc

    def _made(
        self, image: ImageRef, stdout: str, before: set[str], now: list[MappedDevice]
    ) -> MappedDevice:
        """The device this map made: not one that mapped the image before (another
        client's read-only map, on this kernel), preferably the one the tool printed."""
        new = [m for m in now if m.device not in before]
        printed = printed_devices(stdout)
        for mapped in new:
            if printed and mapped.device == printed[-1]:
                return mapped
        if len(new) == 1:
            return new[0]
        raise ProcessError(
            f"{self.name} mapped {image.spec} but cannot tell its device "
            f"(printed {printed[-1] if printed else 'nothing'}; new: {[m.device for m in new]})"
        )

    async def broken(self, mapped: MappedDevice) -> str | None:
        if not mapped.device:
            return f"{mapped.image} has no device (its mapping never completed)"
        diagnosis = self.diagnose(mapped)
        return diagnosis.reason if diagnosis else None

    async def grow(self, mapped: MappedDevice, size: int) -> None:
        # Both clients watch the image's header and take a resize in on their own;
        # subclasses may hurry it along (krbd: its refresh attribute).
        await self.refresh(mapped)
        await await_device_size(self.host, mapped.device, size, self.timeout)

    async def refresh(self, mapped: MappedDevice) -> None:
        """Ask the client to re-read the image's size now (default: it notices alone)."""
        return None

    async def unmap(self, mapped: MappedDevice) -> None:
        if not mapped.device:
            return
        diagnosis = self.diagnose(mapped)
        if diagnosis is not None:
            if not diagnosis.gone:
                log.warning("not unmapping %s: %s; treating the mapping of %s as gone",
                            mapped.device, diagnosis.reason, mapped.image)  # fmt: skip
            return
        try:
            await self.runner(Command(self.unmap_command(mapped), timeout=self.timeout))
        except ProcessError as exc:
            if "(16)" in exc.output or "busy" in exc.output.lower():
                raise VolumeBusy(
                    f"cannot unmap {mapped.device} ({mapped.image}): the device is still in use"
                ) from exc
            raise


def printed_devices(stdout: str) -> list[str]:
    """The device paths a map command printed, in order."""
    return [line.strip() for line in stdout.splitlines() if line.startswith("/dev/")]


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
