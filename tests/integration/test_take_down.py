"""The tests' own clean-up of a failed test's leftovers (tests/helpers.py,
``take_down_under``) must not leave what it cleans up worse: a loop device orphaned on
an export whose FUSE mount it dropped first could never be found again."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests import oracle
from tests.helpers import slow_fuse_file, take_down_under


def test_a_looped_export_is_taken_down_without_orphaning_its_loop_device(
    short_tmp: Path,
) -> None:
    root = short_tmp / "leftovers"
    root.mkdir()
    with slow_fuse_file(root / "export", 0, writable=True) as export:
        device = subprocess.run(["losetup", "--find", "--show", str(export)], check=True,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        try:
            assert oracle.loop_devices().get(device) == str(export)
            take_down_under(root)
            # Read from sysfs: detached (it may take the kernel a moment), never "/".
            deadline = time.monotonic() + 10
            while (left := oracle.loop_devices().get(device)) is not None:
                assert left != "/", f"{device} was orphaned: its export's mount went first"
                assert time.monotonic() < deadline, f"{device} is still attached to {left}"
                time.sleep(0.05)
            with open("/proc/self/mountinfo") as fh:
                assert f" {root}/" not in fh.read()
        finally:
            subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)
