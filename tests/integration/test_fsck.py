"""--opt fsck=auto: a filesystem left unclean (its mapping killed under a writer, as a
host crash would) is checked by the tool's safe mode before the next Mount, and Get
says what the check found; a clean one is mounted without a check."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import time

import pytest

from tests import oracle
from tests.helpers import Admin, DaemonProcess, mount_volume, unique, wait_until

POOL = "beta"
EXT4_SUPERBLOCK = 1024
EXT4_INCOMPAT = 0x60  # s_feature_incompat
EXT4_RECOVER = 0x4  # needs_recovery: the journal holds what was never checkpointed


def needs_recovery(admin: Admin, image: str) -> bool:
    """ext4's own flag, read from the image's superblock with the admin's librbd."""
    raw = admin.read(POOL, image, EXT4_SUPERBLOCK + EXT4_INCOMPAT, 4)
    return bool(struct.unpack("<I", raw)[0] & EXT4_RECOVER)


@pytest.mark.fuse_only  # it kills the FUSE export under the writer
def test_fsck_auto_checks_a_filesystem_left_unclean(daemon: DaemonProcess, admin: Admin) -> None:
    c = daemon.client(POOL)
    name = unique("fsck")
    assert c.create(name, {"size": "64M", "fsck": "auto"}) == {"Err": ""}
    assert c.get(name)["Volume"]["Status"]["fsck_mode"] == "auto"
    path = mount_volume(c, name, "a")
    assert "fsck" not in c.get(name)["Volume"]["Status"]  # fresh and clean: no check
    data = os.urandom(1 << 20)
    with (path / "kept").open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    writer = subprocess.Popen(["dd", "if=/dev/zero", f"of={path / 'busy'}", "bs=64K",
                               "count=100000", "oflag=direct"], stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)
        exports = oracle.pids_of_program_with("qemu-storage-daemon", f"image={name},")
        assert len(exports) == 1, exports
        os.kill(exports[0], signal.SIGKILL)  # the mapping dies under the writer
        writer.wait(timeout=30)
    finally:
        writer.kill()
    wait_until(lambda: "broken" in c.get(name)["Volume"]["Status"], 30, "the mount seen broken")
    assert c.call("VolumeDriver.Unmount", {"Name": name, "ID": "a"}) == {"Err": ""}
    assert not oracle.is_mounted(path)
    assert needs_recovery(admin, name)  # the filesystem itself says it was left unclean

    path = mount_volume(c, name, "b")
    status = c.get(name)["Volume"]["Status"]
    assert "e2fsck -p (exit" in status["fsck"], status
    assert hashlib.sha256((path / "kept").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert c.call("VolumeDriver.Unmount", {"Name": name, "ID": "b"}) == {"Err": ""}
    assert not needs_recovery(admin, name)  # cleanly unmounted now
    assert c.remove(name) == {"Err": ""}


def test_fsck_option_is_checked(daemon: DaemonProcess, admin: Admin) -> None:
    c = daemon.client(POOL)
    name = unique("fsckbad")
    err = c.create(name, {"fsck": "repair"})["Err"]
    assert "fsck 'repair' is not one of off, auto" in err, err
    assert name not in admin.images(POOL)
