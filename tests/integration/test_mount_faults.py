"""Failures and crashes at every stage of a Mount.

Faults are injected at the process boundary only: the daemon under test finds
wrappers for the real tools first on its PATH. A flag file makes a wrapper fail,
hang before running the real tool, or run it and then hang (so the daemon can be
killed right after a stage). Everything else, Ceph, mkfs, mounts and the daemon's
logic, is real.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import (
    TEST_MAPPER,
    Admin,
    DaemonProcess,
    PluginClient,
    slow_fuse_file,
    unique,
    wait_until,
)
from tests.integration.test_mount import leftovers, mount, unmount

TOOLS = ("qemu-storage-daemon", "losetup", "rbd", "blkid", "cmp", "mkfs.ext4", "mount", "umount")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The daemon's deadline for every call here: short, so that hangs are cut quickly. The
# kernel tier's guest (TCG, several times slower: an rbd-nbd Mount alone can take 8 s)
# raises it (tests/kernel/inside.sh); a clean-up gets half of it before Docker is answered.
OP_TIMEOUT = int(os.environ.get("RBDPLUGIN_TEST_FAULT_OP_TIMEOUT", "8"))
TEARDOWN = OP_TIMEOUT // 2

WRAPPER = """#!/bin/sh
# Fault-injection wrapper: flags in CTL name a substring the arguments must contain.
tool=$(basename "$0")
ctl="CTL"
real=$(PATH="SYSTEM_PATH" command -v "$tool")
armed() { [ -e "$ctl/$1.$tool" ] && echo "$*" | grep -q -- "$(cat "$ctl/$1.$tool")"; }
if armed fail "$@"; then echo "$tool: injected failure" >&2; exit 1; fi
if armed exit "$@"; then exit "$(cat "$ctl/exit-arg.$tool")"; fi
if armed slow "$@"; then sleep "$(cat "$ctl/slow-arg.$tool")"; fi
# Stuck in the kernel: a direct read of a FUSE file whose server takes its time survives SIGKILL.
if armed stuck "$@"; then exec dd if="$ctl/../slow" of=/dev/null bs=4096 count=1 iflag=direct; fi
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

    def arm(self, kind: str, tool: str, when: str = "", arg: str = "") -> None:
        """Make ``tool`` misbehave as ``kind`` when its arguments contain ``when``;
        ``arg`` is the exit code (kind exit) or the seconds to sleep first (kind slow)."""
        if arg:
            (self.ctl / f"{kind}-arg.{tool}").write_text(arg)
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
    return factory(tenants, wait_for="alpha", env=faults.env, op_timeout=OP_TIMEOUT,
                   state_dir=str(state), mount_root=str(state.parent / "mounts"))  # fmt: skip


# (flag kind, tool, argument that must appear): one per stage of a Mount.
# The stages that make the mapping, per mapper, as (tool, argument that must appear).
MAP_STAGES = {
    "fuse": [("qemu-storage-daemon", ""), ("losetup", "--find")],
    "krbd": [("rbd", "map")],
    "nbd": [("rbd", "map")],
}[TEST_MAPPER]
# The tool and argument that undo a mapping.
UNMAP_STAGE = {"fuse": ("losetup", "--detach"), "krbd": ("rbd", "unmap"), "nbd": ("rbd", "unmap")}[
    TEST_MAPPER
]
# A fresh volume is probed by reading its ends in the daemon: no tool runs until mkfs.
FAILURES = [*MAP_STAGES, ("mkfs.ext4", ""), ("mount", "")]


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
    assert client.create(name) == {"Err": ""}
    faults.arm("hang", "mkfs.ext4")
    started = time.monotonic()
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})
    elapsed = time.monotonic() - started
    assert f"did not finish within {OP_TIMEOUT} s" in reply["Err"]
    assert elapsed < OP_TIMEOUT + TEARDOWN  # answered at the budget; the roll-back runs on after it
    wait_until(
        lambda: oracle.pids_of_program_with("sh", str(faults.bin / "mkfs.ext4")) == []
        and leftovers(daemon, admin, "alpha", name) == [],
        20, "the hung mkfs killed and the roll-back done",
    )  # fmt: skip
    daemon.stop()


