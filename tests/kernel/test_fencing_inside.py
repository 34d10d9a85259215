"""Runs inside the kernel-tier guest only, with the krbd mapper: the kernel itself
refuses a second writer of a leased image (map option exclusive), and fencing one
volume's holder leaves the same host's other krbd volumes writable (map option
noshare: every mapping has a Ceph client of its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import unique
from tests.integration.test_locks import direct_write_fails
from tests.integration.test_mount import mount, unmount

# inside.sh runs this module with the krbd mapper only.
pytestmark = pytest.mark.kernel_inside


def test_the_kernel_refuses_a_second_writer_of_a_leased_image(
    cluster: DevCluster, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    daemon = daemon_factory(tenant_toml(cluster, "alpha", default_size="64M"), wait_for="alpha",
                            state_dir=str(short_tmp / unique("x") / "state"))  # fmt: skip
    client, name = daemon.client("alpha"), unique("excl")
    assert client.create(name) == {"Err": ""}
    path = mount(client, name, "c")
    by_hand = subprocess.run(
        ["rbd", "device", "map", "--id", "alpha", "--keyring", str(cluster.keyring("alpha")),
         "--conf", str(cluster.conf), "--options", "exclusive,noudev", f"alpha/{name}"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    print(f"hand-run exclusive map of a leased image: exit {by_hand.returncode}: "
          f"{by_hand.stderr.strip().splitlines()[-1:]}")  # fmt: skip
    assert by_hand.returncode != 0
    assert list(oracle.krbd_devices().values()).count(f"alpha/{name}") == 1
    assert not direct_write_fails(Path(path) / "still-mine")
    unmount(client, name, "c")


def test_fencing_one_volume_leaves_the_hosts_other_volumes_writable(
    cluster: DevCluster, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    daemon = daemon_factory(tenant_toml(cluster, "alpha", default_size="64M"), wait_for="alpha",
                            state_dir=str(short_tmp / unique("f") / "state"))  # fmt: skip
    client = daemon.client("alpha")
    fenced, other = unique("fenced"), unique("other")
    paths = {}
    for name in (fenced, other):
        assert client.create(name) == {"Err": ""}
        paths[name] = Path(mount(client, name, "c"))
    broken = subprocess.run(
        [sys.executable, "-m", "rbdplugin", "locks", "break", fenced, "--yes",
         "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert broken.returncode == 0, broken.stderr
    print(broken.stdout.strip())
    assert direct_write_fails(paths[fenced] / "after-break")  # its krbd client is fenced
    assert not direct_write_fails(paths[other] / "after-break")  # noshare: this one is not
    print("after fencing one volume's holder: its writes fail, the other volume's succeed")
    # The claim also names the daemon's own Ceph connection, which the break fenced too: the
    # first call after it may fail while the daemon reconnects (a known wart, see README).
    for name in (fenced, other):
        if client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c"})["Err"]:
            unmount(client, name, "c")
    assert not oracle.is_mounted(paths[fenced]) and not oracle.is_mounted(paths[other])
