"""Test helpers: a Docker-shaped plugin client and a daemon run as a real process."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import rados
import rbd

from tests import oracle

ACCEPT = "application/vnd.docker.plugins.v1.2+json"
# The mapper test daemons use: fuse here; the kernel tier runs the suites with krbd and nbd.
TEST_MAPPER = os.environ.get("RBDPLUGIN_TEST_MAPPER", "fuse")
# How long a test daemon may take to answer after its start; the kernel tier's guest (TCG,
# beside the host tests) raises it: a restart there once took more than 30 s.
START_TIMEOUT = float(os.environ.get("RBDPLUGIN_TEST_START_TIMEOUT", "30"))


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


class PluginClient:
    """Speaks to a plugin socket the way dockerd does: POST, Accept header, no Content-Type."""

    def __init__(self, socket_path: Path, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def raw(self, endpoint: str, body: bytes, method: str = "POST") -> tuple[int, dict[str, Any]]:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request(method, f"/{endpoint}", body=body, headers={"Accept": ACCEPT})
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        return response.status, json.loads(data)

    def call(self, endpoint: str, body: Any = None) -> dict[str, Any]:
        """Call with a JSON body (``None`` sends an empty body, as for Activate)."""
        raw = b"" if body is None else json.dumps(body).encode()
        return self.raw(endpoint, raw)[1]

    def create(self, name: str, opts: dict[str, str] | None = None) -> dict[str, Any]:
        return self.call("VolumeDriver.Create", {"Name": name, "Opts": opts})

    def get(self, name: str) -> dict[str, Any]:
        return self.call("VolumeDriver.Get", {"Name": name})

    def remove(self, name: str) -> dict[str, Any]:
        return self.call("VolumeDriver.Remove", {"Name": name})

    def names(self) -> list[str]:
        reply = self.call("VolumeDriver.List", {})
        assert reply["Err"] == "", reply
        return [v["Name"] for v in reply["Volumes"]]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` until it holds; return the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - started


def unique(prefix: str = "v") -> str:
    """A fresh volume name. Lengths vary (5-16 random characters) so that names of
    different lengths, some possibly prefixes of others, meet throughout the suite."""
    token = uuid.uuid4().hex
    return f"{prefix}-{token[: 5 + int(token[-1], 16) % 12]}"


# Every test daemon's log: a failed test's report shows the tails of those written
# during it (tests/conftest.py), before the session's folders are gone.
DAEMON_LOGS: set[Path] = set()
LOG_TAIL_LINES = 80


def log_tails(since: float) -> list[tuple[Path, str]]:
    """The last lines of each test daemon's log written to at or after ``since``."""
    tails = []
    for path in sorted(DAEMON_LOGS):
        try:
            if path.stat().st_mtime < since:
                continue
            lines = path.read_text(errors="replace").splitlines()
        except OSError:  # its folder is gone
            continue
        tails.append((path, "\n".join(lines[-LOG_TAIL_LINES:])))
    return tails


