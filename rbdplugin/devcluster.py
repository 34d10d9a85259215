"""A throwaway single-node Ceph cluster on 127.0.0.1, for development and tests.

One ceph-mon and one ceph-osd (memstore by default) run in the foreground under
processes we track by pid; everything lives under one directory: config,
keyrings, data, logs, and a ready-made ``rbdplugin.toml`` that serves each
tenant. No systemd, no /etc/ceph. ``start`` on a directory that holds a stopped
cluster starts that cluster again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import rados
import rbd

from rbdplugin.errors import CephError, RbdPluginError
from rbdplugin.process import Command, pid_alive, pid_cmdline, run_sync, spawn, stop_pid

log = logging.getLogger(__name__)

Store = Literal["memstore", "bluestore"]
STORES: tuple[Store, ...] = ("memstore", "bluestore")
READY_TIMEOUT = 60.0

# Ceph's defaults: a PG's read lease is osd_pool_default_read_lease_ratio (0.8) times
# osd_heartbeat_grace (20 s).
HEARTBEAT_GRACE = 20.0
DEFAULT_READ_LEASE = 16.0

_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
public network = 127.0.0.0/8
run dir = {dir}/run
pid file = {dir}/run/$name.pid
log file = {dir}/log/$name.log
admin socket = {dir}/run/$name.asok
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd crush chooseleaf type = 0
paxos propose interval = 0.05
osd client watch timeout = {watch_timeout}
osd pool default read lease ratio = {lease_ratio}
rados mon op timeout = 15
rados osd op timeout = 15
client mount timeout = 15

[mon]
mon data = {dir}/mon.$id
mon cluster log file = {dir}/log/cluster.log

[osd]
osd data = {dir}/osd.$id
osd objectstore = {store}
osd fast shutdown = false
memstore device bytes = {memstore_bytes}
bluestore block path = {dir}/osd.$id.block
bluestore block create = true
bluestore block size = {bluestore_bytes}
osd max object name len = 460
osd max object namespace len = 64

[client]
admin socket =
keyring = {dir}/ceph.client.admin.keyring
log file = {dir}/log/client.log
"""


@dataclass(frozen=True)
class ClusterState:
    fsid: str
    v1_port: int
    v2_port: int
    store: Store
    tenants: tuple[str, ...]
    pids: dict[str, int]

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "fsid": self.fsid,
            "v1_port": self.v1_port,
            "v2_port": self.v2_port,
            "store": self.store,
            "tenants": list(self.tenants),
            "pids": self.pids,
        }
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        data = json.loads(text)
        return cls(
            fsid=data["fsid"],
            v1_port=data["v1_port"],
            v2_port=data["v2_port"],
            store=data["store"],
            tenants=tuple(data["tenants"]),
            pids={k: int(v) for k, v in data["pids"].items()},
        )


