"""Volume names, sizes and Create options: what is accepted and what each rejection says."""

from __future__ import annotations

import pytest

from rbdplugin.errors import InvalidArgument
from rbdplugin.spec import (
    CINDER_OPTIONS,
    CreateRequest,
    Defaults,
    VolumeSpec,
    incompatibilities,
    parse_create,
    parse_features,
    parse_mkfs_options,
    parse_mount_options,
    qos_from_metadata,
    qos_metadata,
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
            "mkfs-options": "-m reflink=0 -L data",
            "mount_options": "noatime,discard",
        },
        DEFAULTS,
    )
    spec = request.spec
    assert (spec.size, spec.fstype, spec.pool) == (2 * GiB, "xfs", "shared")
    assert spec.features == ("layering", "exclusive-lock", "object-map")
    assert spec.mkfs_options == ("-m", "reflink=0", "-L", "data")
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
        (
            {"mkfs-options": "-d /etc/passwd"},
            r"mkfs-options word '-d' is not an allowed flag for ext4",
        ),
        ({"mkfs-options": "oops -m0"}, r"word 'oops' is not a flag"),
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
        parse_mkfs_options("vol", " ".join(["-m", "0"] * 17), "ext4")
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


# -- mkfs-options: an allowlist of flags per filesystem (issue 9, item 9) ---------------------


def mkfs_words(fstype: str, text: str) -> tuple[str, ...]:
    opts = {"fstype": fstype, "size": "1G", "mkfs-options": text}
    return parse_create("vol", opts, DEFAULTS).spec.mkfs_options


GOOD_EXT4 = [
    "-m 0", "-m0", "-m 50", "-b 4096", "-b1024", "-i 16384", "-I 256", "-N 100000",
    "-L data", "-Lmy_vol-1.x", "-L " + "x" * 16, "-J size=64",
    "-E root_owner=1000:1000", "-Eroot_owner=0:0", "-E stride=16,stripe_width=64",
    "-E lazy_itable_init=0,lazy_journal_init=1", "-E nodiscard", "-E discard",
    "-E resize=4294967295", "-E quotatype=usrquota:prjquota",
    "-O ^has_journal", "-O metadata_csum,^64bit,quota", "-T largefile4", "-T news,small",
    "-m 0 -E root_owner=1000:1000 -L data", "-b 4096 -I 512 -i 65536 -O quota -T big",
]  # fmt: skip


@pytest.mark.parametrize("text", GOOD_EXT4)
def test_allowed_ext4_mkfs_options_are_kept_as_written(text: str) -> None:
    assert mkfs_words("ext4", text) == tuple(text.split())


GOOD_XFS = [
    "-b size=4096", "-bsize=1024", "-m crc=1,reflink=0", "-m bigtime=1,finobt=1",
    "-i size=512", "-isize=2048", "-L data", "-L " + "x" * 12, "-l size=64m", "-l size=2038m",
    "-d su=64k,sw=4", "-d agcount=8", "-n size=8192", "-K",
    "-K -m crc=1,reflink=1 -i size=512 -l size=128m -d agcount=4 -L db",
]  # fmt: skip


@pytest.mark.parametrize("text", GOOD_XFS)
def test_allowed_xfs_mkfs_options_are_kept_as_written(text: str) -> None:
    assert mkfs_words("xfs", text) == tuple(text.split())


