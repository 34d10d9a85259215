"""Ceph and host outages (issue 14): every call answers in time, and all comes back.

A throwaway cluster of this module's own (the session's is shared by every test) loses
its monitor (stopped, then started again on its data), or its OSD is frozen (SIGSTOP: a
black hole, connections wait and nothing answers), or both are frozen. Meanwhile every
verb is asked at once, and the daemon idles with volumes mounted: each call must answer
with JSON and an ``Err`` within the daemon's deadline, Get, List and Path from what the
daemon knows, /readyz must say 503 and then 200 again, and once Ceph is back the same
daemon process serves a full volume cycle, with no more threads, descriptors or child
processes than before. A full disk under ``state_dir`` (a small tmpfs) must give clear
errors naming ENOSPC, leave every state file as it was, and pass once space returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rbdplugin.devcluster import DevCluster, free_ports
from tests import oracle
from tests.conftest import WATCH_TIMEOUT, StartDaemon, tenant_toml
from tests.helpers import DaemonProcess, PluginClient, take_down_under, unique, wait_until

TENANT = "outage"
OP_TIMEOUT = 6  # the daemon's deadline for every call
CLIENT_TIMEOUT = 3  # librados gives up after this
MARGIN = 2.0  # HTTP, scheduling and a loaded machine on top of a deadline
PROBE_SECONDS = 3  # rbdplugin.health.PROBE_SECONDS: /readyz's own deadline
OUTAGES = {
    "mon-stopped": ("stop", ("mon.a",)),
    "osd-frozen": ("freeze", ("osd.0",)),
    "black-hole": ("freeze", ("mon.a", "osd.0")),
}


@dataclass(frozen=True)
class Host:
    cluster: DevCluster
    daemon: DaemonProcess
    client: PluginClient
    metrics: str  # host:port of /readyz
    root: Path

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid


@dataclass(frozen=True)
class Answer:
    verb: str
    volume: str
    seconds: float
    reply: dict[str, Any] | None  # None: no JSON answer at all (see error)
    error: str = ""

    @property
    def err(self) -> str:
        assert self.reply is not None, f"{self.verb} {self.volume}: no answer: {self.error}"
        err = self.reply.get("Err")
        assert isinstance(err, str), f"{self.verb} {self.volume}: no Err in {self.reply}"
        return err


@pytest.fixture(scope="module")
def own_cluster(short_tmp: Path) -> Iterator[DevCluster]:
    """A cluster this module may stop and freeze."""
    dev = DevCluster(short_tmp / "outage-ceph")
    # The OSD is frozen for longer than the default 16 s read lease, more so under load:
    # Ceph Pacific then leaves its PGs laggy (every op parked "waiting for readable")
    # until the OSD restarts, which no daemon can outwait.
    dev.start(tenants=[TENANT], watch_timeout=WATCH_TIMEOUT, read_lease=600)
    try:
        yield dev
    finally:
        for name in dev.running():  # never leave a frozen daemon behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(dev.running()[name], signal.SIGCONT)
        dev.stop()


def start_host(cluster: DevCluster, daemon_factory: StartDaemon, root: Path, host_id: str) -> Host:
    metrics = f"127.0.0.1:{free_ports(1)[0]}"
    daemon = daemon_factory(
        tenant_toml(cluster, TENANT, default_size="16M"), wait_for=TENANT, conf=cluster.conf,
        op_timeout=OP_TIMEOUT, lease_check_seconds=1, host_id=host_id, metrics=metrics,
        state_dir=str(root / "state"), mount_root=str(root / "mounts"),
        env={**os.environ, "RBDPLUGIN_CEPH_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT)},
    )  # fmt: skip
    client = PluginClient(daemon.socket_dir / f"{TENANT}.sock", timeout=60)
    return Host(cluster, daemon, client, metrics, root)


@pytest.fixture(scope="module")
def host(own_cluster: DevCluster, daemon_factory: StartDaemon, short_tmp: Path) -> Iterator[Host]:
    root = short_tmp / "outage-host"
    root.mkdir()
    served = start_host(own_cluster, daemon_factory, root, "host-a")
    try:
        cycle(served.client)  # every pool thread and handle a cycle needs is there before
        yield served
    finally:
        served.daemon.stop()
        take_down_under(root)


# -- what the tests read themselves ------------------------------------------------------


def readyz(address: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # The command may hold spaces and parentheses: the ppid follows the last ')'.
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    family, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return sorted(family - {pid})


def census(pid: int) -> dict[str, int]:
    """Threads, open descriptors and descendant processes of ``pid``, read from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:")
    )
    return {"threads": threads, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "children": len(descendants(pid))}  # fmt: skip


