"""Metrics as Prometheus sees them, health as a probe sees it, status as an operator
sees it. A real Prometheus server (Debian's package) scrapes the daemon."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbdplugin.devcluster import DevCluster
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import DaemonProcess, unique, wait_until


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
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (make setup installs Debian's prometheus)")
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


def eventually(prometheus: str, expr: str, check: Any, timeout: float = 20) -> float:
    seen: list[float | None] = []

    def ok() -> bool:
        got = query(prometheus, expr)
        seen.append(got)
        return got is not None and bool(check(got))

    wait_until(ok, timeout, f"{expr} (last seen {seen[-1:]})")
    return query(prometheus, expr) or 0.0


def test_prometheus_sees_the_work(observed: tuple[DaemonProcess, str], prometheus: str) -> None:
    daemon, _ = observed
    client, name = daemon.client("alpha"), unique("prom")
    assert client.create(name, {"size": "128M"}) == {"Err": ""}
    reply = client.call("VolumeDriver.Mount", {"Name": name, "ID": "p1"})
    assert reply["Err"] == ""
    blob = Path(reply["Mountpoint"]) / "ten-mib"
    blob.write_bytes(b"\xa5" * (10 << 20))
    subprocess.run(["sync", "-f", str(blob)], check=True)
    assert "unknown option" in client.create(unique(), {"colour": "red"})["Err"]  # a failure

    eventually(
        prometheus, 'rbdplugin_stage_duration_seconds_count{stage="mount"}', lambda v: v >= 1
    )
    eventually(prometheus, 'rbdplugin_stage_duration_seconds_count{stage="mkfs"}', lambda v: v >= 1)
    used = eventually(prometheus, f'rbdplugin_volume_fs_used_bytes{{volume="{name}"}}',
                      lambda v: v >= 10 << 20)  # fmt: skip
    assert used < 64 << 20
    eventually(prometheus, 'rbdplugin_volumes_mounted{tenant="alpha"}', lambda v: v == 1)
    eventually(prometheus, 'rbdplugin_requests_total{endpoint="VolumeDriver.Create",outcome="error"}',
               lambda v: v >= 1)  # fmt: skip
    eventually(prometheus, 'rbdplugin_errors_total{reason="invalid_argument"}', lambda v: v >= 1)
    eventually(prometheus, 'rbdplugin_ceph_connected{tenant="alpha"}', lambda v: v == 1)
    eventually(prometheus, "process_resident_memory_bytes", lambda v: v > 0)

    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "p1"}) == {"Err": ""}
    eventually(prometheus, 'rbdplugin_volumes_mounted{tenant="alpha"}', lambda v: v == 0)
    eventually(
        prometheus, 'rbdplugin_stage_duration_seconds_count{stage="unmap"}', lambda v: v >= 1
    )


def test_promtool_accepts_the_exposition(observed: tuple[DaemonProcess, str]) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (make setup installs Debian's prometheus)")
    _, address = observed
    status, text = http_get(f"http://{address}/metrics")
    assert status == 200 and "rbdplugin_requests_total" in text
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
    assert client.call("VolumeDriver.Mount", {"Name": name, "ID": "s1"})["Err"] == ""
    assert client.call("VolumeDriver.Mount", {"Name": name, "ID": "s1"})["Err"] == ""
    try:
        run = [sys.executable, "-m", "rbdplugin", "status", "--config", str(daemon.config)]
        table = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
        assert table.returncode == 0, table.stderr
        assert "host host-a, mapper fuse, ready" in table.stdout
        row = next(line for line in table.stdout.splitlines() if name in line)
        assert row.split()[:4] == ["alpha", name, "rw", "mounted"] and "s1=2" in row
        as_json = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60,
                                            check=True).stdout)  # fmt: skip
        volume = next(v for v in as_json["volumes"] if v["volume"] == name)
        assert volume["mounts"] == {"s1": 2} and volume["device"].startswith("/dev/loop")
        control = daemon.config.parent / "state" / "control.sock"
        assert control.stat().st_mode & 0o777 == 0o600
    finally:
        for _ in range(2):
            client.call("VolumeDriver.Unmount", {"Name": name, "ID": "s1"})
