"""The config file: defaults, validation messages naming the key, environment overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rbdplugin.config import DEFAULT_FEATURES, load_config, only_tenant
from rbdplugin.errors import ConfigError
from rbdplugin.units import GiB

EXAMPLE = Path(__file__).parents[2] / "config" / "rbdplugin.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rbdplugin.toml"
    path.write_text(text)
    return path


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[tenants.rbd]\n"), environ={})
    tenant = config.tenant("rbd")
    assert (tenant.driver, tenant.pool, tenant.user, tenant.namespace) == ("rbd", "rbd", "rbd", "")
    assert tenant.keyring == Path("/etc/ceph/ceph.client.rbd.keyring")
    assert tenant.default_size == 20 * GiB
    assert tenant.default_fstype == "ext4"
    assert tenant.features == DEFAULT_FEATURES
    assert tenant.remove_policy == "trash"
    assert tenant.auto_create is True
    assert tenant.nosuid_nodev is True
    assert config.daemon.socket_dir == Path("/run/docker/plugins")
    assert config.daemon.mapper == "auto"
    assert config.daemon.op_timeout == 25
    assert config.ceph.conf == Path("/etc/ceph/ceph.conf")


def test_example_config_is_valid() -> None:
    config = load_config(EXAMPLE, environ={})
    assert [t.driver for t in config.tenants] == ["rbd", "analytics"]
    analytics = config.tenant("analytics")
    assert analytics.namespace == "team-a"
    assert analytics.pools == ("analytics", "analytics-ssd")
    assert analytics.max_volumes == 200


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"\[tenants\] is empty"),
        ("[tenants.rbd]\nsize = '1G'\n", r"\[tenants.rbd\] unknown key 'size'; valid keys: allowed_pools"),
        ("[daemon]\nmapper = 'magic'\n[tenants.rbd]\n", r"daemon.mapper 'magic' is not one of auto, krbd"),
        ("[daemon]\nop_timeout = 300\n[tenants.rbd]\n", r"daemon.op_timeout 300 must be 1-110"),
        ("[daemon]\nsocket_dir = 'rel'\n[tenants.rbd]\n", r"daemon.socket_dir 'rel' must be an absolute"),
        ("[daemon]\nmetrics = 'nowhere'\n[tenants.rbd]\n", r"daemon.metrics 'nowhere' must be HOST:PORT"),
        ("[tenants.rbd]\ndefault_size = 'big'\n", r"tenants.rbd.default_size 'big' is not a size"),
        ("[tenants.rbd]\ndefault_fstype = 'zfs'\n", r"default_fstype 'zfs' is not one of ext4, xfs"),
        ("[tenants.rbd]\nremove_policy = 'shred'\n", r"remove_policy 'shred' is not one of delete"),
        ("[tenants.rbd]\nfeatures = ['fast-diff']\n", r"fast-diff needs object-map"),
        ("[tenants.rbd]\nmax_volumes = -1\n", r"max_volumes -1 must be 0"),
        ("[tenants.rbd]\nmax_volumes = 'ten'\n", r"tenants.rbd.max_volumes must be an integer"),
        ("[tenants.rbd]\nauto_create = 1\n", r"auto_create must be true or false"),
        ("[tenants.rbd]\nnosuid_nodev = 'no'\n", r"tenants.rbd.nosuid_nodev must be true or false"),
        ("[tenants.rbd]\npool = 'a b'\n", r"tenants.rbd.pool 'a b' must be letters"),
        ("[tenants.Bad]\n", r"tenant names must match"),
        ("[tenants.a]\n[tenants.b]\ndriver = 'a'\n", r"driver 'a' is already used by tenants.a"),
        ("[tenants.a]\npool = 'p'\n[tenants.b]\npool = 'p'\n", r"must not share a pool and namespace"),
        ("[tenants.rbd]\ntrash_delay = 'later'\n", r"trash_delay 'later' is not a duration"),
        ("[tenants]\nrbd = 3\n", r"\[tenants.rbd\] must be a table"),
        ("tenants = [\n", r"is not valid TOML"),
    ],
)  # fmt: skip
def test_bad_config_names_key_and_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, text), environ={})
    assert str(tmp_path) in str(err.value)


def test_namespaced_tenants_may_share_a_pool(tmp_path: Path) -> None:
    text = "[tenants.a]\npool = 'p'\nnamespace = 'a'\n[tenants.b]\npool = 'p'\nnamespace = 'b'\n"
    config = load_config(write(tmp_path, text), environ={})
    assert [t.namespace for t in config.tenants] == ["a", "b"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nhost_id = 'a'\n[tenants.rbd]\n")
    env = {"RBDPLUGIN_DAEMON_HOST_ID": "node7", "RBDPLUGIN_DAEMON_OP_TIMEOUT": "40",
           "RBDPLUGIN_CEPH_CONF": "/srv/ceph.conf", "UNRELATED": "x"}  # fmt: skip
    config = load_config(path, environ=env)
    assert config.daemon.host_id == "node7"
    assert config.daemon.op_timeout == 40
    assert config.ceph.conf == Path("/srv/ceph.conf")


def test_environment_override_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "[tenants.rbd]\n")
    with pytest.raises(ConfigError, match=r"daemon\.mapper 'x'"):
        load_config(path, environ={"RBDPLUGIN_DAEMON_MAPPER": "x"})
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_config(path, environ={"RBDPLUGIN_DAEMON_COLOUR": "x"})


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[tenants.rbd]\n"), environ={})
    with pytest.raises(AttributeError):
        config.daemon.host_id = "other"  # type: ignore[misc]


def test_nosuid_nodev_can_be_turned_off_per_tenant(tmp_path: Path) -> None:
    text = "[tenants.a]\nnosuid_nodev = false\n[tenants.b]\n"
    config = load_config(write(tmp_path, text), environ={})
    assert config.tenant("a").nosuid_nodev is False
    assert config.tenant("b").nosuid_nodev is True


def test_example_config_documents_nosuid_nodev() -> None:
    text = EXAMPLE.read_text()
    assert "nosuid_nodev = true" in text
    assert "explicit opt-out" in text


# -- tenants must not reach each other's volumes (issue 9, item 11) ---------------------------

OVERLAPS = [
    # (config, the two tenants, the shared pool)
    ("[tenants.a]\npool = 'p'\n[tenants.b]\npool = 'q'\nallowed_pools = ['p']\n", "a", "b", "p"),
    ("[tenants.a]\npool = 'p'\nallowed_pools = ['q']\n[tenants.b]\npool = 'q'\n", "a", "b", "q"),
    ("[tenants.a]\npool = 'p'\nallowed_pools = ['s']\n[tenants.b]\npool = 'q'\nallowed_pools = ['s']\n",
     "a", "b", "s"),
    ("[tenants.a]\npool = 'p'\nnamespace = 'n'\n[tenants.b]\npool = 'q'\nnamespace = 'n'\n"
     "allowed_pools = ['p']\n", "a", "b", "p"),
    ("[tenants.a]\npool = 'p'\n[tenants.b]\npool = 'p'\n", "a", "b", "p"),
    ("[tenants.x]\npool = 'x'\n[tenants.a]\npool = 'p'\n[tenants.c]\npool = 'c'\n"
     "allowed_pools = ['p', 'x2']\n", "a", "c", "p"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "first", "second", "pool"), OVERLAPS)
def test_tenants_with_overlapping_pools_are_refused(
    tmp_path: Path, text: str, first: str, second: str, pool: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    message = str(err.value)
    assert f"tenants.{first} and tenants.{second} both use pool {pool!r}" in message
    assert "list, mount and remove each other's volumes" in message


def test_tenants_in_their_own_namespaces_may_share_every_pool(tmp_path: Path) -> None:
    text = (
        "[tenants.a]\npool = 'p'\nnamespace = 'a'\nallowed_pools = ['s']\n"
        "[tenants.b]\npool = 's'\nnamespace = 'b'\nallowed_pools = ['p']\n"
        "[tenants.c]\npool = 'p'\nallowed_pools = ['s']\n"
    )
    config = load_config(write(tmp_path, text), environ={})
    assert [t.pools for t in config.tenants] == [("p", "s"), ("s", "p"), ("p", "s")]


# -- Cinder mode -------------------------------------------------------------------------

SERVER = "0b2e6a4c-7d1f-4e55-9a43-1c2d3e4f5a6b"


def test_a_cinder_tenant_gets_its_defaults(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            f'[tenants.vm]\nbackend = "cinder"\ncloud = "tenant-a"\nserver_id = "{SERVER}"\n',
        ),
        environ={},
    )
    tenant = config.tenant("vm")
    assert tenant.backend == "cinder" and tenant.cinder is not None
    assert (tenant.cinder.cloud, tenant.cinder.clouds_yaml, tenant.cinder.server_id) == (
        "tenant-a", None, SERVER,
    )  # fmt: skip
    assert tenant.cinder.metadata_url == "http://169.254.169.254/openstack/latest/meta_data.json"
    assert (tenant.cinder.attach_timeout, tenant.cinder.detach_timeout) == (60, 60)
    assert tenant.remove_policy == "delete"  # Cinder has no trash
    assert load_config(write(tmp_path, "[tenants.rbd]\n"), environ={}).tenant("rbd").cinder is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('backend = "swift"', "tenants.vm.backend 'swift' is not one of rbd, cinder"),
        ('backend = "cinder"', "tenants.vm.cloud is required with backend = \"cinder\""),
        ('backend = "cinder"\ncloud = "a"\npool = "vm"',
         "tenants.vm.pool is a rbd-backend key, but this tenant's backend is 'cinder'"),
        ('cloud = "a"', "tenants.vm.cloud is a cinder-backend key, but this tenant's backend is 'rbd'"),
        ('backend = "cinder"\ncloud = "a"\nremove_policy = "trash"',
         "tenants.vm.remove_policy 'trash' is not one of delete, keep"),
        ('backend = "cinder"\ncloud = "a"\nserver_id = "vm-1"', "'vm-1' is not a Nova server id"),
        ('backend = "cinder"\ncloud = "a"\nattach_timeout = "5m"', "must be 1-110 seconds"),
        ('backend = "cinder"\ncloud = "a"\nclouds_yaml = "clouds.yaml"', "must be an absolute path"),
        ('backend = "cinder"\ncloud = "a"\nmetadata_url = "169.254.169.254"', "must be an http"),
    ],
)  # fmt: skip
def test_bad_cinder_tenants_are_refused_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, f"[tenants.vm]\n{text}\n"), environ={})


def test_two_cinder_tenants_may_not_share_a_cloud(tmp_path: Path) -> None:
    text = '[tenants.a]\nbackend = "cinder"\ncloud = "same"\n[tenants.b]\nbackend = "cinder"\ncloud = "same"\n'
    with pytest.raises(ConfigError, match="both use cloud 'same'"):
        load_config(write(tmp_path, text), environ={})
    text = text.replace('cloud = "same"\n[tenants.b]', 'cloud = "other"\n[tenants.b]')
    assert len(load_config(write(tmp_path, text), environ={}).tenants) == 2


def test_only_tenant_serves_one_tenant_under_the_managed_plugins_name(tmp_path: Path) -> None:
    text = '[tenants.web]\npool = "web"\n[tenants.data]\npool = "data"\n'
    config = load_config(write(tmp_path, text), environ={})
    served = only_tenant(config, "data", "rbd")
    assert [(t.name, t.driver, t.pool) for t in served.tenants] == [("data", "rbd", "data")]
    assert only_tenant(config, "web").tenants[0].driver == "web"
    with pytest.raises(ConfigError, match="no tenant 'nope' in the config; tenants: web, data"):
        only_tenant(config, "nope")
    with pytest.raises(ConfigError, match="must be lower-case letters"):
        only_tenant(config, "web", "Bad Name")