def children_back_to(pid: int, count: int, seconds: float = 10) -> None:
    """Wait until ``pid`` has ``count`` descendants again: an export process that died on
    its own is reaped within the daemon's 5 s sweep."""
    deadline = time.monotonic() + seconds
    while len(descendants(pid)) != count and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(descendants(pid)) == count, (count, children_argv(pid))


def children_argv(pid: int) -> list[str]:
    """What each process below ``pid`` is: its state letter and command (or name)."""
    shown = []
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{child}/stat").read_text()
            name, state = (
                stat[stat.index("(") + 1 : stat.rindex(")")],
                stat.rsplit(")", 1)[1].split()[0],
            )
            shown.append(f"{child} {state} {' '.join(oracle.argv_of(child))[:200] or name}")
    return shown


def left_of(volume: str, mountpoint: str) -> list[str]:
    """What is left on this host of ``volume``'s mapping: its mount, export processes
    and loop devices on its export file."""
    left = [mountpoint] if oracle.is_mounted(mountpoint) else []
    left += [str(pid) for pid in oracle.pids_of_program_with("qemu-storage-daemon",
                                                             f"image={volume},")]  # fmt: skip
    return left + [dev for dev, backing in oracle.loop_devices().items()
                   if Path(backing).name == volume]  # fmt: skip


def settled_census(pid: int, seconds: float = CLIENT_TIMEOUT + 2) -> dict[str, int]:
    """The census once calls that linger past their deadline (up to the client timeout)
    ended: the smallest of a few readings."""
    readings = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        readings.append(census(pid))
        time.sleep(0.5)
    return {key: min(r[key] for r in readings) for key in readings[0]}


def ask(client: PluginClient, verb: str, body: dict[str, Any]) -> Answer:
    started = time.monotonic()
    try:
        reply = client.call(f"VolumeDriver.{verb}", body)
    except Exception as exc:  # refused, reset, timed out or not JSON
        return Answer(verb, str(body.get("Name", "")), time.monotonic() - started, None, repr(exc))
    return Answer(verb, str(body.get("Name", "")), time.monotonic() - started, reply)


