"""Create options and config files never reach the host or another tenant (issue 9).

Item 9: mkfs options are an allowlist per filesystem; a flag that reads or writes
host paths (``-d etc`` copies the daemon's working directory into the volume) is
refused and nothing is created. Item 10: a volume's mount options cannot ask for
suid, dev or exec. Item 11: a config whose tenants share a pool in one namespace
is refused by ``check-config`` and by start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Admin, DaemonProcess, PluginClient, unique
from tests.unit.test_spec import GOOD_EXT4, GOOD_XFS

C_LOCALE = {**os.environ, "LC_ALL": "C"}


def rbdplugin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbdplugin", *args],
        capture_output=True, text=True, timeout=60, check=False, env=C_LOCALE,
    )  # fmt: skip


# -- item 9: mkfs options ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "word"),
    [
        ({"mkfs-options": "-d etc"}, "'-d' is not an allowed flag for ext4"),
        ({"mkfs-options": "-m 0 -d/etc"}, "'-d/etc' is not an allowed flag for ext4"),
        ({"mkfs-options": "-z undo"}, "'-z' is not an allowed flag for ext4"),
        ({"mkfs-options": "-c"}, "'-c' is not an allowed flag for ext4"),
        ({"mkfs-options": "-l badblocks"}, "'-l' is not an allowed flag for ext4"),
        ({"mkfs-options": "-J device=/dev/sda"}, "-J sub-option 'device=/dev/sda' is not allowed"),
        ({"mkfs-options": "-E offset=4096"}, "-E sub-option 'offset=4096' is not allowed"),
        ({"mkfs-options": "-m 0 etc"}, "word 'etc' is not a flag"),
        ({"fstype": "xfs", "mkfs-options": "-p proto"}, "'-p' is not an allowed flag for xfs"),
        ({"fstype": "xfs", "mkfs-options": "-l logdev=/dev/sda"}, "'logdev=/dev/sda' is not allowed"),
        ({"fstype": "xfs", "mkfs-options": "-d name=img,file=1"}, "'name=img' is not allowed"),
    ],
)  # fmt: skip
def test_mkfs_options_that_reach_the_host_create_nothing(
    daemon: DaemonProcess, admin: Admin, opts: dict[str, str], word: str
) -> None:
    fstype = opts.get("fstype", "ext4")
    before = admin.images("alpha")
    name = unique("mkfs")
    err = daemon.client("alpha").create(name, {"size": "512M", **opts})["Err"]
    assert err.startswith(f"volume '{name}': mkfs-options "), err
    assert word in err
    assert f"allowed flags for {fstype}: -b " in err
    assert admin.images("alpha") == before
    assert "does not exist" in daemon.client("alpha").get(name)["Err"]


def mount(client: PluginClient, name: str, mount_id: str) -> Path:
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
    assert reply["Err"] == "", reply
    return Path(reply["Mountpoint"])


@pytest.fixture
def volume(daemon: DaemonProcess) -> Iterator[str]:
    """A fresh volume name of alpha's, unmounted and removed after the test."""
    client, name = daemon.client("alpha"), unique("fmt")
    yield name
    client.call("VolumeDriver.Unmount", {"Name": name, "ID": "safety"})
    client.remove(name)


def blkid(device: str, tag: str) -> str:
    done = subprocess.run(
        ["blkid", "--probe", "-o", "value", "-s", tag, device],
        capture_output=True, text=True, check=True, env=C_LOCALE,
    )  # fmt: skip
    return done.stdout.strip()


def test_allowed_ext4_mkfs_options_take_effect(daemon: DaemonProcess, volume: str) -> None:
    client = daemon.client("alpha")
    opts = {"size": "256M", "mkfs-options": "-m 0 -E root_owner=1000:1000 -L data"}
    assert client.create(volume, opts) == {"Err": ""}
    root = mount(client, volume, "safety")
    st = os.stat(root)
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    status = client.get(volume)["Volume"]["Status"]
    assert status["mkfs_options"] == "-m 0 -E root_owner=1000:1000 -L data"
    assert blkid(status["device"], "LABEL") == "data"
    superblock = subprocess.run(
        ["dumpe2fs", "-h", status["device"]],
        capture_output=True, text=True, check=True, env=C_LOCALE,
    ).stdout  # fmt: skip
    assert "\nReserved block count:     0\n" in superblock  # -m 0


