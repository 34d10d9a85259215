"""Runs inside the kernel-tier guest only (real systemd as PID 1, krbd, dockerd): the
shipped unit (systemd/rbdplugin.service) runs the daemon installed from its wheel.

``systemctl start`` returns once READY=1 came, and by then the driver socket answers;
``systemctl restart`` while a container appends a counter to its volume loses no write
and the container never notices; after ``systemctl stop`` and ``start`` the daemon
adopts the volume with its mount counts, and Docker's Unmount goes through it.
tests/kernel/test_kernel_tier.py boots the guest that runs this (suite ``systemd``).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import daemon_toml, tenant_toml
from tests.e2e.conftest import IMAGE, Engine, Plugins, build_image
from tests.helpers import PluginClient, unique, wait_until

pytestmark = pytest.mark.kernel_inside

SRC = Path(__file__).resolve().parents[2]
UNIT = Path("/etc/systemd/system/rbdplugin.service")
CONFIG = Path("/etc/rbdplugin/rbdplugin.toml")
# Where `pip install rbdplugin-*.whl` puts things as root on Debian (the guest has no pip).
SITE = Path("/usr/local/lib/python3.11/dist-packages")
SCRIPT = Path("/usr/local/bin/rbdplugin")
# A write that fails ends the container with a non-zero status and a message in its log.
WRITER = ("i=0; while :; do i=$((i+1)); echo $i >> /data/log || exit 3; "
          "sync -f /data/log || exit 4; sleep 0.1; done")  # fmt: skip


def sh(*args: str, check: bool = True, timeout: float = 180) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout + done.stderr


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", "rbdplugin", *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def timed(*args: str) -> float:
    started = time.monotonic()
    sh(*args)
    return time.monotonic() - started


def install_wheel(work: Path) -> tuple[Path, list[Path]]:
    """Build the wheel from a copy of the checkout (/src is read-only) with setuptools'
    PEP 517 backend, and install it as pip would: unpacked into site-packages, byte
    compiled, its console script in /usr/local/bin. Returns the wheel and what was made."""
    copy = work / "src"
    copy.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(SRC / name, copy / name)
    shutil.copytree(SRC / "rbdplugin", copy / "rbdplugin",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    build = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(work / "dist")], cwd=copy,
                          capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    wheel = work / "dist" / done.stdout.split()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(SITE)
    made = sorted({SITE / name.split("/")[0] for name in names})
    sh(sys.executable, "-m", "compileall", "-q", *(str(p) for p in made if p.is_dir()))
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "rbdplugin = rbdplugin.cli:main" in (SITE / entry).read_text()
    SCRIPT.write_text(
        f"#!{sys.executable}\nimport sys\nfrom rbdplugin.cli import main\nsys.exit(main())\n"
    )
    return wheel, made


@dataclass
class Host:
    """The guest set up as an operator's host: the unit, the config, dockerd."""

    engine: Engine
    driver: str  # the plugin's name in Docker
    socket: Path
    mounts: Path

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.engine.run(*args, check=check)

    def plugin(self) -> PluginClient:
        return PluginClient(self.socket, timeout=10)


@pytest.fixture(scope="module")
def host(cluster: DevCluster, short_tmp: Path) -> Iterator[Host]:
    root = short_tmp / "sd"
    root.mkdir()
    shim = SCRIPT.read_bytes()  # the guest's own /src launcher, restored afterwards
    started = time.monotonic()
    wheel, made = install_wheel(root / "wheel")
    print(f"\nwheel {wheel.name} built and installed in {time.monotonic() - started:.0f} s")
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    tenants = tenant_toml(cluster, "alpha", default_size="256M")
    CONFIG.write_text(daemon_toml(root, cluster.conf, tenants, mapper="krbd"))
    shutil.copy(SRC / "systemd" / "rbdplugin.service", UNIT)
    sh("systemctl", "daemon-reload")
    engine = Engine(root / "docker")
    engine.root.mkdir()
    plugins = Plugins()
    try:
        engine.start()
        build_image(engine, engine.root)
        socket = root / "plugins" / "alpha.sock"
        yield Host(engine, plugins.register("sd", socket), socket, root / "mounts" / "alpha")
    finally:
        engine.stop()
        plugins.remove()
        sh("systemctl", "disable", "--now", "rbdplugin", check=False)
        UNIT.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload", check=False)
        sh("systemctl", "reset-failed", "rbdplugin", check=False)
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        SCRIPT.write_bytes(shim)


