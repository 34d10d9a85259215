"""Snapshots, clones and growth of Cinder-mode volumes, through Cinder's own APIs, against
the devcloud of :mod:`tests.integration.test_cinder_mode` (its fixtures, reused): the
daemon's control socket takes snapshots (Cinder snapshots, the mounted filesystem frozen
around them), a volume made from one mounts beside its origin with the same bytes and a
filesystem UUID of its own, and a volume grows with Cinder's os-extend: online while
mounted (Nova's volume-extended event grows the disk), at its next Mount if detached.

What Cinder holds is read as the devcloud's admin (openstacksdk, a third party); what this
host has, from /proc, /sys and the device itself (blkid, statvfs).
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests import oracle
from tests.helpers import (
    DaemonProcess,
    PluginClient,
    mount_volume,
    sha256_of,
    unique,
    unmount_volume,
    wait_until,
    write_random,
)
from tests.integration import test_cinder_mode
from tests.integration.test_cinder_mode import DRIVER, Cloud

# test_cinder_mode's fixtures (its devcloud and its plugin in server "vm"), for this module.
cloud, vm = test_cinder_mode.cloud, test_cinder_mode.vm

pytestmark = pytest.mark.cinder
GiB = 1 << 30


def control(daemon: DaemonProcess) -> PluginClient:
    """The daemon's control socket (state_dir/control.sock), as the CLI speaks to it."""
    state_dir = Path(tomllib.loads(daemon.config.read_text())["daemon"]["state_dir"])
    return PluginClient(state_dir / "control.sock", timeout=120)


def snap(daemon: DaemonProcess, action: str, name: str, snapshot: str = "") -> dict[str, Any]:
    body = {"Driver": DRIVER, "Name": name, "Snapshot": snapshot, "Action": action}
    return control(daemon).call("volumes/snapshot", body)


def snapshots_in_cinder(cloud: Cloud, volume_id: str) -> list[dict[str, Any]]:
    """The volume's Cinder snapshots, as the admin sees them."""
    return [
        s.to_dict(computed=False)
        for s in cloud.admin.block_storage.snapshots(
            details=True, all_projects=True, volume_id=volume_id
        )
        if s.volume_id == volume_id
    ]


def test_snapshot_clone_beside_its_origin_and_removal(cloud: Cloud, vm: DaemonProcess) -> None:
    client, origin, copy = vm.client(DRIVER), unique("origin"), unique("copy")
    assert client.create(origin) == {"Err": ""}
    origin_id = cloud.volume(origin)["id"]  # type: ignore[index]
    origin_path = mount_volume(client, origin, "o")
    copy_path: Path | None = None
    try:
        before = write_random(origin_path / "data")
        taken = snap(vm, "create", origin, "s1")
        assert taken.get("Err", "") == "" and taken["Frozen"] is True, taken  # mounted here
        in_cinder = snapshots_in_cinder(cloud, origin_id)
        print(f"\nsnapshot: {[(s['name'], s['status'], s['metadata']) for s in in_cinder]}")
        assert [(s["name"], s["status"]) for s in in_cinder] == [(f"{origin}@s1", "available")]
        assert in_cinder[0]["metadata"]["rbdplugin.snapshot"] == "s1"
        again = snap(vm, "create", origin, "s1")["Err"]
        assert f"already has a snapshot 's1' (Cinder snapshot {in_cinder[0]['id']})" in again
        assert len(snapshots_in_cinder(cloud, origin_id)) == 1  # no second one made
        assert snap(vm, "ls", origin)["Snapshots"] == ["s1"]
        assert client.get(origin)["Volume"]["Status"]["snapshots"] == ["s1"]
        write_random(origin_path / "later")  # after the snapshot: not in the copy

        assert client.create(copy, {"from-snapshot": f"{origin}@s1"}) == {"Err": ""}
        made = cloud.volume(copy)
        assert made is not None and made["snapshot_id"] == in_cinder[0]["id"]  # Cinder made it
        assert made["metadata"]["rbdplugin.clone_of"] == f"{origin}@s1"
        shown = client.get(copy)["Volume"]["Status"]
        assert shown["clone_of"] == f"{origin}@s1" and "flatten" not in shown  # Cinder's
        copy_path = mount_volume(client, copy, "c")  # beside its origin, on the same host
        assert sha256_of(copy_path / "data") == before
        assert not (copy_path / "later").exists()
        assert oracle.fs_uuid_at(copy_path) != oracle.fs_uuid_at(
            origin_path
        )  # renewed at its first Mount
        assert "rbdplugin.uuid_renewed" in cloud.volume(copy)["metadata"]  # type: ignore[index]

        # Cinder's RBD driver removes a snapshot volumes were made from (Ceph keeps what
        # they read until they are gone): what Cinder says goes, and the copy keeps its data.
        gone = snap(vm, "rm", origin, "s1")
        print(f"rm while a volume is made from it: {gone}")
        assert gone == {"Driver": DRIVER, "Name": origin, "Snapshot": "s1"}, gone
        assert snapshots_in_cinder(cloud, origin_id) == []
        assert snap(vm, "ls", origin)["Snapshots"] == []
        unmount_volume(client, copy, "c")
        copy_path = None
        copy_path = mount_volume(client, copy, "c")  # attached afresh: read from Ceph, not a cache
        assert sha256_of(copy_path / "data") == before
    finally:
        if copy_path is not None:
            unmount_volume(client, copy, "c")
        unmount_volume(client, origin, "o")
    assert client.remove(copy) == {"Err": ""}
    assert "has no snapshot 's1'; it has: none" in snap(vm, "rm", origin, "s1")["Err"]
    assert client.remove(origin) == {"Err": ""}