class DaemonProcess:
    """``rbdplugin serve --config FILE`` as a child process, its log in a file."""

    def __init__(
        self, config: Path, log_path: Path, socket_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        DAEMON_LOGS.add(log_path)
        self.config = config
        self.log_path = log_path
        self.socket_dir = socket_dir
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: str, timeout: float = START_TIMEOUT) -> DaemonProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rbdplugin", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        client = self.client(wait_for)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                client.call("Plugin.Activate")
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not answer within {timeout} s:\n{self.log()}")

    def client(self, driver: str) -> PluginClient:
        return PluginClient(self.socket_dir / f"{driver}.sock")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Admin:
    """The cluster's admin, to check what really exists in Ceph behind the daemon's back."""

    def __init__(self, conf: Path) -> None:
        self.cluster = rados.Rados(conffile=str(conf), rados_id="admin")
        self.cluster.connect(timeout=10)

    def images(self, pool: str, namespace: str = "") -> set[str]:
        with self.cluster.open_ioctx(pool) as ioctx:
            ioctx.set_namespace(namespace)
            return {e["name"] for e in rbd.RBD().list2(ioctx)}

    def trash(self, pool: str) -> set[str]:
        with self.cluster.open_ioctx(pool) as ioctx:
            return {e["name"] for e in rbd.RBD().trash_list(ioctx)}

    def metadata(self, pool: str, image: str) -> dict[str, str]:
        with self.cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as im:
            return dict(im.metadata_list())

    def format_marks(self, pool: str, image: str) -> dict[str, str]:
        """Our mkfs's marks of ``image`` (omap of rbdplugin.format.<image id>)."""
        with self.cluster.open_ioctx(pool) as ioctx:
            with rbd.Image(ioctx, image, read_only=True) as im:
                image_id = im.id()
            try:
                with rados.ReadOpCtx() as op:
                    entries, _ = ioctx.get_omap_vals(op, "", "", 16)
                    ioctx.operate_read_op(op, f"rbdplugin.format.{image_id}")
                    return {k: v.decode() for k, v in entries}
            except rados.ObjectNotFound:
                return {}

    def write(self, pool: str, image: str, offset: int, data: bytes) -> None:
        with self.cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image) as im:
            im.write(data, offset)

    def read(self, pool: str, image: str, offset: int, length: int) -> bytes:
        with self.cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as im:
            data: bytes = im.read(offset, length)
            return data

    @contextlib.contextmanager
    def zeroed_ends(self, pool: str, image: str, region: int) -> Iterator[None]:
        """The first and last ``region`` bytes of ``image`` zeroed (a wiped signature),
        then put back as they were."""
        with self.cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image) as im:
            size = im.size()
            ends = [(0, im.read(0, region)), (size - region, im.read(size - region, region))]
            for offset, _ in ends:
                im.write(b"\0" * region, offset)
        try:
            yield
        finally:
            with self.cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image) as im:
                for offset, data in ends:
                    im.write(data, offset)

    def size(self, pool: str, image: str) -> int:
        with self.cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as im:
            size: int = im.size()
            return size

    def features(self, pool: str, image: str) -> int:
        with self.cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as im:
            bits: int = im.features()
            return bits

    def watchers(self, pool: str, image: str) -> list[str]:
        """Who has ``image`` open; nobody when it does not exist."""
        with self.cluster.open_ioctx(pool) as ioctx:
            try:
                im = rbd.Image(ioctx, image, read_only=True)
            except rbd.ImageNotFound:
                return []
            with im:
                return [w["addr"] for w in im.watchers_list()]

    def create_image(self, pool: str, name: str, size: int, namespace: str = "") -> None:
        with self.cluster.open_ioctx(pool) as ioctx:
            ioctx.set_namespace(namespace)
            rbd.RBD().create(ioctx, name, size, old_format=False, features=1)

    def mon(self, cmd: dict[str, Any]) -> str:
        ret, out, err = self.cluster.mon_command(json.dumps(cmd), b"", timeout=30)
        assert ret == 0, err
        return bytes(out).decode()

    def close(self) -> None:
        self.cluster.shutdown()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def take_down_under(root: Path) -> None:
    """Detach whatever is mounted, exported or looped under ``root`` (a failed test's
    leftovers): a recursive delete must never walk into (and empty) a mounted volume.

    In the order the daemon's Unmount takes: the filesystems on loop devices, then the
    loop devices, then the export processes, then their FUSE mounts. A loop device whose
    export's mount went first shows "/" as its backing file, and nothing can find it to
    detach it any more (tests/oracle.py, ``orphan_loops``)."""
    inside = f"{root}/"
    for entry in reversed(oracle.mountinfo()):
        if entry["target"].startswith(inside) and entry["source"].startswith("/dev/loop"):
            subprocess.run(["umount", "--lazy", entry["target"]], check=False)
    for device, backing in oracle.loop_devices().items():
        if backing.startswith(inside):
            subprocess.run(["losetup", "--detach", device], check=False)
    for pid in oracle.pids_of_program_with("qemu-storage-daemon", inside):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for entry in reversed(oracle.mountinfo()):
        if entry["target"].startswith(inside):
            subprocess.run(["umount", "--lazy", entry["target"]], check=False)


@contextlib.contextmanager
def slow_fuse_file(path: Path, seconds: int, writable: bool = False) -> Iterator[Path]:
    """A FUSE file at ``path`` whose reads take ``seconds`` in its server
    (qemu-storage-daemon's null-co driver): a direct reader of it sits in uninterruptible
    sleep and survives SIGKILL until the server answers, as a reader of a krbd device or
    FUSE export does while the OSDs are dead. ``writable``: its mode can be changed."""
    path.touch()
    server = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev",
         f"driver=null-co,node-name=n0,size=1048576,latency-ns={seconds * 10**9}",
         "--export", f"type=fuse,id=e0,node-name=n0,mountpoint={path},"
         f"writable={'on' if writable else 'off'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not oracle.is_mounted(path):
            assert server.poll() is None and time.monotonic() < deadline, "no FUSE export"
            time.sleep(0.02)
        yield path
    finally:
        server.terminate()
        server.wait(30)


@contextlib.contextmanager
def stopped_service(root: Path, state: dict[str, Any], service: str) -> Iterator[None]:
    """A devcloud service's process (its pid in ``state``, the devcloud.json under ``root``)
    stopped: a black hole, connections wait and nothing answers; continued afterwards."""
    pid = int(state["pids"][service])
    assert str(root) in " ".join(oracle.argv_of(pid)), service  # ours, not a recycled pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def mount_volume(client: PluginClient, name: str, mount_id: str) -> Path:
    """Mount ``name`` for ``mount_id`` as Docker does; its mountpoint (asserting success)."""
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
    assert reply["Err"] == "", reply
    return Path(reply["Mountpoint"])


def unmount_volume(client: PluginClient, name: str, mount_id: str) -> None:
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id}) == {"Err": ""}


def write_random(path: Path, size: int = 1 << 20) -> str:
    """Write ``size`` random bytes to ``path``, synced; their sha256 (hex)."""
    data = os.urandom(size)
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
