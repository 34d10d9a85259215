"""One tenant's connection to Ceph: librados/librbd in-process, off the event loop.

Each tenant gets one long-lived ``rados.Rados`` handle authenticated as that
tenant's own cephx user, so Ceph's caps (not only our checks) keep tenants apart.
The bindings block in C, so every call runs in one of the tenant's own thread pools
under a deadline; a hung cluster costs that tenant threads, never the event loop or
another tenant. Short reads (Get, List, leases, watchers) have a pool of their own:
behind eight slow changes (deleting big images, each for seconds) a Get would
otherwise wait for the first of them to end. A connection that fails (a timeout,
a blocklisting) is retired and replaced, and shut down only once the last call
still running on it has returned. rados/rbd exceptions are translated here, and
only here, into :mod:`rbdplugin.errors`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
from rbdplugin.pools import started_pool
from rbdplugin.rbdheader import WatcherLens, lookup_id
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
READ_THREADS_PER_TENANT = 4
# Read-only librbd handles kept to answer Get's "who has it open" (a third of a MiB
# each). Ceph 16's librados lists a header's watchers only in its C++ API, so any other
# volume's Get opens the image (about ten round trips): the bench's get_cold case.
LENS_HANDLES = 8
PREDECESSOR_FENCE_SECONDS = 3600


def feature_bits(features: tuple[str, ...]) -> int:
    bits = 0
    for feature in features:
        bits |= FEATURE_BITS[feature]
    return bits


def feature_names(bits: int) -> tuple[str, ...]:
    return tuple(name for name, bit in FEATURE_BITS.items() if bits & bit)


class Connection:
    """One Rados handle and its I/O contexts, shut down only once no call uses it.

    Every call in the tenant's pool holds a use of the connection it started on.
    A connection that failed is *retired*: new calls get a new one, and whoever
    drops the last use of the retired one starts its shutdown, which first closes
    the images kept open on it (librbd images still open at rados_shutdown crash
    the process, and so does a call still running on a shut-down handle).

    Presence is a librbd image kept open read-write, not a bare RADOS watch on the
    header: librbd re-establishes its watch after errors, and closing a bare watch
    whose connection had just timed out aborted the process (librados, bad_alloc).
    """

    def __init__(self, cluster: rados.Rados, namespace: str, name: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.name = name
        self.closed: Future[None] = Future()
        # Guards the counts and tables below; never held across a Ceph call.
        self._lock = threading.Lock()
        self._uses = 0
        self._retired = False
        self._closing = False
        self._ioctxs: dict[str, rados.Ioctx] = {}
        self._kept: dict[tuple[str, str], _Kept] = {}
        self.lens = WatcherLens(size=LENS_HANDLES)
        # Our client address and global id, fixed for the handle's life: read once.
        self.identity: tuple[str, int] | None = None

    def hold(self) -> bool:
        """Take a use; False once the shutdown has begun."""
        with self._lock:
            if self._closing:
                return False
            self._uses += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._uses -= 1
            last = self._retired and self._uses == 0 and not self._closing
            self._closing = self._closing or last
        if last:
            self._start_shutdown()

    def retire(self) -> None:
        """No new calls from now on; shut down when the last running one ends."""
        with self._lock:
            last = not self._retired and self._uses == 0 and not self._closing
            self._retired = True
            self._closing = self._closing or last
        if last:
            self._start_shutdown()

    def _start_shutdown(self) -> None:
        # Never on the event loop (the last use may be dropped there) and never in the
        # pool (its threads may all be stuck on a dead cluster).
        threading.Thread(target=self._shutdown, name=f"{self.name}-shutdown").start()

    def _shutdown(self) -> None:
        with self._lock:
            images, self._kept = list(self._kept.values()), {}
            ioctxs, self._ioctxs = list(self._ioctxs.values()), {}
        try:
            self.lens.close()
            for image in images:
                try:
                    image.close()
                except rbd.Error as exc:
                    log.debug("%s: closing an image kept open: %s", self.name, exc)
            for ioctx in ioctxs:
                ioctx.close()
            self.cluster.shutdown()
        except Exception:
            log.exception("%s: shutting down a Ceph connection failed", self.name)
        finally:
            self.closed.set_result(None)

    # -- used only by a call holding a use -------------------------------------------------

    def ioctx(self, pool: str) -> rados.Ioctx:
        """The shared I/O context of ``pool`` in the tenant's namespace."""
        with self._lock:
            found = self._ioctxs.get(pool)
        if found is not None:
            return found
        ioctx = self.cluster.open_ioctx(pool)
        ioctx.set_namespace(self.namespace)
        with self._lock:
            found = self._ioctxs.setdefault(pool, ioctx)
        if found is not ioctx:  # another call opened it meanwhile
            ioctx.close()
        return found

    def keep_open(self, pool: str, image: str) -> bool:
        key = (pool, image)
        with self._lock:
            if key in self._kept:
                return False
        kept = _Kept(rbd.Image(self.ioctx(pool), image))
        image_id = kept.image.id()  # read before another thread may close it
        with self._lock:
            found = self._kept.setdefault(key, kept)
        if found is not kept:
            kept.close()
            return False
        self.lens.drop(pool, image_id)  # Get asks through the presence handle now
        return True

    def close_kept(self, pool: str, image: str) -> None:
        with self._lock:
            kept = self._kept.pop((pool, image), None)
        if kept is not None:
            kept.close()

    def watchers(self, pool: str, image: str, image_id: str | None) -> list[dict[str, object]]:
        with self._lock:
            kept = self._kept.get((pool, image))
        found = kept.watchers() if kept is not None else None
        if found is not None:  # asked through our presence handle: no open needed
            return found
        ioctx = self.ioctx(pool)
        if image_id is None:
            image_id = lookup_id(ioctx, image)
            if image_id is None:
                raise rbd.ImageNotFound(f"image {image!r} not found")
        return self.lens.watchers(ioctx, pool, image_id)

    def keeps(self, pool: str, image: str) -> bool:
        with self._lock:
            return (pool, image) in self._kept