# (fstype, mkfs-options, the word or sub-option the message must name)
BAD_MKFS = [
    # mke2fs flags that read or write host paths, scan, or run other devices
    ("ext4", "-d etc", "-d"), ("ext4", "-d /etc", "-d"), ("ext4", "-detc", "-detc"),
    ("ext4", "-z undo", "-z"), ("ext4", "-z ''", "-z"), ("ext4", "-c", "-c"),
    ("ext4", "-cc", "-cc"), ("ext4", "-l badblocks.txt", "-l"), ("ext4", "-J device=sdb", "device=sdb"),
    ("ext4", "-J device=/dev/sdb", "device=/dev/sdb"), ("ext4", "-J device=LABEL=log", "device=LABEL=log"),
    ("ext4", "-J size=64,device=sdb", "device=sdb"), ("ext4", "-J location=0", "location=0"),
    ("ext4", "-E offset=4096", "offset=4096"), ("ext4", "-Eoffset=1", "offset=1"),
    ("ext4", "-E root_owner=1:1,offset=4096", "offset=4096"), ("ext4", "-D", "-D"),
    ("ext4", "-O journal_dev", "journal_dev"), ("ext4", "-O none", "none"),
    # mke2fs flags that destroy, do nothing, change the type or can panic the host
    ("ext4", "-S", "-S"), ("ext4", "-n", "-n"), ("ext4", "-F", "-F"), ("ext4", "-t ext2", "-t"),
    ("ext4", "-e panic", "-e"), ("ext4", "-U clear", "-U"), ("ext4", "-M mnt", "-M"),
    ("ext4", "-o hurd", "-o"), ("ext4", "-r 0", "-r"), ("ext4", "-V", "-V"), ("ext4", "-v", "-v"),
    ("ext4", "-q", "-q"), ("ext4", "-C 65536", "-C"), ("ext4", "-g 8192", "-g"),
    ("ext4", "-G 16", "-G"), ("ext4", "-j", "-j"), ("ext4", "-R stride=8", "-R"),
    # words that are not flags: GNU getopt would make them mkfs's device argument
    ("ext4", "etc", "etc"), ("ext4", "-m 0 etc", "etc"), ("ext4", "-- etc", "--"),
    ("ext4", "--", "--"), ("ext4", "-", "-"), ("ext4", "--help", "--help"),
    # bad values
    ("ext4", "-m", "-m"), ("ext4", "-m -d", "-d"), ("ext4", "-m 51", "51"), ("ext4", "-m -1", "-1"),
    ("ext4", "-m 0x10", "0x10"), ("ext4", "-m 5.5", "5.5"), ("ext4", "-b 8192", "8192"),
    ("ext4", "-b -4096", "-4096"), ("ext4", "-I 100", "100"), ("ext4", "-i 512", "512"),
    ("ext4", "-N 0", "0"), ("ext4", "-L " + "x" * 17, "x" * 17), ("ext4", "-L a/b", "a/b"),
    ("ext4", "-L ''", ""), ("ext4", "-L -x", "-x"), ("ext4", "-E root_owner", "root_owner"),
    ("ext4", "-E root_owner=1000", "root_owner=1000"), ("ext4", "-E root_owner=-1:0", "root_owner=-1:0"),
    ("ext4", "-E root_owner=4294967295:0", "root_owner=4294967295:0"), ("ext4", "-E stride=0", "stride=0"),
    ("ext4", "-E lazy_itable_init=2", "lazy_itable_init=2"), ("ext4", "-E nodiscard=1", "nodiscard=1"),
    ("ext4", "-E quotatype=all", "quotatype=all"), ("ext4", "-E ,", ""), ("ext4", "-O ^journal_dev", "^journal_dev"),
    ("ext4", "-O turbo", "turbo"), ("ext4", "-T hurd", "hurd"), ("ext4", "-T ../x", "../x"),
    ("ext4", "-J size=0", "size=0"), ("ext4", "-m0 -m1", "-m1"), ("ext4", "-E nodiscard -E discard", "-E"),
    ("ext4", "-b size=4096", "size=4096"), ("ext4", "-d su=64k", "-d"),
    # mkfs.xfs flags and sub-options that read or write host paths or other devices
    ("xfs", "-p proto", "-p"), ("xfs", "-pproto", "-pproto"), ("xfs", "-c options=cfg", "-c"),
    ("xfs", "-d file=1,name=img", "file=1"), ("xfs", "-d name=/dev/sdb", "name=/dev/sdb"),
    ("xfs", "-d su=64k,name=x", "name=x"), ("xfs", "-d size=1g", "size=1g"),
    ("xfs", "-l logdev=/dev/sdb", "logdev=/dev/sdb"), ("xfs", "-l logdev=sdb,size=64m", "logdev=sdb"),
    ("xfs", "-l internal=0", "internal=0"), ("xfs", "-r rtdev=/dev/sdb", "-r"),
    # others: dry run, force, version, ...
    ("xfs", "-N", "-N"), ("xfs", "-f", "-f"), ("xfs", "-V", "-V"), ("xfs", "-s size=4096", "-s"),
    ("xfs", "-q", "-q"), ("xfs", "-m uuid=0", "uuid=0"), ("xfs", "-n version=ci", "version=ci"),
    # bad values
    ("xfs", "-b size=8192", "size=8192"), ("xfs", "-b 4096", "4096"), ("xfs", "-i size=100", "size=100"),
    ("xfs", "-m crc=2", "crc=2"), ("xfs", "-m crc", "crc"), ("xfs", "-L " + "x" * 13, "x" * 13),
    ("xfs", "-l size=64", "size=64"), ("xfs", "-l size=2g", "size=2g"), ("xfs", "-l size=32m", "size=32m"),
    ("xfs", "-d su=64k", "su=64k"), ("xfs", "-d sw=4", "sw=4"), ("xfs", "-d agcount=4,sw=4", "sw=4"), ("xfs", "-l size=0x10m", "size=0x10m"),
    ("xfs", "-d sw=0", "sw=0"), ("xfs", "-d agcount=-1", "agcount=-1"), ("xfs", "-n size=3000", "size=3000"),
    ("xfs", "-Kd", "-Kd"), ("xfs", "-K1", "-K1"), ("xfs", "-m crc=1 -m reflink=1", "-m"),
    ("xfs", "-m crc=1,crc=0", "crc=0"), ("xfs", "-E root_owner=1:1", "-E"), ("xfs", "-m 0", "0"),
]  # fmt: skip


