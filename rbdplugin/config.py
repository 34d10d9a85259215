"""The daemon's configuration: one TOML file, one frozen and validated object.

Built in one place (:func:`load_config`); a bad file stops start-up with a
:class:`~rbdplugin.errors.ConfigError` naming the key and the problem. Unknown
keys are errors too: a typo must not silently fall back to a default.

A tenant's ``backend`` says where its volumes live: ``rbd`` (the default: images in
the tenant's Ceph pool, mapped on this host) or ``cinder`` (Cinder volumes attached to
this OpenStack VM through Nova; no Ceph keys on this host). Keys of the other back-end
are refused, naming the back-end they belong to.

Environment overrides use one prefix, ``RBDPLUGIN_<SECTION>_<KEY>``, for the
``[daemon]`` and ``[ceph]`` sections (``RBDPLUGIN_DAEMON_HOST_ID=node7``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from rbdplugin.errors import ConfigError, InvalidArgument
from rbdplugin.spec import FSTYPES, parse_features
from rbdplugin.units import GiB, parse_duration, parse_size

MapperName = Literal["auto", "krbd", "nbd", "fuse"]
BackendName = Literal["rbd", "cinder"]
BACKENDS: tuple[BackendName, ...] = ("rbd", "cinder")
RemovePolicy = Literal["delete", "trash", "keep"]
Takeover = Literal["auto", "manual"]
TAKEOVERS: tuple[Takeover, ...] = ("auto", "manual")

MAPPERS: tuple[MapperName, ...] = ("auto", "krbd", "nbd", "fuse")
REMOVE_POLICIES: tuple[RemovePolicy, ...] = ("delete", "trash", "keep")
# Cinder has no trash: a removed volume is deleted or kept (out of Docker's sight).
CINDER_REMOVE_POLICIES: tuple[RemovePolicy, ...] = ("delete", "keep")
DEFAULT_METADATA_URL = "http://169.254.169.254/openstack/latest/meta_data.json"
DEFAULT_FEATURES = ("layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten")
DEFAULT_METRICS = "127.0.0.1:9747"
ENV_PREFIX = "RBDPLUGIN_"

# Docker plugin names end up in socket file names and in `docker volume ls`.
_DRIVER_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# Ceph pool, namespace and cephx names we accept: no spaces, slashes or shell specials.
_CEPH_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class DaemonConfig:
    socket_dir: Path = Path("/run/docker/plugins")
    state_dir: Path = Path("/var/lib/rbdplugin")
    mount_root: Path = Path("/var/lib/rbdplugin/mounts")
    host_id: str = field(default_factory=socket.gethostname)
    mapper: MapperName = "auto"
    metrics: str = DEFAULT_METRICS
    op_timeout: int = 25
    log_level: str = "info"
    # How long a fenced (blocklisted) client stays fenced.
    fence_seconds: int = 7 * 86400
    # How often each held lease is checked (a host that lost one logs it and shows it).
    lease_check_seconds: int = 5


@dataclass(frozen=True)
class CephConfig:
    conf: Path = Path("/etc/ceph/ceph.conf")
    # librados timeouts, so a dead cluster gives errors instead of hung threads.
    client_timeout: int = 15


@dataclass(frozen=True)
class CinderConfig:
    """Where a Cinder-mode tenant's volumes come from, and who this VM is."""

    cloud: str
    # None: openstacksdk's usual search path (./clouds.yaml, ~/.config/openstack, /etc/openstack).
    clouds_yaml: Path | None = None
    # "" means: find it (config drive, then metadata_url, then the DMI product UUID).
    server_id: str = ""
    metadata_url: str = DEFAULT_METADATA_URL
    volume_type: str = ""
    availability_zone: str = ""
    # From the Nova attach call until the disk is here; until it is gone and available.
    attach_timeout: int = 60
    detach_timeout: int = 60
    # Each single HTTP call to Keystone, Cinder or Nova.
    api_timeout: int = 20


