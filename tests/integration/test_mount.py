"""Mount and Unmount for real: the fuse mapper (qemu-storage-daemon + loop), real
mkfs, real mounts, real Ceph. Checks look at the truth: mountinfo, loop devices
in sysfs, processes, and the image's watchers in Ceph."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rbdplugin.devcluster import DevCluster
from rbdplugin.units import MiB
from tests import oracle
from tests.conftest import WATCH_TIMEOUT, StartDaemon, tenant_toml
from tests.helpers import TEST_MAPPER, Admin, DaemonProcess, PluginClient, unique, wait_until


def mount(client: PluginClient, name: str, mount_id: str) -> str:
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
    assert reply["Err"] == "", reply
    path: str = reply["Mountpoint"]
    assert os.path.isabs(path) and os.path.isdir(path)
    return path


def unmount(client: PluginClient, name: str, mount_id: str) -> None:
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id}) == {"Err": ""}


def _daemon_dirs(daemon: DaemonProcess) -> tuple[Path, Path]:
    """The daemon's own state_dir and mount_root, read from its config file."""
    settings = tomllib.loads(daemon.config.read_text())["daemon"]
    return Path(settings["state_dir"]), Path(settings["mount_root"])


def export_of(daemon: DaemonProcess, pool: str, name: str) -> str:
    return str(_daemon_dirs(daemon)[0] / "exports" / pool / "-" / name)


def leftovers(daemon: DaemonProcess, admin: Admin, tenant: str, name: str) -> list[str]:
    """Everything a mount of ``name`` could leave behind; empty when it is all gone."""
    found = []
    state_dir, mount_root = _daemon_dirs(daemon)
    mountpoint = mount_root / tenant / name
    if oracle.is_mounted(mountpoint):
        found.append(f"still mounted at {mountpoint}")
    export = export_of(daemon, tenant, name)
    if oracle.is_mounted(export):
        found.append(f"FUSE export still mounted at {export}")
    found += [f"mapping {dev}" for dev in oracle.mappings_of(f"{tenant}/{name}", export)]
    found += [
        f"export process {pid}"
        for pid in oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={export}")
    ]
    found += [f"watcher {w}" for w in admin.watchers(tenant, name)]
    table = state_dir / tenant / "mounts.json"
    if table.exists() and name in json.loads(table.read_text()):
        found.append("entry in mounts.json")
    return found


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mount_write_unmount_remount_keeps_data(daemon: DaemonProcess, admin: Admin) -> None:
    client, name = daemon.client("alpha"), unique()
    assert client.create(name, {"size": "256M"}) == {"Err": ""}
    path = Path(mount(client, name, "c1"))
    assert oracle.fstype_at(path) == "ext4"
    data = os.urandom(3 * MiB + 17)
    (path / "blob").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    status = client.get(name)["Volume"]["Status"]
    assert status["mountpoint"] == str(path) and status["mounts"] == {"c1": 1}
    assert status["device"] == oracle.source_at(path) and status["mapper"] == TEST_MAPPER
    device = oracle.source_at(path)
    served_by = {**oracle.krbd_devices(), **oracle.nbd_devices()}.get(device, "a FUSE export")
    print(f"\n{TEST_MAPPER} mapping: {device} mounted at {path} ({oracle.fstype_at(path)}), "
          f"served by {served_by}")  # fmt: skip
    assert status["fs_used_bytes"] >= 3 * MiB
    assert status["fs_size_bytes"] > 200 * MiB
    assert client.call("VolumeDriver.Path", {"Name": name})["Mountpoint"] == str(path)
    assert admin.format_marks("alpha", name).keys() == {"formatted"}  # formatted now, by us

    unmount(client, name, "c1")
    assert leftovers(daemon, admin, "alpha", name) == []
    assert client.call("VolumeDriver.Path", {"Name": name})["Mountpoint"] == ""

    path = Path(mount(client, name, "c2"))  # a fresh mapping: new export process, new loop
    assert digest(path / "blob") == expected
    unmount(client, name, "c2")
    assert leftovers(daemon, admin, "alpha", name) == []


