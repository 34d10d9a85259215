"""A daemon killed (SIGKILL) at every crash point of every verb, then restarted.

Each case starts a daemon with ``RBDPLUGIN_TEST_CRASH_AT`` naming one point of
:mod:`rbdplugin.crashpoints`, runs the verb that reaches it and sees the daemon die by
SIGKILL with the call unanswered; then it restarts the daemon on the same state
directory without the variable, retries the verb, and checks for itself (mountinfo,
sysfs loop devices, /proc, Ceph with admin credentials) that nothing leaked, that no
volume was formatted twice and that every byte synced before the crash reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import rados
import rbd

from rbdplugin.crashpoints import ENV, POINTS
from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import Admin, DaemonProcess, PluginClient, unique, wait_until
from tests.integration.test_locks import blocklisted
from tests.integration.test_mount import export_of, leftovers, mount, unmount

POOL = "alpha"
SIZE = "64M"
# ext4's superblock starts at 1 KiB; its UUID sits 0x68 bytes into it.
EXT4_UUID_AT = 1024 + 0x68


@dataclass
class Run:
    """One case: the daemons, the volume, and what the test knows about it."""

    cluster: DevCluster
    factory: StartDaemon
    admin: Admin
    state: Path
    point: str
    name: str
    policy: str = "delete"
    daemon: DaemonProcess | None = None
    blob: str = ""  # sha256 of /blob, written and fsynced before the crash
    fs_uuid: str = ""  # the filesystem's UUID before the crash ("" before any mkfs)

    def start(self, crash_at: str = "") -> PluginClient:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        if crash_at:
            env[ENV] = crash_at
        tenants = tenant_toml(self.cluster, POOL, default_size=SIZE, remove_policy=self.policy)
        self.daemon = self.factory(
            tenants, wait_for=POOL, env=env, op_timeout=8, state_dir=str(self.state),
            mount_root=str(self.state.parent / "mounts"),
        )  # fmt: skip
        return self.client

    @property
    def client(self) -> PluginClient:
        assert self.daemon is not None
        return self.daemon.client(POOL)

    def dies(self, endpoint: str, body: dict[str, object]) -> None:
        """``endpoint`` reaches the armed point: the daemon dies by SIGKILL, unanswered."""
        assert self.daemon is not None and self.daemon.proc is not None
        with pytest.raises(OSError):
            reply = self.client.call(endpoint, body)
            print(f"answered instead of crashing: {reply}")
        assert self.daemon.proc.wait(30) == -signal.SIGKILL
        assert f"test crash point {self.point} " in self.daemon.log()

    def write_blob(self, mountpoint: str) -> None:
        data = os.urandom(3 * 1024 * 1024 + 11)
        with open(Path(mountpoint) / "blob", "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.blob = hashlib.sha256(data).hexdigest()

    def check_blob(self, mountpoint: str) -> None:
        data = (Path(mountpoint) / "blob").read_bytes()
        assert hashlib.sha256(data).hexdigest() == self.blob, "synced data lost"

    def ext4_uuid(self) -> str:
        """The UUID in the image's ext4 superblock, read from Ceph ("" if none)."""
        raw = self.admin.read(POOL, self.name, EXT4_UUID_AT, 16)
        return "" if raw == bytes(16) else str(uuid.UUID(bytes=raw))

    def device_uuid(self) -> str:
        """The filesystem UUID blkid reads from the volume's one block device."""
        assert self.daemon is not None
        devices = oracle.mappings_of(f"{POOL}/{self.name}", export_of(self.daemon, POOL, self.name))
        assert len(devices) == 1, devices
        done = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", devices[0]],
                              capture_output=True, text=True, check=True)  # fmt: skip
        return done.stdout.strip()

    def unmount_all(self) -> None:
        """Unmount every reference the daemon counts (a crash after a reference was saved
        but before Docker heard of it leaves one Docker will never unmount)."""
        counts = self.client.get(self.name)["Volume"]["Status"].get("mounts", {})
        for mount_id, times in counts.items():
            for _ in range(times):
                unmount(self.client, self.name, mount_id)

    def same_data(self, mountpoint: str) -> None:
        """What was synced before the crash reads back, on the filesystem made before it."""
        self.check_blob(mountpoint)
        assert self.device_uuid() == self.fs_uuid, "formatted twice"

    def finish(self) -> None:
        """Unmount every reference, check nothing is left, the volume still works, remove it."""
        self.unmount_all()
        self.settled()
        self.verify_usable()
        self.remove()

    def settled(self) -> None:
        """Nothing of the volume is left on the host or in Ceph but the volume itself."""
        assert self.daemon is not None
        assert leftovers(self.daemon, self.admin, POOL, self.name) == []
        assert self._lease() is None, "a lease left behind"
        in_ceph = {i for i in self.admin.images(POOL) if i.startswith(self.name)}
        known = {n for n in self.client.names() if n.startswith(self.name)}
        assert in_ceph == known, "an image the daemon does not know, or the reverse"

    def _lease(self) -> bytes | None:
        with self.admin.cluster.open_ioctx(POOL) as ioctx:
            try:
                raw: bytes = ioctx.read(f"rbdplugin.lease.{self.name}", 65536)
            except rados.ObjectNotFound:
                return None
            return raw

    def verify_usable(self) -> None:
        """Mount, find the data (or write some), unmount: the volume is fine."""
        path = mount(self.client, self.name, "verify")
        if self.blob:
            self.check_blob(path)
        else:
            self.write_blob(path)
        if self.fs_uuid:
            assert self.device_uuid() == self.fs_uuid, "formatted twice"
        self.fs_uuid = self.device_uuid()
        unmount(self.client, self.name, "verify")
        self.settled()
        path = mount(self.client, self.name, "again")
        self.check_blob(path)
        assert self.device_uuid() == self.fs_uuid
        unmount(self.client, self.name, "again")
        self.settled()

    def undone_by_restart(self) -> None:
        """A Mount that never answered Docker is undone at start-up, retry or not (a
        finished one, saved as mounted, is kept: its data is there, unharmed)."""
        daemon = self.daemon
        assert daemon is not None
        if self.point == "mount.after-mounted-saved":
            path = self.state.parent / "mounts" / POOL / self.name
            self.check_blob(str(path))
            return
        wait_until(lambda: leftovers(daemon, self.admin, POOL, self.name) == [], 10,
                   "the clean-up at start-up")  # fmt: skip

    def remove(self) -> None:
        assert self.client.remove(self.name) == {"Err": ""}
        self.settled()


