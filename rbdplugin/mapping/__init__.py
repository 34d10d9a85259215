"""Mappers: how an RBD image becomes a block device on this host.

One small :class:`Mapper` protocol, one module per back-end:

- :mod:`.krbd`  the kernel RBD client (``rbd device map``); the production default.
- :mod:`.nbd`   ``rbd-nbd``, where the kernel has nbd but not rbd.
- :mod:`.fuse`  qemu-storage-daemon's FUSE export of the image plus a loop device,
  for kernels with neither.

:func:`select_mapper` (in :mod:`.select`) is the one place a mapper is chosen (``auto`` picks the
first the kernel offers, in that order, and says why). Every host path a mapper
reads (/sys, /proc, /dev) comes from :class:`HostPaths`, so discovery is tested
against fixture trees.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rbdplugin.errors import DeadlineExceeded, RbdPluginError
from rbdplugin.host import HostPaths

# HostPaths lives in rbdplugin.host now; re-exported for existing callers.
__all__ = [
    "HostPaths", "ImageRef", "MappedDevice", "Mapper", "MapperUnavailable", "unavailable_reason",
]  # fmt: skip


class MapperUnavailable(RbdPluginError):
    """This host cannot map images with the chosen mapper (module or tool missing)."""

    reason = "mapper_unavailable"


@dataclass(frozen=True)
class ImageRef:
    """An image and the identity that may open it (the tenant's own cephx user).

    ``exclusive_lock``: the image has the exclusive-lock feature, so read-write maps can ask
    the kernel (or rbd-nbd) to refuse every other writer; without the feature they cannot.
    """

    pool: str
    namespace: str
    image: str
    user: str
    keyring: Path
    conf: Path
    exclusive_lock: bool = False

    @property
    def spec(self) -> str:
        return (
            f"{self.pool}/{self.namespace}/{self.image}"
            if self.namespace
            else f"{self.pool}/{self.image}"
        )


@dataclass(frozen=True)
class MappedDevice:
    """A mapping as persisted in local state: enough to find, adopt and undo it."""

    mapper: str
    image: str
    device: str  # "" while a mapping is only partly there (found after a crash)
    details: dict[str, str | int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"mapper": self.mapper, "image": self.image, "device": self.device,
                "details": dict(self.details)}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, object]) -> MappedDevice:
        details = data.get("details") or {}
        if not isinstance(details, dict):
            raise ValueError(f"bad mapping details in state: {details!r}")
        return cls(str(data["mapper"]), str(data["image"]), str(data["device"]), dict(details))


class Mapper(Protocol):
    name: str
    # Whether map() takes the image's exclusive lock itself (krbd's ``exclusive``,
    # rbd-nbd's ``--exclusive``), rather than leaving it to the first write.
    locks_image: bool

    async def map(self, image: ImageRef, read_only: bool = False) -> MappedDevice:
        """Map ``image``; the returned device exists and is ready for I/O."""
        ...

    async def unmap(self, mapped: MappedDevice) -> None:
        """Undo a mapping, including a partial one; succeed if it is already gone."""
        ...

    async def find(self, image: ImageRef) -> MappedDevice | None:
        """The mapping of ``image`` on this host, if any (also a partial one)."""
        ...

    async def broken(self, mapped: MappedDevice) -> str | None:
        """Why this mapping can no longer serve I/O (its device is gone, or maps another
        image, or its rbd-nbd process died), or None if it looks healthy."""
        ...

    async def grow(self, mapped: MappedDevice, size: int) -> None:
        """Make the mapped device show ``size`` bytes, in place and while in use, after
        its image grew to that size; returns once the kernel reports it."""
        ...


def device_size(host: HostPaths, device: str) -> int:
    """The size of block device ``device`` (/dev/NAME) in bytes, as sysfs says now."""
    text = (host.sys / "block" / device.removeprefix("/dev/") / "size").read_text()
    return int(text) * 512


async def await_device_size(host: HostPaths, device: str, size: int, timeout: float) -> None:
    """Wait until the kernel reports ``device`` at ``size`` bytes or more."""
    deadline = time.monotonic() + timeout
    while (now := device_size(host, device)) < size:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"{device} still shows {now} bytes, not {size}, {timeout:.0f} s after its "
                "image grew"
            )
        await asyncio.sleep(0.01)


def unavailable_reason(name: str, host: HostPaths) -> str | None:
    """Why mapper ``name`` cannot work here, or None if it can."""
    if name == "krbd":
        if (host.sys / "bus" / "rbd").is_dir():
            return None
        return "the kernel has no rbd module loaded (/sys/bus/rbd is missing; try modprobe rbd)"
    if name == "nbd":
        if shutil.which("rbd-nbd") is None:
            return "rbd-nbd is not installed (apt-get install rbd-nbd)"
        if (host.sys / "module" / "nbd").is_dir() or (host.sys / "block" / "nbd0").exists():
            return None
        return "the kernel has no nbd module loaded (/sys/module/nbd is missing; try modprobe nbd)"
    if name == "fuse":
        missing = [t for t in ("qemu-storage-daemon", "losetup") if shutil.which(t) is None]
        if missing:
            packages = "qemu-system-common qemu-block-extra util-linux"
            return f"{' and '.join(missing)} not installed (apt-get install {packages})"
        if not (host.dev / "fuse").exists():
            return "/dev/fuse is missing"
        if not (host.dev / "loop-control").exists():
            return "/dev/loop-control is missing (no loop device support)"
        return None
    return f"unknown mapper {name!r}; valid: krbd, nbd, fuse"
