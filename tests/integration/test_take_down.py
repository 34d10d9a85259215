"""The tests' own clean-up of a failed test's leftovers (tests/helpers.py,
``take_down_under``) must not leave what it cleans up worse: a loop device orphaned on
an export whose FUSE mount it dropped first could never be found again."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.helpers import slow_fuse_file, take_down_under


def _backing(device: str) -> str | None:
    try:
        with open(f"/sys/block/{device.removeprefix('/dev/')}/loop/backing_file") as fh:
            return fh.read().strip()
    except FileNotFoundError:  # detached
        return None


def test_a_looped_export_is_taken_down_without_orphaning_its_loop_device(
    short_tmp: Path,
) -> None:
    root = short_tmp / "leftovers"
    root.mkdir()
    with slow_fuse_file(root / "export", 0, writable=True) as export:
        device = subprocess.run(["losetup", "--find", "--show", str(export)], check=True,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        try:
            assert _backing(device) == str(export)
            take_down_under(root)
            # Read from sysfs: detached (it may take the kernel a moment), never "/".
            deadline = time.monotonic() + 10
            while (left := _backing(device)) not in (None, ""):
                assert left != "/", f"{device} was orphaned: its export's mount went first"
                assert time.monotonic() < deadline, f"{device} is still attached to {left}"
                time.sleep(0.05)
            with open("/proc/self/mountinfo") as fh:
                assert f" {root}/" not in fh.read()
        finally:
            subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)
