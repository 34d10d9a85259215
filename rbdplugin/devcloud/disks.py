"""How an attached Cinder volume shows up in the pretend server: the disk makers.

Nova's compute driver turns Cinder's ``connection_info`` into a disk in the guest;
the Nova stand-in hands that job to a :class:`DiskMaker`, chosen per pretend
server from :data:`DISK_MAKERS`:

- ``host``: the server *is* this host. The RBD image becomes a real block device
  (qemu-storage-daemon FUSE export plus a loop device, as rbdplugin's fuse mapper
  does) and ``/dev/disk/by-id/virtio-<first 20 chars of the volume id>`` points at
  it, as udev's rule would for a virtio disk with that serial. No udev event is
  sent: a plugin on this host finds the link by polling.
- ``elsewhere``: the server runs on some other host; nothing appears here (for a
  volume attached to another server).
- (the kernel tier's guest adds ``qmp``: ``blockdev-add`` + ``device_add
  virtio-blk-pci,serial=<volume id>`` into a running QEMU, and the guest's own udev
  makes the link.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rbdplugin.errors import InvalidArgument, VolumeBusy
from rbdplugin.mapping import HostPaths, ImageRef
from rbdplugin.mapping.fuse import FuseMapper
from rbdplugin.mapping.scan import mounts
from rbdplugin.process import Runner, run

BY_ID = Path("/dev/disk/by-id")
SERIAL_CHARS = 20  # virtio-blk serials are cut to 20 bytes


def by_id_name(volume_id: str) -> str:
    return f"virtio-{volume_id[:SERIAL_CHARS]}"


@dataclass(frozen=True)
class Disk:
    """One volume as the compute side sees it: which, and how Cinder says to reach it."""

    volume_id: str
    connection_info: dict[str, Any]

    @property
    def image_spec(self) -> str:
        """``pool/image`` (or ``pool/namespace/image``) of an rbd connection."""
        info = self.connection_info
        if info.get("driver_volume_type") != "rbd":
            raise InvalidArgument(
                f"volume {self.volume_id}: connection type {info.get('driver_volume_type')!r}"
                " is not rbd; only rbd volumes can be attached here"
            )
        return str(info["data"]["name"])

    @property
    def ceph_user(self) -> str:
        return str(self.connection_info["data"].get("auth_username") or "admin")


class DiskMaker(Protocol):
    """Makes a volume's disk appear in (and disappear from) one pretend server."""

    async def plug(self, disk: Disk) -> str:
        """Make the disk appear; return once the guest has it, with its device path."""
        ...

    async def unplug(self, disk: Disk) -> None:
        """Take the disk away; succeed if it is already gone. VolumeBusy if the guest
        still uses it (the stand-in then rolls the detach back)."""
        ...

    async def present(self, disk: Disk) -> bool:
        """The disk is there now (for re-plugging after a stop)."""
        ...


@dataclass(frozen=True)
class HostPlaces:
    """Where the host disk maker works: the dev cluster's files and its own."""

    ceph_dir: Path  # ceph.conf and ceph.client.<user>.keyring (a DevCluster root)
    exports: Path  # FUSE export files
    by_id: Path = BY_ID
    host: HostPaths = field(default_factory=HostPaths)


class HostDiskMaker:
    """The pretend server is this host: FUSE export + loop device + by-id link."""

    def __init__(self, places: HostPlaces, timeout: float, runner: Runner = run) -> None:
        self.places = places
        self.mapper = FuseMapper(runner, places.host, places.exports, timeout)

    def image(self, disk: Disk) -> ImageRef:
        pool, _, rest = disk.image_spec.partition("/")
        namespace, _, image = rest.rpartition("/")
        user = disk.ceph_user
        ceph = self.places.ceph_dir
        return ImageRef(
            pool, namespace, image, user, ceph / f"ceph.client.{user}.keyring", ceph / "ceph.conf"
        )

    def link(self, disk: Disk) -> Path:
        return self.places.by_id / by_id_name(disk.volume_id)

    async def plug(self, disk: Disk) -> str:
        image = self.image(disk)
        mapped = await self.mapper.find(image)
        if mapped is None or not mapped.device:
            if mapped is not None:
                await self.mapper.unmap(mapped)
            mapped = await self.mapper.map(image)
        _symlink(self.link(disk), mapped.device)
        return mapped.device

    async def unplug(self, disk: Disk) -> None:
        image = self.image(disk)
        mapped = await self.mapper.find(image)
        if mapped is not None and mapped.device:
            users = [
                m for m, entry in mounts(self.places.host).items() if entry[0] == mapped.device
            ]
            if users:
                raise VolumeBusy(
                    f"volume {disk.volume_id}: {mapped.device} is still mounted on {users[0]}"
                )
        with contextlib.suppress(FileNotFoundError):
            self.link(disk).unlink()
        if mapped is not None:
            await self.mapper.unmap(mapped)

    async def present(self, disk: Disk) -> bool:
        mapped = await self.mapper.find(self.image(disk))
        link = self.link(disk)
        return (
            mapped is not None
            and bool(mapped.device)
            and link.is_symlink()
            and link.resolve() == Path(mapped.device)
        )


class ElsewhereDiskMaker:
    """The pretend server runs on another host: its disks never appear here."""

    def __init__(self) -> None:
        self.plugged: set[str] = set()

    async def plug(self, disk: Disk) -> str:
        self.plugged.add(disk.volume_id)
        return ""

    async def unplug(self, disk: Disk) -> None:
        self.plugged.discard(disk.volume_id)

    async def present(self, disk: Disk) -> bool:
        return disk.volume_id in self.plugged


DISK_MAKERS: dict[str, Callable[[HostPlaces, float], DiskMaker]] = {
    "host": HostDiskMaker,
    "elsewhere": lambda _places, _timeout: ElsewhereDiskMaker(),
}


def make_disk_maker(kind: str, places: HostPlaces, timeout: float) -> DiskMaker:
    try:
        factory = DISK_MAKERS[kind]
    except KeyError:
        raise InvalidArgument(
            f"unknown disk maker {kind!r}; valid: {', '.join(DISK_MAKERS)}"
        ) from None
    return factory(places, timeout)


def _symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically, relative like udev's links."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent))
    tmp.replace(link)
