"""The command line: config checking and start-up failures an operator can act on."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from rbdplugin.devcluster import DevCluster
from tests.conftest import daemon_toml, tenant_toml


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
    finally:
        holder.close()


def test_serve_replaces_a_stale_socket_and_rejects_a_bad_config(
    cluster: DevCluster, short_tmp: Path
) -> None:
    bad = short_tmp / "bad.toml"
    bad.write_text("[daemon]\nop_timeout = 0\n[tenants.rbd]\n")
    done = rbdplugin("serve", "--config", str(bad))
    assert done.returncode == 1
    assert "daemon.op_timeout 0 must be 1-110 seconds" in done.stderr
