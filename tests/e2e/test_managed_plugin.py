"""The managed Docker plugin: built from this checkout the way ``make plugin`` builds it
(local base image, ``docker build``, rootfs export, ``docker plugin create``), enabled in a
real dockerd, serving the session's Ceph cluster with the fuse mapper.

No registry is reachable here: the base image is debootstrapped and imported
(plugin/make-base, cached under /var/cache/rbdplugin-plugin-base), and ``docker plugin
upgrade`` pulls the new build from Debian's docker-registry listening on 127.0.0.1.
Everything the plugin talks to (Ceph, the registry) is on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests.e2e.conftest import IMAGE, Engine
from tests.helpers import unique, wait_until

SRC = Path(__file__).resolve().parents[2]
BASE = "rbdplugin-base:bookworm"
RUN = ("run", "--rm", "--network", "none")
TENANT = "alpha"
# Docker gives a managed plugin 30 s per request; Mount must finish well within it.
MOUNT_BUDGET = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Registry:
    """Debian's docker-registry on loopback: the only way to ``docker plugin upgrade``."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def registry(short_tmp: Path) -> Iterator[Registry]:
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry not found: apt-get install docker-registry (make setup does)")
    root = short_tmp / "registry"
    root.mkdir()
    port = _free_port()
    (root / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root}/data\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    log = (root / "registry.log").open("ab")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    reg = Registry(root, port, proc)

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=1):
                return True
        except OSError:
            return proc.poll() is not None

    wait_until(answers, 20, "docker-registry answering on loopback")
    assert proc.poll() is None, (root / "registry.log").read_text()
    yield reg
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


