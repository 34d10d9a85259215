"""What a volume is made of, and the validation of everything a user can send.

Pure logic, no I/O: volume names, ``--opt`` options of ``docker volume create``,
image features, mkfs and mount options. Every rejection names the volume, the
bad value and the valid choices.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rbdplugin.errors import InvalidArgument
from rbdplugin.units import MiB, format_size, parse_size

FSTYPES = ("ext4", "xfs")
# Below these, mkfs refuses or makes a filesystem too small to be of use.
MIN_SIZE = {"ext4": 8 * MiB, "xfs": 300 * MiB}
MAX_SIZE = 1024**5  # 1 PiB

NAME_MAX = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
NAME_RULE = (
    f"use 1-{NAME_MAX} ASCII letters, digits, '_', '.' or '-', starting with a letter or digit"
)

# Feature -> the features it needs (librbd's own rules, checked here for a clearer message).
FEATURES: dict[str, tuple[str, ...]] = {
    "layering": (),
    "exclusive-lock": (),
    "object-map": ("exclusive-lock",),
    "fast-diff": ("object-map",),
    "deep-flatten": (),
    "journaling": ("exclusive-lock",),
}

OPTIONS: dict[str, str] = {
    "size": "size with a binary unit, e.g. 20G",
    "fstype": "|".join(FSTYPES),
    "pool": "a pool this tenant may use",
    "features": "comma-separated RBD features",
    "mkfs-options": "extra mkfs arguments",
    "mount-options": "comma-separated mount options",
    "source": "an existing volume this one is a read-only companion of",
    "access": "rw, or ro with source=",
}
ACCESS = ("rw", "ro")

# Mount options a volume may ask for. Anything that weakens the host (suid, dev),
# changes access (ro/rw: issue of leases) or can panic the host is not offered.
MOUNT_OPTIONS = frozenset(
    {
        "noatime", "relatime", "nodiratime", "lazytime", "strictatime", "discard",
        "nodiscard", "barrier", "nobarrier", "noexec", "sync", "dirsync", "user_xattr",
        "acl", "noacl", "data", "commit", "inode64", "logbufs", "logbsize", "allocsize",
        "largeio", "nolargeio", "journal_checksum", "noquota", "usrquota", "grpquota",
        "prjquota", "stripe", "delalloc", "nodelalloc",
    }
)  # fmt: skip
_MOUNT_OPTION_RE = re.compile(r"^([a-z_]+)(?:=([A-Za-z0-9_.:-]+))?$")
_MKFS_TOKEN_RE = re.compile(r"^[A-Za-z0-9_=,.:+-]+$")
MKFS_TOKENS_MAX = 32


@dataclass(frozen=True)
class VolumeSpec:
    """The properties a volume is created with (stored with the image in Ceph)."""

    size: int
    fstype: str
    pool: str
    features: tuple[str, ...]
    mkfs_options: tuple[str, ...] = ()
    mount_options: tuple[str, ...] = ()
    # A read-only companion: mounts volume ``source`` read-only, on any number of hosts.
    source: str = ""
    access: str = "rw"


@dataclass(frozen=True)
class CreateRequest:
    """A validated Create: the full spec, and which options the user set explicitly."""

    name: str
    spec: VolumeSpec
    explicit: frozenset[str]


@dataclass(frozen=True)
class Defaults:
    """The tenant-level values a Create falls back on."""

    size: int
    fstype: str
    pool: str
    pools: tuple[str, ...]
    features: tuple[str, ...]


def shown(name: str) -> str:
    """A user-supplied name made safe and short for an error message."""
    text = name if len(name) <= 48 else name[:40] + "..."
    return repr(text)


def validate_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidArgument(
            f"volume name must be a string, not {type(name).__name__}: {NAME_RULE}"
        )
    if not name:
        raise InvalidArgument(f"volume name is empty: {NAME_RULE}")
    if len(name) > NAME_MAX:
        raise InvalidArgument(
            f"volume name {shown(name)} is {len(name)} characters long: {NAME_RULE}"
        )
    if not _NAME_RE.match(name):
        raise InvalidArgument(f"volume name {shown(name)} is invalid: {NAME_RULE}")
    return name


def parse_create(name: str, opts: object, defaults: Defaults) -> CreateRequest:
    """Validate a Create's name and ``Opts`` (``None`` when Docker sent none)."""
    name = validate_name(name)
    options = _options(name, opts)
    fstype = _fstype(name, options.get("fstype", defaults.fstype))
    size = _size(name, options["size"], fstype) if "size" in options else defaults.size
    if size < MIN_SIZE[fstype]:
        raise InvalidArgument(
            f"volume {shown(name)}: size {format_size(size)} is too small for {fstype}; "
            f"use at least {format_size(MIN_SIZE[fstype])}"
        )
    spec = VolumeSpec(
        size=size,
        fstype=fstype,
        pool=_pool(name, options.get("pool", defaults.pool), defaults.pools),
        features=_features(name, options, defaults.features),
        mkfs_options=parse_mkfs_options(name, options.get("mkfs-options", "")),
        mount_options=parse_mount_options(name, options.get("mount-options", "")),
        **_companion(name, options),
    )
    return CreateRequest(name=name, spec=spec, explicit=frozenset(options))


