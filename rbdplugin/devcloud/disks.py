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
- ``qmp``: the server is a running QEMU (the kernel tier's guest, ``guest/run`` with
  ``GUEST_QMP_SOCKET``). Over its QMP socket the image becomes a ``blockdev-add``
  rbd node (QEMU's own librbd client, cephx key handed over as a ``secret`` object)
  and a ``device_add virtio-blk-pci,serial=<first 20 chars of the volume id>``, as
  Nova's libvirt driver does; the guest's kernel and udev then make
  ``/dev/disk/by-id/virtio-<serial>`` inside the guest. Unplugging needs the guest's
  consent (``device_del`` until ``DEVICE_DELETED``), as on a real cloud.

Each maker also grows an attached disk after Cinder grew its volume (Nova's
``volume-extended`` event; libvirt's ``block_resize``): ``host`` grows the FUSE export
and its loop device as rbdplugin's fuse mapper does, ``qmp`` sends QMP ``block_resize``
to the rbd node (the guest's kernel then sees the virtio disk's new capacity).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rbdplugin.devcloud import qmp
from rbdplugin.errors import DeadlineExceeded, InvalidArgument, RbdPluginError, VolumeBusy
from rbdplugin.mapping import HostPaths, ImageRef
from rbdplugin.mapping.fuse import FuseMapper
from rbdplugin.mapping.scan import mounts
from rbdplugin.process import Runner, run

log = logging.getLogger("devcloud.disks")

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

    async def grow(self, disk: Disk, size: int) -> None:
        """Make the plugged disk show ``size`` bytes (its image already has them)."""
        ...


@dataclass(frozen=True)
class HostPlaces:
    """Where the host disk maker works: the dev cluster's files and its own."""

    ceph_dir: Path  # ceph.conf and ceph.client.<user>.keyring (a DevCluster root)
    exports: Path  # FUSE export files
    by_id: Path = BY_ID
    host: HostPaths = field(default_factory=HostPaths)
    qmp_socket: Path | None = None  # the qmp maker's QEMU (per pretend server)


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

    async def grow(self, disk: Disk, size: int) -> None:
        mapped = await self.mapper.find(self.image(disk))
        if mapped is None or not mapped.device:
            raise RbdPluginError(f"volume {disk.volume_id}: no disk plugged here to grow")
        await self.mapper.grow(mapped, size)

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

    async def grow(self, disk: Disk, size: int) -> None:
        """Grown on its own host, where nothing of it is here."""


class GuestUnavailable(RbdPluginError):
    """The pretend server's QEMU does not run (no QMP socket, or nobody listens on it)."""

    reason = "guest"


class QmpDiskMaker:
    """The pretend server is a running QEMU: hot-plug the RBD image over QMP.

    One QMP connection per operation (the guest may boot after the devcloud started, or
    be rebooted in between). QEMU opens the image with its block-rbd module as Ceph
    user ``auth_username`` of the connection_info, with the dev cluster's ceph.conf; the
    user's key (from its keyring file here) goes to QEMU as a ``secret`` object that the
    rbd node names in ``key-secret`` (the conf's ``keyring`` is the admin's)."""

    def __init__(self, places: HostPlaces, timeout: float) -> None:
        if places.qmp_socket is None:
            raise InvalidArgument("the qmp disk maker needs the QEMU's QMP socket path")
        self.socket = places.qmp_socket
        self.ceph_dir = places.ceph_dir
        self.timeout = timeout

    # -- names --------------------------------------------------------------------------

    @staticmethod
    def device_id(disk: Disk) -> str:
        return f"vol-{disk.volume_id}"

    @staticmethod
    def node_name(disk: Disk) -> str:
        # Block node names are at most 31 characters: a digest of the volume id.
        return "rbd-" + hashlib.sha256(disk.volume_id.encode()).hexdigest()[:24]

    @staticmethod
    def secret_id(disk: Disk) -> str:
        return f"cephx-{disk.volume_id}"

    @staticmethod
    def serial(disk: Disk) -> str:
        return disk.volume_id[:SERIAL_CHARS]

    def blockdev(self, disk: Disk) -> dict[str, Any]:
        pool, _, rest = disk.image_spec.partition("/")
        namespace, _, image = rest.rpartition("/")
        options: dict[str, Any] = {
            "driver": "rbd",
            "node-name": self.node_name(disk),
            "pool": pool,
            "image": image,
            "conf": str(self.ceph_dir / "ceph.conf"),
            "user": disk.ceph_user,
            "key-secret": self.secret_id(disk),
            "discard": "unmap",
        }
        if namespace:
            options["namespace"] = namespace
        return options

    def key(self, user: str) -> str:
        keyring = self.ceph_dir / f"ceph.client.{user}.keyring"
        try:
            text = keyring.read_text()
        except OSError as exc:
            raise InvalidArgument(f"no keyring for Ceph user {user!r}: {exc}") from exc
        for line in text.splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip() == "key":
                return value.strip()
        raise InvalidArgument(f"{keyring} holds no key")

    # -- QMP ----------------------------------------------------------------------------

    def _session(self) -> qmp.Qmp:
        if not self.socket.exists():
            raise GuestUnavailable(
                f"the pretend server's QEMU is not running: no QMP socket {self.socket} "
                f"(boot it with GUEST_QMP_SOCKET={self.socket} guest/run ...)"
            )
        try:
            return qmp.Qmp(self.socket, timeout=self.timeout)
        except (OSError, qmp.QmpError) as exc:
            raise GuestUnavailable(
                f"the pretend server's QEMU does not answer on {self.socket}: {exc}"
            ) from exc

    def _plug(self, disk: Disk) -> str:
        device, node, secret = self.device_id(disk), self.node_name(disk), self.secret_id(disk)
        options = self.blockdev(disk)  # refuses a non-rbd connection before QEMU is asked
        key = self.key(disk.ceph_user)
        with self._session() as session:
            try:
                if device in qmp.device_ids(session):
                    return ""
                if secret not in qmp.object_ids(session):
                    session.command("object-add", **{"qom-type": "secret", "id": secret,
                                                     "data": key, "format": "base64"})  # fmt: skip
                if node not in qmp.block_nodes(session):
                    session.command("blockdev-add", **options)
                session.command("device_add", driver="virtio-blk-pci", id=device, drive=node,
                                serial=self.serial(disk))  # fmt: skip
            except qmp.QmpError as exc:
                with contextlib.suppress(qmp.QmpError, OSError):
                    self._release(session, disk)
                raise RbdPluginError(
                    f"volume {disk.volume_id}: QEMU refused the hot-plug: {exc}"
                ) from exc
        log.info("volume %s plugged into the QEMU at %s as %s (serial %s)",
                 disk.volume_id, self.socket, device, self.serial(disk))  # fmt: skip
        return ""

    def _release(self, session: qmp.Qmp, disk: Disk) -> None:
        """Free the block node and the secret once no device uses them."""
        if self.node_name(disk) in qmp.block_nodes(session):
            session.command("blockdev-del", **{"node-name": self.node_name(disk)})
        if self.secret_id(disk) in qmp.object_ids(session):
            session.command("object-del", id=self.secret_id(disk))

    def _unplug(self, disk: Disk) -> None:
        try:
            session = self._session()
        except GuestUnavailable as exc:
            log.info("volume %s: nothing to unplug, %s", disk.volume_id, exc)
            return  # no QEMU, no disk
        with session:
            try:
                qmp.delete_device(session, self.device_id(disk), self.timeout)
            except qmp.QmpError as exc:
                if self.device_id(disk) in qmp.device_ids(session):
                    raise DeadlineExceeded(
                        f"volume {disk.volume_id}: the guest did not let the disk go: {exc}"
                    ) from exc
                raise RbdPluginError(f"volume {disk.volume_id}: unplug failed: {exc}") from exc
            try:
                self._release(session, disk)
            except qmp.QmpError as exc:
                raise RbdPluginError(
                    f"volume {disk.volume_id}: QEMU did not free the image: {exc}"
                ) from exc
        log.info("volume %s unplugged from the QEMU at %s", disk.volume_id, self.socket)

    def _present(self, disk: Disk) -> bool:
        try:
            session = self._session()
        except GuestUnavailable:
            return False
        with session:
            return self.device_id(disk) in qmp.device_ids(session)

    def _grow(self, disk: Disk, size: int) -> None:
        with self._session() as session:
            try:
                session.command("block_resize", **{"node-name": self.node_name(disk)}, size=size)
            except qmp.QmpError as exc:
                raise RbdPluginError(
                    f"volume {disk.volume_id}: QEMU refused to grow the disk: {exc}"
                ) from exc
        log.info("volume %s grown to %d bytes in the QEMU at %s", disk.volume_id, size,
                 self.socket)  # fmt: skip

    # -- DiskMaker ----------------------------------------------------------------------

    async def plug(self, disk: Disk) -> str:
        """Hot-plug; returns "" (the device path is only known inside the guest, where
        udev links it as /dev/disk/by-id/virtio-<serial>)."""
        return await asyncio.to_thread(self._plug, disk)

    async def unplug(self, disk: Disk) -> None:
        await asyncio.to_thread(self._unplug, disk)

    async def present(self, disk: Disk) -> bool:
        return await asyncio.to_thread(self._present, disk)

    async def grow(self, disk: Disk, size: int) -> None:
        await asyncio.to_thread(self._grow, disk, size)


DISK_MAKERS: dict[str, Callable[[HostPlaces, float], DiskMaker]] = {
    "host": HostDiskMaker,
    "elsewhere": lambda _places, _timeout: ElsewhereDiskMaker(),
    "qmp": QmpDiskMaker,
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
