"""What every case runs against: a throwaway dev cluster, a real daemon, the floors' tools.

Everything started here is taken down by :meth:`Env.close`, also after a failure:
the daemon, the bare server, hand-made mappings, and whatever is still mounted,
exported or looped under the bench's own directory.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from bench.floors import Hand, Tenant
from rbdplugin.ceph import feature_bits
from rbdplugin.config import TenantConfig, load_config
from rbdplugin.devcluster import DevCluster, free_ports
from tests.helpers import PluginClient, take_down_under

T = TypeVar("T")
TENANT = "bench"  # remove policy trash, the default
DELETE_TENANT = "benchdel"  # remove policy delete
REPO = Path(__file__).resolve().parent.parent
POLL = 0.002
START_TIMEOUT = 30.0


def child_env() -> dict[str, str]:
    """Children import this checkout's rbdplugin and bench, whatever the venv points at."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}:{path}" if path else str(REPO)}


class Server:
    """A plugin server process (the daemon or the bare floor) answering on Unix sockets."""

    def __init__(self, argv: list[str], socket: Path, log_path: Path) -> None:
        self.argv = argv
        self.socket = socket
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.exec_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start; the seconds from exec to the first answer to Plugin.Activate."""
        probe = PluginClient(self.socket, timeout=5)
        with self.log_path.open("ab") as log:
            self.exec_at = time.perf_counter()
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=child_env()
            )
        deadline = self.exec_at + START_TIMEOUT
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[2]} exited {self.proc.returncode}:\n{self.log()}")
            try:
                probe.call("Plugin.Activate")
                return time.perf_counter() - self.exec_at
            except OSError:
                time.sleep(POLL)
        raise RuntimeError(f"{self.argv[2]} did not answer within {START_TIMEOUT:.0f} s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Env:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="rbdb-", dir="/tmp"))
        self.loop = asyncio.new_event_loop()
        self.cluster = DevCluster(self.root / "ceph")
        self.daemon: Server | None = None
        self.bare: list[Server] = []
        self.hands: dict[str, Hand] = {}
        self.metrics_addr = ""
        self.config = self.root / "rbdplugin.toml"
        self.mounted: set[tuple[str, str, str]] = set()  # (tenant, volume, mount ID)
        self.tenants: dict[str, TenantConfig] = {}

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        # The daemon as installed: with its bytecode (make setup compiles it too).
        compileall.compile_dir(REPO / "rbdplugin", quiet=1)
        self.cluster.start(tenants=[TENANT, DELETE_TENANT])
        self.metrics_addr = f"127.0.0.1:{free_ports(1)[0]}"
        self.config.write_text(self._config_text())
        os.chmod(self.config, 0o600)
        config = load_config(self.config)
        self.tenants = {tenant.name: tenant for tenant in config.tenants}
        for tenant in config.tenants:
            self.hands[tenant.name] = Hand(
                Tenant(tenant.pool, tenant.user, tenant.keyring, config.ceph.conf,
                       feature_bits(tenant.features)),
                self.root / "hand" / tenant.name,
            )  # fmt: skip
        self.daemon = Server(
            [sys.executable, "-m", "rbdplugin", "serve", "--config", str(self.config)],
            self.socket_dir / f"{TENANT}.sock",
            self.root / "daemon.log",
        )
        self.daemon.start()

    def _config_text(self) -> str:
        """The dev cluster's own config, with the fuse mapper, a metrics listener, and
        the second tenant removing with the delete policy."""
        lines = []
        for line in self.cluster.daemon_config.read_text().splitlines():
            if line.startswith("metrics ="):
                lines += [f'metrics = "{self.metrics_addr}"', 'mapper = "fuse"']
            else:
                lines.append(line)
        lines.append('remove_policy = "delete"')  # the last table is the second tenant's
        text = "\n".join(lines) + "\n"
        assert text.rstrip().rsplit("[tenants.", 1)[1].startswith(f"{DELETE_TENANT}]"), text
        return text

    @property
    def socket_dir(self) -> Path:
        return self.cluster.root / "plugins"

    def client(self, tenant: str = TENANT) -> PluginClient:
        return PluginClient(self.socket_dir / f"{tenant}.sock", timeout=180)

    def hand(self, tenant: str = TENANT) -> Hand:
        return self.hands[tenant]

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    def metrics_url(self, path: str = "/metrics") -> str:
        return f"http://{self.metrics_addr}{path}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.metrics_url("/readyz"), timeout=5) as response:  # noqa: S310
                return bool(response.status == 200)
        except urllib.error.HTTPError:
            return False
        except OSError:
            return False

    def restart_daemon(self) -> tuple[float, float]:
        """Stop and start the daemon: seconds from exec to Activate, and to /readyz 200."""
        assert self.daemon is not None
        self.daemon.stop()
        activated = self.daemon.start()
        deadline = time.perf_counter() + START_TIMEOUT
        while not self.ready():
            if time.perf_counter() > deadline:
                log = self.daemon.log()
                raise RuntimeError(f"daemon not ready within {START_TIMEOUT:.0f} s:\n{log}")
            time.sleep(POLL * 5)
        return activated, time.perf_counter() - self.daemon.exec_at

    def bare_server(self, volumes: int = 0) -> Server:
        """The floor of the API: a bare aiohttp app on a Unix socket, started (and timed)."""
        socket = self.root / f"bare{len(self.bare)}.sock"
        argv = [sys.executable, "-m", "bench.bare_server", str(socket), "--volumes", str(volumes)]
        server = Server(argv, socket, self.root / "bare.log")
        self.bare.append(server)
        return server

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    # -- stop ----------------------------------------------------------------------------

    def close(self, keep: bool = False) -> None:
        for server in self.bare:
            with contextlib.suppress(Exception):
                server.stop()
        for hand in self.hands.values():
            with contextlib.suppress(Exception):
                self.run(hand.close())
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.unmount_everything()
            self.daemon.stop()
        take_down_under(self.root)
        with contextlib.suppress(Exception):
            self.cluster.stop()
        self.loop.close()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def unmount_everything(self) -> None:
        """Unmount through the daemon whatever a failed case left mounted."""
        for tenant, name, mount_id in list(self.mounted):
            with contextlib.suppress(Exception):
                self.unmount(name, mount_id, tenant)

    # -- volumes through the socket, mounts kept in a ledger for the clean-up -------------------

    def create(self, name: str, size: str, tenant: str = TENANT) -> None:
        reply = self.client(tenant).create(name, {"size": size})
        if reply.get("Err"):
            raise RuntimeError(f"Create {name}: {reply['Err']}")

    def mount(self, name: str, tenant: str = TENANT) -> tuple[str, str]:
        """Mount ``name`` under a new mount ID: that ID, and the mountpoint."""
        mount_id = uuid.uuid4().hex
        reply = self.client(tenant).call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
        if reply.get("Err"):
            raise RuntimeError(f"Mount {name}: {reply['Err']}")
        self.mounted.add((tenant, name, mount_id))
        return mount_id, str(reply["Mountpoint"])

    def unmount(self, name: str, mount_id: str, tenant: str = TENANT) -> None:
        reply = self.client(tenant).call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
        if reply.get("Err"):
            raise RuntimeError(f"Unmount {name}: {reply['Err']}")
        self.mounted.discard((tenant, name, mount_id))

    def remove(self, name: str, tenant: str = TENANT) -> None:
        reply = self.client(tenant).remove(name)
        if reply.get("Err"):
            raise RuntimeError(f"Remove {name}: {reply['Err']}")