@pytest.mark.parametrize(("fstype", "text", "bad"), BAD_MKFS)
def test_mkfs_options_outside_the_allowlist_are_refused(fstype: str, text: str, bad: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        mkfs_words(fstype, text)
    message = str(err.value)
    assert message.startswith("volume 'vol': mkfs-options ")
    assert repr(bad) in message
    assert f"allowed flags for {fstype}: -b " in message
    other = "xfs" if fstype == "ext4" else "ext4"
    assert other not in message


def test_mkfs_refusal_lists_every_allowed_flag() -> None:
    with pytest.raises(InvalidArgument) as err:
        mkfs_words("ext4", "-d etc")
    listed = str(err.value).split("allowed flags for ext4: ")[1]
    for flag in ("-b", "-E", "-I", "-i", "-J", "-L", "-m", "-N", "-O", "-T"):
        assert f"{flag} " in listed
    assert "root_owner=UID:GID" in listed
    with pytest.raises(InvalidArgument) as err:
        mkfs_words("xfs", "-p proto")
    listed = str(err.value).split("allowed flags for xfs: ")[1]
    for flag in ("-b size=", "-m ", "-i size=", "-L ", "-l size=", "-d ", "-n size=", "-K"):
        assert flag in listed


def test_a_bad_sub_option_value_says_what_is_valid() -> None:
    with pytest.raises(InvalidArgument, match=r"'turbo'.*valid: 64bit, bigalloc"):
        mkfs_words("ext4", "-O turbo")
    with pytest.raises(InvalidArgument, match=r"'51'.*0-50"):
        mkfs_words("ext4", "-m 51")
    with pytest.raises(InvalidArgument, match=r"-E sub-option 'offset=4096' is not allowed"):
        mkfs_words("ext4", "-E offset=4096")


def test_mkfs_options_are_checked_against_the_volumes_filesystem() -> None:
    # -E root_owner= is mke2fs's; the tenant default is ext4, fstype=xfs switches the list.
    assert mkfs_words("ext4", "-E root_owner=1:1") == ("-E", "root_owner=1:1")
    with pytest.raises(InvalidArgument, match=r"'-E' is not an allowed flag for xfs"):
        parse_create("vol", {"fstype": "xfs", "mkfs-options": "-E root_owner=1:1"}, DEFAULTS)
    xfs_defaults = Defaults(
        size=GiB, fstype="xfs", pool="alpha", pools=("alpha",), features=("layering",)
    )
    assert parse_create("vol", {"mkfs-options": "-K"}, xfs_defaults).spec.mkfs_options == ("-K",)


def test_recreate_of_an_existing_volume_with_its_mkfs_options() -> None:
    existing = VolumeSpec(
        size=GiB, fstype="ext4", pool="alpha", features=("layering",),
        mkfs_options=("-m0", "-E", "root_owner=1000:1000"),
    )  # fmt: skip
    same = parse_create("vol", {"mkfs-options": "-m0 -E root_owner=1000:1000"}, DEFAULTS)
    assert incompatibilities(same, existing) == []
    other = parse_create("vol", {"mkfs-options": "-m 1"}, DEFAULTS)
    assert incompatibilities(other, existing) == [
        "mkfs-options=-m 1 (it has -m0 -E root_owner=1000:1000)"
    ]


# -- mount-options never give back suid, dev or exec (issue 9, item 10) ------------------------


@pytest.mark.parametrize(
    "option",
    ["suid", "dev", "exec", "nosuid,suid", "noexec,exec", "dev=1", "defaults", "user", "users",
     "owner", "rw", "ro", "remount", "bind", "errors=panic", "context=x", "X-mount.mkdir"],
)  # fmt: skip
def test_mount_options_cannot_weaken_the_host(option: str) -> None:
    with pytest.raises(InvalidArgument, match=r"mount option '.*' is not allowed; valid: acl"):
        parse_create("vol", {"mount-options": option}, DEFAULTS)


# -- Cinder mode -------------------------------------------------------------------------

CINDER = Defaults(size=GiB, fstype="ext4", pool="", pools=(), features=(),
                  options=CINDER_OPTIONS, volume_type="fast")  # fmt: skip


def test_a_cinder_create_takes_volume_type_and_zone_and_no_rbd_options() -> None:
    request = parse_create(
        "web", {"size": "3G", "volume-type": "gold", "availability_zone": "az-2"}, CINDER
    )
    spec = request.spec
    assert (spec.size, spec.volume_type, spec.availability_zone) == (3 * GiB, "gold", "az-2")
    assert (spec.pool, spec.features) == ("", ())
    assert parse_create("web", None, CINDER).spec.volume_type == "fast"  # the tenant's default
    for rbd_only in ("pool", "features", "source"):
        with pytest.raises(InvalidArgument, match=f"unknown option '{rbd_only}'.*volume-type"):
            parse_create("web", {rbd_only: "x"}, CINDER)
    with pytest.raises(InvalidArgument, match="unknown option 'volume-type'"):
        parse_create("web", {"volume-type": "gold"}, DEFAULTS)  # RBD knows no volume types


@pytest.mark.parametrize("bad", ["gold;rm -rf", "-x", "a" * 256, "type\nx"])
def test_bad_cinder_labels_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument, match=r"volume-type .* is invalid"):
        parse_create("web", {"volume-type": bad}, CINDER)