def test_allowed_xfs_mkfs_options_take_effect(daemon: DaemonProcess, volume: str) -> None:
    client = daemon.client("alpha")
    opts = {"size": "512M", "fstype": "xfs", "mkfs-options": "-L logs -i size=1024 -m reflink=0"}
    assert client.create(volume, opts) == {"Err": ""}
    root = mount(client, volume, "safety")
    device = client.get(volume)["Volume"]["Status"]["device"]
    assert blkid(device, "LABEL") == "logs"
    info = subprocess.run(
        ["xfs_info", str(root)], capture_output=True, text=True, check=True, env=C_LOCALE
    ).stdout
    assert "isize=1024" in info and "reflink=0" in info


@pytest.mark.parametrize(
    ("fstype", "text"),
    [("ext4", text) for text in GOOD_EXT4] + [("xfs", text) for text in GOOD_XFS],
)
def test_every_allowed_example_is_accepted_by_the_real_mkfs(
    tmp_path: Path, fstype: str, text: str
) -> None:
    # The allowlist must not promise what mkfs refuses (that would fail at Mount, not Create).
    image = tmp_path / "image"
    with image.open("wb") as fh:
        fh.truncate((1 if fstype == "ext4" else 20) * 1024**3)  # sparse; xfs for a 2038M log
    force = {"ext4": "-F", "xfs": "-f"}[fstype]
    done = subprocess.run(
        [f"mkfs.{fstype}", "-q", force, *text.split(), str(image)],
        capture_output=True, text=True, timeout=120, check=False, env=C_LOCALE, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


# -- item 10: mount options cannot undo nosuid, nodev, noexec -----------------------------


@pytest.mark.parametrize(
    ("options", "refused"),
    [("suid", "suid"), ("dev", "dev"), ("exec", "exec"), ("noatime,suid", "suid")],
)
def test_mount_options_that_weaken_the_host_create_nothing(
    daemon: DaemonProcess, admin: Admin, options: str, refused: str
) -> None:
    before = admin.images("alpha")
    name = unique("mnt")
    err = daemon.client("alpha").create(name, {"size": "64M", "mount-options": options})["Err"]
    assert f"volume '{name}': mount option '{refused}' is not allowed" in err
    assert admin.images("alpha") == before


# -- item 11: tenants whose pools overlap -------------------------------------------------

OVERLAPPING = """\
[daemon]
socket_dir = "{root}/plugins"
state_dir = "{root}/state"
mount_root = "{root}/mounts"
metrics = ""

[tenants.shop]
pool = "shop"
allowed_pools = ["shared"]

[tenants.billing]
pool = "billing"
allowed_pools = ["shared", "archive"]
"""


def test_check_config_refuses_tenants_sharing_a_pool(tmp_path: Path) -> None:
    config = tmp_path / "overlap.toml"
    config.write_text(OVERLAPPING.format(root=tmp_path))
    done = rbdplugin("check-config", "--config", str(config))
    assert done.returncode != 0
    assert "tenants.shop and tenants.billing both use pool 'shared'" in done.stderr
    assert "list, mount and remove each other's volumes" in done.stderr
    assert "OK" not in done.stdout


def test_start_up_refuses_tenants_sharing_a_pool(tmp_path: Path) -> None:
    config = tmp_path / "overlap.toml"
    config.write_text(OVERLAPPING.format(root=tmp_path))
    done = rbdplugin("serve", "--config", str(config))
    assert done.returncode != 0
    assert "tenants.shop and tenants.billing both use pool 'shared'" in done.stderr
    assert not (tmp_path / "plugins").exists()  # no socket was ever served


def test_check_config_accepts_a_shared_pool_in_separate_namespaces(tmp_path: Path) -> None:
    config = tmp_path / "namespaced.toml"
    text = OVERLAPPING.format(root=tmp_path)
    text = text.replace('pool = "shop"\n', 'pool = "shop"\nnamespace = "shop"\n')
    config.write_text(text)
    done = rbdplugin("check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "driver shop: pool shop/shop" in done.stdout
