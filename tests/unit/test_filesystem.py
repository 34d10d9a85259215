"""Probing and mkfs command lines, with a fake runner at the process boundary and a
fixture sysfs tree for device sizes. Blank must be proven: the device's signature
regions (first and last MiB) must read as zeros; only a device with data there is
shown to blkid, and data blkid does not know is never blank."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from rbdplugin import filesystem
from rbdplugin.errors import DeadlineExceeded, ProcessError
from rbdplugin.filesystem import FAST_MKFS, UNRECOGNISED, Filesystems, merge_extended
from rbdplugin.mapping import HostPaths
from tests.unit.test_mappers import FakeRunner

MiB = 1024 * 1024


def _fs(tmp_path: Path, runner: FakeRunner, size: int = 64 * MiB) -> Filesystems:
    """Filesystems whose device ``tmp_path/loop7`` is a sparse file of ``size`` bytes (a
    block device reads the same way), with sysfs saying ``size``."""
    sizes = tmp_path / "sys" / "class" / "block" / "loop7"
    sizes.mkdir(parents=True)
    (sizes / "size").write_text(f"{size // 512}\n")
    with (tmp_path / "loop7").open("wb") as device:
        device.truncate(size)
    return Filesystems(runner, HostPaths(sys=tmp_path / "sys"), timeout=5)


def _write(device: Path, offset: int, data: bytes) -> None:
    with device.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_blank_when_both_ends_read_zeros_without_asking_blkid(tmp_path: Path) -> None:
    runner = FakeRunner()
    fs = _fs(tmp_path, runner)
    # Data between the signature regions does not count: only the ends carry signatures.
    _write(tmp_path / "loop7", 32 * MiB, b"middle")
    assert asyncio.run(fs.probe(str(tmp_path / "loop7"))) is None
    assert runner.calls == []


@pytest.mark.parametrize("offset", [1024, 64 * MiB - 512], ids=["head", "tail"])
def test_data_blkid_does_not_know_is_never_blank(tmp_path: Path, offset: int) -> None:
    runner = FakeRunner((2, "", ""))
    fs = _fs(tmp_path, runner)
    _write(tmp_path / "loop7", offset, b"\x01")
    found = asyncio.run(fs.probe(str(tmp_path / "loop7")))
    assert found is not None and found.type == UNRECOGNISED and found.mountable_as is None
    assert [call[0] for call in runner.calls] == ["blkid"]


def test_a_device_that_cannot_be_read_is_an_error_not_blank(tmp_path: Path) -> None:
    fs = _fs(tmp_path, FakeRunner())
    device = tmp_path / "loop7"
    device.unlink()
    device.mkdir()  # root reads any file; a directory cannot be read
    with pytest.raises(ProcessError, match=r"cannot read .*loop7 to prove it blank"):
        asyncio.run(fs.probe(str(device)))


def test_a_device_shorter_than_sysfs_says_is_an_error(tmp_path: Path) -> None:
    fs = _fs(tmp_path, FakeRunner())
    with (tmp_path / "loop7").open("r+b") as device:
        device.truncate(MiB)
    with pytest.raises(ProcessError, match=r"prove it blank.*read 0 of"):
        asyncio.run(fs.probe(str(tmp_path / "loop7")))


def test_a_small_device_is_read_once_whole(tmp_path: Path) -> None:
    fs = _fs(tmp_path, FakeRunner(), size=MiB // 2)
    assert asyncio.run(fs.probe(str(tmp_path / "loop7"))) is None
    _write(tmp_path / "loop7", MiB // 2 - 1, b"\x01")
    assert asyncio.run(fs.probe(str(tmp_path / "loop7"))) is not None


def test_a_read_that_hangs_fails_within_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The device read is the I/O boundary: a hung device blocks it until released.
    released = threading.Event()

    def hung_read(device: str, regions: list[tuple[int, int]]) -> bool:
        released.wait(1)  # asyncio.run waits for this thread at its end
        raise OSError(errno.EIO, "the mapping was taken down")

    monkeypatch.setattr(filesystem, "_reads_zeros", hung_read)
    runner = FakeRunner()
    fs = _fs(tmp_path, runner)
    fs.timeout = 0.3
    try:
        with pytest.raises(DeadlineExceeded, match="did not finish within"):
            asyncio.run(fs.probe(str(tmp_path / "loop7")))
        assert runner.calls == []  # never shown to blkid, never formatted
    finally:
        released.set()


def test_data_at_either_end_is_shown_to_blkid(tmp_path: Path) -> None:
    runner = FakeRunner((0, "DEVNAME=/dev/loop7\nTYPE=xfs\nUUID=u\n", ""))
    fs = _fs(tmp_path, runner)
    _write(tmp_path / "loop7", 0, b"XFSB")
    found = asyncio.run(fs.probe(str(tmp_path / "loop7")))
    assert found is not None and found.mountable_as == "xfs"
    assert runner.calls[0][:2] == ["blkid", "--probe"]


def test_blkid_failing_on_data_is_an_error_not_blank(tmp_path: Path) -> None:
    runner = FakeRunner((4, "", "blkid: error\n"))
    fs = _fs(tmp_path, runner)
    _write(tmp_path / "loop7", 1080, b"\x53\xef")  # an ext4 magic
    with pytest.raises(ProcessError, match="blkid could not probe"):
        asyncio.run(fs.probe(str(tmp_path / "loop7")))


def test_user_extended_options_join_ours_in_one_dash_e() -> None:
    # mke2fs keeps only the last -E: two would silently drop one set.
    fast = FAST_MKFS["ext4"]
    merged = merge_extended(fast, ("-m", "0", "-E", "root_owner=7:7", "-L", "x"))
    assert merged.count("-E") == 1
    assert merged[-2:] == ["-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1,root_owner=7:7"]
    assert merge_extended(fast, ("-Estride=4",))[-1].endswith(",stride=4")
    assert merge_extended((), ("-Estride=4",)) == ["-Estride=4"]
    assert merge_extended(FAST_MKFS["xfs"], ("-L", "x")) == ["-K", "-L", "x"]


def test_mkfs_command_keeps_the_device_last(tmp_path: Path) -> None:
    runner = FakeRunner()
    fs = _fs(tmp_path, runner)
    asyncio.run(fs.mkfs("/dev/loop7", "ext4", fast=True, extra=("-E", "root_owner=1:1")))
    assert runner.calls[0][0] == "mkfs.ext4" and runner.calls[0][-1] == "/dev/loop7"
    assert runner.calls[0].count("-E") == 1


def test_a_frozen_filesystem_is_thawed_after_the_snapshot(tmp_path: Path) -> None:
    runner = FakeRunner()
    fs = Filesystems(runner, HostPaths(sys=tmp_path), timeout=5)
    seen: list[list[list[str]]] = []

    async def snapshot() -> None:
        async with fs.frozen(tmp_path / "m", limit=1):
            seen.append(list(runner.calls))

    asyncio.run(snapshot())
    assert seen == [[["fsfreeze", "--freeze", str(tmp_path / "m")]]]  # frozen during it
    assert runner.calls[-1] == ["fsfreeze", "--unfreeze", str(tmp_path / "m")]


def test_a_stuck_snapshot_is_given_up_and_the_filesystem_thawed(tmp_path: Path) -> None:
    runner = FakeRunner()
    fs = Filesystems(runner, HostPaths(sys=tmp_path), timeout=5)

    async def stuck() -> None:
        async with fs.frozen(tmp_path / "m", limit=0.2):
            await asyncio.sleep(30)  # Ceph never answers the snapshot

    with pytest.raises(DeadlineExceeded, match=r"stayed frozen longer than 0\.2 s.*thawed"):
        asyncio.run(asyncio.wait_for(stuck(), 5))
    assert runner.calls[-1] == ["fsfreeze", "--unfreeze", str(tmp_path / "m")]


def test_a_freeze_that_fails_is_still_undone(tmp_path: Path) -> None:
    # fsfreeze killed at its deadline may have frozen the filesystem all the same.
    runner = FakeRunner((1, "", "fsfreeze: timed out"), (1, "", "Invalid argument"))
    fs = Filesystems(runner, HostPaths(sys=tmp_path), timeout=5)

    async def snapshot() -> None:
        async with fs.frozen(tmp_path / "m", limit=1):
            raise AssertionError("never reached: the freeze failed")

    with pytest.raises(ProcessError):
        asyncio.run(snapshot())
    assert [c[1] for c in runner.calls] == ["--freeze", "--unfreeze"]
