"""What a volume is made of, and the validation of everything a user can send.

Pure logic, no I/O: volume names, ``--opt`` options of ``docker volume create``,
image features, mkfs and mount options. Every rejection names the volume, the
bad value and the valid choices.

mkfs options are an allowlist per filesystem: every word is an allowed flag or
that flag's value, and every value is checked. mke2fs and mkfs.xfs have flags
that read host paths (``-d DIR``, ``-l FILE``, ``-p PROTOFILE``, ``-c options=``),
write host files (``-z FILE``), use other devices (``-J device=``, ``-l logdev=``,
``-d name=``), scan for bad blocks (``-c``) or leave the device unformatted
(``-n``, ``-N``); none of them is on a list. A word that is neither flag nor value
would be taken by getopt as mkfs's device argument, so it is refused too.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rbdplugin.errors import InvalidArgument
from rbdplugin.units import MiB, format_size, parse_size

FSTYPES = ("ext4", "xfs")
# Below these, mkfs refuses or makes a filesystem too small to be of use.
MIN_SIZE = {"ext4": 8 * MiB, "xfs": 300 * MiB}
MAX_SIZE = 1024**5  # 1 PiB

NAME_MAX = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
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

# librbd's image QoS settings, by Create option. Stored as the image's own config
# overrides (image-meta conf_rbd_qos_*), which librbd reads whenever it opens the image:
# they hold wherever the image is mapped through librbd (the fuse and nbd mappers),
# and can be changed with `rbd config image set`. The kernel client (krbd) has no QoS.
QOS: dict[str, str] = {
    "iops-limit": "rbd_qos_iops_limit",
    "read-iops-limit": "rbd_qos_read_iops_limit",
    "write-iops-limit": "rbd_qos_write_iops_limit",
    "bps-limit": "rbd_qos_bps_limit",
    "read-bps-limit": "rbd_qos_read_bps_limit",
    "write-bps-limit": "rbd_qos_write_bps_limit",
}
QOS_META_PREFIX = "conf_"  # librbd's prefix of per-image config overrides in image-meta
IOPS_MAX = 10**9
_IOPS_RE = re.compile(r"^[1-9][0-9]{0,9}\Z")
_IOPS_HELP = "librbd QoS, a whole number of I/O operations per second; krbd ignores it"
_BPS_HELP = "librbd QoS, bytes per second with a binary unit, at least 1M; krbd ignores it"

OPTIONS: dict[str, str] = {
    "size": "size with a binary unit, e.g. 20G",
    "fstype": "|".join(FSTYPES),
    "pool": "a pool this tenant may use",
    "features": "comma-separated RBD features",
    "mkfs-options": "extra mkfs flags from the filesystem's allowlist",
    "mount-options": "comma-separated mount options",
    "source": "an existing volume this one is a read-only companion of",
    "access": "rw, or ro with source=",
    "fsck": "|".join(("off", "auto")) + ": auto checks the filesystem before a Mount when it "
    "was not cleanly unmounted",
    "clone-of": "an existing volume: a copy-on-write clone of it as it is now",
    "from-snapshot": "VOLUME@SNAPSHOT: a copy-on-write clone of that snapshot",
    **{option: _IOPS_HELP if "iops" in option else _BPS_HELP for option in QOS},
    "uid": "owner of the filesystem's root at first format, a number 0-4294967294",
    "gid": "group of the filesystem's root at first format, a number 0-4294967294",
    "mode": "permissions of the filesystem's root at first format, octal 0000-7777, e.g. 0750",
}
# Options of a Cinder-mode tenant's Create: no pools, features or companions there;
# clones are Cinder volumes made from Cinder snapshots.
CINDER_OPTIONS: dict[str, str] = {
    "size": "size with a binary unit, e.g. 20G (Cinder rounds up to whole GiB)",
    "fstype": "|".join(FSTYPES),
    "mkfs-options": OPTIONS["mkfs-options"],
    "mount-options": OPTIONS["mount-options"],
    "volume-type": "a Cinder volume type (default: Cinder's default type)",
    "availability-zone": "a Cinder availability zone (default: Cinder's default zone)",
    "clone-of": "an existing volume: a new Cinder volume from a Cinder snapshot of it taken now",
    "from-snapshot": "VOLUME@SNAPSHOT: a new Cinder volume from that Cinder snapshot",
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
_MOUNT_OPTION_RE = re.compile(r"^([a-z_]+)(?:=([A-Za-z0-9_.:-]+))?\Z")
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
    # Cinder mode only: "" means Cinder's default.
    volume_type: str = ""
    availability_zone: str = ""
    # librbd QoS limits: (option, value) in QOS's order; IOPS, or bytes per second.
    qos: tuple[tuple[str, int], ...] = ()
    # A clone: "VOLUME@SNAPSHOT" (from-snapshot), or "VOLUME" (clone-of: the snapshot
    # is made for it). It carries its origin's filesystem and is never formatted.
    origin: str = ""
    # "auto": a filesystem left unclean (a crash, a lost host) is checked before a Mount.
    fsck: str = "off"
    # Set on the filesystem's root right after our mkfs (None: mkfs's own, root 0755).
    root_uid: int | None = None
    root_gid: int | None = None
    root_mode: int | None = None


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
    # The options this tenant's back-end understands (RBD's by default).
    options: Mapping[str, str] = field(default_factory=lambda: OPTIONS)
    volume_type: str = ""
    availability_zone: str = ""
    # Sizes the back-end allocates in (Cinder: whole GiB); a Create asking for less
    # matches a volume of the rounded-up size.
    size_step: int = 1


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


def is_volume_name(name: str) -> bool:
    """Whether ``name`` is a name Docker could have given (kept volumes carry a "~")."""
    try:
        validate_name(name)
    except InvalidArgument:
        return False
    return True


def parse_create(name: str, opts: object, defaults: Defaults) -> CreateRequest:
    """Validate a Create's name and ``Opts`` (``None`` when Docker sent none)."""
    name = validate_name(name)
    options = _options(name, opts, defaults.options)
    fstype = _fstype(name, options.get("fstype", defaults.fstype))
    size = _size(name, options["size"], fstype) if "size" in options else defaults.size
    if size < MIN_SIZE[fstype]:
        raise InvalidArgument(
            f"volume {shown(name)}: size {format_size(size)} is too small for {fstype}; "
            f"use at least {format_size(MIN_SIZE[fstype])}"
        )
    cinder = defaults.options is CINDER_OPTIONS
    uid, gid, mode = _root_owner(name, options)
    spec = VolumeSpec(
        size=size,
        fstype=fstype,
        pool="" if cinder else _pool(name, options.get("pool", defaults.pool), defaults.pools),
        features=() if cinder else _features(name, options, defaults.features),
        mkfs_options=parse_mkfs_options(name, options.get("mkfs-options", ""), fstype),
        mount_options=parse_mount_options(name, options.get("mount-options", "")),
        **_companion(name, options),
        volume_type=_label(name, "volume-type", options.get("volume-type", defaults.volume_type)),
        availability_zone=_label(
            name, "availability-zone", options.get("availability-zone", defaults.availability_zone)
        ),
        qos=parse_qos(name, options),
        origin=_origin(name, options),
        fsck=_fsck(name, options.get("fsck", "off")),
        root_uid=uid,
        root_gid=gid,
        root_mode=mode,
    )
    if spec.source and spec.qos:
        raise InvalidArgument(
            f"volume {shown(name)}: QoS options do not apply to a read-only companion: "
            f"it reads its source's image, whose limits apply; set them on {spec.source!r}"
        )
    return CreateRequest(name=name, spec=spec, explicit=frozenset(options))


