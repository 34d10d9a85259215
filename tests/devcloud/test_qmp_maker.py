"""The ``qmp`` disk maker against a real QEMU (paused, no guest) and the dev cluster.

QEMU opens the RBD image itself as the connection_info's Ceph user (its key handed over
as a secret object): the image gets a watcher. Without a guest nobody acknowledges an
unplug, which the maker reports instead of pretending. The guest side (udev's by-id
link) is the kernel tier's business."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import rbd

from rbdplugin.devcloud import qmp
from rbdplugin.devcloud.disks import Disk, GuestUnavailable, HostPlaces, QmpDiskMaker
from rbdplugin.devcluster import DevCluster
from rbdplugin.errors import DeadlineExceeded, RbdPluginError
from tests.helpers import Admin, wait_until

pytestmark = pytest.mark.ceph

if shutil.which("qemu-system-x86_64") is None:  # a missing tool fails the run, never skips
    pytest.fail("qemu-system-x86_64 is not installed, needed by the qmp disk maker's tests: "
                "apt-get install qemu-system-x86 (make setup does)", pytrace=False)  # fmt: skip

POOL = "alpha"  # a tenant of the session's dev cluster: pool and cephx user


@pytest.fixture
def images(admin: Admin) -> Iterator[list[str]]:
    """Images a test made; removed after its QEMU quit (requested before ``qemu``)."""
    made: list[str] = []
    yield made
    with admin.cluster.open_ioctx(POOL) as ioctx:
        for name in made:
            rbd.RBD().remove(ioctx, name)


@pytest.fixture
def qemu(short_tmp: Path) -> Iterator[Path]:
    sock = short_tmp / f"qmp-{uuid.uuid4().hex[:8]}.sock"
    process = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "pc", "-S", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(sock.exists, 10, "the QMP socket")
        yield sock
        with qmp.Qmp(sock) as session:  # a clean quit closes the images: no stale watch
            session.command("quit")
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def volume(admin: Admin, images: list[str], size: int = 16 << 20) -> Disk:
    volume_id = str(uuid.uuid4())
    admin.create_image(POOL, f"volume-{volume_id}", size)
    images.append(f"volume-{volume_id}")
    info = {"driver_volume_type": "rbd",
            "data": {"name": f"{POOL}/volume-{volume_id}", "auth_username": POOL}}  # fmt: skip
    return Disk(volume_id, info)


def maker(cluster: DevCluster, sock: Path) -> QmpDiskMaker:
    places = HostPlaces(cluster.root, cluster.root / "unused", qmp_socket=sock)
    return QmpDiskMaker(places, timeout=2)


def test_plug_opens_the_image_as_the_user_and_adds_a_device_with_the_serial(
    cluster: DevCluster, admin: Admin, images: list[str], qemu: Path
) -> None:
    disk, guest = volume(admin, images), maker(cluster, qemu)
    assert asyncio.run(guest.present(disk)) is False
    assert asyncio.run(guest.plug(disk)) == ""
    assert asyncio.run(guest.plug(disk)) == ""  # again: nothing more
    assert asyncio.run(guest.present(disk)) is True
    assert len(admin.watchers(POOL, f"volume-{disk.volume_id}")) == 1
    with qmp.Qmp(qemu) as session:
        path = f"/machine/peripheral/{guest.device_id(disk)}"
        assert session.command("qom-get", path=path, property="serial") == disk.volume_id[:20]
    # A paused machine never acknowledges the unplug: reported, and the disk stays.
    with pytest.raises(DeadlineExceeded, match="did not let the disk go"):
        asyncio.run(guest.unplug(disk))
    assert asyncio.run(guest.present(disk)) is True


def test_a_refused_plug_leaves_nothing_in_qemu(
    cluster: DevCluster, admin: Admin, images: list[str], qemu: Path
) -> None:
    disk, guest = volume(admin, images), maker(cluster, qemu)
    missing = Disk(str(uuid.uuid4()), {**disk.connection_info, "data": {
        "name": f"{POOL}/volume-none", "auth_username": POOL}})  # fmt: skip
    with qmp.Qmp(qemu) as session:
        before = (qmp.block_nodes(session), qmp.object_ids(session), qmp.device_ids(session))
    with pytest.raises(RbdPluginError, match="QEMU refused the hot-plug"):
        asyncio.run(guest.plug(missing))
    with qmp.Qmp(qemu) as session:
        after = (qmp.block_nodes(session), qmp.object_ids(session), qmp.device_ids(session))
    assert after == before
    asyncio.run(guest.unplug(missing))  # nothing there: fine


def test_without_a_running_qemu(
    cluster: DevCluster, admin: Admin, images: list[str], short_tmp: Path
) -> None:
    disk, guest = volume(admin, images), maker(cluster, short_tmp / "no-such-qmp.sock")
    assert asyncio.run(guest.present(disk)) is False
    asyncio.run(guest.unplug(disk))  # no QEMU, no disk
    with pytest.raises(GuestUnavailable, match="no QMP socket"):
        asyncio.run(guest.plug(disk))


def virtual_size(sock: Path, node: str) -> int:
    """The size QEMU gives the block node (what its virtio disk shows the guest)."""
    with qmp.Qmp(sock) as session:
        nodes = session.command("query-named-block-nodes")
    return int(next(n["image"]["virtual-size"] for n in nodes if n["node-name"] == node))


def test_grow_resizes_the_plugged_disk_to_its_grown_image(
    cluster: DevCluster, admin: Admin, images: list[str], qemu: Path
) -> None:
    """Nova's volume-extended: Cinder grew the image; block_resize shows QEMU (and so the
    guest's virtio disk) the new size. The guest kernel's side is the kernel tier's."""
    disk, guest = volume(admin, images), maker(cluster, qemu)
    asyncio.run(guest.plug(disk))
    node = guest.node_name(disk)
    assert virtual_size(qemu, node) == 16 << 20
    with (
        admin.cluster.open_ioctx(POOL) as ioctx,
        rbd.Image(ioctx, f"volume-{disk.volume_id}") as image,
    ):
        image.resize(32 << 20)  # Cinder's RBD driver, behind QEMU's back
    assert virtual_size(qemu, node) == 16 << 20  # QEMU keeps the size it opened
    asyncio.run(guest.grow(disk, 32 << 20))
    assert virtual_size(qemu, node) == 32 << 20
    assert admin.size(POOL, f"volume-{disk.volume_id}") == 32 << 20  # not cut or grown further
