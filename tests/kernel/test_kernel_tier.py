"""The kernel tier: krbd, rbd-nbd and udev for real.

This host's kernel has neither rbd nor nbd, so one session-wide boot of the cached
QEMU guest (guest/run: Debian's own kernel, systemd, udev) runs the project's own
suites inside it (tests/kernel/inside.sh): the mount suite and its failure and
crash points with krbd, the mount suite with rbd-nbd, the two-host lease suite's
kernel-relevant cases with krbd, the udev checks and a Docker journey. Each suite
is one test here, judged from the JUnit report the guest wrote. Every run's output
and the path of the guest's console log are kept in RBDPLUGIN_KERNEL_LOGS.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbdplugin.devcloud.qmp import Qmp, QmpError, plug_disk, unplug_disk

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
KEEP = Path(os.environ.get("RBDPLUGIN_KERNEL_LOGS", "/var/tmp/rbdplugin-kernel-tier"))
RUNS_KEPT = 10
# Suite -> the fewest tests it must have run (a suite that collects nothing proves nothing).
SUITES = {
    "kernel": 5,
    "krbd-mount": 11,
    "krbd-faults": 6,
    "nbd": 11,
    "krbd-locks": 5,
    "krbd-docker": 4,
    "cinder": 2,
}
GUEST_DEADLINE = 40 * 60


@pytest.fixture(scope="session")
def guest_run() -> Path:
    """Boot the guest once, run every suite in it; the folder holding what it wrote."""
    KEEP.mkdir(parents=True, exist_ok=True)
    for old in sorted(KEEP.iterdir())[:-RUNS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    out = KEEP / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir()
    started = time.monotonic()
    exchange, qmp = out / "hotplug", out / "qmp.sock"
    exchange.mkdir()
    env = {**os.environ, "GUEST_QMP_SOCKET": str(qmp)}
    stop = threading.Event()
    plugger = threading.Thread(target=serve_hotplug, args=(exchange, qmp, stop), daemon=True)
    plugger.start()
    with devcloud_for_guest(out, qmp) as ports, (out / "guest-run.log").open("w") as log:
        forwards = [f"--forward={port}" for port in ports]
        try:
            done = subprocess.run(
                [str(ROOT / "guest" / "run"), *forwards, "--out", str(out),
                 "sh", "/src/tests/kernel/inside.sh",
                 *os.environ.get("RBDPLUGIN_KERNEL_SUITES", "").split()],
                stdout=log, stderr=subprocess.STDOUT, timeout=GUEST_DEADLINE, check=False, env=env,
            )  # fmt: skip
        finally:
            stop.set()
            plugger.join(10)
    text = (out / "guest-run.log").read_text(errors="replace")
    print(f"\nkernel tier: {time.monotonic() - started:.0f} s in the guest; output in {out}")
    print("\n".join(line for line in text.splitlines() if line.startswith(("guest:", "==="))))
    if done.returncode in (124, 125):  # could not boot, or past GUEST_TIMEOUT
        pytest.fail(f"the kernel-tier guest failed (exit {done.returncode}); see {out}:\n"
                    f"{text[-3000:]}", pytrace=False)  # fmt: skip
    return out


@contextlib.contextmanager
def devcloud_for_guest(out: Path, qmp: Path) -> Iterator[list[int]]:
    """A devcloud on the host whose pretend server ``vm`` is the guest (its disks are
    hot-plugged through ``qmp``), for tests/kernel/test_cinder_inside.py; yields the
    service ports the guest must reach. Its clouds.yaml and ``cloud.json`` go to
    ``out/cinder`` (the guest's /out/cinder); the secret is deleted after the run. If it
    cannot start, ``out/cinder/error`` says why and the guest's Cinder suite fails."""
    exchange = out / "cinder"
    exchange.mkdir()
    root = Path(tempfile.mkdtemp(prefix="rbdp-kc-", dir="/tmp"))
    devcloud = [sys.executable, "-m", "rbdplugin", "devcloud"]
    ports: list[int] = []
    try:
        done = subprocess.run([*devcloud, "start", "--dir", str(root), "--guest-qmp", str(qmp)],
                              capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        if done.returncode != 0:
            (exchange / "error").write_text(done.stderr[-3000:])
        else:
            state = json.loads((root / "devcloud.json").read_text())
            ports = [int(port) for port in state["ports"].values()]
            server = next(s["id"] for s in state["servers"] if s["name"] == "vm")
            shutil.copy(root / "clouds.yaml", exchange / "clouds.yaml")
            (exchange / "cloud.json").write_text(
                json.dumps({"server_id": server, "ports": state["ports"]})
            )
        yield ports
    finally:
        (exchange / "clouds.yaml").unlink(missing_ok=True)  # the credential's secret
        subprocess.run([*devcloud, "stop", "--dir", str(root)], capture_output=True,
                       timeout=300, check=False)  # fmt: skip
        if (root / "log").is_dir():
            shutil.copytree(root / "log", out / "devcloud-logs", dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def serve_hotplug(exchange: Path, qmp: Path, stop: threading.Event) -> None:
    """Answer the in-guest hot-plug test (tests/kernel/test_hotplug_inside.py): when it
    writes ``plug`` (a serial), plug a virtio disk with that serial into the guest through
    QMP, as Nova does for a Cinder volume; on ``unplug``, take it out again."""
    image = exchange / "disk.raw"
    steps = {"plug": "plugged", "unplug": "unplugged"}
    while not stop.wait(0.3):
        for asked, answered in steps.items():
            if not (exchange / asked).exists() or (exchange / answered).exists():
                continue
            serial = (exchange / asked).read_text().strip()
            try:
                with Qmp(qmp) as session:
                    if asked == "plug":
                        with image.open("wb") as disk:
                            disk.truncate(64 << 20)
                        plug_disk(session, "hotplug0", image, serial)
                    else:
                        unplug_disk(session, "hotplug0")
                answer = "ok"
            except (OSError, QmpError) as error:
                answer = f"{asked} failed: {error}"
            (exchange / answered).write_text(answer + "\n")


@pytest.mark.timeout(GUEST_DEADLINE + 120)  # the first one waits for the whole guest run
@pytest.mark.parametrize("suite", list(SUITES))
def test_suite_passes_in_the_guest(guest_run: Path, suite: str) -> None:
    report = guest_run / f"{suite}.xml"
    assert report.exists(), f"suite {suite} did not run in the guest; see {guest_run}"
    root = ET.parse(report).getroot()  # noqa: S314 - our own guest wrote it
    counts = root if root.tag == "testsuite" else root.find("testsuite")
    assert counts is not None, f"{report} has no test suite"
    tests, skipped = int(counts.get("tests", 0)), int(counts.get("skipped", 0))
    failures, errors = int(counts.get("failures", 0)), int(counts.get("errors", 0))
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in counts.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    assert (failures, errors) == (0, 0), (
        f"{suite} in the guest: {failures} failed, {errors} errors: {failed}; "
        f"output in {guest_run / (suite + '.log')}"
    )
    assert tests - skipped >= SUITES[suite], (
        f"{suite} ran only {tests - skipped} tests in the guest; see {guest_run / (suite + '.log')}"
    )
