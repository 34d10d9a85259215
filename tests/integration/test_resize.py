"""Growing volumes for real: `rbdplugin volume resize` against a daemon, while a writer
writes into the mount; Create of an existing volume with a larger size (grow_on_create);
growth of an unmounted volume at its next Mount. Checks read the truth: statvfs of the
mount point, the loop device's size from the kernel (blockdev), `rbd info` as the admin,
/proc/self/mountinfo, and the data written before and during the resize."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import rbd

from rbdplugin.devcluster import DevCluster
from rbdplugin.units import MiB
from tests import oracle
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import TEST_MAPPER, Admin, DaemonProcess, PluginClient, unique, wait_until
from tests.integration.test_mount import mount, unmount

# alpha: no grow_on_create (the default); beta: grow_on_create = true.
ALPHA, BETA = "alpha", "beta"


@pytest.fixture(scope="module")
def daemon(cluster: DevCluster, daemon_factory: StartDaemon) -> DaemonProcess:
    tenants = tenant_toml(cluster, ALPHA, default_size="64M") + tenant_toml(
        cluster, BETA, remove_policy="delete", default_size="64M", grow_on_create=True
    )
    return daemon_factory(tenants, wait_for=ALPHA)


def resize(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbdplugin", "volume", "resize", *args,
         "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def control(daemon: DaemonProcess) -> PluginClient:
    """The daemon's control socket (state_dir/control.sock), spoken to directly."""
    state_dir = Path(tomllib.loads(daemon.config.read_text())["daemon"]["state_dir"])
    return PluginClient(state_dir / "control.sock")


