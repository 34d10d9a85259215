"""Ceph cut off under a busy daemon (issue 9, item 8).

Twenty clients send Get, List, Create, Mount and Unmount without pause while
the cluster is frozen (SIGSTOP: a black hole, nothing refuses a connection),
the OSD alone or the monitor and the OSD together, a little longer than the
client timeout: calls fail and each tenant's Ceph connection is dropped while
other calls still run on it, with images open and the presence handles of
mounted volumes on it. The daemon must not crash, must answer every request,
and must work again once Ceph is back, without a restart; every connection it
dropped must really be shut down, and no call may be left stuck on one.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rbdplugin.devcluster import DevCluster
from tests.conftest import WATCH_TIMEOUT, StartDaemon, tenant_toml
from tests.helpers import Admin, DaemonProcess, PluginClient, take_down_under, unique, wait_until

CLIENT_TIMEOUT = 3  # librados gives up after this: calls fail and the connection is dropped
PARALLEL = 20
# Cuts just past the client timeout drop a connection while many calls still run on it;
# with the monitor up, the daemon reconnects at once and the next calls fail again.
CUTS = (("osd.0",), ("mon.a", "osd.0")) * 4
CUT_SECONDS = CLIENT_TIMEOUT + 1.5
RECOVERY_SECONDS = 60
CRASH_MARKS = ("Segmentation fault", "Fatal Python error", "Aborted", "terminate called",
               "core dumped", "ceph_assert", "FAILED assert")  # fmt: skip


@dataclass
class Driver:
    """One tenant of the daemon under test: its own pool, Ceph connection and thread pool."""

    name: str
    pool: str
    client: PluginClient
    volumes: list[str]
    held: list[str] = field(default_factory=list)  # mounted through every cut
    cycled: list[str] = field(default_factory=list)  # mounted and unmounted by one client each


@contextmanager
def frozen(cluster: DevCluster, names: tuple[str, ...]) -> Iterator[None]:
    """Freeze some of the cluster's daemons; always thaw them (the cluster is the session's)."""
    running = cluster.running()
    assert running.keys() == {"mon.a", "osd.0"}, cluster.status()
    pids = [running[name] for name in names]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


class Load:
    """``PARALLEL`` clients sending requests back to back until stopped."""

    def __init__(self, drivers: list[Driver]) -> None:
        self.drivers = drivers
        self.stop = threading.Event()
        self.answers: dict[str, int] = {}
        self.failures: list[str] = []  # requests that got no JSON answer with an Err
        self._lock = threading.Lock()

    def _ask(self, what: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        try:
            reply = call()
        except Exception as exc:  # refused, reset, timed out or not JSON: no answer
            with self._lock:
                self.failures.append(f"{what}: {exc!r}")
            return None
        with self._lock:
            if not isinstance(reply.get("Err"), str):
                self.failures.append(f"{what}: no Err in {reply!r}")
            key = f"{what} {'ok' if reply.get('Err') == '' else 'err'}"
            self.answers[key] = self.answers.get(key, 0) + 1
        return reply

    def client_loop(self, index: int) -> None:
        driver = self.drivers[index % len(self.drivers)]
        c, rng = driver.client, random.Random(index)  # noqa: S311 - not for secrets
        turn = index // len(self.drivers)
        mine = driver.cycled[turn] if turn < len(driver.cycled) else None
        while not self.stop.is_set():
            pick = rng.random()
            if mine is not None and pick < 0.4:
                body = {"Name": mine, "ID": "cycle"}
                got = self._ask("Mount", partial(c.call, "VolumeDriver.Mount", body))
                if got is not None and got["Err"] == "":
                    self._ask("Unmount", partial(c.call, "VolumeDriver.Unmount", body))
            elif pick < 0.75:
                self._ask("Get", lambda: c.get(rng.choice(driver.volumes)))  # opens the image
            elif pick < 0.85:
                self._ask("List", lambda: c.call("VolumeDriver.List", {}))
            else:
                self._ask("Create", lambda: c.create(unique("cutnew"), {"size": "16M"}))

    @contextmanager
    def running(self) -> Iterator[None]:
        self.stop.clear()
        with ThreadPoolExecutor(PARALLEL) as pool:
            for index in range(PARALLEL):
                pool.submit(self.client_loop, index)
            try:
                yield
            finally:
                self.stop.set()


def start(
    daemon_factory: StartDaemon, cluster: DevCluster, root: Path, pools: dict[str, str],
    op_timeout: int, volumes: int,
) -> tuple[DaemonProcess, list[Driver]]:  # fmt: skip
    """A daemon serving one tenant per ``pools`` entry (driver name -> pool), each with
    ``volumes`` volumes of its own."""
    tenants = "".join(
        tenant_toml(cluster, pool, table=name, driver=name, default_size="16M")
        for name, pool in pools.items()
    )
    daemon = daemon_factory(
        tenants, wait_for=next(iter(pools)), op_timeout=op_timeout, lease_check_seconds=1,
        state_dir=str(root / "state"), mount_root=str(root / "mounts"),
        env={**os.environ, "RBDPLUGIN_CEPH_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT),
             "PYTHONFAULTHANDLER": "1"},  # a crash leaves every thread's stack in the log
    )  # fmt: skip
    drivers = []
    for name, pool in pools.items():
        driver = Driver(name, pool, daemon.client(name), [unique("cut") for _ in range(volumes)])
        for volume in driver.volumes:
            assert driver.client.create(volume, {"size": "16M"}) == {"Err": ""}
        drivers.append(driver)
    return daemon, drivers


def cut_repeatedly(
    cluster: DevCluster, daemon: DaemonProcess, drivers: list[Driver],
    works: Callable[[PluginClient], bool], cuts: tuple[tuple[str, ...], ...] = CUTS,
) -> None:  # fmt: skip
    """Cut Ceph under load again and again; each time the daemon must live and recover."""
    load = Load(drivers)
    for number, cut in enumerate(cuts):
        with load.running():
            time.sleep(1)  # requests in flight on a healthy connection
            with frozen(cluster, cut):
                time.sleep(CUT_SECONDS)
            assert_alive(daemon)
            time.sleep(1)  # and again on the connection that comes back
        assert_alive(daemon)
        took = max(
            wait_until(partial(works, d.client), RECOVERY_SECONDS, f"{d.name} after cut {number}")
            for d in drivers
        )
        drops = daemon.log().count("dropping the Ceph connection")
        print(f"cut {number} ({'+'.join(cut)}): {drops} connections dropped so far, "
              f"working again {took:.1f} s after the load stopped")  # fmt: skip
    print(f"answers: {sorted(load.answers.items())}")
    assert not load.failures, load.failures[:20]
    assert any(key.endswith(" err") for key in load.answers), "no call ever failed: no cut?"
    assert daemon.log().count("dropping the Ceph connection") >= len(cuts) * len(drivers)


def all_shut_down(daemon: DaemonProcess, cluster: DevCluster, tenants: int) -> None:
    """Every dropped connection was shut down once its last call ended, and no call is
    stuck on one: one connection per tenant is left, and nothing else of Ceph's."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    wait_until(lambda: mon_sessions(pid, cluster) == tenants, 30, "one connection per tenant")
    wait_until(lambda: ceph_contexts(pid) == tenants, 30, "one Ceph context per tenant")


