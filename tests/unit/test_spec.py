"""Volume names, sizes and Create options: what is accepted and what each rejection says."""

from __future__ import annotations

import pytest

from rbdplugin.errors import InvalidArgument
from rbdplugin.spec import (
    CreateRequest,
    Defaults,
    VolumeSpec,
    incompatibilities,
    parse_create,
    parse_features,
    parse_mkfs_options,
    parse_mount_options,
    validate_name,
)
from rbdplugin.units import GiB, MiB, TiB, format_size, parse_duration, parse_size

DEFAULTS = Defaults(
    size=20 * GiB, fstype="ext4", pool="alpha", pools=("alpha", "shared"), features=("layering",)
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1G", GiB),
        ("20g", 20 * GiB),
        ("512M", 512 * MiB),
        ("1.5T", 1536 * GiB),
        ("2GiB", 2 * GiB),
        ("100KB", MiB),  # rounded up to a whole MiB
        ("1T", TiB),
    ],
)
def test_sizes_are_binary_and_whole_mib(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "-1", "1X", "abc", "", "10", "0G", "1e3G", "G", "1 G B"])
def test_bad_sizes_are_rejected_with_the_valid_form(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"(not a size|greater than zero).*512M"):
        parse_size(text)


def test_format_size_is_exact() -> None:
    assert format_size(20 * GiB) == "20G"
    assert format_size(1536 * MiB) == "1536M"
    assert format_size(12345) == "12345B"


def test_durations() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90") == 90
    assert parse_duration(30) == 30
    with pytest.raises(InvalidArgument, match="not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    "name",
    ["", "..", ".", "a/b", "../etc", "-rf", "x" * 300, "has space", "naïve", "a;rm -rf /",
     "$(id)", "a`b`", "a|b", "_lead", "tab\tname", "new\nline"],
)  # fmt: skip
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidArgument, match="volume name") as err:
        validate_name(name)
    assert "letters, digits" in str(err.value)
    assert len(str(err.value)) < 300  # a 300-char name is shortened in the message


@pytest.mark.parametrize("name", ["a", "db-data", "v1.2_x", "0" * 64, "A" * 128])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


def test_non_string_name() -> None:
    with pytest.raises(InvalidArgument, match="must be a string"):
        validate_name(7)


def test_create_with_null_opts_uses_tenant_defaults() -> None:
    request = parse_create("vol", None, DEFAULTS)
    assert request.spec == VolumeSpec(
        size=20 * GiB, fstype="ext4", pool="alpha", features=("layering",)
    )
    assert request.explicit == frozenset()


def test_create_with_every_option() -> None:
    request = parse_create(
        "vol",
        {
            "size": "2G",
            "fstype": "xfs",
            "pool": "shared",
            "features": "layering,exclusive-lock,object-map",
            "mkfs-options": "-m 0 -E root_owner=1000:1000",
            "mount_options": "noatime,discard",
        },
        DEFAULTS,
    )
    spec = request.spec
    assert (spec.size, spec.fstype, spec.pool) == (2 * GiB, "xfs", "shared")
    assert spec.features == ("layering", "exclusive-lock", "object-map")
    assert spec.mkfs_options == ("-m", "0", "-E", "root_owner=1000:1000")
    assert spec.mount_options == ("noatime", "discard")
    assert request.explicit == {
        "size", "fstype", "pool", "features", "mkfs-options", "mount-options"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"colour": "red"}, r"unknown option 'colour'; valid options: size .*fstype"),
        ({"fstype": "btrfs"}, r"fstype 'btrfs' is not supported; valid: ext4, xfs"),
        ({"pool": "beta"}, r"pool 'beta' is not allowed .* allowed pools: alpha, shared"),
        ({"size": "abc"}, r"volume 'vol': size 'abc' is not a size"),
        ({"size": "0"}, r"volume 'vol': size '0'"),
        ({"size": "4M"}, r"size 4M is too small for ext4; use at least 8M"),
        ({"size": "100M", "fstype": "xfs"}, r"too small for xfs; use at least 300M"),
        ({"size": "2048P"}, r"larger than 1P"),
        ({"features": "fast-diff"}, r"fast-diff needs object-map"),
        ({"features": "layering,turbo"}, r"unknown RBD feature 'turbo'; valid features: layering"),
        ({"mkfs-options": "-d /etc/passwd"}, r"word '/etc/passwd' is not allowed"),
        ({"mkfs-options": "oops -m0"}, r"must start with an option"),
        ({"mkfs-options": "'unterminated"}, r"cannot be parsed"),
        ({"mount-options": "suid"}, r"mount option 'suid' is not allowed; valid: acl"),
        ({"mount-options": "errors=panic"}, r"mount option 'errors=panic' is not allowed"),
        ({"size": 5}, r"option size must be a string"),
    ],
)
def test_bad_options_name_the_volume_and_the_choices(opts: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_create("vol", opts, DEFAULTS)


def test_opts_must_be_an_object() -> None:
    with pytest.raises(InvalidArgument, match="Opts must be an object"):
        parse_create("vol", ["size", "1G"], DEFAULTS)


def test_features_keep_a_stable_order() -> None:
    assert parse_features(["object-map", "exclusive-lock", "layering"]) == (
        "layering", "exclusive-lock", "object-map"
    )  # fmt: skip


def test_mkfs_and_mount_option_limits() -> None:
    with pytest.raises(InvalidArgument, match="at most 32"):
        parse_mkfs_options("vol", " ".join(["-q"] * 33))
    assert parse_mount_options("vol", " noatime , ,commit=30") == ("noatime", "commit=30")


def test_incompatibilities_only_look_at_explicit_options() -> None:
    existing = VolumeSpec(size=GiB, fstype="ext4", pool="alpha", features=("layering",))
    implicit = parse_create("vol", None, DEFAULTS)  # defaults say 20G, but nothing explicit
    assert incompatibilities(implicit, existing) == []
    same = parse_create("vol", {"size": "1G", "fstype": "ext4"}, DEFAULTS)
    assert incompatibilities(same, existing) == []
    other = parse_create("vol", {"size": "2G", "fstype": "xfs"}, DEFAULTS)
    assert incompatibilities(other, existing) == [
        "size=2G (it has 1G)",
        "fstype=xfs (it has ext4)",
    ]


def test_create_request_is_frozen() -> None:
    request = parse_create("vol", None, DEFAULTS)
    assert isinstance(request, CreateRequest)
    with pytest.raises(AttributeError):
        request.name = "other"  # type: ignore[misc]