def ask_all(client: PluginClient, calls: list[tuple[str, dict[str, Any]]]) -> list[Answer]:
    """All calls at once, as Docker's many clients would send them."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: ask(client, *call), calls))


def mount(client: PluginClient, name: str, mount_id: str) -> str:
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
    assert reply["Err"] == "", reply
    path: str = reply["Mountpoint"]
    assert oracle.is_mounted(path), path
    return path


def unmount(client: PluginClient, name: str, mount_id: str) -> None:
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id}) == {"Err": ""}


def cycle(client: PluginClient) -> None:
    """Create, Mount, Unmount, Remove of a new volume: Ceph and the host serve again."""
    name = unique("again")
    assert client.create(name) == {"Err": ""}
    path = mount(client, name, "again")
    unmount(client, name, "again")
    assert not oracle.is_mounted(path)
    assert client.remove(name) == {"Err": ""}


@contextmanager
def outage(cluster: DevCluster, kind: str) -> Iterator[None]:
    how, names = OUTAGES[kind]
    if how == "freeze":
        with cluster.frozen(*names):
            yield
        return
    for name in names:
        cluster.stop_one(name)
    try:
        yield
    finally:
        for name in names:
            cluster.start_one(name)


# -- the tests ---------------------------------------------------------------------------


def state_files(state: Path) -> dict[str, Any]:
    """Every JSON state file under ``state``, parsed (a truncated one fails here)."""
    return {
        str(p.relative_to(state)): json.loads(p.read_text()) for p in sorted(state.rglob("*.json"))
    }


# First in the module: the outages below may leave the module's cluster slow for a
# while, which this test must not inherit.
def test_a_full_state_dir_gives_clear_errors_and_recovers(
    own_cluster: DevCluster, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    root = short_tmp / unique("full")
    state = root / "state"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(state)],
                   check=True)  # fmt: skip
    daemon = None
    try:
        served = start_host(own_cluster, daemon_factory, root, "host-full")
        daemon, c = served.daemon, served.client
        first, second = unique("ffirst"), unique("fsecond")
        for name in (first, second):
            assert c.create(name) == {"Err": ""}
        first_path = mount(c, first, "m1")
        time.sleep(1.5)  # the known volumes are written a second after a change
        kept = state_files(state)
        assert first in kept[f"{TENANT}/mounts.json"]
        assert {first, second} <= set(kept[f"{TENANT}/known-volumes.json"])

        filler = state / "filler"
        fill(filler)
        later = unique("flater")
        answers = [
            ask(c, "Mount", {"Name": second, "ID": "m2"}),  # a new mount record
            ask(c, "Mount", {"Name": first, "ID": "m3"}),  # one more reference
            ask(c, "Unmount", {"Name": first, "ID": "m1"}),  # one reference fewer
            ask(c, "Create", {"Name": later, "Opts": {"size": "16M"}}),
            ask(c, "Get", {"Name": first}),
            ask(c, "List", {}),
        ]
        for answer in answers:
            print(f"  {answer.verb:8} {answer.seconds:5.2f} s  {answer.reply or answer.error}")
            assert answer.seconds < OP_TIMEOUT + MARGIN, answer
        for answer in answers[:3]:  # they must record the mount table, and cannot
            assert "No space left on device" in answer.err, answer
            assert str(state) in answer.err, answer
        # Nothing changed: the second volume is not mounted, the first still is, once.
        assert not oracle.pids_of_program_with("qemu-storage-daemon", f"image={second},")
        assert oracle.is_mounted(first_path)
        got = c.get(first)
        assert got["Err"] == "" and got["Volume"]["Status"]["mounts"] == {"m1": 1}, got
        time.sleep(1.5)  # past the known volumes' write delay
        now = state_files(state)
        assert now[f"{TENANT}/mounts.json"] == kept[f"{TENANT}/mounts.json"]
        assert set(now[f"{TENANT}/known-volumes.json"]) == set(kept[f"{TENANT}/known-volumes.json"])
        assert not [p.name for p in state.rglob("*.tmp")]

        filler.unlink()  # space returns: everything works again, without a restart
        mount(c, second, "m2")
        mount(c, first, "m3")
        unmount(c, first, "m3")
        unmount(c, first, "m1")
        unmount(c, second, "m2")
        assert not oracle.is_mounted(first_path)
        assert c.get(later)["Err"] == ""
        wait_until(lambda: later in state_files(state)[f"{TENANT}/known-volumes.json"], 35,
                   "the known volumes written once space returned")  # fmt: skip
        for name in (first, second, later):
            assert c.remove(name) == {"Err": ""}
    finally:
        if daemon is not None:
            daemon.stop()
        take_down_under(root)  # the tmpfs too: it is mounted under root
        if oracle.is_mounted(state):
            subprocess.run(["umount", "--lazy", str(state)], check=False)


@pytest.mark.parametrize("kind", list(OUTAGES))
def test_every_call_answers_in_time_during_an_outage_and_all_recovers(
    host: Host, kind: str
) -> None:
    c = host.client
    base = settled_census(host.pid, 1)
    held, leaving, idle, doomed, fresh = (
        unique(f"o{part}") for part in ("held", "leave", "idle", "rm", "new")
    )
    try:
        for name in (held, leaving, idle, doomed):
            assert c.create(name) == {"Err": ""}
        held_path = mount(c, held, "held")  # mounted through the whole outage
        leave_path = mount(c, leaving, "leave")  # unmounted during it
        wait_until(lambda: readyz(host.metrics) == 200, 30, "ready before the outage")
        calls: list[tuple[str, dict[str, Any]]] = [
            ("Create", {"Name": fresh, "Opts": {"size": "16M"}}),
            ("Remove", {"Name": doomed}),
            ("Mount", {"Name": idle, "ID": "during"}),
            ("Unmount", {"Name": leaving, "ID": "leave"}),
            ("Get", {"Name": held}),
            ("Get", {"Name": idle}),
            ("List", {}),
            ("Path", {"Name": held}),
        ]
        with outage(host.cluster, kind):
            unready = wait_until(lambda: readyz(host.metrics) == 503, PROBE_SECONDS + MARGIN + 2,
                                 "/readyz says 503 during the outage")  # fmt: skip
            answers = ask_all(c, calls)
            during = settled_census(host.pid)
            # Idle with volumes mounted: lease checks and probes fail again and again;
            # then Docker asks again.
            time.sleep(3)
            again = ask_all(c, [*calls[4:], ("Create", {"Name": unique("onew"), "Opts": None})])
            idled = settled_census(host.pid)
        for answer in answers + again:
            print(f"  {answer.verb:8} {answer.seconds:5.2f} s  {(answer.reply or {}).get('Err')!r}"
                  f"{answer.error}")  # fmt: skip
        print(f"  /readyz 503 after {unready:.1f} s; census before {base}, during {during}, "
              f"after idling {idled}")  # fmt: skip
        back = wait_until(lambda: readyz(host.metrics) == 200, 60, "/readyz 200 once Ceph is back")
        print(f"  /readyz 200 again {back:.1f} s after Ceph came back")

        # Every call answered with JSON and an Err, within its deadline: never a hang.
        for answer in answers + again:
            assert isinstance(answer.err, str)
            assert answer.seconds < OP_TIMEOUT + MARGIN, answer
        # Get, List and Path answer from what the daemon knows.
        for answer in answers + again:
            if answer.verb in ("Get", "List", "Path"):
                assert answer.err == "", answer
        by_verb = {(a.verb, a.volume): a for a in answers}
        assert by_verb[("Path", held)].reply == {"Mountpoint": held_path, "Err": ""}
        got = by_verb[("Get", held)].reply
        assert got is not None and got["Volume"]["Mountpoint"] == held_path
        assert got["Volume"]["Status"]["mounts"] == {"held": 1}
        if OUTAGES[kind][0] == "freeze":  # no OSD answers: Get says what it could not ask
            assert got["Volume"]["Status"]["ceph"].startswith("unreachable: "), got
        listed = {v["Name"] for v in (by_verb[("List", "")].reply or {})["Volumes"]}
        assert {held, leaving, idle} <= listed
        # What needs Ceph (a mapping needs the monitor and the OSD) fails, saying why.
        failed = [by_verb[("Mount", idle)]]
        if OUTAGES[kind][0] == "freeze":
            failed += [by_verb[("Create", fresh)], by_verb[("Remove", doomed)]]
        for answer in failed:
            assert "Ceph" in answer.err or f"did not finish within {OP_TIMEOUT} s" in answer.err, (
                answer
            )
        # Nothing piled up while the daemon waited on Ceph. A connection that timed out is
        # shut down and the next call makes a new one (its librados threads and sockets):
        # up or down at either census, so threads and fds are held to the most of the
        # healthy daemon's (one connection) and the first census; one more is a pile-up.
        for key in ("threads", "fds"):
            assert idled[key] <= max(during[key], base[key]), (key, base, during, idled)
        assert idled["children"] <= during["children"], (base, during, idled)

        # Ceph is back: the same daemon serves everything again.
        assert host.daemon.proc is not None and host.daemon.proc.poll() is None
        assert oracle.is_mounted(held_path)
        took = wait_until(lambda: "unreachable" not in json.dumps(c.get(held)), 30,
                          "Get asks Ceph again")  # fmt: skip
        print(f"  Get answered from Ceph again {took:.1f} s later")
        # The Unmount that ran out of time finishes its clean-up (Docker never asks
        # again): no mount, export process or loop device of that volume is left.
        took = wait_until(lambda: not left_of(leaving, leave_path), 30,
                          "the clean-up of the Unmount cut short by the outage")  # fmt: skip
        print(f"  the Unmount cut short finished its clean-up {took:.1f} s later")

        def removed() -> bool:
            # An export killed after ignoring SIGTERM leaves its watch on the image for
            # the OSD's watch timeout: meanwhile Remove says that the image is in use. A
            # clean-up still waiting to retry (its lease release failed while Ceph was
            # away) retries when Remove comes, and Remove waits for it: never "still
            # running" (it was, in a CI run, with the retry's back-off at 8 s).
            err = str(c.remove(leaving)["Err"])
            assert err == "" or "is in use" in err, err
            return err == ""

        took = wait_until(removed, WATCH_TIMEOUT + 5, "Remove of the volume cut short")
        print(f"  and was removed {took:.1f} s later")
        cycle(c)
    finally:
        for name, mount_id in ((held, "held"), (leaving, "leave"), (idle, "during")):
            c.call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
        for name in (held, leaving, idle, doomed, fresh):
            c.remove(name)
    after = settled_census(host.pid, 2)
    print(f"  after recovery {after}")
    children_back_to(host.pid, base["children"])
    assert after["fds"] <= base["fds"] + 3, (base, after)
    # The tenant's pool may have started more of its threads (8 at most) meanwhile.
    assert after["threads"] <= base["threads"] + 8, (base, after)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    assert os.statvfs(path).f_bavail == 0