def assert_alive(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    code, log = daemon.proc.poll(), daemon.log()
    marks = [mark for mark in CRASH_MARKS if mark in log]
    assert code is None and not marks, f"daemon exited {code}, crash marks {marks}:\n{log[-6000:]}"


def create_and_get(client: PluginClient, name: str = "") -> bool:
    name = name or unique("after")
    return client.create(name, {"size": "16M"}) == {"Err": ""} and client.get(name)["Err"] == ""


def create_get_mount_unmount(client: PluginClient) -> bool:
    name = unique("after")
    body = {"Name": name, "ID": "check"}
    return (
        create_and_get(client, name)
        and client.call("VolumeDriver.Mount", body)["Err"] == ""
        and client.call("VolumeDriver.Unmount", body) == {"Err": ""}
    )


def mon_sessions(pid: int, cluster: DevCluster) -> int:
    """Established TCP connections from process ``pid`` to the monitor: one per Rados handle."""
    state = cluster.state()
    assert state is not None
    ports = {state.v1_port, state.v2_port}
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port, status, inode = int(fields[2].split(":")[1], 16), fields[3], fields[9]
        count += status == "01" and remote_port in ports and inode in inodes  # 01: established
    return count


def ceph_contexts(pid: int) -> int:
    """Ceph client contexts alive in process ``pid``, counted by their messenger threads.

    A handle shut down while a call still ran on it stays pinned by that call, which
    never returns (its operations went away with the handle): its threads remain.
    """
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            count += (task / "comm").read_text().strip() == "msgr-worker-0"
    return count


def test_ceph_cut_under_load_is_survived_and_recovered(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path
) -> None:
    root = short_tmp / unique("cut")
    # Two tenants: two connections, each with its own thread pool, dropped at every cut.
    daemon, drivers = start(
        daemon_factory, cluster, root, {"cuta": "alpha", "cutb": "beta"}, op_timeout=10,
        volumes=10,
    )  # fmt: skip
    try:
        for d in drivers:
            d.held, d.cycled = d.volumes[:3], d.volumes[3:7]
            for name in d.held:  # their presence handles are open on the connection
                reply = d.client.call("VolumeDriver.Mount", {"Name": name, "ID": "held"})
                assert reply["Err"] == "", reply
        cut_repeatedly(cluster, daemon, drivers, create_get_mount_unmount)
        all_shut_down(daemon, cluster, len(drivers))
        # The volumes mounted all along still are, watched again from the new connection
        # (their mapping and our presence handle), and no old handle still watches them.
        for d in drivers:
            for name in d.held:
                status = d.client.get(name)["Volume"]["Status"]
                assert status["mounts"] == {"held": 1} and "lost_to" not in status, status
        wait_until(
            lambda: all(len(admin.watchers(d.pool, n)) == 2 for d in drivers for n in d.held),
            WATCH_TIMEOUT + 20, "presence handles back on the new connections",
        )  # fmt: skip
        for d in drivers:
            for name in d.held:
                reply = d.client.call("VolumeDriver.Unmount", {"Name": name, "ID": "held"})
                assert reply == {"Err": ""}
                assert admin.watchers(d.pool, name) == []
        assert_alive(daemon)
    finally:
        daemon.stop()
        take_down_under(root)


def test_calls_past_their_deadline_keep_their_connection(
    cluster: DevCluster, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    """A deadline shorter than the client timeout: callers get their Err at the deadline
    while the calls linger in their threads, on a connection that must outlive them."""
    root = short_tmp / unique("late")
    daemon, drivers = start(
        daemon_factory, cluster, root, {"late": "alpha"}, op_timeout=CLIENT_TIMEOUT - 1,
        volumes=10,
    )  # fmt: skip
    try:
        cut_repeatedly(cluster, daemon, drivers, create_and_get, CUTS[:4])
        assert f"did not answer within {CLIENT_TIMEOUT - 1} s" in daemon.log()
        all_shut_down(daemon, cluster, len(drivers))
        assert_alive(daemon)
    finally:
        daemon.stop()
        take_down_under(root)
