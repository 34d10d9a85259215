"""Runs inside the kernel-tier guest only: Cinder-attach mode with a real virtio hot-plug.

The host runs a devcloud (real Keystone, real Cinder, the Nova stand-in) whose pretend
server ``vm`` is this guest: Nova's attach ``blockdev-add``s the volume's RBD image
into this guest's QEMU through QMP and plugs a ``virtio-blk-pci`` with the volume id as
serial, so this guest's own kernel and udev make the disk and its by-id link, and the
plugin here awaits it with a pyudev monitor. A resize of a mounted volume goes through
Cinder's os-extend, whose ``volume-extended`` event makes Nova ``block_resize`` that disk:
this guest's kernel sees its new capacity and the plugin grows the filesystem. The
guest reaches the host's services only through QEMU's restricted forwards (10.0.2.100)
and ``rbdplugin.devcloud.bridge``, which makes the catalog's 127.0.0.1 URLs work here.
tests/kernel/test_kernel_tier.py starts the devcloud and puts ``clouds.yaml`` and
``cloud.json`` in RBDPLUGIN_CINDER_DIR.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import oracle
from tests.helpers import (
    DaemonProcess,
    PluginClient,
    mount_volume,
    sha256_of,
    unique,
    unmount_volume,
    write_config,
    write_random,
)

pytestmark = pytest.mark.kernel_inside

DRIVER = "vm"
GiB = 1 << 30


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


def test_a_mounted_cinder_volume_grows_online_through_nova_and_qmp_block_resize(
    cloud: dict[str, Any], plugin: DaemonProcess
) -> None:
    """The daemon's resize of a mounted volume: Cinder's os-extend (3.42), whose
    volume-extended event makes Nova's stand-in ``block_resize`` the disk it hot-plugged
    into this guest; this guest's kernel sees the virtio disk's new capacity, and the
    daemon grows the mounted ext4 online (root here has CAP_SYS_RESOURCE)."""
    client, name = plugin.client(DRIVER), unique("kg")
    assert client.create(name, {"size": "1G", "fstype": "ext4"}) == {"Err": ""}
    volume_id = client.get(name)["Volume"]["Status"]["cinder_volume"]
    path = mount_volume(client, name, "g")
    try:
        disk = Path(os.path.realpath(f"/dev/disk/by-id/virtio-{volume_id[:20]}"))
        assert re.fullmatch(r"/dev/vd[a-z]+", str(disk)), disk
        assert [e["source"] for e in oracle.mountinfo() if e["target"] == str(path)] == [str(disk)]
        assert oracle.fstype_at(path) == "ext4"
        assert sectors(disk) * 512 == device_bytes(disk) == GiB
        before_fs = fs_bytes(path)
        kept = write_random(path / "data")

        state_dir = Path(tomllib.loads(plugin.config.read_text())["daemon"]["state_dir"])
        control = PluginClient(state_dir / "control.sock", timeout=120)
        grown = control.call("volumes/resize", {"Driver": DRIVER, "Name": name, "Size": "2G"})
        print(f"\nresize of the mounted {disk}: {grown}")
        assert grown.get("Err", "") == "" and grown["Complete"] is True, grown
        assert "grew online" in grown["Filesystem"], grown

        # The kernel's word (sysfs and the BLKGETSIZE64 ioctl), what is still mounted there,
        # statvfs of the mounted filesystem, Cinder's own record, and the bytes.
        assert sectors(disk) * 512 == device_bytes(disk) == 2 * GiB
        assert [e["source"] for e in oracle.mountinfo() if e["target"] == str(path)] == [str(disk)]
        assert fs_bytes(path) > before_fs + GiB * 9 // 10, (before_fs, fs_bytes(path))
        in_cinder = cinder_volume(cloud, volume_id)
        assert (in_cinder["size"], in_cinder["status"]) == (2, "in-use"), in_cinder
        assert sha256_of(path / "data") == kept
        print(
            f"{disk}: {device_bytes(disk)} bytes; ext4 at {path}: {fs_bytes(path)} bytes "
            f"(was {before_fs}); Cinder: {in_cinder['size']} GiB, {in_cinder['status']}"
        )
    finally:
        unmount_volume(client, name, "g")
    assert client.remove(name) == {"Err": ""}


def sectors(disk: Path) -> int:
    """The disk's size in 512-byte sectors, as the kernel shows it in sysfs."""
    return int(Path(f"/sys/block/{disk.name}/size").read_text())


def device_bytes(disk: Path) -> int:
    argv = ["blockdev", "--getsize64", str(disk)]
    return int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def fs_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_blocks * stat.f_frsize


def cinder_volume(cloud: dict[str, Any], volume_id: str) -> dict[str, Any]:
    """The volume as Cinder shows it to the project: Keystone's token and catalog, and
    Cinder's GET, over plain HTTP (neither the plugin's client nor openstacksdk, whose
    import alone costs seconds under TCG)."""
    config = yaml.safe_load(Path(cloud["clouds_yaml"]).read_text())["clouds"]["devcloud"]
    auth = config["auth"]
    credential = {"id": auth["application_credential_id"],
                  "secret": auth["application_credential_secret"]}  # fmt: skip
    identity = {"methods": ["application_credential"], "application_credential": credential}
    token, reply = http(f"{auth['auth_url'].rstrip('/')}/auth/tokens",
                        {"auth": {"identity": identity}})  # fmt: skip
    url = next(
        e["url"]
        for service in reply["token"]["catalog"]
        if service["type"] == "volumev3"
        for e in service["endpoints"]
        if e["interface"] == "public" and e["region_id"] == config["region_name"]
    )
    volume: dict[str, Any] = http(f"{url}/volumes/{volume_id}", token=token)[1]["volume"]
    return volume


def http(url: str, body: dict[str, Any] | None = None, token: str = "") -> tuple[str, Any]:
    """POST ``body`` (or GET) to the devcloud; Keystone's X-Subject-Token and the JSON."""
    headers = {"Content-Type": "application/json"} | ({"X-Auth-Token": token} if token else {})
    data = None if body is None else json.dumps(body).encode()
    assert url.startswith("http://127.0.0.1:"), url  # the bridge's, to the host's devcloud
    request = urllib.request.Request(url, data, headers)  # noqa: S310 - checked just above
    with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310
        return reply.headers.get("X-Subject-Token", ""), json.load(reply)