def test_qos_options_become_librbd_image_settings() -> None:
    request = parse_create("q", {"iops-limit": "500", "write_bps_limit": "50M",
                                 "read-bps-limit": "1.5G"}, DEFAULTS)  # fmt: skip
    assert request.spec.qos == (
        ("iops-limit", 500),
        ("read-bps-limit", 1536 * MiB),
        ("write-bps-limit", 50 * MiB),
    )
    assert qos_metadata(request.spec.qos) == {
        "conf_rbd_qos_iops_limit": "500",
        "conf_rbd_qos_read_bps_limit": str(1536 * MiB),
        "conf_rbd_qos_write_bps_limit": str(50 * MiB),
    }
    # Read back from the image's metadata (as `rbd config image set` may have changed it).
    assert qos_from_metadata(
        {"conf_rbd_qos_iops_limit": "700", "conf_rbd_qos_bps_limit": "0", "other": "1"}
    ) == (("iops-limit", 700),)
    assert parse_create("q", {}, DEFAULTS).spec.qos == ()


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"iops-limit": "0"}, "iops-limit '0' is not a whole number of I/O operations per second"),
        ({"read-iops-limit": "1.5"}, "from 1 to 1000000000"),
        ({"write-iops-limit": "99999999999"}, "from 1 to 1000000000"),
        ({"bps-limit": "fast"}, "bps-limit 'fast' is not a size"),
        ({"read-bps-limit": "0M"}, "must be greater than zero"),
        ({"write-bps-limit": "2P"}, "is more than 1P/s"),
        ({"source": "src", "iops-limit": "5"}, "do not apply to a read-only companion"),
    ],
)
def test_bad_qos_values_are_refused_with_the_valid_form(
    opts: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match="volume 'q'") as caught:
        parse_create("q", opts, DEFAULTS)
    assert message in str(caught.value)


def test_qos_is_an_rbd_option_and_checked_on_recreate() -> None:
    with pytest.raises(InvalidArgument, match="unknown option 'iops-limit'"):
        parse_create("q", {"iops-limit": "5"}, CINDER)
    existing = parse_create("q", {"iops-limit": "500"}, DEFAULTS).spec
    same = parse_create("q", {"iops-limit": "500"}, DEFAULTS)
    other = parse_create("q", {"iops-limit": "600", "bps-limit": "10M"}, DEFAULTS)
    assert incompatibilities(same, existing) == []
    assert incompatibilities(other, existing) == [
        "iops-limit=600 (it has 500)",
        "bps-limit=10M (it has none)",
    ]
    assert incompatibilities(parse_create("q", {}, DEFAULTS), existing) == []
