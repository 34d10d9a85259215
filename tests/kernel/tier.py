"""The kernel tier's guest run, started in the background.

One boot of the cached QEMU guest (guest/run: Debian's own kernel, systemd, udev) runs
the project's suites inside it (tests/kernel/inside.sh). Under TCG that takes about half
an hour, longer than all the host tests together, and the guest waits on its own
emulated CPUs far more than on the host's. So the session starts it as soon as it knows
the kernel tier will be reported (tests/conftest.py, at collection) and the host tests
run beside it; tests/kernel/test_kernel_tier.py, collected last, waits for its end and
judges each suite's JUnit report. Every run's output and the path of the guest's console
log are kept in RBDPLUGIN_KERNEL_LOGS.
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
from collections.abc import Iterator
from pathlib import Path

from rbdplugin.devcloud.qmp import Qmp, QmpError, plug_disk, unplug_disk

ROOT = Path(__file__).resolve().parents[2]
KEEP = Path(os.environ.get("RBDPLUGIN_KERNEL_LOGS", "/var/tmp/rbdplugin-kernel-tier"))
RUNS_KEPT = 10
# The guest's command gets GUEST_TIMEOUT; the whole run (boot, devcloud start and stop
# around it) gets GUEST_DEADLINE. Beside the host tests the guest shares the host's two
# cores: its suites took ~31 min alone on a slow day, so 45 min leaves room.
GUEST_TIMEOUT = 45 * 60
GUEST_DEADLINE = GUEST_TIMEOUT + 10 * 60


class GuestFailed(Exception):
    """The guest could not boot, or its run was stopped."""


class GuestTier:
    """One background guest run: :meth:`start` it, :meth:`result` waits for its folder."""

    def __init__(self, suites: list[str]) -> None:
        self.suites = suites
        self.started = 0.0
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._cancelled = threading.Event()
        # Held from the cancel check to the Popen: a cancel either sees the process or
        # is seen before it starts (else a guest started just after a cancel ran on).
        self._starting = threading.Lock()
        self._out: Path | None = None
        self._error: BaseException | None = None
        # Why suites may lack a report though the guest booted (it passed GUEST_TIMEOUT).
        self.problem = ""

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kernel-tier", daemon=True)
        self._thread.start()

    def result(self) -> Path:
        """The run's output folder once the guest is done; GuestFailed if it was not."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        self._thread.join(max(0.0, self.started + GUEST_DEADLINE + 60 - time.monotonic()))
        if self._thread.is_alive():
            self.cancel()
            raise GuestFailed(f"the guest run passed its {GUEST_DEADLINE} s deadline; stopped")
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out

    def cancel(self) -> None:
        """Stop the guest (a session that ends before the kernel tier is reported)."""
        self._cancelled.set()
        with self._starting:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()  # guest/run stops QEMU on SIGTERM
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if self._thread is not None:
            self._thread.join(600)  # a devcloud being started is stopped again first

    def _run(self) -> None:
        try:
            self._out = self._boot_and_run()
        except BaseException as error:  # handed to the waiting test
            self._error = error

    def _boot_and_run(self) -> Path:
        KEEP.mkdir(parents=True, exist_ok=True)
        for old in sorted(KEEP.iterdir())[:-RUNS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        out = KEEP / time.strftime("%Y%m%d-%H%M%S")
        out.mkdir()
        exchange, qmp = out / "hotplug", out / "qmp.sock"
        exchange.mkdir()
        env = {**os.environ, "GUEST_QMP_SOCKET": str(qmp), "GUEST_TIMEOUT": str(GUEST_TIMEOUT)}
        stop = threading.Event()
        plugger = threading.Thread(target=serve_hotplug, args=(exchange, qmp, stop), daemon=True)
        plugger.start()
        log_path = out / "guest-run.log"
        try:
            with devcloud_for_guest(out, qmp) as ports, log_path.open("w") as log:
                forwards = [f"--forward={port}" for port in ports]
                with self._starting:
                    if self._cancelled.is_set():
                        raise GuestFailed("the session ended before the guest started")
                    process = self._process = subprocess.Popen(
                        [str(ROOT / "guest" / "run"), *forwards, "--out", str(out),
                         "sh", "/src/tests/kernel/inside.sh", *self.suites],
                        stdout=log, stderr=subprocess.STDOUT, env=env,
                    )  # fmt: skip
                try:
                    returncode = process.wait(GUEST_DEADLINE)
                except subprocess.TimeoutExpired:
                    process.kill()
                    returncode = process.wait()
        finally:
            stop.set()
            plugger.join(10)
        text = log_path.read_text(errors="replace")
        if returncode == 125 or returncode < 0:  # it did not boot, or it was stopped
            raise GuestFailed(
                f"the kernel-tier guest failed (exit {returncode}); see {out}:\n{text[-3000:]}"
            )
        if returncode == 124:  # the suites that finished still have their reports
            self.problem = f"the guest's command passed GUEST_TIMEOUT={GUEST_TIMEOUT} s"
        return out

    def summary(self, out: Path) -> str:
        text = (out / "guest-run.log").read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith(("guest:", "==="))]
        return "\n".join(
            [f"kernel tier: {time.monotonic() - self.started:.0f} s since it started; "
             f"output in {out}", *lines]
        )  # fmt: skip


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


# The session's one run, made at collection (tests/conftest.py) when kernel-tier tests
# are selected; None otherwise.
RUN: GuestTier | None = None


def start_in_background() -> GuestTier:
    global RUN  # noqa: PLW0603 - one guest run per session
    if RUN is None:
        RUN = GuestTier(os.environ.get("RBDPLUGIN_KERNEL_SUITES", "").split())
        RUN.start()
    return RUN
