"""`--opt uid=N --opt gid=N --opt mode=0750`: the filesystem root's owner and mode, set
once right after the first mkfs, for ext4 and xfs. Checked with os.stat of the mounted
root, the image's metadata read as the admin, and real writers under other uids
(setpriv) through a bind mount of the volume, as a container sees it."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Admin, DaemonProcess, unique
from tests.integration.test_mount import mount, unmount

TENANT = "beta"  # remove_policy delete: nothing left in the trash
OWNER, GROUP, OTHER = 4321, 4322, 4323


@pytest.fixture
def view() -> Iterator[Path]:
    """A world-traversable directory a volume is bind-mounted on (the daemon's
    mount_root is root's alone, as it should be; a container reaches a volume this way)."""
    target = Path(tempfile.mkdtemp(prefix="rbdp-view-", dir="/tmp"))
    target.chmod(0o755)
    yield target
    subprocess.run(["umount", str(target)], check=False, capture_output=True)
    target.rmdir()


def bind(source: str, target: Path) -> None:
    subprocess.run(["mount", "--bind", source, str(target)], check=True, timeout=30)


def write_as(uid: int, gid: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
         "sh", "-c", f"echo written > {path}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("fstype, size", [("ext4", "64M"), ("xfs", "320M")])
def test_root_owned_as_asked_once(
    daemon: DaemonProcess, admin: Admin, view: Path, fstype: str, size: str
) -> None:
    client, name = daemon.client(TENANT), unique("own")
    opts = {"size": size, "fstype": fstype, "uid": str(OWNER), "gid": str(GROUP), "mode": "0750"}
    assert client.create(name, opts) == {"Err": ""}
    # Stored with the image, so a first Mount on any host applies them.
    meta = admin.metadata(TENANT, name)
    assert (meta["rbdplugin.root_uid"], meta["rbdplugin.root_gid"]) == (str(OWNER), str(GROUP))
    assert meta["rbdplugin.root_mode"] == "0750"
    status = client.get(name)["Volume"]["Status"]
    assert (status["root_uid"], status["root_gid"], status["root_mode"]) == (OWNER, GROUP, "0750")
    # Create again with the same options is fine; with others, a clear conflict.
    assert client.create(name, opts) == {"Err": ""}
    reply = client.create(name, {**opts, "uid": "1"})
    assert f"uid=1 (it has {OWNER})" in reply["Err"]

    path = mount(client, name, "m1")
    root = os.stat(path)
    assert (root.st_uid, root.st_gid, stat.S_IMODE(root.st_mode)) == (OWNER, GROUP, 0o750)
    bind(path, view)
    done = write_as(OWNER, GROUP, view / "mine")
    assert done.returncode == 0, done.stderr
    assert os.stat(view / "mine").st_uid == OWNER
    done = write_as(OTHER, OTHER, view / "theirs")
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert not (view / "theirs").exists()
    subprocess.run(["umount", str(view)], check=True, timeout=30)

    # An operator's later change stays: never applied again after the first format.
    os.chown(path, OTHER, OTHER)
    os.chmod(path, 0o700)
    unmount(client, name, "m1")
    path = mount(client, name, "m2")
    root = os.stat(path)
    assert (root.st_uid, root.st_gid, stat.S_IMODE(root.st_mode)) == (OTHER, OTHER, 0o700)
    assert (Path(path) / "mine").read_text() == "written\n"
    unmount(client, name, "m2")
    assert client.remove(name) == {"Err": ""}


def test_only_uid_leaves_the_rest_as_mkfs_made_it(daemon: DaemonProcess) -> None:
    client, name = daemon.client(TENANT), unique("own")
    assert client.create(name, {"size": "64M", "uid": str(OWNER)}) == {"Err": ""}
    path = mount(client, name, "m1")
    root = os.stat(path)
    assert (root.st_uid, root.st_gid, stat.S_IMODE(root.st_mode)) == (OWNER, 0, 0o755)
    unmount(client, name, "m1")
    assert client.remove(name) == {"Err": ""}


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"uid": "abc"}, "uid 'abc' is invalid: use a number 0-4294967294, e.g. uid=1000"),
        ({"uid": "-1"}, "uid '-1' is invalid: use a number 0-4294967294"),
        ({"gid": "4294967295"}, "gid '4294967295' is invalid: use a number 0-4294967294"),
        ({"gid": "1e3"}, "gid '1e3' is invalid"),
        ({"mode": "0999"}, "mode '0999' is invalid: use an octal mode 0000-7777"),
        ({"mode": "12345"}, "mode '12345' is invalid"),
        ({"mode": "rwxr-x---"}, "mode 'rwxr-x---' is invalid"),
        ({"mode": "750\n"}, "mode '750\\n' is invalid"),
        ({"owner": "1000"}, "unknown option 'owner'; valid options: size"),
        ({"source": "x", "uid": "1"}, "a read-only companion is never formatted"),
    ],
)
def test_bad_owner_options_refused_and_nothing_created(
    daemon: DaemonProcess, admin: Admin, opts: dict[str, str], message: str
) -> None:
    name = unique("own")
    reply = daemon.client(TENANT).create(name, {"size": "64M", **opts})
    assert message in reply["Err"], reply
    assert name not in admin.images(TENANT)
