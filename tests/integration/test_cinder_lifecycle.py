"""Snapshots, clones and growth of Cinder-mode volumes, through Cinder's own APIs, against
the devcloud of :mod:`tests.integration.test_cinder_mode` (its fixtures, reused): the
daemon's control socket takes snapshots (Cinder snapshots, the mounted filesystem frozen
around them), a volume made from one mounts beside its origin with the same bytes and a
filesystem UUID of its own, and a detached volume grows with Cinder's os-extend.

What Cinder holds is read as the devcloud's admin (openstacksdk, a third party); what this
host has, from /proc, /sys and the device itself (blkid, statvfs).
"""

from __future__ import annotations

import os
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


def test_a_detached_volume_grows_and_an_attached_one_is_refused(
    cloud: Cloud, vm: DaemonProcess
) -> None:
    client, name = vm.client(DRIVER), unique("grow")
    assert client.create(name) == {"Err": ""}
    path = mount_volume(client, name, "g")
    kept = write_random(path / "data")
    body = {"Driver": DRIVER, "Name": name, "Size": "2G"}
    refused = control(vm).call("volumes/resize", body)["Err"]
    print(f"\nresize while attached: {refused}")
    assert "grow only while detached" in refused and "unmount it" in refused, refused
    assert cloud.volume(name)["size"] == 1  # type: ignore[index]
    unmount_volume(client, name, "g")

    grown = control(vm).call("volumes/resize", {**body, "Size": "1536M"})
    print(f"resize detached: {grown}")
    assert grown.get("Err", "") == "" and grown["Complete"] is True, grown
    assert "not mounted" in grown["Filesystem"]
    assert cloud.volume(name)["size"] == 2  # type: ignore[index]  # whole GiB, Cinder's view
    assert "rounded up to whole GiB" in str(client.get(name)["Volume"]["Status"]["notes"])
    path = mount_volume(client, name, "g")
    stat = os.statvfs(path)
    assert stat.f_blocks * stat.f_frsize > 1.5 * GiB  # the filesystem filled the new size
    assert sha256_of(path / "data") == kept
    unmount_volume(client, name, "g")
    shrink = control(vm).call("volumes/resize", {**body, "Size": "1G"})["Err"]
    assert "refusing to shrink" in shrink, shrink
    assert client.remove(name) == {"Err": ""}
    wait_until(lambda: cloud.volume(name) is None, 30, "the Cinder volume to be deleted")
