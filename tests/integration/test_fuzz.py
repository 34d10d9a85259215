"""Generated requests from docs/plugin-api.openapi.yaml against a real daemon (schemathesis).

The daemon serves one tenant in an RBD namespace of its own, on the real dev cluster, over
its Unix socket. Requests are schemathesis' positive and negative cases of every operation;
names, mount IDs and sizes are mostly drawn from small pools so that Create, Mount, Unmount
and Remove meet existing volumes. Checked: the daemon never crashes or hits an unexpected
error; every non-2xx answer is ``{"Err": "..."}`` without a stack trace; every 200 has the
documented shape; afterwards the images in Ceph (read with admin creds) are exactly the
volumes List reports, nothing is left once everything is unmounted and removed; RSS and fd
count after the run are where they were after a warm-up.

``RBDPLUGIN_FUZZ_EXAMPLES`` sets the number of generated requests (``make fuzz``: 10000).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import rados
import rbd
import requests
import schemathesis
import urllib3
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rbdplugin.devcluster import DevCluster
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import Admin, DaemonProcess, PluginClient

Case = schemathesis.Case[Any]

SPEC = Path(__file__).resolve().parents[2] / "docs" / "plugin-api.openapi.yaml"
EXAMPLES = int(os.environ.get("RBDPLUGIN_FUZZ_EXAMPLES", "600"))
WARM_UP = max(60, EXAMPLES // 10)
NAMES = tuple(f"fz{i}" for i in range(6))
MOUNT_IDS = ("c1", "c2", "c3")
SIZES = ("8M", "16M", "64M", "100M", "300M", "512M", "0M", "1.5M", "2P", "64m", "32MiB")
# Create options that mostly succeed, so that Mount and Remove find volumes.
PLAUSIBLE_OPTS = (
    st.sampled_from(
        [
            None,
            {},
            {"fstype": "ext4"},
            {"fstype": "xfs", "size": "300M"},
            {"features": "layering,exclusive-lock"},
            {"features": "layering,exclusive-lock,object-map,fast-diff"},
            {"mount-options": "noatime,discard"},
            {"mkfs-options": "-m 0 -L data"},
            {"Size": "32M"},
            {"access": "ro"},
            {"pool": "beta"},
        ]
    )
    | st.builds(lambda size: {"size": size}, st.sampled_from(SIZES))
    | st.builds(lambda source: {"source": source}, st.sampled_from(NAMES))
)
# RSS may wander a little (allocator, caches); a leak of one buffer per request would not.
RSS_TOLERANCE = 10 * 1024 * 1024
FD_TOLERANCE = 4


# -- HTTP over the Unix socket for requests --------------------------------------------------


class _UnixConnection(urllib3.connection.HTTPConnection):  # type: ignore[misc]
    socket_path = ""

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(self.socket_path)
        self.sock = sock


class UnixAdapter(HTTPAdapter):  # type: ignore[misc]
    """Every URL goes to one Unix socket (requests-unixsocket's idea in a few lines)."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__()
        connection = type("Connection", (_UnixConnection,), {"socket_path": str(socket_path)})
        self.pool = urllib3.HTTPConnectionPool("localhost", maxsize=1)
        self.pool.ConnectionCls = connection

    def get_connection(self, url: str, proxies: object = None) -> urllib3.HTTPConnectionPool:
        return self.pool

    def get_connection_with_tls_context(
        self, request: object, verify: object, proxies: object = None, cert: object = None
    ) -> urllib3.HTTPConnectionPool:
        return self.pool

    def close(self) -> None:
        self.pool.close()
        super().close()


# -- the daemon under test and what the test reads of it ---------------------------------------


@dataclass
class Target:
    daemon: DaemonProcess
    client: PluginClient
    session: requests.Session
    namespace: str

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def target(cluster: DevCluster, admin: Admin, daemon_factory: StartDaemon) -> Iterator[Target]:
    # An RBD namespace of beta's pool, new for this run: the images in it are only ours.
    namespace = f"fuzz-{uuid.uuid4().hex[:8]}"
    with admin.cluster.open_ioctx("beta") as ioctx:
        rbd.RBD().namespace_create(ioctx, namespace)
    tenants = tenant_toml(
        cluster, "beta", table="fuzz", namespace=namespace, remove_policy="delete",
        default_size="64M", max_total_size="4G",
    )  # fmt: skip
    daemon = daemon_factory(tenants, wait_for="fuzz")
    session = requests.Session()
    session.mount("http://", UnixAdapter(daemon.socket_dir / "fuzz.sock"))
    yield Target(daemon, daemon.client("fuzz"), session, namespace)
    session.close()


# -- one run of generated requests -------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)  # 200s by endpoint
    mount_ids: set[tuple[str, str]] = field(default_factory=set)  # (name, ID) mounted
    failures: list[str] = field(default_factory=list)

    def fail(self, case: Case, status: int, text: str, why: str) -> None:
        if len(self.failures) < 20:
            body = json.dumps(case.body, default=str)[:300] if case.body is not None else "-"
            self.failures.append(f"{case.operation.label} {body} -> {status} {text[:300]}: {why}")


def steered(case: Case, data: st.DataObject) -> Case:
    """Mostly pool names, mount IDs and plausible options, so calls meet real volumes."""
    body = case.body
    if not isinstance(body, dict):
        return case
    if isinstance(body.get("Name"), str) and data.draw(st.integers(0, 9)) < 8:
        body["Name"] = data.draw(st.sampled_from(NAMES))
    if "ID" in body and data.draw(st.booleans()):
        body["ID"] = data.draw(st.sampled_from(MOUNT_IDS))
    if case.operation.label.endswith("Create") and data.draw(st.integers(0, 9)) < 6:
        body["Opts"] = cast(Any, data.draw(PLAUSIBLE_OPTS))
    return case


def check(target: Target, case: Case, response: requests.Response, tally: Tally) -> None:
    status, text = response.status_code, response.text
    tally.requests += 1
    tally.by_status[status] = tally.by_status.get(status, 0) + 1
    try:
        answer = json.loads(text)
    except ValueError:
        tally.fail(case, status, text, "answer is not JSON")
        return
    if status == 200:
        endpoint = case.operation.label.rpartition(".")[2]
        tally.done[endpoint] = tally.done.get(endpoint, 0) + 1
        if endpoint == "Mount":
            assert isinstance(case.body, dict)
            tally.mount_ids.add((str(case.body["Name"]), str(case.body["ID"])))
    if status != 200:
        if not (isinstance(answer, dict) and set(answer) == {"Err"}):
            tally.fail(case, status, text, 'not {"Err": ...}')
        elif not isinstance(answer["Err"], str) or not answer["Err"]:
            tally.fail(case, status, text, "empty Err")
        elif "Traceback" in answer["Err"] or "internal error" in answer["Err"]:
            tally.fail(case, status, text, "unexpected error inside the daemon")
        return
    label = case.operation.label
    if (
        label.startswith("POST /VolumeDriver.")
        and "Capabilities" not in label
        and answer.get("Err") != ""
    ):
        tally.fail(case, status, text, 'a 200 without "Err": ""')
    try:
        case.validate_response(
            response,
            checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
        )
    except AssertionError as exc:  # schemathesis' failures are AssertionErrors
        tally.fail(case, status, text, f"not the documented shape: {str(exc)[:300]}")


def run(target: Target, count: int, tally: Tally) -> None:
    raw = yaml.safe_load(SPEC.read_text())
    schema = schemathesis.openapi.from_dict(raw)
    cases = st.one_of(
        schema.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
        schema.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
    )

    # No shrinking or replay: the server has state; failures are collected, not raised.
    @settings(
        max_examples=count, deadline=None, database=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(case=cases, data=st.data())
    def one(case: Case, data: st.DataObject) -> None:
        case = steered(case, data)
        response = case.call(base_url="http://localhost", session=target.session, timeout=60)
        check(target, case, response, tally)

    one()


def companions(admin: Admin, namespace: str) -> dict[str, str]:
    """Read-only companion volumes (omap of rbdplugin.companions): name -> source."""
    with admin.cluster.open_ioctx("beta") as ioctx:
        ioctx.set_namespace(namespace)
        try:
            with rados.ReadOpCtx() as op:
                entries, _ = ioctx.get_omap_vals(op, "", "", 100_000)
                ioctx.operate_read_op(op, "rbdplugin.companions")
                return {key: json.loads(value)["source"] for key, value in entries}
        except rados.ObjectNotFound:
            return {}


def check_ceph_matches_list(target: Target, admin: Admin) -> set[str]:
    """Every image and companion in Ceph is a volume List reports, and vice versa."""
    listed = set(target.client.names())
    images = admin.images("beta", namespace=target.namespace)
    sources = companions(admin, target.namespace)
    assert not images & set(sources), f"names both image and companion: {images & set(sources)}"
    assert set(sources.values()) <= images, f"companions of missing images: {sources}"
    assert listed == images | set(sources), (
        f"List {sorted(listed)} but images {sorted(images)}, companions {sorted(sources)}"
    )
    return listed


def clean_up(target: Target, tally: Tally) -> None:
    """Unmount every reference of every mount ID that was mounted, then remove every volume."""
    client = target.client
    pairs = sorted(tally.mount_ids)
    for _ in range(100):  # each round drops one reference of every (name, ID) still mounted
        pairs = [
            (name, mount_id)
            for name, mount_id in pairs
            if client.call("VolumeDriver.Path", {"Name": name}).get("Mountpoint", "") != ""
        ]
        if not pairs:
            break
        for name, mount_id in pairs:
            client.call("VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
    for name in client.names():
        path = client.call("VolumeDriver.Path", {"Name": name})
        assert path == {"Mountpoint": "", "Err": ""}, (name, path, target.daemon.log()[-3000:])
    for _ in range(3):  # companions first, then their sources
        for name in client.names():
            client.remove(name)
    assert client.names() == []


def test_generated_requests(target: Target, admin: Admin) -> None:
    pid = target.pid
    warm, tally = Tally(), Tally()
    started = time.monotonic()
    run(target, WARM_UP, warm)
    clean_up(target, warm)
    rss_before, fds_before = rss_bytes(pid), fd_count(pid)

    run(target, EXAMPLES, tally)
    assert target.alive() and target.pid == pid, target.daemon.log()[-3000:]
    volumes = check_ceph_matches_list(target, admin)
    clean_up(target, tally)
    elapsed = time.monotonic() - started
    rss_after, fds_after = rss_bytes(pid), fd_count(pid)

    assert check_ceph_matches_list(target, admin) == set()
    print(
        f"fuzz: {warm.requests} warm-up + {tally.requests} requests in {elapsed:.0f} s, "
        f"{len(volumes)} volumes at the end, statuses {dict(sorted(tally.by_status.items()))}, done {tally.done}, RSS {rss_before >> 20} -> "
        f"{rss_after >> 20} MiB, fds {fds_before} -> {fds_after}"
    )
    assert warm.failures + tally.failures == []
    assert tally.requests == EXAMPLES
    assert tally.by_status.get(200, 0) > EXAMPLES // 10  # the calls really did things
    assert tally.by_status.get(500, 0) > 0 and tally.by_status.get(400, 0) > 0
    log = target.daemon.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert rss_after - rss_before < RSS_TOLERANCE, (rss_before, rss_after)
    assert abs(fds_after - fds_before) <= FD_TOLERANCE, (fds_before, fds_after)
