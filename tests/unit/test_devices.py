"""Waiting for block devices: udev events (a monitor fed through a real pipe, as
netlink would be), the udev database for devices udev already knew, the polling
fallback where udev does not run, and a krbd map rolled back when its node never
comes. The in-guest kernel tier runs the same code against a real systemd-udevd."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rbdplugin.devices import PollWatch, UdevWatch
from rbdplugin.errors import DeadlineExceeded
from rbdplugin.mapping.krbd import KrbdMapper
from rbdplugin.process import Command
from tests.unit.test_mappers import IMAGE, FakeRunner, write


@dataclass
class FakeDevice:
    action: str
    device_node: str
    device_links: list[str] = field(default_factory=list)


class FakeMonitor:
    """pyudev.Monitor's face: fileno() readable when events are queued, poll(0) pops one."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.queue: list[FakeDevice] = []

    def fileno(self) -> int:
        return self.read_end

    def announce(self, device: FakeDevice) -> None:
        self.queue.append(device)
        os.write(self.write_end, b"x")

    def poll(self, timeout: float) -> FakeDevice | None:
        if not self.queue:
            return None
        os.read(self.read_end, 1)
        return self.queue.pop(0)


def test_udev_wait_returns_on_the_event_that_names_the_link(tmp_path: Path) -> None:
    monitor = FakeMonitor()
    watch = UdevWatch(monitor, data=tmp_path)
    link = "/dev/disk/by-id/virtio-0123456789abcdef0123"

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, monitor.announce, FakeDevice("add", "/dev/vdc", []))
        loop.call_later(0.3, monitor.announce, FakeDevice("add", "/dev/vdb", [link]))
        started = time.monotonic()
        await watch.wait_for(link, "volume v", 5)
        return time.monotonic() - started

    assert 0.25 < asyncio.run(scenario()) < 2


def test_udev_wait_fails_at_its_deadline(tmp_path: Path) -> None:
    watch = UdevWatch(FakeMonitor(), data=tmp_path)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="udev did not create /dev/rbd7"):
        asyncio.run(watch.wait_for("/dev/rbd7", "the map", 0.5))
    assert time.monotonic() - started < 2


def test_a_device_udev_already_knows_needs_no_event(tmp_path: Path) -> None:
    node = "/dev/null"  # a real device node with a udev-style record under data/
    rdev = os.stat(node).st_rdev
    (tmp_path / f"c{os.major(rdev)}:{os.minor(rdev)}").touch()
    (tmp_path / f"b{os.major(rdev)}:{os.minor(rdev)}").touch()
    asyncio.run(UdevWatch(FakeMonitor(), data=tmp_path).wait_for(node, "known", 1))


def test_without_udev_the_node_is_polled_for(tmp_path: Path) -> None:
    node = tmp_path / "rbd3"

    async def scenario() -> None:
        asyncio.get_running_loop().call_later(0.2, node.touch)
        await PollWatch().wait_for(str(node), "the map", 5)

    asyncio.run(scenario())
    with pytest.raises(DeadlineExceeded, match="did not appear within"):
        asyncio.run(PollWatch().wait_for(str(tmp_path / "never"), "the map", 0.3))


def test_a_map_whose_node_never_appears_is_rolled_back(tmp_path: Path) -> None:
    host = write(tmp_path, {"sys/bus/rbd/add": ""})

    def kernel_maps_without_node(command: Command) -> None:
        if command.argv[2] == "map":
            base = tmp_path / "sys/bus/rbd/devices/5"
            base.mkdir(parents=True, exist_ok=True)
            for attr, value in (("pool", "tenant"), ("pool_ns", ""), ("name", "vol1"),
                                ("current_snap", "-")):  # fmt: skip
                (base / attr).write_text(value + "\n")

    runner = FakeRunner((0, "/dev/rbd5\n", ""), on_call=kernel_maps_without_node)
    with pytest.raises(DeadlineExceeded, match="rbd5"):
        asyncio.run(KrbdMapper(runner, host, 1).map(IMAGE))
    assert runner.calls[-1] == ["rbd", "device", "unmap", "--options", "noudev", "/dev/rbd5"]
