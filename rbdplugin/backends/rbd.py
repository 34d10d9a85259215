"""Volumes as RBD images in the tenant's pool(s), through librbd in-process.

The image is named after the volume, so operators find ``docker volume`` ``foo``
as ``rbd ls POOL`` ``foo``. What the plugin must remember about a volume (fstype,
mkfs and mount options, who created it, whether it was ever formatted) lives in
the image's own metadata, so every host sees the same thing (Scope "global").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial

import rados
import rbd

from rbdplugin.backends import RemoveOutcome, Usage, VolumeInfo, drop_clone_snapshot, rbd_snapshots
from rbdplugin.ceph import CephClient, Connection, feature_bits, feature_names
from rbdplugin.config import TenantConfig
from rbdplugin.crashpoints import crash_point
from rbdplugin.errors import (
    CephError,
    Conflict,
    NotFound,
    RbdPluginError,
    VolumeBusy,
)
from rbdplugin.rbdheader import (
    Header,
    IdCache,
    IdRead,
    OmapRead,
    header_read,
    lookup_id,
    parse_header,
    read_header,
    set_metadata,
    unwritten,
)
from rbdplugin.spec import (
    CreateRequest,
    VolumeSpec,
    clone_fstype,
    is_volume_name,
    qos_from_metadata,
    qos_metadata,
)
from rbdplugin.units import format_size

log = logging.getLogger(__name__)

META = "rbdplugin."
# Never store an empty metadata value: python-rbd's metadata_list() drops empty
# values and pairs the remaining ones with the wrong keys. Absent means empty.
# Removed-but-kept images are renamed with a character Docker names cannot hold,
# so List no longer shows them and the name is free again.
KEPT_MARK = "~removed-"
# Read-only companion volumes (source= access=ro) are omap entries of this object in
# the tenant's own pool and namespace (pool metadata would be shared across namespaces).
COMPANIONS = "rbdplugin.companions"
# Our mkfs's progress on an image ("formatting" while it runs, "formatted" once done)
# lives in omap keys of a RADOS object of our own, named by the image's id (stable
# across rename and trash), not in image metadata: a read-write krbd or rbd-nbd
# mapping holds the image's exclusive lock for good (map option exclusive), and
# librbd refuses every metadata write meanwhile (EROFS). Images formatted by an
# older version are recognised by having been created by us and no longer "fresh".
FORMAT_MARKS = "rbdplugin.format."


class RbdBackend:
    def __init__(self, client: CephClient, tenant: TenantConfig) -> None:
        self.client = client
        self.tenant = tenant
        self._ids = IdCache()

    async def connect(self) -> None:
        await self.client.connect()

    @property
    def connected(self) -> bool:
        return self.client.connected

    async def probe(self) -> None:
        with contextlib.suppress(NotFound):  # an OSD answered
            await self.client.run(
                self.tenant.pool, "probing Ceph", lambda io: io.stat("rbdplugin.probe")
            )
        # And a monitor: without one no mapping can connect (every new Mount fails) and a
        # dropped connection cannot be replaced, even while calls to the OSDs still pass.
        wait = self.client.ceph.client_timeout
        ret, _, err = await self.client.run_cluster(
            "asking a Ceph monitor",
            lambda c: c.mon_command('{"prefix": "version"}', b"", timeout=wait),
        )
        if ret != 0:  # an error of its own: a probe must not drop a connection still of use
            raise CephError(f"no Ceph monitor answered ({err or os.strerror(-ret)})")

    def location(self, pool: str, name: str) -> str:
        ns = f"{self.tenant.namespace}/" if self.tenant.namespace else ""
        return f"{pool}/{ns}{name}"

    # -- create ------------------------------------------------------------------------

    async def create(self, request: CreateRequest, host_id: str) -> VolumeInfo:
        if request.spec.source:
            return await self._create_companion(request, host_id)
        if request.spec.origin:
            return await self._create_clone(request, host_id)
        name, spec = request.name, request.spec
        await self._not_in_other_pools(name, spec.pool)
        now = datetime.now(UTC)
        metadata = {
            f"{META}fstype": spec.fstype,
            f"{META}mkfs_options": shlex.join(spec.mkfs_options),
            f"{META}mount_options": ",".join(spec.mount_options),
            f"{META}created_by": host_id,
            f"{META}created_at": _iso(now),
            f"{META}fresh": "1",
            f"{META}fsck": spec.fsck if spec.fsck != "off" else "",
            **_root_metadata(spec),
        }
        metadata = {key: value for key, value in metadata.items() if value}
        metadata.update(qos_metadata(spec.qos))
        bits = feature_bits(spec.features)

        def create(ioctx: rados.Ioctx) -> str:
            created = False
            try:
                with OmapRead(ioctx, COMPANIONS, keys=(name,)) as companion:  # read meanwhile
                    rbd.RBD().create(ioctx, name, spec.size, old_format=False, features=bits)
                    created = True
                    crash_point("create.after-image")
                if companion.values:
                    raise Conflict(f"volume {name!r} already exists as a read-only companion")
                image_id = lookup_id(ioctx, name)
                if image_id is None:
                    raise rbd.ImageNotFound(f"image {name!r} vanished right after its creation")
                set_metadata(ioctx, image_id, metadata, [])
                crash_point("create.after-metadata")
            except BaseException:
                # Never leave an image without its metadata: it would be adopted as foreign.
                if created:
                    rbd.RBD().remove(ioctx, name)
                raise
            return image_id

        image_id = await self.client.run(spec.pool, f"creating volume {name!r}", create)
        self._ids.put(spec.pool, name, image_id)
        # What inspect() would read back, without the round trips: it is all ours.
        header = Header(image_id, spec.size, bits, now, metadata)
        return self._info(name, spec.pool, header, {}, [])

    async def _not_in_other_pools(self, name: str, pool: str) -> None:
        for other in self.tenant.pools:
            if other != pool and await self._exists(other, name):
                raise Conflict(
                    f"volume {name!r} already exists in pool {other}, not in the requested "
                    f"pool {pool}; use another name or drop the pool option"
                )

    async def _create_clone(self, request: CreateRequest, host_id: str) -> VolumeInfo:
        """A copy-on-write clone of ``origin``'s snapshot, carrying its filesystem."""
        name, spec = request.name, request.spec
        for pool in self.tenant.pools:  # Create of an existing volume: compared by the caller
            if await self._exists(pool, name):
                raise Conflict(f"volume {name!r} already exists in pool {pool}")
        volume, _, snapshot = spec.origin.partition("@")
        try:
            origin = await self.inspect(volume, watchers=False)
        except NotFound as exc:
            raise NotFound(f"volume {name!r}: its origin volume {volume!r} does not exist") from exc
        if origin.spec.source:
            raise Conflict(f"volume {name!r}: {volume!r} is a read-only companion; clone its "
                           f"source {origin.spec.source!r}")  # fmt: skip
        fstype = clone_fstype(request, volume, origin.spec.fstype)
        now = datetime.now(UTC)
        mount_options = spec.mount_options if "mount-options" in request.explicit else (
            origin.spec.mount_options)  # fmt: skip
        metadata = {
            f"{META}fstype": fstype,
            f"{META}mkfs_options": shlex.join(origin.spec.mkfs_options),
            f"{META}mount_options": ",".join(mount_options),
            f"{META}created_by": host_id,
            f"{META}created_at": _iso(now),
            f"{META}clone_of": spec.origin,
            f"{META}renew_uuid": "1",
            f"{META}fsck": spec.fsck if spec.fsck != "off" else "",
            **qos_metadata(spec.qos),
        }
        metadata = {key: value for key, value in metadata.items() if value}
        bits = feature_bits(spec.features) | feature_bits(("layering",))
        size = spec.size if "size" in request.explicit else None

        def make(conn: Connection) -> tuple[str, int]:
            target, source = conn.ioctx(spec.pool), conn.ioctx(origin.spec.pool)
            made = rbd_snapshots.clone(
                source, volume, snapshot, target, name, features=bits, size=size
            )
            try:
                image_id = lookup_id(target, name)
                if image_id is None:
                    raise rbd.ImageNotFound(f"clone {name!r} vanished right after its creation")
                set_metadata(target, image_id, metadata, [])
            except BaseException:
                rbd.RBD().remove(target, name)  # never a clone without its metadata
                raise
            return image_id, made

        image_id, made = await self.client.run_on(
            spec.pool, f"cloning {spec.origin} as volume {name!r}", make
        )
        header = Header(image_id, made, bits, now, metadata, data_elsewhere=True, linked=True)
        return self._info(name, spec.pool, header, {}, [])

    async def snapshot(self, name: str, snapshot: str) -> None:
        await self._on_snapshot(name, snapshot, "taking", rbd_snapshots.take)

    async def remove_snapshot(self, name: str, snapshot: str) -> None:
        await self._on_snapshot(name, snapshot, "removing", rbd_snapshots.remove)

    async def _on_snapshot(
        self, name: str, snapshot: str, doing: str, op: Callable[[rados.Ioctx, str, str], None]
    ) -> None:
        pool = await self._only_pool_or_lookup(name)
        try:
            await self.client.run(
                pool, f"{doing} snapshot {name}@{snapshot}", lambda io: op(io, name, snapshot)
            )
        except RbdPluginError as exc:
            raise rbd_snapshots.translate_lock(exc, name) from exc

    async def flatten(self, name: str, progress: Callable[[float], None]) -> None:
        pool = await self._only_pool_or_lookup(name)
        info = await self.inspect(name, watchers=False)
        try:
            await self.client.run_long(
                pool, f"flattening volume {name!r}",
                lambda io: rbd_snapshots.flatten(io, name, progress),
            )  # fmt: skip
        except RbdPluginError as exc:
            raise rbd_snapshots.translate_lock(exc, name) from exc
        await drop_clone_snapshot(self, name, info.spec.origin)

    async def uuid_renewed(self, name: str) -> None:
        await self._mark_format(name, {"uuid_renewed": _now()}, ())

    async def _create_companion(self, request: CreateRequest, host_id: str) -> VolumeInfo:
        name, source = request.name, request.spec.source
        try:
            origin = await self.inspect(source)
        except NotFound as exc:
            raise NotFound(f"volume {name!r}: its source volume {source!r} does not exist") from exc
        if origin.spec.source:
            raise Conflict(f"volume {name!r}: source {source!r} is itself a read-only companion")
        if await self._pool_or_none(name) is not None:
            raise Conflict(f"volume {name!r} already exists as an image; pick another name")
        entry = {"source": source, "access": "ro", "created_by": host_id,
                 "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip

        def add(ioctx: rados.Ioctx) -> None:
            with rados.WriteOpCtx() as op:
                ioctx.set_omap(op, (name,), (json.dumps(entry).encode(),))
                ioctx.operate_write_op(op, COMPANIONS)

        await self.client.run(self.tenant.pool, f"creating companion volume {name!r}", add)
        return await self.inspect(name)

    async def _companions(self) -> dict[str, dict[str, str]]:
        def read(ioctx: rados.Ioctx) -> dict[str, dict[str, str]]:
            try:
                with rados.ReadOpCtx() as op:
                    entries, _ = ioctx.get_omap_vals(op, "", "", 100_000)
                    ioctx.operate_read_op(op, COMPANIONS)
                    return {key: json.loads(value) for key, value in entries}
            except rados.ObjectNotFound:
                return {}

        return await self.client.read(self.tenant.pool, "listing companion volumes", read)

    async def adopt(self, request: CreateRequest) -> None:
        """Record a Create's fstype and options on an image made outside the plugin."""

        values = {
            f"{META}fstype": request.spec.fstype,
            f"{META}mkfs_options": shlex.join(request.spec.mkfs_options),
            f"{META}mount_options": ",".join(request.spec.mount_options),
            **_root_metadata(request.spec),
        }

        def record(ioctx: rados.Ioctx) -> None:
            put = {key: value for key, value in values.items() if value}
            set_metadata(
                ioctx, _id_of(ioctx, request.name), put, [k for k in values if k not in put]
            )

        pool = await self._pool_of(request.name)
        await self.client.run(pool, f"adopting image {request.name!r}", record)

    # -- read --------------------------------------------------------------------------

    async def _exists(self, pool: str, name: str) -> bool:
        return await self.client.read(
            pool, f"looking up volume {name!r}", lambda io: lookup_id(io, name) is not None
        )

    async def _pool_or_none(self, name: str) -> str | None:
        for pool in self.tenant.pools:
            if await self._exists(pool, name):
                return pool
        return None

    async def _pool_of(self, name: str) -> str:
        pool = await self._pool_or_none(name)
        if pool is None:
            raise NotFound(f"volume {name!r} does not exist in pool {', '.join(self.tenant.pools)}")
        return pool

    async def _only_pool_or_lookup(self, name: str) -> str:
        """The pool of ``name`` for a call that fails by itself if the image is absent:
        with one pool, no look-up round trip is needed first."""
        if len(self.tenant.pools) == 1:
            return self.tenant.pools[0]
        return await self._pool_of(name)

    async def inspect(self, name: str, *, watchers: bool = True) -> VolumeInfo:
        Found = tuple[Header, dict[str, str], list[dict[str, object]]]

        def read(conn: Connection, pool: str) -> Found | None:
            # One trip to the thread pool. With the id known from before, one round trip
            # to Ceph: the id, the header, our format marks and who has it open, side by
            # side; else three: the id, then the header and the marks, then who.
            ioctx = conn.ioctx(pool)
            guess = self._ids.get(pool, name)
            if guess is not None:
                found = self._read_guessed(conn, pool, name, guess, watchers)
                if found is not None:
                    return found
                self._ids.drop(pool, name)
            image_id = lookup_id(ioctx, name)
            if image_id is None:
                return None
            with (
                OmapRead(ioctx, FORMAT_MARKS + image_id) as marks,
                header_read(ioctx, image_id) as raw,
            ):
                pass
            header = parse_header(image_id, raw.values)
            if header is None:
                return None
            self._ids.put(pool, name, image_id)
            return header, _decoded(marks.values), _watchers(conn, pool, name, image_id, watchers)

        for pool in self.tenant.pools:
            found = await self.client.read_on(
                pool, f"reading volume {name!r}", partial(read, pool=pool)
            )
            if found is not None:
                return self._info(name, pool, *found)
        companion = (await self._companions()).get(name)
        if companion is None:
            raise NotFound(f"volume {name!r} does not exist in pool {', '.join(self.tenant.pools)}")
        origin = await self.inspect(companion["source"], watchers=watchers)
        return replace(
            origin, name=name, created_at=companion["created_at"],
            created_by=companion["created_by"], fresh=False,
            spec=replace(origin.spec, source=companion["source"], access="ro"),
        )  # fmt: skip

    def _read_guessed(
        self, conn: Connection, pool: str, name: str, guess: str, watchers: bool
    ) -> tuple[Header, dict[str, str], list[dict[str, object]]] | None:
        """inspect()'s reads for the image whose id was ``guess``, all at once; None if
        that is no longer the id of ``name`` (or it is gone): nothing read is used then."""
        ioctx = conn.ioctx(pool)
        with (
            IdRead(ioctx, name) as current,
            OmapRead(ioctx, FORMAT_MARKS + guess) as marks,
            header_read(ioctx, guess) as raw,
        ):
            watching = _watchers(conn, pool, name, guess, watchers)
        header = parse_header(guess, raw.values)
        if current.value != guess or header is None:
            return None
        return header, _decoded(marks.values), watching

    def _info(
        self,
        name: str,
        pool: str,
        header: Header,
        marks: Mapping[str, str],
        watchers: list[dict[str, object]],
    ) -> VolumeInfo:
        meta = {k.removeprefix(META): v for k, v in header.metadata.items() if k.startswith(META)}
        spec = VolumeSpec(
            size=header.size,
            fstype=meta.get("fstype", ""),
            pool=pool,
            features=feature_names(header.features),
            mkfs_options=tuple(shlex.split(meta.get("mkfs_options", ""))),
            mount_options=tuple(o for o in meta.get("mount_options", "").split(",") if o),
            qos=qos_from_metadata(header.metadata),
            origin=meta.get("clone_of", ""),
            fsck=meta.get("fsck", "off"),
            root_uid=_number(meta.get("root_uid", "")),
            root_gid=_number(meta.get("root_gid", "")),
            root_mode=_number(meta.get("root_mode", ""), 8),
        )
        created = header.created
        return VolumeInfo(
            name=name,
            spec=spec,
            location=self.location(pool, name),
            created_at=meta.get("created_at") or (_iso(created) if created else ""),
            created_by=meta.get("created_by", ""),
            fresh=meta.get("fresh") == "1" and not marks,
            formatted=_formatted(meta, marks),
            unformat_hint=self._unformat_hint(pool, header.image_id),
            watchers=tuple(f"{w['addr']} (client.{w['id']})" for w in watchers),
            watcher_addrs=frozenset(str(w["addr"]) for w in watchers),
            snapshots=header.snapshots,
            linked=header.linked,
            renew_uuid=meta.get("renew_uuid") == "1" and not marks.get("uuid_renewed"),
        )

    async def removed_hint(self, name: str) -> str:
        ns = f" --namespace {self.tenant.namespace}" if self.tenant.namespace else ""

        def look(ioctx: rados.Ioctx) -> tuple[list[dict[str, object]], list[str]]:
            trashed = [dict(e) for e in rbd.RBD().trash_list(ioctx) if e["name"] == name]
            kept = [e["name"] for e in rbd.RBD().list2(ioctx)
                    if e["name"].startswith(f"{name}{KEPT_MARK}")]  # fmt: skip
            return trashed, kept

        for pool in self.tenant.pools:
            trashed, kept = await self.client.read(pool, f"looking for removed {name!r}", look)
            if trashed:
                entry = trashed[-1]
                return (
                    f"It is in the trash of pool {pool} (image id {entry['id']}); bring it "
                    f"back with: rbdplugin trash restore {name} --driver {self.tenant.driver} "
                    f"--id {entry['id']} (or: rbd trash restore --pool {pool}{ns} {entry['id']})"
                )
            if kept:
                return (
                    f"It was kept as image {self.location(pool, sorted(kept)[-1])}; bring it "
                    f"back with: rbd rename {self.location(pool, sorted(kept)[-1])} "
                    f"{self.location(pool, name)}"
                )
        return ""

    async def names(self) -> list[str]:
        found: dict[str, None] = {}
        for pool in self.tenant.pools:

            def listing(ioctx: rados.Ioctx) -> list[str]:
                return [entry["name"] for entry in rbd.RBD().list2(ioctx)]

            for name in await self.client.read(pool, "listing volumes", listing):
                if is_volume_name(name):
                    found.setdefault(name, None)
        for name in await self._companions():
            if is_volume_name(name):  # the list's caller shows them as they are
                found.setdefault(name, None)
        return list(found)

    async def resize(self, name: str, size: int) -> None:
        pool = await self._pool_of(name)

        def grow(ioctx: rados.Ioctx) -> None:
            # With the exclusive-lock feature, librbd asks the lock's owner (the mapping's
            # client) to resize: the lock stays where it is.
            with rbd.Image(ioctx, name) as image:
                if image.size() < size:
                    image.resize(size, allow_shrink=False)

        try:
            await self.client.run(pool, f"resizing volume {name!r} to {format_size(size)}", grow)
        except RbdPluginError as exc:
            raise rbd_snapshots.translate_lock(
                exc,
                name,
                "resize",
                "unmount it and grow it then (its filesystem grows at its "
                "next Mount), or use the nbd or fuse mapper for volumes you grow live",
            ) from exc

    async def usage(self) -> Usage:
        volumes = provisioned = 0
        for pool in self.tenant.pools:

            def stats(ioctx: rados.Ioctx) -> dict[str, int]:
                result: dict[str, int] = rbd.RBD().pool_stats_get(ioctx)
                return result

            got = await self.client.read(pool, "reading pool usage", stats)
            volumes += got["image_count"]
            provisioned += got["image_max_provisioned_bytes"]
        return Usage(volumes=volumes, provisioned=provisioned)

    # -- formatting marks ----------------------------------------------------------------

    async def formatting_started(self, name: str) -> None:
        await self._mark_format(name, {"formatting": _now()}, ())

    async def formatting_done(self, name: str) -> None:
        await self._mark_format(name, {"formatted": _now()}, ("formatting",))

    async def formatting_interrupted(self, name: str) -> bool:
        pool = await self._only_pool_or_lookup(name)

        def read(ioctx: rados.Ioctx) -> bool:
            image_id = _id_of(ioctx, name)
            header = read_header(ioctx, image_id)
            legacy = header is not None and f"{META}formatting" in header.metadata
            return legacy or "formatting" in _format_marks(ioctx, image_id)

        return await self.client.read(pool, f"reading volume {name!r}", read)

    async def ends_unwritten(self, name: str, region: int) -> bool:
        pool = await self._only_pool_or_lookup(name)

        def look(ioctx: rados.Ioctx) -> bool:
            header = read_header(ioctx, _id_of(ioctx, name))
            if header is None:
                return False
            tail = max(header.size - region, 0)
            return unwritten(
                ioctx, header, [(0, min(region, header.size)), (tail, header.size - tail)]
            )

        return await self.client.read(pool, f"reading volume {name!r}", look)

    async def _mark_format(self, name: str, put: dict[str, str], drop: tuple[str, ...]) -> None:
        pool = await self._only_pool_or_lookup(name)

        def write(ioctx: rados.Ioctx) -> None:
            image_id = _id_of(ioctx, name)
            with rados.WriteOpCtx() as op:
                ioctx.set_omap(op, tuple(put), tuple(v.encode() for v in put.values()))
                if drop:
                    ioctx.remove_omap_keys(op, drop)
                ioctx.operate_write_op(op, FORMAT_MARKS + image_id)

        await self.client.run(pool, f"updating volume {name!r}", write)

    def _unformat_hint(self, pool: str, image_id: str) -> str:
        ns = f" --namespace {self.tenant.namespace}" if self.tenant.namespace else ""
        return f"rados --pool {pool}{ns} rmomapkey {FORMAT_MARKS}{image_id} formatted"

    # -- remove ------------------------------------------------------------------------

    async def remove(self, name: str) -> RemoveOutcome:
        try:
            info = await self.inspect(name)
        except NotFound:
            return "absent"
        companions = await self._companions()
        if name in companions:
            return await self._remove_companion(name)
        dependents = sorted(c for c, entry in companions.items() if entry["source"] == name)
        if dependents:
            raise VolumeBusy(
                f"volume {name!r} has read-only companion volume(s) {', '.join(dependents)}; "
                "remove them first"
            )
        if info.watchers:
            raise VolumeBusy(
                f"volume {name!r} is in use: image {info.location} is open by "
                f"{', '.join(info.watchers)}; unmount it there (stop the containers using it) first"
            )
        policy = self.tenant.remove_policy
        pool = info.spec.pool

        def remove(ioctx: rados.Ioctx) -> RemoveOutcome:
            if policy == "delete":
                image_id = _id_of(ioctx, name)
                # Marks first: once the image is gone, a retry cannot find its id, and a
                # crash in between would leak the marks. Marks gone, image not: the retry
                # removes it; a Mount still finds its filesystem (never blank ends).
                with contextlib.suppress(rados.ObjectNotFound):  # never formatted
                    ioctx.remove_object(FORMAT_MARKS + image_id)
                crash_point("remove.after-format-marks")
                rbd.RBD().remove(ioctx, name)
                crash_point("remove.after-image")
                return "deleted"
            if policy == "trash":
                rbd.RBD().trash_move(ioctx, name, self.tenant.trash_delay)
                crash_point("remove.after-trash")
                return "trashed"
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            rbd.RBD().rename(ioctx, name, f"{name}{KEPT_MARK}{stamp}")
            return "kept"

        if info.snapshots and policy == "delete":
            raise VolumeBusy(
                f"volume {name!r} has snapshots {', '.join(info.snapshots)}; remove them first "
                f"(rbdplugin snapshot rm {name}@SNAPSHOT), or they go with it under the trash "
                "and keep policies"
            )
        outcome: RemoveOutcome = await self.client.run(
            pool, f"removing volume {name!r} ({policy})", remove
        )
        if outcome == "deleted":
            await drop_clone_snapshot(self, name, info.spec.origin)
        return outcome

    async def _remove_companion(self, name: str) -> RemoveOutcome:
        def drop(ioctx: rados.Ioctx) -> None:
            with rados.WriteOpCtx() as op:
                ioctx.remove_omap_keys(op, (name,))
                ioctx.operate_write_op(op, COMPANIONS)

        await self.client.run(self.tenant.pool, f"removing companion volume {name!r}", drop)
        return "deleted"

    async def close(self) -> None:
        await self.client.close()


def _watchers(
    conn: Connection, pool: str, name: str, image_id: str, wanted: bool
) -> list[dict[str, object]]:
    if not wanted:
        return []
    try:
        return conn.watchers(pool, name, image_id)
    except rbd.ImageNotFound:  # removed meanwhile
        return []


def _id_of(ioctx: rados.Ioctx, name: str) -> str:
    image_id = lookup_id(ioctx, name)
    if image_id is None:
        raise rbd.ImageNotFound(f"image {name!r} not found")
    return image_id


def _format_marks(ioctx: rados.Ioctx, image_id: str) -> dict[str, str]:
    with OmapRead(ioctx, FORMAT_MARKS + image_id) as marks:
        pass
    return _decoded(marks.values)


def _decoded(values: Mapping[str, bytes]) -> dict[str, str]:
    return {key: value.decode() for key, value in values.items()}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _formatted(meta: Mapping[str, str], marks: Mapping[str, str]) -> str:
    """``meta``: the image-meta keys without our prefix."""
    if marks.get("formatted"):
        return f"at {marks['formatted']}"
    made_by_us = bool(meta.get("created_by"))
    if made_by_us and "fresh" not in meta and "formatting" not in meta:
        return "(before formatting times were recorded)"
    return ""


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _root_metadata(spec: VolumeSpec) -> dict[str, str]:
    """The filesystem root's owner and mode asked at Create, as image metadata (so a
    first Mount on any host applies them); "" for those not asked (never stored)."""
    return {
        f"{META}root_uid": _shown(spec.root_uid, "d"),
        f"{META}root_gid": _shown(spec.root_gid, "d"),
        f"{META}root_mode": _shown(spec.root_mode, "04o"),
    }


def _shown(value: int | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _number(text: str, base: int = 10) -> int | None:
    """A stored number, or None if absent or unreadable (checked again before use)."""
    try:
        return int(text, base) if text else None
    except ValueError:
        return None
