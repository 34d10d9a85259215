"""Benchmarks with targets, against a throwaway dev cluster and a real daemon.

    .venv/bin/python -m bench.run [--volumes 1000]

Targets (from the issues; not asserted in the test suite, which must not be timed):
- List with 1000 volumes answers in under 1 s (it never opens each image).
- Mount of a fresh 1 TiB volume (map, probe, fast mkfs, mount) takes under 25 s,
  the default op_timeout, itself under the managed-plugin limit of 30 s.
- Get of one volume answers in under 0.5 s.
Prints one line per measurement and exits non-zero if a target is missed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import rados
import rbd

from rbdplugin.devcluster import DevCluster
from tests.helpers import DaemonProcess

TARGETS = {"list": 1.0, "mount_1tib": 25.0, "get": 0.5}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--volumes", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rbdb-", dir="/tmp"))
    cluster = DevCluster(root / "ceph")
    cluster.start(tenants=["bench"])
    daemon = DaemonProcess(cluster.daemon_config, root / "daemon.log", root / "ceph" / "plugins")
    missed: list[str] = []
    try:
        admin = rados.Rados(conffile=str(cluster.conf), rados_id="admin")
        admin.connect()
        with admin.open_ioctx("bench") as ioctx:
            for i in range(args.volumes):
                rbd.RBD().create(ioctx, f"vol{i:05d}", 1 << 30, old_format=False, features=1)
        admin.shutdown()
        daemon.start(wait_for="bench")
        client = daemon.client("bench")
        client.call("VolumeDriver.List", {})  # connect first
        took, names = timed(client.names)
        report("list", took, f"{len(names)} volumes", missed)  # type: ignore[arg-type]
        took, _ = timed(lambda: client.get("vol00042"))
        report("get", took, "one volume", missed)
        assert client.create("big", {"size": "1T"}) == {"Err": ""}
        took, reply = timed(lambda: client.call("VolumeDriver.Mount", {"Name": "big", "ID": "b"}))
        assert reply["Err"] == "", reply  # type: ignore[index]
        report("mount_1tib", took, "fresh 1 TiB: map + probe + fast mkfs + mount", missed)
        client.call("VolumeDriver.Unmount", {"Name": "big", "ID": "b"})
    finally:
        daemon.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 1 if missed else 0


def report(name: str, seconds: float, what: str, missed: list[str]) -> None:
    target = TARGETS[name]
    verdict = "ok" if seconds <= target else "MISSED"
    if verdict == "MISSED":
        missed.append(name)
    print(f"{name:12s} {seconds:8.3f} s  (target {target} s, {verdict})  {what}")


if __name__ == "__main__":
    sys.exit(main())