def _options(name: str, opts: object) -> dict[str, str]:
    if opts is None:
        return {}
    if not isinstance(opts, Mapping):
        raise InvalidArgument(f"volume {shown(name)}: Opts must be an object of string values")
    valid = ", ".join(f"{key} ({what})" for key, what in OPTIONS.items())
    options: dict[str, str] = {}
    for raw_key, value in opts.items():
        key = str(raw_key).lower().replace("_", "-")
        if key not in OPTIONS:
            raise InvalidArgument(
                f"volume {shown(name)}: unknown option {shown(str(raw_key))}; "
                f"valid options: {valid}"
            )
        if not isinstance(value, str):
            raise InvalidArgument(f"volume {shown(name)}: option {key} must be a string")
        options[key] = value
    return options


def _companion(name: str, options: Mapping[str, str]) -> dict[str, str]:
    access = options.get("access", "ro" if "source" in options else "rw")
    if access not in ACCESS:
        raise InvalidArgument(f"volume {shown(name)}: access {shown(access)} is not one of rw, ro")
    source = options.get("source", "")
    if access == "ro" and not source:
        raise InvalidArgument(
            f"volume {shown(name)}: access=ro needs source=VOLUME: a read-only volume is a "
            "companion of an existing volume, mounted read-only on any number of hosts"
        )
    if source and access != "ro":
        raise InvalidArgument(
            f"volume {shown(name)}: a volume with source= is read-only: use access=ro"
        )
    if source:
        validate_name(source)
        if source == name:
            raise InvalidArgument(f"volume {shown(name)} cannot be its own source")
    return {"source": source, "access": access}


def _fstype(name: str, fstype: str) -> str:
    if fstype not in FSTYPES:
        raise InvalidArgument(
            f"volume {shown(name)}: fstype {shown(fstype)} is not supported; "
            f"valid: {', '.join(FSTYPES)}"
        )
    return fstype


def _size(name: str, text: str, fstype: str) -> int:
    try:
        size = parse_size(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"volume {shown(name)}: {exc}") from exc
    if size > MAX_SIZE:
        raise InvalidArgument(
            f"volume {shown(name)}: size {shown(text)} is larger than {format_size(MAX_SIZE)}"
        )
    return size


def _pool(name: str, pool: str, pools: tuple[str, ...]) -> str:
    if pool not in pools:
        raise InvalidArgument(
            f"volume {shown(name)}: pool {shown(pool)} is not allowed for this driver; "
            f"allowed pools: {', '.join(pools)}"
        )
    return pool


def _features(name: str, options: Mapping[str, str], default: tuple[str, ...]) -> tuple[str, ...]:
    if "features" not in options:
        return default
    items = [f.strip() for f in options["features"].split(",") if f.strip()]
    try:
        return parse_features(items)
    except InvalidArgument as exc:
        raise InvalidArgument(f"volume {shown(name)}: {exc}") from exc


def parse_features(items: Iterable[str]) -> tuple[str, ...]:
    """Validate RBD feature names and their dependencies; keep a stable order."""
    wanted = set()
    for item in items:
        if item not in FEATURES:
            raise InvalidArgument(
                f"unknown RBD feature {shown(item)}; valid features: {', '.join(FEATURES)}"
            )
        wanted.add(item)
    for feature in sorted(wanted):
        missing = [need for need in FEATURES[feature] if need not in wanted]
        if missing:
            raise InvalidArgument(f"RBD feature {feature} needs {', '.join(missing)} as well")
    return tuple(f for f in FEATURES if f in wanted)


def parse_mkfs_options(name: str, text: str) -> tuple[str, ...]:
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise InvalidArgument(
            f"volume {shown(name)}: mkfs-options cannot be parsed: {exc}"
        ) from exc
    if len(tokens) > MKFS_TOKENS_MAX:
        raise InvalidArgument(
            f"volume {shown(name)}: mkfs-options has {len(tokens)} words; at most {MKFS_TOKENS_MAX}"
        )
    for token in tokens:
        # No '/' at all: an option must never be able to name a device or a file.
        if not _MKFS_TOKEN_RE.match(token):
            raise InvalidArgument(
                f"volume {shown(name)}: mkfs-options word {shown(token)} is not allowed; "
                "use letters, digits and _ = , . : + - (no paths)"
            )
    if tokens and not tokens[0].startswith("-"):
        raise InvalidArgument(
            f"volume {shown(name)}: mkfs-options must start with an option such as -m0"
        )
    return tuple(tokens)


def parse_mount_options(name: str, text: str) -> tuple[str, ...]:
    options = [o.strip() for o in text.split(",") if o.strip()]
    for option in options:
        match = _MOUNT_OPTION_RE.match(option)
        if not match or match.group(1) not in MOUNT_OPTIONS:
            raise InvalidArgument(
                f"volume {shown(name)}: mount option {shown(option)} is not allowed; "
                f"valid: {', '.join(sorted(MOUNT_OPTIONS))}"
            )
    return tuple(options)


def incompatibilities(request: CreateRequest, existing: VolumeSpec) -> list[str]:
    """What an explicit Create option asks for that the existing volume does not have."""
    wanted, found = request.spec, existing
    checks = {
        "size": (wanted.size, found.size, format_size),
        "fstype": (wanted.fstype, found.fstype, str),
        "pool": (wanted.pool, found.pool, str),
        "features": (wanted.features, found.features, ",".join),
        "mkfs-options": (wanted.mkfs_options, found.mkfs_options, " ".join),
        "mount-options": (wanted.mount_options, found.mount_options, ",".join),
        "source": (wanted.source, found.source, str),
        "access": (wanted.access, found.access, str),
    }
    problems = []
    for key, (want, have, show) in checks.items():
        if key in request.explicit and want != have:
            problems.append(f"{key}={show(want)} (it has {show(have) or 'none'})")  # type: ignore[operator]
    return problems