def test_counts_per_id_and_nested_mounts(daemon: DaemonProcess, admin: Admin) -> None:
    client, name = daemon.client("alpha"), unique()
    assert client.create(name) == {"Err": ""}  # Opts null: an implicit create, alpha's defaults
    first = mount(client, name, "a")
    assert mount(client, name, "a") == first  # docker cp / copy-up reuse the ID
    assert mount(client, name, "b") == first
    assert client.get(name)["Volume"]["Status"]["mounts"] == {"a": 2, "b": 1}
    unmount(client, name, "a")
    unmount(client, name, "b")
    assert oracle.is_mounted(first)  # "a" still holds it once
    unmount(client, name, "unknown-id")  # harmless
    assert oracle.is_mounted(first)
    unmount(client, name, "a")
    assert leftovers(daemon, admin, "alpha", name) == []
    unmount(client, name, "a")  # again: harmless


def test_implicit_create_then_mount(daemon: DaemonProcess, admin: Admin) -> None:
    # `docker run -v name:/x` sends Create with Opts null, then Mount.
    client, name = daemon.client("alpha"), unique("implicit")
    assert client.create(name) == {"Err": ""}
    path = mount(client, name, "x")
    assert admin.size("alpha", name) == 1024 * MiB
    assert admin.metadata("alpha", name)["rbdplugin.fstype"] == "ext4"
    unmount(client, name, "x")
    assert leftovers(daemon, admin, "alpha", name) == []
    assert not os.path.exists(path)


def test_parallel_mounts_of_one_volume_make_one_mapping(
    daemon: DaemonProcess, admin: Admin
) -> None:
    client, name = daemon.client("alpha"), unique()
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    with ThreadPoolExecutor(10) as pool:
        paths = set(pool.map(lambda i: mount(client, name, f"id{i}"), range(10)))
    assert len(paths) == 1
    export = export_of(daemon, "alpha", name)
    assert len(oracle.mappings_of(f"alpha/{name}", export)) == 1
    if TEST_MAPPER == "fuse":
        assert len(oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={export}")) == 1
    assert len(admin.watchers("alpha", name)) == 2  # the mapping, and our presence handle
    assert client.get(name)["Volume"]["Status"]["mounts"] == {f"id{i}": 1 for i in range(10)}
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda i: unmount(client, name, f"id{i}"), range(10)))
    assert leftovers(daemon, admin, "alpha", name) == []


def test_eight_volumes_mount_in_parallel(daemon: DaemonProcess, admin: Admin) -> None:
    client = daemon.client("alpha")
    names = [unique("par") for _ in range(8)]
    for name in names:
        assert client.create(name, {"size": "64M"}) == {"Err": ""}
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda n: mount(client, n, "c"), names))
    devices = {oracle.source_at(p) for p in paths}
    assert len(devices) == 8
    for path in paths:
        Path(path, "marker").write_text(path)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: unmount(client, n, "c"), names))
    for name in names:
        assert leftovers(daemon, admin, "alpha", name) == []


def test_remove_of_a_mounted_volume_is_refused(daemon: DaemonProcess, admin: Admin) -> None:
    client, name = daemon.client("beta"), unique()
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    path = mount(client, name, "c")
    err = client.remove(name)["Err"]
    assert f"volume '{name}' is mounted on host host-a at {path}" in err
    assert name in admin.images("beta")
    unmount(client, name, "c")
    assert client.remove(name) == {"Err": ""}
    assert name not in admin.images("beta")


def test_xfs_volume(daemon: DaemonProcess, admin: Admin) -> None:
    client, name = daemon.client("alpha"), unique()
    assert client.create(name, {"size": "320M", "fstype": "xfs", "mount-options": "noatime"}) == {
        "Err": ""
    }
    path = mount(client, name, "c")
    assert oracle.fstype_at(path) == "xfs"
    unmount(client, name, "c")
    assert leftovers(daemon, admin, "alpha", name) == []


