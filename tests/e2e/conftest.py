"""A real Docker engine for the end-to-end journeys.

Each test session starts its own dockerd (Debian's docker.io): private data and
exec roots under a short path, its own socket, no bridge and no iptables changes.
A tiny image is made from busybox-static with ``docker import``; nothing is pulled.
Docker finds our daemon through ``/etc/docker/plugins/<name>.spec`` under a
plugin name unique to the run, removed at the end.
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
from rbdplugin.mapping import HostPaths
from rbdplugin.mapping.scan import mounts
from rbdplugin.process import pid_alive
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import DaemonProcess

SPEC_DIR = Path("/etc/docker/plugins")
DOCKER = "/usr/bin/docker"
IMAGE = "rbdplugin-test/busybox:1"
APPLETS = ("sh", "echo", "cat", "df", "ls", "sync", "sleep", "dd", "sha256sum", "date",
           "mkdir", "touch", "rm", "wc", "grep", "head", "tail", "true", "test", "seq")  # fmt: skip


def _why_no_docker() -> str | None:
    for tool in ("dockerd", DOCKER, "containerd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup installs docker.io)"
    if not Path("/bin/busybox").exists():
        return "/bin/busybox is missing (make setup installs busybox-static)"
    return None


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
        for target in sorted(mounts(HostPaths()), reverse=True):
            if target.startswith(str(self.root)):
                subprocess.run(["umount", "--lazy", target], check=False)


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
    reason = _why_no_docker()
    if reason:
        pytest.skip(f"cannot run dockerd here: {reason}")
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


@pytest.fixture(scope="session")
def stack(
    cluster: DevCluster, daemon_factory: StartDaemon, docker_engines: Callable[[str], Engine],
    plugins: Plugins,
) -> Stack:  # fmt: skip
    tenants = (tenant_toml(cluster, "alpha", default_size="256M")
               + tenant_toml(cluster, "beta", default_size="256M"))  # fmt: skip
    daemon = daemon_factory(tenants, wait_for="alpha", host_id="host-a")
    drivers = {t: plugins.register(t, daemon.socket_dir / f"{t}.sock") for t in ("alpha", "beta")}
    return Stack(docker_engines("a"), daemon, drivers)


def pids_gone(pids: list[int]) -> bool:
    return not any(pid_alive(pid) for pid in pids)
