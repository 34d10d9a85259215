"""A drop-in for yp-engineering's rbd-docker-plugin: its flags as a one-tenant config.

Operators start that plugin as ``rbd-docker-plugin --create --user=docker --pool=docker``.
``rbdplugin serve`` accepts the same flags (Go style too: ``-create``, ``-user docker``,
``--create=false``) and builds the equivalent configuration as TOML text, which is
printed at start so it can be saved as ``/etc/rbdplugin/rbdplugin.toml``.

``--config`` means two things: the seed's ceph.conf, and our TOML file. The rule
(:func:`config_is_ceph_conf`): it is the seed's ceph.conf when any other seed flag is
given, or when the file is not TOML with a ``[tenants]`` table; otherwise it is ours.

The seed's defaults are kept where they are safe; where ours are safer (or the seed's
cannot be expressed) the translation says so in :attr:`Translation.notes`, for the log.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from rbdplugin.config import Config, _apply_env, config_from_dict
from rbdplugin.errors import ConfigError

SEED = "rbd-docker-plugin"
REMOVE_ACTIONS = ("ignore", "delete", "rename")
# The seed's remove action -> our remove_policy. "ignore" left the image in place
# under its name; "keep" keeps it too, renamed, so the name is free again.
REMOVE_POLICY = {"ignore": "keep", "delete": "delete", "rename": "keep"}
_BOOLS = ("create", "debug")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# Where librados looks for a keyring when ceph.conf names none ($cluster, $name expanded).
_KEYRING_SEARCH = (
    "/etc/ceph/$cluster.$name.keyring",
    "/etc/ceph/$cluster.keyring",
    "/etc/ceph/keyring",
    "/etc/ceph/keyring.bin",
)


@dataclass(frozen=True)
class SeedFlags:
    """The seed's flags, with the seed's own defaults (main.go)."""

    name: str = "rbd"
    user: str = "admin"
    config: Path = Path("/etc/ceph/ceph.conf")
    cluster: str = ""
    pool: str = "rbd"
    plugins: Path = Path("/run/docker/plugins")
    mount: Path = Path("/var/lib/docker-volumes")
    logdir: Path = Path("/var/log")
    create: bool = False
    size: int = 20 * 1024  # MB, as `rbd create --size` takes it (MiB)
    fs: str = "xfs"
    remove: str = "ignore"
    debug: bool = False


# Flags only the seed has: any of them on the command line means seed mode.
SEED_ONLY = tuple(f.name for f in fields(SeedFlags) if f.name != "config")


@dataclass(frozen=True)
class Translation:
    toml: str
    notes: tuple[str, ...]


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Go's flag syntax as argparse reads it: ``-user x`` -> ``--user x``, and a bare
    boolean ``--create`` -> ``--create=true`` (a Go bool flag never takes the next word)."""
    names = {f.name for f in fields(SeedFlags)}
    out = []
    for arg in argv:
        single = arg.startswith("-") and not arg.startswith("--")
        flag = "-" + arg if single and arg[1:].split("=")[0] in names else arg
        out.append(f"{flag}=true" if flag[2:] in _BOOLS and flag.startswith("--") else flag)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's flags on ``serve`` (``--config`` is shared; see the module docstring)."""
    group = parser.add_argument_group(f"{SEED} flags (without a TOML config; see README)")
    group.add_argument("--name", help="driver name (seed default: rbd)")
    group.add_argument("--user", help="cephx user (seed default: admin)")
    group.add_argument("--cluster", help="Ceph cluster name, for the keyring path")
    group.add_argument("--pool", help="the pool (seed default: rbd)")
    group.add_argument("--plugins", type=Path, metavar="DIR", help="Docker plugin socket dir")
    group.add_argument("--mount", type=Path, metavar="DIR", help="where volumes are mounted")
    group.add_argument("--logdir", type=Path, metavar="DIR", help="ignored: we log to stderr")
    group.add_argument("--create", type=_go_bool, metavar="BOOL", help="create on docker run -v")
    group.add_argument("--size", type=int, metavar="MB", help="default size in MB (20480)")
    group.add_argument("--fs", help="default filesystem, ext4 or xfs (seed default: xfs)")
    group.add_argument("--remove", choices=REMOVE_ACTIONS, help="on Remove (default: ignore)")
    group.add_argument("--debug", type=_go_bool, metavar="BOOL", help="debug logging")


def _go_bool(text: str) -> bool:
    value = text.lower()
    if value in ("1", "t", "true"):
        return True
    if value in ("0", "f", "false"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")


def seed_flags_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) is not None for name in SEED_ONLY)


