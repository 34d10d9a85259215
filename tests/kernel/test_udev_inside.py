"""Runs inside the kernel-tier guest only (real krbd, real systemd-udevd): a map
returns once udev has made the device ready, and a map whose device udev never
announces fails at its deadline and is rolled back. The host tier has no krbd and
no udev; tests/kernel/test_kernel_tier.py boots the guest that runs this."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from rbdplugin.devices import Devices
from rbdplugin.errors import DeadlineExceeded
from rbdplugin.mapping import HostPaths, ImageRef
from rbdplugin.mapping.krbd import KrbdMapper
from rbdplugin.process import run
from tests import oracle
from tests.helpers import Admin, unique

pytestmark = pytest.mark.kernel_inside


def _image(cluster: DevCluster, admin: Admin) -> ImageRef:
    name = unique("udev")
    admin.create_image("alpha", name, 64 * 1024 * 1024)
    return ImageRef("alpha", "", name, "alpha", cluster.keyring("alpha"), cluster.conf)


def test_krbd_map_returns_once_udev_made_the_device_ready(
    cluster: DevCluster, admin: Admin
) -> None:
    assert Path("/run/udev/control").exists(), "systemd-udevd must run in the guest"
    image = _image(cluster, admin)
    mapper = KrbdMapper(run, HostPaths(), 30, devices=Devices())
    mapped = asyncio.run(mapper.map(image))
    try:
        # udev's rule (ceph-common's 50-rbd.rules) made this link while processing the add
        # event the mapper waited for: it is there the moment map returns.
        link = Path(f"/dev/rbd/alpha/{image.image}")
        assert link.is_symlink() and os.path.realpath(link) == mapped.device
        print(f"krbd map: {mapped.device}, udev link {link} -> {os.readlink(link)}")
        assert oracle.krbd_devices()[mapped.device] == f"alpha/{image.image}"
    finally:
        asyncio.run(mapper.unmap(mapped))
    assert mapped.device not in oracle.krbd_devices()


def test_a_map_udev_never_announces_fails_at_its_deadline_and_is_rolled_back(
    cluster: DevCluster, admin: Admin
) -> None:
    image = _image(cluster, admin)
    mapper = KrbdMapper(run, HostPaths(), 12, devices=Devices())
    subprocess.run(["udevadm", "control", "--stop-exec-queue"], check=True)
    try:
        with pytest.raises(DeadlineExceeded, match="udev did not create /dev/rbd"):
            asyncio.run(mapper.map(image))
    finally:
        subprocess.run(["udevadm", "control", "--start-exec-queue"], check=True)
        subprocess.run(["udevadm", "settle", "--timeout=30"], check=False)
    assert f"alpha/{image.image}" not in oracle.krbd_devices().values()  # rolled back