@dataclass(frozen=True)
class TenantConfig:
    name: str
    driver: str
    pool: str
    namespace: str
    user: str
    keyring: Path
    default_size: int = 20 * GiB
    default_fstype: str = "ext4"
    features: tuple[str, ...] = DEFAULT_FEATURES
    allowed_pools: tuple[str, ...] = ()
    max_volumes: int = 0
    max_total_size: int = 0
    remove_policy: RemovePolicy = "trash"
    trash_delay: int = 0
    auto_create: bool = True
    # A Create of an existing volume with a larger size grows it (else: Conflict).
    grow_on_create: bool = False
    takeover: Takeover = "auto"
    # Clones (clone-of, from-snapshot) are flattened in the background after Create: they
    # stop reading from their origin's snapshot, which is then freed.
    flatten_clones: bool = False
    # Volume mounts get nosuid,nodev; False is an explicit opt-out for tenants whose
    # volumes need setuid binaries or device nodes.
    nosuid_nodev: bool = True
    backend: BackendName = "rbd"
    cinder: CinderConfig | None = None  # set exactly when backend == "cinder"

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool this tenant may hold volumes in, its own pool first."""
        return (self.pool, *(p for p in self.allowed_pools if p != self.pool))


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    ceph: CephConfig
    tenants: tuple[TenantConfig, ...]

    def tenant(self, name: str) -> TenantConfig:
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        raise KeyError(name)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, and validate the config at ``path``."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    _apply_env(data, os.environ if environ is None else environ)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for section in ("daemon", "ceph"):
        for key, value in environ.items():
            prefix = f"{ENV_PREFIX}{section.upper()}_"
            if key.startswith(prefix):
                table = data.setdefault(section, {})
                option = key[len(prefix) :].lower()
                known = _SECTION_TYPES[section].get(option)
                table[option] = int(value) if known is int and value.isdigit() else value


def config_from_dict(data: Mapping[str, Any]) -> Config:
    _check_keys(data, {"daemon", "ceph", "tenants"}, "")
    daemon = _daemon(_table(data, "daemon"))
    ceph = _ceph(_table(data, "ceph"))
    tenants_table = _table(data, "tenants")
    if not tenants_table:
        raise ConfigError("[tenants] is empty: define at least one [tenants.NAME] table")
    tenants = tuple(
        _tenant(name, _table(tenants_table, name, "tenants.")) for name in tenants_table
    )
    _check_unique(tenants)
    return Config(daemon=daemon, ceph=ceph, tenants=tenants)


_SECTION_TYPES: dict[str, dict[str, type]] = {
    "daemon": {
        "socket_dir": str,
        "state_dir": str,
        "mount_root": str,
        "host_id": str,
        "mapper": str,
        "metrics": str,
        "op_timeout": int,
        "log_level": str,
        "fence_seconds": int,
        "lease_check_seconds": int,
    },
    "ceph": {"conf": str, "client_timeout": int},
}

_TENANT_TYPES: dict[str, type | tuple[type, ...]] = {
    "driver": str,
    "pool": str,
    "namespace": str,
    "user": str,
    "keyring": str,
    "default_size": str,
    "default_fstype": str,
    "features": list,
    "allowed_pools": list,
    "max_volumes": int,
    "max_total_size": str,
    "remove_policy": str,
    "trash_delay": (str, int),
    "auto_create": bool,
    "grow_on_create": bool,
    "takeover": str,
    "flatten_clones": bool,
    "nosuid_nodev": bool,
    "backend": str,
    "cloud": str,
    "clouds_yaml": str,
    "server_id": str,
    "metadata_url": str,
    "volume_type": str,
    "availability_zone": str,
    "attach_timeout": (str, int),
    "detach_timeout": (str, int),
    "api_timeout": (str, int),
}
# Keys only one back-end understands (the rest are common to both).
_RBD_ONLY = ("pool", "namespace", "user", "keyring", "features", "allowed_pools",
             "trash_delay", "takeover", "flatten_clones")  # fmt: skip
_CINDER_ONLY = ("cloud", "clouds_yaml", "server_id", "metadata_url", "volume_type",
                "availability_zone", "attach_timeout", "detach_timeout", "api_timeout")  # fmt: skip


def _table(data: Mapping[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{prefix}{key}] must be a table")
    return cast(dict[str, Any], value)


def _check_keys(
    table: Mapping[str, Any], allowed: set[str] | Mapping[str, Any], where: str
) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        place = f"[{where}] " if where else ""
        raise ConfigError(
            f"{place}unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(allowed))}"
        )


def _typed(table: Mapping[str, Any], types: Mapping[str, Any], where: str) -> dict[str, Any]:
    _check_keys(table, types, where)
    for key, value in table.items():
        expected = types[key]
        if isinstance(value, bool) and expected is not bool:
            ok = False
        else:
            ok = isinstance(value, expected)
        if not ok:
            names = expected if isinstance(expected, tuple) else (expected,)
            want = " or ".join(_TYPE_NAMES[t] for t in names)
            raise ConfigError(f"{where}.{key} must be {want}, not {value!r}")
    return dict(table)


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


def _daemon(table: Mapping[str, Any]) -> DaemonConfig:
    t = _typed(table, _SECTION_TYPES["daemon"], "daemon")
    defaults = DaemonConfig()
    mapper = t.get("mapper", defaults.mapper)
    if mapper not in MAPPERS:
        raise ConfigError(f"daemon.mapper {mapper!r} is not one of {', '.join(MAPPERS)}")
    timeout = t.get("op_timeout", defaults.op_timeout)
    if not 1 <= timeout <= 110:
        raise ConfigError(
            f"daemon.op_timeout {timeout} must be 1-110 seconds (Docker gives up at 120 s)"
        )
    host_id = t.get("host_id") or defaults.host_id
    if not _CEPH_NAME_RE.match(host_id):
        raise ConfigError(f"daemon.host_id {host_id!r} must be letters, digits, '.', '_' or '-'")
    metrics = t.get("metrics", defaults.metrics)
    if metrics:
        _check_listen(metrics, "daemon.metrics")
    return DaemonConfig(
        socket_dir=_abs_path(t, "socket_dir", defaults.socket_dir, "daemon"),
        state_dir=_abs_path(t, "state_dir", defaults.state_dir, "daemon"),
        mount_root=_abs_path(t, "mount_root", defaults.mount_root, "daemon"),
        host_id=host_id,
        mapper=cast(MapperName, mapper),
        metrics=metrics,
        op_timeout=timeout,
        log_level=_log_level(t.get("log_level", defaults.log_level)),
        fence_seconds=_at_least(
            t.get("fence_seconds", defaults.fence_seconds), 60, "daemon.fence_seconds"
        ),
        lease_check_seconds=_at_least(
            t.get("lease_check_seconds", defaults.lease_check_seconds),
            1,
            "daemon.lease_check_seconds",
        ),
    )


def _at_least(value: int, minimum: int, key: str) -> int:
    if value < minimum:
        raise ConfigError(f"{key} {value} must be at least {minimum}")
    return value


def _log_level(level: str) -> str:
    levels = ("debug", "info", "warning", "error")
    if level.lower() not in levels:
        raise ConfigError(f"daemon.log_level {level!r} is not one of {', '.join(levels)}")
    return level.lower()


def _check_listen(address: str, key: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} {address!r} must be HOST:PORT, for example {DEFAULT_METRICS}")


def _abs_path(t: Mapping[str, Any], key: str, default: Path, where: str) -> Path:
    value = Path(t[key]) if key in t else default
    if not value.is_absolute():
        raise ConfigError(f"{where}.{key} {str(value)!r} must be an absolute path")
    return value


def _ceph(table: Mapping[str, Any]) -> CephConfig:
    t = _typed(table, _SECTION_TYPES["ceph"], "ceph")
    defaults = CephConfig()
    timeout = t.get("client_timeout", defaults.client_timeout)
    if not 1 <= timeout <= 100:
        raise ConfigError(f"ceph.client_timeout {timeout} must be 1-100 seconds")
    return CephConfig(conf=_abs_path(t, "conf", defaults.conf, "ceph"), client_timeout=timeout)


def _tenant(name: str, table: Mapping[str, Any]) -> TenantConfig:
    where = f"tenants.{name}"
    if not _DRIVER_RE.match(name):
        raise ConfigError(f"[{where}]: tenant names must match {_DRIVER_RE.pattern}")
    t = _typed(table, _TENANT_TYPES, where)
    backend = t.get("backend", "rbd")
    if backend not in BACKENDS:
        raise ConfigError(f"{where}.backend {backend!r} is not one of {', '.join(BACKENDS)}")
    other = _CINDER_ONLY if backend == "rbd" else _RBD_ONLY
    for key in other:
        if key in t:
            owner = "cinder" if backend == "rbd" else "rbd"
            raise ConfigError(
                f"{where}.{key} is a {owner}-backend key, but this tenant's backend is "
                f"{backend!r} (backend = {owner!r} would use it)"
            )
    try:
        common = _common(name, t, where, backend)
        if backend == "cinder":
            return TenantConfig(**common, pool="", namespace="", user="", keyring=Path("/"),
                                backend="cinder", cinder=_cinder(t, where))  # fmt: skip
        return _rbd_tenant(name, t, where, common)
    except InvalidArgument as exc:
        raise ConfigError(str(exc)) from exc


def _common(name: str, t: Mapping[str, Any], where: str, backend: str) -> dict[str, Any]:
    """The keys every back-end understands."""
    policies = CINDER_REMOVE_POLICIES if backend == "cinder" else REMOVE_POLICIES
    default_policy = "delete" if backend == "cinder" else "trash"
    return {
        "name": name,
        "driver": _driver(t.get("driver", name), where),
        "default_size": parse_size(t.get("default_size", "20G"), f"{where}.default_size"),
        "default_fstype": _fstype(t.get("default_fstype", "ext4"), where),
        "max_volumes": _non_negative(t.get("max_volumes", 0), f"{where}.max_volumes"),
        "max_total_size": _optional_size(t.get("max_total_size", ""), f"{where}.max_total_size"),
        "remove_policy": _remove_policy(t.get("remove_policy", default_policy), where, policies),
        "auto_create": t.get("auto_create", True),
        "grow_on_create": t.get("grow_on_create", False),
        "nosuid_nodev": t.get("nosuid_nodev", True),
    }


def _rbd_tenant(
    name: str, t: Mapping[str, Any], where: str, common: dict[str, Any]
) -> TenantConfig:
    user = _ceph_name(t.get("user", name), f"{where}.user")
    return TenantConfig(
        **common,
        pool=_ceph_name(t.get("pool", name), f"{where}.pool"),
        namespace=_namespace(t.get("namespace", ""), where),
        user=user,
        keyring=_abs_path(t, "keyring", Path(f"/etc/ceph/ceph.client.{user}.keyring"), where),
        features=parse_features(_str_list(t, "features", DEFAULT_FEATURES, where)),
        allowed_pools=tuple(
            _ceph_name(p, f"{where}.allowed_pools")
            for p in _str_list(t, "allowed_pools", (), where)
        ),
        trash_delay=parse_duration(t.get("trash_delay", 0), f"{where}.trash_delay"),
        takeover=_takeover(t.get("takeover", "auto"), where),
        flatten_clones=t.get("flatten_clones", False),
    )


def _cinder(t: Mapping[str, Any], where: str) -> CinderConfig:
    if not t.get("cloud"):
        raise ConfigError(
            f'{where}.cloud is required with backend = "cinder": the name of a cloud in '
            "clouds.yaml (the application credential the plugin authenticates with)"
        )
    clouds_yaml = _abs_path(t, "clouds_yaml", Path("/"), where) if "clouds_yaml" in t else None
    server_id = t.get("server_id", "")
    if server_id and not _SERVER_ID_RE.match(server_id):
        raise ConfigError(f"{where}.server_id {server_id!r} is not a Nova server id (a UUID)")
    url = t.get("metadata_url", DEFAULT_METADATA_URL)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.metadata_url {url!r} must be an http:// or https:// URL")
    return CinderConfig(
        cloud=t["cloud"],
        clouds_yaml=clouds_yaml,
        server_id=server_id.lower(),
        metadata_url=url,
        volume_type=t.get("volume_type", ""),
        availability_zone=t.get("availability_zone", ""),
        attach_timeout=_seconds(t, "attach_timeout", 60, where),
        detach_timeout=_seconds(t, "detach_timeout", 60, where),
        api_timeout=_seconds(t, "api_timeout", 20, where),
    )


_SERVER_ID_RE = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")


def _seconds(t: Mapping[str, Any], key: str, default: int, where: str) -> int:
    """A Cinder-mode wait: it must end before Docker gives up on the request (120 s)."""
    value = parse_duration(t.get(key, default), f"{where}.{key}")
    if not 1 <= value <= 110:
        raise ConfigError(
            f"{where}.{key} {value} s must be 1-110 seconds (Docker gives up at 120 s)"
        )
    return value


def _driver(driver: str, where: str) -> str:
    if not _DRIVER_RE.match(driver):
        raise ConfigError(
            f"{where}.driver {driver!r} must be lower-case letters, digits, '.', '_' or '-'"
        )
    return driver


def _namespace(namespace: str, where: str) -> str:
    return _ceph_name(namespace, f"{where}.namespace") if namespace else ""


def _ceph_name(value: str, key: str) -> str:
    if not _CEPH_NAME_RE.match(value):
        raise ConfigError(f"{key} {value!r} must be letters, digits, '.', '_' or '-'")
    return value


def _str_list(
    t: Mapping[str, Any], key: str, default: tuple[str, ...], where: str
) -> tuple[str, ...]:
    values = t.get(key, list(default))
    if not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}.{key} must be a list of strings")
    return tuple(values)


def _fstype(fstype: str, where: str) -> str:
    if fstype not in FSTYPES:
        raise ConfigError(f"{where}.default_fstype {fstype!r} is not one of {', '.join(FSTYPES)}")
    return fstype


def _remove_policy(
    policy: str, where: str, policies: tuple[RemovePolicy, ...] = REMOVE_POLICIES
) -> RemovePolicy:
    if policy not in policies:
        raise ConfigError(f"{where}.remove_policy {policy!r} is not one of {', '.join(policies)}")
    return policy


def _takeover(value: str, where: str) -> Takeover:
    if value not in TAKEOVERS:
        raise ConfigError(f"{where}.takeover {value!r} is not one of {', '.join(TAKEOVERS)}")
    return value


def _non_negative(value: int, key: str) -> int:
    if value < 0:
        raise ConfigError(f"{key} {value} must be 0 (unlimited) or more")
    return value


def _optional_size(value: str, key: str) -> int:
    return 0 if value in ("", "0") else parse_size(value, key)


def _check_unique(tenants: tuple[TenantConfig, ...]) -> None:
    seen: dict[str, str] = {}
    for tenant in tenants:
        if tenant.driver in seen:
            raise ConfigError(
                f"tenants.{tenant.name}.driver {tenant.driver!r} is already used by "
                f"tenants.{seen[tenant.driver]}: each tenant needs its own driver name"
            )
        seen[tenant.driver] = tenant.name
    _check_disjoint(tenants)


def _check_disjoint(tenants: tuple[TenantConfig, ...]) -> None:
    """No two tenants may reach one pool in one namespace (pool or allowed_pools).

    A tenant lists, mounts and removes every volume in its pools, so a shared
    pool and namespace would hand one tenant's volumes to the other.
    """
    for index, first in enumerate(tenants):
        for second in tenants[index + 1 :]:
            if first.cinder and second.cinder:
                _check_clouds_apart(first, second)
                continue
            if first.cinder or second.cinder or first.namespace != second.namespace:
                continue
            shared = [pool for pool in first.pools if pool in second.pools]
            if shared:
                where = f"namespace {first.namespace!r}" if first.namespace else "no namespace"
                raise ConfigError(
                    f"tenants.{first.name} and tenants.{second.name} both use pool "
                    f"{shared[0]!r} in {where} (as pool or in allowed_pools): they could "
                    "list, mount and remove each other's volumes. Tenants must not share "
                    "a pool and namespace: give each its own pools, or its own namespace"
                )


def _check_clouds_apart(first: TenantConfig, second: TenantConfig) -> None:
    """Two Cinder tenants on one cloud entry would be one OpenStack project: each could
    attach and delete the other's volumes. Isolation comes from separate projects."""
    a, b = first.cinder, second.cinder
    assert a is not None and b is not None  # noqa: S101 - the caller checked
    if (a.cloud, a.clouds_yaml) == (b.cloud, b.clouds_yaml):
        raise ConfigError(
            f"tenants.{first.name} and tenants.{second.name} both use cloud {a.cloud!r}: "
            "they would share one OpenStack project and could attach and delete each other's "
            "volumes. Give each tenant a cloud entry (application credential) of its own project"
        )


def only_tenant(config: Config, name: str, driver: str | None = None) -> Config:
    """``config`` serving tenant ``name`` alone, under ``driver`` if given: a managed
    plugin has one socket (``rbd.sock``), so it serves one tenant under that name."""
    try:
        tenant = config.tenant(name)
    except KeyError:
        valid = ", ".join(t.name for t in config.tenants)
        raise ConfigError(f"no tenant {name!r} in the config; tenants: {valid}") from None
    if driver is not None:
        _driver(driver, f"tenants.{name} (as driver)")
        tenant = dataclasses.replace(tenant, driver=driver)
    return dataclasses.replace(config, tenants=(tenant,))
