"""The volume service of one tenant: what each Docker volume call means.

No HTTP here and no Ceph details: the service validates input, applies the
tenant's policy (quotas, auto-create, pools), serialises work per volume (never
across volumes), and asks its :class:`~rbdplugin.backends.VolumeBackend`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from rbdplugin.backends import VolumeBackend, VolumeInfo
from rbdplugin.config import TenantConfig
from rbdplugin.errors import (
    CephUnavailable,
    Conflict,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
)
from rbdplugin.spec import CreateRequest, Defaults, incompatibilities, parse_create, validate_name
from rbdplugin.state import KnownVolumes
from rbdplugin.units import format_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeView:
    """A volume as Docker's Get and List show it."""

    name: str
    mountpoint: str = ""
    status: dict[str, Any] = field(default_factory=dict)


class VolumeService:
    def __init__(
        self,
        tenant: TenantConfig,
        backend: VolumeBackend,
        known: KnownVolumes,
        host_id: str,
        op_timeout: float,
    ) -> None:
        self.tenant = tenant
        self.backend = backend
        self.known = known
        self.host_id = host_id
        self.op_timeout = op_timeout
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._quota = asyncio.Lock()
        self.defaults = Defaults(
            size=tenant.default_size,
            fstype=tenant.default_fstype,
            pool=tenant.pool,
            pools=tenant.pools,
            features=tenant.features,
        )

    # -- per-volume serialisation --------------------------------------------------------

    @asynccontextmanager
    async def _volume(self, name: str, action: str) -> AsyncIterator[None]:
        """Hold ``name``'s lock and the operation's time budget; drop the lock when idle."""
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with asyncio.timeout(self.op_timeout):
                async with lock:
                    yield
        except TimeoutError as exc:
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
        async with self._volume(request.name, "creating"):
            info = await self._inspect_or_none(request.name)
            if info is None:
                info = await self._create_new(request)
            else:
                info = await self._accept_existing(request, info)
            self.known.remember(info.name, self._status(info))

    async def _exists(self, name: str) -> bool:
        return await self._inspect_or_none(name) is not None

    async def _inspect_or_none(self, name: str) -> VolumeInfo | None:
        try:
            return await self.backend.inspect(name)
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
        problems = incompatibilities(request, info.spec)
        if problems:
            raise Conflict(
                f"volume {request.name!r} already exists ({info.location}) and differs: "
                f"{'; '.join(problems)}; use another name, or remove it first"
            )
        return info

    # -- Get / List / Path -------------------------------------------------------------

    async def get(self, name: str) -> VolumeView:
        name = validate_name(name)
        try:
            info = await self.backend.inspect(name)
        except NotFound as exc:
            self.known.forget(name)
            raise NotFound(f"volume {name!r} does not exist (driver {self.tenant.driver})") from exc
        except CephUnavailable as exc:
            cached = self.known.get(name)
            if cached is None:
                raise
            log.warning("volume %s: Ceph unreachable, answering Get from local state", name)
            return VolumeView(name, self.path(name), {**cached, "ceph": f"unreachable: {exc}"})
        status = self._status(info)
        self.known.remember(name, status)
        return VolumeView(name, self.path(name), status)

    async def list(self) -> list[VolumeView]:
        try:
            names = await self.backend.names()
        except CephUnavailable:
            log.warning(
                "driver %s: Ceph unreachable, answering List from local state", self.tenant.driver
            )
            names = self.known.names()
        else:
            self.known.replace_names(names)
        return [VolumeView(name, self.path(name)) for name in sorted(names)]

    def path(self, name: str) -> str:
        validate_name(name)
        return ""  # Mountpoints arrive with Mount.

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
        if self.tenant.namespace:
            status["namespace"] = self.tenant.namespace
        if spec.mkfs_options:
            status["mkfs_options"] = " ".join(spec.mkfs_options)
        if spec.mount_options:
            status["mount_options"] = ",".join(spec.mount_options)
        if info.watchers:
            status["open_by"] = list(info.watchers)
        return status

    # -- Remove --------------------------------------------------------------------------

    async def remove(self, name: str) -> None:
        name = validate_name(name)
        async with self._volume(name, "removing"):
            outcome = await self.backend.remove(name)
            self.known.forget(name)
        log.info("volume %s: removed (%s, policy %s)", name, outcome, self.tenant.remove_policy)

    async def close(self) -> None:
        await self.backend.close()
