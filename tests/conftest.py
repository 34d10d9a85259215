"""Fixtures: one real Ceph cluster per test session, daemons as real processes.

Tests marked ``ceph`` talk to the cluster; it starts on first use (about 2 s) and
stops at the end of the session. Every test uses volume names of its own, so
tests share the cluster and the daemon without seeing each other.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests.helpers import Admin, DaemonProcess, write_config

# alpha: trash policy (default); beta: delete; gamma: keep; delta: quotas.
TENANTS = ("alpha", "beta", "gamma", "delta")
# Shortened from Ceph's 30 s so that dead clients' watches (and takeovers) end quickly.
WATCH_TIMEOUT = 10


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts or "e2e" in item.path.parts:
            item.add_marker(pytest.mark.ceph)
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes: keep the root short.
    root = Path(tempfile.mkdtemp(prefix="rbdp-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(short_tmp: Path) -> Iterator[DevCluster]:
    dev = DevCluster(short_tmp / "ceph")
    dev.start(tenants=TENANTS, watch_timeout=WATCH_TIMEOUT)
    yield dev
    dev.stop()


@pytest.fixture(scope="session")
def admin(cluster: DevCluster) -> Iterator[Admin]:
    client = Admin(cluster.conf)
    yield client
    client.close()


def tenant_toml(cluster: DevCluster, name: str, **extra: object) -> str:
    lines = [
        f"[tenants.{extra.pop('table', name)}]",
        f'pool = "{name}"',
        f'user = "{name}"',
        f'keyring = "{cluster.keyring(name)}"',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def daemon_toml(root: Path, conf: Path, tenants: str, **daemon: object) -> str:
    settings = {
        "socket_dir": str(root / "plugins"),
        "state_dir": str(root / "state"),
        "mount_root": str(root / "mounts"),
        "host_id": "host-a",
        "metrics": "",
        **daemon,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    return f'[daemon]\n{body}\n\n[ceph]\nconf = "{conf}"\nclient_timeout = 5\n\n{tenants}'


StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture(scope="session")
def daemon_factory(short_tmp: Path, cluster: DevCluster) -> Iterator[StartDaemon]:
    """Start a daemon on a config of its own; every daemon started is stopped at the end."""
    started: list[DaemonProcess] = []
    counter = iter(range(1000))

    def start(
        tenants: str,
        wait_for: str,
        conf: Path | None = None,
        env: dict[str, str] | None = None,
        **daemon: object,
    ) -> DaemonProcess:
        root = short_tmp / f"d{next(counter)}"
        root.mkdir()
        config = write_config(
            root / "rbdplugin.toml", daemon_toml(root, conf or cluster.conf, tenants, **daemon)
        )
        proc = DaemonProcess(config, root / "daemon.log", root / "plugins", env=env)
        started.append(proc)
        return proc.start(wait_for)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def daemon(cluster: DevCluster, daemon_factory: StartDaemon) -> DaemonProcess:
    """The main daemon: alpha (trash), beta (delete), gamma (keep), delta (quotas)."""
    tenants = (
        tenant_toml(cluster, "alpha", default_size="1G")
        + tenant_toml(cluster, "beta", remove_policy="delete")
        + tenant_toml(cluster, "gamma", remove_policy="keep", default_size="64M")
        + tenant_toml(
            cluster, "delta", remove_policy="delete", max_volumes=3, max_total_size="3G",
            default_size="1G",
        )
    )  # fmt: skip
    return daemon_factory(tenants, wait_for="alpha")