def test_clone_of_takes_a_cinder_snapshot_that_goes_with_the_clone(
    cloud: Cloud, vm: DaemonProcess
) -> None:
    client, origin, copy = vm.client(DRIVER), unique("source"), unique("twin")
    assert client.create(origin) == {"Err": ""}
    origin_id = cloud.volume(origin)["id"]  # type: ignore[index]
    assert client.create(copy, {"clone-of": origin}) == {"Err": ""}
    taken = snapshots_in_cinder(cloud, origin_id)
    assert len(taken) == 1 and taken[0]["name"].startswith(f"{origin}@clone.{copy}."), taken
    assert cloud.volume(copy)["snapshot_id"] == taken[0]["id"]  # type: ignore[index]
    status = client.get(copy)["Volume"]["Status"]
    assert status["clone_of"] == f"{origin}@{taken[0]['metadata']['rbdplugin.snapshot']}"
    busy = client.remove(origin)["Err"]  # Cinder refuses: it has a snapshot
    print(f"\nremove origin with a snapshot: {busy}")
    snapshot = taken[0]["metadata"]["rbdplugin.snapshot"]
    assert f"volume {origin!r} has snapshots in Cinder: {snapshot}; remove them first" in busy
    assert cloud.volume(origin) is not None
    assert client.remove(copy) == {"Err": ""}
    assert snapshots_in_cinder(cloud, origin_id) == []  # the clone's snapshot went with it
    assert client.remove(origin) == {"Err": ""}


def test_bad_snapshot_and_clone_requests_get_clear_errs(cloud: Cloud, vm: DaemonProcess) -> None:
    client, name = vm.client(DRIVER), unique("plain")
    assert client.create(name) == {"Err": ""}
    assert "has no snapshot 'nope'; it has: none" in snap(vm, "rm", name, "nope")["Err"]
    assert "does not exist" in snap(vm, "create", unique("ghost"), "s")["Err"]
    assert "snapshot name" in snap(vm, "create", name, "bad/name")["Err"]
    err = client.create(unique("c"), {"from-snapshot": f"{name}@nope"})["Err"]
    assert f"volume {name!r} has no snapshot 'nope'" in err, err
    err = client.create(unique("c"), {"from-snapshot": name})["Err"]
    assert "is not VOLUME@SNAPSHOT" in err, err
    err = client.create(unique("c"), {"clone-of": unique("ghost")})["Err"]
    assert "its origin volume" in err and "does not exist" in err, err
    err = client.create(unique("c"), {"clone-of": name, "mkfs-options": "-m 0"})["Err"]
    assert "mkfs-options does not go with a clone" in err, err
    assert snapshots_in_cinder(cloud, cloud.volume(name)["id"]) == []  # type: ignore[index]
    assert client.remove(name) == {"Err": ""}


