"""The devcloud: a dev Ceph cluster, a real Keystone, a real Cinder and a Nova stand-in.

Everything runs on 127.0.0.1 with random free ports (kept across restarts: the Keystone
catalog holds them) and lives under one directory DIR:

    DIR/ceph/          the dev Ceph cluster (:class:`rbdplugin.devcluster.DevCluster`);
                       Cinder's pool and cephx user are both ``cinder``
    DIR/keystone/      keystone.conf, SQLite, Fernet and credential key repositories
    DIR/cinder/        cinder.conf, SQLite, locks
    DIR/nova/          the stand-in's spec, its block device mappings, FUSE exports
    DIR/secrets/       passwords and the admin's clouds.yaml (0700)
    DIR/log/           every process's output and the services' logs
    DIR/devcloud.json  ports, pids, pretend servers, the last start's timings
    DIR/clouds.yaml    cloud ``devcloud``: the tenant's application credential
    DIR/rbdplugin.toml a Cinder-mode tenant ``vm`` serving the pretend server ``vm``

Keystone and Cinder run from the OpenStack venv (:mod:`rbdplugin.devcloud.venv`), each
as one foreground process of ours (the launchers next to this file); the Nova stand-in
runs from this venv. Pids are recorded, and ``stop`` stops exactly those (checked
against their command lines, so a recycled pid is never touched), then powers the
pretend server off: its disks (loop devices, FUSE exports, by-id links) go away and
come back at the next ``start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rbdplugin.devcloud import venv
from rbdplugin.devcloud.disks import (
    BY_ID,
    Disk,
    DiskMaker,
    HostDiskMaker,
    HostPlaces,
    QmpDiskMaker,
)
from rbdplugin.devcluster import DevCluster, free_ports
from rbdplugin.errors import RbdPluginError, VolumeBusy
from rbdplugin.process import Command, pid_alive, pid_cmdline, run_sync, spawn, stop_pid

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CLOUD = "devcloud"
REGION = "RegionOne"
PROJECT = "vm-project"
MEMBER = "vm-user"
APP_CREDENTIAL = "rbdplugin-vm"
CEPH_TENANT = "cinder"  # pool and cephx user of Cinder's RBD back-end
BACKEND = "ceph"  # Cinder's enabled_backends entry
TENANT = "vm"  # the rbdplugin tenant (Docker driver) in the written rbdplugin.toml
READY_TIMEOUT = 120.0
# Stop order: the stand-in first (no new attach work), Cinder, then Keystone.
SERVICES = ("nova", "cinder", "keystone")


class DevCloudError(RbdPluginError):
    reason = "devcloud"


@dataclass(frozen=True)
class PretendServer:
    id: str
    name: str
    disks: str  # "host": its disks appear on this host; "elsewhere": they never do;
    # "qmp": they are hot-plugged into the running QEMU listening for QMP at ``qmp``
    qmp: str = ""


@dataclass(frozen=True)
class CloudState:
    ports: dict[str, int]
    servers: tuple[PretendServer, ...]
    token_lifetime: int
    project_id: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CloudState:
        data = json.loads(text)
        data["servers"] = tuple(PretendServer(**s) for s in data["servers"])
        return cls(**data)


class DevCloud:
    """The devcloud living in ``root``."""

    def __init__(self, root: Path, by_id: Path = BY_ID) -> None:
        self.root = root.resolve()
        self.by_id = by_id
        self.ceph = DevCluster(self.root / "ceph")

    # -- paths -----------------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def clouds_yaml(self) -> Path:
        return self.path("clouds.yaml")

    @property
    def admin_clouds_yaml(self) -> Path:
        return self.path("secrets", "clouds-admin.yaml")

    @property
    def daemon_config(self) -> Path:
        return self.path("rbdplugin.toml")

    def url(self, service: str) -> str:
        state = self._need_state()
        base = f"http://127.0.0.1:{state.ports[service]}"
        return {"keystone": f"{base}/v3", "cinder": f"{base}/v3", "nova": f"{base}/v2.1"}[service]

    def _marker(self, service: str) -> Path:
        """The path on each service's command line that says it is ours."""
        return {
            "keystone": self.path("keystone", "keystone.json"),
            "cinder": self.path("cinder", "cinder.conf"),
            "nova": self.path("nova", "nova.json"),
        }[service]

    # -- state -----------------------------------------------------------------------------

    def state(self) -> CloudState | None:
        path = self.path("devcloud.json")
        return CloudState.from_json(path.read_text()) if path.exists() else None

    def _need_state(self) -> CloudState:
        state = self.state()
        if state is None:
            raise DevCloudError(f"{self.root} holds no devcloud: run devcloud start first")
        return state

    def _save(self, state: CloudState) -> CloudState:
        tmp = self.path("devcloud.json.tmp")
        tmp.write_text(state.to_json())
        tmp.replace(self.path("devcloud.json"))
        return state

    def running(self) -> dict[str, int]:
        """Our OpenStack processes that are alive now, by name."""
        state = self.state()
        if state is None:
            return {}
        return {name: pid for name, pid in state.pids.items() if self._ours(name, pid)}

    def _ours(self, name: str, pid: int) -> bool:
        return pid_alive(pid) and str(self._marker(name)) in pid_cmdline(pid)

    def server(self, name: str = TENANT) -> PretendServer:
        return next(s for s in self._need_state().servers if s.name == name)

    # -- start -----------------------------------------------------------------------------

    def start(self, token_lifetime: int = 3600, guest_qmp: Path | None = None) -> CloudState:
        """Start (or start again) everything; return once Cinder serves its pool.

        ``guest_qmp``: the pretend server ``vm`` is the QEMU guest with this QMP socket
        (the ``qmp`` disk maker; the guest may boot later). Kept in DIR/devcloud.json:
        a later start without it keeps the saved choice.

        A start that fails stops what it started (the logs stay in DIR/log)."""
        self.root.mkdir(parents=True, exist_ok=True)
        qmp = str(guest_qmp.absolute()) if guest_qmp is not None else None
        state = self.state()
        if state is not None and self._all_running() and (qmp is None or self.server().qmp == qmp):
            log.info("devcloud in %s already runs", self.root)
            return state
        if state is None:
            state = self._create(token_lifetime, qmp)
        else:
            self.stop()
            state = self._need_state()
            if qmp is not None:
                state = replace(state, servers=_with_guest(state.servers, qmp))
            state = self._save(replace(state, token_lifetime=token_lifetime))
        try:
            return self._launch(state)
        except BaseException:
            log.error("devcloud start failed; stopping what it started (logs: %s)",
                      self.path("log"))  # fmt: skip
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def _launch(self, state: CloudState) -> CloudState:
        started = t = time.monotonic()
        timings: dict[str, float] = {}

        def lap(what: str) -> float:
            timings[what] = round(time.monotonic() - t, 2)
            return time.monotonic()

        openstack = venv.ensure_venv()
        t = lap("venv")
        self._write_keystone_config(state)
        state = self._spawn(state, "keystone", self._launcher(openstack, "keystone"))
        self.ceph.start(tenants=(CEPH_TENANT,))
        t = lap("ceph")
        self._write_cinder_config(state, openstack)
        env = {**_clean_env(), "CEPH_KEYRING": str(self.ceph.keyring(CEPH_TENANT))}
        state = self._spawn(state, "cinder", self._launcher(openstack, "cinder"), env)
        self._wait_http("keystone", self.url("keystone"))
        t = lap("keystone")
        result = self._populate(openstack)
        state = self._save(replace(state, project_id=result["project_id"]))
        t = lap("populate_and_cinder")
        self._write_nova_spec(state)
        nova = [sys.executable, "-m", "rbdplugin.devcloud.nova", str(self._marker("nova"))]
        state = self._spawn(state, "nova", nova)
        self._wait_http("nova", f"http://127.0.0.1:{state.ports['nova']}/")
        lap("nova")
        self._write_clouds_yaml(result)
        self._write_daemon_config()
        timings["total"] = round(time.monotonic() - started, 2)
        state = self._save(replace(state, timings=timings))
        log.info("devcloud ready in %.1f s: %s, %s", timings["total"], self.clouds_yaml,
                 self.daemon_config)  # fmt: skip
        return state

    def _launcher(self, openstack: Path, service: str) -> list[str]:
        script = HERE / f"{service}_service.py"
        return [str(venv.python(openstack)), str(script), str(self._marker(service))]

    def _all_running(self) -> bool:
        ceph = self.ceph.running().keys() == {"mon.a", "osd.0"}
        return ceph and self.running().keys() == set(SERVICES)

    def _create(self, token_lifetime: int, qmp: str | None) -> CloudState:
        if any(self.root.iterdir()):
            raise DevCloudError(
                f"{self.root} is not empty and holds no devcloud: use an empty or new directory"
            )
        for sub in ("keystone", "cinder", "nova", "log"):
            self.path(sub).mkdir()
        self.path("secrets").mkdir(mode=0o700)
        for name in ("admin", "member", "cinder", "nova"):
            _write_secret(self._password_file(name), secrets.token_urlsafe(24) + "\n")
        ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
        servers: tuple[PretendServer, ...] = (
            PretendServer(str(uuid.uuid4()), TENANT, "host"),
            PretendServer(str(uuid.uuid4()), "other-vm", "elsewhere"),
        )
        if qmp is not None:
            servers = _with_guest(servers, qmp)
        return self._save(CloudState(ports, servers, token_lifetime))

    def _password_file(self, name: str) -> Path:
        return self.path("secrets", f"{name}.password")

    def _spawn(
        self, state: CloudState, name: str, argv: list[str], env: Mapping[str, str] | None = None
    ) -> CloudState:
        pid = spawn(argv, self.path("log", f"{name}.out"), env=env or _clean_env())
        return self._save(replace(state, pids={**state.pids, name: pid}))

    def _wait_http(self, name: str, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own URL
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            self._check_alive(name)
            time.sleep(0.05)
        raise DevCloudError(f"{name} did not answer at {url} within {READY_TIMEOUT:.0f} s")

    def _check_alive(self, *names: str) -> None:
        state = self._need_state()
        for name in names or tuple(state.pids):
            pid = state.pids.get(name)
            if pid is not None and not pid_alive(pid):
                tail = self.path("log", f"{name}.out").read_text(errors="replace")[-2000:]
                raise DevCloudError(f"{name} of the devcloud exited at start:\n{tail}")

    # -- Keystone ----------------------------------------------------------------------------

    def _write_keystone_config(self, state: CloudState) -> None:
        k = self.path("keystone")
        conf = k / "keystone.conf"
        conf.write_text(f"""\
[DEFAULT]
log_file = {self.path("log", "keystone.log")}
use_stderr = false

[database]
connection = sqlite:///{k / "keystone.sqlite"}

[token]
provider = fernet
expiration = {state.token_lifetime}

[fernet_tokens]
key_repository = {k / "fernet-keys"}

[fernet_receipts]
key_repository = {k / "fernet-receipts"}

[credential]
key_repository = {k / "credential-keys"}

[cache]
enabled = true
backend = dogpile.cache.memory

[identity]
password_hash_rounds = 4
""")
        spec = {
            "config": str(conf),
            "port": state.ports["keystone"],
            "public_url": f"http://127.0.0.1:{state.ports['keystone']}/v3",
            "admin_password_file": str(self._password_file("admin")),
            "setup_done": str(k / "setup.done"),
        }
        self._marker("keystone").write_text(json.dumps(spec, indent=2))

    def _populate(self, openstack: Path) -> dict[str, Any]:
        """Users, projects, catalog and credential (once), then wait for Cinder's pool."""
        output = self.path("secrets", "populate.json")
        spec = {
            "auth_url": self.url("keystone"),
            "region": REGION,
            "admin_password_file": str(self._password_file("admin")),
            "project": PROJECT,
            "member": MEMBER,
            "member_password_file": str(self._password_file("member")),
            "services": {
                "cinder": {
                    "type": "volumev3",
                    "roles": ["admin", "service"],
                    "url": f"{self.url('cinder')}/%(project_id)s",
                    "password_file": str(self._password_file("cinder")),
                },
                "nova": {
                    "type": "compute",
                    "roles": ["admin", "service"],
                    "url": self.url("nova"),
                    "password_file": str(self._password_file("nova")),
                },
            },
            "app_credential_name": APP_CREDENTIAL,
            "cinder_backend": BACKEND,
            "cinder_timeout": READY_TIMEOUT,
            "output": str(output),
            "wait_only": output.exists(),
        }
        spec_path = self.path("secrets", "populate-spec.json")
        _write_secret(spec_path, json.dumps(spec, indent=2))
        argv = [str(venv.python(openstack)), str(HERE / "populate.py"), str(spec_path)]
        try:
            run_sync(Command(argv, timeout=READY_TIMEOUT + 60, env=_clean_env()))
        except RbdPluginError as exc:
            self._check_alive("keystone", "cinder")
            raise DevCloudError(f"populating Keystone or waiting for Cinder failed: {exc}") from exc
        result: dict[str, Any] = json.loads(output.read_text())
        return result

    # -- Cinder --------------------------------------------------------------------------------

    def _write_cinder_config(self, state: CloudState, openstack: Path) -> None:
        c = self.path("cinder")
        etc = openstack / "etc" / "cinder"
        self._marker("cinder").write_text(f"""\
[DEFAULT]
transport_url = fake://
auth_strategy = keystone
host = devcloud
my_ip = 127.0.0.1
state_path = {c}
log_file = {self.path("log", "cinder.log")}
use_stderr = false
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = {state.ports["cinder"]}
osapi_volume_workers = 1
api_paste_config = {etc / "api-paste.ini"}
resource_query_filters_file = {etc / "resource_filters.json"}
enabled_backends = {BACKEND}
periodic_fuzzy_delay = 0
graceful_shutdown_timeout = 5
quota_volumes = -1
quota_snapshots = -1
quota_gigabytes = -1
quota_backups = -1
quota_backup_gigabytes = -1

[database]
connection = sqlite:///{c / "cinder.sqlite"}

[oslo_concurrency]
lock_path = {c / "locks"}

[keystone_authtoken]
www_authenticate_uri = http://127.0.0.1:{state.ports["keystone"]}
auth_url = http://127.0.0.1:{state.ports["keystone"]}
auth_type = password
username = cinder
password = {self._password_file("cinder").read_text().strip()}
user_domain_id = default
project_name = service
project_domain_id = default
service_token_roles = service
service_token_roles_required = true

# Cinder's own account for Nova's admin-only calls (the volume-extended event).
[nova]
auth_type = password
auth_url = http://127.0.0.1:{state.ports["keystone"]}
username = nova
password = {self._password_file("nova").read_text().strip()}
user_domain_id = default
project_name = service
project_domain_id = default
interface = public

[{BACKEND}]
volume_driver = cinder.volume.drivers.rbd.RBDDriver
volume_backend_name = {BACKEND}
rbd_pool = {CEPH_TENANT}
rbd_user = {CEPH_TENANT}
rbd_ceph_conf = {self.ceph.conf}
rbd_secret_uuid = {uuid.uuid5(uuid.NAMESPACE_URL, str(self.root))}
report_discard_supported = true
""")
        os.chmod(self._marker("cinder"), 0o600)

    # -- Nova stand-in ---------------------------------------------------------------------------

    def _write_nova_spec(self, state: CloudState) -> None:
        spec = {
            "port": state.ports["nova"],
            "keystone_url": self.url("keystone"),
            "user": "nova",
            "password_file": str(self._password_file("nova")),
            "project": "service",
            "servers": [{**asdict(s), "project_id": state.project_id} for s in state.servers],
            "ceph_dir": str(self.ceph.root),
            "exports": str(self.path("nova", "exports")),
            "state": str(self.path("nova", "state.json")),
            "by_id": str(self.by_id),
            "timeout": 60.0,
        }
        self._marker("nova").write_text(json.dumps(spec, indent=2))

    # -- what a tenant's plugin reads ---------------------------------------------------------

    def _write_clouds_yaml(self, result: Mapping[str, Any]) -> None:
        auth = {
            "auth_url": self.url("keystone"),
            "application_credential_id": result["app_credential_id"],
            "application_credential_secret": result["app_credential_secret"],
        }
        _write_secret(self.clouds_yaml, _clouds(CLOUD, "v3applicationcredential", auth))
        admin = {
            "auth_url": self.url("keystone"),
            "username": "admin",
            "password": self._password_file("admin").read_text().strip(),
            "project_name": "admin",
            "user_domain_id": "default",
            "project_domain_id": "default",
        }
        _write_secret(self.admin_clouds_yaml, _clouds(f"{CLOUD}-admin", "password", admin))

    def _write_daemon_config(self) -> None:
        vm = self.server()
        lines = [
            "# Written by `rbdplugin devcloud start`: Cinder mode against the devcloud in",
            f"# {self.root}. Serve it with `rbdplugin serve --config {self.daemon_config}`.",
            "[daemon]",
            f'socket_dir = "{self.path("plugins")}"',
            f'state_dir = "{self.path("state")}"',
            f'mount_root = "{self.path("mounts")}"',
            'metrics = ""',
            "",
            f"[tenants.{TENANT}]",
            'backend = "cinder"',
            f'cloud = "{CLOUD}"',
            f'clouds_yaml = "{self.clouds_yaml}"',
            f"# The Nova stand-in's pretend server {vm.name!r}: "
            + (
                f"its disks appear in the QEMU guest with QMP socket {vm.qmp}\n"
                "# (serve this config inside that guest; see rbdplugin.devcloud.bridge)."
                if vm.disks == "qmp"
                else "its disks appear on this host."
            ),
            f'server_id = "{vm.id}"',
            "# Without server_id: the config drive, then metadata_url, then the DMI product UUID.",
            '# metadata_url = "http://169.254.169.254/openstack/latest/meta_data.json"',
            'default_size = "1G"',
            'default_fstype = "ext4"',
            'remove_policy = "delete"',
            '# volume_type = ""          # Cinder\'s default type when empty',
            '# availability_zone = ""    # Cinder\'s default zone when empty',
            '# attach_timeout = "60s"    # from the Nova attach call until the disk is here',
            '# detach_timeout = "60s"    # until the disk is gone and the volume available',
        ]
        self.daemon_config.write_text("\n".join(lines) + "\n")

    # -- stop -------------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop our processes (the stand-in, the pretend server's disks, Cinder, Keystone,
        Ceph); return what was stopped. Ceph keeps running if a disk could not be removed."""
        state = self.state()
        if state is None:
            return self.ceph.stop()
        stopped = [name for name in SERVICES[:1] if self._stop(state, name)]
        problems = self.power_off()
        stopped += [name for name in SERVICES[1:] if self._stop(state, name)]
        self._save(replace(state, pids={}))
        if problems:
            raise DevCloudError(
                "the pretend server's disks could not all be removed (Ceph left running): "
                + "; ".join(problems)
            )
        return stopped + self.ceph.stop()

    def _stop(self, state: CloudState, name: str) -> bool:
        pid = state.pids.get(name)
        if pid is None or not self._ours(name, pid):
            return False
        if not stop_pid(pid, timeout=15):
            raise DevCloudError(f"{name} (pid {pid}) did not stop")
        return True

    def power_off(self) -> list[str]:
        """Remove the disks the pretend servers have on this host, or in a running QEMU
        guest (the ``qmp`` maker; nothing to do if it is not running); return what failed."""
        places = HostPlaces(self.ceph.root, self.path("nova", "exports"), self.by_id)
        work: list[tuple[DiskMaker, Disk]] = []
        host = HostDiskMaker(places, timeout=30)
        work += [(host, disk) for disk in {d.volume_id: d for d in self._host_disks()}.values()]
        state = self.state()
        for server in state.servers if state else ():
            if server.disks == "qmp" and server.qmp:
                guest = QmpDiskMaker(replace(places, qmp_socket=Path(server.qmp)), timeout=30)
                work += [(guest, disk) for disk in self._bdm_disks(server.id)]
        problems = []
        for maker, disk in work:
            try:
                asyncio.run(maker.unplug(disk))
            except (VolumeBusy, RbdPluginError, OSError) as exc:
                problems.append(f"volume {disk.volume_id}: {exc}")
        return problems

    def _bdm_disks(self, server_id: str) -> list[Disk]:
        """Disks of the stand-in's BDMs of one server that got as far as a connection."""
        bdms = self.path("nova", "state.json")
        data = json.loads(bdms.read_text()) if bdms.exists() else {}
        return [
            Disk(b["volume_id"], b["connection_info"])
            for b in data.get(server_id, [])
            if b.get("connection_info")
        ]

    def _host_disks(self) -> list[Disk]:
        """Disks of the stand-in's BDMs on host servers, and leftovers in its exports dir."""
        state = self.state()
        hosts = {s.id for s in state.servers if s.disks == "host"} if state else set()
        found = []
        for server_id in hosts:
            found += self._bdm_disks(server_id)
        exports = self.path("nova", "exports")
        for export in exports.glob("*/-/volume-*") if exports.is_dir() else []:
            if export.suffix != ".log":
                found.append(_leftover(export.parts[-3], export.name))
        return found

    def status(self) -> dict[str, Any]:
        state = self.state()
        running = self.running()
        return {
            "dir": str(self.root),
            "exists": state is not None,
            "urls": {name: self.url(name) for name in SERVICES} if state else {},
            "ports": {n: state.ports[n] for n in ("keystone", "cinder", "nova")} if state else {},
            "running": running,
            "stopped": sorted(set(SERVICES) - set(running)) if state else [],
            "ceph": self.ceph.status(),
            "servers": [asdict(s) for s in state.servers] if state else [],
            "project_id": state.project_id if state else None,
            "clouds_yaml": str(self.clouds_yaml),
            "daemon_config": str(self.daemon_config),
            "last_start_seconds": state.timings if state else {},
            "openstack_venv": str(venv.venv_path()),
        }


