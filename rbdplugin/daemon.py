"""The daemon's lifecycle: build every tenant's parts, serve, drain, shut down.

Start-up order: state directories, per-tenant Ceph client, back-end and service,
then one Unix socket per tenant driver. Ceph being down does not stop start-up:
requests answer from local state or with a clear error until it is back.
Shutdown is the reverse: stop accepting, let in-flight requests finish, close
Ceph connections, remove the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector

from rbdplugin import memory
from rbdplugin.api import build_app
from rbdplugin.attach import Attacher
from rbdplugin.backends import Attachment, VolumeBackend
from rbdplugin.backends.rbd import RbdBackend
from rbdplugin.backends.rbd_attach import RbdAttachment
from rbdplugin.ceph import CephClient
from rbdplugin.config import Config, TenantConfig
from rbdplugin.errors import ConfigError, InvalidArgument
from rbdplugin.filesystem import Filesystems
from rbdplugin.health import CephProbe, control_app, metrics_app, socket_answers
from rbdplugin.host import HostPaths
from rbdplugin.lease import HostIdentity, Leases
from rbdplugin.mapping import Mapper
from rbdplugin.mapping.select import build_mapper
from rbdplugin.metrics import Metrics, MountedVolume, Snapshot, StateCollector
from rbdplugin.mounts import MountRecord, MountTable
from rbdplugin.notify import Notifier
from rbdplugin.pools import started_pool
from rbdplugin.process import reap_spawned, run, stuck_children
from rbdplugin.service import VolumeService
from rbdplugin.spec import validate_name
from rbdplugin.state import KnownVolumes, host_uuid
from rbdplugin.units import format_size

log = logging.getLogger(__name__)

SOCKET_BACKLOG = 1024  # dockerd sends parallel Mounts in bursts
SUN_PATH_MAX = 107
DRAIN_SECONDS = 30.0
PROGRESS_SECONDS = 0.5  # how often the service manager's STATUS follows reconciling
TRIM_SECONDS = 5.0  # malloc_trim of a ~70 MiB process takes well under a millisecond
# How long an idle client connection (a keep-alive between requests) is held open.
# aiohttp's own default is 3630 s: every dockerd, monitoring agent or probe that keeps a
# connection and goes quiet would hold a descriptor and a handler for an hour. 75 s
# (nginx's default) outlives any client's reuse of a connection between calls.
KEEPALIVE_SECONDS = 75.0
# asyncio.to_thread's pool (state-file writes, device reads): the size asyncio would pick.
BLOCKING_THREADS = min(32, (os.cpu_count() or 1) + 4)


@dataclass(frozen=True)
class Parts:
    """What a tenant's back-end is built from: the host's shared pieces."""

    config: Config
    tenant: TenantConfig
    state: Path  # the tenant's own state directory
    me: HostIdentity
    mapper: Mapper | None  # None when no tenant of this daemon uses RBD
    metrics: Metrics


async def build_backend(parts: Parts) -> tuple[VolumeBackend, Attachment]:
    """The one place a tenant's back-end is chosen: its storage face and its
    attachment face (one object for Cinder, two for RBD)."""
    daemon, tenant = parts.config.daemon, parts.tenant
    if tenant.backend == "cinder":
        # Imported here: openstacksdk is an optional extra, loaded only for Cinder tenants.
        try:
            from rbdplugin.backends.cinder import build_cinder  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError(
                f'tenants.{tenant.name}: backend = "cinder" needs openstacksdk ({exc}); '
                "install it with: pip install 'rbdplugin[cinder]'"
            ) from exc

        cinder = await build_cinder(tenant, daemon.op_timeout)
        return cinder, cinder
    assert parts.mapper is not None  # noqa: S101 - built whenever an RBD tenant exists
    client = CephClient(
        parts.config.ceph, tenant, deadline=daemon.op_timeout,
        address_file=parts.state / "client-address.json",
    )  # fmt: skip
    leases = Leases(client, parts.me, tenant.takeover, daemon.fence_seconds, parts.metrics)
    attachment = RbdAttachment(tenant, parts.config.ceph.conf, parts.mapper, leases)
    return RbdBackend(client, tenant), attachment


def http_runner(
    app: web.Application, keepalive: float = KEEPALIVE_SECONDS, **options: Any
) -> web.AppRunner:
    """The runner of every HTTP listener of the daemon (driver sockets, control socket,
    metrics): no access log, idle connections closed after ``keepalive`` seconds."""
    return web.AppRunner(app, access_log=None, keepalive_timeout=keepalive, **options)


def bind_unix(path: Path) -> socket.socket:
    """A listening-ready Unix socket at ``path``, mode 0600, refusing to steal a live one."""
    if len(str(path)) > SUN_PATH_MAX:
        raise ConfigError(f"socket path {path} is longer than {SUN_PATH_MAX} bytes")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{path} exists and is not a socket; remove it or change socket_dir")
        if socket_answers(path):
            raise ConfigError(f"another process already serves {path}; stop it first")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600 from the start: no window where others can connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    return sock


@dataclass
class Driver:
    tenant: TenantConfig
    service: VolumeService
    runner: web.AppRunner
    socket_path: Path
    probe: CephProbe


class Daemon:
    def __init__(
        self,
        config: Config,
        host: HostPaths | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.host = host or HostPaths()
        self.drivers: list[Driver] = []
        self.mapper: Mapper | None = None
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        ProcessCollector(registry=self.registry)
        self.registry.register(StateCollector(self.snapshot))
        self._side: list[web.AppRunner] = []  # metrics listener and control socket
        self.host_uuid = ""

    async def start(self) -> None:
        daemon = self.config.daemon
        for path in (daemon.state_dir, daemon.mount_root):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.host_uuid = host_uuid(daemon.state_dir)
        # Cinder tenants attach through Nova: a daemon serving only those maps nothing.
        if any(t.backend == "rbd" for t in self.config.tenants):
            self.mapper = build_mapper(
                daemon.mapper, run, self.host, daemon.state_dir, daemon.op_timeout
            )
        mapper = self.mapper
        try:
            for tenant in self.config.tenants:
                self.drivers.append(await self._start_driver(tenant, mapper))
        except BaseException:
            await self.stop()
            raise
        try:
            await self._start_side()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "rbdplugin serving %s as host %s",
            ", ".join(f"{d.tenant.driver} at {d.socket_path}" for d in self.drivers),
            daemon.host_id,
        )

    async def _start_driver(self, tenant: TenantConfig, mapper: Mapper | None) -> Driver:
        # Bind first: a second daemon on the same sockets must fail before it touches
        # Ceph, mounts or the state (it would otherwise fence the live one's address).
        path = self.config.daemon.socket_dir / f"{tenant.driver}.sock"
        sock = bind_unix(path)
        try:
            service = await self._build_service(tenant, mapper)
        except BaseException:
            sock.close()
            path.unlink(missing_ok=True)
            raise
        runner = http_runner(
            build_app(tenant.driver, service, self.metrics),
            handle_signals=False,
            shutdown_timeout=DRAIN_SECONDS,
        )
        try:
            await runner.setup()
            await web.SockSite(runner, sock, backlog=SOCKET_BACKLOG).start()
        except BaseException:
            await runner.cleanup()
            await service.close()
            path.unlink(missing_ok=True)
            raise
        return Driver(tenant, service, runner, path, CephProbe(service))

    async def _build_service(self, tenant: TenantConfig, mapper: Mapper | None) -> VolumeService:
        daemon = self.config.daemon
        state = daemon.state_dir / tenant.name
        me = HostIdentity(daemon.host_id, self.host_uuid)
        parts = Parts(self.config, tenant, state, me, mapper, self.metrics)
        backend, attachment = await build_backend(parts)
        attacher = Attacher(
            tenant=tenant, mount_root=daemon.mount_root,
            filesystems=Filesystems(run, self.host, daemon.op_timeout), backend=backend,
            attachment=attachment, metrics=self.metrics, teardown_seconds=daemon.op_timeout / 2,
            table=MountTable(state / "mounts.json", upgrade=attachment.upgrade_record),
        )  # fmt: skip
        service = VolumeService(
            tenant=tenant, backend=backend, attacher=attacher, metrics=self.metrics,
            known=KnownVolumes(state / "known-volumes.json"), host_id=daemon.host_id,
            op_timeout=daemon.op_timeout, lease_check_seconds=daemon.lease_check_seconds,
        )  # fmt: skip
        service.start()  # reconciles in the background: the socket answers at once
        return service

    async def _start_side(self) -> None:
        daemon = self.config.daemon
        control = daemon.state_dir / "control.sock"
        actions = {"resize": self._resize, "snapshot": self.snapshot_action}
        runner = http_runner(control_app(self.status, actions))
        await runner.setup()
        self._side.append(runner)
        await web.SockSite(runner, bind_unix(control)).start()
        if daemon.metrics:
            host, _, port = daemon.metrics.rpartition(":")
            runner = http_runner(metrics_app(self.registry, self.readiness))
            await runner.setup()
            self._side.append(runner)
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
            log.info("metrics and health on http://%s/metrics, /healthz, /readyz", daemon.metrics)

    async def readiness(self) -> dict[str, Any]:
        drivers: dict[str, Any] = {}
        for driver in self.drivers:
            listening = socket_answers(driver.socket_path)
            reached = await driver.probe.check()
            reconciled = driver.service.ready
            # Ceph for RBD tenants; Keystone and Cinder for Cinder tenants.
            where = "openstack" if driver.tenant.backend == "cinder" else "ceph"
            drivers[driver.tenant.driver] = {
                "socket": str(driver.socket_path), "listening": listening, where: reached,
                "reconciled": reconciled, "ready": listening and reached == "up" and reconciled,
            }  # fmt: skip
        ready = bool(drivers) and all(d["ready"] for d in drivers.values())
        return {"ready": ready, "drivers": drivers}

    def snapshot(self) -> Snapshot:
        mounted = []
        for driver in self.drivers:
            attacher = driver.service.attacher
            for record, device in attacher.mounted_volumes():
                size, used = _usage(attacher, record)
                mounted.append(
                    MountedVolume(driver.tenant.name, record.volume, device.via,
                                  record.references, size, used, bool(record.broken))
                )  # fmt: skip
        connected = {d.tenant.name: d.service.backend.connected for d in self.drivers}
        cinder = {d.tenant.name for d in self.drivers if d.tenant.backend == "cinder"}
        ceph = {name: up for name, up in connected.items() if name not in cinder}
        openstack = {name: up for name, up in connected.items() if name in cinder}
        try:  # scraped from the daemon's own loop; a leak of tasks shows here
            tasks: int | None = len(asyncio.all_tasks())
        except RuntimeError:
            tasks = None
        return Snapshot(mounted, [d.tenant.name for d in self.drivers], ceph, openstack, tasks)

    async def status(self) -> dict[str, Any]:
        volumes = []
        for driver in self.drivers:
            attacher = driver.service.attacher
            cleaning = attacher.cleaning()
            for record in attacher.records():
                volumes.append({
                    "driver": driver.tenant.driver, "volume": record.volume,
                    "image": attacher.describe(record), "phase": record.phase,
                    "access": record.mode, "mountpoint": record.mountpoint,
                    "device": record.device.path if record.device else "",
                    "mounts": dict(record.counts), "since": record.since, "lost_to": record.lost,
                    "broken": record.broken, "cleaning_since": cleaning.get(record.volume, ""),
                })  # fmt: skip
        return {
            "host_id": self.config.daemon.host_id,
            "host_uuid": self.host_uuid,
            "stuck_children": stuck_children(),
            "mapper": self.mapper.name if self.mapper else "",
            "health": await self.readiness(),
            "volumes": volumes,
        }

    async def resize(self, driver: object, name: object, size: object) -> dict[str, Any]:
        """``rbdplugin volume resize``: grow volume ``name`` of ``driver`` (which may be
        left out when the daemon serves one driver) to ``size``."""
        service = self._driver(driver).service
        done = await service.resize(name, size)
        return {
            "Driver": service.tenant.driver, "Name": done.name,
            "Before": format_size(done.before), "Size": format_size(done.size),
            "SizeBytes": done.size, "Filesystem": done.filesystem, "Complete": done.complete,
        }  # fmt: skip

    async def _resize(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.resize(body.get("Driver"), body.get("Name"), body.get("Size"))

    async def snapshot_action(self, body: dict[str, Any]) -> dict[str, Any]:
        """``rbdplugin snapshot create|rm|ls``: ``Action`` on volume ``Name`` of ``Driver``
        (``Snapshot`` names it for create and rm)."""
        service = self._driver(body.get("Driver")).service
        name, snapshot, action = (
            validate_name(body.get("Name")),
            body.get("Snapshot"),
            body.get("Action"),
        )
        answer: dict[str, Any] = {"Driver": service.tenant.driver, "Name": name}
        if action == "create":
            answer.update(Snapshot=snapshot, Frozen=await service.snapshot(name, snapshot))
        elif action == "rm":
            await service.remove_snapshot(name, snapshot)
            answer.update(Snapshot=snapshot)
        elif action == "ls":
            view = await service.get(name)
            answer.update(Snapshots=view.status.get("snapshots", []))
        else:
            raise InvalidArgument(f"snapshot action {action!r} is not one of create, rm, ls")
        return answer

    def _driver(self, name: object) -> Driver:
        names = ", ".join(d.tenant.driver for d in self.drivers)
        if name is None or name == "":
            if len(self.drivers) == 1:
                return self.drivers[0]
            raise InvalidArgument(f"this daemon serves several drivers ({names}): name one")
        for driver in self.drivers:
            if driver.tenant.driver == name:
                return driver
        raise InvalidArgument(f"no driver {name!r} here; this daemon serves: {names}")

    async def stop(self) -> None:
        side, self._side = self._side, []
        for runner in side:
            await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            (self.config.daemon.state_dir / "control.sock").unlink()
        drivers, self.drivers = self.drivers, []
        for driver in drivers:
            await driver.runner.cleanup()  # stops accepting, then drains in-flight requests
        for driver in drivers:
            await driver.service.close()
            with contextlib.suppress(FileNotFoundError):
                driver.socket_path.unlink()
        if drivers:
            log.info("rbdplugin stopped")


def _usage(attacher: Attacher, record: MountRecord) -> tuple[int | None, int | None]:
    try:
        usage = attacher.usage(record)
    except OSError:
        return None, None
    return usage.size, usage.used


async def serve(config: Config, notifier: Notifier | None = None) -> None:
    """Serve until SIGINT or SIGTERM, telling the service manager (if any) how it goes."""
    notifier = notifier or Notifier.from_environ()
    memory.limit_arenas()  # before librados and the thread pools start their threads
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(started_pool(BLOCKING_THREADS, "blocking"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    notifier.status("starting: binding the driver sockets")
    daemon = Daemon(config)
    await daemon.start()
    # READY as soon as every driver's socket listens, not after reconciling: that can
    # wait for Ceph indefinitely, and Docker (ordered after us) must not wait with it.
    # Requests that need the mount table wait for it in the service.
    notifier.ready(_sockets(daemon) + "; reconciling mounts")
    progress = asyncio.create_task(report_progress(daemon, notifier))
    trimmer = asyncio.create_task(trim_memory())
    try:
        await stop.wait()
        log.info("rbdplugin stopping: draining requests")
        notifier.stopping("stopping: draining requests")
    finally:
        for task in (progress, trimmer):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await daemon.stop()


async def trim_memory() -> None:
    """Hand freed memory back to the kernel now and then (see :mod:`rbdplugin.memory`),
    and reap export processes that died on their own."""
    while True:
        await asyncio.sleep(TRIM_SECONDS)
        memory.trim()
        for pid in reap_spawned():
            log.debug("reaped child %d", pid)


async def report_progress(daemon: Daemon, notifier: Notifier) -> None:
    """STATUS lines while drivers reconcile their mount tables, then one when all have."""
    said = ""
    while waiting := [d.tenant.driver for d in daemon.drivers if not d.service.ready]:
        status = f"{_sockets(daemon)}; reconciling mounts of {', '.join(waiting)}"
        if status != said:
            notifier.status(status)
            said = status
        await asyncio.sleep(PROGRESS_SECONDS)
    notifier.status(f"{_sockets(daemon)}; mounts reconciled, ready")


def _sockets(daemon: Daemon) -> str:
    return "listening for " + ", ".join(d.tenant.driver for d in daemon.drivers)
