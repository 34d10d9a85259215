"""Snapshots and copy-on-write clones against the real cluster, with real mounts: a clone
carries its origin's data and filesystem (never formatted), gets a filesystem UUID of
its own, and mounts beside its origin on one host."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import rbd

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import Admin, DaemonProcess, PluginClient, unique, wait_until

POOL = "beta"  # remove policy delete: a removed clone is gone, and so is its snapshot


def mount(client: PluginClient, name: str, mount_id: str) -> Path:
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
    assert reply["Err"] == "", reply
    return Path(reply["Mountpoint"])


def unmount(client: PluginClient, name: str, mount_id: str) -> None:
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id}) == {"Err": ""}


def write_file(path: Path, size: int = 1 << 20) -> str:
    data = os.urandom(size)
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uuid_of(mountpoint: Path) -> str:
    """The filesystem UUID of what is mounted there, as blkid reads it from the device."""
    device = oracle.source_at(mountpoint)
    done = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", device],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip()


def parent_of(admin: Admin, image: str) -> tuple[str, str, str]:
    with admin.cluster.open_ioctx(POOL) as ioctx, rbd.Image(ioctx, image, read_only=True) as im:
        parent: tuple[str, str, str] = im.parent_info()
        return parent


@pytest.mark.parametrize(("fstype", "size"), [("ext4", "64M"), ("xfs", "300M")])
def test_clone_of_a_mounted_volume_carries_its_data_and_mounts_beside_it(
    daemon: DaemonProcess, admin: Admin, fstype: str, size: str
) -> None:
    c = daemon.client(POOL)
    origin, clone = unique(f"orig{fstype}"), unique(f"clone{fstype}")
    assert c.create(origin, {"size": size, "fstype": fstype}) == {"Err": ""}
    origin_path = mount(c, origin, "o")
    try:
        before = write_file(origin_path / "data")
        assert c.create(clone, {"clone-of": origin}) == {"Err": ""}
        write_file(origin_path / "later")  # after the snapshot: not in the clone

        snapshots = c.get(origin)["Volume"]["Status"]["snapshots"]
        assert len(snapshots) == 1 and snapshots[0].startswith(f"clone.{clone}."), snapshots
        status = c.get(clone)["Volume"]["Status"]
        assert status["clone_of"] == f"{origin}@{snapshots[0]}"
        assert status["fstype"] == fstype
        assert parent_of(admin, clone) == (POOL, origin, snapshots[0])  # Ceph's own view

        clone_path = mount(c, clone, "c")
        try:
            assert oracle.fstype_at(clone_path) == fstype  # carried over, not formatted
            assert digest(clone_path / "data") == before
            assert not (clone_path / "later").exists()
            assert uuid_of(clone_path) != uuid_of(origin_path)
            write_file(clone_path / "own")  # copy-on-write: the origin does not see it
            assert not (origin_path / "own").exists()
        finally:
            unmount(c, clone, "c")
        # The UUID is renewed once: a second Mount keeps it.
        renewed = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value",
                                  oracle.source_at(mount(c, clone, "c2"))],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
        again = uuid_of(daemon_mountpoint(c, clone))
        assert renewed.strip() == again
        unmount(c, clone, "c2")
    finally:
        unmount(c, origin, "o")
    assert c.remove(clone) == {"Err": ""}
    # The snapshot made for the clone went with it: the origin is removable at once.
    assert "snapshots" not in c.get(origin)["Volume"]["Status"]
    assert c.remove(origin) == {"Err": ""}
    assert {origin, clone}.isdisjoint(admin.images(POOL))


def daemon_mountpoint(client: PluginClient, name: str) -> Path:
    return Path(client.call("VolumeDriver.Path", {"Name": name})["Mountpoint"])


def test_clone_options_are_checked(daemon: DaemonProcess, admin: Admin) -> None:
    c = daemon.client(POOL)
    origin = unique("corig")
    assert c.create(origin, {"size": "64M"}) == {"Err": ""}
    missing = c.create(unique("cl"), {"clone-of": unique("nothere")})["Err"]
    assert "its origin volume" in missing and "does not exist" in missing
    nosnap = c.create(unique("cl"), {"from-snapshot": f"{origin}@never"})["Err"]
    assert "has no snapshot 'never'" in nosnap and "it has none" in nosnap
    wrong_fs = c.create(unique("cl"), {"clone-of": origin, "fstype": "xfs"})["Err"]
    assert "carries its origin's filesystem (ext4)" in wrong_fs
    assert (
        "does not go with a clone"
        in c.create(unique("cl"), {"clone-of": origin, "mkfs-options": "-m 0"})["Err"]
    )
    assert (
        "exclude each other"
        in c.create(unique("cl"), {"clone-of": origin, "from-snapshot": f"{origin}@x"})["Err"]
    )
    before = admin.images(POOL)
    assert "snapshots" not in c.get(origin)["Volume"]["Status"]  # nothing half-made
    assert c.remove(origin) == {"Err": ""}
    assert admin.images(POOL) == before - {origin}


def test_a_tenant_may_have_clones_flattened_in_the_background(
    cluster: DevCluster, admin: Admin, daemon_factory: StartDaemon
) -> None:
    daemon = daemon_factory(
        tenant_toml(cluster, POOL, table="flat", remove_policy="delete", flatten_clones=True),
        wait_for="flat",
    )
    c = daemon.client("flat")
    origin, clone = unique("forig"), unique("fclone")
    assert c.create(origin, {"size": "64M"}) == {"Err": ""}
    path = mount(c, origin, "o")
    before = write_file(path / "data", 4 << 20)
    unmount(c, origin, "o")
    assert c.create(clone, {"clone-of": origin}) == {"Err": ""}
    wait_until(lambda: c.get(clone)["Volume"]["Status"]["flatten"].startswith("done"), 60,
               "the clone flattened")  # fmt: skip
    with (
        admin.cluster.open_ioctx(POOL) as ioctx,
        rbd.Image(ioctx, clone, read_only=True) as im,
        pytest.raises(rbd.ImageNotFound),
    ):
        im.parent_info()  # Ceph's own view: no parent any more
    # Its snapshot of the origin is freed, and the origin can go while the clone stays.
    assert "snapshots" not in c.get(origin)["Volume"]["Status"]
    assert c.remove(origin) == {"Err": ""}
    clone_path = mount(c, clone, "c")
    assert digest(clone_path / "data") == before
    unmount(c, clone, "c")
    assert c.remove(clone) == {"Err": ""}