def rbd_size(cluster: DevCluster, pool: str, image: str) -> int:
    """The image's size as `rbd info` (the admin's view) says."""
    done = subprocess.run(
        ["rbd", "--conf", str(cluster.conf), "info", "--format", "json", f"{pool}/{image}"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    size: int = json.loads(done.stdout)["size"]
    return size


def fs_size(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def block_size(device: str) -> int:
    done = subprocess.run(
        ["blockdev", "--getsize64", device], capture_output=True, text=True, timeout=30, check=True
    )
    return int(done.stdout)


def mount_id(target: str) -> str:
    """The kernel's id of the mount at ``target`` (a new mount gets a new one)."""
    with open("/proc/self/mountinfo") as fh:
        found = [line.split()[0] for line in fh if line.split()[4] == target]
    assert found, f"{target} is not mounted"
    return found[-1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Writer(threading.Thread):
    """Writes 1 MiB blocks of random data into ``path`` (fsync each, at most 20 a second,
    at most 200 MiB: the volume's size before it grows) until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.digest = hashlib.sha256()
        self.written = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with self.path.open("wb") as fh:
                while not self.stop.wait(0.05) and self.written < 200 * MiB:
                    block = os.urandom(MiB)
                    fh.write(block)
                    fh.flush()
                    os.fsync(fh.fileno())
                    self.digest.update(block)
                    self.written += MiB
        except BaseException as exc:  # reported by the test
            self.error = exc


def cap_sys_resource(pid: int) -> bool:
    """Whether process ``pid`` may grow a mounted ext4 (the kernel asks CAP_SYS_RESOURCE)."""
    with open(f"/proc/{pid}/status") as fh:
        caps = next(line for line in fh if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) & (1 << 24))


def test_grow_xfs_online_while_a_writer_writes(daemon: DaemonProcess, cluster: DevCluster) -> None:
    client, name = daemon.client(BETA), unique("grow")
    assert client.create(name, {"size": "320M", "fstype": "xfs"}) == {"Err": ""}
    path = mount(client, name, "m1")
    device = oracle.source_at(path)
    before_fs, before_id = fs_size(path), mount_id(path)
    assert block_size(device) == 320 * MiB
    (Path(path) / "before").write_bytes(os.urandom(8 * MiB))
    before_sum = sha256(Path(path) / "before")
    writer = Writer(Path(path) / "during")
    writer.start()
    try:
        wait_until(lambda: writer.written >= 2 * MiB, 60, "the writer under way")
        done = resize(daemon, name, "640M", "--driver", BETA)
        # It goes on writing after the resize, into the grown filesystem.
        after = writer.written
        assert after < 200 * MiB, "the writer ended before the resize did"
        wait_until(lambda: writer.written >= after + 2 * MiB or writer.error is not None, 60,
                   "the writer writing after the resize")  # fmt: skip
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, writer.error
    assert done.returncode == 0, done.stderr
    assert f"volume {name} (driver {BETA}): 320M -> 640M" in done.stdout
    assert "its filesystem grew online" in done.stdout
    # Grown everywhere, and never unmounted meanwhile.
    assert rbd_size(cluster, BETA, name) == 640 * MiB
    assert block_size(device) == 640 * MiB
    assert fs_size(path) > before_fs + 300 * MiB
    assert mount_id(path) == before_id and oracle.source_at(path) == device
    status = client.get(name)["Volume"]["Status"]
    assert status["size"] == "640M" and status["size_bytes"] == 640 * MiB
    assert status["fs_size_bytes"] == fs_size(path)
    # What was written before and during reads back after a fresh mount (not the cache).
    unmount(client, name, "m1")
    path = mount(client, name, "m2")
    assert sha256(Path(path) / "before") == before_sum
    assert (Path(path) / "during").stat().st_size == writer.written
    assert sha256(Path(path) / "during") == writer.digest.hexdigest()
    assert fs_size(path) > before_fs + 300 * MiB
    unmount(client, name, "m2")
    assert client.remove(name) == {"Err": ""}


def test_grow_mounted_ext4(daemon: DaemonProcess, cluster: DevCluster) -> None:
    """Online where the kernel lets the daemon (CAP_SYS_RESOURCE); else the device grows
    now and the filesystem at the next Mount, and the CLI says so with exit code 2. Under
    krbd a mounted volume cannot grow (see below): it grows unmounted, its filesystem at
    the next Mount."""
    client, name = daemon.client(ALPHA), unique("grow")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    path = mount(client, name, "m1")
    device, before_fs = oracle.source_at(path), fs_size(path)
    (Path(path) / "data").write_bytes(payload := os.urandom(4 * MiB))
    done = resize(daemon, name, "256M")  # one driver named? two here: found by --driver only
    assert done.returncode == 1
    assert "serves several drivers (alpha, beta): name one" in done.stderr
    done = resize(daemon, name, "256M", "--driver", ALPHA)
    if TEST_MAPPER == "krbd":
        # A read-write krbd map has the kernel's `exclusive` option, and the kernel takes
        # no resize request from another client: refused, saying so, nothing changed.
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "mapped exclusively by krbd" in done.stderr, done.stderr
        assert "does not take resize requests" in done.stderr, done.stderr
        assert rbd_size(cluster, ALPHA, name) == 64 * MiB
        assert block_size(device) == 64 * MiB and fs_size(path) == before_fs
        unmount(client, name, "m1")  # the way round it: grow it unmounted
        done = resize(daemon, name, "256M", "--driver", ALPHA)
        assert done.returncode == 0, done.stderr
        assert "not mounted: its filesystem grows at its next Mount" in done.stdout
        assert rbd_size(cluster, ALPHA, name) == 256 * MiB
    else:
        assert rbd_size(cluster, ALPHA, name) == 256 * MiB
        assert block_size(device) == 256 * MiB
        assert oracle.source_at(path) == device
        assert daemon.proc is not None
        if cap_sys_resource(daemon.proc.pid):
            assert done.returncode == 0, done.stderr
            assert fs_size(path) > before_fs + 150 * MiB
        else:
            assert done.returncode == 2, (done.stdout, done.stderr)
            assert "its filesystem did not" in done.stdout and "CAP_SYS_RESOURCE" in done.stdout
            assert "grows at the volume's next Mount" in done.stdout
            assert fs_size(path) == before_fs
        unmount(client, name, "m1")
    path = mount(client, name, "m2")
    assert fs_size(path) > before_fs + 150 * MiB
    assert (Path(path) / "data").read_bytes() == payload
    unmount(client, name, "m2")
    assert client.remove(name) == {"Err": ""}


def test_unmounted_grows_at_next_mount_and_bad_sizes_change_nothing(
    daemon: DaemonProcess, cluster: DevCluster
) -> None:
    client, name = daemon.client(ALPHA), unique("grow")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    path = mount(client, name, "m1")
    (Path(path) / "data").write_bytes(payload := os.urandom(2 * MiB))
    before_fs = fs_size(path)
    unmount(client, name, "m1")
    for size, message in [
        ("32M", f"volume '{name}' is 64M (67108864 bytes); refusing to shrink it to 32M"),
        ("12Q", "size '12Q' is not a size: use a number with a binary unit"),
    ]:
        done = resize(daemon, name, size, "--driver", ALPHA)
        assert done.returncode == 1, (size, done.stdout, done.stderr)
        assert message in done.stderr, (size, done.stderr)
    # The same refusals without the command line's start-up time: the daemon's own socket.
    refusals: list[tuple[dict[str, object], str]] = [
        ({"Size": "0M"}, "must be greater than zero"),
        ({"Size": "2P"}, "is larger than 1P"),
        ({"Size": 1024}, "size must be a string such as 20G"),
        ({"Size": "1G", "Name": "no-such-volume"}, "volume 'no-such-volume' does not exist"),
        (
            {"Size": "1G", "Driver": "nope"},
            "no driver 'nope' here; this daemon serves: alpha, beta",
        ),
        ({"Size": "1G", "Name": "../x"}, "volume name '../x' is invalid"),
    ]
    for body, message in refusals:
        status, answer = control(daemon).raw(
            "volumes/resize", json.dumps({"Name": name, "Driver": ALPHA, **body}).encode()
        )
        assert status in (400, 500) and message in answer["Err"], (body, answer)
    assert rbd_size(cluster, ALPHA, name) == 64 * MiB

    done = resize(daemon, name, "128M", "--driver", ALPHA, "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["Before"] == "64M" and answer["SizeBytes"] == 128 * MiB
    assert answer["Filesystem"] == "not mounted: its filesystem grows at its next Mount"
    assert rbd_size(cluster, ALPHA, name) == 128 * MiB
    assert client.get(name)["Volume"]["Status"]["size"] == "128M"
    # Same size again: nothing to do, not an error.
    status, answer = control(daemon).raw(
        "volumes/resize", json.dumps({"Name": name, "Driver": ALPHA, "Size": "128M"}).encode()
    )
    assert status == 200 and answer["Complete"] is True and answer["Before"] == "128M", answer
    path = mount(client, name, "m2")
    assert block_size(oracle.source_at(path)) == 128 * MiB
    assert fs_size(path) > before_fs + 50 * MiB
    assert (Path(path) / "data").read_bytes() == payload
    unmount(client, name, "m2")
    assert client.remove(name) == {"Err": ""}


def test_grow_on_create(daemon: DaemonProcess, cluster: DevCluster) -> None:
    alpha, beta = daemon.client(ALPHA), daemon.client(BETA)
    refused, grown = unique("goc"), unique("goc")
    assert alpha.create(refused, {"size": "64M"}) == {"Err": ""}
    reply = alpha.create(refused, {"size": "128M"})
    assert "size=128M (it has 64M)" in reply["Err"]
    assert f"to grow it: rbdplugin volume resize {refused} 128M" in reply["Err"]
    assert "grow_on_create = true for driver alpha" in reply["Err"]
    assert rbd_size(cluster, ALPHA, refused) == 64 * MiB

    assert beta.create(grown, {"size": "64M"}) == {"Err": ""}
    assert beta.create(grown, {"size": "128M"}) == {"Err": ""}
    assert rbd_size(cluster, BETA, grown) == 128 * MiB
    assert beta.get(grown)["Volume"]["Status"]["size"] == "128M"
    # Never smaller, and nothing else may differ while growing.
    reply = beta.create(grown, {"size": "64M"})
    assert "size=64M (it has 128M)" in reply["Err"] and "volumes never shrink" in reply["Err"]
    reply = beta.create(grown, {"size": "256M", "mount-options": "noatime"})
    assert "mount-options=noatime (it has none)" in reply["Err"]
    assert rbd_size(cluster, BETA, grown) == 128 * MiB
    # The same size (or none) is the plain idempotent Create.
    assert beta.create(grown, {"size": "128M"}) == {"Err": ""}
    assert beta.create(grown, None) == {"Err": ""}
    for client, name in ((alpha, refused), (beta, grown)):
        assert client.remove(name) == {"Err": ""}


def test_resize_refused_for_a_companion(daemon: DaemonProcess) -> None:
    client, source, companion = daemon.client(BETA), unique("src"), unique("ro")
    assert client.create(source, {"size": "64M"}) == {"Err": ""}
    assert client.create(companion, {"source": source, "access": "ro"}) == {"Err": ""}
    done = resize(daemon, companion, "128M", "--driver", BETA)
    assert done.returncode == 1
    assert f"is a read-only companion of '{source}': resize that volume instead" in done.stderr
    for name in (companion, source):
        assert client.remove(name) == {"Err": ""}


def test_growth_counts_against_the_quota(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin
) -> None:
    with admin.cluster.open_ioctx("gamma") as ioctx:
        provisioned = rbd.RBD().pool_stats_get(ioctx)["image_max_provisioned_bytes"]
    quota = -(-provisioned // MiB) * MiB + 200 * MiB  # room for 200M more
    proc = daemon_factory(
        tenant_toml(cluster, "gamma", max_total_size=f"{quota // MiB}M"), wait_for="gamma"
    )
    client, name = proc.client("gamma"), unique("quota")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    done = resize(proc, name, "512M")
    assert done.returncode == 1
    assert "growing it to 512M would bring driver gamma to" in done.stderr
    assert f"over its quota of {quota // MiB}M" in done.stderr
    assert rbd_size(cluster, "gamma", name) == 64 * MiB
    assert resize(proc, name, "192M").returncode == 0
    assert rbd_size(cluster, "gamma", name) == 192 * MiB
    assert client.remove(name) == {"Err": ""}
