"""One writer across hosts. Two daemons with their own host_id, state, mounts and
sockets stand in for two hosts on one real cluster. Several tests wait out the
cluster's osd_client_watch_timeout (WATCH_TIMEOUT): run them alone with
``make test PYTEST_ARGS="-m locks"``.

Every daemon serves /metrics, so that takeovers, fencings, refused Mounts and lost
leases are checked where they are counted: in the daemon, read from its exposition."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import WATCH_TIMEOUT, StartDaemon, tenant_toml
from tests.helpers import TEST_MAPPER, Admin, DaemonProcess, PluginClient, unique, wait_until
from tests.integration.test_observability import free_port, sample, scrape

pytestmark = pytest.mark.locks
# Takeover must begin within the watch timeout plus this (lease checks, retries, fencing).
MARGIN = 10
# Fewer in the kernel tier's guest, where each krbd map costs seconds under TCG.
RACE_ROUNDS = int(os.environ.get("RBDPLUGIN_RACE_ROUNDS", "50"))
OTHER_MAPPER = {"krbd": "nbd", "nbd": "krbd"}.get(TEST_MAPPER, TEST_MAPPER)


@dataclass
class Host:
    name: str
    root: Path
    daemon: DaemonProcess
    metrics: str  # the daemon's /metrics address

    @property
    def client(self) -> PluginClient:
        return self.daemon.client("alpha")

    def export(self, volume: str) -> Path:
        return self.root / "state" / "exports" / "alpha" / "-" / volume

    def export_pids(self, volume: str) -> list[int]:
        return oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={self.export(volume)}")

    def crash_mapping(self, volume: str, device: str) -> None:
        """End ``volume``'s mapping the way a crash of this host would (for its image)."""
        if TEST_MAPPER == "fuse":
            for pid in self.export_pids(volume):
                os.kill(pid, signal.SIGKILL)
        elif TEST_MAPPER == "nbd":
            os.kill(int(Path(f"/sys/block/{Path(device).name}/pid").read_text()), signal.SIGKILL)
        else:  # krbd: one kernel cannot crash alone; drop its mapping with no clean-up
            subprocess.run(["rbd", "device", "unmap", "--options", "force", device], check=True)

    def create_and_mount(self, volume: str, mount_id: str = "c") -> Path:
        # Docker always creates a volume before its first Mount.
        assert self.client.create(volume, {"size": "64M"}) == {"Err": ""}
        reply = self.mount(volume, mount_id)
        assert reply["Err"] == "", reply
        return Path(reply["Mountpoint"])

    def mount(self, volume: str, mount_id: str = "c") -> dict[str, str]:
        return self.client.call("VolumeDriver.Mount", {"Name": volume, "ID": mount_id})

    def counted(self, metric: str) -> float:
        """This host's ``rbdplugin_<metric>_total{tenant="alpha"}``, from its exposition."""
        return sample(scrape(self.metrics), f"rbdplugin_{metric}_total", tenant="alpha")

    def leftovers(self, volume: str) -> tuple[list[int], list[str]]:
        """What of ``volume``'s mapping is on this host: export pids, loop devices."""
        loops = [d for d, f in oracle.loop_devices().items() if f.startswith(f"{self.root}/")]
        return self.export_pids(volume), loops

    def scrub(self) -> None:
        """Take down whatever a killed or frozen host left on this machine."""
        mine = f"{self.root}/"
        for pid in oracle.pids_of_program_with("qemu-storage-daemon", mine):
            os.kill(pid, signal.SIGCONT)
        for entry in reversed(oracle.mountinfo()):
            if entry["target"].startswith(f"{self.root}/mounts/"):
                subprocess.run(["umount", "--lazy", entry["target"]], check=False)
        for device, backing in oracle.loop_devices().items():
            if backing.startswith(mine):
                subprocess.run(["losetup", "--detach", device], check=False)
        for pid in oracle.pids_of_program_with("qemu-storage-daemon", mine):
            os.kill(pid, signal.SIGKILL)
        for entry in reversed(oracle.mountinfo()):
            if entry["target"].startswith(mine):
                subprocess.run(["umount", "--lazy", entry["target"]], check=False)