class DevCluster:
    """The cluster living in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def admin_keyring(self) -> Path:
        return self.root / "ceph.client.admin.keyring"

    @property
    def daemon_config(self) -> Path:
        return self.root / "rbdplugin.toml"

    def keyring(self, user: str) -> Path:
        return self.root / f"ceph.client.{user}.keyring"

    # -- state -------------------------------------------------------------------------

    def state(self) -> ClusterState | None:
        path = self.root / "cluster.json"
        return ClusterState.from_json(path.read_text()) if path.exists() else None

    def _save(self, state: ClusterState) -> None:
        tmp = self.root / "cluster.json.tmp"
        tmp.write_text(state.to_json())
        tmp.replace(self.root / "cluster.json")

    def running(self) -> dict[str, int]:
        """Our daemons that are alive now, by name."""
        state = self.state()
        if state is None:
            return {}
        return {name: pid for name, pid in state.pids.items() if self._ours(pid)}

    def _ours(self, pid: int) -> bool:
        # A recycled pid must never be mistaken for (or killed as) one of our daemons.
        return pid_alive(pid) and str(self.conf) in pid_cmdline(pid)

    # -- start -------------------------------------------------------------------------

    def start(
        self,
        tenants: Sequence[str] = ("rbd",),
        socket_dir: Path | None = None,
        store: Store = "memstore",
        watch_timeout: int = 30,
        read_lease: float = DEFAULT_READ_LEASE,
    ) -> ClusterState:
        """Start (creating on first use) the cluster and the tenants' pools and users.

        ``watch_timeout`` and ``read_lease`` (seconds) apply when the cluster is created.
        A test that freezes the only OSD for longer than its PGs' read lease needs a
        longer one: Ceph Pacific leaves such PGs laggy, parking every op, until the OSD
        restarts (its laggy-PG recheck defect, tracker 53806, fixed in Reef).
        """
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        state = self.state()
        if state is not None and self.running().keys() == {"mon.a", "osd.0"}:
            log.info("dev cluster in %s already runs", self.root)
        elif state is None:
            state = self._create(store, watch_timeout, read_lease)
        else:
            self.stop()
            state = self._launch(state)
        with self.admin() as cluster:
            self._wait_osd_up(cluster)
            for tenant in tenants:
                self._ensure_tenant(cluster, tenant)
        all_tenants = tuple(dict.fromkeys((*state.tenants, *tenants)))
        state = ClusterState(
            state.fsid, state.v1_port, state.v2_port, state.store, all_tenants, state.pids
        )
        self._save(state)
        self._write_daemon_config(all_tenants, socket_dir or self.root / "plugins")
        log.info("dev cluster ready in %.1f s: %s", time.monotonic() - started, self.conf)
        return state

    def _create(self, store: Store, watch_timeout: int, read_lease: float) -> ClusterState:
        if any(self.root.iterdir()):
            raise RbdPluginError(
                f"{self.root} is not empty and holds no dev cluster: use an empty or new directory"
            )
        v1, v2 = free_ports(2)
        fsid = str(uuid.uuid4())
        for sub in ("run", "log"):
            (self.root / sub).mkdir()
        self.conf.write_text(
            _CONF.format(
                fsid=fsid,
                v1=v1,
                v2=v2,
                dir=self.root,
                store=store,
                watch_timeout=watch_timeout,
                lease_ratio=f"{read_lease / HEARTBEAT_GRACE:.3f}",
                memstore_bytes=16 * 1024**3,
                bluestore_bytes=64 * 1024**3,
            )
        )
        self._make_keyrings()
        monmap, addrs = str(self.root / "monmap"), f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        self._ceph_tool("monmaptool", "--create", "--fsid", fsid, "--addv", "a", addrs, monmap)
        mon_keyring = str(self.root / "mon.keyring")
        self._ceph_tool(
            "ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", mon_keyring,
            "-c", str(self.conf),
        )  # fmt: skip
        state = ClusterState(fsid, v1, v2, store, (), {})
        state = self._spawn(state, "mon.a", ["ceph-mon", "-i", "a", "-f", "-c", str(self.conf)])
        with self.admin() as cluster:
            osd_uuid = str(uuid.uuid4())
            key = self._ceph_tool("ceph-authtool", "--gen-print-key").stdout.strip()
            _mon(
                cluster, {"prefix": "osd new", "uuid": osd_uuid}, json.dumps({"cephx_secret": key})
            )
        osd_dir = self.root / "osd.0"
        osd_dir.mkdir()
        _write_secret(osd_dir / "keyring", f"[osd.0]\n\tkey = {key}\n")
        self._ceph_tool(
            "ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "-c", str(self.conf)
        )
        return self._spawn(state, "osd.0", self._osd_argv())

    def _launch(self, state: ClusterState) -> ClusterState:
        state = self._spawn(state, "mon.a", ["ceph-mon", "-i", "a", "-f", "-c", str(self.conf)])
        return self._spawn(state, "osd.0", self._osd_argv())

    def _osd_argv(self) -> list[str]:
        return ["ceph-osd", "-i", "0", "-f", "-c", str(self.conf)]

    def _spawn(self, state: ClusterState, name: str, argv: list[str]) -> ClusterState:
        pid = spawn(argv, self.root / "log" / f"{name}.out")
        state = ClusterState(
            state.fsid, state.v1_port, state.v2_port, state.store, state.tenants,
            {**state.pids, name: pid},
        )  # fmt: skip
        self._save(state)
        return state

    def _make_keyrings(self) -> None:
        mon = str(self.root / "mon.keyring")
        admin = str(self.admin_keyring)
        new = ("ceph-authtool", "--create-keyring")
        self._ceph_tool(*new, mon, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._ceph_tool(
            *new, admin, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
            "--cap", "osd", "allow *", "--cap", "mgr", "allow *", "--cap", "mds", "allow *",
        )  # fmt: skip
        self._ceph_tool("ceph-authtool", mon, "--import-keyring", admin)
        for path in (mon, admin):
            os.chmod(path, 0o600)

    def _ceph_tool(self, *argv: str) -> Any:
        return run_sync(Command(argv, timeout=30))

    @contextmanager
    def admin(self) -> Iterator[rados.Rados]:
        cluster = rados.Rados(conffile=str(self.conf), rados_id="admin")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                cluster.connect(timeout=5)
                break
            except rados.Error as exc:
                if time.monotonic() > deadline:
                    raise CephError(f"dev cluster in {self.root} did not come up: {exc}") from exc
                self._check_alive()
                time.sleep(0.1)
        try:
            yield cluster
        finally:
            cluster.shutdown()

    def _check_alive(self) -> None:
        state = self.state()
        for name, pid in (state.pids if state else {}).items():
            if not pid_alive(pid):
                tail = (self.root / "log" / f"{name}.out").read_text(errors="replace")[-1500:]
                raise CephError(f"{name} of the dev cluster exited at start:\n{tail}")

    def _wait_osd_up(self, cluster: rados.Rados) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            dump = json.loads(_mon(cluster, {"prefix": "osd dump", "format": "json"}))
            if any(osd["up"] for osd in dump["osds"]):
                return
            self._check_alive()
            time.sleep(0.1)
        raise CephError(f"osd.0 of the dev cluster in {self.root} did not come up")

    def _ensure_tenant(self, cluster: rados.Rados, tenant: str) -> None:
        if not cluster.pool_exists(tenant):
            _mon(cluster, {"prefix": "osd pool create", "pool": tenant, "pg_num": 8, "pgp_num": 8})
            with cluster.open_ioctx(tenant) as ioctx:
                rbd.RBD().pool_init(ioctx, False)
        caps = ["mon", "profile rbd", "osd", f"profile rbd pool={tenant}"]
        out = _mon(cluster, {"prefix": "auth get-or-create", "entity": f"client.{tenant}",
                             "caps": caps, "format": "json"})  # fmt: skip
        key = json.loads(out)[0]["key"]
        _write_secret(self.keyring(tenant), f"[client.{tenant}]\n\tkey = {key}\n")

    def _write_daemon_config(self, tenants: Sequence[str], socket_dir: Path) -> None:
        lines = [
            "# Written by `rbdplugin devcluster start`: serves each tenant of this dev cluster.",
            "[daemon]",
            f'socket_dir = "{socket_dir}"',
            f'state_dir = "{self.root / "state"}"',
            f'mount_root = "{self.root / "mounts"}"',
            'metrics = ""',
            "",
            "[ceph]",
            f'conf = "{self.conf}"',
        ]
        for tenant in tenants:
            lines += [
                "",
                f"[tenants.{tenant}]",
                f'pool = "{tenant}"',
                f'user = "{tenant}"',
                f'keyring = "{self.keyring(tenant)}"',
            ]
        self.daemon_config.write_text("\n".join(lines) + "\n")

    # -- stop --------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop the daemons this cluster started (OSD first); return their names."""
        state = self.state()
        if state is None:
            return []
        stopped = []
        for name in sorted(state.pids, key=lambda n: n != "osd.0"):
            pid = state.pids[name]
            if self._ours(pid):
                if not stop_pid(pid):
                    raise RbdPluginError(f"{name} (pid {pid}) did not stop")
                stopped.append(name)
        self._save(ClusterState(state.fsid, state.v1_port, state.v2_port, state.store,
                                state.tenants, {}))  # fmt: skip
        return stopped

    def stop_one(self, name: str) -> None:
        """Stop one daemon (``mon.a`` or ``osd.0``) cleanly; its data stays (memstore
        saves it on a clean stop) and :meth:`start_one` starts it again on that data."""
        pid = self.running().get(name)
        if pid is None:
            raise RbdPluginError(f"{name} of the dev cluster in {self.root} is not running")
        if not stop_pid(pid):
            raise RbdPluginError(f"{name} (pid {pid}) did not stop")

    def start_one(self, name: str) -> None:
        """Start a daemon that :meth:`stop_one` stopped, and wait until it serves."""
        state = self.state()
        if state is None or name not in state.pids:
            raise RbdPluginError(f"the dev cluster in {self.root} has no {name}")
        if name in self.running():
            raise RbdPluginError(f"{name} of the dev cluster in {self.root} already runs")
        argv = self._osd_argv() if name == "osd.0" else ["ceph-mon", "-i", "a", "-f", "-c",
                                                          str(self.conf)]  # fmt: skip
        self._spawn(state, name, argv)
        with self.admin() as cluster:
            self._wait_osd_up(cluster)

    @contextmanager
    def frozen(self, *names: str) -> Iterator[None]:
        """Some daemons stopped with SIGSTOP (a black hole: connections are accepted, nothing
        answers); always continued afterwards."""
        running = self.running()
        missing = [name for name in names if name not in running]
        if missing:
            raise RbdPluginError(f"{', '.join(missing)} of the dev cluster do(es) not run")
        try:
            for name in names:
                os.kill(running[name], signal.SIGSTOP)
            yield
        finally:
            for name in names:
                os.kill(running[name], signal.SIGCONT)

    def status(self) -> dict[str, Any]:
        state = self.state()
        running = self.running()
        return {
            "dir": str(self.root),
            "exists": state is not None,
            "fsid": state.fsid if state else None,
            "mon_host": f"127.0.0.1:{state.v1_port}" if state else None,
            "tenants": list(state.tenants) if state else [],
            "running": running,
            "stopped": sorted(set(state.pids) - set(running)) if state else [],
        }


def _mon(cluster: rados.Rados, cmd: dict[str, Any], inbuf: str = "") -> str:
    ret, out, err = cluster.mon_command(json.dumps(cmd), inbuf.encode(), timeout=30)
    if ret != 0:
        raise CephError(f"ceph {cmd['prefix']} failed: {err or os.strerror(-ret)}")
    return bytes(out).decode()


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
