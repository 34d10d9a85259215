"""How Get reads a volume, on the real cluster: with the image's id known from before,
its records are asked all at once, and an id that is no longer the name's is never
answered for (an image moved to the trash keeps its header under the old id)."""

from __future__ import annotations

import glob
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import rbd

from rbdplugin.devcluster import DevCluster
from rbdplugin.units import GiB
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import Admin, DaemonProcess, mount_volume, unique, unmount_volume

POOL = "alpha"


def _conf_with_admin_socket(cluster: DevCluster, root: Path) -> Path:
    """The cluster's ceph.conf, plus an admin socket for the tenant's client: its
    objecter lists the requests in flight (the test's oracle, Ceph's own view)."""
    (root / "asok").mkdir()
    conf = root / "ceph.conf"
    extra = f"\n[client.{POOL}]\nadmin socket = {root}/asok/$name.$pid.$cctid.asok\n"
    conf.write_text(cluster.conf.read_text() + extra)
    return conf


def _daemon_with_admin_socket(
    cluster: DevCluster, daemon_factory: StartDaemon, short_tmp: Path
) -> tuple[DaemonProcess, Path]:
    """A daemon whose tenant client has an admin socket under the folder returned."""
    root = short_tmp / unique("asok")
    root.mkdir()
    daemon = daemon_factory(
        tenant_toml(cluster, POOL), wait_for=POOL, conf=_conf_with_admin_socket(cluster, root)
    )
    return daemon, root


def _objects_in_flight(root: Path) -> set[str]:
    found: set[str] = set()
    for sock in glob.glob(f"{root}/asok/*.asok"):
        done = subprocess.run(
            ["ceph", "--admin-daemon", sock, "objecter_requests"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            continue
        for op in json.loads(done.stdout).get("ops", []):
            found.add(str(op.get("object_id", "")))
    return found


def _image_id(admin: Admin, name: str) -> str:
    with admin.cluster.open_ioctx(POOL) as ioctx, rbd.Image(ioctx, name, read_only=True) as im:
        image_id: str = im.id()
        return image_id


def test_get_asks_for_the_id_and_the_records_in_one_round_trip(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    daemon, root = _daemon_with_admin_socket(cluster, daemon_factory, short_tmp)
    client, name = daemon.client(POOL), unique("rt")
    assert client.create(name, {"size": "1G"}) == {"Err": ""}
    assert client.get(name)["Err"] == ""
    header = f"rbd_header.{_image_id(admin, name)}"
    got: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: got.update(client.get(name)))
    # With the OSD frozen nothing is answered: whatever Get asks for stays in flight, so
    # what is in flight together is what Get asked for without waiting for an answer.
    seen: set[str] = set()
    with cluster.frozen("osd.0"):
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not {f"rbd_id.{name}", header} <= seen:
            seen |= _objects_in_flight(root)
            time.sleep(0.05)
    thread.join(timeout=30)
    assert f"rbd_id.{name}" in seen, seen
    assert header in seen, f"the header was not asked for alongside the id: {seen}"
    assert got["Err"] == "" and got["Volume"]["Status"]["size_bytes"] == GiB
    assert client.remove(name) == {"Err": ""}


def test_get_never_answers_for_an_image_the_name_no_longer_has(
    daemon: DaemonProcess, admin: Admin
) -> None:
    client, name = daemon.client(POOL), unique("stale")
    assert client.create(name, {"size": "1G"}) == {"Err": ""}
    assert client.get(name)["Volume"]["Status"]["size_bytes"] == GiB  # its id now known
    with admin.cluster.open_ioctx(POOL) as ioctx:
        try:
            # By hand: the image to the trash (its header stays, under its old id), and
            # a new one of another size under the same name.
            rbd.RBD().trash_move(ioctx, name, 0)
            rbd.RBD().create(ioctx, name, 2 * GiB, old_format=False, features=1)
            status = client.get(name)["Volume"]["Status"]
            assert status["size_bytes"] == 2 * GiB
            assert status["fstype"].startswith("unknown")  # not the trashed one's ext4
            # And that one to the trash too: the name has no image, whatever headers stay.
            rbd.RBD().trash_move(ioctx, name, 0)
            assert client.get(name)["Err"].startswith(f"volume {name!r} does not exist")
        finally:
            for entry in rbd.RBD().trash_list(ioctx):
                if entry["name"] == name:
                    rbd.RBD().trash_remove(ioctx, entry["id"], force=True)


def _objecter_counters(root: Path) -> dict[str, int]:
    """The tenant client's objecter counters (Ceph's own count of what it sent)."""
    socks = glob.glob(f"{root}/asok/*.asok")
    assert socks, "the daemon's client has no admin socket"
    totals: dict[str, int] = {}
    for sock in socks:
        done = subprocess.run(
            ["ceph", "--admin-daemon", sock, "perf", "dump", "objecter"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        for key, value in json.loads(done.stdout)["objecter"].items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals


def test_get_of_a_mounted_volume_asks_who_watches_it_once(
    cluster: DevCluster, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    """Its holders are judged alive by the watchers the volume's own read found, not by
    a second list of them after the lease is read."""
    daemon, root = _daemon_with_admin_socket(cluster, daemon_factory, short_tmp)
    client, name = daemon.client(POOL), unique("watched")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    mount_volume(client, name, "w")
    try:
        assert client.get(name)["Err"] == ""  # warm: ids known, handles open
        gets = 10
        before = _objecter_counters(root)
        for _ in range(gets):
            held = client.get(name)["Volume"]["Status"]["held_by"]
            assert [h["alive"] for h in held] == [True], held
        after = _objecter_counters(root)
        # A watcher list is an "other" op to the objecter; the daemon's own background
        # checks may add one or two meanwhile, a second list per Get would add ten.
        listed = after["osdop_other"] - before["osdop_other"]
        assert gets <= listed <= gets + 2, f"{listed} watcher lists for {gets} Gets"
    finally:
        unmount_volume(client, name, "w")
        assert client.remove(name) == {"Err": ""}
