"""Waiting for block devices to appear: the one place that knows udev.

A mapper (krbd, rbd-nbd) or an attach (Cinder) makes the kernel add a block
device; its node's links (``/dev/rbd/POOL/IMAGE``, ``/dev/disk/by-id/...``) exist,
and the device is ready for others, only once udev has processed that event.
Where udev runs, a pyudev monitor is started *before* the action that adds the
device (so its event cannot be missed) and the caller awaits the processed event
under one deadline. Where udev does not run (a container, a host without
systemd-udevd), the node comes from devtmpfs and links never come: the wait falls
back to polling for the node, and the log says so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pyudev

from rbdplugin.errors import DeadlineExceeded

log = logging.getLogger(__name__)
POLL = 0.05
UDEV_CONTROL = Path("/run/udev/control")
UDEV_DATA = Path("/run/udev/data")


class Watch(Protocol):
    async def wait_for(self, path: str, what: str, seconds: float) -> None:
        """Return once ``path`` (a device node or link) is there; DeadlineExceeded if not."""
        ...

    async def wait_for_any(self, paths: Sequence[str], what: str, seconds: float) -> str:
        """The first of ``paths`` (the forms one disk's link can take) that is there."""
        ...

    async def wait_gone(self, path: str, what: str, seconds: float) -> None:
        """Return once ``path`` is gone (a detached disk); DeadlineExceeded if not."""
        ...


class UdevWatch:
    """Events from a pyudev monitor that was started before the action."""

    def __init__(self, monitor: Any, data: Path = UDEV_DATA) -> None:
        self.monitor = monitor
        self.data = data
        self.seen: set[str] = set()

    def _drain(self) -> None:
        while (device := self.monitor.poll(timeout=0)) is not None:
            if device.action in ("add", "change") and device.device_node:
                self.seen.add(str(device.device_node))
                self.seen.update(str(link) for link in device.device_links)

    def _processed(self, path: str) -> bool:
        """udev finished with ``path``: we saw its event, or it already has a udev record."""
        if path in self.seen:
            return True
        try:
            rdev = os.stat(path).st_rdev
        except OSError:
            return False
        return (self.data / f"b{os.major(rdev)}:{os.minor(rdev)}").exists() and (
            not path.startswith("/dev/disk/") or os.path.islink(path)
        )

    async def wait_for(self, path: str, what: str, seconds: float) -> None:
        await self.wait_for_any([path], what, seconds)

    async def wait_for_any(self, paths: Sequence[str], what: str, seconds: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        fd = self.monitor.fileno()
        while True:
            self._drain()
            for path in paths:
                if self._processed(path):
                    return path
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"udev did not create {' or '.join(paths)} for {what} within {seconds:.0f} s "
                    "(is systemd-udevd running and keeping up? udevadm monitor shows its events)"
                )
            await _readable(fd, min(remaining, 1.0))

    async def wait_gone(self, path: str, what: str, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        # udev removes a disk's links while it processes the disk's remove event.
        while os.path.lexists(path):
            self._drain()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"{path} ({what}) was still there after {seconds:.0f} s")
            await _readable(self.monitor.fileno(), min(remaining, 0.5))


async def _readable(fd: int, seconds: float) -> None:
    """Wait until ``fd`` has data, at most ``seconds``."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, seconds)
    finally:
        loop.remove_reader(fd)


class PollWatch:
    """No udev here: wait for the node itself, which devtmpfs creates."""

    async def wait_for(self, path: str, what: str, seconds: float) -> None:
        await self.wait_for_any([path], what, seconds)

    async def wait_for_any(self, paths: Sequence[str], what: str, seconds: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            for path in paths:
                if Path(path).exists():
                    return path
            if loop.time() > deadline:
                raise DeadlineExceeded(
                    f"{' or '.join(paths)} for {what} did not appear within {seconds:.0f} s"
                )
            await asyncio.sleep(POLL)

    async def wait_gone(self, path: str, what: str, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while os.path.lexists(path):
            if loop.time() > deadline:
                raise DeadlineExceeded(f"{path} ({what}) was still there after {seconds:.0f} s")
            await asyncio.sleep(POLL)


class Devices:
    """Watches for block devices, with udev where it runs."""

    def __init__(self, udev: bool | None = None) -> None:
        self.udev = UDEV_CONTROL.exists() if udev is None else udev
        if not self.udev:
            log.info(
                "udev does not run here (%s is missing): new block devices are awaited by "
                "polling for their nodes, and udev links (/dev/rbd/..., /dev/disk/by-id/...) "
                "are not expected", UDEV_CONTROL,
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[Watch]:
        """Start watching now, before the action that adds a device."""
        if not self.udev:
            yield PollWatch()
            return
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        monitor.filter_by(subsystem="block")
        monitor.start()
        yield UdevWatch(monitor)  # pyudev closes the monitor's socket when it is dropped
