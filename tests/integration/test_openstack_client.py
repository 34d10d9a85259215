"""The OpenStack client against a real devcloud: real Keystone, real Cinder, the Nova stand-in.

One devcloud per module, started through its command line with a short Keystone token
lifetime, so that re-authentication happens during the tests. Everything is on
loopback. Keystone and Cinder "down" are a black hole (SIGSTOP on the service's
process, SIGCONT after) or a port nobody listens on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

try:
    import openstack.config
    import openstack.connection
except ImportError:  # pragma: no cover - the message is the point
    pytest.fail(
        "openstacksdk is not installed, needed by the Cinder-mode client tests: "
        "pip install -e '.[cinder]' (make setup does)",
        pytrace=False,
    )

from rbdplugin.errors import (
    ConfigError,
    Conflict,
    InvalidArgument,
    NotFound,
    OpenStackUnavailable,
    PermissionDenied,
    QuotaExceeded,
    VolumeBusy,
    VolumeFailed,
)
from rbdplugin.openstack.client import CloudSettings, OpenStackClient, connect
from tests import oracle
from tests.devcloud.test_devcloud import devcloud
from tests.helpers import stopped_service, wait_until

TOKEN_LIFETIME = 20  # seconds; keystoneauth renews tokens 120 s ahead, so: before every request
TIMEOUT = 3.0  # per HTTP request
BY_ID = Path("/dev/disk/by-id")
TENANT = "vm"


@dataclass(frozen=True)
class Cloud:
    root: Path
    state: dict[str, Any]

    @property
    def clouds_yaml(self) -> Path:
        return self.root / "clouds.yaml"

    def server(self, name: str) -> str:
        return str(next(s["id"] for s in self.state["servers"] if s["name"] == name))

    def settings(self, **changes: Any) -> CloudSettings:
        return replace(CloudSettings("devcloud", self.clouds_yaml, timeout=TIMEOUT), **changes)

    def secret(self) -> str:
        for line in self.clouds_yaml.read_text().splitlines():
            if "application_credential_secret" in line:
                return str(json.loads(line.split(":", 1)[1]))
        raise AssertionError("no secret in clouds.yaml")


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    root = Path(tempfile.mkdtemp(prefix="rbdp-osc-", dir="/tmp"))
    done = devcloud("start", "--dir", str(root), "--token-lifetime", str(TOKEN_LIFETIME))
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        yield Cloud(root, json.loads((root / "devcloud.json").read_text()))
    finally:
        devcloud("stop", "--dir", str(root))
        if not any(e["target"].startswith(f"{root}/") for e in oracle.mountinfo()):
            subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(scope="module")
def client(cloud: Cloud) -> Iterator[OpenStackClient]:
    c = connect(cloud.settings())
    yield c
    c.close()


@pytest.fixture(scope="module")
def admin(cloud: Cloud) -> Iterator[Any]:
    """openstacksdk as the devcloud's admin (quotas, volume types): test set-up only."""
    config = openstack.config.OpenStackConfig(
        config_files=[str(cloud.root / "secrets" / "clouds-admin.yaml")], load_envvars=False
    )
    conn = openstack.connection.Connection(config=config.get_one(cloud="devcloud-admin"))
    yield conn
    conn.close()


def tags(name: str, tenant: str = TENANT) -> dict[str, str]:
    return {"rbdplugin.volume": name, "rbdplugin.tenant": tenant}


def make_volume(client: OpenStackClient, name: str, size: int = 1, tenant: str = TENANT,
                **options: str) -> str:  # fmt: skip
    created = client.create_volume(size, name, metadata=tags(name, tenant), **options)
    assert created.status == "creating" and created.size_gib == size
    return client.wait_for_volume(created.id, {"available"}, 60).id


def remove_volume(client: OpenStackClient, volume_id: str) -> None:
    client.delete_volume(volume_id)
    client.wait_deleted(volume_id, 60)


def stopped(cloud: Cloud, service: str) -> contextlib.AbstractContextManager[None]:
    """The service's process stopped (a black hole: connections wait, nothing answers)."""
    return stopped_service(cloud.root, cloud.state, service)