def _create(run: Run) -> None:
    run.start(run.point)
    run.dies("VolumeDriver.Create", {"Name": run.name, "Opts": {"size": SIZE}})
    client = run.start()
    assert client.create(run.name, {"size": SIZE}) == {"Err": ""}
    assert run.name in client.names() and run.name in run.admin.images(POOL)
    meta = run.admin.metadata(POOL, run.name)
    assert meta.get("rbdplugin.fstype") == "ext4", meta
    run.settled()
    run.verify_usable()
    run.remove()


def _image_id(run: Run) -> str:
    with run.admin.cluster.open_ioctx(POOL) as ioctx, rbd.Image(ioctx, run.name) as image:
        image_id: str = image.id()
        return image_id


def _remove(run: Run) -> None:
    client = run.start(run.point)
    assert client.create(run.name, {"size": SIZE}) == {"Err": ""}
    run.write_blob(mount(client, run.name, "c1"))  # formatted: our format marks exist
    run.fs_uuid = run.device_uuid()
    unmount(client, run.name, "c1")
    marks = f"rbdplugin.format.{_image_id(run)}"
    run.dies("VolumeDriver.Remove", {"Name": run.name})
    client = run.start()
    if run.name in run.admin.images(POOL):  # half-removed: still a whole volume
        path = mount(client, run.name, "c2")
        run.check_blob(path)
        assert run.device_uuid() == run.fs_uuid, "formatted twice"
        unmount(client, run.name, "c2")
    assert client.remove(run.name) == {"Err": ""}
    assert run.name not in run.admin.images(POOL) and run.name not in client.names()
    in_trash = run.name in run.admin.trash(POOL)
    assert in_trash == (run.policy == "trash")
    with run.admin.cluster.open_ioctx(POOL) as ioctx:
        try:
            ioctx.stat(marks)
            leaked = True
        except rados.ObjectNotFound:
            leaked = False
    # Trashed images keep their marks (a restore brings the volume back as it was).
    assert leaked == in_trash, f"format marks {marks} leaked"
    run.settled()
    if in_trash:
        with run.admin.cluster.open_ioctx(POOL) as ioctx:
            for entry in rbd.RBD().trash_list(ioctx):
                if entry["name"] == run.name:
                    rbd.RBD().trash_remove(ioctx, entry["id"], force=True)
            ioctx.remove_object(marks)