@pytest.fixture
def hosts(
    cluster: DevCluster,
    daemon_factory: StartDaemon,
    short_tmp: Path,
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Host, Host]]:
    marker = request.node.get_closest_marker("takeover")
    takeover = marker.args[0] if marker else "auto"
    tenants = tenant_toml(cluster, "alpha", default_size="64M", takeover=takeover)
    # In the kernel tier both "hosts" share one kernel, where host-b would see host-a's
    # kernel mapping of the image as made outside rbdplugin. Tests that leave host-a's
    # mapping alive give host-b the other kernel mapper, which does not look at it.
    separate = request.node.get_closest_marker("separate_mappers") is not None
    mappers = {"host-a": TEST_MAPPER, "host-b": OTHER_MAPPER if separate else TEST_MAPPER}
    made = []
    for name in ("host-a", "host-b"):
        root, metrics = short_tmp / unique(name), f"127.0.0.1:{free_port()}"
        daemon = daemon_factory(
            tenants, wait_for="alpha", host_id=name, lease_check_seconds=1,
            state_dir=str(root / "state"), mount_root=str(root / "mounts"), metrics=metrics,
            mapper=mappers[name],
        )  # fmt: skip
        made.append(Host(name, root, daemon, metrics))
    yield made[0], made[1]
    for host in made:
        host.scrub()


def write_blob(path: Path, size: int = 2 << 20) -> str:
    data = os.urandom(size)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def take_over(host: Host, volume: str, since: float) -> tuple[str, float]:
    """Retry Mount on ``host`` until it succeeds; the mountpoint, and the seconds from
    ``since`` until the Mount that succeeded was sent: how long the dead or frozen holder
    kept the volume. (Its own map and mount are the mapper's speed, not the takeover's:
    under TCG an rbd-nbd map alone takes ~6 s, and one that must skip a device a dead
    mapping holds runs twice.)"""
    deadline = since + WATCH_TIMEOUT + MARGIN + 20
    while True:
        sent = time.monotonic()
        reply = host.mount(volume)
        if not reply["Err"]:
            print(f"the Mount that took over ran {time.monotonic() - sent:.1f} s")
            return reply["Mountpoint"], sent - since
        assert time.monotonic() < deadline, f"no takeover: {reply['Err']}"
        time.sleep(0.5)


def direct_write_fails(path: Path) -> bool:
    done = subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=4k", "count=4", "oflag=direct,sync"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode != 0


def test_race_exactly_one_host_wins_each_round(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    volume = unique("race")
    assert a.client.create(volume, {"size": "64M"}) == {"Err": ""}
    before = {h.name: h.counted("lock_conflicts") for h in hosts}
    losses = {"host-a": 0, "host-b": 0}
    for round_ in range(RACE_ROUNDS):
        mount_id = f"r{round_}"
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda h, i=mount_id: (h, h.mount(volume, i)), (a, b)))
        winners = [(h, r) for h, r in replies if r["Err"] == ""]
        losers = [(h, r) for h, r in replies if r["Err"]]
        assert len(winners) == 1, replies
        (winner, won), (loser, lost) = winners[0], losers[0]
        assert f"is mounted read-write on host {winner.name} (since" in lost["Err"], lost
        # The win is a real mount on the winner only.
        assert oracle.is_mounted(won["Mountpoint"])
        assert not oracle.is_mounted(loser.root / "mounts" / "alpha" / volume)
        assert loser.leftovers(volume) == ([], []), "the refused Mount left its mapping"
        losses[loser.name] += 1
        reply = winner.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": mount_id})
        assert reply == {"Err": ""}
        assert not oracle.is_mounted(won["Mountpoint"])
    # Each host counted exactly the rounds it lost, as refused Mounts.
    assert {h.name: h.counted("lock_conflicts") - before[h.name] for h in hosts} == losses


def test_a_refused_mount_maps_only_alongside_its_claim_and_leaves_nothing(
    hosts: tuple[Host, Host],
) -> None:
    """Under the FUSE mapper the mapping comes up while the claim is made (its export
    takes no lock until the first write); a claim that fails undoes it before the Err.
    krbd and rbd-nbd take the image's lock as they map, so they wait for the claim: a
    refused Mount never maps."""
    a, b = hosts
    volume = unique("refused")
    a.create_and_mount(volume)

    def maps() -> float:
        samples = scrape(b.metrics)
        return sample(samples, "rbdplugin_stage_duration_seconds_count", stage="map")

    for round_ in range(3):
        before = maps()
        err = b.mount(volume, f"r{round_}")["Err"]
        assert "is mounted read-write on host host-a (since" in err, err
        assert maps() - before == (1 if TEST_MAPPER == "fuse" else 0)
        assert b.leftovers(volume) == ([], [])
        assert not oracle.is_mounted(b.root / "mounts" / "alpha" / volume)


