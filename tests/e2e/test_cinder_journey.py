"""A real Docker journey in Cinder-attach mode: a real dockerd using our daemon's
Cinder-mode tenant ``vm`` against the devcloud (real Keystone and Cinder; the Nova
stand-in's pretend server ``vm`` is this host). The Cinder volume's state is read
with openstacksdk as the devcloud's admin at every step, and printed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tests import oracle
from tests.conftest import StartDaemon
from tests.e2e.conftest import IMAGE, Engine, Plugins
from tests.helpers import unique, wait_until
from tests.integration.test_cinder_mode import DRIVER, Cloud, cinder_toml, cloud  # noqa: F401

RUN = ("run", "--rm", "--network", "none")


def test_docker_writes_reads_and_removes_a_cinder_volume(
    cloud: Cloud,  # noqa: F811 - the fixture imported above
    daemon_factory: StartDaemon,
    docker_engines: Callable[[str], Engine],
    plugins: Plugins,
    short_tmp: Path,
) -> None:
    root = short_tmp / unique("dj")
    daemon = daemon_factory(cinder_toml(cloud), wait_for=DRIVER, state_dir=str(root / "state"),
                            mount_root=str(root / "mounts"))  # fmt: skip
    driver = plugins.register("cinder", daemon.socket_dir / f"{DRIVER}.sock")
    engine = docker_engines("c")
    name = unique("dj")
    engine.run("volume", "create", "-d", driver, "--opt", "size=1G", name)
    print(f"\ndocker volume create -d {driver} --opt size=1G {name}: {cloud.state_of(name)}")
    assert cloud.volume(name)["status"] == "available"  # type: ignore[index]
    engine.run(*RUN, "--volume-driver", driver, "-v", f"{name}:/mnt/v", IMAGE,
               "sh", "-c", "echo from-the-first > /mnt/v/f; sync -f /mnt/v/f")  # fmt: skip
    print(f"first container wrote and was removed: {cloud.state_of(name)}")
    after = cloud.volume(name)
    assert after is not None and after["status"] == "available" and not after["attachments"]
    assert not oracle.is_mounted(root / "mounts" / DRIVER / name)
    reader = engine.run("run", "-d", "--network", "none", "--volume-driver", driver, "-v",
                        f"{name}:/mnt/v", IMAGE, "sh", "-c",
                        "cat /mnt/v/f; grep ' /mnt/v ' /proc/mounts; sleep 600").stdout.strip()  # fmt: skip
    wait_until(lambda: len(engine.run("logs", reader).stdout.splitlines()) >= 2, 60, "the reader")
    lines = engine.run("logs", reader).stdout.splitlines()
    print(f"second container read {lines[0]!r}; its mount: {lines[1]}; {cloud.state_of(name)}")
    assert lines[0] == "from-the-first"
    volume_id = after["id"]
    # What backs /mnt/v in the container is the disk udev's by-id link names for the volume.
    link = Path(f"/dev/disk/by-id/virtio-{volume_id[:20]}")
    assert lines[1].split()[0] == os.path.realpath(link), (lines[1], os.path.realpath(link))
    engine.run("rm", "-f", reader)
    wait_until(lambda: cloud.volume(name)["status"] == "available", 60, "the detach")  # type: ignore[index]
    listed = json.loads(engine.run("volume", "inspect", name).stdout)[0]
    assert listed["Driver"] == driver and listed["Status"]["cinder_volume"] == volume_id
    engine.run("volume", "rm", name)
    print(f"docker volume rm {name}: {cloud.state_of(name)}")
    assert cloud.volume(name) is None or cloud.volume(name)["status"] == "deleting"  # type: ignore[index]
