"""How RBD volumes reach this host: a lease on the image, then a mapper's block device.

The lease (:mod:`rbdplugin.lease`) keeps one writer per image across hosts; the
mapper (:mod:`rbdplugin.mapping`: krbd, rbd-nbd or a FUSE export) makes the device.
A locator names the image (pool, namespace, image); a device's locator adds what
the mapper needs to find and undo its mapping (the image's spec and the mapping's
details, as JSON, since locators hold strings only).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from rbdplugin.backends import Device, Holder, Locator, VolumeInfo
from rbdplugin.config import TenantConfig
from rbdplugin.lease import Leases, Mode
from rbdplugin.mapping import ImageRef, MappedDevice, Mapper

# The fields of mount-table entries written before back-ends had locators.
LEGACY_FIELDS = ("pool", "namespace", "image", "mapped")


class RbdAttachment:
    """The attachment face of an RBD tenant (see :class:`~rbdplugin.backends.Attachment`)."""

    def __init__(self, tenant: TenantConfig, conf: Path, mapper: Mapper, leases: Leases) -> None:
        self.tenant = tenant
        self.conf = conf
        self.mapper = mapper
        self.leases = leases

    def locate(self, info: VolumeInfo) -> Locator:
        # A read-only companion is its source's image.
        image = info.spec.source or info.name
        return {"pool": info.spec.pool, "namespace": self.tenant.namespace, "image": image}

    def describe(self, locator: Locator) -> str:
        return self._image(locator).spec

    def _image(self, locator: Locator, exclusive_lock: bool = False) -> ImageRef:
        t = self.tenant
        namespace = locator.get("namespace", t.namespace)
        return ImageRef(locator["pool"], namespace, locator["image"], t.user, t.keyring, self.conf,
                        exclusive_lock)  # fmt: skip

    # -- claim and attach ----------------------------------------------------------------

    async def claim(self, volume: str, locator: Locator, read_only: bool) -> None:
        mode: Mode = "ro" if read_only else "rw"
        await self.leases.acquire(locator["pool"], locator["image"], mode, volume)

    @property
    def attach_while_claiming(self) -> bool:
        # A mapper that takes the image's exclusive lock as it maps (krbd, rbd-nbd) must
        # wait: a fencing claim breaks a dead holder's lock first. A FUSE export opens
        # the image and takes no lock until the first write, which waits for the claim.
        return not self.mapper.locks_image

    async def attach(
        self, info: VolumeInfo, locator: Locator, read_only: bool, claimed: Awaitable[None]
    ) -> Device:
        image = self._image(locator, "exclusive-lock" in info.spec.features)
        mapped = await self.mapper.map(image, read_only)
        await claimed
        if not read_only:
            # The mapping's own Ceph client joins our claim, so a takeover fences it too.
            # Should this fail, the mapping is not recorded yet: the roll-back finds it.
            await self.leases.record_mapping(locator["pool"], locator["image"])
        return _device(locator, mapped)

    async def find(self, locator: Locator) -> Device | None:
        found = await self.mapper.find(self._image(locator))
        return None if found is None else _device(locator, found)

    async def detach(self, device: Device) -> None:
        await self.mapper.unmap(_mapped(device))

    async def release(self, locator: Locator) -> None:
        await self.leases.release(locator["pool"], locator["image"])

    # -- checks ----------------------------------------------------------------------------

    async def still_claimed(self, locator: Locator, renew: bool = True) -> bool:
        return await self.leases.check(locator["pool"], locator["image"], renew) is not None

    async def claimant(self, locator: Locator) -> str:
        doc, _ = await self.leases.read(locator["pool"], locator["image"])
        return doc.writer.host if doc.writer else "nobody"

    async def broken(self, device: Device) -> str | None:
        return await self.mapper.broken(_mapped(device))

    async def grow(self, device: Device, size: int) -> None:
        await self.mapper.grow(_mapped(device), size)

    def likely_locator(self, name: str) -> Locator | None:
        pools = self.tenant.pools
        if len(pools) != 1:  # which pool holds it is known only once it is found
            return None
        return {"pool": pools[0], "namespace": self.tenant.namespace, "image": name}

    async def holders(
        self, locator: Locator, watching: Awaitable[set[str]] | None = None
    ) -> list[Holder]:
        found = await self.leases.holders(locator["pool"], locator["image"], watching)
        return [Holder(h.host, h.mode, h.since, h.alive) for h in found]

    def upgrade_record(self, entry: dict[str, Any]) -> dict[str, Any]:
        return upgrade_record(entry)


def upgrade_record(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry of the mount table as written before back-ends had locators (pool,
    namespace and image fields, and the mapping as ``mapped``), in today's format.
    Such entries are all RBD's: it was the only back-end then."""
    if "locator" in entry:
        return entry
    locator = {"pool": str(entry["pool"]), "namespace": str(entry.get("namespace", "")),
               "image": str(entry["image"])}  # fmt: skip
    mapped = entry.get("mapped")
    device = _device(locator, MappedDevice.from_json(mapped)).to_json() if mapped else None
    rest = {key: value for key, value in entry.items() if key not in LEGACY_FIELDS}
    return {**rest, "locator": locator, "device": device}


def _device(locator: Locator, mapped: MappedDevice) -> Device:
    details = json.dumps(mapped.details, sort_keys=True)
    return Device(
        mapped.device, mapped.mapper, {**locator, "spec": mapped.image, "details": details}
    )


def _mapped(device: Device) -> MappedDevice:
    details = json.loads(device.locator.get("details") or "{}")
    if not isinstance(details, dict):
        raise ValueError(f"bad mapping details in state: {details!r}")
    return MappedDevice(device.via, device.locator["spec"], device.path, details)