def device_bytes(device: str) -> int:
    """The size of a block device, as the kernel tells blockdev(8)."""
    argv = ["blockdev", "--getsize64", device]
    return int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)


def fs_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_blocks * stat.f_frsize


def test_a_mounted_volume_grows_online_and_a_detached_one_at_its_next_mount(
    cloud: Cloud, vm: DaemonProcess
) -> None:
    client, name = vm.client(DRIVER), unique("grow")
    # xfs: it grows mounted without CAP_SYS_RESOURCE, which the daemon lacks here (ext4's
    # online resize needs it; test_resize covers that refusal).
    assert client.create(name, {"fstype": "xfs"}) == {"Err": ""}
    path = mount_volume(client, name, "g")
    assert oracle.fstype_at(path) == "xfs"
    device = oracle.source_at(path)
    before_fs = fs_bytes(path)
    kept = write_random(path / "data")
    assert device.startswith("/dev/") and device_bytes(device) == GiB, device
    body = {"Driver": DRIVER, "Name": name, "Size": "2G"}
    # Real Cinder grows an in-use volume only from microversion 3.42 on (what the daemon asks).
    volume_id = cloud.volume(name)["id"]  # type: ignore[index]
    extend = {"os-extend": {"new_size": 2}}
    old = cloud.admin.block_storage.post(
        f"/volumes/{volume_id}/action", json=extend, microversion="3.41"
    )
    assert old.status_code == 400 and "to extend, currently in-use" in old.text, old.text
    assert cloud.volume(name)["status"] == "in-use"  # type: ignore[index]

    # In use: Cinder's os-extend (3.42), Nova's volume-extended event grows the disk in
    # the server, and the daemon grows the mounted filesystem online.
    grown = control(vm).call("volumes/resize", body)
    print(f"\nresize while mounted: {grown}")
    assert grown.get("Err", "") == "" and grown["Complete"] is True, grown
    assert "grew online" in grown["Filesystem"], grown
    volume = cloud.volume(name)
    assert volume is not None and (volume["size"], volume["status"]) == (2, "in-use"), volume
    assert [a["server_id"] for a in volume["attachments"]] == [cloud.server("vm")]
    assert oracle.source_at(path) == device  # the same disk, still mounted
    assert device_bytes(device) == 2 * GiB
    assert fs_bytes(path) > before_fs + GiB * 9 // 10  # the filesystem filled the new size
    assert sha256_of(path / "data") == kept
    again = control(vm).call("volumes/resize", body)  # at that size already: nothing to do
    assert again.get("Err", "") == "" and again["Complete"] is True, again
    assert cloud.volume(name)["size"] == 2  # type: ignore[index]
    shrink = control(vm).call("volumes/resize", {**body, "Size": "1G"})["Err"]
    assert "refusing to shrink" in shrink and f"is 2G ({2 * GiB} bytes)" in shrink, shrink
    unmount_volume(client, name, "g")

    grown = control(vm).call("volumes/resize", {**body, "Size": "2560M"})
    print(f"resize detached: {grown}")
    assert grown.get("Err", "") == "" and grown["Complete"] is True, grown
    assert "not mounted" in grown["Filesystem"]
    assert cloud.volume(name)["size"] == 3  # type: ignore[index]  # whole GiB, Cinder's view
    assert "rounded up to whole GiB" in str(client.get(name)["Volume"]["Status"]["notes"])
    path = mount_volume(client, name, "g")
    assert fs_bytes(path) > 2.5 * GiB  # the filesystem filled the new size at this Mount
    assert sha256_of(path / "data") == kept
    unmount_volume(client, name, "g")
    assert client.remove(name) == {"Err": ""}
    wait_until(lambda: cloud.volume(name) is None, 30, "the Cinder volume to be deleted")
