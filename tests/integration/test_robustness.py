"""The daemon itself under trouble: hosts that share a name, Ceph unreachable at
start-up, corrupt leases and state files. Real cluster, real daemons, real mounts."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import StartDaemon, daemon_toml, tenant_toml
from tests.helpers import Admin, DaemonProcess, unique, wait_until, write_config
from tests.integration.test_mount import leftovers, mount, unmount


def _host(
    cluster: DevCluster, factory: StartDaemon, root: Path, host_id: str, **extra: object
) -> DaemonProcess:
    tenants = tenant_toml(cluster, "alpha", default_size="64M")
    return factory(tenants, wait_for="alpha", host_id=host_id, state_dir=str(root / "state"),
                   mount_root=str(root / "mounts"), **extra)  # fmt: skip


def _lease(admin: Admin, image: str) -> dict[str, object]:
    with admin.cluster.open_ioctx("alpha") as ioctx:
        doc: dict[str, object] = json.loads(ioctx.read(f"rbdplugin.lease.{image}", 65536))
    return doc


def test_two_machines_with_one_hostname_are_two_hosts(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    roots = [short_tmp / unique("twin"), short_tmp / unique("twin")]
    one, two = (_host(cluster, daemon_factory, root, "twin") for root in roots)
    name = unique("shared")
    assert one.client("alpha").create(name) == {"Err": ""}
    mount(one.client("alpha"), name, "c")
    err = two.client("alpha").call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"]
    assert f"volume '{name}' is mounted read-write on host twin" in err, err
    uuids = [(root / "state" / "host-uuid").read_text().strip() for root in roots]
    assert uuids[0] != uuids[1]
    writer = _lease(admin, name)["writer"]
    assert isinstance(writer, dict) and writer["uuid"] == uuids[0]
    assert leftovers(two, admin, "alpha", name) == [
        f"watcher {w}" for w in admin.watchers("alpha", name)
    ]

    unmount(one.client("alpha"), name, "c")
    one.stop()
    restarted = _host(cluster, daemon_factory, roots[0], "twin")  # the same host again
    assert (roots[0] / "state" / "host-uuid").read_text().strip() == uuids[0]
    mount(restarted.client("alpha"), name, "c")
    assert _lease(admin, name)["writer"]["uuid"] == uuids[0]  # type: ignore[index]
    unmount(restarted.client("alpha"), name, "c")
    restarted.stop()
    two.stop()


def _dead_mon_conf(cluster: DevCluster, target: Path) -> Path:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    text = re.sub(r"mon host = .*", f"mon host = v1:127.0.0.1:{port}", cluster.conf.read_text())
    target.write_text(text)
    return target


def test_sockets_answer_at_once_while_ceph_is_unreachable(
    cluster: DevCluster, short_tmp: Path
) -> None:
    root = short_tmp / unique("nomon")
    root.mkdir()
    tenants = tenant_toml(cluster, "alpha")
    config = write_config(
        root / "rbdplugin.toml",
        daemon_toml(root, _dead_mon_conf(cluster, root / "dead.conf"), tenants, op_timeout=10),
    )
    daemon = DaemonProcess(config, root / "daemon.log", root / "plugins")
    started = time.monotonic()
    daemon.start("alpha", timeout=30)
    answered = time.monotonic() - started  # includes starting Python and its imports
    try:
        assert answered < 2.5, f"Activate answered {answered:.1f} s after start"
        client = daemon.client("alpha")
        began = time.monotonic()
        assert client.names() == []  # nothing known yet, and no hang
        err = client.get(unique("never"))["Err"]
        assert "Ceph" in err and ("unreachable" in err or "cannot connect" in err), err
        err = client.create(unique("new"), {"size": "8M"})["Err"]
        assert "cannot connect to Ceph as client.alpha" in err, err
        err = client.call("VolumeDriver.Mount", {"Name": unique("m"), "ID": "c"})["Err"]
        assert "Ceph" in err, err
        assert time.monotonic() - began < 4 * 10  # each within its deadline
    finally:
        daemon.stop()


def test_a_corrupt_lease_stops_neither_the_checks_nor_the_daemon(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    root = short_tmp / unique("cl")
    daemon = _host(cluster, daemon_factory, root, "host-a", lease_check_seconds=1)
    client = daemon.client("alpha")
    bad, other = unique("bad"), unique("other")
    for name in (bad, other):
        assert client.create(name) == {"Err": ""}
        mount(client, name, "c")
    with admin.cluster.open_ioctx("alpha") as ioctx:
        ioctx.write_full(f"rbdplugin.lease.{bad}", b"{not json")
        ioctx.remove_object(f"rbdplugin.lease.{other}")  # as if another host took it
    # The checker survives the corrupt lease and still notices the other volume's loss.
    wait_until(lambda: "lost_to" in client.get(other)["Volume"]["Status"], 10, "loss noticed")
    log = daemon.log()
    assert f"volume {bad}: lease check: the lease of image '{bad}'" in log
    assert "is corrupt" in log
    problem = client.get(bad)["Volume"]["Status"]["problem"]
    assert f"rbdplugin.lease.{bad} in pool alpha" in problem
    err = client.call("VolumeDriver.Mount", {"Name": bad, "ID": "d"})["Err"]
    assert f"RADOS object rbdplugin.lease.{bad} in pool alpha" in err, err
    assert "rbdplugin locks break" in err
    unmount(client, bad, "c")  # the unmount itself completes
    unmount(client, other, "c")
    assert leftovers(daemon, admin, "alpha", bad) == []
    err = client.call("VolumeDriver.Mount", {"Name": bad, "ID": "e"})["Err"]
    assert "is corrupt" in err and "rbdplugin locks break" in err, err
    done = subprocess.run(
        [sys.executable, "-m", "rbdplugin", "locks", "break", bad, "--yes",
         "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    path = mount(client, bad, "e")  # usable again once an operator broke the lease
    assert oracle.fstype_at(path) == "ext4"
    unmount(client, bad, "e")
    daemon.stop()


def test_bad_state_entries_never_stop_start_up(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    root = short_tmp / unique("bs")
    state = root / "state" / "alpha"
    state.mkdir(parents=True)
    (state / "mounts.json").write_text(
        json.dumps({"junk": {"volume": "junk", "phase": 7}, "odd": "not a record"})
    )
    (state / "known-volumes.json").write_text(json.dumps({"v": "not a status", "w": {}}))
    daemon = _host(cluster, daemon_factory, root, "host-a")
    client = daemon.client("alpha")
    assert "volume junk: unreadable entry" in daemon.log()
    assert "volume odd: unreadable entry" in daemon.log()
    kept = json.loads((state / "mounts.json.bad").read_text())
    assert set(kept) == {"junk", "odd"}
    name = unique("after")
    assert client.create(name) == {"Err": ""}
    path = mount(client, name, "c")
    assert oracle.is_mounted(path)
    unmount(client, name, "c")
    assert leftovers(daemon, admin, "alpha", name) == []
    daemon.stop()
