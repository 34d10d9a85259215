"""Tenant isolation, both ways: the daemon refuses, and Ceph itself refuses."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import rados
import rbd

from rbdplugin.devcluster import DevCluster
from rbdplugin.units import MiB
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import Admin, DaemonProcess, unique


def test_drivers_see_only_their_own_pool(daemon: DaemonProcess, admin: Admin) -> None:
    alpha, beta = daemon.client("alpha"), daemon.client("beta")
    name = unique("mine")
    assert alpha.create(name, {"size": "8M"}) == {"Err": ""}
    assert name in alpha.names()
    assert name not in beta.names()
    assert "does not exist" in beta.get(name)["Err"]
    # Remove through the wrong driver must not touch alpha's image.
    assert beta.remove(name) == {"Err": ""}
    assert name in admin.images("alpha")


def test_daemon_refuses_a_pool_the_tenant_may_not_use(daemon: DaemonProcess, admin: Admin) -> None:
    before = admin.images("beta")
    err = daemon.client("alpha").create(unique(), {"size": "8M", "pool": "beta"})["Err"]
    assert "pool 'beta' is not allowed for this driver; allowed pools: alpha" in err
    assert admin.images("beta") == before


def test_ceph_refuses_even_when_the_daemon_is_misconfigured(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin
) -> None:
    # An operator wrongly lets tenant alpha use beta's pool: alpha's cephx caps still say no.
    leaky = daemon_factory(
        tenant_toml(cluster, "alpha", table="leaky", driver="leaky", allowed_pools=["beta"]),
        wait_for="leaky",
    )
    before = admin.images("beta")
    name = unique("steal")
    err = leaky.client("leaky").create(name, {"size": "8M", "pool": "beta"})["Err"]
    assert "Ceph denied client.alpha access" in err
    assert "caps do not allow this pool" in err
    assert admin.images("beta") == before
    # Listing and reading beta's volumes are refused by Ceph as well.
    victim = unique("victim")
    admin.create_image("beta", victim, 8 * MiB)
    assert "Ceph denied client.alpha access" in leaky.client("leaky").call(
        "VolumeDriver.List", {}
    ).get("Err", "")
    assert "Ceph denied client.alpha access" in leaky.client("leaky").get(victim)["Err"]


def test_tenant_credentials_get_eperm_on_another_pool(cluster: DevCluster) -> None:
    client = rados.Rados(
        conffile=str(cluster.conf),
        rados_id="alpha",
        conf={"keyring": str(cluster.keyring("alpha"))},
    )
    client.connect(timeout=10)
    try:
        with client.open_ioctx("beta") as ioctx, pytest.raises(rbd.PermissionError) as refused:
            rbd.RBD().create(ioctx, unique(), 8 * MiB)
        assert refused.value.errno == 1  # EPERM from the OSDs: alpha's caps
    finally:
        client.shutdown()


def team_keyring(cluster: DevCluster, admin: Admin) -> Path:
    """A tenant confined to namespace "team" of pool gamma, with caps for that namespace only."""
    with admin.cluster.open_ioctx("gamma") as ioctx:
        if not rbd.RBD().namespace_exists(ioctx, "team"):
            rbd.RBD().namespace_create(ioctx, "team")
    out = admin.mon({"prefix": "auth get-or-create", "entity": "client.gamma-team",
                     "caps": ["mon", "profile rbd", "osd", "profile rbd pool=gamma namespace=team"],
                     "format": "json"})  # fmt: skip
    key = json.loads(out)[0]["key"]
    keyring = cluster.root / "ceph.client.gamma-team.keyring"
    keyring.write_text(f"[client.gamma-team]\n\tkey = {key}\n")
    keyring.chmod(0o600)
    return keyring


def test_namespace_tenants_are_isolated(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin
) -> None:
    keyring = team_keyring(cluster, admin)
    tenants = (
        '[tenants.team]\npool = "gamma"\nnamespace = "team"\nuser = "gamma-team"\n'
        f'keyring = "{keyring}"\n'
    )
    team = daemon_factory(tenants, wait_for="team").client("team")
    root_volume = unique("root")
    admin.create_image("gamma", root_volume, 8 * MiB)  # in the pool's default namespace
    name = unique("ns")
    assert team.create(name, {"size": "8M"}) == {"Err": ""}
    assert name in admin.images("gamma", namespace="team")
    assert name not in admin.images("gamma")
    assert team.get(name)["Volume"]["Status"]["image"] == f"gamma/team/{name}"
    listed = team.names()
    assert name in listed and root_volume not in listed
    assert "does not exist" in team.get(root_volume)["Err"]


# -- Ceph itself, with the plugin out of the way ---------------------------------------------

REFUSED = (errno.EPERM, errno.EACCES)
MARK = b"tenant B's data, not for tenant A " * 100


@contextlib.contextmanager
def connected_as(cluster: DevCluster, user: str, keyring: Path) -> Iterator[rados.Rados]:
    client = rados.Rados(conffile=str(cluster.conf), rados_id=user,
                         conf={"keyring": str(keyring)})  # fmt: skip
    client.connect(timeout=10)
    try:
        yield client
    finally:
        client.shutdown()


def refused(what: str, call: Callable[[], object]) -> str:
    """``call`` must fail as Ceph's caps refuse (EPERM or EACCES); ``what`` when it does."""
    try:
        call()
    except (rbd.Error, rados.Error) as exc:
        code = getattr(exc, "errno", None)
        assert code is not None and abs(code) in REFUSED, f"{what}: {type(exc).__name__} {exc}"
        return what
    raise AssertionError(f"{what}: Ceph allowed it")


