"""A real Docker engine for the end-to-end journeys.

Each test session starts its own dockerd (Debian's docker.io): private data and
exec roots under a short path, its own socket, no bridge and no iptables changes.
A tiny image is made from busybox-static with ``docker import``; nothing is pulled.
Docker finds our daemon through ``/etc/docker/plugins/<name>.spec`` under a
plugin name unique to the run, removed at the end. A second engine with a daemon of
its own (``stack_b``) stands in for a second host on the same cluster.

Missing docker tools fail the run (tests/conftest.py), unless RBDPLUGIN_SKIP_E2E=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import DaemonProcess, PluginClient

SPEC_DIR = Path("/etc/docker/plugins")
DOCKER = "/usr/bin/docker"
IMAGE = "rbdplugin-test/busybox:1"
APPLETS = ("sh", "echo", "cat", "df", "ls", "sync", "sleep", "dd", "sha256sum", "date",
           "mkdir", "touch", "rm", "wc", "grep", "head", "tail", "true", "test", "seq")  # fmt: skip


@dataclass
class Engine:
    """One dockerd with its own roots and socket."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.root / "docker.sock"

    def start(self) -> Engine:
        log = (self.root / "dockerd.log").open("ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "x"),
             "--pidfile", str(self.root / "pid"), "--host", f"unix://{self.sock}",
             "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none",
             "--containerd-namespace", f"rbdp{self.root.name}", *self.extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while self.run("info", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")

    def run(
        self, *args: str, check: bool = True, timeout: float = 150
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [DOCKER, "-H", f"unix://{self.sock}", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed:\n{done.stderr}")
        return done

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for container in self.run("ps", "-aq", check=False).stdout.split():
            self.run("rm", "-f", container, check=False)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for entry in reversed(oracle.mountinfo()):
            if entry["target"].startswith(f"{self.root}/"):
                subprocess.run(["umount", "--lazy", entry["target"]], check=False)


def build_image(engine: Engine, work: Path) -> None:
    rootfs = work / "rootfs"
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in APPLETS:
        link = rootfs / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for folder in ("mnt", "data", "tmp", "proc", "sys", "dev", "etc"):
        (rootfs / folder).mkdir(exist_ok=True)
    tarball = work / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
    engine.run("import", str(tarball), IMAGE)


@dataclass
class Plugins:
    """Spec files naming our sockets under run-unique plugin names."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    made: list[Path] = field(default_factory=list)

    def register(self, label: str, socket_path: Path) -> str:
        name = f"rbdt{self.run_id}{label}"
        SPEC_DIR.mkdir(parents=True, exist_ok=True)
        spec = SPEC_DIR / f"{name}.spec"
        spec.write_text(f"unix://{socket_path}\n")
        self.made.append(spec)
        return name

    def remove(self) -> None:
        for spec in self.made:
            spec.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def docker_engines(short_tmp: Path) -> Iterator[Callable[[str], Engine]]:
    engines: dict[str, Engine] = {}

    def engine(label: str) -> Engine:
        if label not in engines:
            root = short_tmp / f"k{label}"
            root.mkdir()
            engines[label] = Engine(root).start()
            build_image(engines[label], root)
        return engines[label]

    yield engine
    for running in engines.values():
        running.stop()


@pytest.fixture(scope="session")
def plugins() -> Iterator[Plugins]:
    registry = Plugins()
    yield registry
    registry.remove()


@dataclass
class Stack:
    """A docker engine, our daemon behind it, and the plugin names Docker knows it by."""

    engine: Engine
    daemon: DaemonProcess
    drivers: dict[str, str]  # tenant -> plugin name in Docker

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.engine.run(*args, check=check)

    def plugin(self, tenant: str) -> PluginClient:
        """Our daemon's socket, to ask it directly what Docker made it do."""
        return self.daemon.client(tenant)

    def log_mark(self) -> int:
        """Where our daemon's log ends now: pass it to :meth:`log_since`."""
        return self.daemon.log_path.stat().st_size

    def log_since(self, mark: int) -> str:
        with self.daemon.log_path.open("rb") as fh:
            fh.seek(mark)
            return fh.read().decode(errors="replace")

    def requests_since(self, mark: int, tenant: str, endpoint: str, volume: str) -> list[str]:
        """Our daemon's request log lines for ``endpoint`` on ``volume`` since ``mark``."""
        head = f"driver={tenant} endpoint=VolumeDriver.{endpoint} volume={volume} "
        return [line for line in self.log_since(mark).splitlines() if head in line]

    def mountpoint(self, tenant: str, volume: str) -> Path:
        return self.daemon.config.parent / "mounts" / tenant / volume


def _stack(
    label: str, host_id: str, cluster: DevCluster, daemon_factory: StartDaemon,
    docker_engines: Callable[[str], Engine], plugins: Plugins,
) -> Stack:  # fmt: skip
    tenants = (tenant_toml(cluster, "alpha", default_size="256M")
               + tenant_toml(cluster, "beta", default_size="256M"))  # fmt: skip
    # Debug: the journeys read from the log which queries (List, Get) Docker sent us.
    daemon = daemon_factory(tenants, wait_for="alpha", host_id=host_id, log_level="debug")
    drivers = {
        t: plugins.register(f"{label}{t}", daemon.socket_dir / f"{t}.sock")
        for t in ("alpha", "beta")
    }
    return Stack(docker_engines(label), daemon, drivers)


@pytest.fixture(scope="session")
def stack(
    cluster: DevCluster, daemon_factory: StartDaemon, docker_engines: Callable[[str], Engine],
    plugins: Plugins,
) -> Stack:  # fmt: skip
    """Host A: engine "a" and a daemon with host_id host-a."""
    return _stack("a", "host-a", cluster, daemon_factory, docker_engines, plugins)


@pytest.fixture(scope="session")
def stack_b(
    cluster: DevCluster, daemon_factory: StartDaemon, docker_engines: Callable[[str], Engine],
    plugins: Plugins,
) -> Stack:  # fmt: skip
    """Host B: engine "b" and a daemon of its own with host_id host-b, on the same cluster."""
    return _stack("b", "host-b", cluster, daemon_factory, docker_engines, plugins)
