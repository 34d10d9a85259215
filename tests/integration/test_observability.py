"""Metrics as Prometheus sees them, health as a probe sees it, status as an operator
sees it. A real Prometheus server (Debian's package) scrapes the daemon.

Counters move by exactly what a test did: each test reads the daemon's exposition
before it acts and expects that plus its own work, so neither another test's work
nor a double count passes. Tests marked ``prometheus`` need Debian's prometheus
package (prometheus, promtool); RBDPLUGIN_SKIP_PROMETHEUS=1 leaves them out.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rbdplugin.devcluster import DevCluster
from tests import oracle
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import DaemonProcess, PluginClient, unique, wait_until

MiB = 1 << 20
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening (yet)
        return 0, str(exc)


def scrape(address: str) -> Samples:
    """Every sample of the daemon's /metrics, read as a Prometheus client parses it."""
    status, text = http_get(f"http://{address}/metrics")
    assert status == 200, text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the daemon does not export it (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def mount(client: PluginClient, name: str, mount_id: str) -> Path:
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": mount_id})
    assert reply["Err"] == "", reply
    return Path(reply["Mountpoint"])


@pytest.fixture(scope="module")
def observed(cluster: DevCluster, daemon_factory: StartDaemon) -> tuple[DaemonProcess, str]:
    address = f"127.0.0.1:{free_port()}"
    daemon = daemon_factory(tenant_toml(cluster, "alpha", default_size="128M"),
                            wait_for="alpha", metrics=address)  # fmt: skip
    return daemon, address


@pytest.fixture(scope="module")
def prometheus(
    observed: tuple[DaemonProcess, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    root = tmp_path_factory.mktemp("prometheus")
    _, target = observed
    (root / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: rbdplugin\n    static_configs:\n      - targets: ['{target}']\n"
    )
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address={listen}"],
        stdout=(root / "log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://{listen}"
    try:
        wait_until(
            lambda: http_get(f"{url}/-/ready")[0] == 200 if proc.poll() is None else True,
            30,
            "prometheus",
        )
        assert proc.poll() is None, (root / "log").read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def query(prometheus: str, expr: str) -> float | None:
    status, body = http_get(f"{prometheus}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert status == 200, body
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def eventually(
    prometheus: str, expr: str, check: Any, timeout: float = 20, want: str = "another value"
) -> float:
    """The value of ``expr`` once Prometheus has one that passes ``check``."""
    deadline = time.monotonic() + timeout
    while True:
        got = query(prometheus, expr)
        if got is not None and check(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{expr}: Prometheus sees {got} after {timeout} s, want {want}")
        time.sleep(0.2)


def absent(prometheus: str, expr: str, timeout: float = 20) -> None:
    wait_until(lambda: query(prometheus, expr) is None, timeout, f"{expr} gone")


@pytest.mark.prometheus
def test_prometheus_sees_the_work(observed: tuple[DaemonProcess, str], prometheus: str) -> None:
    daemon, address = observed
    client, name = daemon.client("alpha"), unique("prom")
    base = scrape(address)

    def then(metric: str, delta: float, **labels: str) -> None:
        """Prometheus sees ``metric`` moved by exactly ``delta`` since ``base``."""
        selector = ",".join(['job="rbdplugin"', *(f'{k}="{v}"' for k, v in labels.items())])
        expected = sample(base, metric, **labels) + delta
        eventually(prometheus, f"{metric}{{{selector}}}", lambda v: v == expected,
                   want=f"{expected} (moved by {delta})")  # fmt: skip

    assert client.create(name, {"size": "128M"}) == {"Err": ""}
    path = mount(client, name, "p1")
    assert mount(client, name, "p2") == path  # a second reference: no second mapping
    blob = path / "ten-mib"
    blob.write_bytes(b"\xa5" * (10 * MiB))
    subprocess.run(["sync", "-f", str(blob)], check=True)
    assert "unknown option" in client.create(unique(), {"colour": "red"})["Err"]  # a failure

    for stage in ("create", "map", "probe", "mkfs", "mount"):
        then("rbdplugin_stage_duration_seconds_count", 1, stage=stage)
    then("rbdplugin_requests_total", 2, driver="alpha", endpoint="VolumeDriver.Mount", outcome="ok")
    then("rbdplugin_request_duration_seconds_count", 2, endpoint="VolumeDriver.Mount")
    then("rbdplugin_requests_total", 1, driver="alpha", endpoint="VolumeDriver.Create",
         outcome="error")  # fmt: skip
    then("rbdplugin_errors_total", 1, reason="invalid_argument")
    then("rbdplugin_volumes_mounted", 1, tenant="alpha")
    then("rbdplugin_mount_references", 2, tenant="alpha")
    then("rbdplugin_mapped_devices", 1, mapper="fuse")
    volume = f'{{job="rbdplugin",tenant="alpha",volume="{name}"}}'
    used = eventually(prometheus, f"rbdplugin_volume_fs_used_bytes{volume}",
                      lambda v: v >= 10 * MiB)  # fmt: skip
    assert used < 64 * MiB
    size = eventually(prometheus, f"rbdplugin_volume_fs_size_bytes{volume}", lambda v: v > 0)
    assert 96 * MiB < size <= 128 * MiB  # the 128M volume, less the filesystem's own
    eventually(prometheus, 'rbdplugin_ceph_connected{job="rbdplugin",tenant="alpha"}',
               lambda v: v == 1)  # fmt: skip
    eventually(prometheus, 'process_resident_memory_bytes{job="rbdplugin"}', lambda v: v > 0)

    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "p1"}) == {"Err": ""}
    then("rbdplugin_mount_references", 1, tenant="alpha")
    then("rbdplugin_volumes_mounted", 1, tenant="alpha")
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "p2"}) == {"Err": ""}
    then("rbdplugin_volumes_mounted", 0, tenant="alpha")
    then("rbdplugin_mount_references", 0, tenant="alpha")
    for stage in ("unmount", "unmap"):
        then("rbdplugin_stage_duration_seconds_count", 1, stage=stage)
    absent(prometheus, f"rbdplugin_volume_fs_used_bytes{volume}")


def test_lock_conflicts_are_counted_by_the_refused_host(
    cluster: DevCluster, daemon_factory: StartDaemon, observed: tuple[DaemonProcess, str]
) -> None:
    holder, holder_address = observed  # host-a
    address = f"127.0.0.1:{free_port()}"
    refused = daemon_factory(tenant_toml(cluster, "alpha", default_size="128M"),
                             wait_for="alpha", host_id="host-b", metrics=address)  # fmt: skip

    def conflicts(at: str) -> float:
        return sample(scrape(at), "rbdplugin_lock_conflicts_total", tenant="alpha")

    def lock_errors(at: str) -> float:
        return sample(scrape(at), "rbdplugin_errors_total", reason="lock_conflict")

    name = unique("conflict")
    assert holder.client("alpha").create(name, {"size": "128M"}) == {"Err": ""}
    mount(holder.client("alpha"), name, "h1")
    before = (conflicts(address), lock_errors(address), conflicts(holder_address))
    try:
        reply = refused.client("alpha").call("VolumeDriver.Mount", {"Name": name, "ID": "r1"})
        assert "is mounted read-write on host host-a" in reply["Err"]
        after = (conflicts(address), lock_errors(address), conflicts(holder_address))
        assert after == (before[0] + 1, before[1] + 1, before[2])
    finally:
        holder.client("alpha").call("VolumeDriver.Unmount", {"Name": name, "ID": "h1"})
    mount(refused.client("alpha"), name, "r2")  # free now: no conflict to count
    assert conflicts(address) == before[0] + 1
    reply = refused.client("alpha").call("VolumeDriver.Unmount", {"Name": name, "ID": "r2"})
    assert reply == {"Err": ""}


# Every family the README documents, in every exposition (the present-state ones too,
# even when nothing is mounted).
FAMILIES = (
    "rbdplugin_requests", "rbdplugin_request_duration_seconds", "rbdplugin_stage_duration_seconds",
    "rbdplugin_errors", "rbdplugin_volumes_mounted", "rbdplugin_mount_references",
    "rbdplugin_mapped_devices", "rbdplugin_volume_fs_size_bytes", "rbdplugin_volume_fs_used_bytes",
    "rbdplugin_lock_conflicts", "rbdplugin_takeovers", "rbdplugin_fencings",
    "rbdplugin_leases_lost", "rbdplugin_ceph_connected", "rbdplugin_build_info",
    "process_resident_memory_bytes",
)  # fmt: skip


@pytest.mark.prometheus
def test_promtool_accepts_the_exposition(observed: tuple[DaemonProcess, str]) -> None:
    _, address = observed
    status, text = http_get(f"http://{address}/metrics")
    assert status == 200
    families = {family.name for family in text_string_to_metric_families(text)}
    assert set(FAMILIES) <= families, set(FAMILIES) - families
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_health_endpoints(observed: tuple[DaemonProcess, str]) -> None:
    _, address = observed
    assert http_get(f"http://{address}/healthz") == (200, json.dumps({"status": "ok"}, indent=1))
    status, body = http_get(f"http://{address}/readyz")
    report = json.loads(body)
    assert status == 200 and report["ready"] is True
    assert report["drivers"]["alpha"] == {
        **report["drivers"]["alpha"],
        "listening": True,
        "ceph": "up",
    }


def test_readyz_follows_the_cluster(daemon_factory: StartDaemon, short_tmp: Path) -> None:
    own = DevCluster(short_tmp / "ready-ceph")
    own.start(tenants=["ready"])
    try:
        address = f"127.0.0.1:{free_port()}"
        daemon_factory(
            "[tenants.ready]\n" f'keyring = "{own.keyring("ready")}"\n',
            wait_for="ready", conf=own.conf, metrics=address,
        )  # fmt: skip
        url = f"http://{address}/readyz"
        wait_until(lambda: http_get(url)[0] == 200, 20, "ready with the cluster up")
        own.stop()
        wait_until(lambda: http_get(url)[0] == 503, 30, "unready with the cluster down")
        report = json.loads(http_get(url)[1])
        assert report["ready"] is False and report["drivers"]["ready"]["ceph"].startswith("down")
        assert report["drivers"]["ready"]["listening"] is True
        own.start(tenants=["ready"])
        took = wait_until(lambda: http_get(url)[0] == 200, 60, "ready again with the cluster back")
        print(f"ready again {took:.1f} s after the cluster came back")
    finally:
        own.stop()


def test_status_command_asks_the_daemon(observed: tuple[DaemonProcess, str]) -> None:
    daemon, _ = observed
    client, name = daemon.client("alpha"), unique("st")
    assert client.create(name, {"size": "128M"}) == {"Err": ""}
    path = mount(client, name, "s1")
    assert mount(client, name, "s1") == path
    try:
        run = [sys.executable, "-m", "rbdplugin", "status", "--config", str(daemon.config)]
        table = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
        assert table.returncode == 0, table.stderr
        assert "host host-a, mapper fuse, ready" in table.stdout
        row = next(line for line in table.stdout.splitlines() if f" {name} " in line)
        assert row.split()[:4] == ["alpha", name, "rw", "mounted"] and "s1=2" in row
        as_json = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60,
                                            check=True).stdout)  # fmt: skip
        volume = next(v for v in as_json["volumes"] if v["volume"] == name)
        assert volume["mounts"] == {"s1": 2} and volume["mountpoint"] == str(path)
        # The device it names is the one really mounted there, attached to this volume's export.
        export = daemon.config.parent / "state" / "exports" / "alpha" / "-" / name
        assert oracle.loops_backed_by(export) == [volume["device"]]
        assert (oracle.mount_at(path) or {}).get("source") == volume["device"]
        control = daemon.config.parent / "state" / "control.sock"
        assert control.stat().st_mode & 0o777 == 0o600
    finally:
        for _ in range(2):
            client.call("VolumeDriver.Unmount", {"Name": name, "ID": "s1"})