def test_1_start_returns_once_the_driver_socket_answers(host: Host) -> None:
    verify = subprocess.run(["systemd-analyze", "verify", str(UNIT)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    print(f"systemd-analyze verify: exit {verify.returncode}, output {verify.stderr!r}")
    assert verify.returncode == 0 and "rbdplugin" not in verify.stderr
    sh("systemctl", "enable", "rbdplugin")
    assert Path("/etc/systemd/system/docker.service.wants/rbdplugin.service").is_symlink()
    took = timed("systemctl", "start", "rbdplugin")
    # Type=notify: start returned only after READY=1, sent once the socket listened.
    assert host.socket.is_socket()
    activate = host.plugin().call("Plugin.Activate")
    state = show("ActiveState", "SubState", "MainPID", "StatusText", "Type", "KillMode")
    print(f"systemctl start returned after {took:.1f} s; at once Activate -> {activate}; {state}")
    assert activate == {"Implements": ["VolumeDriver"]}
    assert (state["Type"], state["KillMode"]) == ("notify", "process")
    assert state["ActiveState"] == "active"
    assert state["StatusText"].startswith("listening for alpha")
    pid = state["MainPID"]
    # In the host's mount namespace: Docker sees what it mounts.
    assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/1/ns/mnt")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not any(var.startswith(b"PYTHONPATH=") for var in environ)
    # Room for many client connections (the unit's LimitNOFILE, not the default 1024).
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    assert next(line for line in limits if line.startswith("Max open files")).split()[3:5] == [
        "65536",
        "65536",
    ]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    # Run as systemd runs it (in /, no PYTHONPATH): rbdplugin comes from the wheel, not /src.
    where = subprocess.run([sys.executable, "-c", "import rbdplugin; print(rbdplugin.__file__)"],
                           cwd="/", env={}, capture_output=True, text=True, check=True).stdout  # fmt: skip
    print(f"main process {pid}: {cmdline.strip()}; rbdplugin from {where.strip()}")
    assert os.readlink(f"/proc/{pid}/cwd") == "/" and where.startswith(str(SITE))
    wait_until(lambda: show("StatusText")["StatusText"].endswith("ready"), 60, "reconciled")
    print(f"status: {show('StatusText')['StatusText']}")


@dataclass
class Writer:
    volume: str
    container: str
    ids: dict[str, int]


def _last(host: Host, volume: str) -> int:
    lines = (host.mounts / volume / "log").read_text().splitlines()
    return int(lines[-2]) if len(lines) > 1 else 0  # the last line may be half written


def _mounts(host: Host, volume: str) -> dict[str, int]:
    got = host.plugin().get(volume)
    assert got["Err"] == "", got
    mounts: dict[str, int] = got["Volume"]["Status"].get("mounts", {})
    return mounts


def _unharmed(host: Host, writer: Writer) -> str:
    state = host.docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}",
                        writer.container).stdout.strip()  # fmt: skip
    logs = host.docker("logs", writer.container)
    assert state == "running 0 0", state
    assert logs.stdout + logs.stderr == "", "the container saw an error"
    return state


@pytest.fixture(scope="module")
def writer(host: Host) -> Writer:
    volume = unique("sd")
    host.docker("volume", "create", "-d", host.driver, volume)
    container = host.docker("run", "-d", "--network", "none", "--volume-driver", host.driver,
                            "-v", f"{volume}:/data", IMAGE, "sh", "-c", WRITER).stdout.strip()  # fmt: skip
    wait_until(lambda: (host.mounts / volume / "log").exists() and _last(host, volume) >= 3, 60,
               "the container writing")  # fmt: skip
    ids = _mounts(host, volume)
    assert list(ids.values()) == [1], ids
    return Writer(volume, container, ids)


def test_2_restart_while_a_container_writes_loses_no_write(host: Host, writer: Writer) -> None:
    before, pid = _last(host, writer.volume), show("MainPID")["MainPID"]
    took = timed("systemctl", "restart", "rbdplugin")
    after = _last(host, writer.volume)
    state = show("MainPID", "ActiveState", "NRestarts")
    print(f"systemctl restart took {took:.1f} s (pid {pid} -> {state['MainPID']}); the counter "
          f"went {before} -> {after} meanwhile")  # fmt: skip
    assert state["MainPID"] != pid and state["ActiveState"] == "active"
    assert after - before >= took  # 4-10 writes a second under TCG: it never stalled
    assert _mounts(host, writer.volume) == writer.ids  # adopted at once
    wait_until(lambda: _last(host, writer.volume) > after + 5, 30, "writing on after the restart")
    lines = (host.mounts / writer.volume / "log").read_text().splitlines()[:-1]
    counts = [int(line) for line in lines]
    gaps = [(a, b) for a, b in itertools.pairwise(counts) if b != a + 1]
    print(f"after the restart: {len(counts)} lines 1..{counts[-1]}, gaps {gaps or 'none'}; "
          f"container {_unharmed(host, writer)}")  # fmt: skip
    assert counts == list(range(1, len(counts) + 1))


def test_3_stop_then_start_adopts_the_volume_with_its_counts(host: Host, writer: Writer) -> None:
    mountpoint = host.mounts / writer.volume
    sh("systemctl", "stop", "rbdplugin")
    assert show("ActiveState")["ActiveState"] == "inactive"
    assert not host.socket.exists()
    down = _last(host, writer.volume)
    time.sleep(1)
    mapped = [dev for dev, image in oracle.krbd_devices().items() if image.endswith(writer.volume)]
    print(f"daemon stopped: mounted {oracle.is_mounted(mountpoint)}, krbd {mapped}, counter "
          f"{down} -> {_last(host, writer.volume)} in 1 s")  # fmt: skip
    assert oracle.is_mounted(mountpoint) and mapped
    assert _last(host, writer.volume) > down
    took = timed("systemctl", "start", "rbdplugin")
    got = host.plugin().get(writer.volume)
    print(f"systemctl start took {took:.1f} s; Get -> {json.dumps(got['Volume']['Status'])}")
    assert _mounts(host, writer.volume) == writer.ids
    _unharmed(host, writer)
    # Docker's Unmount goes to the daemon that adopted the mount: it unmounts and unmaps.
    host.docker("stop", "-t", "1", writer.container)
    wait_until(lambda: not oracle.is_mounted(mountpoint), 30, "Docker's Unmount")
    wait_until(lambda: not set(mapped) & set(oracle.krbd_devices()), 30, "the krbd unmap")
    print(f"container stopped: unmounted and unmapped; mounts now {_mounts(host, writer.volume)}")
    assert _mounts(host, writer.volume) == {}
    host.docker("rm", writer.container)
    host.docker("volume", "rm", writer.volume)