class _Kept:
    """A presence handle, which Get may also ask who has the image open: its lock keeps
    it from being closed while a call uses it (a closed librbd handle crashes)."""

    def __init__(self, image: rbd.Image) -> None:
        self.image = image
        self._lock = threading.Lock()
        self._closed = False

    def watchers(self) -> list[dict[str, object]] | None:
        with self._lock:
            if self._closed:
                return None
            return [dict(w) for w in self.image.watchers_list()]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.image.close()


class CephClient:
    """The tenant's Ceph connection (one at a time, renewed after a failure) and its
    thread pool."""

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
        self._executor = started_pool(THREADS_PER_TENANT, f"ceph-{tenant.name}")
        self._readers = started_pool(READ_THREADS_PER_TENANT, f"ceph-{tenant.name}-read")
        self._connection: Connection | None = None
        # Connections not shut down yet: the current one and retired ones still in use.
        self._live: set[Connection] = set()
        self._connecting = asyncio.Lock()
        self._attempt: asyncio.Future[None] | None = None  # the connect attempt under way

    @property
    def connected(self) -> bool:
        return self._connection is not None

    @property
    def who(self) -> str:
        return f"client.{self.tenant.user}"

    async def connect(self) -> None:
        """Connect unless connected. Callers that arrive during an attempt share it and its
        outcome: each trying in turn behind the last (in a black hole, a client timeout
        each) made the last caller of a burst wait for all of them, past every deadline."""
        if self._connection is not None:
            return
        if self._attempt is None or self._attempt.done():
            self._attempt = asyncio.ensure_future(self._connect_once())
            self._attempt.add_done_callback(_seen)
        await asyncio.shield(self._attempt)

    async def _connect_once(self) -> None:
        async with self._connecting:
            if self._connection is None:
                try:
                    cluster = await self._open()
                except PermissionDenied:
                    raise
                except RbdPluginError as exc:
                    raise CephUnavailable(
                        f"cannot connect to Ceph as {self.who} with {self.ceph.conf} and keyring "
                        f"{self.tenant.keyring}: {exc}"
                    ) from exc
                conn = Connection(cluster, self.tenant.namespace, f"ceph-{self.tenant.name}")
                self._live = {c for c in self._live if not c.closed.done()} | {conn}
                self._connection = conn
                log.info("tenant %s: connected to Ceph as %s", self.tenant.name, self.who)
                await self._fence_predecessor(conn)

    async def _open(self) -> rados.Rados:
        future = self._submit(self._connect)
        try:
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), self.deadline)
            except BaseException:  # timed out or cancelled: if it connects later, nobody uses it
                future.add_done_callback(_shut_down_late)
                raise
        except TimeoutError as exc:
            raise CephUnavailable(
                f"Ceph did not answer within {self.deadline:.0f} s while connecting"
            ) from exc
        except (rados.Error, rbd.Error) as exc:
            raise translate(exc, "connecting to Ceph", None, self.who) from exc

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

    async def _fence_predecessor(self, conn: Connection) -> None:
        """Blocklist the address our previous connection used (a crashed daemon's, or one
        we dropped): its watches would otherwise linger for osd_client_watch_timeout and
        make volumes look in use."""
        if self.address_file is None:
            return
        own: str = await self._on(
            conn, lambda c: c.cluster.get_addrs(), "reading our client address"
        )
        previous = read_json(self.address_file, {}).get("address")
        if previous and previous != own:
            try:
                await self._on(
                    conn,
                    lambda c: c.cluster.blocklist_add(previous, PREDECESSOR_FENCE_SECONDS),
                    f"fencing our previous client address {previous}",
                )
                log.info(
                    "tenant %s: fenced our previous client address %s", self.tenant.name, previous
                )
            except RbdPluginError as exc:
                log.warning("tenant %s: could not fence %s: %s", self.tenant.name, previous, exc)
        write_json(self.address_file, {"address": own})

    # -- calls -----------------------------------------------------------------------------

    async def run(self, pool: str, action: str, fn: Callable[[rados.Ioctx], T]) -> T:
        """Run ``fn(ioctx)`` for ``pool`` (in the tenant's namespace) in the thread pool."""
        return await self._on(await self._current(), lambda c: fn(c.ioctx(pool)), action, pool)

    async def read(self, pool: str, action: str, fn: Callable[[rados.Ioctx], T]) -> T:
        """Like :meth:`run`, for a read of a few round trips that changes nothing: in the
        readers' pool, never queued behind slow changes."""
        conn = await self._current()
        return await self._on(conn, lambda c: fn(c.ioctx(pool)), action, pool, self._readers)

    async def run_long(self, pool: str, action: str, fn: Callable[[rados.Ioctx], T]) -> T:
        """Like :meth:`run`, for work that takes as long as it takes (flattening a clone):
        on a thread of its own, not the pool's, with no deadline; the connection stays in
        use meanwhile, and a failure does not retire it."""
        conn = await self._current()
        if not conn.hold():
            raise CephUnavailable("the Ceph connection was closed; retry")
        done: Future[T] = Future()

        def call() -> None:
            try:
                done.set_result(fn(conn.ioctx(pool)))
            except BaseException as exc:  # handed to the awaiting task
                done.set_exception(exc)
            finally:
                conn.release()

        threading.Thread(target=call, name=f"ceph-{self.tenant.name}-long", daemon=True).start()
        try:
            return await asyncio.wrap_future(done)
        except (rados.Error, rbd.Error) as exc:
            raise translate(exc, action, pool, self.who) from exc

    async def run_on(self, pool: str, action: str, fn: Callable[[Connection], T]) -> T:
        """Like :meth:`run`, with the connection itself: for work that needs its I/O
        context and its watcher lens in one trip to the pool."""
        return await self._on(await self._current(), fn, action, pool)

    async def read_on(self, pool: str, action: str, fn: Callable[[Connection], T]) -> T:
        """:meth:`run_on` in the readers' pool (see :meth:`read`)."""
        return await self._on(await self._current(), fn, action, pool, self._readers)

    async def run_private(
        self, pool: str, action: str, fn: Callable[[rados.Ioctx], T], *, reads: bool = False
    ) -> T:
        """Like :meth:`run` with an I/O context of its own: for version-guarded updates,
        whose ``get_last_version()`` must not see another thread's operation; in the
        readers' pool if it ``reads`` only."""

        def call(conn: Connection) -> T:
            ioctx = conn.cluster.open_ioctx(pool)
            try:
                ioctx.set_namespace(conn.namespace)
                return fn(ioctx)
            finally:
                ioctx.close()

        executor = self._readers if reads else self._executor
        return await self._on(await self._current(), call, action, pool, executor)

    async def watchers(
        self, pool: str, image: str, image_id: str | None, action: str
    ) -> list[dict[str, object]]:
        """Who watches the header of ``image`` (whose id is ``image_id``, if known): asked
        through our presence handle when we keep one, else through a :class:`WatcherLens`."""
        conn = await self._current()
        return await self._on(
            conn, lambda c: c.watchers(pool, image, image_id), action, pool, self._readers
        )

    async def run_cluster(self, action: str, fn: Callable[[rados.Rados], T]) -> T:
        """Run ``fn(cluster)`` for cluster-wide calls (blocklisting, our own identity)."""
        return await self._on(await self._current(), lambda c: fn(c.cluster), action)

    async def address(self) -> tuple[str, int]:
        """This connection's client address and global id, as watchers show them: asked
        of librados once per connection (every Mount wants it twice)."""
        conn = await self._current()
        if conn.identity is not None:
            return conn.identity
        identity: tuple[str, int] = await self._on(
            conn,
            lambda c: (c.cluster.get_addrs(), c.cluster.get_instance_id()),
            "reading our client address",
        )
        conn.identity = identity
        return identity

    # -- images kept open (a watch on the header says this client uses the image) ----------

    async def keep_open(self, pool: str, image: str, action: str) -> bool:
        """Open ``image`` read-write and keep it open on the current connection; False if
        it is open there already. It is closed by :meth:`close_kept`, or with its
        connection when that is shut down (its watch is gone then anyway)."""
        return await self._on(
            await self._current(), lambda c: c.keep_open(pool, image), action, pool
        )

    def keeps_open(self, pool: str, image: str) -> bool:
        """Whether the current connection keeps ``image`` open (False after a reconnect)."""
        conn = self._connection
        return conn is not None and conn.keeps(pool, image)

    async def close_kept(self, pool: str, image: str, action: str) -> None:
        """Close ``image`` on every connection that keeps it open, old ones included."""
        for conn in list(self._live):
            if conn.keeps(pool, image) and conn.hold():  # else its shutdown closes it
                await self._on_held(conn, lambda c: c.close_kept(pool, image), action, pool)

    # -- the pool ----------------------------------------------------------------------------

    async def _current(self) -> Connection:
        await self.connect()
        conn = self._connection
        if conn is None:  # dropped while connecting (the fencing step failed)
            raise CephUnavailable("the Ceph connection was dropped while connecting; retry")
        return conn

    async def _on(
        self,
        conn: Connection,
        fn: Callable[[Connection], T],
        action: str,
        pool: str | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> T:
        if not conn.hold():
            raise CephUnavailable("the Ceph connection was closed; retry")
        return await self._on_held(conn, fn, action, pool, executor)

    async def _on_held(
        self,
        conn: Connection,
        fn: Callable[[Connection], T],
        action: str,
        pool: str | None,
        executor: ThreadPoolExecutor | None = None,
    ) -> T:
        """Run ``fn(conn)`` in the pool under the use the caller took; the use is given
        back when ``fn`` returns, even long after our deadline, or when it never starts."""

        def call() -> T:
            try:
                return fn(conn)
            finally:
                conn.release()

        try:
            future = self._submit(call, executor or self._executor)
        except CephUnavailable:
            conn.release()
            raise
        future.add_done_callback(lambda f: _release_if_cancelled(f, conn))
        try:
            try:
                # asyncio.timeout, not wait_for: no task of its own per call (every Ceph
                # call of every request passes here).
                async with asyncio.timeout(self.deadline):
                    return await asyncio.wrap_future(future)
            except TimeoutError as exc:
                raise CephUnavailable(
                    f"Ceph did not answer within {self.deadline:.0f} s while {action}; "
                    "check that the cluster's monitors and OSDs are up and reachable"
                ) from exc
            except (rados.Error, rbd.Error) as exc:
                raise translate(exc, action, pool, self.who) from exc
        except CephUnavailable:
            self._retire(conn)
            raise

    def _submit(self, fn: Callable[[], T], executor: ThreadPoolExecutor | None = None) -> Future[T]:
        try:
            return (executor or self._executor).submit(fn)
        except RuntimeError as exc:  # the pool is shut down: we are closing
            raise CephUnavailable(f"the Ceph client of {self.tenant.name} is closed") from exc

    def _retire(self, conn: Connection) -> None:
        # A blocklisted or timed-out handle stays broken: new calls get a new one.
        if self._connection is conn:
            self._connection = None
            log.warning("tenant %s: dropping the Ceph connection; reconnecting on next use",
                        self.tenant.name)  # fmt: skip
        conn.retire()

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._readers.shutdown(wait=False, cancel_futures=True)
        self._connection = None
        live, self._live = list(self._live), set()
        for conn in live:
            conn.retire()
        if not live:
            return
        _, pending = await asyncio.wait(
            [asyncio.wrap_future(c.closed) for c in live], timeout=self.deadline
        )
        if pending:
            log.warning(
                "tenant %s: Ceph connection still in use by a stuck call; it is shut down "
                "when that call ends", self.tenant.name,
            )  # fmt: skip


def _seen(attempt: asyncio.Future[None]) -> None:
    """Its callers got the outcome (or went away): never 'exception was never retrieved'."""
    if not attempt.cancelled():
        attempt.exception()


def _release_if_cancelled(future: Future[Any], conn: Connection) -> None:
    if future.cancelled():  # it never ran, so never gave its use back
        conn.release()


def _shut_down_late(future: Future[rados.Rados]) -> None:
    if not future.cancelled() and future.exception() is None:
        threading.Thread(target=future.result().shutdown, name="ceph-late-shutdown").start()


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
