"""krbd and rbd-nbd cannot run on this machine: their command building, their
device discovery (against fixture /sys and /proc trees) and their error messages
are tested here with a fake runner at the process boundary. The fuse mapper is
tested for real in tests/integration/test_mount.py."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from rbdplugin.errors import PermissionDenied, ProcessError, VolumeBusy
from rbdplugin.mapping import HostPaths, ImageRef, MappedDevice, MapperUnavailable, fuse
from rbdplugin.mapping.fuse import FuseMapper
from rbdplugin.mapping.krbd import KrbdMapper
from rbdplugin.mapping.nbd import NbdMapper
from rbdplugin.mapping.scan import loop_backing_files, mounts, processes
from rbdplugin.mapping.select import choose
from rbdplugin.process import Command, Completed

IMAGE = ImageRef("tenant", "", "vol1", "tenant", Path("/etc/ceph/k"), Path("/etc/ceph/ceph.conf"))
NS_IMAGE = ImageRef("tenant", "team", "vol1", "tenant", Path("/k"), Path("/c"))
LOCKABLE = ImageRef("tenant", "", "vol1", "tenant", Path("/k"), Path("/c"), exclusive_lock=True)


class FakeRunner:
    """Records commands; answers from a script of (returncode, stdout, stderr)."""

    def __init__(self, *answers: tuple[int, str, str], on_call: object = None) -> None:
        self.answers = list(answers)
        self.calls: list[list[str]] = []
        self.on_call = on_call

    async def __call__(self, command: Command) -> Completed:
        self.calls.append(list(command.argv))
        if callable(self.on_call):
            self.on_call(command)
        code, out, err = self.answers.pop(0) if self.answers else (0, "", "")
        done = Completed(tuple(command.argv), code, out, err)
        if command.check and code != 0:
            raise ProcessError(f"{command.argv[0]} failed", returncode=code, output=err + out)
        return done


def write(root: Path, files: dict[str, str | bytes]) -> HostPaths:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return HostPaths(sys=root / "sys", proc=root / "proc", dev=root / "dev")


def rbd_device(
    n: int, pool: str, name: str, ns: str = "", snap: str = "-"
) -> dict[str, str | bytes]:
    base = f"sys/bus/rbd/devices/{n}"
    return {
        f"{base}/pool": pool + "\n",
        f"{base}/pool_ns": ns + "\n",
        f"{base}/name": name + "\n",
        f"{base}/current_snap": snap + "\n",
        f"dev/rbd{n}": "",
    }  # fmt: skip  (devtmpfs makes the node)


# -- krbd ------------------------------------------------------------------------------


def test_krbd_map_command() -> None:
    mapper = KrbdMapper(FakeRunner(), HostPaths(), 10)
    assert mapper.map_command(IMAGE) == [
        "rbd", "device", "map", "--id", "tenant", "--keyring", "/etc/ceph/k",
        "--conf", "/etc/ceph/ceph.conf", "--pool", "tenant", "--image", "vol1",
        "--options", "noudev,osd_request_timeout=60,noshare",
    ]  # fmt: skip
    argv = mapper.map_command(NS_IMAGE, read_only=True)
    assert argv[argv.index("--namespace") + 1] == "team"
    assert argv[-1] == "--read-only"


def options(argv: list[str]) -> list[str]:
    return argv[argv.index("--options") + 1].split(",")


def test_krbd_read_write_maps_are_exclusive_and_unshared() -> None:
    mapper = KrbdMapper(FakeRunner(), HostPaths(), 10)
    # exclusive only where the image has the exclusive-lock feature (the kernel refuses it otherwise)
    assert options(mapper.map_command(LOCKABLE)) == [
        "noudev", "osd_request_timeout=60", "noshare", "exclusive"
    ]  # fmt: skip
    assert options(mapper.map_command(IMAGE)) == ["noudev", "osd_request_timeout=60", "noshare"]
    for image in (IMAGE, LOCKABLE):
        read_only = mapper.map_command(image, read_only=True)
        assert options(read_only) == ["noudev", "osd_request_timeout=60"]
        assert read_only[-1] == "--read-only"


def test_krbd_osd_request_timeout_comes_from_the_constructor() -> None:
    argv = KrbdMapper(FakeRunner(), HostPaths(), 10, osd_request_timeout=25).map_command(IMAGE)
    assert "osd_request_timeout=25" in options(argv)
    # 0 is the kernel's own "wait forever": leave the option out (old kernels lack it)
    argv = KrbdMapper(FakeRunner(), HostPaths(), 10, osd_request_timeout=0).map_command(IMAGE)
    assert not [o for o in options(argv) if o.startswith("osd_request_timeout")]
    with pytest.raises(ValueError, match="osd_request_timeout"):
        KrbdMapper(FakeRunner(), HostPaths(), 10, osd_request_timeout=-1)


def test_krbd_finds_its_device_in_sysfs(tmp_path: Path) -> None:
    host = write(tmp_path, {**rbd_device(0, "other", "vol1"), **rbd_device(3, "tenant", "vol1", snap="s1"),
                            **rbd_device(7, "tenant", "vol1"), **rbd_device(9, "tenant", "vol1", ns="team")})  # fmt: skip
    mapper = KrbdMapper(FakeRunner(), host, 10)
    found = asyncio.run(mapper.find(IMAGE))
    assert found == MappedDevice("krbd", "tenant/vol1", "/dev/rbd7", {"id": 7})
    assert asyncio.run(mapper.find(NS_IMAGE)) == MappedDevice(
        "krbd", "tenant/team/vol1", "/dev/rbd9", {"id": 9}
    )
    missing = ImageRef("tenant", "", "nope", "tenant", Path("/k"), Path("/c"))
    assert asyncio.run(mapper.find(missing)) is None


def test_krbd_map_then_discover(tmp_path: Path) -> None:
    host = write(tmp_path, {"sys/bus/rbd/add": ""})

    def kernel_maps(command: Command) -> None:  # what the kernel does on a successful map
        write(tmp_path, rbd_device(2, "tenant", "vol1"))

    runner = FakeRunner((0, "/dev/rbd2\n", ""), on_call=kernel_maps)
    mapped = asyncio.run(KrbdMapper(runner, host, 10).map(IMAGE))
    assert mapped.device == "/dev/rbd2"
    runner2 = FakeRunner()
    asyncio.run(KrbdMapper(runner2, host, 10).unmap(mapped))
    assert runner2.calls == [["rbd", "device", "unmap", "--options", "noudev", "/dev/rbd2"]]


def test_krbd_unmap_of_a_gone_device_is_a_no_op(tmp_path: Path) -> None:
    runner = FakeRunner()
    host = write(tmp_path, {"sys/bus/rbd/add": ""})
    asyncio.run(
        KrbdMapper(runner, host, 10).unmap(
            MappedDevice("krbd", "tenant/vol1", "/dev/rbd4", {"id": 4})
        )
    )
    assert runner.calls == []


@pytest.mark.parametrize(
    ("now", "shown"),
    [
        (rbd_device(0, "tenant", "vol2"), "tenant/vol2"),
        (rbd_device(0, "tenant", "vol10"), "tenant/vol10"),
        (rbd_device(0, "other", "vol1"), "other/vol1"),
        (rbd_device(0, "tenant", "vol1", ns="team"), "tenant/team/vol1"),
        (rbd_device(0, "tenant", "vol1", snap="s1"), "tenant/vol1@s1"),
    ],
)
def test_krbd_never_unmaps_a_device_number_reused_by_another_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, now: dict[str, str | bytes], shown: str
) -> None:
    host = write(tmp_path, {"sys/bus/rbd/add": "", **now})
    stale = MappedDevice("krbd", "tenant/vol1", "/dev/rbd0", {"id": 0})
    runner = FakeRunner()
    asyncio.run(KrbdMapper(runner, host, 10).unmap(stale))
    assert runner.calls == []
    assert (
        f"not unmapping /dev/rbd0: /dev/rbd0 now maps {shown}, not tenant/vol1; treating"
        in caplog.text
    )


def test_krbd_unmaps_a_device_that_still_maps_the_same_image(tmp_path: Path) -> None:
    host = write(
        tmp_path, {**rbd_device(5, "tenant", "vol1", ns="team"), **rbd_device(6, "tenant", "vol1")}
    )
    for record in (MappedDevice("krbd", "tenant/team/vol1", "/dev/rbd5", {"id": 5}),
                   MappedDevice("krbd", "tenant/vol1", "/dev/rbd6", {"id": 6})):  # fmt: skip
        runner = FakeRunner()
        asyncio.run(KrbdMapper(runner, host, 10).unmap(record))
        assert runner.calls == [["rbd", "device", "unmap", "--options", "noudev", record.device]]


def test_krbd_broken_says_why(tmp_path: Path) -> None:
    host = write(tmp_path, {**rbd_device(1, "tenant", "vol1"), **rbd_device(2, "tenant", "vol2")})
    mapper = KrbdMapper(FakeRunner(), host, 10)
    healthy = MappedDevice("krbd", "tenant/vol1", "/dev/rbd1", {"id": 1})
    assert asyncio.run(mapper.broken(healthy)) is None
    reused = MappedDevice("krbd", "tenant/vol1", "/dev/rbd2", {"id": 2})
    assert asyncio.run(mapper.broken(reused)) == "/dev/rbd2 now maps tenant/vol2, not tenant/vol1"
    gone = MappedDevice("krbd", "tenant/vol1", "/dev/rbd3", {"id": 3})
    assert asyncio.run(mapper.broken(gone)) == "its device /dev/rbd3 is gone"
    partial = MappedDevice("krbd", "tenant/vol1", "", {})
    assert "no device" in str(asyncio.run(mapper.broken(partial)))


FEATURE_MISMATCH = (
    "rbd: sysfs write failed\n"
    "RBD image feature set mismatch. You can disable features unsupported by the kernel with "
    '"rbd feature disable tenant/vol1 object-map fast-diff deep-flatten".\n'
    'In some cases useful info is found in syslog - try "dmesg | tail".\n'
    "rbd: map failed: (6) No such device or address\n"
)


@pytest.mark.parametrize(
    ("stderr", "error", "message"),
    [
        ("modprobe: FATAL: Module rbd not found in directory /lib/modules/6.1.0\n"
         "rbd: failed to load rbd kernel module (1)\nrbd: map failed: (2) No such file or directory\n",
         MapperUnavailable, r"this kernel has no rbd module; set \[daemon\] mapper"),
        (FEATURE_MISMATCH, MapperUnavailable,
         r"disable them with `rbd feature disable tenant/vol1 object-map fast-diff deep-flatten`"),
        ("rbd: map failed: (1) Operation not permitted\n", PermissionDenied, r"blocklisted"),
        ("rbd: map failed: (16) Device or resource busy\n", VolumeBusy, r"held exclusively elsewhere"),
        ("rbd: map failed: (22) Invalid argument\n", ProcessError, r"rbd device map tenant/vol1 failed: rbd: map failed: \(22\)"),
        ("rbd: sysfs write failed\nIn some cases useful info is found in syslog - try \"dmesg | tail\".\n"
         "rbd: map failed: (22) Invalid argument\n", MapperUnavailable,
         r"the kernel refused to map tenant/vol1 with options noudev,osd_request_timeout=60,noshare: "
         r"either it does not know one of them .* or the image lacks the exclusive-lock feature.*dmesg"),
        ("rbd: sysfs write failed\nIn some cases useful info is found in syslog - try \"dmesg | tail\".\n"
         "rbd: map failed: (30) Read-only file system\n", VolumeBusy,
         r"another client holds the exclusive lock of tenant/vol1 and will not release it .*rbd status tenant/vol1"),
        ("rbd: unknown map option 'osd_request_timeout'\nrbd: couldn't parse map options\n",
         MapperUnavailable, r"this rbd tool does not know the map option 'osd_request_timeout'; upgrade ceph-common"),
    ],
)  # fmt: skip
def test_krbd_map_errors_are_actionable(
    tmp_path: Path, stderr: str, error: type[Exception], message: str
) -> None:
    host = write(tmp_path, {"sys/bus/rbd/add": ""})
    runner = FakeRunner((2, "", stderr))
    with pytest.raises(error, match=message) as err:
        asyncio.run(KrbdMapper(runner, host, 10).map(IMAGE))
    assert "exit status 2" not in str(err.value)


# -- nbd -------------------------------------------------------------------------------


def nbd_fixture(tmp_path: Path) -> HostPaths:
    argv = b"rbd-nbd\0--device\0/dev/nbd1\0map\0tenant/vol1\0--id\0tenant\0"
    other = b"rbd-nbd\0map\0tenant/other\0"
    return write(tmp_path, {"sys/block/nbd0/pid": "4242\n", "proc/4242/cmdline": other,
                            "sys/block/nbd1/pid": "4343\n", "proc/4343/cmdline": argv,
                            "sys/block/nbd2/size": "0\n", "sys/module/nbd/version": ""})  # fmt: skip


def test_nbd_command_and_discovery(tmp_path: Path) -> None:
    host = nbd_fixture(tmp_path)
    mapper = NbdMapper(FakeRunner(), host, 10)
    assert mapper.map_command(NS_IMAGE)[-1] == "tenant/team/vol1"
    assert mapper.map_command(IMAGE)[:5] == ["rbd", "device", "map", "--device-type", "nbd"]
    found = asyncio.run(mapper.find(IMAGE))
    assert found == MappedDevice("nbd", "tenant/vol1", "/dev/nbd1", {"pid": 4343})
    runner = FakeRunner()
    asyncio.run(NbdMapper(runner, host, 10).unmap(found))
    assert runner.calls == [["rbd", "device", "unmap", "--device-type", "nbd", "/dev/nbd1"]]


def test_nbd_without_free_devices(tmp_path: Path) -> None:
    runner = FakeRunner((22, "", "rbd-nbd: failed to find unused device\n"))
    with pytest.raises(MapperUnavailable, match=r"no free nbd device .* modprobe nbd nbds_max"):
        asyncio.run(NbdMapper(runner, nbd_fixture(tmp_path), 10).map(IMAGE))


def test_nbd_read_write_maps_are_exclusive() -> None:
    mapper = NbdMapper(FakeRunner(), HostPaths(), 10)
    assert mapper.map_command(LOCKABLE)[-2:] == ["tenant/vol1", "--exclusive"]
    assert "--exclusive" not in mapper.map_command(IMAGE)  # no exclusive-lock feature
    read_only = mapper.map_command(LOCKABLE, read_only=True)
    assert read_only[-1] == "--read-only" and "--exclusive" not in read_only


def test_nbd_exclusive_lock_refused() -> None:
    held = "rbd-nbd: failed to acquire exclusive lock: (16) Device or resource busy\n"
    with pytest.raises(VolumeBusy, match=r"tenant/vol1: another client holds its exclusive lock"):
        asyncio.run(NbdMapper(FakeRunner((22, "", held)), HostPaths(), 10).map(LOCKABLE))
    missing = "rbd-nbd: failed to acquire exclusive lock: (22) Invalid argument\n"
    with pytest.raises(MapperUnavailable, match=r"rbd feature enable tenant/vol1 exclusive-lock"):
        asyncio.run(NbdMapper(FakeRunner((22, "", missing)), HostPaths(), 10).map(LOCKABLE))


RECORD_NBD1 = MappedDevice("nbd", "tenant/vol1", "/dev/nbd1", {"pid": 4343})


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (b"rbd-nbd\0map\0tenant/vol2\0--id\0tenant\0", "tenant/vol2"),
        (b"/usr/bin/rbd-nbd\0map\0tenant/vol10\0", "tenant/vol10"),
        (b"rbd-nbd\0map\0tenant/team/vol1\0", "tenant/team/vol1"),
        (b"rbd-nbd\0map\0tenant/vol1@s1\0", "tenant/vol1@s1"),
        (b"rbd-nbd\0map\0tenant/vol1\0--snap-id\x004\0", "tenant/vol1 --snap-id 4"),
    ],
)
def test_nbd_never_unmaps_a_device_number_reused_by_another_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, argv: bytes, shown: str
) -> None:
    host = write(tmp_path, {"sys/block/nbd1/pid": "5555\n", "proc/5555/cmdline": argv})
    runner = FakeRunner()
    asyncio.run(NbdMapper(runner, host, 10).unmap(RECORD_NBD1))
    assert runner.calls == []
    assert (
        f"not unmapping /dev/nbd1: /dev/nbd1 now serves {shown} (rbd-nbd pid 5555), not tenant/vol1"
        in caplog.text
    )


@pytest.mark.parametrize(
    "files",
    [
        {"sys/block/nbd1/pid": "4343\n"},  # rbd-nbd died, the kernel still names it
        {"sys/block/nbd1/pid": "4343\n", "proc/4343/cmdline": b""},  # a zombie
        {"sys/block/nbd1/pid": "4343\n", "proc/4343/cmdline": b"bash\0tenant/vol1\0"},  # pid reused
    ],
)
def test_nbd_does_not_unmap_what_it_cannot_confirm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, files: dict[str, str | bytes]
) -> None:
    runner = FakeRunner()
    asyncio.run(NbdMapper(runner, write(tmp_path, files), 10).unmap(RECORD_NBD1))
    assert runner.calls == []
    assert (
        "not unmapping /dev/nbd1: the rbd-nbd process behind /dev/nbd1 (pid 4343) is not running"
        in caplog.text
    )


def test_nbd_unmaps_when_a_new_rbd_nbd_serves_the_same_image(tmp_path: Path) -> None:
    argv = b"/usr/bin/rbd-nbd\0--id\0tenant\0attach\0--device\0/dev/nbd1\0tenant/vol1\0"
    host = write(tmp_path, {"sys/block/nbd1/pid": "6000\n", "proc/6000/cmdline": argv})
    runner = FakeRunner()
    asyncio.run(NbdMapper(runner, host, 10).unmap(RECORD_NBD1))
    assert runner.calls == [["rbd", "device", "unmap", "--device-type", "nbd", "/dev/nbd1"]]


def test_nbd_broken_says_why(tmp_path: Path) -> None:
    host = nbd_fixture(tmp_path)
    mapper = NbdMapper(FakeRunner(), host, 10)
    assert asyncio.run(mapper.broken(RECORD_NBD1)) is None
    reused = MappedDevice("nbd", "tenant/vol1", "/dev/nbd0", {"pid": 4242})
    assert asyncio.run(mapper.broken(reused)) == (
        "/dev/nbd0 now serves tenant/other (rbd-nbd pid 4242), not tenant/vol1"
    )
    disconnected = MappedDevice("nbd", "tenant/vol1", "/dev/nbd2", {"pid": 1})
    assert asyncio.run(mapper.broken(disconnected)) == (
        "/dev/nbd2 is no longer connected to rbd-nbd (rbd-nbd exited or the device was unmapped)"
    )
    (host.proc / "4343" / "cmdline").unlink()
    assert asyncio.run(mapper.broken(RECORD_NBD1)) == (
        "the rbd-nbd process behind /dev/nbd1 (pid 4343) is not running"
    )


def test_nbd_find_ignores_other_programs_naming_the_image(tmp_path: Path) -> None:
    host = write(tmp_path, {"sys/block/nbd0/pid": "70\n", "proc/70/cmdline": b"sh\0-c\0tenant/vol1\0",
                            "sys/block/nbd3/pid": "71\n", "proc/71/cmdline": b"rbd-nbd\0map\0tenant/vol1\0"})  # fmt: skip
    found = asyncio.run(NbdMapper(FakeRunner(), host, 10).find(IMAGE))
    assert found == MappedDevice("nbd", "tenant/vol1", "/dev/nbd3", {"pid": 71})


# -- fuse command, scanning helpers ------------------------------------------------------


def test_fuse_export_command_never_carries_a_key(tmp_path: Path) -> None:
    mapper = FuseMapper(FakeRunner(), HostPaths(), tmp_path / "exports", 10)
    export = mapper.export_path(NS_IMAGE)
    assert export == tmp_path / "exports" / "tenant" / "team" / "vol1"
    assert mapper.export_path(IMAGE) == tmp_path / "exports" / "tenant" / "-" / "vol1"
    argv = mapper.export_command(NS_IMAGE, export, read_only=True)
    blockdev = argv[argv.index("--blockdev") + 1]
    assert "namespace=team" in blockdev and "user=tenant" in blockdev and "read-only=on" in blockdev
    assert "key" not in " ".join(argv)
    assert argv[-1].endswith(f"mountpoint={export},writable=off")


def test_mountinfo_loops_and_processes(tmp_path: Path) -> None:
    mountinfo = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "42 27 0:39 / /srv/exp\\040dir/vol rw,nosuid - fuse /dev/fuse rw,user_id=0\n"
        "43 27 7:3 / /mnt/v rw,relatime shared:9 - ext4 /dev/loop3 rw\n"
    )
    host = write(tmp_path, {
        "proc/self/mountinfo": mountinfo,
        "sys/block/loop3/loop/backing_file": "/srv/exp dir/vol\n",
        "sys/block/loop4/size": "0\n",
        "proc/77/cmdline": b"/usr/bin/qemu-storage-daemon\0--export\0type=fuse,mountpoint=/srv/exp dir/vol\0",
        "proc/78/cmdline": b"/bin/sh\0qemu-storage-daemon\0mountpoint=/srv/exp dir/vol\0",
        "proc/self/status": "x",
    })  # fmt: skip
    assert mounts(host)["/srv/exp dir/vol"] == ("/dev/fuse", "fuse", "rw,user_id=0")
    assert mounts(host)["/mnt/v"][0] == "/dev/loop3"
    assert loop_backing_files(host) == {"/dev/loop3": "/srv/exp dir/vol"}
    assert processes(
        host, "qemu-storage-daemon", lambda arg: "mountpoint=/srv/exp dir/vol" in arg.split(",")
    ) == [77]


# -- choosing ------------------------------------------------------------------------------


def test_auto_prefers_krbd_then_nbd_then_fuse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    krbd = write(tmp_path / "a", {"sys/bus/rbd/add": "", "dev/fuse": "", "dev/loop-control": ""})
    assert choose("auto", krbd) == "krbd"
    fuse_only = write(tmp_path / "b", {"dev/fuse": "", "dev/loop-control": "", "sys/block/x": ""})
    assert choose("auto", fuse_only) == "fuse"
    assert "mapper auto: using fuse (not krbd: the kernel has no rbd module" in caplog.text


def test_nothing_available_says_why(tmp_path: Path) -> None:
    empty = write(tmp_path, {"sys/x": "", "dev/x": ""})
    with pytest.raises(
        MapperUnavailable,
        match=r"no mapper works on this host: krbd: .*; nbd: .*; fuse: .*/dev/fuse is missing",
    ):
        choose("auto", empty)
    with pytest.raises(
        MapperUnavailable,
        match=r"mapper krbd cannot work on this host: the kernel has no rbd module",
    ):
        choose("krbd", empty)


def test_krbd_map_returns_the_device_it_made_not_another_clients(tmp_path: Path) -> None:
    # On one kernel another client (a read-only user, another daemon) may map the image too.
    host = write(tmp_path, {"sys/bus/rbd/add": "", **rbd_device(0, "tenant", "vol1")})

    def kernel_maps(command: Command) -> None:
        write(tmp_path, rbd_device(1, "tenant", "vol1"))

    runner = FakeRunner((0, "/dev/rbd1\n", ""), on_call=kernel_maps)
    mapped = asyncio.run(KrbdMapper(runner, host, 10).map(IMAGE, read_only=True))
    assert mapped.device == "/dev/rbd1" and mapped.details == {"id": 1}


def test_fuse_unmap_is_done_once_its_loop_device_shows_another_file(tmp_path: Path) -> None:
    # losetup --detach returns before the kernel lets the loop device go; once it has, a
    # Mount running beside may attach its own export to the same, now free, number at
    # once. That device is someone else's: our detach is over, not still under way.
    export = str(tmp_path / "exports" / "tenant" / "-" / "vol1")
    backing = "sys/block/loop5/loop/backing_file"
    host = write(tmp_path, {backing: export + "\n", "proc/self/mountinfo": ""})

    def detached_and_reused(command: Command) -> None:
        if command.argv[:2] == ["losetup", "--detach"]:
            (tmp_path / backing).write_text(str(tmp_path / "exports" / "tenant" / "-" / "vol2"))

    runner = FakeRunner(on_call=detached_and_reused)
    mapper = FuseMapper(runner, host, tmp_path / "exports", timeout=2)
    mapped = MappedDevice("fuse", "tenant/vol1", "/dev/loop5", {"pid": 0, "export": export})
    started = asyncio.run(_timed(mapper.unmap(mapped)))
    assert started < 1, f"unmap waited {started:.1f} s for a loop device that is not ours any more"
    assert runner.calls == [["losetup", "--detach", "/dev/loop5"]]
    assert loop_backing_files(host) == {"/dev/loop5": str(tmp_path / "exports/tenant/-/vol2")}


async def _timed(work: Coroutine[Any, Any, None]) -> float:
    started = time.monotonic()
    await work
    return time.monotonic() - started


def test_fuse_unmap_stops_its_recorded_export_without_reading_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hundreds of processes on a host, read on the event loop: an Unmount stops the
    # export process it recorded, and scans them all only when it recorded none (or the
    # recorded pid now runs something else).
    export = str(tmp_path / "exports" / "vol1")
    scans: list[HostPaths] = []

    def counted(host: HostPaths, program: str, match: Any) -> list[int]:
        scans.append(host)
        return processes(host, program, match)

    monkeypatch.setattr(fuse, "processes", counted)
    # Still mounted after its recorded process ended: another process serves it too.
    served = f"60 25 0:52 / {export} rw,nosuid,nodev - fuse /dev/fuse rw\n"
    for recorded, mountinfo, expected_scans in ((True, "", 0), (False, "", 1), (True, served, 1)):
        child = subprocess.Popen(["sleep", "60"])  # the "export process": a real one to stop
        others = {f"proc/{n}/cmdline": f"sleep\0{n}\0" for n in range(100000, 100008)}
        argv = f"qemu-storage-daemon\0--export\0type=fuse,id=e,mountpoint={export}\0"
        host = write(tmp_path, {**others, f"proc/{child.pid}/cmdline": argv,
                                "proc/self/mountinfo": mountinfo})  # fmt: skip
        scans.clear()
        mapped = MappedDevice("fuse", "tenant/vol1", "", {
            "pid": child.pid if recorded else 0, "export": export})  # fmt: skip
        asyncio.run(FuseMapper(FakeRunner(), host, tmp_path, timeout=2).unmap(mapped))
        child.wait(timeout=5)  # a sleep of 60 s ended: stopped, by its recorded pid or the scan
        assert not Path(f"/proc/{child.pid}").exists()
        assert len(scans) == expected_scans


def test_fuse_unmap_reads_only_its_recorded_loop_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hundreds of loop devices on a host: an Unmount reads the one it recorded, and scans
    # them all only for a mapping whose device went unrecorded (cut short by a crash).
    export = str(tmp_path / "vol1")
    files = {f"sys/block/loop{n}/loop/backing_file": f"/other/{n}\n" for n in range(8)}
    files["sys/block/loop5/loop/backing_file"] = export + "\n"
    host = write(tmp_path, {**files, "proc/self/mountinfo": ""})
    scans: list[HostPaths] = []

    def counted(scanned: HostPaths) -> dict[str, str]:
        scans.append(scanned)
        return loop_backing_files(scanned)

    monkeypatch.setattr(fuse, "loop_backing_files", counted)

    def detached(command: Command) -> None:
        (tmp_path / "sys/block/loop5/loop/backing_file").unlink()

    for device, expected_scans in (("/dev/loop5", 0), ("", 1)):
        (tmp_path / "sys/block/loop5/loop/backing_file").write_text(export + "\n")
        scans.clear()
        runner = FakeRunner(on_call=detached)
        mapped = MappedDevice("fuse", "tenant/vol1", device, {"pid": 0, "export": export})
        asyncio.run(FuseMapper(runner, host, tmp_path, timeout=2).unmap(mapped))
        assert runner.calls == [["losetup", "--detach", "/dev/loop5"]]
        assert len(scans) == expected_scans


# -- nbd: the device rbd-nbd printed is ours only once an rbd-nbd of ours serves it ------

SERVER = b"/usr/bin/rbd-nbd\0--id\0tenant\0map\0tenant/vol1\0--exclusive\0"
INIT: dict[str, str | bytes] = {"proc/1/cmdline": b"/sbin/init\0"}


def test_nbd_maps_again_when_its_device_is_held_by_a_dead_mapping(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nbd0's rbd-nbd (pid 4000) died; a filesystem still holds nbd0 open, so the kernel
    # keeps its pid file. rbd-nbd was let set nbd0 up, printed it, and its daemon exited
    # (the device was taken). The second run gets nbd1, served by pid 5001.
    host = write(tmp_path, {"sys/block/nbd0/pid": "4000\n", "sys/block/nbd1/size": "0\n",
                            "dev/nbd0": "", "dev/nbd1": "", **INIT})  # fmt: skip

    def second_run_gets_nbd1(command: Command) -> None:
        if len(runner.calls) == 2:
            write(tmp_path, {"sys/block/nbd1/pid": "5001\n", "proc/5001/cmdline": SERVER})

    runner = FakeRunner((0, "/dev/nbd0\n", ""), (0, "/dev/nbd1\n", ""),
                        on_call=second_run_gets_nbd1)  # fmt: skip
    with caplog.at_level("WARNING"):
        mapped = asyncio.run(NbdMapper(runner, host, 10).map(IMAGE))
    assert mapped == MappedDevice("nbd", "tenant/vol1", "/dev/nbd1", {"pid": 5001})
    assert [call[:3] for call in runner.calls] == [["rbd", "device", "map"]] * 2
    assert (
        "rbd-nbd chose /dev/nbd0, which a mapping whose rbd-nbd (pid 4000) is gone" in caplog.text
    )


def test_nbd_waits_for_its_daemon_to_start_serving_the_printed_device(tmp_path: Path) -> None:
    # rbd-nbd printed nbd1 and exited; its daemon (pid 5002) has not reached the kernel yet.
    host = write(tmp_path, {"sys/block/nbd1/size": "0\n", "dev/nbd1": ""})

    def daemon_starts_late(command: Command) -> None:
        write(tmp_path, {"proc/5002/cmdline": SERVER})
        late: dict[str, str | bytes] = {"sys/block/nbd1/pid": "5002\n"}
        asyncio.get_running_loop().call_later(0.3, write, tmp_path, late)

    runner = FakeRunner((0, "/dev/nbd1\n", ""), on_call=daemon_starts_late)
    mapped = asyncio.run(NbdMapper(runner, host, 10).map(IMAGE))
    assert mapped == MappedDevice("nbd", "tenant/vol1", "/dev/nbd1", {"pid": 5002})
    assert len(runner.calls) == 1


def test_nbd_gives_up_on_a_held_device_with_what_to_do(tmp_path: Path) -> None:
    host = write(tmp_path, {"sys/block/nbd0/pid": "4000\n", "dev/nbd0": "", **INIT})
    runner = FakeRunner(*[(0, "/dev/nbd0\n", "")] * 3)
    with pytest.raises(ProcessError) as failed:
        asyncio.run(NbdMapper(runner, host, 10).map(IMAGE))
    assert len(runner.calls) == 3
    assert str(failed.value) == (
        "rbd-nbd mapped tenant/vol1 at /dev/nbd0, but no rbd-nbd serves it there after 3 "
        "attempt(s): /dev/nbd0 is still held open by a mapping whose rbd-nbd (pid 4000) is "
        "gone; unmount what uses it (findmnt /dev/nbd0) and unmap it "
        "(rbd device unmap -t nbd /dev/nbd0)"
    )


def test_nbd_daemon_that_exits_on_a_free_device_is_not_retried(tmp_path: Path) -> None:
    host = write(tmp_path, {"sys/block/nbd1/size": "0\n", "dev/nbd1": "", **INIT})
    runner = FakeRunner((0, "/dev/nbd1\n", ""))
    with pytest.raises(
        ProcessError, match=r"at /dev/nbd1, but no rbd-nbd serves it there \(its daemon exited"
    ):
        asyncio.run(NbdMapper(runner, host, 10).map(IMAGE))
    assert len(runner.calls) == 1
