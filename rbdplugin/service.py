"""The volume service of one tenant: what each Docker volume call means.

No HTTP here and no Ceph details: the service validates input, applies the
tenant's policy (quotas, auto-create, pools), serialises work per volume (never
across volumes), and asks its :class:`~rbdplugin.backends.VolumeBackend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from rbdplugin.attach import Ahead, Attacher, Growth, abandon
from rbdplugin.backends import VolumeBackend, VolumeInfo
from rbdplugin.config import TenantConfig
from rbdplugin.errors import (
    CephUnavailable,
    Conflict,
    CorruptLease,
    DeadlineExceeded,
    InvalidArgument,
    LeaseConflict,
    NotFound,
    OpenStackUnavailable,
    QuotaExceeded,
    RbdPluginError,
    VolumeBusy,
)
from rbdplugin.metrics import Metrics
from rbdplugin.spec import (
    CINDER_OPTIONS,
    OPTIONS,
    CreateRequest,
    Defaults,
    clone_snapshot_prefix,
    format_mode,
    incompatibilities,
    is_volume_name,
    parse_create,
    validate_name,
    validate_snapshot_name,
    volume_size,
)
from rbdplugin.state import KnownVolumes
from rbdplugin.units import GiB, format_size

log = logging.getLogger(__name__)
T = TypeVar("T")
# Where volumes live cannot be reached right now: Get and List answer from local state.
UNREACHABLE = (CephUnavailable, OpenStackUnavailable)
# How long a mounted volume's filesystem may stay frozen for a snapshot: writers wait
# meanwhile; past it the snapshot is given up (Err) and the filesystem thawed.
FREEZE_LIMIT = 10.0


@dataclass(frozen=True)
class VolumeView:
    """A volume as Docker's Get and List show it."""

    name: str
    mountpoint: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    # RFC 3339 (docker volume inspect's CreatedAt); "" when unknown.
    created_at: str = ""


@dataclass(frozen=True)
class Resized:
    """What a resize did."""

    name: str
    before: int
    size: int
    filesystem: str  # what became of its device and filesystem, for people
    # False: mounted here, yet its filesystem still has to grow (at its next Mount).
    complete: bool