def test_create_find_list_get_delete(client: OpenStackClient) -> None:
    mine = make_volume(client, "docs", size=2, availability_zone="nova")
    theirs = make_volume(client, "docs", tenant="other")

    found = client.find_volume(tags("docs"))
    assert found is not None and found.id == mine  # the same name elsewhere is not ours
    assert found.size_gib == 2 and found.name == "docs" and found.status == "available"
    assert found.metadata == tags("docs") and found.availability_zone == "nova"
    assert found.servers == ()
    assert client.find_volume(tags("docs")) == client.get_volume(mine)  # found again: idempotent
    assert client.find_volume(tags("absent")) is None

    assert [v.id for v in client.list_volumes({"rbdplugin.tenant": TENANT})] == [mine]
    assert [v.id for v in client.list_volumes({"rbdplugin.tenant": "other"})] == [theirs]
    assert {mine, theirs} <= {v.id for v in client.list_volumes()}

    limits = client.limits()
    assert limits.volumes_used >= 2 and limits.gigabytes_used >= 3
    assert limits.volumes_max is None and limits.gigabytes_max is None  # the devcloud's -1

    with pytest.raises(InvalidArgument, match="at least 1 GiB"):
        client.create_volume(0, "empty", metadata=tags("empty"))  # rounding is the caller's job
    with pytest.raises(InvalidArgument, match="Cinder refused creating volume bad"):
        client.create_volume(1, "bad", metadata=tags("bad"), availability_zone="nowhere")

    remove_volume(client, mine)
    remove_volume(client, theirs)
    with pytest.raises(NotFound, match=f"Cinder refused reading volume {mine}"):
        client.get_volume(mine)
    assert client.delete_volume(mine) is False
    assert client.find_volume(tags("docs")) is None


def test_two_volumes_with_the_same_tags_are_a_conflict(client: OpenStackClient) -> None:
    first, second = make_volume(client, "twice"), make_volume(client, "twice")
    with pytest.raises(Conflict) as caught:
        client.find_volume(tags("twice"))
    assert first in str(caught.value) and second in str(caught.value)
    remove_volume(client, first)
    remove_volume(client, second)


def test_attach_and_detach_through_nova(cloud: Cloud, client: OpenStackClient) -> None:
    server, other = cloud.server("vm"), cloud.server("other-vm")
    volume_id = make_volume(client, "attached")

    made = client.attach(server, volume_id)
    assert (made.volume_id, made.server_id) == (volume_id, server)
    assert made.attachment_id  # Nova 2.89 names Cinder's attachment
    volume = client.wait_for_volume(volume_id, {"in-use"}, 60)
    assert volume.servers == (server,)
    assert [a.attachment_id for a in volume.attachments] == [made.attachment_id]
    assert [a.volume_id for a in client.server_attachments(server)] == [volume_id]
    assert client.server_attachments(other) == []
    wait_until((BY_ID / f"virtio-{volume_id[:20]}").is_symlink, 30, "by-id link")

    with pytest.raises(Conflict, match=f"attached to server {server}"):
        client.attach(other, volume_id)
    with pytest.raises(VolumeBusy, match=f"Cinder refused deleting volume {volume_id}"):
        client.delete_volume(volume_id)

    assert client.detach(server, volume_id) is True
    volume = client.wait_for_volume(volume_id, {"available"}, 60)
    assert volume.servers == () and client.server_attachments(server) == []
    wait_until(lambda: not os.path.lexists(BY_ID / f"virtio-{volume_id[:20]}"), 30, "link gone")
    assert client.detach(server, volume_id) is False  # not attached: nothing to do
    with pytest.raises(NotFound):
        client.server_attachments("00000000-0000-4000-8000-000000000000")
    remove_volume(client, volume_id)


def test_a_volume_in_error_carries_cinders_reason(admin: Any, client: OpenStackClient) -> None:
    kind = admin.block_storage.create_type(
        name="nowhere", extra_specs={"volume_backend_name": "no-such-backend"}
    )
    try:
        created = client.create_volume(1, "doomed", metadata=tags("doomed"), volume_type="nowhere")
        with pytest.raises(VolumeFailed) as caught:
            client.wait_for_volume(created.id, {"available"}, 60)
        assert caught.value.volume_id == created.id and caught.value.status == "error"
        message = str(caught.value)
        assert f"Cinder volume {created.id} went to error" in message
        assert "backend" in message.lower(), message  # the scheduler's reason, from Cinder
        remove_volume(client, created.id)
    finally:
        admin.block_storage.delete_type(kind)


def test_quota_refusal_keeps_cinders_message(cloud: Cloud, admin: Any,
                                             client: OpenStackClient) -> None:  # fmt: skip
    project = cloud.state["project_id"]
    admin.block_storage.update_quota_set(project, gigabytes=1)
    try:
        assert client.limits().gigabytes_max == 1
        with pytest.raises(QuotaExceeded) as caught:
            client.create_volume(2, "too-big", metadata=tags("too-big"))
        message = str(caught.value)
        assert message.startswith("Cinder refused creating volume too-big (2 GiB): ")
        assert "gigabytes quota" in message and "Requested 2G" in message, message
        assert client.find_volume(tags("too-big")) is None
    finally:
        admin.block_storage.update_quota_set(project, gigabytes=-1)
    assert client.limits().gigabytes_max is None


def _statuses(c: OpenStackClient) -> list[tuple[str, int]]:
    """Record (method, status) of every HTTP answer the client's session gets."""
    seen: list[tuple[str, int]] = []
    c.session.session.hooks["response"].append(
        lambda r, *a, **k: seen.append((r.request.method, r.status_code))
    )
    return seen


