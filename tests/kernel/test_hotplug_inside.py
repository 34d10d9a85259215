"""Runs inside the kernel-tier guest only (real kernel, real systemd-udevd): a virtio
disk hot-plugged with a serial, as Nova attaches a Cinder volume, is found through
udev by its ``/dev/disk/by-id/virtio-<serial>`` link, awaited with a monitor started
before the plug; its unplug is awaited the same way.

The plug itself happens on the host: this test asks for it by writing
``plug`` (then ``unplug``) into the folder RBDPLUGIN_HOTPLUG_DIR (the guest's /out,
shared with the host), and tests/kernel/test_kernel_tier.py answers through QEMU's
QMP socket (rbdplugin.devcloud.qmp)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from rbdplugin.devices import Devices
from tests.helpers import unique

pytestmark = pytest.mark.kernel_inside

DEADLINE = 120  # a TCG guest's ACPI hot-plug plus udev take seconds


def _exchange() -> Path:
    folder = os.environ.get("RBDPLUGIN_HOTPLUG_DIR")
    assert folder, "RBDPLUGIN_HOTPLUG_DIR is unset: run this through tests/kernel/inside.sh"
    return Path(folder)


def test_a_hot_plugged_disk_is_awaited_by_its_serial_through_udev() -> None:
    assert Path("/run/udev/control").exists(), "systemd-udevd must run in the guest"
    exchange, serial = _exchange(), unique("hotplug")[:20]
    link = f"/dev/disk/by-id/virtio-{serial}"
    devices = Devices()

    async def plug() -> float:
        async with devices.watch() as watch:  # started before the plug: no event is missed
            assert not os.path.lexists(link)
            (exchange / "plug").write_text(serial)
            started = time.monotonic()
            await watch.wait_for(link, "the hot-plugged disk", DEADLINE)
            return time.monotonic() - started

    took = asyncio.run(plug())
    disk = os.path.realpath(link)
    name = Path(disk).name
    assert re.fullmatch(r"/dev/vd[a-z]+", disk), disk
    # What the kernel says about that disk, read from sysfs (not through the product).
    assert Path(f"/sys/block/{name}/serial").read_text().strip() == serial
    print(f"hot-plugged disk: udev made {link} -> {os.readlink(link)} ({disk}) "
          f"{took:.1f} s after the plug")  # fmt: skip

    async def unplug() -> None:
        async with devices.watch() as watch:
            (exchange / "unplug").write_text(serial)
            await watch.wait_gone(link, "the unplugged disk", DEADLINE)

    asyncio.run(unplug())
    assert not Path(f"/sys/block/{name}").exists()
    answer = exchange / "unplugged"
    deadline = time.monotonic() + 30
    while not answer.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert answer.read_text().strip() == "ok", answer.read_text()
    print(f"unplugged: {link} and /sys/block/{name} are gone")
