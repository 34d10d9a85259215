"""Snapshots and copy-on-write clones against the real cluster, with real mounts: a clone
carries its origin's data and filesystem (never formatted), gets a filesystem UUID of
its own, and mounts beside its origin on one host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rbd

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import (
    TEST_MAPPER,
    Admin,
    DaemonProcess,
    PluginClient,
    mount_volume,
    sha256_of,
    unique,
    unmount_volume,
    wait_until,
    write_random,
)

POOL = "beta"  # remove policy delete: a removed clone is gone, and so is its snapshot


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
    origin_path = mount_volume(c, origin, "o")
    try:
        before = write_random(origin_path / "data")
        if TEST_MAPPER == "krbd":
            origin_path = clone_of_unmounted(c, admin, origin, clone)
        else:
            assert c.create(clone, {"clone-of": origin}) == {"Err": ""}
        write_random(origin_path / "later")  # after the snapshot: not in the clone

        snapshots = c.get(origin)["Volume"]["Status"]["snapshots"]
        assert len(snapshots) == 1 and snapshots[0].startswith(f"clone.{clone}."), snapshots
        status = c.get(clone)["Volume"]["Status"]
        assert status["clone_of"] == f"{origin}@{snapshots[0]}"
        assert status["fstype"] == fstype
        assert parent_of(admin, clone) == (POOL, origin, snapshots[0])  # Ceph's own view

        clone_path = mount_volume(c, clone, "c")
        try:
            assert oracle.fstype_at(clone_path) == fstype  # carried over, not formatted
            assert sha256_of(clone_path / "data") == before
            assert not (clone_path / "later").exists()
            assert oracle.fs_uuid_at(clone_path) != oracle.fs_uuid_at(origin_path)
            write_random(clone_path / "own")  # copy-on-write: the origin does not see it
            assert not (origin_path / "own").exists()
        finally:
            unmount_volume(c, clone, "c")
        # The UUID is renewed once: a second Mount keeps it.
        renewed = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value",
                                  oracle.source_at(mount_volume(c, clone, "c2"))],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
        again = oracle.fs_uuid_at(daemon_mountpoint(c, clone))
        assert renewed.strip() == again
        unmount_volume(c, clone, "c2")
    finally:
        unmount_volume(c, origin, "o")
    assert c.remove(clone) == {"Err": ""}
    # The snapshot made for the clone went with it: the origin is removable at once.
    assert "snapshots" not in c.get(origin)["Volume"]["Status"]
    assert c.remove(origin) == {"Err": ""}
    assert {origin, clone}.isdisjoint(admin.images(POOL))


def clone_of_unmounted(c: PluginClient, admin: Admin, origin: str, clone: str) -> Path:
    """krbd: a read-write krbd map has the kernel's `exclusive` option, and the kernel
    takes no snapshot request from another client, so clone-of a volume mounted by krbd
    is refused, saying so, with nothing left behind and the origin thawed. Unmounted, it
    is cloned; the origin is mounted again (for ``o``) and its new mountpoint returned."""
    refused = c.create(clone, {"clone-of": origin})["Err"]
    assert "mapped exclusively by krbd" in refused, refused
    assert "does not take snapshot requests" in refused, refused
    assert "snapshots" not in c.get(origin)["Volume"]["Status"]
    assert clone not in admin.images(POOL)
    write_random(daemon_mountpoint(c, origin) / "thawed")  # a frozen filesystem would hang
    unmount_volume(c, origin, "o")
    assert c.create(clone, {"clone-of": origin}) == {"Err": ""}
    return mount_volume(c, origin, "o")


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
    path = mount_volume(c, origin, "o")
    before = write_random(path / "data", 4 << 20)
    unmount_volume(c, origin, "o")
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
    clone_path = mount_volume(c, clone, "c")
    assert sha256_of(clone_path / "data") == before
    unmount_volume(c, clone, "c")
    assert c.remove(clone) == {"Err": ""}


def rbdplugin(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "rbdplugin", *args],
                          capture_output=True, text=True, timeout=90, check=False)  # fmt: skip
    print(f"$ rbdplugin {' '.join(args[:3])} ...  -> {done.returncode}\n{done.stdout}{done.stderr}")
    return done


def test_grow_under_write_snapshot_and_restore_into_a_clone_beside_it(
    daemon: DaemonProcess, admin: Admin
) -> None:
    """The issue's session: grow while a process writes, snapshot, restore the snapshot
    into a new volume, both mounted on this host, the same bytes."""
    c = daemon.client(POOL)
    app, restored = unique("app"), unique("restored")
    cli = ("--config", str(daemon.config), "--driver", POOL)
    assert c.create(app, {"size": "300M", "fstype": "xfs"}) == {"Err": ""}
    app_path = mount_volume(c, app, "a")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(app_path / "log")])
    try:
        time.sleep(1)
        size_before = os.statvfs(app_path).f_blocks * os.statvfs(app_path).f_frsize
        grown = rbdplugin("volume", "resize", app, "600M", *cli)
        assert grown.returncode == 0, grown.stderr
        stat = os.statvfs(app_path)  # the same mount, bigger: no unmount happened
        assert stat.f_blocks * stat.f_frsize > size_before + 250 * 2**20
        time.sleep(1)
    finally:
        writer.terminate()
        assert writer.wait(timeout=30) == 0  # it wrote on through the grow
    written = sha256_of(app_path / "log")
    taken = rbdplugin("snapshot", "create", f"{app}@v1", *cli)
    assert taken.returncode == 0 and "frozen" in taken.stdout, taken
    write_random(app_path / "after-v1")
    listed = rbdplugin("snapshot", "ls", app, *cli)
    assert listed.returncode == 0 and listed.stdout.split() == ["v1"]

    assert c.create(restored, {"from-snapshot": f"{app}@v1"}) == {"Err": ""}
    restored_path = mount_volume(c, restored, "r")
    try:
        assert oracle.is_mounted(app_path) and oracle.is_mounted(restored_path)
        assert sha256_of(restored_path / "log") == written  # the same bytes as at the snapshot
        assert not (restored_path / "after-v1").exists()
        assert oracle.fs_uuid_at(restored_path) != oracle.fs_uuid_at(app_path)
        assert os.statvfs(restored_path).f_blocks == os.statvfs(app_path).f_blocks
    finally:
        unmount_volume(c, restored, "r")
        unmount_volume(c, app, "a")
    busy = rbdplugin("snapshot", "rm", f"{app}@v1", *cli)
    assert busy.returncode == 1 and restored in busy.stderr  # a clone reads from it
    assert c.remove(restored) == {"Err": ""}
    assert rbdplugin("snapshot", "rm", f"{app}@v1", *cli).returncode == 0
    assert c.remove(app) == {"Err": ""}
    assert {app, restored}.isdisjoint(admin.images(POOL))


# Appends 64 KiB records, each fsynced, until stopped; exits 0 on SIGTERM.
WRITER = """
import os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
n = 0
while True:
    os.write(fd, n.to_bytes(8, "little") * 8192)
    os.fsync(fd)
    n += 1
"""
