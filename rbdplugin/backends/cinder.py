"""Volumes as Cinder volumes, attached to this OpenStack VM through Nova.

Inside a tenant VM the daemon holds no Ceph keys: it asks Cinder for a volume, asks
Nova to attach it to its own server, and finds the new virtio disk through udev by
its serial (``/dev/disk/by-id/virtio-`` + the first 20 characters of the volume id),
never by Nova's device name or by size. Cinder's attachment record is the
single-writer guarantee: a volume attached to another server is refused, naming it.

A Docker volume is the Cinder volume carrying metadata ``rbdplugin.tenant`` and
``rbdplugin.volume`` (found by that, never by display name). Its fstype, mkfs and
mount options, the size asked for and our formatting marks live in the volume's
metadata too, so another VM of the project sees the same. Every OpenStack call runs
off the event loop (:mod:`rbdplugin.openstack.client` is synchronous) under a
deadline; each HTTP request inside it has its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shlex
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from rbdplugin.backends import (
    Device,
    Holder,
    Locator,
    RemoveOutcome,
    Usage,
    VolumeInfo,
    drop_clone_snapshot,
)
from rbdplugin.config import CinderConfig, TenantConfig
from rbdplugin.devices import Devices
from rbdplugin.errors import (
    Conflict,
    DeadlineExceeded,
    InvalidArgument,
    InvalidRequest,
    LeaseConflict,
    NotFound,
    OpenStackUnavailable,
    RbdPluginError,
    VolumeBusy,
    VolumeFailed,
)
from rbdplugin.host import HostPaths
from rbdplugin.mapping import await_device_size
from rbdplugin.openstack.client import CloudSettings, OpenStackClient, Snapshot, Volume, connect
from rbdplugin.openstack.server_id import Places, discover
from rbdplugin.spec import CreateRequest, VolumeSpec, clone_fstype, is_volume_name
from rbdplugin.units import GiB, format_size

log = logging.getLogger(__name__)
T = TypeVar("T")

META = "rbdplugin."
TENANT, VOLUME, SNAPSHOT = f"{META}tenant", f"{META}volume", f"{META}snapshot"
KEPT_MARK = "~removed-"  # Docker names cannot hold "~": a kept volume leaves List
SERIAL_CHARS = 20  # virtio-blk serials are cut to 20 bytes
BY_ID = "/dev/disk/by-id"
AVAILABLE = frozenset({"available"})
IN_USE = frozenset({"in-use"})


def disk_links(volume_id: str) -> list[str]:
    """Where udev puts a Cinder volume's disk: virtio-blk (the usual), or virtio-scsi
    (QEMU's SCSI disk, serial or WWN). Never Nova's ``/dev/vdX`` guess."""
    serial = volume_id[:SERIAL_CHARS]
    return [
        f"{BY_ID}/virtio-{serial}",
        f"{BY_ID}/scsi-0QEMU_QEMU_HARDDISK_{serial}",
        f"{BY_ID}/scsi-0QEMU_QEMU_HARDDISK_{volume_id}",
        f"{BY_ID}/wwn-0x{volume_id.replace('-', '')[:16]}",
    ]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class CinderBackend:
    """Both faces of a Cinder-mode tenant (storage and attachment)."""

    def __init__(
        self,
        tenant: TenantConfig,
        client: OpenStackClient,
        server_id: str,
        devices: Devices,
        op_timeout: float,
    ) -> None:
        assert tenant.cinder is not None  # noqa: S101 - built for Cinder tenants only
        self.tenant = tenant
        self.settings: CinderConfig = tenant.cinder
        self.client = client
        self.server_id = server_id
        self.devices = devices
        self.op_timeout = op_timeout
        self._connected = False

    # -- calling OpenStack ---------------------------------------------------------------

    async def _call(self, what: str, seconds: float, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread, given up after ``seconds`` (its HTTP requests each
        have their own timeout, so the thread ends soon after)."""
        try:
            result = await asyncio.wait_for(asyncio.to_thread(fn, *args), seconds)
        except TimeoutError as exc:
            # Unreachable, as far as anyone waiting can tell: Get answers from local state.
            self._connected = False
            raise OpenStackUnavailable(
                f"{what}: OpenStack did not answer within {seconds:.0f} s"
            ) from exc
        except OpenStackUnavailable:
            self._connected = False
            raise
        self._connected = True
        return result

    def _mine(self, name: str) -> dict[str, str]:
        return {TENANT: self.tenant.name, VOLUME: name}

    async def _find(self, name: str) -> Volume | None:
        return await self._call(
            f"looking up volume {name!r}",
            self.op_timeout,
            self.client.find_volume,
            self._mine(name),
        )

    async def _volume(self, name: str) -> Volume:
        found = await self._find(name)
        if found is None:
            raise NotFound(
                f"volume {name!r} does not exist (no Cinder volume of tenant "
                f"{self.tenant.name} carries it)"
            )
        return found

    # -- storage face ----------------------------------------------------------------------

    async def connect(self) -> None:
        await self._call("logging in to Keystone", self.op_timeout, self.client.authenticate)

    @property
    def connected(self) -> bool:
        return self._connected

    async def probe(self) -> None:
        state = await self._call("checking Keystone and Cinder", self.op_timeout, self.client.check)
        down = {service: said for service, said in state.items() if said != "up"}
        if down:
            raise OpenStackUnavailable("; ".join(f"{s}: {said}" for s, said in down.items()))

    async def create(self, request: CreateRequest, host_id: str) -> VolumeInfo:
        name, spec = request.name, request.spec
        existing = await self._find(name)
        if existing is not None and existing.status != "creating":
            raise Conflict(f"volume {name!r} already exists (Cinder volume {existing.id})")
        if existing is None and spec.origin:
            existing = await self._create_clone(request, host_id)
        elif existing is None:
            existing = await self._call(
                f"creating volume {name!r}", self.op_timeout, self._create, name, spec, host_id
            )
        await self._await_available(name, existing.id)
        return await self.inspect(name)

    def _create(self, name: str, spec: VolumeSpec, host_id: str) -> Volume:
        metadata = {
            **self._mine(name),
            f"{META}fstype": spec.fstype,
            f"{META}mkfs_options": shlex.join(spec.mkfs_options),
            f"{META}mount_options": ",".join(spec.mount_options),
            f"{META}requested_size": str(spec.size),
            f"{META}created_by": host_id,
            f"{META}created_at": _now(),
            f"{META}fresh": "1",
        }
        return self.client.create_volume(
            max(1, math.ceil(spec.size / GiB)),
            name,
            metadata={k: v for k, v in metadata.items() if v},
            volume_type=spec.volume_type or None,
            availability_zone=spec.availability_zone or None,
        )

    async def _create_clone(self, request: CreateRequest, host_id: str) -> Volume:
        """A new Cinder volume from the snapshot ``origin`` names (from-snapshot, or the
        one a clone-of Create just took): it carries its origin's filesystem, whose UUID
        its first Mount renews, and is never formatted."""
        name, spec = request.name, request.spec
        volume, _, snapshot = spec.origin.partition("@")
        origin = await self._find(volume)
        if origin is None:
            raise NotFound(f"volume {name!r}: its origin volume {volume!r} does not exist")
        taken = await self._snapshot_of(volume, origin.id, snapshot, f"volume {name!r}: ")
        meta = origin.metadata
        fstype = clone_fstype(request, volume, meta.get(f"{META}fstype", ""))
        size_gib = taken.size_gib
        if "size" in request.explicit:
            asked = max(1, math.ceil(spec.size / GiB))
            if asked < taken.size_gib:
                raise InvalidArgument(
                    f"volume {name!r}: size {format_size(spec.size)} is smaller than snapshot "
                    f"{spec.origin} ({taken.size_gib} GiB); a clone is at least as large"
                )
            size_gib = asked
        metadata = {
            **self._mine(name),
            f"{META}fstype": fstype,
            f"{META}mkfs_options": meta.get(f"{META}mkfs_options", ""),
            f"{META}mount_options": ",".join(spec.mount_options)
            if "mount-options" in request.explicit
            else meta.get(f"{META}mount_options", ""),
            f"{META}requested_size": str(spec.size) if "size" in request.explicit else "",
            f"{META}created_by": host_id,
            f"{META}created_at": _now(),
            f"{META}clone_of": spec.origin,
            f"{META}renew_uuid": "1",
        }
        return await self._call(
            f"creating volume {name!r} from snapshot {spec.origin}",
            self.op_timeout,
            lambda: self.client.create_volume(
                size_gib,
                name,
                metadata={k: v for k, v in metadata.items() if v},
                # Cinder takes a snapshot's type and zone unless told: only what was asked.
                volume_type=spec.volume_type if "volume-type" in request.explicit else None,
                availability_zone=spec.availability_zone
                if "availability-zone" in request.explicit
                else None,
                snapshot_id=taken.id,
            ),
        )

    def _snapshot_tags(self, name: str, snapshot: str) -> dict[str, str]:
        return {**self._mine(name), SNAPSHOT: snapshot}

    async def _snapshots(self, name: str, volume_id: str | None = None) -> list[Snapshot]:
        """Volume ``name``'s snapshots (ours: tagged with its name), oldest first."""
        return await self._call(
            f"listing the snapshots of volume {name!r}",
            self.op_timeout,
            self.client.list_snapshots,
            self._mine(name),
            volume_id,
        )

    async def _snapshot_of(
        self, name: str, volume_id: str, snapshot: str, prefix: str = ""
    ) -> Snapshot:
        found = await self._snapshots(name, volume_id)
        named = [s for s in found if s.metadata.get(SNAPSHOT) == snapshot]
        if not named:
            have = ", ".join(s.metadata.get(SNAPSHOT, s.id) for s in found) or "none"
            raise NotFound(f"{prefix}volume {name!r} has no snapshot {snapshot!r}; it has: {have}")
        return named[0]

    async def _await_available(self, name: str, volume_id: str) -> None:
        seconds = self.settings.attach_timeout
        try:
            await self._call(
                f"creating volume {name!r}",
                seconds + 5,
                self.client.wait_for_volume,
                volume_id,
                AVAILABLE,
                seconds,
            )
        except VolumeFailed as exc:
            # A volume that failed is no use to anyone: delete it, keep Cinder's reason.
            try:
                await self._call(
                    f"deleting failed volume {name!r}",
                    self.op_timeout,
                    self.client.delete_volume,
                    volume_id,
                )
            except RbdPluginError as cleanup:
                log.warning(
                    "volume %s: the failed Cinder volume %s could not be deleted: %s",
                    name,
                    volume_id,
                    cleanup,
                )
            raise VolumeFailed(
                f"volume {name!r} could not be created: {exc}",
                volume_id=volume_id,
                status=exc.status,
            ) from exc
        except DeadlineExceeded as exc:
            raise DeadlineExceeded(
                f"volume {name!r}: {exc}; Create it again to keep waiting for the same volume"
            ) from exc

    async def adopt(self, request: CreateRequest) -> None:
        volume = await self._volume(request.name)
        values = {
            f"{META}fstype": request.spec.fstype,
            f"{META}mkfs_options": shlex.join(request.spec.mkfs_options),
            f"{META}mount_options": ",".join(request.spec.mount_options),
        }
        await self._call(
            f"adopting volume {request.name!r}",
            self.op_timeout,
            self.client.set_metadata,
            volume.id,
            {k: v for k, v in values.items() if v},
        )

    async def inspect(self, name: str, *, watchers: bool = True) -> VolumeInfo:
        if not watchers:  # an operation's look-up: the volume alone
            return self._info(name, await self._volume(name))
        # Get: the snapshots are listed beside the volume (by their tags), in parallel:
        # one more request, no more waiting.
        volume, snapshots = await asyncio.gather(self._volume(name), self._snapshots(name))
        return self._info(name, volume, [s for s in snapshots if s.volume_id == volume.id])

    def _info(
        self, name: str, volume: Volume, snapshots: list[Snapshot] | None = None
    ) -> VolumeInfo:
        meta = volume.metadata
        spec = VolumeSpec(
            size=volume.size_gib * GiB,
            fstype=meta.get(f"{META}fstype", ""),
            pool="",
            features=(),
            mkfs_options=tuple(shlex.split(meta.get(f"{META}mkfs_options", ""))),
            mount_options=tuple(o for o in meta.get(f"{META}mount_options", "").split(",") if o),
            volume_type=volume.volume_type or "",
            availability_zone=volume.availability_zone or "",
            origin=meta.get(f"{META}clone_of", ""),
        )
        formatted = meta.get(f"{META}formatted", "")
        return VolumeInfo(
            name=name,
            spec=spec,
            location=f"cinder/{volume.id}",
            created_at=meta.get(f"{META}created_at") or volume.created_at or "",
            created_by=meta.get(f"{META}created_by", ""),
            fresh=meta.get(f"{META}fresh") == "1" and f"{META}formatting" not in meta,
            formatted=f"at {formatted}" if formatted else "",
            unformat_hint=f"openstack volume unset --property {META}formatted {volume.id}",
            watchers=tuple(f"server {s}" for s in volume.servers),
            notes=_size_note(meta.get(f"{META}requested_size", ""), volume.size_gib),
            snapshots=tuple(s.metadata.get(SNAPSHOT, s.id) for s in snapshots or ()),
            renew_uuid=meta.get(f"{META}renew_uuid") == "1" and f"{META}uuid_renewed" not in meta,
            # Whether Cinder's clone still reads from the snapshot is Cinder's (its driver's)
            # business: never flattened by rbdplugin.
            linked=False,
        )

    async def removed_hint(self, name: str) -> str:
        volumes = await self._call(
            "listing volumes", self.op_timeout, self.client.list_volumes, {TENANT: self.tenant.name}
        )
        kept = sorted(
            (v for v in volumes if v.metadata.get(VOLUME, "").startswith(name + KEPT_MARK)),
            key=lambda v: v.metadata[VOLUME],
        )
        if not kept:
            return ""
        return (
            f"It was kept as Cinder volume {kept[-1].id}; bring it back with: openstack "
            f"volume set --property {VOLUME}={name} {kept[-1].id}"
        )

    async def names(self) -> list[str]:
        volumes = await self._call(
            "listing volumes", self.op_timeout, self.client.list_volumes, {TENANT: self.tenant.name}
        )
        return [v.metadata[VOLUME] for v in volumes if is_volume_name(v.metadata.get(VOLUME, ""))]

    async def resize(self, name: str, size: int) -> None:
        """Grow the volume with Cinder's os-extend (whole GiB, microversion 3.42), also
        while attached: Cinder grows the image, then tells Nova (``volume-extended``),
        which grows the disk in the server; :meth:`grow` then waits for this host's disk.
        A detached volume's filesystem grows at its next Mount."""
        volume = await self._volume(name)
        size_gib = math.ceil(size / GiB)
        if size_gib <= volume.size_gib:
            return
        seconds = self.op_timeout
        where = f" (attached to server {', '.join(volume.servers)})" if volume.servers else ""
        try:
            await self._call(
                f"resizing volume {name!r}", seconds, self.client.extend_volume, volume.id, size_gib
            )
            await self._call(
                f"resizing volume {name!r}",
                seconds + 5,
                self.client.wait_for_volume,
                volume.id,
                AVAILABLE | IN_USE,
                seconds,
            )
        except RbdPluginError as exc:
            raise type(exc)(
                f"volume {name!r}: growing Cinder volume {volume.id}{where} to {size_gib} GiB: "
                f"{exc}"
            ) from exc
        await self._call(
            f"resizing volume {name!r}",
            self.op_timeout,
            self.client.set_metadata,
            volume.id,
            {f"{META}requested_size": str(size)},
        )

    async def usage(self) -> Usage:
        volumes = await self._call(
            "listing volumes", self.op_timeout, self.client.list_volumes, {TENANT: self.tenant.name}
        )
        mine = [v for v in volumes if is_volume_name(v.metadata.get(VOLUME, ""))]
        return Usage(volumes=len(mine), provisioned=sum(v.size_gib for v in mine) * GiB)

    async def remove(self, name: str) -> RemoveOutcome:
        volume = await self._find(name)
        if volume is None:
            return "absent"
        if volume.servers:
            raise VolumeBusy(
                f"volume {name!r} is attached to server {', '.join(volume.servers)}; unmount it "
                "there (stop the containers using it) first"
            )
        if self.tenant.remove_policy == "keep":
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            await self._call(
                f"removing volume {name!r} (keep)",
                self.op_timeout,
                self.client.set_metadata,
                volume.id,
                {VOLUME: f"{name}{KEPT_MARK}{stamp}"},
            )
            outcome: RemoveOutcome = "kept"
        else:
            try:
                await self._call(f"removing volume {name!r}", self.op_timeout,
                                 self.client.delete_volume, volume.id)  # fmt: skip
            except VolumeBusy as exc:
                snapshots = await self._snapshots(name, volume.id)
                if not snapshots:
                    raise
                shown = ", ".join(s.metadata.get(SNAPSHOT, s.id) for s in snapshots)
                raise VolumeBusy(
                    f"volume {name!r} has snapshots in Cinder: {shown}; remove them first "
                    f"(rbdplugin snapshot rm {name}@SNAPSHOT) ({exc})"
                ) from exc
            await self._call(
                f"removing volume {name!r}",
                self.settings.detach_timeout + 5,
                self.client.wait_deleted,
                volume.id,
                self.settings.detach_timeout,
            )
            outcome = "deleted"
            await drop_clone_snapshot(self, name, volume.metadata.get(f"{META}clone_of", ""))
        return outcome

    async def _mark(self, name: str, key: str) -> str:
        """Set our metadata mark ``key`` to now; the volume's id."""
        volume = await self._volume(name)
        await self._call(
            f"updating volume {name!r}",
            self.op_timeout,
            self.client.set_metadata,
            volume.id,
            {f"{META}{key}": _now()},
        )
        return volume.id

    async def snapshot(self, name: str, snapshot: str) -> None:
        """A Cinder snapshot (forced: also of an attached volume), tagged with the volume's
        and the snapshot's names; returns once Cinder says it is available."""
        volume = await self._volume(name)
        found = await self._snapshots(name, volume.id)
        taken = [s for s in found if s.metadata.get(SNAPSHOT) == snapshot]
        if taken:
            raise Conflict(
                f"volume {name!r} already has a snapshot {snapshot!r} (Cinder snapshot "
                f"{taken[0].id}); pick another name, or remove it first"
            )
        what = f"taking snapshot {name}@{snapshot}"
        made = await self._call(
            what,
            self.op_timeout,
            self.client.create_snapshot,
            volume.id,
            f"{name}@{snapshot}",
            self._snapshot_tags(name, snapshot),
        )
        try:
            await self._call(
                what, self.op_timeout, self.client.wait_for_snapshot, made.id, self.op_timeout - 1
            )
        except VolumeFailed as exc:
            with contextlib.suppress(RbdPluginError):  # no snapshot in error left behind
                await self._call(
                    f"deleting failed snapshot {name}@{snapshot}",
                    self.op_timeout,
                    self.client.delete_snapshot,
                    made.id,
                    self.op_timeout - 1,
                )
            raise VolumeFailed(
                f"volume {name!r}: snapshot {snapshot!r} failed: {exc}",
                volume_id=volume.id,
                status=exc.status,
            ) from exc

    async def remove_snapshot(self, name: str, snapshot: str) -> None:
        volume = await self._volume(name)
        found = await self._snapshot_of(name, volume.id, snapshot)
        try:
            await self._call(
                f"removing snapshot {name}@{snapshot}",
                self.op_timeout,
                self.client.delete_snapshot,
                found.id,
                self.op_timeout - 1,
            )
        except (VolumeBusy, InvalidArgument, Conflict) as exc:
            made = await self._made_from(f"{name}@{snapshot}")
            hint = f"; volumes made from it: {', '.join(made)}; remove those first" if made else ""
            raise VolumeBusy(
                f"snapshot {name}@{snapshot} (Cinder snapshot {found.id}) was not "
                f"removed: {exc}{hint}"
            ) from exc

    async def _made_from(self, origin: str) -> list[str]:
        """The tenant's volumes made from snapshot ``origin`` (``VOLUME@SNAPSHOT``)."""
        try:
            volumes = await self._call(
                "listing volumes",
                self.op_timeout,
                self.client.list_volumes,
                {TENANT: self.tenant.name},
            )
        except RbdPluginError:
            return []
        return sorted(
            v.metadata.get(VOLUME, v.id)
            for v in volumes
            if v.metadata.get(f"{META}clone_of") == origin
        )

    async def flatten(self, name: str, progress: Callable[[float], None]) -> None:
        raise InvalidRequest(
            "Cinder-mode clones are Cinder's volumes: rbdplugin never flattens them"
        )

    async def uuid_renewed(self, name: str) -> None:
        await self._mark(name, "uuid_renewed")

    async def formatting_started(self, name: str) -> None:
        await self._mark(name, "formatting")

    async def formatting_done(self, name: str) -> None:
        volume_id = await self._mark(name, "formatted")
        for key in (f"{META}formatting", f"{META}fresh"):
            await self._call(
                f"updating volume {name!r}",
                self.op_timeout,
                self.client.unset_metadata,
                volume_id,
                key,
            )

    async def ends_unwritten(self, name: str, region: int) -> bool:
        return False  # Cinder does not say which blocks were written: read the device

    async def formatting_interrupted(self, name: str) -> bool:
        return f"{META}formatting" in (await self._volume(name)).metadata

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)

    # -- attachment face -----------------------------------------------------------------------

    # Attaching a volume Cinder shows attached to another server would be refused by
    # Nova at best; the claim looks first.
    attach_while_claiming = False

    def locate(self, info: VolumeInfo) -> Locator:
        return {"volume_id": info.location.removeprefix("cinder/")}

    def describe(self, locator: Locator) -> str:
        return f"cinder/{locator['volume_id']}"

    async def claim(self, volume: str, locator: Locator, read_only: bool) -> None:
        found = await self._get(locator)
        others = [s for s in found.servers if s != self.server_id]
        if others:
            raise LeaseConflict(
                f"volume {volume!r} (Cinder volume {found.id}) is attached to server "
                f"{', '.join(others)}; unmount it there (stop the containers using it) first"
            )

    async def _get(self, locator: Locator) -> Volume:
        return await self._call(
            f"reading Cinder volume {locator['volume_id']}",
            self.op_timeout,
            self.client.get_volume,
            locator["volume_id"],
        )

    async def attach(
        self, info: VolumeInfo, locator: Locator, read_only: bool, claimed: Awaitable[None]
    ) -> Device:
        await claimed  # never overlapped (attach_while_claiming): it is done already
        volume_id = locator["volume_id"]
        links = disk_links(volume_id)
        seconds = self.settings.attach_timeout
        async with self.devices.watch() as watch:  # before the attach: no event is missed
            if self.server_id not in (await self._get(locator)).servers:
                await self._call(
                    f"attaching volume {info.name!r}",
                    self.op_timeout,
                    self.client.attach,
                    self.server_id,
                    volume_id,
                )
            try:
                link = await watch.wait_for_any(links, f"Cinder volume {volume_id}", seconds)
            except DeadlineExceeded as exc:
                raise DeadlineExceeded(
                    f"volume {info.name!r}: Nova attached Cinder volume {volume_id} to server "
                    f"{self.server_id}, but no disk with serial {volume_id[:SERIAL_CHARS]} "
                    f"appeared within {seconds} s (udev links {BY_ID}/virtio-, "
                    "scsi-0QEMU_QEMU_HARDDISK_ or wwn-); it is detached again"
                ) from exc
        return self._device(locator, link)

    def _device(self, locator: Locator, link: str) -> Device:
        return Device(os.path.realpath(link), "nova", {**locator, "link": link})

    async def find(self, locator: Locator) -> Device | None:
        for link in disk_links(locator["volume_id"]):
            if os.path.exists(link):
                return self._device(locator, link)
        volume = await self._get(locator)
        if self.server_id in volume.servers:  # attached, but no disk here (yet)
            return Device("", "nova", dict(locator))
        return None

    async def detach(self, device: Device) -> None:
        volume_id = device.locator["volume_id"]
        seconds = self.settings.detach_timeout
        async with self.devices.watch() as watch:
            await self._call(
                f"detaching Cinder volume {volume_id}",
                self.op_timeout,
                self.client.detach,
                self.server_id,
                volume_id,
            )
            for link in disk_links(volume_id):
                await watch.wait_gone(link, f"Cinder volume {volume_id}'s disk", seconds)
        await self._call(
            f"detaching Cinder volume {volume_id}",
            seconds + 5,
            self.client.wait_for_volume,
            volume_id,
            AVAILABLE,
            seconds,
        )

    async def release(self, locator: Locator) -> None:
        """Nothing to give back: Cinder's attachment was the claim, and detach ended it."""

    async def still_claimed(self, locator: Locator, renew: bool = True) -> bool:
        # Nova's attachment is the claim: nothing of ours keeps it alive.
        try:
            return self.server_id in (await self._get(locator)).servers
        except (OpenStackUnavailable, DeadlineExceeded):
            return True  # not knowing is not losing: never report a loss we cannot see

    async def claimant(self, locator: Locator) -> str:
        servers = (await self._get(locator)).servers
        return f"server {', '.join(servers)}" if servers else "nobody"

    async def broken(self, device: Device) -> str | None:
        link = device.locator.get("link", "")
        if device.path and not os.path.exists(device.path):
            return f"its disk {device.path} is gone"
        if link and os.path.realpath(link) != device.path:
            return f"{link} no longer points at {device.path}"
        return None

    async def grow(self, device: Device, size: int) -> None:
        """Wait for the attached disk to show the volume's new ``size``: Nova grows it
        in the server once Cinder has grown the volume (its ``volume-extended`` event)."""
        volume_id = device.locator["volume_id"]
        if not device.path:
            raise VolumeBusy(f"Cinder volume {volume_id} has no disk on this host to grow")
        # Within the resize's own budget (op_timeout, which os-extend shared): the Err
        # then says what is missing, not just that the operation ran out of time.
        seconds = min(self.settings.attach_timeout, self.op_timeout / 2)
        try:
            await await_device_size(HostPaths(), device.path, size, seconds)
        except DeadlineExceeded as exc:
            raise DeadlineExceeded(
                f"Cinder volume {volume_id} grew to {format_size(size)} or more, but Nova "
                f"did not grow its disk in server {self.server_id}: {exc}; resize it again "
                "to keep waiting (its filesystem also grows at its next Mount)"
            ) from exc
        except OSError as exc:
            raise VolumeBusy(
                f"Cinder volume {volume_id}: cannot read the size of its disk {device.path}: {exc}"
            ) from exc

    def likely_locator(self, name: str) -> Locator | None:
        return None  # a locator is a Cinder volume id: only a look-up by name tells it

    async def holders(
        self, locator: Locator, watching: Awaitable[set[str]] | None = None
    ) -> list[Holder]:
        volume = await self._get(locator)  # Cinder's attachments: no watchers to judge
        return [Holder(server, "rw", "", True) for server in volume.servers]

    def upgrade_record(self, entry: dict[str, Any]) -> dict[str, Any]:
        return entry  # Cinder mode is newer than every old mount-table format


def _size_note(requested: str, size_gib: int) -> tuple[str, ...]:
    if not requested.isdigit() or int(requested) == size_gib * GiB:
        return ()
    return (
        f"size {format_size(size_gib * GiB)}: {format_size(int(requested))} asked for, "
        "rounded up to whole GiB (Cinder sizes volumes in GiB)",
    )


async def build_cinder(tenant: TenantConfig, op_timeout: float) -> CinderBackend:
    """A Cinder tenant's back-end: its cloud from clouds.yaml, and this VM's server id
    (from the config, else the config drive, the metadata service or DMI; logged)."""
    settings = tenant.cinder
    assert settings is not None  # noqa: S101 - only Cinder tenants come here
    client = connect(CloudSettings(settings.cloud, settings.clouds_yaml, settings.api_timeout))
    places = Places(metadata_url=settings.metadata_url)
    server_id, source = await asyncio.to_thread(discover, settings.server_id, places)
    log.info("driver %s: this VM is server %s (from %s); volumes come from cloud %r",
             tenant.driver, server_id, source, settings.cloud)  # fmt: skip
    return CinderBackend(tenant, client, server_id, Devices(), op_timeout)