def _first_mount(run: Run) -> None:
    """A fresh volume's first Mount dies (mkfs and its marks happen only then)."""
    client = run.start(run.point)
    assert client.create(run.name, {"size": SIZE}) == {"Err": ""}
    run.dies("VolumeDriver.Mount", {"Name": run.name, "ID": "c1"})
    before = run.ext4_uuid()
    client = run.start()
    run.undone_by_restart()
    path = mount(client, run.name, "c1")
    after = run.device_uuid()
    if run.point == "mkfs.after-mkfs":  # made, never mounted, marked as still formatting
        assert "finishing an interrupted mkfs" in run.daemon.log()  # type: ignore[union-attr]
    elif before:
        assert after == before, "formatted twice"
    run.fs_uuid = after
    run.write_blob(path)
    run.finish()


def _mount_again(run: Run) -> None:
    """A formatted volume holding synced data: its second Mount dies."""
    client = run.start(f"{run.point}@2")
    assert client.create(run.name, {"size": SIZE}) == {"Err": ""}
    run.write_blob(mount(client, run.name, "c1"))
    run.fs_uuid = run.device_uuid()
    unmount(client, run.name, "c1")
    run.dies("VolumeDriver.Mount", {"Name": run.name, "ID": "c2"})
    assert run.ext4_uuid() == run.fs_uuid
    client = run.start()
    run.undone_by_restart()
    path = mount(client, run.name, "c2")
    run.same_data(path)
    run.finish()


def _second_id(run: Run) -> None:
    """A Mount of another ID while mounted dies once its reference is saved."""
    client = run.start(run.point)
    assert client.create(run.name, {"size": SIZE}) == {"Err": ""}
    path = mount(client, run.name, "c1")
    run.write_blob(path)
    run.fs_uuid = run.device_uuid()
    run.dies("VolumeDriver.Mount", {"Name": run.name, "ID": "c2"})
    client = run.start()
    # The first container's mount was kept across the restart, untouched.
    assert mount(client, run.name, "c2") == path
    run.check_blob(path)
    assert client.get(run.name)["Volume"]["Status"]["mounts"]["c1"] == 1
    run.finish()


def _unmount(run: Run, others: tuple[str, ...] = ()) -> None:
    """Synced data in a mounted volume; its Unmount dies (with ``others`` still mounted)."""
    client = run.start(run.point)
    assert client.create(run.name, {"size": SIZE}) == {"Err": ""}
    path = mount(client, run.name, "c1")
    for other in others:
        mount(client, run.name, other)
    run.write_blob(path)
    run.fs_uuid = run.device_uuid()
    run.dies("VolumeDriver.Unmount", {"Name": run.name, "ID": "c1"})
    client = run.start()
    unmount(client, run.name, "c1")  # a retry: done now, or found done already
    if others:
        run.check_blob(path)
        assert client.get(run.name)["Volume"]["Status"]["mounts"] == dict.fromkeys(others, 1)
        run.unmount_all()
    run.settled()
    assert run.ext4_uuid() == run.fs_uuid
    run.verify_usable()
    run.remove()