def blocklisted(admin: Admin) -> set[str]:
    listing = admin.mon({"prefix": "osd blocklist ls", "format": "json"})
    entries, _ = json.JSONDecoder().raw_decode(listing)  # a second array (ranges) follows
    return {entry["addr"] for entry in entries}


@contextlib.contextmanager
def frozen(host: Host, volume: str, device: str, admin: Admin) -> Iterator[None]:
    """Freeze ``host`` as a hung machine would be: its daemon and whatever carries the
    mapping's I/O stop answering Ceph. Userspace mappers (fuse export, rbd-nbd) are
    stopped with SIGSTOP. The kernel's krbd client cannot be stopped, so its packets are
    dropped instead (kernel sockets belong to no process: ``! --uid-owner 0`` matches them
    and nothing of this root-only test's own) until the taker has blocklisted every
    address of the holder's lease; then it may talk again, and must find itself fenced."""
    pids = [host.daemon.proc.pid]  # type: ignore[union-attr]
    if TEST_MAPPER == "fuse":
        pids += host.export_pids(volume)
        assert len(pids) == 2, pids
    elif TEST_MAPPER == "nbd":
        pids.append(int(Path(f"/sys/block/{Path(device).name}/pid").read_text()))
    lease = json.loads(admin.cluster.open_ioctx("alpha").read(f"rbdplugin.lease.{volume}"))
    addresses = set(lease["writer"]["addrs"])
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    cut = ["OUTPUT", "-o", "lo", "-p", "tcp", "-m", "owner", "!", "--uid-owner", "0", "-j", "DROP"]
    if TEST_MAPPER == "krbd":
        subprocess.run(["iptables", "-w", "-I", *cut], check=True)
    done = threading.Event()

    def reconnect_when_fenced() -> None:
        while not done.wait(0.2):
            if addresses <= blocklisted(admin):
                break
        subprocess.run(["iptables", "-w", "-D", *cut], check=False)

    thaw = threading.Thread(target=reconnect_when_fenced, daemon=True)
    if TEST_MAPPER == "krbd":
        thaw.start()
    try:
        yield
        assert addresses <= blocklisted(admin), "the taker did not fence every address"
    finally:
        done.set()
        if thaw.is_alive():
            thaw.join(30)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_crash_of_the_holder_is_fenced_and_taken_over(
    hosts: tuple[Host, Host], admin: Admin
) -> None:
    a, b = hosts
    volume = unique("crash")
    path = a.create_and_mount(volume)
    digest = write_blob(path / "blob")
    mapping = oracle.mappings_of(f"alpha/{volume}", a.export(volume))
    assert len(mapping) == 1, mapping
    lease = json.loads(admin.cluster.open_ioctx("alpha").read(f"rbdplugin.lease.{volume}"))
    a_addresses = lease["writer"]["addrs"]
    assert len(a_addresses) == 2  # the daemon's presence and the mapping

    refused = b.mount(volume)["Err"]
    assert "is mounted read-write on host host-a" in refused
    assert "since" in refused and "stop the containers using it there first" in refused

    a.daemon.kill()
    a.crash_mapping(volume, mapping[0])
    died = time.monotonic()
    b_path, took = take_over(b, volume, died)
    print(f"takeover after a crash: {took:.1f} s (watch timeout {WATCH_TIMEOUT} s)")
    assert took <= WATCH_TIMEOUT + MARGIN
    assert sha(Path(b_path) / "blob") == digest
    blocklist = admin.mon({"prefix": "osd blocklist ls", "format": "json"})
    entries, _ = json.JSONDecoder().raw_decode(blocklist)  # a second array (ranges) follows
    listed = {entry["addr"] for entry in entries}
    assert set(a_addresses) <= listed
    assert "fenced host host-a" in b.daemon.log() and "took over from host host-a" in b.daemon.log()
    # Counted where it happened: one refused Mount, one takeover, every address fenced.
    assert b.counted("lock_conflicts") >= 1
    assert (b.counted("takeovers"), b.counted("fencings")) == (1, len(a_addresses))
    assert b.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "c"}) == {"Err": ""}