@dataclass
class Managed:
    engine: Engine
    name: str  # the plugin, as Docker knows it: also the volume driver's name
    work: Path
    registry: Registry
    settings: tuple[str, ...] = ()

    def configure(self) -> None:
        """docker plugin set: the settable mounts' sources and the fuse mapper."""
        self.docker("plugin", "set", self.name, *self.settings)

    def docker(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        return self.engine.run(*args, check=check, timeout=timeout).stdout

    def build(self, name: str, label: str) -> float:
        """plugin/build NAME as ``make plugin`` runs it; returns the seconds it took."""
        env = {**os.environ, "DOCKER_HOST": f"unix://{self.engine.sock}", "BASE": BASE,
               "IMAGE": f"rbdplugin-rootfs:{label}", "BUILD_ID": label}  # fmt: skip
        started = time.monotonic()
        done = subprocess.run([str(SRC / "plugin" / "build"), name, str(self.work / label)],
                              env=env, capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return time.monotonic() - started

    def plugin(self) -> dict[str, object]:
        found: dict[str, object] = json.loads(self.docker("plugin", "inspect", self.name))[0]
        return found

    def build_id(self) -> str:
        """The BUILD_ID baked into the enabled plugin's rootfs (read from the engine's store)."""
        rootfs = self.engine.root / "data" / "plugins" / str(self.plugin()["Id"]) / "rootfs"
        return (rootfs / "etc" / "rbdplugin-build").read_text().strip()

    def enable(self) -> float:
        started = time.monotonic()
        self.docker("plugin", "enable", "--timeout", "30", self.name)
        return time.monotonic() - started

    def volumes(self) -> set[str]:
        """The volumes these tests made through the plugin. Its tenant's pool also holds
        the other e2e tests' volumes (one session cluster), which the plugin lists too."""
        lines = self.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").splitlines()
        return {
            line.split()[1] for line in lines
            if line.split()[0] == self.name and line.split()[1].startswith(("mp-", "mbig-"))
        }  # fmt: skip

    def write(self, volume: str, text: str) -> None:
        self.docker(*RUN, "-v", f"{volume}:/data", IMAGE, "sh", "-c",
                    f"echo {text} > /data/f; sync -f /data/f")  # fmt: skip

    def read(self, volume: str) -> str:
        return self.docker(*RUN, "-v", f"{volume}:/data", IMAGE, "cat", "/data/f").strip()

    def log(self) -> str:
        """The plugin's output, which dockerd logs with the plugin's id."""
        return self.engine.log()[-4000:]


def _plugin_inputs(cluster: DevCluster, work: Path) -> dict[str, Path]:
    """What the plugin's settable mounts point at: ceph.conf + the tenant's keyring, the TOML."""
    ceph = work / "etc-ceph"
    ceph.mkdir()
    conf = cluster.conf.read_text().replace(str(cluster.root), "/etc/ceph")
    (ceph / "ceph.conf").write_text(re.sub(r"(?m)^log file = .*$", "log file = /dev/null", conf))
    shutil.copy(cluster.keyring(TENANT), ceph / f"ceph.client.{TENANT}.keyring")
    config = work / "etc-rbdplugin"
    config.mkdir()
    (config / "rbdplugin.toml").write_text(
        '[daemon]\nhost_id = "plugin-host"\nmetrics = ""\nmapper = "auto"\nop_timeout = 25\n\n'
        '[ceph]\nconf = "/etc/ceph/ceph.conf"\nclient_timeout = 5\n\n'
        # Two tenants, neither named rbd: RBDPLUGIN_TENANT picks the one this instance
        # serves as rbd.sock (the other would need a plugin instance of its own).
        '[tenants.beta]\npool = "beta"\nuser = "beta"\n'
        'keyring = "/etc/ceph/ceph.client.beta.keyring"\n\n'
        f'[tenants.{TENANT}]\npool = "{TENANT}"\nuser = "{TENANT}"\n'
        f'keyring = "/etc/ceph/ceph.client.{TENANT}.keyring"\ndefault_size = "256M"\n'
    )
    state = work / "state"
    state.mkdir()
    modules = work / "modules"  # this host has no /lib/modules (no module loading)
    modules.mkdir()
    return {"ceph": ceph, "config": config, "state": state, "modules": modules}


@pytest.fixture(scope="module")
def managed(
    cluster: DevCluster, docker_engines: Callable[[str], Engine], registry: Registry,
    short_tmp: Path,
) -> Iterator[Managed]:  # fmt: skip
    engine = docker_engines("m")
    work = short_tmp / "managed"
    work.mkdir()
    plugin = Managed(engine, f"rbdt{uuid.uuid4().hex[:8]}:latest", work, registry)
    started = time.monotonic()
    subprocess.run([str(SRC / "plugin" / "make-base"), "--preload", BASE], check=True,
                   env={**os.environ, "DOCKER_HOST": f"unix://{engine.sock}"}, timeout=900)  # fmt: skip
    base = time.monotonic() - started
    build = plugin.build(plugin.name, "v1")
    print(f"\nmanaged plugin: base image {base:.1f} s, image + plugin create {build:.1f} s")
    inputs = _plugin_inputs(cluster, work)
    plugin.settings = (*(f"{mount}.source={path}" for mount, path in inputs.items()),
                       "RBDPLUGIN_DAEMON_MAPPER=fuse", f"RBDPLUGIN_TENANT={TENANT}")  # fmt: skip
    plugin.configure()
    try:
        yield plugin
    finally:
        for volume in plugin.volumes():
            plugin.docker("volume", "rm", "-f", volume, check=False)
        plugin.docker("plugin", "disable", "-f", plugin.name, check=False)
        plugin.docker("plugin", "rm", "-f", plugin.name, check=False)


def test_1_enable_create_write_read_and_disable_enable(managed: Managed) -> None:
    took = managed.enable()
    print(f"docker plugin enable: {took:.1f} s")
    print(managed.docker("plugin", "ls"))
    assert managed.plugin()["Enabled"] is True
    name = unique("mp")
    managed.docker("volume", "create", "-d", managed.name, "--opt", "size=1G", name)
    managed.write(name, "hello-from-the-first-container")
    assert not managed.docker("ps", "-aq").strip()  # the writer is gone
    assert managed.read(name) == "hello-from-the-first-container"
    print(f"{name}: written by one container, read by the next: hello-from-the-first-container")
    # Scope and Status come from the daemon inside the plugin (Capabilities and Get).
    inspect = json.loads(managed.docker("volume", "inspect", name))[0]
    assert inspect["Scope"] == "global" and inspect["Status"]["pool"] == TENANT, inspect

    # Docker counts every volume of the plugin as a use: without -f it refuses ("in use")
    # even with no container running. -f is what an operator types; nothing is mounted.
    managed.docker("plugin", "disable", "-f", managed.name)
    assert managed.enable() < 30
    assert name in managed.volumes()
    assert managed.read(name) == "hello-from-the-first-container"


def test_2_mount_of_a_fresh_100g_volume_is_within_the_managed_deadline(managed: Managed) -> None:
    name = unique("mbig")
    started = time.monotonic()
    managed.docker("volume", "create", "-d", managed.name, "--opt", "size=100G", name)
    create = time.monotonic() - started
    started = time.monotonic()
    # Mount (map, mkfs of the blank 100 GiB image, mount), the container, Unmount.
    managed.docker(*RUN, "-v", f"{name}:/data", IMAGE, "sh", "-c", "df -k /data | tail -1")
    took = time.monotonic() - started
    print(f"fresh 100 GiB volume: Create {create:.1f} s, first Mount "
          f"(the whole docker run, Unmount included) {took:.1f} s")  # fmt: skip
    assert create < MOUNT_BUDGET and took < MOUNT_BUDGET, managed.log()
    size_kib = int(managed.docker(*RUN, "-v", f"{name}:/data", IMAGE,
                                  "sh", "-c", "df -k /data | tail -1").split()[1])  # fmt: skip
    assert size_kib > 95 * 1024 * 1024


def test_3_upgrade_keeps_every_volume_and_its_data(managed: Managed) -> None:
    before = {v: managed.read(v) if not v.startswith("mbig") else "" for v in managed.volumes()}
    assert before, "the earlier tests left volumes to carry over"
    assert managed.build_id() == "v1"
    # The new build goes through the loopback registry: docker plugin upgrade only pulls.
    remote = f"{managed.registry.host}/rbdplugin/{managed.name.split(':')[0]}:v2"
    took = managed.build(remote, "v2")
    started = time.monotonic()
    managed.docker("plugin", "push", remote)
    managed.docker("plugin", "rm", remote)
    managed.docker("plugin", "disable", "-f", managed.name)
    managed.docker(
        "plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", managed.name, remote
    )
    print(f"upgrade: build {took:.1f} s, push + upgrade {time.monotonic() - started:.1f} s")
    # After an upgrade, inspect still shows the mount sources set before, but enable used
    # config.json's defaults (Docker 28.2.2: "stat /lib/modules: no such file"): set again.
    settings = managed.plugin()["Settings"]
    assert isinstance(settings, dict)
    sources = {m["Name"]: m["Source"] for m in settings["Mounts"]}
    print(f"settings after upgrade: mounts {sources}, env {settings['Env']}")
    managed.configure()
    managed.enable()
    assert managed.build_id() == "v2"
    assert managed.volumes() == set(before)
    for volume, text in before.items():
        if text:
            assert managed.read(volume) == text
    managed.write(next(iter(before)), "after-upgrade")
