"""Cinder-attach mode end to end, host tier: the real daemon serving a ``backend =
"cinder"`` tenant against a real devcloud (real Keystone, real Cinder on the dev Ceph
cluster, the Nova stand-in whose pretend server ``vm`` is this host: an attached
volume becomes a real block device here with its ``/dev/disk/by-id/virtio-<id>`` link).

What Cinder holds is read with openstacksdk as the devcloud's admin (a third party,
not the product's client); what this host has is read from /proc and /sys with the
test oracle. The kernel tier's guest repeats the journey with a real virtio hot-plug.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import openstack.config
    import openstack.connection
except ImportError:  # pragma: no cover - the message is the point
    pytest.fail("openstacksdk is not installed, needed by the Cinder-mode tests: "
                "pip install -e '.[cinder]' (make setup does)", pytrace=False)  # fmt: skip

from tests import oracle
from tests.conftest import StartDaemon
from tests.devcloud.test_devcloud import devcloud
from tests.helpers import DaemonProcess, PluginClient, stopped_service, unique, wait_until
from tests.integration.test_observability import free_port, sample, scrape

pytestmark = pytest.mark.cinder

TOKEN_LIFETIME = 30  # seconds: several tokens expire during this module
BY_ID = Path("/dev/disk/by-id")
DRIVER = "vm"


@dataclass(frozen=True)
class Cloud:
    root: Path
    state: dict[str, Any]
    admin: Any  # openstacksdk Connection as the devcloud's admin

    def server(self, name: str) -> str:
        return str(next(s["id"] for s in self.state["servers"] if s["name"] == name))

    def secret(self) -> str:
        for line in (self.root / "clouds.yaml").read_text().splitlines():
            if "application_credential_secret" in line:
                return str(json.loads(line.split(":", 1)[1]))
        raise AssertionError("no secret in clouds.yaml")

    def volume(self, name: str) -> dict[str, Any] | None:
        """The Cinder volume carrying Docker volume ``name`` (admin's view, every project)."""
        found = [
            v.to_dict(computed=False)
            for v in self.admin.block_storage.volumes(details=True, all_projects=True)
            if (v.metadata or {}).get("rbdplugin.volume") == name
        ]
        assert len(found) <= 1, found
        return found[0] if found else None

    def state_of(self, name: str) -> str:
        """``status`` and the servers attached, as the closing note shows them."""
        volume = self.volume(name)
        if volume is None:
            return "no Cinder volume"
        servers = [a["server_id"] for a in volume.get("attachments") or ()]
        return f"Cinder volume {volume['id']} {volume['size']} GiB {volume['status']} attached to {servers}"


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    root = Path(tempfile.mkdtemp(prefix="rbdp-cm-", dir="/tmp"))
    done = devcloud("start", "--dir", str(root), "--token-lifetime", str(TOKEN_LIFETIME))
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        config = openstack.config.OpenStackConfig(
            config_files=[str(root / "secrets" / "clouds-admin.yaml")], load_envvars=False
        )
        admin = openstack.connection.Connection(config=config.get_one(cloud="devcloud-admin"))
        yield Cloud(root, json.loads((root / "devcloud.json").read_text()), admin)
        admin.close()
    finally:
        devcloud("stop", "--dir", str(root))
        if not any(e["target"].startswith(f"{root}/") for e in oracle.mountinfo()):
            subprocess.run(["rm", "-rf", str(root)], check=False)


def cinder_toml(cloud: Cloud, server: str = "vm", **extra: object) -> str:
    lines = [
        f"[tenants.{DRIVER}]",
        'backend = "cinder"',
        'cloud = "devcloud"',
        f'clouds_yaml = "{cloud.root / "clouds.yaml"}"',
        f'server_id = "{cloud.server(server)}"',
        'default_size = "1G"',
        *(f"{key} = {json.dumps(value)}" for key, value in extra.items()),
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def vm(cloud: Cloud, daemon_factory: StartDaemon, short_tmp: Path) -> DaemonProcess:
    """The plugin inside the pretend server ``vm`` (whose disks appear on this host)."""
    root = short_tmp / unique("vm")
    return daemon_factory(cinder_toml(cloud), wait_for=DRIVER, state_dir=str(root / "state"),
                          mount_root=str(root / "mounts"))  # fmt: skip


def by_id_target(volume_id: str) -> str:
    return os.path.realpath(BY_ID / f"virtio-{volume_id[:20]}")


def mounted_source(path: str) -> str:
    entries = [e for e in oracle.mountinfo() if e["target"] == path]
    assert len(entries) == 1, entries
    return entries[0]["source"]


def test_a_docker_volume_is_a_cinder_volume_attached_here(cloud: Cloud, vm: DaemonProcess) -> None:
    client, name = vm.client(DRIVER), unique("web")
    assert client.create(name, {"size": "1536M"}) == {"Err": ""}
    print(f"\ncreated:   {cloud.state_of(name)}")
    volume = cloud.volume(name)
    assert volume is not None and volume["status"] == "available" and volume["size"] == 2
    assert volume["metadata"]["rbdplugin.tenant"] == DRIVER
    status = client.get(name)["Volume"]["Status"]
    assert "rounded up to whole GiB" in json.dumps(status), status  # said so in Get
    assert client.create(name, {"size": "1536M"}) == {"Err": ""}  # idempotent: no second volume
    assert cloud.volume(name)["id"] == volume["id"]  # type: ignore[index]

    first = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c1"})
    assert first["Err"] == "", first
    path = first["Mountpoint"]
    print(f"mounted:   {cloud.state_of(name)}; {path} on {mounted_source(path)}")
    attached = cloud.volume(name)
    assert attached is not None and attached["status"] == "in-use"
    assert [a["server_id"] for a in attached["attachments"]] == [cloud.server("vm")]
    assert mounted_source(path) == by_id_target(volume["id"])  # the disk found by its serial
    assert oracle.fstype_at(Path(path)) == "ext4"
    Path(path, "data").write_text("kept in Cinder")

    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c1"}) == {"Err": ""}
    print(f"unmounted: {cloud.state_of(name)}")
    detached = cloud.volume(name)
    assert detached is not None and detached["status"] == "available"
    assert not detached["attachments"] and not (BY_ID / f"virtio-{volume['id'][:20]}").exists()
    assert not oracle.is_mounted(Path(path))

    again = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c2"})
    assert again["Err"] == "", again
    assert Path(again["Mountpoint"], "data").read_text() == "kept in Cinder"
    print(f"remounted: {cloud.state_of(name)}; the data is there")
    assert "formatting" not in cloud.volume(name)["metadata"]  # type: ignore[index]
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c2"}) == {"Err": ""}
    assert name in client.names()
    assert client.remove(name) == {"Err": ""}
    print(f"removed:   {cloud.state_of(name)}")
    wait_until(lambda: cloud.volume(name) is None, 30, "the Cinder volume to be deleted")


def test_a_volume_attached_to_another_server_is_refused_naming_it(
    cloud: Cloud, vm: DaemonProcess
) -> None:
    client, name = vm.client(DRIVER), unique("taken")
    assert client.create(name) == {"Err": ""}
    volume = cloud.volume(name)
    assert volume is not None
    other = cloud.server("other-vm")
    cloud.admin.compute.create_volume_attachment(other, volume_id=volume["id"])
    wait_until(lambda: cloud.volume(name)["status"] == "in-use", 30, "the attach")  # type: ignore[index]
    try:
        refused = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"]
        assert f"is attached to server {other}" in refused, refused
        assert f"is attached to server {other}" in client.remove(name)["Err"]
        assert [a["server_id"] for a in cloud.volume(name)["attachments"]] == [other]  # type: ignore[index]
    finally:
        cloud.admin.compute.delete_volume_attachment(other, volume["id"])
        wait_until(lambda: cloud.volume(name)["status"] == "available", 60, "the detach")  # type: ignore[index]
    assert client.remove(name) == {"Err": ""}


def test_a_disk_that_never_appears_fails_at_the_deadline_and_is_detached(
    cloud: Cloud, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    # The plugin of "other-vm", a server on some other host: Nova attaches the volume
    # there, and no disk ever appears on this host.
    root = short_tmp / unique("elsewhere")
    daemon = daemon_factory(cinder_toml(cloud, "other-vm", attach_timeout="6s"), wait_for=DRIVER,
                            state_dir=str(root / "state"), mount_root=str(root / "mounts"))  # fmt: skip
    client, name = daemon.client(DRIVER), unique("never")
    assert client.create(name) == {"Err": ""}
    started = time.monotonic()
    err = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"]
    took = time.monotonic() - started
    print(f"\nno disk: {took:.1f} s: {err}")
    assert "but no disk with serial" in err and "appeared within 6 s" in err, err
    assert took < 6 + 30  # the deadline, plus the detach
    after = cloud.volume(name)
    assert after is not None and after["status"] == "available" and not after["attachments"]
    assert client.get(name)["Volume"]["Status"].get("mounts") in (None, {})
    assert client.remove(name) == {"Err": ""}


def test_a_quota_refusal_gives_cinders_message_and_creates_nothing(
    cloud: Cloud, vm: DaemonProcess
) -> None:
    project = cloud.state["project_id"]
    cloud.admin.block_storage.update_quota_set(project, gigabytes=3)
    try:
        client, name = vm.client(DRIVER), unique("big")
        err = client.create(name, {"size": "5G"})["Err"]
        print(f"\nover quota: {err}")
        assert "quota" in err.lower() and "Requested 5G" in err, err
        assert cloud.volume(name) is None and name not in client.names()
    finally:
        cloud.admin.block_storage.update_quota_set(project, gigabytes=-1)


def test_a_volume_that_ends_in_error_is_deleted_and_the_err_says_why(
    cloud: Cloud, vm: DaemonProcess
) -> None:
    kind = cloud.admin.block_storage.create_type(
        name=unique("nowhere"), extra_specs={"volume_backend_name": "no-such-backend"}
    )
    try:
        client, name = vm.client(DRIVER), unique("doomed")
        err = client.create(name, {"volume-type": kind.name})["Err"]
        print(f"\nvolume in error: {err}")
        assert f"volume {name!r} could not be created" in err and "went to error" in err, err
        assert "backend" in err.lower(), err  # the scheduler's reason, from Cinder
        wait_until(lambda: cloud.volume(name) is None, 60, "the failed volume to be deleted")
        assert name not in client.names()
    finally:
        cloud.admin.block_storage.delete_type(kind)


def stopped(cloud: Cloud, service: str) -> contextlib.AbstractContextManager[None]:
    """The service's process stopped: connections wait, nothing answers."""
    return stopped_service(cloud.root, cloud.state, service)


@pytest.mark.parametrize("service", ["keystone", "cinder"])
def test_openstack_down_gives_a_clear_err_in_time_and_recovery_needs_no_restart(
    cloud: Cloud, vm: DaemonProcess, service: str
) -> None:
    client, name = vm.client(DRIVER), unique("down")
    assert client.create(name) == {"Err": ""}
    before = client.get(name)
    with stopped(cloud, service):
        started = time.monotonic()
        err = client.create(unique("late"))["Err"]
        took = time.monotonic() - started
        print(f"\n{service} down: {took:.1f} s: {err}")
        assert err and took < 60, (took, err)
        assert any(word in err for word in ("timed out", "unreachable", "did not answer")), err
        during = client.get(name)  # answered from the last known state
        assert during["Err"] == "", during
        status = dict(during["Volume"]["Status"])
        assert status.pop("openstack").startswith("unreachable: "), status
        assert status.pop("seen_at")  # when that state was last read
        assert status == before["Volume"]["Status"]
    assert client.create(unique("back")) == {"Err": ""}  # no restart needed
    assert client.remove(name) == {"Err": ""}


def test_tokens_expire_between_calls_without_anyone_noticing(
    cloud: Cloud, vm: DaemonProcess
) -> None:
    client, name = vm.client(DRIVER), unique("token")
    assert client.create(name) == {"Err": ""}
    time.sleep(TOKEN_LIFETIME + 2)  # every token the daemon held has expired
    mounted = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})
    assert mounted["Err"] == "", mounted
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c"}) == {"Err": ""}
    assert client.remove(name) == {"Err": ""}


def test_kill_9_mid_attach_then_restart_leaves_the_volume_available(
    cloud: Cloud, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    root = short_tmp / unique("crash")
    toml = cinder_toml(cloud, "other-vm", attach_timeout="60s")
    places = {"state_dir": str(root / "state"), "mount_root": str(root / "mounts")}
    first = daemon_factory(toml, wait_for=DRIVER, **places)
    client, name = first.client(DRIVER), unique("mid")
    assert client.create(name) == {"Err": ""}
    pending = threading.Thread(target=_mount_quietly, args=(client.socket_path, name), daemon=True)
    pending.start()
    wait_until(lambda: cloud.volume(name)["status"] == "in-use", 60, "Nova's attach")  # type: ignore[index]
    first.kill()  # while it waits for the disk
    second = daemon_factory(toml, wait_for=DRIVER, **places)
    wait_until(lambda: cloud.volume(name)["status"] == "available", 60, "reconcile's detach")  # type: ignore[index]
    assert not cloud.volume(name)["attachments"]  # type: ignore[index]
    assert second.client(DRIVER).remove(name) == {"Err": ""}


def _mount_quietly(socket_path: Path, name: str) -> None:
    with contextlib.suppress(OSError):
        PluginClient(socket_path, timeout=90).call("VolumeDriver.Mount", {"Name": name, "ID": "c"})


def test_a_restart_keeps_a_mount_in_use_with_its_counts(
    cloud: Cloud, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    root = short_tmp / unique("restart")
    places = {"state_dir": str(root / "state"), "mount_root": str(root / "mounts")}
    first = daemon_factory(cinder_toml(cloud), wait_for=DRIVER, **places)
    client, name = first.client(DRIVER), unique("kept")
    assert client.create(name) == {"Err": ""}
    path = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Mountpoint"]
    Path(path, "before").write_text("x")
    first.kill()
    second = daemon_factory(cinder_toml(cloud), wait_for=DRIVER, **places)
    client = second.client(DRIVER)
    assert client.get(name)["Volume"]["Status"]["mounts"] == {"c": 1}
    assert oracle.is_mounted(Path(path)) and Path(path, "before").read_text() == "x"
    status = subprocess.run(
        [sys.executable, "-m", "rbdplugin", "status", "--config", str(second.config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    print(f"\n{status.stdout}")
    assert status.returncode == 0, status.stderr
    assert f"driver {DRIVER}: " in status.stdout and "openstack up" in status.stdout
    assert name in status.stdout and "c=1" in status.stdout
    assert cloud.volume(name)["status"] == "in-use"  # type: ignore[index]
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c"}) == {"Err": ""}
    assert cloud.volume(name)["status"] == "available"  # type: ignore[index]
    assert client.remove(name) == {"Err": ""}


def test_no_secret_reaches_logs_or_state(cloud: Cloud, vm: DaemonProcess) -> None:
    client, name = vm.client(DRIVER), unique("quiet")
    assert client.create(name) == {"Err": ""}
    assert client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"] == ""
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c"}) == {"Err": ""}
    assert client.remove(name) == {"Err": ""}
    secret = cloud.secret()
    assert secret and secret not in vm.log()
    state = Path(tomllib.loads(Path(vm.config).read_text())["daemon"]["state_dir"])
    assert (state / DRIVER / "mounts.json").exists()  # the journey wrote state: searched
    for path in state.rglob("*"):
        if path.is_file() and path.name != "rbdplugin.toml":
            assert secret.encode() not in path.read_bytes(), path


def test_readyz_checks_keystone_and_cinder(
    cloud: Cloud, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    root, metrics = short_tmp / unique("ready"), f"127.0.0.1:{free_port()}"
    daemon = daemon_factory(cinder_toml(cloud), wait_for=DRIVER, metrics=metrics,
                            state_dir=str(root / "state"), mount_root=str(root / "mounts"))  # fmt: skip

    def readyz() -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://{metrics}/readyz", timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    wait_until(lambda: readyz()[0] == 200, 30, "ready")
    assert readyz()[1]["drivers"][DRIVER]["openstack"] == "up"
    with stopped(cloud, "cinder"):
        code, body = readyz()
    print(f"\n/readyz with Cinder stopped: {code} {body['drivers'][DRIVER]['openstack']}")
    assert code == 503 and body["drivers"][DRIVER]["openstack"].startswith("down: ")
    wait_until(lambda: readyz()[0] == 200, 60, "ready again, without a restart")
    # Metrics cover this mode: a mount shows with the way it came ("nova"), and requests.
    client, name = daemon.client(DRIVER), unique("metrics")
    assert client.create(name) == {"Err": ""}
    assert client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"] == ""
    exposition = scrape(metrics)
    assert sample(exposition, "rbdplugin_volumes_mounted", tenant=DRIVER) == 1
    assert sample(exposition, "rbdplugin_mapped_devices", mapper="nova") >= 1
    assert sample(exposition, "rbdplugin_openstack_connected", tenant=DRIVER) == 1
    assert sample(exposition, "rbdplugin_requests_total", driver=DRIVER, endpoint="VolumeDriver.Mount",
                  outcome="ok") >= 1  # fmt: skip
    assert client.call("VolumeDriver.Unmount", {"Name": name, "ID": "c"}) == {"Err": ""}
    assert client.remove(name) == {"Err": ""}


def test_remove_policy_keep_hides_the_volume_and_says_how_to_bring_it_back(
    cloud: Cloud, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    root = short_tmp / unique("keep")
    daemon = daemon_factory(cinder_toml(cloud, remove_policy="keep"), wait_for=DRIVER,
                            state_dir=str(root / "state"), mount_root=str(root / "mounts"))  # fmt: skip
    client, name = daemon.client(DRIVER), unique("kept")
    assert client.create(name) == {"Err": ""}
    volume_id = cloud.volume(name)["id"]  # type: ignore[index]
    assert client.remove(name) == {"Err": ""}
    assert name not in client.names() and cloud.volume(name) is None  # out of Docker's sight
    kept = cloud.admin.block_storage.get_volume(volume_id)
    assert kept.status == "available" and kept.metadata["rbdplugin.volume"].startswith(name + "~")
    err = client.call("VolumeDriver.Mount", {"Name": name, "ID": "c"})["Err"]
    print(f"\nkept: {err}")
    assert f"kept as Cinder volume {volume_id}" in err, err
    cloud.admin.block_storage.delete_volume(volume_id)