class VolumeService:
    def __init__(
        self,
        *,
        tenant: TenantConfig,
        backend: VolumeBackend,
        attacher: Attacher,
        metrics: Metrics,
        known: KnownVolumes,
        host_id: str,
        op_timeout: float,
        lease_check_seconds: float = 5.0,
    ) -> None:
        self.tenant = tenant
        # Where this tenant's volumes live, for messages and Get's status.
        self.where = "OpenStack" if tenant.backend == "cinder" else "Ceph"
        self.backend = backend
        self.attacher = attacher
        self.metrics = metrics
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_flight: dict[tuple[str, str, str], asyncio.Task[Any]] = {}
        self.lease_check_seconds = lease_check_seconds
        self._checker: asyncio.Task[None] | None = None
        self.known = known
        self.host_id = host_id
        self.op_timeout = op_timeout
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._quota = asyncio.Lock()
        # Set once start-up reconciled the mount table; Mount/Unmount/Remove wait for it.
        self._reconciled = asyncio.Event()
        self._starter: asyncio.Task[None] | None = None
        self._learner: asyncio.Task[None] | None = None  # List's CreatedAt, learnt later
        # Volumes whose background check found a problem an operator must fix (by name).
        self._trouble: dict[str, str] = {}
        # flatten_clones: how far each clone's flatten is ("37%", "failed: ..."), and the
        # tasks (cancelled at close: librbd's flatten stops with the process).
        self._flattening: dict[str, str] = {}
        self._flatteners: set[asyncio.Task[None]] = set()
        self.defaults = Defaults(
            size=tenant.default_size,
            fstype=tenant.default_fstype,
            pool=tenant.pool,
            pools=tenant.pools,
            features=tenant.features,
            options=CINDER_OPTIONS if tenant.backend == "cinder" else OPTIONS,
            volume_type=tenant.cinder.volume_type if tenant.cinder else "",
            availability_zone=tenant.cinder.availability_zone if tenant.cinder else "",
            size_step=GiB if tenant.backend == "cinder" else 1,
        )

    # -- per-volume serialisation --------------------------------------------------------

    @asynccontextmanager
    async def _volume(self, name: str, action: str) -> AsyncIterator[None]:
        """Hold ``name``'s lock and the operation's time budget; drop the lock when idle."""
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._reconciled.wait()
                async with lock:
                    yield
        except TimeoutError as exc:
            if not self._reconciled.is_set():
                raise DeadlineExceeded(
                    f"{action} volume {name!r}: the daemon is still starting up (reconciling "
                    f"its mounts needs Ceph, which has not answered within {self.op_timeout:.0f} "
                    "s); retry when `rbdplugin status` or /readyz says ready"
                ) from exc
            raise DeadlineExceeded(
                f"{action} volume {name!r} did not finish within {self.op_timeout:.0f} s"
            ) from exc
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    # -- Create --------------------------------------------------------------------------

    async def create(self, name: str, opts: object) -> None:
        request = parse_create(name, opts, self.defaults)
        # Docker sends Opts=null for implicit creates (`docker run -v name:/path`).
        if opts is None and not self.tenant.auto_create and not await self._exists(request.name):
            raise InvalidArgument(
                f"volume {name!r} does not exist and driver {self.tenant.driver} does not "
                f"create volumes implicitly; create it first: docker volume create "
                f"-d {self.tenant.driver} --opt size=... {name}"
            )
        taken = None
        if request.spec.origin and "@" not in request.spec.origin:
            request, taken = await self._snapshot_for_clone(request)
        try:
            async with self._volume(request.name, "creating"):
                if self.tenant.max_volumes or self.tenant.max_total_size:
                    info = await self._inspect_or_none(request.name)
                    if info is None:
                        info = await self._create_new(request)
                    else:
                        info = await self._accept_existing(request, info)
                else:
                    # Create first and look only on a clash (see _backend_create): a Create
                    # of a new volume, the common case, costs no look-up.
                    info = await self._backend_create(request)
                if self._grows(request, info):  # outside the quota lock: _grow takes it
                    log.info("volume %s: Create asks for %s, it has %s: growing it",
                             info.name, format_size(request.spec.size),
                             format_size(info.spec.size))  # fmt: skip
                    await self._grow(info, request.spec.size)
                    info = await self.backend.inspect(info.name, watchers=False)
                self.known.remember(info.name, self._status(info))
            if info.spec.origin and info.linked and self.tenant.flatten_clones:
                self._flatten_in_background(info.name)
        except BaseException:
            if taken is not None:  # nothing half-made: the snapshot goes with the failure
                await self._drop_snapshot(request.spec.origin)
            raise

    async def _snapshot_for_clone(
        self, request: CreateRequest
    ) -> tuple[CreateRequest, bool | None]:
        """clone-of=VOL: a snapshot of VOL now (frozen if mounted here) to clone from, and
        whether it was frozen. For an existing volume of that name no snapshot is taken
        (None): Create answers for it as for any other."""
        name, origin = request.name, request.spec.origin
        existing = await self._inspect_or_none(name, watchers=False)
        if existing is not None:
            same = existing.spec.origin.partition("@")[0] == origin
            spec = replace(request.spec, origin=existing.spec.origin if same else origin)
            return replace(request, spec=spec), None
        snapshot = f"{clone_snapshot_prefix(name)}{datetime.now(UTC):%Y%m%dT%H%M%S}"
        try:
            frozen = await self._take_snapshot(origin, snapshot)
        except NotFound as exc:
            raise NotFound(f"volume {name!r}: its origin volume {origin!r} does not exist") from exc
        return replace(request, spec=replace(request.spec, origin=f"{origin}@{snapshot}")), frozen

    async def _drop_snapshot(self, origin: str) -> None:
        volume, _, snapshot = origin.partition("@")
        try:
            await self._remove_snapshot(volume, snapshot)
        except RbdPluginError as exc:
            log.warning("volume %s: could not remove snapshot %s after a failed clone: %s; "
                        "remove it with rbdplugin snapshot rm %s", volume, snapshot, exc,
                        origin)  # fmt: skip

    def _flatten_in_background(self, name: str) -> None:
        if name in self._flattening and not self._flattening[name].startswith("failed"):
            return
        loop = asyncio.get_running_loop()

        def progress(fraction: float) -> None:  # from librbd's thread
            loop.call_soon_threadsafe(self._flattening.__setitem__, name, f"{fraction:.0%}")

        async def flatten() -> None:
            self._flattening[name] = "0%"
            try:
                await self.backend.flatten(name, progress)
            except RbdPluginError as exc:
                self._flattening[name] = f"failed: {exc}"
                log.warning("volume %s: flattening failed: %s", name, exc)
                return
            self._flattening.pop(name, None)
            log.info("volume %s: flattened; it no longer reads from its origin", name)

        task = asyncio.ensure_future(flatten())
        self._flatteners.add(task)
        task.add_done_callback(self._flatteners.discard)
        task.add_done_callback(_seen)

    def _flatten_status(self, info: VolumeInfo) -> str:
        if not info.linked:
            return "done: it no longer reads from its origin"
        running = self._flattening.get(info.name)
        if running is not None:
            return running if running.startswith("failed") else f"running, {running}"
        if self.tenant.flatten_clones:
            return ("not running here (interrupted by a restart, or started on another host); "
                    f"rbd flatten {info.location} finishes it")  # fmt: skip
        return "not asked for (the tenant's flatten_clones is off): it reads from its origin"

    # -- snapshots -----------------------------------------------------------------------

    async def snapshot(self, name: str, snapshot: object) -> bool:
        """Take a snapshot; True if the volume was mounted here and frozen for it."""
        return await self._take_snapshot(validate_name(name), validate_snapshot_name(snapshot))

    async def _take_snapshot(self, name: str, snapshot: str) -> bool:
        async with self._volume(name, "snapshotting"):
            info = await self.backend.inspect(name, watchers=False)
            if info.spec.source:
                raise InvalidArgument(
                    f"volume {name!r} is a read-only companion; snapshot its source "
                    f"{info.spec.source!r}"
                )
            record = self.attacher.mounted(name)
            with self.metrics.stage("snapshot"):
                if record is None or record.mode != "rw" or record.lost or record.broken:
                    await self.backend.snapshot(name, snapshot)
                    frozen = False
                else:
                    async with self.attacher.fs.frozen(Path(record.mountpoint), FREEZE_LIMIT):
                        await self.backend.snapshot(name, snapshot)
                    frozen = True
        log.info("volume %s: snapshot %s taken%s", name, snapshot,
                 " with its filesystem frozen" if frozen else "")  # fmt: skip
        return frozen

    async def remove_snapshot(self, name: str, snapshot: object) -> None:
        await self._remove_snapshot(validate_name(name), validate_snapshot_name(snapshot))

    async def _remove_snapshot(self, name: str, snapshot: str) -> None:
        async with self._volume(name, "removing a snapshot of"):
            await self.backend.remove_snapshot(name, snapshot)
        log.info("volume %s: snapshot %s removed", name, snapshot)

    async def _exists(self, name: str) -> bool:
        return await self._inspect_or_none(name) is not None

    async def _inspect_or_none(self, name: str, watchers: bool = True) -> VolumeInfo | None:
        try:
            with self.metrics.stage("inspect"):
                return await self.backend.inspect(name, watchers=watchers)
        except NotFound:
            return None

    async def _create_new(self, request: CreateRequest) -> VolumeInfo:
        if not (self.tenant.max_volumes or self.tenant.max_total_size):
            return await self._backend_create(request)
        # Check-then-create must not interleave, or parallel Creates overshoot the quota.
        async with self._quota:
            await self._check_quota(request)
            return await self._backend_create(request)

    async def _backend_create(self, request: CreateRequest) -> VolumeInfo:
        try:
            with self.metrics.stage("create"):
                info = await self.backend.create(request, self.host_id)
        except Conflict:
            # Another host created it between our look-up and our create.
            existing = await self._inspect_or_none(request.name)
            if existing is None:
                raise
            return await self._accept_existing(request, existing)
        log.info(
            "volume %s: created %s (%s)", request.name, info.location, format_size(info.spec.size)
        )
        return info

    async def _check_quota(self, request: CreateRequest) -> None:
        usage = await self.backend.usage()
        limit, total = self.tenant.max_volumes, self.tenant.max_total_size
        if limit and usage.volumes >= limit:
            raise QuotaExceeded(
                f"volume {request.name!r}: driver {self.tenant.driver} already has "
                f"{usage.volumes} of at most {limit} volumes; remove one or raise max_volumes"
            )
        after = usage.provisioned + request.spec.size
        if total and after > total:
            raise QuotaExceeded(
                f"volume {request.name!r}: size {format_size(request.spec.size)} would bring "
                f"driver {self.tenant.driver} to {format_size(after)}, over its quota of "
                f"{format_size(total)} "
                f"({format_size(max(total - usage.provisioned, 0))} left)"
            )

    async def _accept_existing(self, request: CreateRequest, info: VolumeInfo) -> VolumeInfo:
        """Create of an existing volume: fine if nothing explicit contradicts it."""
        if not info.spec.fstype:
            log.info(
                "volume %s: adopting image %s made outside the plugin", info.name, info.location
            )
            await self.backend.adopt(request)
            info = await self.backend.inspect(info.name)
        explicit = request.explicit - {"size"} if self._grows(request, info) else request.explicit
        problems = incompatibilities(
            replace(request, explicit=explicit), info.spec, self.defaults.size_step
        )
        if problems:
            raise Conflict(
                f"volume {request.name!r} already exists ({info.location}) and differs: "
                f"{'; '.join(problems)}; use another name, or remove it first"
                f"{self._size_hint(request, info) if 'size' in explicit else ''}"
            )
        return info

    def _grows(self, request: CreateRequest, info: VolumeInfo) -> bool:
        """Whether this Create of an existing volume grows it (tenant's grow_on_create)."""
        return (
            self.tenant.grow_on_create
            and "size" in request.explicit
            and request.spec.size > info.spec.size
            and not info.spec.source
        )

    def _size_hint(self, request: CreateRequest, info: VolumeInfo) -> str:
        if request.spec.size < info.spec.size:
            return "; volumes never shrink"
        if request.spec.size == info.spec.size or self.tenant.backend == "cinder":
            return ""
        return (
            f"; to grow it: rbdplugin volume resize {request.name} "
            f"{format_size(request.spec.size)} (or grow_on_create = true for driver "
            f"{self.tenant.driver})"
        )

    # -- Resize --------------------------------------------------------------------------

    async def resize(self, name: object, size: object) -> Resized:
        """Grow a volume: its storage, and where it is mounted on this host its device
        and filesystem, in place. Never shrinks."""
        volume = validate_name(name)
        wanted = volume_size(volume, size)
        async with self._volume(volume, "resizing"):
            info = await self._inspect_or_none(volume, watchers=False)
            if info is None:
                raise NotFound(f"volume {volume!r} does not exist (driver {self.tenant.driver})")
            before = info.spec.size
            growth = await self._grow(info, wanted)
            if growth is not None:
                filesystem = (
                    f"{growth.device} and its filesystem grew online"
                    if growth.done
                    else f"{growth.device} grew; its filesystem did not: {growth.detail}; it "
                    "grows at the volume's next Mount"
                )
            else:
                filesystem = await self._elsewhere(info)
            info = await self.backend.inspect(volume, watchers=False)
            self.known.remember(volume, self._status(info))
        return Resized(volume, before, info.spec.size, filesystem,
                       complete=growth is None or growth.done)  # fmt: skip

    async def _grow(self, info: VolumeInfo, size: int) -> Growth | None:
        name, have = info.name, info.spec.size
        if info.spec.source:
            raise InvalidArgument(
                f"volume {name!r} is a read-only companion of {info.spec.source!r}: resize "
                "that volume instead"
            )
        if size < have:
            raise InvalidArgument(
                f"volume {name!r} is {format_size(have)} ({have} bytes); refusing to shrink "
                f"it to {format_size(size)}: ext4 and xfs cannot shrink while mounted (xfs "
                "not at all), and cutting the image would destroy whatever lies past the new "
                f"end. Give a size of at least {format_size(have)}"
            )
        if size > have:
            async with self._quota:
                await self._check_growth(info, size)
                with self.metrics.stage("resize"):
                    await self.backend.resize(name, size)
            log.info("volume %s: grew %s from %s to %s", name, info.location,
                     format_size(have), format_size(size))  # fmt: skip
        # Also at the same size: a retry finishes a device or filesystem left behind.
        return await self.attacher.grow(name, size)

    async def _check_growth(self, info: VolumeInfo, size: int) -> None:
        total = self.tenant.max_total_size
        if not total:
            return
        usage = await self.backend.usage()
        after = usage.provisioned + size - info.spec.size
        if after > total:
            raise QuotaExceeded(
                f"volume {info.name!r}: growing it to {format_size(size)} would bring driver "
                f"{self.tenant.driver} to {format_size(after)}, over its quota of "
                f"{format_size(total)}"
            )

    async def _elsewhere(self, info: VolumeInfo) -> str:
        """What a resize means for a volume not mounted on this host."""
        try:
            live = [h.host for h in await self.attacher.holders(info) if h.alive]
        except RbdPluginError:
            live = []
        if live:
            return (
                f"mounted on host {', '.join(live)}, not here: its filesystem grows at its "
                "next Mount there"
            )
        return "not mounted: its filesystem grows at its next Mount"

    # -- Mount / Unmount -------------------------------------------------------------------

    async def mount(self, name: str, mount_id: object) -> str:
        name, mount_id = validate_name(name), _mount_id(mount_id)
        return await self._owned(("mount", name, mount_id), self._mount(name, mount_id))

    async def _mount(self, name: str, mount_id: str) -> str:
        async with self._volume(name, "mounting"):
            # Already mounted here: one more reference, and no need to ask Ceph.
            trouble = self._trouble.get(name)
            if trouble:
                raise CorruptLease(f"volume {name!r}: {trouble}")
            mountpoint = await self.attacher.add_reference(name, mount_id)
            if mountpoint is None:
                info = await self._inspect_for_mount(name)
                try:
                    mountpoint = await self.attacher.mount(info, mount_id)
                except LeaseConflict:
                    self.metrics.lock_conflicts.labels(self.tenant.name).inc()
                    raise
            return mountpoint

    async def _inspect_for_mount(self, name: str) -> VolumeInfo:
        """The volume to mount. Never created here: Docker calls Create before the first
        Mount, so a missing volume at Mount was removed (maybe from another host), and an
        empty new one in its place would hide that from the container."""
        info = await self._inspect_or_none(name, watchers=False)
        if info is not None:
            return info
        self.known.forget(name)
        hint = await self.backend.removed_hint(name)
        raise NotFound(
            f"volume {name!r} does not exist any more (driver {self.tenant.driver}): it was "
            f"removed, perhaps from another host; it is not re-created empty. {hint}".strip()
        )

    async def unmount(self, name: str, mount_id: object) -> None:
        name, mount_id = validate_name(name), _mount_id(mount_id)
        await self._owned(("unmount", name, mount_id), self._unmount(name, mount_id))

    async def _unmount(self, name: str, mount_id: str) -> None:
        async with self._volume(name, "unmounting"):
            await self.attacher.unmount(name, mount_id)
            if self.attacher.recorded(name) is None:
                # Not mounted here any more: a later Mount reads the lease afresh.
                self._trouble.pop(name, None)

    async def _owned(self, key: tuple[str, str, str], coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` as a task of the service, or join the identical one in flight.

        A caller that goes away does not cancel the work, and a retry of a request
        still running (same call, volume and ID) gets its result instead of a second
        reference.
        """
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(coro)
            self._in_flight[key] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: self._in_flight.pop(key, None))
            task.add_done_callback(_seen)  # its caller may have gone at the deadline
        else:
            coro.close()
            log.info("volume %s: %s for ID %s joins the one in flight", key[1], key[0], key[2])
        try:
            # The work's own deadline may be followed by its roll-back (a mapping process
            # that ignores SIGTERM while Ceph is away takes seconds to stop): the caller
            # gets its answer at the deadline all the same.
            async with asyncio.timeout(self.op_timeout):
                result: T = await asyncio.shield(task)
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"{key[0]}ing volume {key[1]!r} did not finish within {self.op_timeout:.0f} s; "
                "what it started is undone in the background"
            ) from exc
        return result

    # -- Get / List / Path -------------------------------------------------------------

    async def get(self, name: str) -> VolumeView:
        name = validate_name(name)
        # Who holds it is read beside the volume itself (one round trip, not two in a
        # row), and the holders are judged alive by the watchers the volume's read found.
        watching: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        ahead = self.attacher.holders_ahead(name, watching)
        try:
            return await self._get(name, ahead, watching)
        finally:
            watching.cancel()  # a no-op once set
            if ahead is not None:
                abandon(ahead[1])  # unless taken: a Get that failed, or a wrong guess

    async def _get(
        self, name: str, ahead: Ahead | None, watching: asyncio.Future[set[str]]
    ) -> VolumeView:
        try:
            with self.metrics.stage("inspect"):
                info = await self.backend.inspect(name)
        except NotFound as exc:
            self.known.forget(name)
            raise NotFound(f"volume {name!r} does not exist (driver {self.tenant.driver})") from exc
        except UNREACHABLE as exc:
            cached = self.known.get(name)
            if cached is None:
                raise
            log.warning(
                "volume %s: %s unreachable, answering Get from local state", name, self.where
            )
            status = {
                **cached,
                self.where.lower(): f"unreachable: {exc}",
                **self._mount_status(name),
            }
            return VolumeView(name, self.path(name), status, rfc3339(cached.get("created_at")))
        watching.set_result(set(info.watcher_addrs))
        status = self._status(info)
        self.known.remember(name, status)
        holders = await self._holders(info, ahead, watching)
        if holders:
            status["held_by"] = holders
        if name in self._trouble:
            status["problem"] = self._trouble[name]
        status.update(self._mount_status(name))
        if name in self.attacher.checks:
            status["fsck"] = self.attacher.checks[name]
        if info.spec.origin and self.tenant.backend != "cinder":  # Cinder's clones: Cinder's
            status["flatten"] = self._flatten_status(info)
        if info.spec.qos:
            status["qos_note"] = _qos_note(status.get("mapper"))
        return VolumeView(name, self.path(name), status, rfc3339(info.created_at))

    async def _holders(
        self, info: VolumeInfo, ahead: Ahead | None, watching: asyncio.Future[set[str]]
    ) -> list[dict[str, Any]]:
        try:
            holders = await self.attacher.holders(info, ahead, watching)
        except RbdPluginError as exc:
            log.warning("volume %s: cannot read its lease: %s", info.name, exc)
            return []
        return [{"host": h.host, "access": h.access, "since": h.since, "alive": h.alive}
                for h in holders]  # fmt: skip

    def _mount_status(self, name: str) -> dict[str, Any]:
        record = self.attacher.mounted(name)
        if record is None or record.device is None:
            return {}
        if record.lost:
            return {"mountpoint": record.mountpoint, "lost_to": record.lost,
                    "mounts": dict(record.counts)}  # fmt: skip
        if record.broken:
            return {"mountpoint": record.mountpoint, "device": record.device.path,
                    "broken": record.broken, "mounts": dict(record.counts)}  # fmt: skip
        status: dict[str, Any] = {
            "device": record.device.path,
            "mapper": record.device.via,
            "mountpoint": record.mountpoint,
            "mounted_on": self.host_id,
            "mounted_since": record.since,
            "mounts": dict(record.counts),
            "access": record.mode,
        }
        try:
            usage = self.attacher.usage(record)
        except OSError:
            return status
        status.update(fs_size_bytes=usage.size, fs_used_bytes=usage.used, fs_free_bytes=usage.free)
        return status

    async def list(self) -> list[VolumeView]:
        try:
            names = await self.backend.names()
        except UNREACHABLE:
            log.warning(
                "driver %s: %s unreachable, answering List from local state",
                self.tenant.driver,
                self.where,
            )
            # A cache a person may have edited: a name Docker could not have given is
            # left out, not the whole List failed.
            names = [name for name in self.known.names() if is_volume_name(name)]
        else:
            self.known.replace_names(names)
            self._learn_in_background(names)
        # The back-end's names are valid (it lists only those): none checked again here.
        # List runs often, over every volume, on the event loop.
        return [
            VolumeView(name, self._mountpoint(name), created_at=self._created_at(name))
            for name in sorted(names)
        ]

    def _created_at(self, name: str) -> str:
        return rfc3339((self.known.get(name) or {}).get("created_at"))

    def _learn_in_background(self, names: Iterable[str]) -> None:
        """Learn unseen volumes' CreatedAt after List has answered: List must stay as
        fast as listing names (it shows CreatedAt once known; Get always has it)."""
        if self._learner is None or self._learner.done():
            self._learner = asyncio.create_task(self._learn_created_at(list(names)))

    async def _learn_created_at(self, names: Iterable[str]) -> None:
        """Inspect the volumes this host has not seen yet (once: the answer is kept in
        the known volumes), so List can say when each was created."""
        unseen = [name for name in names if "created_at" not in (self.known.get(name) or {})]
        if not unseen:
            return
        limit = asyncio.Semaphore(8)

        async def learn(name: str) -> None:
            async with limit:
                try:
                    info = await self.backend.inspect(name, watchers=False)
                except RbdPluginError as exc:  # List still answers, without its CreatedAt
                    log.debug("volume %s: no CreatedAt for List: %s", name, exc)
                    return
            self.known.remember(name, self._status(info))

        await asyncio.gather(*(learn(name) for name in unseen))

    def path(self, name: str) -> str:
        return self._mountpoint(validate_name(name))

    def _mountpoint(self, name: str) -> str:
        record = self.attacher.mounted(name)
        return record.mountpoint if record else ""

    def _status(self, info: VolumeInfo) -> dict[str, Any]:
        spec = info.spec
        status: dict[str, Any] = {
            "pool": spec.pool,
            "image": info.location,
            "size": format_size(spec.size),
            "size_bytes": spec.size,
            "fstype": spec.fstype or "unknown (image made outside rbdplugin)",
            "features": ",".join(spec.features),
            "created_at": info.created_at,
            "created_by": info.created_by,
        }
        if self.tenant.backend == "cinder":  # no pool or RBD features: Cinder's own terms
            del status["pool"], status["image"], status["features"]
            status["cinder_volume"] = info.location.removeprefix("cinder/")
            status.update(volume_type=spec.volume_type, availability_zone=spec.availability_zone)
        if info.notes:
            status["notes"] = list(info.notes)
        if self.tenant.namespace:
            status["namespace"] = self.tenant.namespace
        if spec.mkfs_options:
            status["mkfs_options"] = " ".join(spec.mkfs_options)
        if spec.mount_options:
            status["mount_options"] = ",".join(spec.mount_options)
        status.update(_lifecycle_status(info))
        if info.watchers:
            status["open_by"] = list(info.watchers)
        return status

    # -- Remove --------------------------------------------------------------------------

    async def remove(self, name: str) -> None:
        name = validate_name(name)
        async with self._volume(name, "removing"):
            await self.attacher.await_cleaning(name, "Removes")  # no container holds it
            record = self.attacher.recorded(name)
            if record is not None:
                raise VolumeBusy(
                    f"volume {name!r} is mounted on host {self.host_id} at {record.mountpoint} "
                    f"({record.references} mount(s) by containers); "
                    "stop the containers using it first"
                )
            await self._refuse_if_held(name)
            with self.metrics.stage("remove"):
                outcome = await self.backend.remove(name)
            self.known.forget(name)
        log.info("volume %s: removed (%s, policy %s)", name, outcome, self.tenant.remove_policy)

    def start(self) -> None:
        """Reconcile and start the checks in the background: the socket must answer at
        once, even while Ceph is unreachable."""
        self._starter = asyncio.create_task(self._start())

    async def _start(self) -> None:
        # Connect first: that fences our dead predecessor, whose lingering watches would
        # otherwise stall every librbd notification (lock hand-over, close) of the clean-up.
        delay = 1.0
        while True:
            try:
                await self.backend.connect()
                break
            except RbdPluginError as exc:
                if not self._needs_ceph_to_reconcile():
                    log.error("driver %s: %s; reconciling without Ceph", self.tenant.driver, exc)
                    break
                log.error("driver %s: %s; retrying in %.0f s before reconciling mounts",
                          self.tenant.driver, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        try:
            with self.metrics.stage("reconcile"):
                await self.attacher.reconcile()
        except Exception:
            log.exception("driver %s: reconciling the mount table failed", self.tenant.driver)
        self._reconciled.set()
        log.info("driver %s: ready (mount table reconciled)", self.tenant.driver)
        self._checker = asyncio.create_task(self._check_leases())

    def _needs_ceph_to_reconcile(self) -> bool:
        # Half-done entries release leases in Ceph; a table of finished mounts does not.
        return self.attacher.half_done()

    @property
    def ready(self) -> bool:
        return self._reconciled.is_set()

    async def _check_leases(self) -> None:
        while True:  # the first round at once: start-up leaves the renewals to it
            for record in self.attacher.records():
                if record.phase == "mounted":
                    await self._check_one(record.volume)
            await asyncio.sleep(self.lease_check_seconds)

    async def _check_one(self, volume: str) -> None:
        """Check one mounted volume's mapping and lease; no error stops the other checks."""
        try:
            # Under the volume's lock: a concurrent Unmount must not race the check.
            async with self._volume(volume, "checking"):
                await self.attacher.check(volume)
            self._trouble.pop(volume, None)
        except CorruptLease as exc:
            if self._trouble.get(volume) != str(exc):
                log.error("volume %s: lease check: %s", volume, exc)
            self._trouble[volume] = str(exc)
        except RbdPluginError as exc:
            log.warning("volume %s: lease check failed: %s", volume, exc)
        except Exception:
            log.exception("volume %s: lease check failed unexpectedly", volume)

    async def _refuse_if_held(self, name: str) -> None:
        # Who has the image open is the back-end's check (its remove refuses then).
        info = await self._inspect_or_none(name, watchers=False)
        if info is None or info.spec.source:
            return
        live = [h for h in await self.attacher.holders(info) if h.alive]
        if live and self.tenant.backend == "cinder":  # holders are servers, Nova attached
            raise VolumeBusy(
                f"volume {name!r} is attached to server {', '.join(h.host for h in live)}; "
                "unmount it there (stop the containers using it) first"
            )
        if live:
            where = "; ".join(f"{h.access} on host {h.host} since {h.since}" for h in live)
            raise VolumeBusy(
                f"volume {name!r} is mounted ({where}); stop the containers using it there first"
            )

    async def close(self) -> None:
        for flattener in list(self._flatteners):
            flattener.cancel()
        for task in (self._starter, self._checker, self._learner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:  # let in-flight mounts and unmounts finish or roll back
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.known.close()
        await self.backend.close()


def _lifecycle_status(info: VolumeInfo) -> dict[str, Any]:
    """What Get says of the options beyond the filesystem: QoS, clone, snapshots, checks,
    the root's owner. Only what is set."""
    spec, status = info.spec, {}
    candidates: dict[str, Any] = {
        "qos": dict(spec.qos), "clone_of": spec.origin, "snapshots": list(info.snapshots),
        "fsck_mode": "" if spec.fsck == "off" else spec.fsck,
        # asked at Create, applied at first format
        "root_uid": spec.root_uid, "root_gid": spec.root_gid,
        "root_mode": None if spec.root_mode is None else format_mode(spec.root_mode),
    }  # fmt: skip
    for key, value in candidates.items():
        if value not in (None, "", [], {}):
            status[key] = value
    return status


def _qos_note(mapper: object) -> str:
    """Whether the volume's librbd QoS limits hold where it is mapped."""
    if mapper == "krbd":
        return ("NOT applied here: the volume is mapped by the kernel RBD client (krbd), "
                "which has no QoS; the fuse and nbd mappers (librbd) apply it")  # fmt: skip
    if mapper:
        return f"applied by librbd (mapper {mapper})"
    return "applied when mapped by librbd (fuse or nbd mapper); the kernel client (krbd) ignores it"


def rfc3339(value: object) -> str:
    """``value`` (a stored timestamp) in RFC 3339 as Docker parses it, or "" if it is none.
    Cinder's timestamps come without a zone (they are UTC) and with microseconds."""
    if not isinstance(value, str) or not value:
        return ""
    return _rfc3339_text(value)


# List converts every volume's CreatedAt on the event loop; parsing a thousand of them
# took a tenth of the loop's time under the soak. Each volume's is converted once.
@functools.lru_cache(maxsize=4096)
def _rfc3339_text(value: str) -> str:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seen(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _mount_id(mount_id: object) -> str:
    if not isinstance(mount_id, str) or not mount_id or len(mount_id) > 256:
        raise InvalidArgument("ID must be a non-empty string of at most 256 characters")
    return mount_id