FSCK = ("off", "auto")


def _fsck(name: str, value: str) -> str:
    if value not in FSCK:
        raise InvalidArgument(
            f"volume {shown(name)}: fsck {shown(value)} is not one of {', '.join(FSCK)}"
        )
    return value


def _origin(name: str, options: Mapping[str, str]) -> str:
    if "clone-of" in options and "from-snapshot" in options:
        raise InvalidArgument(
            f"volume {shown(name)}: clone-of and from-snapshot exclude each other: clone-of=VOL "
            "clones VOL as it is now, from-snapshot=VOL@SNAP clones a snapshot of it"
        )
    for clashing in ("source", "mkfs-options", "uid", "gid", "mode"):
        if clashing in options and ("clone-of" in options or "from-snapshot" in options):
            why = (
                "a clone is a volume of its own"
                if clashing == "source"
                else "a clone is never formatted: it carries its origin's filesystem"
            )
            raise InvalidArgument(f"volume {shown(name)}: {clashing} does not go with a clone: "
                                  f"{why}")  # fmt: skip
    if "clone-of" in options:
        origin = validate_name(options["clone-of"])
    elif "from-snapshot" in options:
        volume, at, snapshot = options["from-snapshot"].partition("@")
        if not at:
            raise InvalidArgument(
                f"volume {shown(name)}: from-snapshot {shown(options['from-snapshot'])} is not "
                "VOLUME@SNAPSHOT (rbdplugin snapshot ls VOLUME lists them)"
            )
        origin = f"{validate_name(volume)}@{validate_snapshot_name(snapshot)}"
    else:
        return ""
    if origin.partition("@")[0] == name:
        raise InvalidArgument(f"volume {shown(name)} cannot be a clone of itself")
    return origin


