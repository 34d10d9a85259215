"""The floors: the same work as the daemon's, done by hand with the bare library and tools.

A fresh volume by hand is what an operator would type, as the tenant's cephx user:
librbd create (the tenant's default features), qemu-storage-daemon's FUSE export with
the daemon's own command line (:meth:`FuseMapper.export_command`), ``losetup``,
``mkfs.ext4`` with the daemon's fast flags, ``mount -o nosuid,nodev``. Each step's time
is kept, so a gap to the floor can be set against the daemon's own stage metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import rados
import rbd

from bench.proc import loop_backing, mounted
from rbdplugin.filesystem import FAST_MKFS
from rbdplugin.host import HostPaths
from rbdplugin.mapping import ImageRef
from rbdplugin.mapping.fuse import FuseMapper
from rbdplugin.process import run

POLL = 0.005
TIMEOUT = 60.0
MOUNT_OPTIONS = "nosuid,nodev"  # what the daemon mounts volumes with by default


class FloorError(RuntimeError):
    pass


@dataclass
class Steps:
    """Seconds per step of the hand-run floors, every run of each step."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds.setdefault(name, []).append(time.perf_counter() - started)

    def clear(self) -> None:
        self.seconds.clear()


@dataclass
class HandMapping:
    image: str
    export: Path
    server: asyncio.subprocess.Process
    device: str = ""
    mountpoint: Path | None = None


@dataclass(frozen=True)
class Tenant:
    pool: str
    user: str
    keyring: Path
    conf: Path
    features: int


class Hand:
    """One tenant's images handled by hand; what it maps it also tears down (``close``)."""

    def __init__(self, tenant: Tenant, root: Path) -> None:
        self.tenant = tenant
        self.root = root
        self.steps = Steps()
        self.live: dict[str, HandMapping] = {}
        self.cluster = rados.Rados(
            conffile=str(tenant.conf), rados_id=tenant.user, conf={"keyring": str(tenant.keyring)}
        )
        self.cluster.connect(timeout=15)
        self.ioctx = self.cluster.open_ioctx(tenant.pool)
        self.pool = ThreadPoolExecutor(max_workers=20, thread_name_prefix="hand-librbd")
        self.mapper = FuseMapper(run, HostPaths(), root / "exports", TIMEOUT)

    # -- librbd, blocking (the floors of Create and Remove) -----------------------------

    def create_image(self, name: str, size: int) -> None:
        rbd.RBD().create(self.ioctx, name, size, old_format=False, features=self.tenant.features)

    def remove_image(self, name: str) -> None:
        rbd.RBD().remove(self.ioctx, name)

    def trash_image(self, name: str) -> None:
        rbd.RBD().trash_move(self.ioctx, name, 0)

    def purge_trash(self) -> None:
        for entry in rbd.RBD().trash_list(self.ioctx):
            with contextlib.suppress(rbd.ImageNotFound, rbd.ImageBusy):
                rbd.RBD().trash_remove(self.ioctx, entry["id"], force=True)

    def images(self) -> list[str]:
        return [str(name) for name in rbd.RBD().list(self.ioctx)]

    # -- a volume by hand ---------------------------------------------------------------

    async def create_and_mount(self, name: str, size: int) -> HandMapping:
        loop = asyncio.get_running_loop()
        with self.steps.step("create"):
            await loop.run_in_executor(self.pool, self.create_image, name, size)
        mapping = await self.map(name)
        with self.steps.step("mkfs"):
            await _tool("mkfs.ext4", "-q", *FAST_MKFS["ext4"], mapping.device)
        await self.mount(mapping)
        return mapping

    async def map(self, name: str) -> HandMapping:
        export = self.root / "exports" / name
        export.parent.mkdir(parents=True, exist_ok=True)
        export.touch()
        image = ImageRef(self.tenant.pool, "", name, self.tenant.user, self.tenant.keyring,
                         self.tenant.conf)  # fmt: skip
        argv = self.mapper.export_command(image, export)
        env = {**os.environ, "CEPH_KEYRING": str(self.tenant.keyring)}
        log = export.with_name(export.name + ".log")
        with self.steps.step("export"):
            with log.open("wb") as sink:
                server = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=sink,
                    start_new_session=True,
                )  # fmt: skip
            mapping = HandMapping(name, export, server)
            self.live[name] = mapping
            await _wait_for(lambda: _fuse_mounted(export), f"FUSE export of {name}", server, log)
        with self.steps.step("losetup"):
            mapping.device = (await _tool("losetup", "--find", "--show", str(export))).strip()
        return mapping

    async def mount(self, mapping: HandMapping) -> None:
        target = self.root / "mnt" / mapping.image
        target.mkdir(parents=True, exist_ok=True)
        with self.steps.step("mount"):
            await _tool("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, mapping.device, str(target))
        mapping.mountpoint = target

    async def teardown(self, mapping: HandMapping) -> None:
        if mapping.mountpoint is not None and mounted(str(mapping.mountpoint)):
            await _tool("umount", str(mapping.mountpoint))
        if mapping.device:
            await _tool("losetup", "--detach", mapping.device)
            # Detach completes asynchronously; the export cannot stop while the loop holds it.
            await _wait_for(lambda: not loop_backing(mapping.device), f"detach {mapping.device}")
        if mapping.server.returncode is None:
            mapping.server.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(mapping.server.wait(), TIMEOUT)
            except TimeoutError:
                mapping.server.kill()
                await mapping.server.wait()
        if _fuse_mounted(mapping.export):
            await _tool("umount", "--lazy", str(mapping.export))
        mapping.export.unlink(missing_ok=True)
        mapping.export.with_name(mapping.export.name + ".log").unlink(missing_ok=True)
        self.live.pop(mapping.image, None)

    async def close(self) -> None:
        for mapping in list(self.live.values()):
            with contextlib.suppress(Exception):
                await self.teardown(mapping)
        self.ioctx.close()
        self.cluster.shutdown()
        self.pool.shutdown(wait=False)


def _fuse_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, right = line.split(" - ", 1)
            if left.split(" ")[4] == str(path) and right.startswith("fuse"):
                return True
    return False


async def _wait_for(
    check: Callable[[], bool],
    what: str,
    server: asyncio.subprocess.Process | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if server is not None and server.returncode is not None:
            said = log.read_text(errors="replace") if log else ""
            raise FloorError(f"{what}: qemu-storage-daemon exited: {said}")
        if time.monotonic() > deadline:
            raise FloorError(f"{what}: not within {TIMEOUT:.0f} s")
        await asyncio.sleep(POLL)


async def _tool(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    if proc.returncode != 0:
        raise FloorError(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode().strip()}")
    return out.decode()
