"""Cinder mode: a Mount (Nova attach, the disk awaited, mounted) against Nova's attach alone.

Runs against a devcloud (real Keystone and Cinder, the Nova stand-in whose pretend
server ``vm`` is this host) and a second daemon serving one ``backend = "cinder"``
tenant. The floor attaches a Cinder volume of its own to the same server with
openstacksdk, as the member user, and waits for the disk's by-id link, as the daemon
does. Left out, with a line in the table saying why, when the devcloud's venv is missing.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import Env, Server
from bench.model import CaseResult
from bench.promtext import moved, scrape
from bench.stats import NO_TARGET
from rbdplugin.devcloud.venv import python, venv_path
from rbdplugin.devcluster import free_ports

DRIVER = "vm"
BY_ID = Path("/dev/disk/by-id")
TIMEOUT = 60.0


def cinder_case(env: Env, smoke: bool, skip: bool = False) -> list[CaseResult]:
    floor_name = "Nova attach alone (devcloud), until the disk is here"
    result = CaseResult("cinder", "Cinder mode: Mount (attach, disk, mount)", "s", floor_name,
                        NO_TARGET)  # fmt: skip
    if skip:
        result.not_run = "left out (--no-cinder)"
        return [result]
    if not python(venv_path()).exists():
        result.not_run = (f"the devcloud venv {venv_path()} is missing; build it with "
                          "`python -m rbdplugin.devcloud venv` (make setup does)")  # fmt: skip
        return [result]
    reps, warmup = (1, 1) if smoke else (8, 2)
    root = env.root / "cloud"
    started = _devcloud("start", "--dir", str(root))
    if started.returncode != 0:
        raise RuntimeError(f"devcloud start failed: {started.stderr[-2000:]}")
    daemon: Server | None = None
    try:
        state = json.loads((root / "devcloud.json").read_text())
        server_id = next(s["id"] for s in state["servers"] if s["name"] == DRIVER)
        daemon, metrics = _daemon(env, root, server_id)
        before = scrape(metrics)
        ours, floor = _measure(daemon, root, server_id, warmup, reps)
        result.ours, result.floor = ours, floor
        result.stages = moved(before, scrape(metrics))
    finally:
        if daemon is not None:
            daemon.stop()
        _devcloud("stop", "--dir", str(root))
    return [result]


def _measure(
    daemon: Server, root: Path, server_id: str, warmup: int, reps: int
) -> tuple[list[float], list[float]]:
    import openstack.config  # noqa: PLC0415 - only this case needs openstacksdk
    import openstack.connection  # noqa: PLC0415

    from tests.helpers import PluginClient  # noqa: PLC0415

    client = PluginClient(daemon.socket, timeout=180)
    config = openstack.config.OpenStackConfig(
        config_files=[str(root / "clouds.yaml")], load_envvars=False
    )
    conn: Any = openstack.connection.Connection(config=config.get_one(cloud="devcloud"))
    ours: list[float] = []
    floor: list[float] = []
    name = "b-cinder"
    reply = client.create(name, {"size": "1G"})
    assert reply == {"Err": ""}, reply
    volume = conn.block_storage.create_volume(size=1, name="b-cinder-floor")
    conn.block_storage.wait_for_status(volume, "available", wait=TIMEOUT)
    link = BY_ID / f"virtio-{volume.id[:20]}"
    try:
        for i in range(warmup + reps):
            mount = f"m{i}"
            started = time.perf_counter()
            reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": mount})
            took = time.perf_counter() - started
            assert reply.get("Err") == "", reply
            reply = client.call("VolumeDriver.Unmount", {"Name": name, "ID": mount})
            assert reply == {"Err": ""}, reply
            started = time.perf_counter()
            conn.compute.create_volume_attachment(server_id, volume=volume.id)
            _wait(link.exists, f"{link} to appear")
            floor_took = time.perf_counter() - started
            # Nova's attach finishes after the disk shows: detach only once it is in-use.
            conn.block_storage.wait_for_status(volume, "in-use", wait=TIMEOUT)
            conn.compute.delete_volume_attachment(server_id, volume.id)
            _wait(lambda: not link.exists(), f"{link} to go")
            conn.block_storage.wait_for_status(volume, "available", wait=TIMEOUT)
            if i >= warmup:
                ours.append(took)
                floor.append(floor_took)
        client.remove(name)
    finally:
        with contextlib.suppress(Exception):
            conn.compute.delete_volume_attachment(server_id, volume.id)
            conn.block_storage.wait_for_status(volume, "available", wait=TIMEOUT)
        with contextlib.suppress(Exception):
            conn.block_storage.delete_volume(volume, ignore_missing=True)
        conn.close()
    return ours, floor


def _daemon(env: Env, root: Path, server_id: str) -> tuple[Server, str]:
    """The Cinder-mode daemon, started; and its metrics URL."""
    here = env.root / "cm"
    config = here / "rbdplugin.toml"
    here.mkdir()
    metrics = f"127.0.0.1:{free_ports(1)[0]}"
    config.write_text(
        "[daemon]\n"
        f'socket_dir = "{here / "plugins"}"\nstate_dir = "{here / "state"}"\n'
        f'mount_root = "{here / "mounts"}"\nhost_id = "bench-vm"\n'
        f'metrics = "{metrics}"\n\n'
        f'[ceph]\nconf = "{env.cluster.conf}"\n\n'
        f'[tenants.{DRIVER}]\nbackend = "cinder"\ncloud = "devcloud"\n'
        f'clouds_yaml = "{root / "clouds.yaml"}"\nserver_id = "{server_id}"\n'
        'default_size = "1G"\n'
    )
    config.chmod(0o600)
    argv = [sys.executable, "-m", "rbdplugin", "serve", "--config", str(config)]
    server = Server(argv, here / "plugins" / f"{DRIVER}.sock", here / "daemon.log")
    server.start()
    return server, f"http://{metrics}/metrics"


def _devcloud(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbdplugin.devcloud", *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _wait(check: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"waiting for {what}: not within {TIMEOUT:.0f} s")
        time.sleep(0.005)