@pytest.mark.separate_mappers  # host-a's frozen mapping stays in the kernel tier's one kernel
def test_a_frozen_holder_is_fenced_and_notices_the_loss(
    hosts: tuple[Host, Host], admin: Admin
) -> None:
    a, b = hosts
    volume = unique("freeze")
    a_path = a.create_and_mount(volume)
    write_blob(a_path / "from-a")
    device = oracle.mappings_of(f"alpha/{volume}", a.export(volume))[0]
    with frozen(a, volume, device, admin):
        b_path, took = take_over(b, volume, time.monotonic())
        print(f"takeover from a frozen host ({TEST_MAPPER}): {took:.1f} s")
        digest = write_blob(Path(b_path) / "from-b")
    # The woken host cannot write a byte: its every address is blocklisted.
    assert direct_write_fails(a_path / "late-write")
    wait_until(lambda: f"volume {volume}: LOST" in a.daemon.log(), 20, "host-a noticing the loss")
    assert a.client.get(volume)["Volume"]["Status"]["lost_to"].startswith("host-b at ")
    assert a.counted("leases_lost") == 1
    assert (b.counted("takeovers"), a.counted("takeovers")) == (1, 0)
    # host-b's data is intact and host-a's late write never reached the image.
    assert b.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "c"}) == {"Err": ""}
    again = Path(b.mount(volume, "again")["Mountpoint"])
    assert sha(again / "from-b") == digest
    assert not (again / "late-write").exists()
    assert b.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "again"}) == {"Err": ""}


def test_a_daemon_crash_with_a_live_mapping_is_not_taken_over(
    cluster: DevCluster, daemon_factory: StartDaemon, hosts: tuple[Host, Host]
) -> None:
    a, b = hosts
    volume = unique("alive")
    path = a.create_and_mount(volume)
    writer = subprocess.Popen(["sh", "-c", f"while :; do date >> {path}/log; sleep 0.1; done"])
    try:
        a.daemon.kill()  # the container keeps writing through the mapping
        end = time.monotonic() + WATCH_TIMEOUT + 5
        while time.monotonic() < end:
            err = b.mount(volume)["Err"]
            assert "is mounted read-write on host host-a" in err, err
            time.sleep(1)
        before = len((path / "log").read_text().splitlines())
        time.sleep(0.5)
        assert len((path / "log").read_text().splitlines()) > before
    finally:
        writer.kill()
        writer.wait()
    restarted = daemon_factory(
        tenant_toml(cluster, "alpha", default_size="64M"), wait_for="alpha", host_id="host-a",
        lease_check_seconds=1, state_dir=str(a.root / "state"), mount_root=str(a.root / "mounts"),
    )  # fmt: skip
    client = restarted.client("alpha")
    assert client.get(volume)["Volume"]["Status"]["mounts"] == {"c": 1}
    assert client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "c"}) == {"Err": ""}
    assert b.mount(volume)["Err"] == ""  # released cleanly: no fencing needed
    assert (b.counted("takeovers"), b.counted("fencings")) == (0, 0)
    assert b.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "c"}) == {"Err": ""}


