"""librbd QoS options: stored as the image's own settings, applied by the librbd-based
mappers (a limited volume really writes slower through our mount), and reported in Get;
with krbd, Get says the kernel client does not apply them."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from rbdplugin.units import MiB
from tests.helpers import TEST_MAPPER, Admin, DaemonProcess, mount_volume, unique

LIMIT = MiB  # bytes per second
WRITTEN = 4 * MiB  # at LIMIT, about 3 s past the first second's burst


def timed_direct_write(directory: Path) -> float:
    """Seconds to write WRITTEN bytes past the page cache (each write reaches librbd)."""
    started = time.monotonic()
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={Path(directory) / 'data'}", "bs=256K",
         f"count={WRITTEN // (256 * 1024)}", "oflag=direct", "conv=fsync", "status=none"],
        check=True, timeout=60,
    )  # fmt: skip
    return time.monotonic() - started


def test_qos_limits_are_the_images_and_slow_its_writes(daemon: DaemonProcess, admin: Admin) -> None:
    c = daemon.client("alpha")
    limited, free = unique("qlim"), unique("qfree")
    assert c.create(limited, {"size": "64M", "write-bps-limit": "1M", "iops-limit": "2000"}) == {
        "Err": ""
    }
    assert c.create(free, {"size": "64M"}) == {"Err": ""}
    meta = admin.metadata("alpha", limited)  # what librbd will apply when it opens the image
    assert meta["conf_rbd_qos_write_bps_limit"] == str(LIMIT)
    assert meta["conf_rbd_qos_iops_limit"] == "2000"
    assert not [k for k in admin.metadata("alpha", free) if k.startswith("conf_rbd_qos")]

    status = c.get(limited)["Volume"]["Status"]
    assert status["qos"] == {"iops-limit": 2000, "write-bps-limit": LIMIT}
    assert "krbd) ignores it" in status["qos_note"]
    assert "qos" not in c.get(free)["Volume"]["Status"]
    clash = c.create(limited, {"write-bps-limit": "2M"})["Err"]
    assert "write-bps-limit=2M (it has 1M)" in clash, clash

    paths = {name: mount_volume(c, name, "q") for name in (limited, free)}
    try:
        note = c.get(limited)["Volume"]["Status"]["qos_note"]
        if TEST_MAPPER == "krbd":  # the kernel client has no QoS: Get must say so
            assert note.startswith("NOT applied here"), note
            return
        assert note == f"applied by librbd (mapper {TEST_MAPPER})"
        slow = timed_direct_write(paths[limited])
        fast = timed_direct_write(paths[free])
        print(f"{WRITTEN // MiB} MiB direct: limited {slow:.2f} s, unlimited {fast:.2f} s")
        # A burst of one second's worth, then LIMIT per second: at least 2.5 s for 4 MiB.
        assert slow >= 2.5, slow
        assert fast < slow / 2, (fast, slow)
        assert os.path.getsize(Path(paths[limited]) / "data") == WRITTEN
    finally:
        for name in (limited, free):
            assert c.call("VolumeDriver.Unmount", {"Name": name, "ID": "q"}) == {"Err": ""}
            assert c.remove(name) == {"Err": ""}
