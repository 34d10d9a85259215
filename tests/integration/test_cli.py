"""The command line: config checking and start-up failures an operator can act on."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

from rbdplugin.devcluster import DevCluster
from tests.conftest import daemon_toml, tenant_toml
from tests.helpers import DaemonProcess, write_config


def rbdplugin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbdplugin", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_check_config_good_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[tenants.rbd]\n")
    done = rbdplugin("check-config", "--config", str(good))
    assert done.returncode == 0
    assert "driver rbd: pool rbd as client.rbd, socket /run/docker/plugins/rbd.sock" in done.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants.rbd]\nremove_policy = 'shred'\n")
    done = rbdplugin("check-config", "--config", str(bad))
    assert done.returncode == 1
    assert "remove_policy 'shred' is not one of delete, trash, keep" in done.stderr


def test_serve_refuses_to_steal_a_live_socket(cluster: DevCluster, short_tmp: Path) -> None:
    root = short_tmp / "steal"
    (root / "plugins").mkdir(parents=True)
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(root / "plugins" / "alpha.sock"))
    holder.listen()
    try:
        config = root / "c.toml"
        config.write_text(daemon_toml(root, cluster.conf, tenant_toml(cluster, "alpha")))
        done = rbdplugin("serve", "--config", str(config))
        assert done.returncode == 1
        assert "another process already serves" in done.stderr
        # The socket is still the holder's: a new client reaches the holder.
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(root / "plugins" / "alpha.sock"))
            holder.accept()[0].close()
    finally:
        holder.close()


def test_serve_refuses_a_file_that_is_not_a_socket(cluster: DevCluster, short_tmp: Path) -> None:
    root = short_tmp / "notsock"
    (root / "plugins").mkdir(parents=True)
    precious = root / "plugins" / "alpha.sock"
    precious.write_text("not a socket")
    config = write_config(
        root / "c.toml", daemon_toml(root, cluster.conf, tenant_toml(cluster, "alpha"))
    )
    done = rbdplugin("serve", "--config", str(config))
    assert done.returncode == 1
    assert f"{precious} exists and is not a socket" in done.stderr
    assert precious.read_text() == "not a socket"


def test_serve_replaces_a_stale_socket(cluster: DevCluster, short_tmp: Path) -> None:
    root = short_tmp / "stale"
    (root / "plugins").mkdir(parents=True)
    path = root / "plugins" / "alpha.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # a crashed daemon's socket: bound, nobody listens
        dead.bind(str(path))
    assert stat.S_ISSOCK(path.lstat().st_mode)
    config = write_config(
        root / "c.toml", daemon_toml(root, cluster.conf, tenant_toml(cluster, "alpha"))
    )
    daemon = DaemonProcess(config, root / "daemon.log", root / "plugins")
    try:
        # Nobody could answer on the stale socket: answering proves a new one replaced it.
        daemon.start(wait_for="alpha")
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    finally:
        code = daemon.stop()
    assert code == 0 and not os.path.lexists(path)  # stopped cleanly, its socket removed


def test_serve_rejects_a_bad_config(short_tmp: Path) -> None:
    bad = short_tmp / "bad.toml"
    bad.write_text("[daemon]\nop_timeout = 0\n[tenants.rbd]\n")
    done = rbdplugin("serve", "--config", str(bad))
    assert done.returncode == 1
    assert "daemon.op_timeout 0 must be 1-110 seconds" in done.stderr