def test_read_only_companions_share_and_exclude_writers(
    hosts: tuple[Host, Host], admin: Admin
) -> None:
    a, b = hosts
    volume, companion = unique("src"), unique("ro")
    path = a.create_and_mount(volume)
    digest = write_blob(path / "data")
    assert a.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "c"}) == {"Err": ""}

    err = a.client.create(unique("bad"), {"access": "ro"})["Err"]
    assert "access=ro needs source=VOLUME" in err
    assert a.client.create(companion, {"source": volume}) == {"Err": ""}
    # Its name is taken: a Create of it as a volume of its own never makes an image.
    err = a.client.create(companion, {"size": "8M"})["Err"]
    assert f"volume '{companion}' already exists" in err, err
    assert companion not in admin.images("alpha")
    assert companion in b.client.names()  # global: every host sees it
    assert b.client.get(companion)["Volume"]["Status"]["image"].endswith(f"/{volume}")

    ro_paths = [
        Path(a.mount(companion, "a1")["Mountpoint"]),
        Path(b.mount(companion, "b1")["Mountpoint"]),
        Path(b.mount(companion, "b2")["Mountpoint"]),
    ]
    for ro in ro_paths:
        assert sha(ro / "data") == digest
        with pytest.raises(OSError):
            (ro / "nope").write_text("x")
    # Get tells who holds the image, for the source (whose holders are read beside it)
    # and for the companion (its image is the source's: that read is done after it).
    for name in (volume, companion):
        held = b.client.get(name)["Volume"]["Status"]["held_by"]
        assert sorted((h["host"], h["access"], h["alive"]) for h in held) == [
            ("host-a", "ro", True),
            ("host-b", "ro", True),
        ], (name, held)
    for host in (a, b):  # both hold it read-only themselves
        err = host.mount(volume, "rw")["Err"]
        assert f"this host ({host.name}) has it mounted read-only" in err, err
    assert "is mounted (ro on host" in a.client.remove(volume)["Err"]  # readers are live

    for mount_id in ("b1", "b2"):
        assert b.client.call("VolumeDriver.Unmount", {"Name": companion, "ID": mount_id}) == {
            "Err": ""
        }
    err = b.mount(volume, "rw")["Err"]  # host-b reads no more, host-a still does
    assert "is mounted read-only on host host-a" in err
    assert "waits until every read-only mount is gone" in err
    assert a.client.call("VolumeDriver.Unmount", {"Name": companion, "ID": "a1"}) == {"Err": ""}
    assert a.mount(volume, "rw")["Err"] == ""
    err = b.mount(companion, "b3")["Err"]
    assert "is mounted read-write on host host-a" in err
    for name in (volume, companion):
        held = b.client.get(name)["Volume"]["Status"]["held_by"]
        assert [(h["host"], h["access"], h["alive"]) for h in held] == [("host-a", "rw", True)]
    assert a.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "rw"}) == {"Err": ""}
    assert "has read-only companion volume(s)" in a.client.remove(volume)["Err"]
    assert a.client.remove(companion) == {"Err": ""}
    assert companion not in a.client.names()
    assert a.client.remove(volume) == {"Err": ""}


def rbdplugin(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rbdplugin", *args], capture_output=True, text=True,
                          input=stdin, timeout=120, check=False)  # fmt: skip


def test_locks_ls_and_break_fence_a_live_holder(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    volume = unique("brk")
    a_path = a.create_and_mount(volume)
    write_blob(a_path / "before")
    config = str(b.daemon.config)
    listed = rbdplugin("locks", "ls", "--config", config)
    assert listed.returncode == 0, listed.stderr
    row = next(line.split() for line in listed.stdout.splitlines() if f" {volume} " in line)
    assert row[:4] == ["alpha", volume, "rw", "host-a"] and row[5] == "yes"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[4]), row
    as_json = json.loads(rbdplugin("locks", "ls", "--config", config, "--json").stdout)
    assert {"volume": volume, "host": "host-a", "alive": True}.items() <= next(
        r for r in as_json if r["volume"] == volume
    ).items()

    refused = rbdplugin("locks", "break", volume, "--config", config, stdin="")
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    assert not direct_write_fails(a_path / "still-mine")

    broken = rbdplugin("locks", "break", volume, "--config", config, "--yes")
    assert broken.returncode == 0, broken.stderr
    assert f"volume {volume}: released; fenced 127.0.0.1:" in broken.stdout
    assert direct_write_fails(a_path / "after-break")
    wait_until(lambda: f"volume {volume}: LOST" in a.daemon.log(), 20, "host-a noticing the break")
    assert a.counted("leases_lost") == 1
    # host-a's containers stop; its fenced mount goes (in the kernel tier both "hosts" share
    # one kernel, so host-b would otherwise find host-a's fenced device still mounted).
    assert a.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "c"}) == {"Err": ""}
    assert b.mount(volume)["Err"] == ""
    assert b.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "c"}) == {"Err": ""}


@pytest.mark.takeover("manual")
@pytest.mark.fuse_only  # kills the holder's export process
def test_manual_takeover_says_how_to_force_it(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    volume = unique("man")
    a.create_and_mount(volume)
    pids = a.export_pids(volume)
    assert len(pids) == 1, pids
    a.daemon.kill()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(WATCH_TIMEOUT + 2)
    err = b.mount(volume)["Err"]
    assert "takeover is manual for this driver" in err
    assert f"rbdplugin locks break {volume}" in err
    assert (b.counted("takeovers"), b.counted("fencings")) == (0, 0)
    done = rbdplugin("locks", "break", volume, "--config", str(b.daemon.config), "--yes")
    assert done.returncode == 0, done.stderr
    assert b.mount(volume)["Err"] == ""
    assert b.client.call("VolumeDriver.Unmount", {"Name": volume, "ID": "c"}) == {"Err": ""}