# Where the daemon is killed: (flag kind, tool, argument) reached by a Mount.
CRASH_POINTS = [
    *[("hang", tool, when) for tool, when in MAP_STAGES],  # each step of making the mapping
    ("after", *MAP_STAGES[-1]),  # mapped, not recorded
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
    wait_until(lambda: leftovers(second, admin, "alpha", name) == [], max(5, TEARDOWN), "clean-up")
    client = second.client("alpha")
    path = Path(mount(client, name, "c2"))
    assert oracle.fstype_at(path) == "ext4"
    (path / "after-crash").write_text("fine")
    if (kind, tool) == ("after", "mkfs.ext4"):  # a filesystem and our formatting mark
        assert "finishing an interrupted mkfs" in second.log()
    unmount(client, name, "c2")
    path = Path(mount(client, name, "c3"))
    assert (path / "after-crash").read_text() == "fine"
    unmount(client, name, "c3")
    assert leftovers(second, admin, "alpha", name) == []
    marks = admin.format_marks("alpha", name)
    assert "formatting" not in marks and "formatted" in marks
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


# -- issue 9 -----------------------------------------------------------------------------


def _write_blob(path: Path) -> str:
    data = os.urandom(1024 * 1024 + 7)
    with open(path / "blob", "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def test_an_unreadable_device_is_never_taken_for_blank(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path, faults: Faults
) -> None:
    daemon = start(cluster, daemon_factory, short_tmp / unique("b") / "state", faults)
    client, name = daemon.client("alpha"), unique("data")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    expected = _write_blob(Path(mount(client, name, "c")))
    unmount(client, name, "c")

    # blkid exits 2 ("nothing found") when it cannot read the device either.
    faults.arm("exit", "blkid", arg="2")
    err = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"]
    assert f"volume '{name}'" in err and "never formatted over" in err, err
    assert leftovers(daemon, admin, "alpha", name) == []

    # Even a device that reads as all zeros is not formatted: the image says we formatted it.
    faults.clear()
    with admin.zeroed_ends("alpha", name, 1024 * 1024):
        err = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"]
    assert "reads as blank; refusing to format it" in err, err
    assert "rados --pool alpha rmomapkey rbdplugin.format." in err and err.endswith(" formatted")
    assert leftovers(daemon, admin, "alpha", name) == []

    path = Path(mount(client, name, "c"))
    assert hashlib.sha256((path / "blob").read_bytes()).hexdigest() == expected
    unmount(client, name, "c")
    daemon.stop()


def test_a_slow_teardown_is_never_abandoned_nor_raced(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path, faults: Faults
) -> None:
    # A clean-up gets TEARDOWN s (4 s on the host) before the caller is answered, then goes
    # on; a Mount or Remove meanwhile waits for it as long again, and is refused after that.
    state = short_tmp / unique("t") / "state"
    daemon = start(cluster, daemon_factory, state, faults)
    client, name = daemon.client("alpha"), unique("slow")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    mount(client, name, "c")
    # Two slow stages: the clean-up takes 2.5 x TEARDOWN in all.
    faults.arm("slow", "umount", arg=str(TEARDOWN * 1.25))
    faults.arm("slow", *UNMAP_STAGE, arg=str(TEARDOWN * 1.25))
    started = time.monotonic()
    err = client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c"})["Err"]
    assert f"clean-up did not finish within {TEARDOWN} s; it goes on in the background" in err, err
    assert time.monotonic() - started < OP_TIMEOUT
    # A Remove waits for the clean-up, and is refused once its own share has run out,
    # saying why (no container uses the volume: it is the clean-up).
    asked = time.monotonic()
    err = client.remove(name)["Err"]
    assert "clean-up of its previous mount" in err and "refuses Removes" in err, err
    assert time.monotonic() - asked >= TEARDOWN - 0.5  # it waited before refusing
    # A Mount waits for the rest of it rather than racing it, and then mounts afresh.
    path = Path(mount(client, name, "d"))
    faults.clear()
    assert time.monotonic() - started >= 2.5 * TEARDOWN  # only once the clean-up ended
    time.sleep(2)  # nothing left over may touch the new mount's record or lease now
    table = json.loads((state / "alpha" / "mounts.json").read_text())
    assert table[name]["counts"] == {"d": 1}
    assert oracle.is_mounted(path)
    with admin.cluster.open_ioctx("alpha") as ioctx:
        lease = json.loads(ioctx.read(f"rbdplugin.lease.{name}", 65536))
    assert lease["writer"]["host"] == "host-a"
    unmount(client, name, "d")
    assert leftovers(daemon, admin, "alpha", name) == []
    daemon.stop()


@pytest.fixture
def slow_fuse(faults: Faults) -> Iterator[None]:
    """``faults.ctl/../slow``: a FUSE file whose reads take 12 s in its server."""
    with slow_fuse_file(faults.ctl.parent / "slow", seconds=12):
        yield


@pytest.mark.fuse_only  # its slow file is a qemu-storage-daemon FUSE export
def test_a_tool_stuck_in_the_kernel_fails_the_mount_at_its_deadline(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin, short_tmp: Path,
    faults: Faults, slow_fuse: None,
) -> None:  # fmt: skip
    daemon = start(cluster, daemon_factory, short_tmp / unique("d") / "state", faults)
    client, name = daemon.client("alpha"), unique("stuck")
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    faults.arm("stuck", "mkfs.ext4")
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        pending = pool.submit(client.call, "VolumeDriver.Mount", {"Name": name, "ID": "c"})
        time.sleep(OP_TIMEOUT + 1)  # past the deadline: mkfs was killed but sits in the kernel
        asked = time.monotonic()
        assert name in client.names()  # the daemon still answers at once
        assert time.monotonic() - asked < 2
        err = pending.result(timeout=30)["Err"]
        elapsed = time.monotonic() - started
    assert f"did not finish within {OP_TIMEOUT} s" in err, err  # the Mount's deadline (or mkfs's)
    # The deadline, the grace after SIGKILL, the roll-back; not the slow read's 12 s more.
    assert elapsed < OP_TIMEOUT + 8
    wait_until(
        lambda: "did not die after SIGKILL: it is stuck in the kernel (state D" in daemon.log(),
        20, "the stuck mkfs reported",
    )  # fmt: skip
    wait_until(lambda: leftovers(daemon, admin, "alpha", name) == [], 20, "the roll-back")
    faults.clear()
    path = Path(mount(client, name, "c2"))
    assert oracle.fstype_at(path) == "ext4"
    unmount(client, name, "c2")
    daemon.stop()