def _takeover(run: Run) -> None:
    """A dead host's claim is in the lease: the Mount that fences it and takes over dies."""
    client = run.start(run.point)
    assert client.create(run.name, {"size": SIZE}) == {"Err": ""}
    run.write_blob(mount(client, run.name, "c1"))
    run.fs_uuid = run.device_uuid()
    unmount(client, run.name, "c1")
    # The dead host's addresses: nobody watches the image from them (loopback, made up).
    addrs = [f"127.0.0.1:0/{n}" for n in sorted(int.from_bytes(os.urandom(3)) for _ in "ab")]
    dead = {"host": "host-dead", "mode": "rw", "since": "2026-01-01T00:00:00Z",
            "addrs": addrs, "uuid": str(uuid.uuid4())}  # fmt: skip
    with run.admin.cluster.open_ioctx(POOL) as ioctx:
        ioctx.write_full(f"rbdplugin.lease.{run.name}",
                         json.dumps({"writer": dead, "readers": {}}).encode())  # fmt: skip
    run.dies("VolumeDriver.Mount", {"Name": run.name, "ID": "c2"})
    assert set(addrs[:1]) <= blocklisted(run.admin)
    client = run.start()
    run.undone_by_restart()
    path = mount(client, run.name, "c2")
    assert set(addrs) <= blocklisted(run.admin)
    lease = json.loads(run._lease() or b"{}")
    assert lease["writer"]["host"] == "host-a", lease
    run.same_data(path)
    run.finish()


def _trash(run: Run) -> None:
    run.policy = "trash"
    _remove(run)


Flow = Callable[[Run], None]
FLOWS: dict[str, Flow] = {
    "create.after-image": _create,
    "create.after-metadata": _create,
    "remove.after-image": _remove,
    "remove.after-format-marks": _remove,
    "remove.after-trash": _trash,
    "mkfs.after-mark-started": _first_mount,
    "mkfs.after-mkfs": _first_mount,
    "mkfs.after-mark-done": _first_mount,
    "mount.after-record": _mount_again,
    "lease.after-presence": _mount_again,
    "lease.after-claim": _mount_again,
    "map.after-export": _mount_again,
    "map.after-loop": _mount_again,
    "lease.after-record-mapping": _mount_again,
    "mount.after-mapped-saved": _mount_again,
    "mount.after-mount-syscall": _mount_again,
    "mount.after-mounted-saved": _mount_again,
    "mount.after-reference-saved": _second_id,
    "fence.after-blocklist": _takeover,
    "takeover.after-fence": _takeover,
    "unmount.after-reference-saved": lambda run: _unmount(run, others=("c9",)),
    "unmount.after-unmounting-saved": _unmount,
    "unmount.after-umount": _unmount,
    "unmap.after-loop-detach": _unmount,
    "unmap.after-export-stop": _unmount,
    "unmount.after-unmap": _unmount,
    "lease.after-release": _unmount,
    "lease.after-presence-close": _unmount,
    "unmount.after-record-drop": _unmount,
}


def test_every_crash_point_has_a_case() -> None:
    assert sorted(FLOWS) == sorted(POINTS)


@pytest.mark.parametrize("point", sorted(FLOWS))
def test_crash_then_restart_and_retry(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path, point: str
) -> None:
    state = short_tmp / unique("x") / "state"
    run = Run(cluster, daemon_factory, admin, state, point, unique("crash"))
    FLOWS[point](run)
    assert run.daemon is not None
    assert run.daemon.stop() == 0