@dataclass(frozen=True)
class Victim:
    pool: str
    namespace: str
    name: str
    data_object: str  # the image's first data object
    header: str


def victim_image(admin: Admin, pool: str, namespace: str = "") -> Victim:
    """An image of another tenant, made and filled by the admin."""
    name = unique("victim")
    admin.create_image(pool, name, 8 * MiB, namespace=namespace)
    with admin.cluster.open_ioctx(pool) as ioctx:
        ioctx.set_namespace(namespace)
        with rbd.Image(ioctx, name) as image:
            image.write(MARK, 0)
            image.flush()
            prefix, image_id = image.stat()["block_name_prefix"], image.id()
    return Victim(pool, namespace, name, f"{prefix}.{0:016x}", f"rbd_header.{image_id}")


def assert_intact(admin: Admin, victim: Victim) -> None:
    with admin.cluster.open_ioctx(victim.pool) as ioctx:
        ioctx.set_namespace(victim.namespace)
        assert victim.name in rbd.RBD().list(ioctx)
        with rbd.Image(ioctx, victim.name, read_only=True) as image:
            assert image.size() == 8 * MiB
            assert image.read(0, len(MARK)) == MARK
            assert image.list_lockers() == []  # nobody took its lock either


def attempts(cluster: DevCluster, user: str, keyring: Path, victim: Victim) -> list[str]:
    """Every way in as ``user``, through librbd and raw librados, each refused by Ceph."""
    done = []
    with connected_as(cluster, user, keyring) as client, client.open_ioctx(victim.pool) as ioctx:
        ioctx.set_namespace(victim.namespace)
        done += [
            refused("list images", lambda: rbd.RBD().list(ioctx)),
            refused("open to read", lambda: rbd.Image(ioctx, victim.name, read_only=True)),
            refused("open to write", lambda: rbd.Image(ioctx, victim.name)),
            refused("remove", lambda: rbd.RBD().remove(ioctx, victim.name)),
            refused("move to trash", lambda: rbd.RBD().trash_move(ioctx, victim.name)),
            refused("read a data object", lambda: ioctx.read(victim.data_object, 4096)),
            refused("read the header", lambda: ioctx.read(victim.header, 4096)),
            refused("write a data object",
                    lambda: ioctx.write(victim.data_object, b"stolen", 0)),
            refused("overwrite the header", lambda: ioctx.write_full(victim.header, b"")),
            refused("remove a data object", lambda: ioctx.remove_object(victim.data_object)),
            refused("remove the header", lambda: ioctx.remove_object(victim.header)),
        ]  # fmt: skip
        # python-rados ends an object listing at the first error (EPERM included), so
        # its listing shows nothing; the rados tool (librados too) reports the EPERM.
        assert list(ioctx.list_objects()) == []
    listing = subprocess.run(
        ["rados", "-c", str(cluster.conf), "--id", user, "--keyring", str(keyring), "-p",
         victim.pool,
         "--namespace", victim.namespace, "ls"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listing.returncode != 0 and listing.stdout == "", listing
    assert "Operation not permitted" in listing.stderr, listing.stderr
    return [*done, "list objects"]


def test_tenant_a_cannot_touch_tenant_b_images_through_librbd_or_librados(
    cluster: DevCluster, admin: Admin
) -> None:
    victim = victim_image(admin, "beta")
    assert len(attempts(cluster, "alpha", cluster.keyring("alpha"), victim)) == 12
    assert_intact(admin, victim)


def test_namespace_tenant_cannot_touch_the_pools_other_namespaces(
    cluster: DevCluster, admin: Admin
) -> None:
    keyring = team_keyring(cluster, admin)
    with admin.cluster.open_ioctx("gamma") as ioctx:
        if not rbd.RBD().namespace_exists(ioctx, "other"):
            rbd.RBD().namespace_create(ioctx, "other")
    victims = [victim_image(admin, "gamma"), victim_image(admin, "gamma", "other")]
    # Its own namespace works: the refusals below are the caps, not a broken client.
    with connected_as(cluster, "gamma-team", keyring) as team, team.open_ioctx("gamma") as ioctx:
        ioctx.set_namespace("team")
        rbd.RBD().list(ioctx)
    for victim in victims:
        assert len(attempts(cluster, "gamma-team", keyring, victim)) == 12
    for victim in victims:
        assert_intact(admin, victim)