def test_an_expired_token_mid_use_is_renewed_transparently(cloud: Cloud) -> None:
    c = connect(cloud.settings())
    # keystoneauth renews a token 120 s before it expires, so a 20 s token is renewed
    # before every request. Make this client keep its token past its end (as a skewed
    # clock would): then Cinder sees an expired token, answers 401, and keystoneauth must
    # log in again and retry the request.
    c.session.auth.MIN_TOKEN_LIFE_SECONDS = -86400
    seen = _statuses(c)
    volume_id = make_volume(c, "expiring")
    first = c.session.get_token()
    expires = c.session.auth.auth_ref.expires.timestamp()
    time.sleep(max(0.0, expires - time.time()) + 1.0)

    del seen[:]
    assert c.get_volume(volume_id).status == "available"  # Cinder: 401, log in, 200
    assert c.server_attachments(cloud.server("vm")) == []  # Nova: the new token works
    assert seen[0] == ("GET", 401), seen
    assert ("POST", 201) in seen and seen[-1] == ("GET", 200), seen
    assert c.session.get_token() != first
    remove_volume(c, volume_id)
    c.close()


def test_tokens_outliving_many_lifetimes_need_nothing(
    cloud: Cloud, client: OpenStackClient
) -> None:
    volume_id = make_volume(client, "long-lived")
    until = time.monotonic() + TOKEN_LIFETIME * 1.5
    while time.monotonic() < until:
        assert client.get_volume(volume_id).status == "available"
        time.sleep(2)
    remove_volume(client, volume_id)


def test_keystone_down_is_unreachable_quickly_and_recovers(cloud: Cloud) -> None:
    c = connect(cloud.settings())
    assert c.check() == {"keystone": "up", "cinder": "up"}
    with stopped(cloud, "keystone"):
        started = time.monotonic()
        with pytest.raises(OpenStackUnavailable) as caught:
            c.list_volumes()
        took = time.monotonic() - started
        assert str(caught.value).startswith("Keystone timed out (listing volumes, cloud "), (
            caught.value
        )
        assert took < TIMEOUT * 2 + 1, took
        health = c.check()
        assert health["keystone"].startswith("down: Keystone timed out"), health
        assert health["cinder"].startswith("down: Keystone"), health
    assert c.list_volumes(tags("nothing")) == []  # the same client, no restart
    assert c.check() == {"keystone": "up", "cinder": "up"}
    c.close()


def test_keystone_refusing_connections_is_unreachable(cloud: Cloud, tmp_path: Path) -> None:
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = hole.getsockname()[1]
        text = cloud.clouds_yaml.read_text()
        auth_url = f"http://127.0.0.1:{cloud.state['ports']['keystone']}/v3"
        moved = tmp_path / "clouds.yaml"
        moved.write_text(text.replace(auth_url, f"http://127.0.0.1:{port}/v3"))
        c = connect(cloud.settings(clouds_yaml=moved))
        started = time.monotonic()
        with pytest.raises(OpenStackUnavailable, match=r"^Keystone unreachable \(logging in"):
            c.authenticate()
        assert time.monotonic() - started < TIMEOUT
        c.close()


def test_cinder_down_is_unreachable_within_the_timeout_and_recovers(
    cloud: Cloud, client: OpenStackClient
) -> None:
    volume_id = make_volume(client, "black-hole")
    with stopped(cloud, "cinder"):
        started = time.monotonic()
        with pytest.raises(OpenStackUnavailable) as caught:
            client.get_volume(volume_id)
        took = time.monotonic() - started
        assert str(caught.value).startswith(f"Cinder timed out (reading volume {volume_id}"), (
            caught.value
        )
        assert took < TIMEOUT * 2 + 1, took
        health = client.check()
        assert health["keystone"] == "up" and health["cinder"].startswith("down: Cinder timed out")
    assert client.get_volume(volume_id).status == "available"
    assert client.check() == {"keystone": "up", "cinder": "up"}
    remove_volume(client, volume_id)


def test_config_problems_are_config_errors(cloud: Cloud, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        connect(cloud.settings(clouds_yaml=tmp_path / "none.yaml"))
    with pytest.raises(ConfigError, match="'elsewhere'"):
        connect(cloud.settings(cloud="elsewhere"))


def test_secrets_never_reach_messages_logs_or_reprs(cloud: Cloud, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    secret = cloud.secret()
    wrong = tmp_path / "clouds.yaml"
    wrong.write_text(cloud.clouds_yaml.read_text().replace(secret, secret[::-1]))
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        good = connect(cloud.settings())
        texts += [repr(good), repr(good.settings)]
        good.list_volumes()
        with stopped(cloud, "cinder"), pytest.raises(OpenStackUnavailable) as down:
            good.list_volumes()
        texts.append(str(down.value))
        bad = connect(cloud.settings(clouds_yaml=wrong))
        with pytest.raises(PermissionDenied) as refused:
            bad.list_volumes()
        texts += [str(refused.value), repr(bad)]
        assert "Keystone refused cloud 'devcloud''s credentials" in str(refused.value)
        good.close()
        bad.close()
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert secret not in text and secret[::-1] not in text
