"""The devcloud: a real Keystone, a real Cinder on the dev Ceph cluster, and the Nova stand-in.

One devcloud per module, started and stopped through its command line. The journey talks
plain HTTP (the project's venv has no openstacksdk) the way a Cinder-mode plugin will:
log in with the application credential from the written clouds.yaml, find Cinder and
Nova in the catalog, create a volume, attach it through Nova to the pretend server, use
the disk that appears on this host, detach, delete. What the host has is read from /proc
and /sys with the test oracle, never with the product's own parsers.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rbdplugin.devcloud import venv
from tests import oracle
from tests.helpers import wait_until

pytestmark = pytest.mark.ceph

BY_ID = Path("/dev/disk/by-id")
VOLUME_API = {"OpenStack-API-Version": "volume 3.71"}
BLOCK = 4096


def devcloud(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbdplugin.devcloud", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


def call(method: str, url: str, token: str | None = None, body: Any = None,
         headers: dict[str, str] | None = None) -> Reply:  # fmt: skip
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, method=method, data=data)  # noqa: S310 - checked above
    request.add_header("Content-Type", "application/json")
    request.add_header("Accept", "application/json")
    if token is not None:
        request.add_header("X-Auth-Token", token)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            status, got, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, got, raw = exc.code, dict(exc.headers), exc.read()
    return Reply(status, got, json.loads(raw) if raw.strip() else None)


@dataclass(frozen=True)
class Cloud:
    root: Path
    state: dict[str, Any]
    start_seconds: float

    def server(self, name: str) -> str:
        return str(next(s["id"] for s in self.state["servers"] if s["name"] == name))


@dataclass(frozen=True)
class Session:
    token: str
    cinder: str
    nova: str

    def volume(self, volume_id: str) -> dict[str, Any]:
        reply = call("GET", f"{self.cinder}/volumes/{volume_id}", self.token, headers=VOLUME_API)
        assert reply.status == 200, reply
        volume: dict[str, Any] = reply.body["volume"]
        return volume

    def wait_status(self, volume_id: str, status: str, timeout: float = 60) -> float:
        return wait_until(lambda: self.volume(volume_id)["status"] == status, timeout,
                          f"volume {volume_id} {status}")  # fmt: skip

    def create_volume(self, name: str) -> str:
        reply = call("POST", f"{self.cinder}/volumes", self.token,
                     {"volume": {"size": 1, "name": name}}, VOLUME_API)  # fmt: skip
        assert reply.status == 202, reply
        volume_id = str(reply.body["volume"]["id"])
        self.wait_status(volume_id, "available", 30)
        return volume_id

    def delete_volume(self, volume_id: str) -> None:
        reply = call("DELETE", f"{self.cinder}/volumes/{volume_id}", self.token,
                     headers=VOLUME_API)  # fmt: skip
        assert reply.status == 202, reply
        wait_until(lambda: call("GET", f"{self.cinder}/volumes/{volume_id}", self.token,
                                headers=VOLUME_API).status == 404, 30, "volume deleted")  # fmt: skip

    def attachments(self, server_id: str) -> str:
        return f"{self.nova}/servers/{server_id}/os-volume_attachments"

    def attach(self, server_id: str, volume_id: str) -> Reply:
        return call("POST", self.attachments(server_id), self.token,
                    {"volumeAttachment": {"volumeId": volume_id}})  # fmt: skip

    def detach(self, server_id: str, volume_id: str) -> Reply:
        return call("DELETE", f"{self.attachments(server_id)}/{volume_id}", self.token)


def _clouds_yaml_auth(path: Path) -> dict[str, str]:
    # The devcloud writes every value as a JSON string (valid YAML); read it back plainly.
    found = re.findall(r'^\s+(\w+): (".*")$', path.read_text(), re.MULTILINE)
    return {key: json.loads(value) for key, value in found}


def _endpoint(catalog: list[dict[str, Any]], kind: str) -> str:
    service = next(s for s in catalog if s["type"] == kind)
    return str(next(e["url"] for e in service["endpoints"] if e["interface"] == "public"))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    root = Path(tempfile.mkdtemp(prefix="rbdp-dcl-", dir="/tmp"))
    started = time.monotonic()
    done = devcloud("start", "--dir", str(root))
    seconds = time.monotonic() - started
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        state = json.loads((root / "devcloud.json").read_text())
        print(f"devcloud start: {seconds:.1f} s ({state['timings']}); RSS MiB: "
              + ", ".join(f"{n} {_rss_mib(p):.0f}" for n, p in state["pids"].items()))  # fmt: skip
        yield Cloud(root, state, seconds)
    finally:
        devcloud("stop", "--dir", str(root))
        if not any(e["target"].startswith(f"{root}/") for e in oracle.mountinfo()):
            subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(scope="module")
def session(cloud: Cloud) -> Session:
    auth = _clouds_yaml_auth(cloud.root / "clouds.yaml")
    body = {"auth": {"identity": {"methods": ["application_credential"],
                                  "application_credential": {
                                      "id": auth["application_credential_id"],
                                      "secret": auth["application_credential_secret"]}}}}  # fmt: skip
    reply = call("POST", f"{auth['auth_url']}/auth/tokens", body=body)
    assert reply.status == 201, reply
    catalog = reply.body["token"]["catalog"]
    assert reply.body["token"]["project"]["id"] == cloud.state["project_id"]
    return Session(
        token=reply.headers["X-Subject-Token"],
        cinder=_endpoint(catalog, "volumev3"),
        nova=_endpoint(catalog, "compute"),
    )


def test_start_runs_everything_and_writes_the_tenant_config(cloud: Cloud) -> None:
    assert cloud.start_seconds < 120 + 300  # the first start may build the OpenStack venv
    status = devcloud("status", "--dir", str(cloud.root), timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    running = json.loads(status.stdout)["running"]
    assert set(running) == {"keystone", "cinder", "nova"}
    for name, pid in running.items():
        assert any(str(cloud.root) in arg for arg in oracle.argv_of(pid)), name
        assert oracle.process_state(pid) not in ("", "Z"), name

    clouds = cloud.root / "clouds.yaml"
    assert os.stat(clouds).st_mode & 0o077 == 0
    assert 'auth_type: "v3applicationcredential"' in clouds.read_text()
    config = tomllib.loads((cloud.root / "rbdplugin.toml").read_text())
    tenant = config["tenants"]["vm"]
    assert tenant["backend"] == "cinder"
    assert tenant["cloud"] == "devcloud"
    assert tenant["clouds_yaml"] == str(clouds)
    assert tenant["server_id"] == cloud.server("vm")


def test_openstacksdk_logs_in_with_the_clouds_yaml(cloud: Cloud) -> None:
    script = (
        "import json, openstack\n"
        "c = openstack.connect(cloud='devcloud')\n"
        f"s = c.compute.get_server('{cloud.server('vm')}')\n"
        "print(json.dumps({'project': c.current_project_id, 'server': s.status,"
        " 'volumes': [v.id for v in c.block_storage.volumes()]}))\n"
    )
    env = {"OS_CLIENT_CONFIG_FILE": str(cloud.root / "clouds.yaml"), "PATH": os.environ["PATH"]}
    done = subprocess.run([str(venv.python(venv.venv_path())), "-c", script], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["project"] == cloud.state["project_id"]
    assert seen["server"] == "ACTIVE"


def test_bad_or_missing_token_gets_401(cloud: Cloud, session: Session) -> None:
    server = f"{session.nova}/servers/{cloud.server('vm')}"
    for token in ("gAAAAABnot-a-real-token", None):
        reply = call("GET", server, token)
        assert reply.status == 401, reply
        assert reply.headers["WWW-Authenticate"].startswith('Keystone uri="http://127.0.0.1:')
        reply = call("POST", f"{server}/os-volume_attachments", token,
                     {"volumeAttachment": {"volumeId": "x"}})  # fmt: skip
        assert reply.status == 401, reply
    reply = call("GET", f"{session.cinder}/volumes", "gAAAAABnot-a-real-token",
                 headers=VOLUME_API)  # fmt: skip
    assert reply.status == 401, reply  # the real keystonemiddleware in the real Cinder
    ok = call("GET", server, session.token)
    assert ok.status == 200 and ok.body["server"]["status"] == "ACTIVE", ok


def test_external_events_need_the_service_role_and_are_answered_per_event(
    cloud: Cloud, session: Session
) -> None:
    """Cinder's events (volume-extended after an in-use extend) as Nova answers them: the
    service role only, then a code and status per event, 207 if some failed."""
    events = f"{session.nova}/os-server-external-events"
    vm = cloud.server("vm")
    extended = {"name": "volume-extended", "server_uuid": vm, "tag": "no-such-volume"}
    nova_251 = {"OpenStack-API-Version": "compute 2.51"}
    refused = call("POST", events, session.token, {"events": [extended]}, nova_251)
    assert refused.status == 403, refused  # a member of the project: not Nova's service
    password = (cloud.root / "secrets" / "nova.password").read_text().strip()
    login = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "nova", "domain": {"id": "default"}, "password": password}}},
        "scope": {"project": {"name": "service", "domain": {"id": "default"}}}}}  # fmt: skip
    auth_url = _clouds_yaml_auth(cloud.root / "clouds.yaml")["auth_url"]
    reply = call("POST", f"{auth_url}/auth/tokens", body=login)
    assert reply.status == 201, reply
    service = reply.headers["X-Subject-Token"]
    unknown = {**extended, "server_uuid": "00000000-0000-0000-0000-000000000000"}
    untagged = {"name": "volume-extended", "server_uuid": vm}
    answer = call("POST", events, service, {"events": [extended, unknown, untagged]}, nova_251)
    assert answer.status == 207, answer
    assert answer.body == {"events": [
        {**extended, "code": 200, "status": "completed"},  # Nova's compute logs the rest
        {**unknown, "code": 404, "status": "failed"},
        {**untagged, "code": 400, "status": "failed"},
    ]}  # fmt: skip
    answer = call("POST", events, service, {"events": [extended]}, nova_251)
    assert answer.status == 200 and answer.body["events"][0]["code"] == 200, answer
    assert call("POST", events, service, {"events": [unknown]}, nova_251).status == 404
    too_old = {"OpenStack-API-Version": "compute 2.50"}  # volume-extended came with 2.51
    assert call("POST", events, service, {"events": [extended]}, too_old).status == 400


def _read_direct(path: Path, offset: int) -> bytes:
    buffer = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buffer], offset) == BLOCK
    finally:
        os.close(fd)
    return bytes(buffer)


def _write_direct(path: Path, offset: int, data: bytes) -> None:
    buffer = mmap.mmap(-1, BLOCK)
    buffer.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buffer], offset) == BLOCK
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_is_here(cloud: Cloud, volume_id: str) -> Path | None:
    """The by-id link of ``volume_id`` if it leads to a loop device backed by our export."""
    link = BY_ID / f"virtio-{volume_id[:20]}"
    if not link.is_symlink():
        return None
    export = cloud.root / "nova" / "exports" / "cinder" / "-" / f"volume-{volume_id}"
    assert oracle.loops_backed_by(export) == [os.path.realpath(link)]
    assert oracle.fstype_at(export).startswith("fuse")
    return link


def _disk_is_gone(cloud: Cloud, volume_id: str) -> bool:
    export = cloud.root / "nova" / "exports" / "cinder" / "-" / f"volume-{volume_id}"
    return (
        not os.path.lexists(BY_ID / f"virtio-{volume_id[:20]}")
        and not oracle.loops_backed_by(export)
        and not oracle.is_mounted(export)
        and not oracle.pids_with_argument("qemu-storage-daemon", f"mountpoint={export}")
    )


def test_volume_journey_through_nova(cloud: Cloud, session: Session) -> None:
    server = cloud.server("vm")
    volume_id = session.create_volume("journey")
    assert session.volume(volume_id)["size"] == 1

    reply = session.attach(server, volume_id)
    assert reply.status == 200, reply
    attachment = reply.body["volumeAttachment"]
    assert attachment["volumeId"] == volume_id and attachment["serverId"] == server
    assert attachment["device"].startswith("/dev/vd")  # a name nobody should trust
    took = session.wait_status(volume_id, "in-use")
    wait_until(lambda: _disk_is_here(cloud, volume_id) is not None, 10, "by-id link")
    link = BY_ID / f"virtio-{volume_id[:20]}"
    print(f"attach: in-use {took:.1f} s after Nova's answer")
    volume = session.volume(volume_id)
    assert [a["server_id"] for a in volume["attachments"]] == [server]
    listed = call("GET", session.attachments(server), session.token).body["volumeAttachments"]
    assert [a["volumeId"] for a in listed] == [volume_id]
    shown = call("GET", f"{session.nova}/servers/{server}", session.token).body["server"]
    assert shown["os-extended-volumes:volumes_attached"][0]["id"] == volume_id
    twice = session.attach(server, volume_id)
    assert twice.status == 400, twice

    payload = (b"rbdplugin devcloud " + volume_id.encode()).ljust(BLOCK, b"\0")
    _write_direct(link, 1024 * 1024, payload)
    assert _read_direct(link, 1024 * 1024) == payload

    reply = session.detach(server, volume_id)
    assert reply.status == 202, reply
    session.wait_status(volume_id, "available")
    wait_until(lambda: _disk_is_gone(cloud, volume_id), 10, "disk gone after detach")
    assert call("GET", session.attachments(server), session.token).body["volumeAttachments"] == []

    # The bytes went to the Cinder volume's RBD image: a second attach reads them back.
    assert session.attach(server, volume_id).status == 200
    session.wait_status(volume_id, "in-use")
    wait_until(lambda: _disk_is_here(cloud, volume_id) is not None, 10, "by-id link again")
    assert _read_direct(link, 1024 * 1024) == payload
    assert session.detach(server, volume_id).status == 202
    session.wait_status(volume_id, "available")
    wait_until(lambda: _disk_is_gone(cloud, volume_id), 10, "disk gone after detach")
    session.delete_volume(volume_id)


def test_volume_on_another_server_is_refused_here(cloud: Cloud, session: Session) -> None:
    other, mine = cloud.server("other-vm"), cloud.server("vm")
    volume_id = session.create_volume("elsewhere")
    assert session.attach(other, volume_id).status == 200
    session.wait_status(volume_id, "in-use")
    assert not os.path.lexists(BY_ID / f"virtio-{volume_id[:20]}")  # that server is elsewhere
    refused = session.attach(mine, volume_id)
    assert refused.status == 400, refused
    assert "badRequest" in refused.body, refused
    assert session.detach(other, volume_id).status == 202
    session.wait_status(volume_id, "available")
    session.delete_volume(volume_id)


def test_stop_leaves_nothing_behind(cloud: Cloud, session: Session) -> None:
    server = cloud.server("vm")
    volume_id = session.create_volume("left-attached")
    assert session.attach(server, volume_id).status == 200
    session.wait_status(volume_id, "in-use")
    wait_until(lambda: _disk_is_here(cloud, volume_id) is not None, 10, "by-id link")
    state = json.loads((cloud.root / "devcloud.json").read_text())
    ceph = json.loads((cloud.root / "ceph" / "cluster.json").read_text())
    pids = {**state["pids"], **ceph["pids"]}
    exports = [pid for pid in oracle.pids_of_program_with("qemu-storage-daemon", str(cloud.root))]
    assert exports

    done = devcloud("stop", "--dir", str(cloud.root), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, pid in {**pids, **{f"export {p}": p for p in exports}}.items():
        assert oracle.process_state(pid) in ("", "Z"), f"{name} (pid {pid}) still runs"
    inside = f"{cloud.root}/"
    assert [e for e in oracle.mountinfo() if e["target"].startswith(inside)] == []
    assert [d for d, f in oracle.loop_devices().items() if f.startswith(inside)] == []
    assert not os.path.lexists(BY_ID / f"virtio-{volume_id[:20]}")
    still = [p for p in os.listdir("/proc") if p.isdigit() and oracle.process_state(int(p)) != "Z"
             and any(inside in arg for arg in oracle.argv_of(int(p)))]  # fmt: skip
    assert still == []
    status = devcloud("status", "--dir", str(cloud.root), timeout=60)
    assert status.returncode == 3
    assert json.loads(status.stdout)["running"] == {}
