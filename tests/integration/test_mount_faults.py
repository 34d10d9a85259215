"""Failures and crashes at every stage of a Mount.

Faults are injected at the process boundary only: the daemon under test finds
wrappers for the real tools first on its PATH. A flag file makes a wrapper fail,
hang before running the real tool, or run it and then hang (so the daemon can be
killed right after a stage). Everything else, Ceph, mkfs, mounts and the daemon's
logic, is real.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from rbdplugin.mapping import HostPaths
from rbdplugin.mapping.scan import mounts, processes
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import Admin, DaemonProcess, PluginClient, unique, wait_until
from tests.integration.test_mount import leftovers, mount, unmount

HOST = HostPaths()
TOOLS = ("qemu-storage-daemon", "losetup", "blkid", "mkfs.ext4", "mount")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

WRAPPER = """#!/bin/sh
# Fault-injection wrapper: flags in CTL name a substring the arguments must contain.
tool=$(basename "$0")
ctl="CTL"
real=$(PATH="SYSTEM_PATH" command -v "$tool")
armed() { [ -e "$ctl/$1.$tool" ] && echo "$*" | grep -q -- "$(cat "$ctl/$1.$tool")"; }
if armed fail "$@"; then echo "$tool: injected failure" >&2; exit 1; fi
wait_flag() {
  touch "$ctl/hanging.$tool"
  while [ -e "$ctl/$1.$tool" ]; do kill -0 "$PPID" 2>/dev/null || exit 1; sleep 0.05; done
}
if armed hang "$@"; then wait_flag hang; fi
if armed after "$@"; then "$real" "$@"; rc=$?; wait_flag after; exit $rc; fi
exec "$real" "$@"
"""


@dataclass
class Faults:
    ctl: Path
    bin: Path

    def arm(self, kind: str, tool: str, when: str = "") -> None:
        (self.ctl / f"{kind}.{tool}").write_text(when)

    def clear(self) -> None:
        for flag in self.ctl.iterdir():
            flag.unlink()

    def wait_hanging(self, tool: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not (self.ctl / f"hanging.{tool}").exists():
            assert time.monotonic() < deadline, f"{tool} was never reached"
            time.sleep(0.02)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}:{SYSTEM_PATH}"}


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[Faults]:
    ctl, bin_dir = tmp_path / "ctl", tmp_path / "bin"
    ctl.mkdir()
    bin_dir.mkdir()
    for tool in TOOLS:
        wrapper = bin_dir / tool
        wrapper.write_text(WRAPPER.replace("CTL", str(ctl)).replace("SYSTEM_PATH", SYSTEM_PATH))
        wrapper.chmod(0o755)
    yield Faults(ctl, bin_dir)
    for flag in ctl.iterdir():
        flag.unlink()  # let any wrapper still waiting go


def start(cluster: DevCluster, factory: StartDaemon, state: Path, faults: Faults) -> DaemonProcess:
    tenants = tenant_toml(cluster, "alpha", default_size="64M")
    return factory(tenants, wait_for="alpha", env=faults.env, op_timeout=8,
                   state_dir=str(state), mount_root=str(state.parent / "mounts"))  # fmt: skip


# (flag kind, tool, argument that must appear): one per stage of a Mount.
FAILURES = [
    ("qemu-storage-daemon", ""),
    ("losetup", "--find"),
    ("blkid", ""),
    ("mkfs.ext4", ""),
    ("mount", ""),
]


@pytest.mark.parametrize(("tool", "when"), FAILURES, ids=[t for t, _ in FAILURES])
def test_failure_at_each_stage_leaves_nothing_behind(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path,
    faults: Faults, tool: str, when: str,
) -> None:  # fmt: skip
    daemon = start(cluster, daemon_factory, short_tmp / unique("f") / "state", faults)
    client, name = daemon.client("alpha"), unique()
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    faults.arm("fail", tool, when)
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})
    assert "injected failure" in reply["Err"], reply
    assert "exit status" not in reply["Err"]
    assert leftovers(daemon, admin, "alpha", name) == []
    faults.clear()
    path = mount(client, name, "c")  # nothing half-done stands in the way
    Path(path, "ok").write_text("ok")
    unmount(client, name, "c")
    assert leftovers(daemon, admin, "alpha", name) == []
    daemon.stop()


def test_a_hung_stage_is_killed_within_the_deadline(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path, faults: Faults
) -> None:
    daemon = start(cluster, daemon_factory, short_tmp / unique("h") / "state", faults)
    client, name = daemon.client("alpha"), unique()
    faults.arm("hang", "mkfs.ext4")
    started = time.monotonic()
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})
    elapsed = time.monotonic() - started
    assert "did not finish within 8 s" in reply["Err"]
    assert elapsed < 8 + 15  # the budget, plus the roll-back
    assert processes(HOST, "sh", str(faults.bin / "mkfs.ext4")) == []  # the hung child is gone
    assert leftovers(daemon, admin, "alpha", name) == []
    daemon.stop()


# Where the daemon is killed: (flag kind, tool, argument) reached by a Mount.
CRASH_POINTS = [
    ("hang", "qemu-storage-daemon", ""),  # export process about to start
    ("hang", "losetup", "--find"),  # exported, no loop device yet
    ("hang", "blkid", ""),  # mapped, not probed
    ("hang", "mkfs.ext4", ""),  # mkfs about to run
    ("after", "mkfs.ext4", ""),  # mkfs done, not recorded
    ("hang", "mount", ""),  # formatted, not mounted
    ("after", "mount", ""),  # mounted, Docker never got the answer
]


@pytest.mark.parametrize(
    ("kind", "tool", "when"), CRASH_POINTS, ids=[f"{k}-{t}" for k, t, _ in CRASH_POINTS]
)
def test_kill_9_at_each_stage_then_restart(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path,
    faults: Faults, kind: str, tool: str, when: str,
) -> None:  # fmt: skip
    state = short_tmp / unique("k") / "state"
    first = start(cluster, daemon_factory, state, faults)
    client, name = first.client("alpha"), unique()
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    faults.arm(kind, tool, when)
    pending = _mount_in_background(client.socket_path, name)
    faults.wait_hanging(tool)
    first.kill()
    faults.clear()
    pending.join(timeout=30)

    second = start(cluster, daemon_factory, state, faults)
    # A Mount that never answered Docker must not stay half-done: reconcile took it down,
    # and fenced the killed daemon's address (so its watch goes now, not at the timeout).
    wait_until(lambda: leftovers(second, admin, "alpha", name) == [], 5, "clean-up")
    client = second.client("alpha")
    path = Path(mount(client, name, "c2"))
    assert mounts(HOST)[str(path)][1] == "ext4"
    (path / "after-crash").write_text("fine")
    if (kind, tool) == ("after", "mkfs.ext4"):  # a filesystem and our formatting mark
        assert "finishing an interrupted mkfs" in second.log()
    unmount(client, name, "c2")
    path = Path(mount(client, name, "c3"))
    assert (path / "after-crash").read_text() == "fine"
    unmount(client, name, "c3")
    assert leftovers(second, admin, "alpha", name) == []
    assert "rbdplugin.formatting" not in admin.metadata("alpha", name)
    second.stop()


def _mount_in_background(socket_path: Path, name: str) -> threading.Thread:
    def call() -> None:
        with contextlib.suppress(OSError):  # the daemon is killed under it, as intended
            PluginClient(socket_path, timeout=60).call(
                "VolumeDriver.Mount", {"Name": name, "ID": "c1"}
            )

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread
