"""Properties of everything a user can send (hypothesis): names, sizes, durations, Create
options, mkfs and mount options. Whatever the input, a parser either accepts a value that
keeps its rule or refuses it with InvalidArgument: never another exception type."""

from __future__ import annotations

import re
import string
from decimal import Decimal
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from rbdplugin.errors import InvalidArgument
from rbdplugin.spec import (
    CINDER_OPTIONS,
    FEATURES,
    FSTYPES,
    MAX_SIZE,
    MIN_SIZE,
    MKFS_FLAGS,
    MOUNT_OPTIONS,
    NAME_MAX,
    OPTIONS,
    Defaults,
    parse_create,
    parse_features,
    parse_mkfs_options,
    parse_mount_options,
    validate_name,
)
from rbdplugin.units import MiB, format_size, parse_duration, parse_size

DEFAULTS = Defaults(
    size=64 * MiB, fstype="ext4", pool="alpha", pools=("alpha", "shared"), features=("layering",)
)
CINDER_DEFAULTS = Defaults(
    size=MiB * 1024, fstype="ext4", pool="", pools=(), features=(), options=CINDER_OPTIONS
)
UNITS = {"K": 1024, "M": MiB, "G": 1024**3, "T": 1024**4, "P": 1024**5}
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Text with what trips parsers up: newlines, NULs, spaces, non-ASCII digits, signs.
TRICKY = st.text(
    st.sampled_from([*string.ascii_letters, *string.digits, *"._-=,:^ \n\t\0\x7f+/~'\"\\"])
    | st.characters(),
    max_size=40,
)


def refused_or(value: Any, *args: Any) -> Any:
    """``value(*args)``, or None when it refuses with InvalidArgument (any other type fails)."""
    try:
        return value(*args)
    except InvalidArgument as exc:
        assert str(exc), "a refusal without a message"
        return None


# -- names -----------------------------------------------------------------------------


@given(TRICKY | st.from_regex(NAME_RULE, fullmatch=True))
@example("abc\n")
@example("v" * (NAME_MAX + 1))
def test_accepted_names_keep_the_rule(name: str) -> None:
    accepted = refused_or(validate_name, name)
    if accepted is not None:
        assert accepted == name
        assert NAME_RULE.fullmatch(name) and name.isascii() and len(name) <= NAME_MAX, repr(name)


@given(st.from_regex(NAME_RULE, fullmatch=True).filter(lambda n: len(n) <= NAME_MAX))
def test_every_name_of_the_rule_is_accepted(name: str) -> None:
    assert validate_name(name) == name


@given(
    st.one_of(st.none(), st.integers(), st.lists(st.text()), st.dictionaries(st.text(), st.text()))
)
def test_a_name_that_is_not_a_string_is_refused(name: object) -> None:
    assert refused_or(validate_name, name) is None


# -- sizes -----------------------------------------------------------------------------


@given(TRICKY)
@example("1e3G")
@example("-5G")
@example("0.0000001K")
@example("20G\n")
@example("9" * 5000 + "P")
def test_parse_size_accepts_only_positive_whole_mib(text: str) -> None:
    size = refused_or(parse_size, text)
    if size is not None:
        assert isinstance(size, int) and size > 0 and size % MiB == 0, (text, size)


@given(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
    st.sampled_from(list(UNITS)),
    st.sampled_from(["", "B", "iB", "b", "ib"]),
    st.booleans(),
)
def test_a_number_with_a_unit_is_that_many_bytes_rounded_up_to_mib(
    number: Decimal, unit: str, suffix: str, lower: bool
) -> None:
    text = f"{number}{unit.lower() if lower else unit}{suffix}"
    exact = int(number * UNITS[unit])
    size = refused_or(parse_size, text)
    if exact <= 0:
        assert size is None, text
    else:
        assert size == -(-exact // MiB) * MiB, text


@given(st.integers(min_value=1, max_value=MAX_SIZE // MiB))
def test_format_size_round_trips(mib: int) -> None:
    assert parse_size(format_size(mib * MiB)) == mib * MiB


@given(
    TRICKY
    | st.builds(lambda n, u: f"{n}{u}", st.integers(-9, 10**30), st.sampled_from(list(UNITS)))
)
def test_create_sizes_are_within_limits(text: str) -> None:
    for fstype in FSTYPES:
        request = refused_or(parse_create, "v", {"size": text, "fstype": fstype}, DEFAULTS)
        if request is not None:
            assert MIN_SIZE[fstype] <= request.spec.size <= MAX_SIZE, (text, fstype)
            assert request.spec.size % MiB == 0


@given(TRICKY | st.integers(min_value=-(2**40), max_value=2**40))
@example("10\n")
@example("-1")
def test_parse_duration_is_whole_non_negative_seconds(text: str | int) -> None:
    seconds = refused_or(parse_duration, text)
    if seconds is not None:
        assert isinstance(seconds, int) and seconds >= 0, (text, seconds)


# -- Create options --------------------------------------------------------------------

VALUES = st.one_of(
    TRICKY,
    st.sampled_from(["64M", "1G", "ext4", "xfs", "alpha", "layering", "rw", "ro", "noatime"]),
    st.none(),
    st.integers(),
    st.lists(st.text(), max_size=2),
)
KEYS = st.sampled_from([*OPTIONS, *CINDER_OPTIONS, "Size", "MKFS_OPTIONS"]) | TRICKY


@given(st.one_of(st.none(), st.dictionaries(KEYS, VALUES, max_size=5), VALUES), st.booleans())
@settings(max_examples=300)
@example({"volume-type": "gold\n"}, True)
@example({"source": "base\n"}, False)
def test_create_options_are_accepted_whole_or_refused(opts: object, cinder: bool) -> None:
    defaults = CINDER_DEFAULTS if cinder else DEFAULTS
    request = refused_or(parse_create, "vol", opts, defaults)
    if request is None:
        return
    spec = request.spec
    assert spec.fstype in FSTYPES
    assert MIN_SIZE[spec.fstype] <= spec.size <= MAX_SIZE
    assert set(spec.features) <= set(FEATURES)
    assert request.explicit <= set(defaults.options)
    assert "\n" not in spec.volume_type + spec.availability_zone + spec.source
    if not cinder:
        assert spec.pool in defaults.pools
    assert all(option.split("=")[0] in MOUNT_OPTIONS for option in spec.mount_options)


@given(TRICKY.filter(lambda k: k.lower().replace("_", "-") not in {*OPTIONS, *CINDER_OPTIONS}))
@example("sizes")
@example("mkfs_opts")
def test_an_unknown_option_is_refused_naming_every_valid_one(key: str) -> None:
    for defaults in (DEFAULTS, CINDER_DEFAULTS):
        try:
            parse_create("vol", {key: "1"}, defaults)
        except InvalidArgument as exc:
            message = str(exc)
        else:
            raise AssertionError(f"option {key!r} accepted")
        assert "unknown option" in message and "valid options: " in message
        for valid in defaults.options:
            assert valid in message


@given(st.lists(st.sampled_from([*FEATURES, "striping", "", " layering"]), max_size=6))
def test_accepted_features_carry_their_dependencies(items: list[str]) -> None:
    features = refused_or(parse_features, items)
    if features is not None:
        for feature in features:
            assert set(FEATURES[feature]) <= set(features)


# -- mkfs and mount options ------------------------------------------------------------

MKFS_WORDS = st.lists(
    st.sampled_from([flag for flags in MKFS_FLAGS.values() for flag in flags])
    | st.sampled_from(["0", "4096", "size=64m", "su=64k,sw=2", "root_owner=1:1", "^has_journal"])
    | TRICKY,
    max_size=6,
).map(" ".join)


@given(MKFS_WORDS | TRICKY, st.sampled_from(FSTYPES))
@example("-L 'data\n'", "ext4")
@example("-l 'size=64m\n'", "xfs")
@example("-d /etc", "ext4")
def test_mkfs_options_are_flags_of_the_allowlist(text: str, fstype: str) -> None:
    words = refused_or(parse_mkfs_options, "vol", text, fstype)
    if words is None:
        return
    for word in words:
        assert "\n" not in word and "\0" not in word, words
        if word.startswith("-"):
            assert word[:2] in MKFS_FLAGS[fstype], words


@given(st.lists(st.sampled_from(sorted(MOUNT_OPTIONS)) | TRICKY, max_size=5).map(",".join) | TRICKY)
@example("noatime,suid")
@example("commit=5\n,dev")
def test_mount_options_come_from_the_safe_list(text: str) -> None:
    options = refused_or(parse_mount_options, "vol", text)
    if options is not None:
        for option in options:
            key, _, value = option.partition("=")
            assert key in MOUNT_OPTIONS, option
            assert re.fullmatch(r"[A-Za-z0-9_.:-]*", value), option
