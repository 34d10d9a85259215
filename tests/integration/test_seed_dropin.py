"""The drop-in for yp-engineering's rbd-docker-plugin: started with that plugin's flags
(no TOML file), it serves the seed's journey against the real cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.helpers import TEST_MAPPER, Admin, DaemonProcess, PluginClient, unique


class SeedDaemon(DaemonProcess):
    """``rbdplugin serve`` started with rbd-docker-plugin's flags instead of a config file."""

    def __init__(
        self, argv: list[str], log_path: Path, socket_dir: Path, env: dict[str, str]
    ) -> None:
        super().__init__(Path("/nonexistent"), log_path, socket_dir, env)
        self.argv = argv

    def start(self, wait_for: str, timeout: float = 30.0) -> SeedDaemon:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "rbdplugin", "serve", *self.argv],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env)  # fmt: skip
        client, deadline = self.client(wait_for), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                client.call("Plugin.Activate")
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not answer within {timeout} s:\n{self.log()}")


@pytest.fixture
def seed_root(short_tmp: Path) -> Path:
    root = short_tmp / f"seed-{unique('')[1:]}"
    root.mkdir()
    return root


@pytest.fixture
def ceph_conf(cluster: DevCluster, seed_root: Path) -> Path:
    """The cluster's ceph.conf as an operator of the seed has it: client.alpha's keyring
    named in [client.alpha] (librados's own rule, which the seed relied on)."""
    conf = seed_root / "ceph.conf"
    keyrings = cluster.keyring("alpha").parent
    conf.write_text(
        f"{cluster.conf.read_text()}\n[client.alpha]\nkeyring = {keyrings}/$cluster.$name.keyring\n"
    )
    return conf


def seed_env(root: Path) -> dict[str, str]:
    # What the seed's flags do not cover comes from the usual environment overrides.
    return {
        **os.environ,
        "RBDPLUGIN_DAEMON_STATE_DIR": str(root / "state"),
        "RBDPLUGIN_DAEMON_METRICS": "",
        "RBDPLUGIN_DAEMON_MAPPER": TEST_MAPPER,
        "RBDPLUGIN_DAEMON_HOST_ID": "seed-host",
        "RBDPLUGIN_DAEMON_OP_TIMEOUT": os.environ.get("RBDPLUGIN_TEST_OP_TIMEOUT", "25"),
    }


@pytest.fixture
def start_seed(seed_root: Path) -> Iterator[list[SeedDaemon]]:
    started: list[SeedDaemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def test_the_seeds_journey(
    seed_root: Path,
    ceph_conf: Path,
    cluster: DevCluster,
    admin: Admin,
    start_seed: list[SeedDaemon],
) -> None:
    argv = ["-create", "--user=alpha", "--pool=alpha", "--name=seedrbd", f"--config={ceph_conf}",
            f"--plugins={seed_root}/plugins", f"--mount={seed_root}/mnt", "--size=512",
            "--remove=delete"]  # fmt: skip
    daemon = SeedDaemon(argv, seed_root / "daemon.log", seed_root / "plugins", seed_env(seed_root))
    start_seed.append(daemon.start("seedrbd"))
    log = daemon.log()
    # The config it serves is printed, to be saved as TOML; the differences are logged.
    assert "[tenants.seedrbd]" in log
    assert f'keyring = "{cluster.keyring("alpha")}"' in log  # found through ceph.conf
    assert 'remove_policy = "delete"' in log and "nosuid,nodev" in log

    client, name = PluginClient(seed_root / "plugins" / "seedrbd.sock"), unique("seed")
    # docker run -v NAME:/data with --create: Opts null, the seed's defaults (512 MB, xfs).
    assert client.create(name, None) == {"Err": ""}
    assert name in admin.images("alpha")
    assert admin.size("alpha", name) == 512 * 1024 * 1024
    status = client.get(name)["Volume"]["Status"]
    assert (status["pool"], status["fstype"]) == ("alpha", "xfs")

    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c1"})
    assert reply["Err"] == "", reply
    path = Path(reply["Mountpoint"])
    assert path == seed_root / "mnt" / "seedrbd" / name
    assert oracle.fstype_at(path) == "xfs"
    (path / "hello").write_text("from the seed's journey\n")
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c1"}) == {"Err": ""}
    assert not oracle.is_mounted(path)

    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c2"})
    assert (Path(reply["Mountpoint"]) / "hello").read_text() == "from the seed's journey\n"
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c2"}) == {"Err": ""}

    assert client.remove(name) == {"Err": ""}
    assert name not in admin.images("alpha")  # --remove=delete
    assert name not in client.names()


def test_without_create_docker_run_does_not_create(
    seed_root: Path, ceph_conf: Path, admin: Admin, start_seed: list[SeedDaemon]
) -> None:
    argv = ["--user", "alpha", "--pool", "alpha", "--name", "seednocreate", "--config", str(ceph_conf),
            "--plugins", f"{seed_root}/plugins", "--mount", f"{seed_root}/mnt"]  # fmt: skip
    daemon = SeedDaemon(argv, seed_root / "daemon.log", seed_root / "plugins", seed_env(seed_root))
    start_seed.append(daemon.start("seednocreate"))
    assert "without --create: auto_create = false" in daemon.log()
    client, name = daemon.client("seednocreate"), unique("seed")
    assert "does not create volumes implicitly" in client.create(name, None)["Err"]
    assert name not in admin.images("alpha")
