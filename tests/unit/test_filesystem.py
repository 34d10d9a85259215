"""Probing and mkfs command lines, with a fake runner at the process boundary and a
fixture sysfs tree for device sizes. Blank must be proven: the device's signature
regions (first and last MiB) must read as zeros; only a device with data there is
shown to blkid, and data blkid does not know is never blank."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rbdplugin.errors import ProcessError
from rbdplugin.filesystem import FAST_MKFS, UNRECOGNISED, Filesystems, merge_extended
from rbdplugin.mapping import HostPaths
from tests.unit.test_mappers import FakeRunner

MiB = 1024 * 1024


def _fs(tmp_path: Path, runner: FakeRunner, size: int = 64 * MiB) -> Filesystems:
    sizes = tmp_path / "sys" / "class" / "block" / "loop7"
    sizes.mkdir(parents=True)
    (sizes / "size").write_text(f"{size // 512}\n")
    return Filesystems(runner, HostPaths(sys=tmp_path / "sys"), timeout=5)


DIFFER = (1, "/dev/loop7 /dev/zero differ: byte 1026, line 1\n", "")


def test_blank_when_both_ends_read_zeros_without_asking_blkid(tmp_path: Path) -> None:
    runner = FakeRunner((0, "", ""), (0, "", ""))
    assert asyncio.run(_fs(tmp_path, runner).probe("/dev/loop7")) is None
    head, tail = runner.calls
    assert head == ["cmp", "--ignore-initial=0:0", f"--bytes={MiB}", "/dev/loop7", "/dev/zero"]
    assert tail == ["cmp", f"--ignore-initial={63 * MiB}:0", f"--bytes={MiB}", "/dev/loop7",
                    "/dev/zero"]  # fmt: skip


@pytest.mark.parametrize("which", [0, 1], ids=["head", "tail"])
def test_data_blkid_does_not_know_is_never_blank(tmp_path: Path, which: int) -> None:
    answers = [(0, "", ""), (0, "", ""), (2, "", "")]
    answers[which] = DIFFER
    runner = FakeRunner(*answers)
    found = asyncio.run(_fs(tmp_path, runner).probe("/dev/loop7"))
    assert found is not None and found.type == UNRECOGNISED and found.mountable_as is None
    assert runner.calls[2][0] == "blkid"


def test_a_device_that_cannot_be_read_is_an_error_not_blank(tmp_path: Path) -> None:
    runner = FakeRunner((2, "", "cmp: /dev/loop7: Input/output error\n"), (0, "", ""))
    with pytest.raises(ProcessError, match="cannot read /dev/loop7 to prove it blank"):
        asyncio.run(_fs(tmp_path, runner).probe("/dev/loop7"))


def test_a_device_shorter_than_sysfs_says_is_an_error(tmp_path: Path) -> None:
    runner = FakeRunner((0, "", ""), (1, "", "cmp: EOF on /dev/loop7 which is empty\n"))
    with pytest.raises(ProcessError, match="prove it blank"):
        asyncio.run(_fs(tmp_path, runner).probe("/dev/loop7"))


def test_a_small_device_is_read_once_whole(tmp_path: Path) -> None:
    runner = FakeRunner((0, "", ""))
    assert asyncio.run(_fs(tmp_path, runner, size=MiB // 2).probe("/dev/loop7")) is None
    assert len(runner.calls) == 1 and f"--bytes={MiB // 2}" in runner.calls[0]


def test_data_at_either_end_is_shown_to_blkid(tmp_path: Path) -> None:
    runner = FakeRunner(DIFFER, (0, "", ""), (0, "DEVNAME=/dev/loop7\nTYPE=xfs\nUUID=u\n", ""))
    found = asyncio.run(_fs(tmp_path, runner).probe("/dev/loop7"))
    assert found is not None and found.mountable_as == "xfs"
    assert runner.calls[2][:2] == ["blkid", "--probe"]


def test_blkid_failing_on_data_is_an_error_not_blank(tmp_path: Path) -> None:
    runner = FakeRunner(DIFFER, (0, "", ""), (4, "", "blkid: error\n"))
    with pytest.raises(ProcessError, match="blkid could not probe /dev/loop7"):
        asyncio.run(_fs(tmp_path, runner).probe("/dev/loop7"))


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
