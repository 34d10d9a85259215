"""Tenant isolation, both ways: the daemon refuses, and Ceph itself refuses."""

from __future__ import annotations

import json

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


def test_namespace_tenants_are_isolated(
    cluster: DevCluster, daemon_factory: StartDaemon, admin: Admin
) -> None:
    # A tenant confined to namespace "team" of pool gamma, with caps for that namespace only.
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