def clone_snapshot_prefix(name: str) -> str:
    """How the snapshots a clone-of Create takes for volume ``name`` begin."""
    return f"clone.{name}."


def clone_fstype(request: CreateRequest, volume: str, recorded: str) -> str:
    """The filesystem a clone of ``volume`` carries: the one recorded with it, which an
    explicit fstype of the Create must match."""
    name, spec = request.name, request.spec
    if not recorded:
        raise InvalidArgument(
            f"volume {name!r}: {volume!r} was made outside rbdplugin and has no recorded "
            f"fstype; adopt it first (docker volume create -d DRIVER --opt fstype=... {volume})"
        )
    if "fstype" in request.explicit and spec.fstype != recorded:
        raise InvalidArgument(
            f"volume {name!r}: a clone carries its origin's filesystem ({recorded}), "
            f"not {spec.fstype}; drop the fstype option"
        )
    return recorded


def validate_snapshot_name(snapshot: object) -> str:
    """A snapshot's name: the same rule as volume names."""
    try:
        return validate_name(snapshot)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc).replace("volume name", "snapshot name", 1)) from exc


def parse_qos(name: str, options: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """The QoS options among ``options``, validated, in QOS's order."""
    return tuple(
        (option, _qos_limit(name, option, options[option])) for option in QOS if option in options
    )


def _qos_limit(name: str, option: str, text: str) -> int:
    if "iops" in option:
        if not _IOPS_RE.match(text.strip()) or int(text) > IOPS_MAX:
            raise InvalidArgument(
                f"volume {shown(name)}: {option} {shown(text)} is not a whole number of I/O "
                f"operations per second from 1 to {IOPS_MAX}"
            )
        return int(text)
    try:
        limit = parse_size(text, option)
    except InvalidArgument as exc:
        raise InvalidArgument(f"volume {shown(name)}: {exc} (bytes per second)") from exc
    if limit > MAX_SIZE:
        raise InvalidArgument(
            f"volume {shown(name)}: {option} {shown(text)} is more than {format_size(MAX_SIZE)}/s"
        )
    return limit


def qos_metadata(qos: Iterable[tuple[str, int]]) -> dict[str, str]:
    """The image-meta entries that make librbd apply ``qos``."""
    return {f"{QOS_META_PREFIX}{QOS[option]}": str(value) for option, value in qos}


def qos_from_metadata(metadata: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """The QoS limits an image's image-meta sets (0 and unreadable values: none)."""
    found = []
    for option, conf in QOS.items():
        raw = metadata.get(f"{QOS_META_PREFIX}{conf}", "")
        if raw.isdigit() and int(raw) > 0:
            found.append((option, int(raw)))
    return tuple(found)


def _options(name: str, opts: object, known: Mapping[str, str]) -> dict[str, str]:
    if opts is None:
        return {}
    if not isinstance(opts, Mapping):
        raise InvalidArgument(f"volume {shown(name)}: Opts must be an object of string values")
    valid = ", ".join(f"{key} ({what})" for key, what in known.items())
    options: dict[str, str] = {}
    for raw_key, value in opts.items():
        key = str(raw_key).lower().replace("_", "-")
        if key not in known:
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


ROOT_ID_MAX = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
_MODE_RE = re.compile(r"^0?[0-7]{3,4}\Z")


def _root_owner(name: str, options: Mapping[str, str]) -> tuple[int | None, int | None, int | None]:
    """uid, gid and mode options: the filesystem root's owner and permissions."""
    found: dict[str, int | None] = {"uid": None, "gid": None, "mode": None}
    for key in ("uid", "gid"):
        value = options.get(key)
        if value is None:
            continue
        if not (value.isascii() and value.isdigit() and len(value) <= 10) or (
            int(value) > ROOT_ID_MAX
        ):
            raise InvalidArgument(
                f"volume {shown(name)}: {key} {shown(value)} is invalid: use a number "
                f"0-{ROOT_ID_MAX}, e.g. {key}=1000"
            )
        found[key] = int(value)
    mode = options.get("mode")
    if mode is not None:
        if not _MODE_RE.match(mode) or int(mode, 8) > 0o7777:
            raise InvalidArgument(
                f"volume {shown(name)}: mode {shown(mode)} is invalid: use an octal mode "
                "0000-7777 (three or four digits 0-7), e.g. mode=0750"
            )
        found["mode"] = int(mode, 8)
    if "source" in options and any(v is not None for v in found.values()):
        raise InvalidArgument(
            f"volume {shown(name)}: uid, gid and mode apply when a volume is first "
            "formatted; a read-only companion is never formatted (set them on its source)"
        )
    return found["uid"], found["gid"], found["mode"]


def format_mode(mode: int | None) -> str:
    return "" if mode is None else f"{mode:04o}"


# Cinder volume types and zones are names an admin made: letters, digits and a few signs.
_CINDER_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@ -]{0,254}\Z")


def _label(name: str, option: str, value: str) -> str:
    if value and not _CINDER_LABEL_RE.match(value):
        raise InvalidArgument(
            f"volume {shown(name)}: {option} {shown(value)} is invalid: letters, digits, "
            "spaces and '_.:@-', at most 255 characters"
        )
    return value


def _fstype(name: str, fstype: str) -> str:
    if fstype not in FSTYPES:
        raise InvalidArgument(
            f"volume {shown(name)}: fstype {shown(fstype)} is not supported; "
            f"valid: {', '.join(FSTYPES)}"
        )
    return fstype


def _size(name: str, text: str, fstype: str) -> int:
    return volume_size(name, text)


def volume_size(name: str, text: object) -> int:
    """A volume's size as written (``20G``), in bytes rounded up to a MiB, at most 1 PiB."""
    if not isinstance(text, str):
        raise InvalidArgument(f"volume {shown(name)}: size must be a string such as 20G")
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


# -- mkfs options ------------------------------------------------------------------------


class _Value(Protocol):
    """What one flag (or sub-option) accepts as its value."""

    @property
    def help(self) -> str: ...

    def problem(self, value: str) -> str | None:
        """Why ``value`` is refused, or None when it is fine."""


@dataclass(frozen=True)
class _Choice:
    choices: tuple[str, ...]

    @property
    def help(self) -> str:
        return "|".join(self.choices)

    def problem(self, value: str) -> str | None:
        return None if value in self.choices else f"{shown(value)} is not one of {self.help}"


_BOOL = _Choice(("0", "1"))
_POWERS_OF_TWO = tuple(str(2**n) for n in range(10, 17))  # 1024 ... 65536


@dataclass(frozen=True)
class _Int:
    low: int
    high: int

    @property
    def help(self) -> str:
        return f"{self.low}-{self.high}"

    def problem(self, value: str) -> str | None:
        # Decimal digits only: no sign, no 0x, no suffix that mkfs would read differently.
        if not (value.isascii() and value.isdigit() and len(value) <= 12):
            return f"{shown(value)} is not a whole number {self.help}"
        if not self.low <= int(value) <= self.high:
            return f"{shown(value)} is not in {self.help}"
        return None


_SIZE_RE = re.compile(r"^([0-9]{1,10})([kmgKMG]?)\Z")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class _Size:
    """An mkfs.xfs size in bytes: a decimal number with an optional k, m or g."""

    low: int
    high: int

    @property
    def help(self) -> str:
        return f"SIZE ({format_size(self.low)}-{format_size(self.high)}, e.g. 64k, 128m)"

    def problem(self, value: str) -> str | None:
        match = _SIZE_RE.match(value)
        if not match:
            return f"{shown(value)} is not a size such as 64k, 128m or 1g"
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if not self.low <= size <= self.high:
            return f"{shown(value)} is not in {format_size(self.low)}-{format_size(self.high)}"
        return None


_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class _Label:
    max_length: int

    @property
    def help(self) -> str:
        return f"LABEL (1-{self.max_length} of A-Z a-z 0-9 _ . -)"

    def problem(self, value: str) -> str | None:
        if len(value) > self.max_length or not _LABEL_RE.match(value):
            return f"{shown(value)} is not a label: {self.help}"
        return None


_ID = _Int(0, 2**32 - 2)  # (uid_t)-1 means "no change" to the kernel


@dataclass(frozen=True)
class _Owner:
    @property
    def help(self) -> str:
        return "UID:GID"

    def problem(self, value: str) -> str | None:
        uid, sep, gid = value.partition(":")
        if not sep or _ID.problem(uid) or _ID.problem(gid):
            return f"{shown(value)} is not UID:GID, two numbers {_ID.help}"
        return None


@dataclass(frozen=True)
class _Names:
    """A list of names from a fixed set; with ``negatable``, each may be turned off with ^."""

    metavar: str
    names: tuple[str, ...]
    separator: str = ","
    negatable: bool = False

    @property
    def help(self) -> str:
        item = f"[^]{self.metavar}" if self.negatable else self.metavar
        return f"{item}{self.separator}..."

    def problem(self, value: str) -> str | None:
        for item in value.split(self.separator):
            name = item[1:] if self.negatable and item.startswith("^") else item
            if name not in self.names:
                return f"{shown(item)} is not allowed; valid: {', '.join(self.names)}"
        return None


@dataclass(frozen=True)
class _SubOptions:
    """Comma-separated sub-options, each from its own allowlist; None: a bare keyword.

    ``together``: sub-options that mkfs accepts only with each other.
    """

    options: Mapping[str, _Value | None]
    together: tuple[tuple[str, ...], ...] = ()

    @property
    def help(self) -> str:
        return ",".join(k if v is None else f"{k}={v.help}" for k, v in self.options.items())

    def problem(self, value: str) -> str | None:
        seen: set[str] = set()
        for item in value.split(","):
            key, sep, sub_value = item.partition("=")
            if key not in self.options:
                return f"sub-option {shown(item)} is not allowed"
            if key in seen:  # mkfs.xfs refuses a respecified sub-option
                return f"sub-option {shown(item)} is given twice"
            seen.add(key)
            spec = self.options[key]
            if spec is None and sep:
                return f"sub-option {shown(item)} takes no value; use {key}"
            if spec is not None:
                problem = spec.problem(sub_value) if sep else "needs a value"
                if problem:
                    return f"sub-option {shown(item)}: {problem}; use {key}={spec.help}"
        for group in self.together:
            given = [item for item in value.split(",") if item.partition("=")[0] in group]
            if given and len(given) < len(group):
                return f"sub-option {shown(given[0])} needs {' and '.join(group)} together"
        return None


# Not journal_dev: the image would become an external journal, never mountable.
EXT4_FEATURES = (
    "64bit", "bigalloc", "casefold", "dir_index", "dir_nlink", "ea_inode", "encrypt",
    "ext_attr", "extent", "extra_isize", "fast_commit", "filetype", "flex_bg", "has_journal",
    "huge_file", "inline_data", "large_dir", "large_file", "metadata_csum",
    "metadata_csum_seed", "meta_bg", "mmp", "orphan_file", "project", "quota", "resize_inode",
    "sparse_super", "sparse_super2", "stable_inodes", "uninit_bg", "verity",
)  # fmt: skip
EXT4_USAGE_TYPES = ("small", "default", "big", "huge", "news", "largefile", "largefile4")
_BLOCK_SIZES = ("1024", "2048", "4096")  # the kernel mounts only blocks up to the page size

# Flag -> its value (None: a flag without value). Everything else is refused.
MKFS_FLAGS: dict[str, dict[str, _Value | None]] = {
    "ext4": {
        "-b": _Choice(_BLOCK_SIZES),
        "-E": _SubOptions({
            "root_owner": _Owner(),
            "stride": _Int(1, 2**30),
            "stripe_width": _Int(1, 2**30),
            "lazy_itable_init": _BOOL,
            "lazy_journal_init": _BOOL,
            "discard": None,
            "nodiscard": None,
            "resize": _Int(1, 2**32 - 1),
            "quotatype": _Names("TYPE", ("usrquota", "grpquota", "prjquota"), separator=":"),
        }),
        "-I": _Choice(("128", "256", "512", "1024")),
        "-i": _Int(1024, 64 * MiB),
        "-J": _SubOptions({"size": _Int(1, 102400)}),  # MiB; never device=
        "-L": _Label(16),
        "-m": _Int(0, 50),
        "-N": _Int(1, 2**32 - 1),
        "-O": _Names("FEATURE", EXT4_FEATURES, negatable=True),
        "-T": _Names("TYPE", EXT4_USAGE_TYPES),
    },
    "xfs": {
        "-b": _SubOptions({"size": _Choice(_BLOCK_SIZES)}),
        "-m": _SubOptions({
            name: _BOOL for name in ("crc", "reflink", "bigtime", "finobt", "rmapbt", "inobtcount")
        }),
        "-i": _SubOptions({"size": _Choice(("256", "512", "1024", "2048"))}),
        "-L": _Label(12),
        # mkfs.xfs 6.1 makes logs of 64M-2038M; always internal, never logdev=.
        "-l": _SubOptions({"size": _Size(64 * MiB, 2038 * MiB)}),
        "-d": _SubOptions(  # never file=, name= or size=
            {"su": _Size(512, 256 * MiB), "sw": _Int(1, 256), "agcount": _Int(1, 65536)},
            together=(("su", "sw"),),
        ),
        "-n": _SubOptions({"size": _Choice(_POWERS_OF_TWO)}),
        "-K": None,
    },
}  # fmt: skip


def mkfs_flags_help(fstype: str) -> str:
    """The allowed mkfs flags of ``fstype``, as an error message lists them."""
    return "; ".join(
        flag if value is None else f"{flag} {value.help}"
        for flag, value in MKFS_FLAGS[fstype].items()
    )


def parse_mkfs_options(name: str, text: str, fstype: str) -> tuple[str, ...]:
    """Validate the ``mkfs-options`` of a volume of ``fstype``; the words as written."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise InvalidArgument(
            f"volume {shown(name)}: mkfs-options cannot be parsed: {exc}"
        ) from exc
    return check_mkfs_words(name, fstype, words)


def check_mkfs_words(name: str, fstype: str, words: Sequence[str]) -> tuple[str, ...]:
    """Refuse any word that is not an allowed flag of ``fstype`` or a valid value of one.

    A value may be attached (``-m0``) or the next word (``-m 0``): both are what
    getopt reads. Each flag at most once (mke2fs keeps only the last ``-E``).
    """
    if len(words) > MKFS_TOKENS_MAX:
        raise InvalidArgument(
            f"volume {shown(name)}: mkfs-options has {len(words)} words; at most {MKFS_TOKENS_MAX}"
        )
    flags = MKFS_FLAGS[fstype]

    def refuse(problem: str) -> InvalidArgument:
        return InvalidArgument(
            f"volume {shown(name)}: mkfs-options {problem}; "
            f"allowed flags for {fstype}: {mkfs_flags_help(fstype)}"
        )

    given: set[str] = set()
    rest = iter(words)
    for word in rest:
        flag = word[:2]
        if len(word) < 2 or word[0] != "-" or word[1] == "-":
            raise refuse(f"word {shown(word)} is not a flag")
        if flag not in flags:
            shown_flag = shown(flag if len(word) == 2 else word)
            raise refuse(f"word {shown_flag} is not an allowed flag for {fstype}")
        if flag in given:
            raise refuse(
                f"word {shown(word)} repeats {flag}: give it once, sub-options joined by ','"
            )
        given.add(flag)
        spec = flags[flag]
        if spec is None:
            if len(word) > 2:
                raise refuse(f"word {shown(word)}: {flag} takes no value")
            continue
        value = word[2:] if len(word) > 2 else next(rest, None)
        if value is None:
            raise refuse(f"flag {shown(flag)} needs a value: {flag} {spec.help}")
        problem = spec.problem(value)
        if problem:
            subject = flag if isinstance(spec, _SubOptions) else f"{flag} value"
            raise refuse(f"{subject} {problem}")
    return tuple(words)


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


def incompatibilities(
    request: CreateRequest, existing: VolumeSpec, size_step: int = 1
) -> list[str]:
    """What an explicit Create option asks for that the existing volume does not have.
    Sizes compare after rounding up to ``size_step`` (Cinder's whole GiB)."""
    wanted, found = request.spec, existing
    rounded = -(-wanted.size // size_step) * size_step
    checks = {
        "size": (rounded, found.size, format_size),
        "fstype": (wanted.fstype, found.fstype, str),
        "pool": (wanted.pool, found.pool, str),
        "features": (wanted.features, found.features, ",".join),
        "mkfs-options": (wanted.mkfs_options, found.mkfs_options, " ".join),
        "mount-options": (wanted.mount_options, found.mount_options, ",".join),
        "source": (wanted.source, found.source, str),
        "access": (wanted.access, found.access, str),
        "volume-type": (wanted.volume_type, found.volume_type, str),
        "availability-zone": (wanted.availability_zone, found.availability_zone, str),
        "clone-of": (wanted.origin.partition("@")[0], found.origin.partition("@")[0], str),
        "from-snapshot": (wanted.origin, found.origin, str),
        "fsck": (wanted.fsck, found.fsck, str),
        "uid": (wanted.root_uid, found.root_uid, _shown_id),
        "gid": (wanted.root_gid, found.root_gid, _shown_id),
        "mode": (wanted.root_mode, found.root_mode, format_mode),
    }
    problems = []
    for key, (want, have, show) in checks.items():
        if key in request.explicit and want != have:
            problems.append(f"{key}={show(want)} (it has {show(have) or 'none'})")  # type: ignore[operator]
    wanted_qos, found_qos = dict(wanted.qos), dict(found.qos)
    for key in QOS:
        if key in request.explicit and wanted_qos.get(key) != found_qos.get(key):
            unit = format_size if "bps" in key else str
            have_qos = found_qos.get(key)
            problems.append(f"{key}={unit(wanted_qos[key])} "
                            f"(it has {unit(have_qos) if have_qos else 'none'})")  # fmt: skip
    return problems


def _shown_id(value: int | None) -> str:
    return "" if value is None else str(value)