# -- never reformat ----------------------------------------------------------------------


@pytest.fixture
def hand_mapped(cluster: DevCluster, short_tmp: Path) -> Iterator[object]:
    """Map an image by hand (as an operator would), run a command on the device, unmap."""
    started: list[tuple[subprocess.Popen[bytes], Path, str]] = []

    def run_on(pool: str, image: str, *script: str) -> None:
        export = short_tmp / f"hand-{image}"
        export.touch()
        env = {**os.environ, "CEPH_KEYRING": str(cluster.admin_keyring)}
        proc = subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev",
             f"driver=rbd,node-name=n0,pool={pool},image={image},conf={cluster.conf},user=admin",
             "--export", f"type=fuse,id=e0,node-name=n0,mountpoint={export},writable=on"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not oracle.is_mounted(export):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        loop = subprocess.check_output(
            ["losetup", "--find", "--show", str(export)], text=True
        ).strip()
        try:
            for command in script:
                subprocess.run(
                    ["sh", "-c", command.replace("DEV", loop)], check=True, capture_output=True
                )
        finally:
            subprocess.run(["losetup", "--detach", loop], check=True)
            while Path(f"/sys/block/{Path(loop).name}/loop/backing_file").exists():
                time.sleep(0.05)
            proc.terminate()
            proc.wait(10)
            export.unlink()
        started.append((proc, export, loop))

    yield run_on


@pytest.mark.fuse_only  # maps by hand with qemu-storage-daemon
def test_a_filesystem_made_by_hand_is_never_reformatted(
    daemon: DaemonProcess, admin: Admin, hand_mapped: object, short_tmp: Path
) -> None:
    client, name = daemon.client("alpha"), unique("byhand")
    assert client.create(name, {"size": "400M", "fstype": "ext4"}) == {
        "Err": ""
    }  # fresh, ext4 asked
    assert admin.metadata("alpha", name)["rbdplugin.fresh"] == "1"
    scratch = short_tmp / f"mnt-{name}"
    scratch.mkdir()
    hand_mapped(
        "alpha",
        name,
        "mkfs.xfs -q DEV",  # type: ignore[operator]
        f"mount DEV {scratch} && echo precious > {scratch}/keep && umount {scratch}",
    )
    path = Path(mount(client, name, "c"))
    assert oracle.fstype_at(path) == "xfs"  # mounted as it is, not made ext4
    assert (path / "keep").read_text() == "precious\n"
    unmount(client, name, "c")
    assert leftovers(daemon, admin, "alpha", name) == []


@pytest.mark.fuse_only  # maps by hand with qemu-storage-daemon
def test_a_device_with_a_foreign_signature_is_refused_untouched(
    daemon: DaemonProcess, admin: Admin, hand_mapped: object
) -> None:
    client, name = daemon.client("alpha"), unique("swapped")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    hand_mapped("alpha", name, "mkswap DEV")  # type: ignore[operator]
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})
    assert "carries a swap signature, not a filesystem rbdplugin mounts" in reply["Err"]
    assert "never formatted over" in reply["Err"]
    assert leftovers(daemon, admin, "alpha", name) == []
    hand_mapped("alpha", name, "blkid -p DEV | grep -q 'TYPE=\"swap\"'")  # type: ignore[operator]


@pytest.mark.parametrize("where", ["head", "tail"])
def test_a_fresh_volume_written_behind_our_back_is_refused_untouched(
    daemon: DaemonProcess, admin: Admin, where: str
) -> None:
    # Blank is proven from Ceph when no data object under either end exists; one block
    # written at one end (through librbd, not by us) must send the Mount to the device.
    client, name = daemon.client("alpha"), unique(f"behind-{where}")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    assert admin.metadata("alpha", name)["rbdplugin.fresh"] == "1"
    offset = 0 if where == "head" else 64 * MiB - 4096
    admin.write("alpha", name, offset, b"\x5a" * 4096)
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})
    assert "holds data that no probe recognises" in reply["Err"], reply
    assert "never formatted over" in reply["Err"]
    assert admin.read("alpha", name, offset, 4096) == b"\x5a" * 4096
    assert leftovers(daemon, admin, "alpha", name) == []


