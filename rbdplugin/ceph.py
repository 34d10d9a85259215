"""One tenant's connection to Ceph: librados/librbd in-process, off the event loop.

Each tenant gets one long-lived ``rados.Rados`` handle authenticated as that
tenant's own cephx user, so Ceph's caps (not only our checks) keep tenants apart.
The bindings block in C, so every call runs in the tenant's own thread pool under
a deadline; a hung cluster costs that tenant threads, never the event loop or
another tenant. rados/rbd exceptions are translated here, and only here, into
:mod:`rbdplugin.errors`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import rados
import rbd

from rbdplugin.config import CephConfig, TenantConfig
from rbdplugin.errors import (
    CephError,
    CephUnavailable,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RbdPluginError,
    VolumeBusy,
)
from rbdplugin.state import read_json, write_json

log = logging.getLogger(__name__)
T = TypeVar("T")

FEATURE_BITS: dict[str, int] = {
    "layering": rbd.RBD_FEATURE_LAYERING,
    "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
    "object-map": rbd.RBD_FEATURE_OBJECT_MAP,
    "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
    "deep-flatten": rbd.RBD_FEATURE_DEEP_FLATTEN,
    "journaling": rbd.RBD_FEATURE_JOURNALING,
}

THREADS_PER_TENANT = 8
PREDECESSOR_FENCE_SECONDS = 3600


def feature_bits(features: tuple[str, ...]) -> int:
    bits = 0
    for feature in features:
        bits |= FEATURE_BITS[feature]
    return bits


def feature_names(bits: int) -> tuple[str, ...]:
    return tuple(name for name, bit in FEATURE_BITS.items() if bits & bit)


class CephClient:
    """The tenant's Rados handle, its per-pool I/O contexts and its thread pool."""

    def __init__(
        self,
        ceph: CephConfig,
        tenant: TenantConfig,
        deadline: float,
        address_file: Path | None = None,
    ) -> None:
        self.ceph = ceph
        # Where this daemon notes its client address, to fence its own dead predecessor.
        self.address_file = address_file
        self.tenant = tenant
        self.deadline = deadline
        self._executor = ThreadPoolExecutor(THREADS_PER_TENANT, f"ceph-{tenant.name}")
        self._cluster: rados.Rados | None = None
        self._ioctxs: dict[str, rados.Ioctx] = {}
        self._connecting = asyncio.Lock()
        # Run in the pool thread just before the handle is shut down: librbd images
        # still open at rados_shutdown crash the process.
        self.before_shutdown: list[Callable[[], None]] = []

    @property
    def connected(self) -> bool:
        return self._cluster is not None

    @property
    def who(self) -> str:
        return f"client.{self.tenant.user}"

    async def connect(self) -> None:
        async with self._connecting:
            if self._cluster is None:
                try:
                    self._cluster = await self._in_thread(self._connect, "connecting to Ceph")
                except PermissionDenied:
                    raise
                except RbdPluginError as exc:
                    raise CephUnavailable(
                        f"cannot connect to Ceph as {self.who} with {self.ceph.conf} and keyring "
                        f"{self.tenant.keyring}: {exc}"
                    ) from exc
                log.info("tenant %s: connected to Ceph as %s", self.tenant.name, self.who)
                await self._fence_predecessor()

    def _connect(self) -> rados.Rados:
        timeout = str(self.ceph.client_timeout)
        cluster = rados.Rados(
            conffile=str(self.ceph.conf),
            rados_id=self.tenant.user,
            conf={
                "keyring": str(self.tenant.keyring),
                "rados_mon_op_timeout": timeout,
                "rados_osd_op_timeout": timeout,
                "client_mount_timeout": timeout,
            },
        )
        try:
            cluster.connect(timeout=self.ceph.client_timeout)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    async def _fence_predecessor(self) -> None:
        """Blocklist the address our previous connection used (a crashed daemon's, or one
        we dropped): its watches would otherwise linger for osd_client_watch_timeout and
        make volumes look in use."""
        if self.address_file is None or self._cluster is None:
            return
        cluster = self._cluster
        own: str = await self._in_thread(cluster.get_addrs, "reading our client address")
        previous = read_json(self.address_file, {}).get("address")
        if previous and previous != own:
            try:
                await self._in_thread(
                    lambda: cluster.blocklist_add(previous, PREDECESSOR_FENCE_SECONDS),
                    f"fencing our previous client address {previous}",
                )
                log.info(
                    "tenant %s: fenced our previous client address %s", self.tenant.name, previous
                )
            except RbdPluginError as exc:
                log.warning("tenant %s: could not fence %s: %s", self.tenant.name, previous, exc)
        write_json(self.address_file, {"address": own})

    async def run(self, pool: str, action: str, fn: Callable[[rados.Ioctx], T]) -> T:
        """Run ``fn(ioctx)`` for ``pool`` (in the tenant's namespace) in the thread pool."""
        await self.connect()
        try:
            return await self._in_thread(lambda: fn(self._ioctx(pool)), action, pool)
        except CephUnavailable:
            self._disconnect_after_failure()
            raise

    async def run_private(self, pool: str, action: str, fn: Callable[[rados.Ioctx], T]) -> T:
        """Like :meth:`run` with an I/O context of its own: for version-guarded updates,
        whose ``get_last_version()`` must not see another thread's operation."""
        await self.connect()

        def call() -> T:
            if self._cluster is None:
                raise CephUnavailable("the Ceph connection was closed")
            ioctx = self._cluster.open_ioctx(pool)
            try:
                ioctx.set_namespace(self.tenant.namespace)
                return fn(ioctx)
            finally:
                ioctx.close()

        try:
            return await self._in_thread(call, action, pool)
        except CephUnavailable:
            self._disconnect_after_failure()
            raise

    async def address(self) -> tuple[str, int]:
        """This connection's client address and global id, as watchers show them."""
        return await self.run_cluster(
            "reading our client address", lambda c: (c.get_addrs(), c.get_instance_id())
        )

    async def run_cluster(self, action: str, fn: Callable[[rados.Rados], T]) -> T:
        """Run ``fn(cluster)`` for cluster-wide calls (blocklisting, our own identity)."""
        await self.connect()

        def call() -> T:
            if self._cluster is None:
                raise CephUnavailable("the Ceph connection was closed")
            return fn(self._cluster)

        try:
            return await self._in_thread(call, action)
        except CephUnavailable:
            self._disconnect_after_failure()
            raise

    def _ioctx(self, pool: str) -> rados.Ioctx:
        ioctx = self._ioctxs.get(pool)
        if ioctx is None:
            if self._cluster is None:
                raise CephUnavailable("the Ceph connection was closed")
            ioctx = self._cluster.open_ioctx(pool)
            ioctx.set_namespace(self.tenant.namespace)
            self._ioctxs[pool] = ioctx
        return ioctx

    async def _in_thread(self, fn: Callable[[], T], action: str, pool: str | None = None) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, fn)
        try:
            return await asyncio.wait_for(future, self.deadline)
        except TimeoutError as exc:
            raise CephUnavailable(
                f"Ceph did not answer within {self.deadline:.0f} s while {action}; "
                "check that the cluster's monitors and OSDs are up and reachable"
            ) from exc
        except (rados.Error, rbd.Error) as exc:
            raise translate(exc, action, pool, self.who) from exc

    def _disconnect_after_failure(self) -> None:
        # A blocklisted or timed-out handle stays broken: drop it and reconnect next time.
        cluster, ioctxs = self._cluster, list(self._ioctxs.values())
        self._cluster, self._ioctxs = None, {}
        if cluster is not None:
            log.warning("tenant %s: dropping the Ceph connection; reconnecting on next use",
                        self.tenant.name)  # fmt: skip
            self._executor.submit(self._shutdown, cluster, ioctxs)

    def _shutdown(self, cluster: rados.Rados, ioctxs: list[rados.Ioctx]) -> None:
        for hook in self.before_shutdown:
            try:
                hook()
            except Exception:
                log.exception("tenant %s: clean-up before disconnecting failed", self.tenant.name)
        for ioctx in ioctxs:
            ioctx.close()
        cluster.shutdown()

    async def close(self) -> None:
        cluster, self._cluster = self._cluster, None
        ioctxs, self._ioctxs = self._ioctxs, {}

        loop = asyncio.get_running_loop()
        if cluster is None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            return
        job = loop.run_in_executor(self._executor, self._shutdown, cluster, list(ioctxs.values()))
        try:
            await asyncio.wait_for(job, self.deadline)
        except TimeoutError:
            log.warning("tenant %s: Ceph connection did not close in time", self.tenant.name)
        self._executor.shutdown(wait=False, cancel_futures=True)


