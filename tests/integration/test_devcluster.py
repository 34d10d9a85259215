"""The embedded cluster: start, status, stop exactly what it started, restart with data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import rados

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.helpers import PluginClient, unique


def runs(pid: int, program: str, root: Path) -> bool:
    """``pid`` is a live ``program`` started for the cluster in ``root`` (read from /proc)."""
    argv = oracle.argv_of(pid)
    alive = oracle.process_state(pid) not in ("", "Z")
    return (
        alive
        and bool(argv)
        and Path(argv[0]).name == program
        and any(str(root) in arg for arg in argv[1:])
    )


def ended(pid: int) -> bool:
    return oracle.process_state(pid) in ("", "Z")


def rbdplugin(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbdplugin", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_start_status_stop_restart(short_tmp: Path) -> None:
    root = short_tmp / "dc-cli"
    started = time.monotonic()
    done = rbdplugin("devcluster", "start", "--dir", str(root), "--tenant", "t1", "--tenant", "t2")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    status = json.loads(rbdplugin("devcluster", "status", "--dir", str(root)).stdout)
    assert set(status["running"]) == {"mon.a", "osd.0"}
    assert status["tenants"] == ["t1", "t2"]
    assert runs(status["running"]["mon.a"], "ceph-mon", root)
    assert runs(status["running"]["osd.0"], "ceph-osd", root)
    pids = list(status["running"].values())

    config = (root / "rbdplugin.toml").read_text()
    assert "[tenants.t1]" in config and "[tenants.t2]" in config
    assert f'socket_dir = "{root}/plugins"' in config
    for tenant in ("t1", "t2"):
        assert os.stat(root / f"ceph.client.{tenant}.keyring").st_mode & 0o077 == 0

    # Tenant t1's own user works in its own pool; data survives a stop and a start.
    client = rados.Rados(conffile=str(root / "ceph.conf"), rados_id="t1",
                         conf={"keyring": str(root / "ceph.client.t1.keyring")})  # fmt: skip
    client.connect(timeout=10)
    with client.open_ioctx("t1") as ioctx:
        ioctx.write_full("probe", b"kept")
    client.shutdown()

    stopped = rbdplugin("devcluster", "stop", "--dir", str(root))
    assert stopped.returncode == 0 and "osd.0, mon.a" in stopped.stdout
    assert all(ended(pid) for pid in pids)
    gone = rbdplugin("devcluster", "status", "--dir", str(root))
    assert gone.returncode == 3 and json.loads(gone.stdout)["running"] == {}

    assert rbdplugin("devcluster", "start", "--dir", str(root)).returncode == 0
    client = rados.Rados(conffile=str(root / "ceph.conf"), rados_id="admin")
    client.connect(timeout=10)
    with client.open_ioctx("t1") as ioctx:
        assert ioctx.read("probe") == b"kept"
    client.shutdown()
    assert rbdplugin("devcluster", "stop", "--dir", str(root), "--purge").returncode == 0
    assert not root.exists()


def test_stop_never_kills_a_recycled_pid(short_tmp: Path) -> None:
    root = short_tmp / "dc-recycled"
    root.mkdir()
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        state = {"fsid": "x", "v1_port": 1, "v2_port": 2, "store": "memstore", "tenants": [],
                 "pids": {"mon.a": stranger.pid}}  # fmt: skip
        (root / "cluster.json").write_text(json.dumps(state))
        assert DevCluster(root).stop() == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_start_refuses_a_foreign_directory(short_tmp: Path) -> None:
    root = short_tmp / "dc-foreign"
    root.mkdir()
    (root / "precious.txt").write_text("data")
    done = rbdplugin("devcluster", "start", "--dir", str(root))
    assert done.returncode == 1
    assert "is not empty and holds no dev cluster" in done.stderr
    assert (root / "precious.txt").read_text() == "data"


def test_serve_with_embedded_cluster_stops_cleanly(short_tmp: Path) -> None:
    """What `make run` does when no cluster is configured, then Ctrl-C."""
    root, sockets = short_tmp / "embedded", short_tmp / "emb-sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbdplugin", "serve", "--embedded-cluster", str(root),
         "--socket-dir", str(sockets)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    client = PluginClient(sockets / "rbd.sock")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                assert client.call("Plugin.Activate") == {"Implements": ["VolumeDriver"]}
                break
            except OSError:
                time.sleep(0.1)
        name = unique()
        assert client.create(name, {"size": "8M"}) == {"Err": ""}
        assert client.get(name)["Volume"]["Status"]["pool"] == "rbd"
        pids = DevCluster(root).running()
        assert set(pids) == {"mon.a", "osd.0"}
        assert runs(pids["mon.a"], "ceph-mon", root) and runs(pids["osd.0"], "ceph-osd", root)
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopping the embedded cluster: osd.0, mon.a" in output
    assert all(ended(pid) for pid in pids.values())
    assert not (sockets / "rbd.sock").exists()