def _with_guest(servers: tuple[PretendServer, ...], qmp: str) -> tuple[PretendServer, ...]:
    """The servers with ``vm`` turned into the QEMU guest at QMP socket ``qmp``."""
    return tuple(replace(s, disks="qmp", qmp=qmp) if s.name == TENANT else s for s in servers)


def _leftover(pool: str, image: str) -> Disk:
    info = {
        "driver_volume_type": "rbd",
        "data": {"name": f"{pool}/{image}", "auth_username": CEPH_TENANT},
    }
    return Disk(image.removeprefix("volume-"), info)


def _clouds(name: str, auth_type: str, auth: Mapping[str, str]) -> str:
    # JSON strings are valid YAML scalars: no YAML library needed, nothing mis-quoted.
    lines = ["clouds:", f"  {name}:", f"    auth_type: {json.dumps(auth_type)}", "    auth:"]
    lines += [f"      {key}: {json.dumps(value)}" for key, value in auth.items()]
    lines += [
        f"    region_name: {json.dumps(REGION)}",
        '    interface: "public"',
        '    identity_api_version: "3"',
    ]
    return "\n".join(lines) + "\n"


def _clean_env() -> dict[str, str]:
    """Our environment minus what would steer the OpenStack venv's python or clients."""
    steering = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in steering and not k.startswith("OS_")}


def _write_secret(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)
