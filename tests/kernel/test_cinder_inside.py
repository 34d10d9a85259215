"""Runs inside the kernel-tier guest only: Cinder-attach mode with a real virtio hot-plug.

The host runs a devcloud (real Keystone, real Cinder, the Nova stand-in) whose pretend
server ``vm`` is this guest: Nova's attach ``blockdev-add``s the volume's RBD image
into this guest's QEMU through QMP and plugs a ``virtio-blk-pci`` with the volume id as
serial, so this guest's own kernel and udev make the disk and its by-id link, and the
plugin here awaits it with a pyudev monitor. The guest reaches the host's services
only through QEMU's restricted forwards (10.0.2.100) and ``rbdplugin.devcloud.bridge``,
which makes the catalog's 127.0.0.1 URLs work here. tests/kernel/test_kernel_tier.py
starts the devcloud and puts ``clouds.yaml`` and ``cloud.json`` in RBDPLUGIN_CINDER_DIR.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import oracle
from tests.helpers import DaemonProcess, unique, write_config

pytestmark = pytest.mark.kernel_inside

DRIVER = "vm"


def _exchange() -> Path:
    folder = os.environ.get("RBDPLUGIN_CINDER_DIR")
    assert folder, "RBDPLUGIN_CINDER_DIR is unset: run this through tests/kernel/inside.sh"
    problem = Path(folder, "error")
    assert not problem.exists(), f"the host could not start the devcloud: {problem.read_text()}"
    return Path(folder)


@pytest.fixture(scope="module")
def cloud() -> Iterator[dict[str, Any]]:
    exchange = _exchange()
    info: dict[str, Any] = json.loads((exchange / "cloud.json").read_text())
    ports = [str(port) for port in info["ports"].values()]
    bridge = subprocess.Popen(
        [sys.executable, "-m", "rbdplugin.devcloud.bridge", "--to", "10.0.2.100", *ports],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert bridge.stdout is not None
    ready = bridge.stdout.readline()
    assert "bridge: ready" in ready, ready
    yield {**info, "clouds_yaml": str(exchange / "clouds.yaml")}
    bridge.terminate()
    bridge.wait(10)


@pytest.fixture(scope="module")
def plugin(cloud: dict[str, Any]) -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="rbdp-gc-", dir="/tmp"))
    config = write_config(
        root / "rbdplugin.toml",
        f"""[daemon]
socket_dir = "{root}/plugins"
state_dir = "{root}/state"
mount_root = "{root}/mounts"
metrics = ""
op_timeout = 100

[tenants.{DRIVER}]
backend = "cinder"
cloud = "devcloud"
clouds_yaml = "{cloud["clouds_yaml"]}"
server_id = "{cloud["server_id"]}"
default_size = "1G"
attach_timeout = "100s"
detach_timeout = "100s"
""",
    )
    daemon = DaemonProcess(config, root / "daemon.log", root / "plugins")
    yield daemon.start(DRIVER, timeout=120)
    daemon.stop()


def test_a_cinder_volume_is_hot_plugged_found_by_udev_and_mounted(
    plugin: DaemonProcess,
) -> None:
    client, name = plugin.client(DRIVER), unique("kc")
    assert client.create(name, {"size": "1G"}) == {"Err": ""}
    volume_id = client.get(name)["Volume"]["Status"]["cinder_volume"]
    link = Path(f"/dev/disk/by-id/virtio-{volume_id[:20]}")
    assert not os.path.lexists(link)

    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c1"})
    assert reply["Err"] == "", reply
    path = Path(reply["Mountpoint"])
    disk = os.path.realpath(link)
    assert re.fullmatch(r"/dev/vd[a-z]+", disk), disk
    # The kernel's word on the disk (sysfs), and what is mounted there (mountinfo).
    assert Path(f"/sys/block/{Path(disk).name}/serial").read_text().strip() == volume_id[:20]
    sources = [e["source"] for e in oracle.mountinfo() if e["target"] == str(path)]
    assert sources == [disk], sources
    print(f"cinder volume {volume_id} in the guest: udev made {link} -> {os.readlink(link)}; "
          f"{disk} mounted at {path} ({oracle.fstype_at(path)})")  # fmt: skip
    (path / "data").write_text("through Nova and QMP")
    assert "udev does not run here" not in plugin.log()  # awaited through udev, not polled

    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c1"}) == {"Err": ""}
    assert not os.path.lexists(link) and not Path(f"/sys/block/{Path(disk).name}").exists()
    print(f"after Unmount: {link} and {disk} are gone (device_del, the guest let go)")

    again = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c2"})
    assert again["Err"] == "", again
    assert (Path(again["Mountpoint"]) / "data").read_text() == "through Nova and QMP"
    print(f"mounted again: the data is there ({os.path.realpath(link)})")
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c2"}) == {"Err": ""}
    assert client.remove(name) == {"Err": ""}
