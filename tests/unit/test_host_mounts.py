"""The mount table as the daemon reads it: re-read only after a mount or unmount."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Run in a mount namespace of its own (private propagation), so that mounts made by
# anything else on this machine meanwhile are no events there.
SCRIPT = """
import subprocess, sys
from pathlib import Path
from rbdplugin.host import HostPaths, _WATCHED, mounts

target = Path(sys.argv[1])
real = HostPaths()

def oracle():
    # The kernel's table, read here without the daemon's parser or cache.
    fields = [line.split(" - ")[0].split() for line in open("/proc/self/mountinfo")]
    return {f[4] for f in fields}

first = mounts(real)
assert str(target) not in first and set(first) == oracle()
reads = _WATCHED.reads
for _ in range(50):
    assert mounts(real) == first
assert _WATCHED.reads == reads, "an unchanged table was read again"

subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "rbdp-test", str(target)], check=True)
assert mounts(real)[str(target)][:2] == ("rbdp-test", "tmpfs")
assert str(target) in oracle()
subprocess.run(["umount", str(target)], check=True)
assert str(target) not in mounts(real)
assert _WATCHED.reads == reads + 2
print("ok")
"""


def test_the_table_follows_mounts_and_unmounts_and_is_not_reread_in_between(
    tmp_path: Path,
) -> None:
    target = tmp_path / "m"
    target.mkdir()
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SCRIPT]
    done = subprocess.run([*argv, str(target)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