def config_is_ceph_conf(path: Path) -> bool:
    """Whether ``--config FILE`` (with no other seed flag) names the seed's ceph.conf:
    it does unless the file is TOML with a [tenants] table (ceph.conf is INI: usually
    not TOML at all, and never with [tenants])."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return path.exists()
    return "tenants" not in data


def flags_from(args: argparse.Namespace) -> SeedFlags:
    given = {f.name: getattr(args, f.name) for f in fields(SeedFlags)}
    # The seed took relative paths from its working directory; the config needs them absolute.
    given.update({k: Path(v).absolute() for k, v in given.items() if isinstance(v, Path)})
    return SeedFlags(**{k: v for k, v in given.items() if v is not None})


def translate(flags: SeedFlags) -> Translation:
    """The one-tenant TOML equivalent to ``flags``, and what the log should say."""
    if flags.fs not in ("ext4", "xfs"):
        raise ConfigError(f"--fs {flags.fs!r}: rbdplugin formats ext4 or xfs")
    if not _NAME_RE.match(flags.name):
        raise ConfigError(
            f"--name {flags.name!r}: a driver name is lower-case letters, digits, '.', '_' "
            "or '-' (it names the socket and shows in docker volume ls)"
        )
    if flags.size <= 0:
        raise ConfigError(f"--size {flags.size}: must be a positive number of MB")
    if not flags.config.is_file():
        raise ConfigError(f"--config {flags.config}: no such ceph.conf (the seed needs one too)")
    cluster = flags.cluster or "ceph"
    keyring = find_keyring(flags.config, cluster, flags.user)
    notes = [
        f"--remove={flags.remove}: remove_policy = {REMOVE_POLICY[flags.remove]!r}"
        + ("" if flags.remove == "delete" else " (the image is kept, renamed out of the way)"),
        f"volumes are mounted at {flags.mount}/{flags.name}/<volume> (the seed used "
        f"{flags.mount}/<pool>/<volume>); volume names carry no pool/ or @size: use "
        "--opt pool=, and --opt size= with a unit (size=1024 is refused, size=1024M is meant)",
        "safer than the seed: mounts get nosuid,nodev; one host writes a volume at a time "
        "(a RADOS lease; a dead writer is fenced before another takes over)",
    ]
    if not flags.create:
        notes.append(
            "without --create: auto_create = false (docker run -v does not create volumes); "
            "unlike the seed, an explicit `docker volume create` still creates one"
        )
    if flags.user == "admin":
        notes.append(
            "user admin (the seed's default) can reach the whole cluster: give the plugin a "
            "user of its own with caps mon 'profile rbd' osd 'profile rbd pool=" + flags.pool + "'"
        )
    if flags.logdir != SeedFlags.logdir:
        notes.append(f"--logdir {flags.logdir} is ignored: rbdplugin logs to stderr (journald)")
    daemon = {"socket_dir": str(flags.plugins), "mount_root": str(flags.mount)}
    if flags.debug:
        daemon["log_level"] = "debug"
    tenant = {
        "driver": flags.name,
        "pool": flags.pool,
        "user": flags.user,
        "keyring": str(keyring),
        "default_size": f"{flags.size}M",
        "default_fstype": flags.fs,
        "remove_policy": REMOVE_POLICY[flags.remove],
        "auto_create": flags.create,
    }
    text = "\n".join([
        f"# rbdplugin.toml equivalent to: {SEED} {' '.join(command_line(flags))}",
        "[daemon]", *_lines(daemon), "",
        "[ceph]", *_lines({"conf": str(flags.config)}), "",
        f"[tenants.{_table_name(flags.name)}]", *_lines(tenant), "",
    ])  # fmt: skip
    return Translation(text, tuple(notes))


def load(translation: Translation, environ: Mapping[str, str]) -> Config:
    """The config of ``translation``, with the usual RBDPLUGIN_* environment overrides."""
    data = tomllib.loads(translation.toml)
    _apply_env(data, environ)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"the {SEED} flags: {exc}") from exc


def command_line(flags: SeedFlags) -> list[str]:
    """The flags that differ from the seed's defaults, as the seed would take them."""
    default = SeedFlags()
    out = []
    for f in fields(SeedFlags):
        value = getattr(flags, f.name)
        if value != getattr(default, f.name):
            out.append(f"--{f.name}" if value is True else f"--{f.name}={_go(value)}")
    return out


def _go(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _lines(table: Mapping[str, object]) -> list[str]:
    return [f"{key} = {json.dumps(value)}" for key, value in table.items()]


def _table_name(name: str) -> str:
    # A TOML bare key is [A-Za-z0-9_-]; a driver name may hold '.', so quote it then.
    return json.dumps(name) if "." in name else name


def find_keyring(ceph_conf: Path, cluster: str, user: str) -> Path:
    """Where librados finds client.<user>'s keyring: ceph.conf's ``keyring`` (in
    [client.<user>], [client] or [global]), else the first of its default search paths
    that exists (else the first one, which the daemon's error then names)."""
    setting = _conf_keyring(ceph_conf, user)
    candidates = setting.split(",") if setting else list(_KEYRING_SEARCH)
    expanded = [Path(_expand(c.strip(), cluster, user)) for c in candidates if c.strip()]
    for path in expanded:
        if path.exists():
            return path
    return expanded[0]


def _expand(value: str, cluster: str, user: str) -> str:
    return (
        value.replace("$cluster", cluster)
        .replace("$name", f"client.{user}")
        .replace("$type", "client")
        .replace("$id", user)
    )


def _conf_keyring(ceph_conf: Path, user: str) -> str:
    parser = _CephConf(strict=False, interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string("\n".join(line.strip() for line in ceph_conf.read_text().splitlines()))
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(f"--config {ceph_conf}: cannot read it as a ceph.conf: {exc}") from exc
    for section in (f"client.{user}", "client", "global"):
        if parser.has_option(section, "keyring"):
            return parser.get(section, "keyring")
    return ""


class _CephConf(configparser.ConfigParser):
    def optionxform(self, optionstr: str) -> str:
        # Ceph spells option names with spaces or underscores alike.
        return optionstr.strip().replace(" ", "_").lower()