# -- restarts ----------------------------------------------------------------------------


def _alpha_daemon(
    cluster: DevCluster,
    daemon_factory: StartDaemon,
    state: Path,
    tenant_extra: dict[str, object] | None = None,
    **extra: object,
) -> DaemonProcess:
    tenants = tenant_toml(cluster, "alpha", default_size="64M", **(tenant_extra or {}))
    return daemon_factory(tenants, wait_for="alpha", state_dir=str(state),
                          mount_root=str(state.parent / "mounts"), **extra)  # fmt: skip


def test_restart_keeps_a_mount_in_use(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    state = short_tmp / unique("rs") / "state"
    first = _alpha_daemon(cluster, daemon_factory, state)
    client, name = first.client("alpha"), unique()
    assert client.create(name) == {"Err": ""}
    path = Path(mount(client, name, "c1"))
    mount(client, name, "c1")
    export = str(state / "exports" / "alpha" / "-" / name)
    pid = oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={export}")
    device = oracle.mappings_of(f"alpha/{name}", export)
    writer = subprocess.Popen(["sh", "-c", f"while :; do date >> {path}/log; sleep 0.05; done"])
    try:
        first.kill()  # crash: the container keeps writing through the mapping
        time.sleep(0.3)
        second = _alpha_daemon(cluster, daemon_factory, state)
        client = second.client("alpha")
        status = client.get(name)["Volume"]["Status"]
        assert status["mounts"] == {"c1": 2}
        # Adopted, not remapped: the same device, and the same export process.
        assert oracle.mappings_of(f"alpha/{name}", export) == device
        assert oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={export}") == pid
        lines = len((path / "log").read_text().splitlines())
        # Still writing (a loaded TCG guest appends a line or two a second: wait, not sleep).
        wait_until(lambda: len((path / "log").read_text().splitlines()) > lines, 20,
                   "the writer to keep writing")  # fmt: skip
    finally:
        writer.kill()
        writer.wait()
    unmount(client, name, "c1")
    unmount(client, name, "c1")
    assert not oracle.is_mounted(path)
    # Only the killed daemon's own watch can linger, until Ceph's watch timeout.
    wait_until(lambda: admin.watchers("alpha", name) == [], WATCH_TIMEOUT + 5, "stale watch expiry")
    second.stop()


def _as_before_locators(entry: dict[str, Any]) -> dict[str, Any]:
    """A mount-table entry as versions before back-end locators wrote it."""
    old = {k: v for k, v in entry.items() if k not in ("locator", "device")}
    old.update(entry["locator"])  # pool, namespace, image
    device = entry["device"]
    where = device["locator"]
    old["mapped"] = {"mapper": device["via"], "image": where["spec"], "device": device["path"],
                     "details": json.loads(where["details"])}  # fmt: skip
    return old


def test_restart_onto_new_code_adopts_mounts_of_an_old_table(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    state = short_tmp / unique("up") / "state"
    first = _alpha_daemon(cluster, daemon_factory, state)
    client, name = first.client("alpha"), unique()
    assert client.create(name) == {"Err": ""}
    path = Path(mount(client, name, "c1"))
    mount(client, name, "c2")
    device = client.get(name)["Volume"]["Status"]["device"]
    assert first.stop() == 0  # a clean stop leaves mounts in place
    table = state / "alpha" / "mounts.json"
    entries = json.loads(table.read_text())
    table.write_text(json.dumps({k: _as_before_locators(v) for k, v in entries.items()}))
    second = _alpha_daemon(cluster, daemon_factory, state)
    client = second.client("alpha")
    wait_until(lambda: "mounts" in client.get(name)["Volume"]["Status"], 10, "reconcile")
    status = client.get(name)["Volume"]["Status"]
    assert (status["mounts"], status["device"]) == ({"c1": 1, "c2": 1}, device)
    assert oracle.is_mounted(path)
    unmount(client, name, "c1")
    unmount(client, name, "c2")
    wait_until(lambda: leftovers(second, admin, "alpha", name) == [], 10, "the clean-up")
    assert json.loads(table.read_text()) == {}
    second.stop()


def test_restart_cleans_a_stale_entry(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    state = short_tmp / unique("st") / "state"
    first = _alpha_daemon(cluster, daemon_factory, state)
    name = unique()
    assert first.client("alpha").create(name) == {"Err": ""}
    path = mount(first.client("alpha"), name, "c1")
    assert first.stop() == 0  # a clean stop leaves mounts in place
    assert oracle.is_mounted(path)
    subprocess.run(["umount", path], check=True)  # someone unmounted it behind our back
    second = _alpha_daemon(cluster, daemon_factory, state)
    client = second.client("alpha")
    assert "mountpoint" not in client.get(name)["Volume"]["Status"]
    export = str(state / "exports" / "alpha" / "-" / name)
    # Reconcile runs in the background once the socket answers.
    wait_until(lambda: leftovers(second, admin, "alpha", name) == [], 10, "reconcile")
    assert oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={export}") == []
    assert admin.watchers("alpha", name) == []
    mount(client, name, "c2")
    unmount(client, name, "c2")
    second.stop()


def test_a_retry_of_an_in_flight_mount_joins_it(daemon: DaemonProcess, admin: Admin) -> None:
    client, name = daemon.client("alpha"), unique()
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    with ThreadPoolExecutor(5) as pool:  # the same ID, all while the first is still mapping
        paths = set(pool.map(lambda _: mount(client, name, "same"), range(5)))
    assert len(paths) == 1
    assert client.get(name)["Volume"]["Status"]["mounts"] == {"same": 1}
    assert f"volume {name}: mount for ID same joins the one in flight" in daemon.log()
    unmount(client, name, "same")  # one Unmount undoes it, as Docker will send one
    assert leftovers(daemon, admin, "alpha", name) == []


# -- issue 9: data loss and host safety ------------------------------------------------------


def test_volumes_whose_names_are_prefixes_of_each_other_stay_apart(
    daemon: DaemonProcess, admin: Admin
) -> None:
    client = daemon.client("alpha")
    short = unique("app")
    long = f"{short}-data"  # its export, loop backing file and process argument extend short's
    for name in (short, long):
        assert client.create(name, {"size": "64M"}) == {"Err": ""}
    long_path = Path(mount(client, long, "c"))
    (long_path / "kept").write_text("long's data")
    long_export = export_of(daemon, "alpha", long)
    long_loops = oracle.mappings_of(f"alpha/{long}", long_export)
    long_pids = oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={long_export}")
    assert len(long_loops) == 1 and len(long_pids) == (TEST_MAPPER == "fuse")

    short_path = Path(mount(client, short, "c"))  # must not take long's mapping for a leftover
    assert oracle.source_at(short_path) not in long_loops
    unmount(client, short, "c")  # must not detach long's loop or stop long's export
    assert leftovers(daemon, admin, "alpha", short) == []

    assert oracle.source_at(long_path) == long_loops[0]
    assert oracle.mappings_of(f"alpha/{long}", long_export) == long_loops
    assert (
        oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={long_export}") == long_pids
    )
    with open(long_path / "more", "w") as fh:  # I/O still reaches the image
        fh.write("still writable")
        fh.flush()
        os.fsync(fh.fileno())
    assert (long_path / "kept").read_text() == "long's data"
    unmount(client, long, "c")
    assert leftovers(daemon, admin, "alpha", long) == []


def test_mount_never_recreates_a_removed_volume(daemon: DaemonProcess, admin: Admin) -> None:
    # Docker calls Mount without Create when a container restarts: a volume removed in the
    # meantime (perhaps from another host) must not come back empty.
    client, name = daemon.client("alpha"), unique("gone")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    assert client.remove(name) == {"Err": ""}  # alpha's policy: trash
    err = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"]
    assert f"volume '{name}' does not exist any more" in err
    assert "not re-created empty" in err
    assert "rbd trash restore --pool alpha " in err
    assert f"rbdplugin trash restore {name} --driver alpha --id " in err
    assert name not in admin.images("alpha")
    assert leftovers(daemon, admin, "alpha", name) == []

    beta = daemon.client("beta")  # delete policy: nothing to restore, still not re-created
    assert beta.create(name, {"size": "64M"}) == {"Err": ""}
    assert beta.remove(name) == {"Err": ""}
    assert (
        "does not exist any more"
        in beta.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"]
    )
    assert name not in admin.images("beta")


def test_volume_mounts_are_nosuid_and_nodev(
    cluster: DevCluster, daemon: DaemonProcess, daemon_factory: StartDaemon, admin: Admin,
    short_tmp: Path,
) -> None:  # fmt: skip
    client, name = daemon.client("alpha"), unique("safe")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    path = mount(client, name, "c")
    entry = oracle.mount_at(path)
    assert entry is not None
    assert {"nosuid", "nodev"} <= set(entry["mount_options"].split(","))
    unmount(client, name, "c")

    state = short_tmp / unique("suid") / "state"  # a tenant that explicitly opts out
    lax = _alpha_daemon(cluster, daemon_factory, state, tenant_extra={"nosuid_nodev": False})
    client = lax.client("alpha")
    assert client.create(name) == {"Err": ""}
    path = mount(client, name, "c")
    entry = oracle.mount_at(path)
    assert entry is not None
    assert not {"nosuid", "nodev"} & set(entry["mount_options"].split(","))
    unmount(client, name, "c")
    lax.stop()


@pytest.mark.fuse_only  # kills the export process
def test_a_dead_export_shows_the_volume_broken_and_unmount_still_cleans_up(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    state = short_tmp / unique("br") / "state"
    daemon = _alpha_daemon(cluster, daemon_factory, state, lease_check_seconds=1)
    client, name = daemon.client("alpha"), unique("broken")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    mount(client, name, "c")
    assert "broken" not in client.get(name)["Volume"]["Status"]
    export = str(state / "exports" / "alpha" / "-" / name)
    (pid,) = oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={export}")
    os.kill(pid, 9)  # the export dies under the mounted filesystem

    def broken() -> bool:
        return "broken" in client.get(name)["Volume"]["Status"]

    wait_until(broken, 1 + 5, "Get reporting the broken mapping")
    status = client.get(name)["Volume"]["Status"]
    assert "export process" in status["broken"] and "is gone" in status["broken"]
    done = subprocess.run(
        [sys.executable, "-m", "rbdplugin", "status", "--json", "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    (entry,) = [v for v in json.loads(done.stdout)["volumes"] if v["volume"] == name]
    assert "is gone" in entry["broken"]
    err = client.call("VolumeDriver.Mount", {"Name": name, "ID": "d"})["Err"]
    assert "broken" in err  # no new reference on a mapping that cannot do I/O
    unmount(client, name, "c")
    # Only the killed export's watch may linger, until Ceph's watch timeout.
    wait_until(lambda: leftovers(daemon, admin, "alpha", name) == [], WATCH_TIMEOUT + 5, "clean-up")
    path = Path(mount(client, name, "e"))  # mapped afresh
    (path / "ok").write_text("fine")
    unmount(client, name, "e")
    assert leftovers(daemon, admin, "alpha", name) == []
    daemon.stop()