def translate(exc: Exception, action: str, pool: str | None, who: str) -> RbdPluginError:
    """A rados/rbd exception as one of our errors, with what to do about it."""
    code = getattr(exc, "errno", None)
    where = f" in pool {pool}" if pool else ""
    detail = f"{action}{where}"
    if isinstance(exc, rbd.ImageNotFound | rados.ObjectNotFound) or code == errno.ENOENT:
        if pool and "opening pool" in str(exc):
            return CephError(f"{detail}: pool {pool} does not exist; create it or fix the config")
        return NotFound(f"{detail}: not found")
    if isinstance(exc, rbd.ImageExists) or code == errno.EEXIST:
        return Conflict(f"{detail}: already exists")
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(
            f"{detail}: Ceph denied {who} access ({exc}); the tenant's cephx caps do not allow "
            "this pool or operation"
        )
    if isinstance(exc, rbd.ImageBusy | rbd.ImageHasSnapshots) or code == errno.EBUSY:
        return VolumeBusy(f"{detail}: the image is busy or has snapshots ({exc})")
    if code in (errno.EDQUOT, errno.ENOSPC):
        return QuotaExceeded(f"{detail}: the pool is full or over its Ceph quota ({exc})")
    if isinstance(exc, rbd.InvalidArgument) or code == errno.EINVAL:
        return InvalidArgument(f"{detail}: Ceph rejected the request as invalid ({exc})")
    if code in (errno.ETIMEDOUT, errno.ESHUTDOWN, errno.ENOTCONN, errno.EINTR) or isinstance(
        exc, rados.TimedOut | rados.InterruptedOrTimeoutError | rbd.ConnectionShutdown
    ):
        return CephUnavailable(
            f"{detail}: Ceph is unreachable ({exc}); check that the monitors and OSDs are up"
        )
    return CephError(f"{detail}: {exc}")
