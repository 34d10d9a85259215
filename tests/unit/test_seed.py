"""The rbd-docker-plugin drop-in: its flags (Go syntax too) as a one-tenant config."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rbdplugin import cli, seed
from rbdplugin.errors import ConfigError
from rbdplugin.units import MiB


def parse(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(seed.normalize_argv(["serve", *argv]))


@pytest.fixture
def ceph_conf(tmp_path: Path) -> Path:
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nfsid = 1234-5678\nmon host = 10.0.0.1\n")
    return conf


def test_go_style_flags_parse_like_double_dash() -> None:
    argv = ["-create", "-user", "docker", "-pool=docker", "--size", "512", "-remove=delete",
            "--debug=false", "-name", "rbd2"]  # fmt: skip
    assert seed.normalize_argv(argv) == [
        "--create=true", "--user", "docker", "--pool=docker", "--size", "512",
        "--remove=delete", "--debug=false", "--name", "rbd2",
    ]  # fmt: skip
    args = parse(*argv)
    assert (args.create, args.user, args.pool, args.size, args.remove, args.debug) == (
        True, "docker", "docker", 512, "delete", False
    )  # fmt: skip
    assert seed.seed_flags_given(args)


def test_other_arguments_are_left_alone() -> None:
    assert seed.normalize_argv(["-h", "--config", "x", "-x"]) == ["-h", "--config", "x", "-x"]
    assert not seed.seed_flags_given(parse("--config", "/etc/rbdplugin/rbdplugin.toml"))


def test_the_operators_command_line(ceph_conf: Path, tmp_path: Path) -> None:
    keyring = tmp_path / "ceph.client.docker.keyring"
    keyring.write_text("[client.docker]\n\tkey = x\n")
    with ceph_conf.open("a") as fh:
        fh.write(f"[client]\nkeyring = {tmp_path}/$cluster.$name.keyring\n")
    flags = seed.flags_from(
        parse("--create", "--user=docker", "--pool=docker", f"--config={ceph_conf}")
    )
    translation = seed.translate(flags)
    config = seed.load(translation, environ={})
    tenant = config.tenant("rbd")
    assert (tenant.driver, tenant.pool, tenant.user, tenant.keyring) == (
        "rbd",
        "docker",
        "docker",
        keyring,
    )
    assert tenant.namespace == ""
    assert tenant.auto_create is True
    assert tenant.default_size == 20480 * MiB
    assert tenant.default_fstype == "xfs"  # the seed's default
    assert tenant.remove_policy == "keep"  # --remove=ignore keeps the image
    assert config.ceph.conf == ceph_conf
    assert config.daemon.socket_dir == Path("/run/docker/plugins")
    assert config.daemon.mount_root == Path("/var/lib/docker-volumes")
    assert "rbd-docker-plugin --user=docker" in translation.toml
    assert "--create" in translation.toml.splitlines()[0]
    # No admin warning, but the differences are said.
    notes = "\n".join(translation.notes)
    assert "admin" not in notes
    assert "nosuid,nodev" in notes


def test_seed_defaults_and_what_the_log_says(ceph_conf: Path) -> None:
    translation = seed.translate(seed.flags_from(parse(f"--config={ceph_conf}", "--name=rbd")))
    config = seed.load(translation, environ={})
    tenant = config.tenant("rbd")
    assert tenant.user == "admin"
    assert tenant.pool == "rbd"
    assert tenant.auto_create is False
    assert tenant.keyring == Path("/etc/ceph/ceph.client.admin.keyring")
    notes = "\n".join(translation.notes)
    assert "user admin" in notes and "profile rbd pool=rbd" in notes
    assert "without --create: auto_create = false" in notes


@pytest.mark.parametrize(
    ("action", "policy"), [("ignore", "keep"), ("delete", "delete"), ("rename", "keep")]
)
def test_remove_actions(ceph_conf: Path, action: str, policy: str) -> None:
    flags = seed.flags_from(parse(f"--config={ceph_conf}", f"--remove={action}"))
    assert seed.load(seed.translate(flags), environ={}).tenant("rbd").remove_policy == policy


def test_every_flag_lands_in_the_config(ceph_conf: Path, tmp_path: Path) -> None:
    args = parse(f"-config={ceph_conf}", "-name=vols", "-user=u1", "-cluster=prod", "-pool=p1",
                 f"-plugins={tmp_path}/plugins", f"-mount={tmp_path}/mnt", "-create", "-size=100",
                 "-fs=ext4", "-remove=delete", "-debug", "-logdir=/var/log/x")  # fmt: skip
    translation = seed.translate(seed.flags_from(args))
    config = seed.load(translation, environ={})
    tenant = config.tenant("vols")
    assert (tenant.driver, tenant.user, tenant.pool) == ("vols", "u1", "p1")
    assert tenant.keyring == Path("/etc/ceph/prod.client.u1.keyring")  # $cluster.$name
    assert (tenant.default_size, tenant.default_fstype, tenant.remove_policy) == (
        100 * MiB,
        "ext4",
        "delete",
    )
    assert config.daemon.socket_dir == tmp_path / "plugins"
    assert config.daemon.mount_root == tmp_path / "mnt"
    assert config.daemon.log_level == "debug"
    assert any("--logdir" in note for note in translation.notes)


def test_environment_overrides_apply(ceph_conf: Path) -> None:
    translation = seed.translate(seed.flags_from(parse(f"--config={ceph_conf}")))
    config = seed.load(translation, environ={"RBDPLUGIN_DAEMON_STATE_DIR": "/srv/state",
                                             "RBDPLUGIN_DAEMON_METRICS": ""})  # fmt: skip
    assert config.daemon.state_dir == Path("/srv/state")
    assert config.daemon.metrics == ""


def test_relative_paths_become_absolute(ceph_conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ceph_conf.parent)
    flags = seed.flags_from(parse("--config=ceph.conf", "--plugins=plugins"))
    assert flags.config == ceph_conf
    assert flags.plugins == ceph_conf.parent / "plugins"


def test_keyring_from_ceph_conf_sections(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(
        "[global]\n  keyring = /g.keyring\n[client]\nkeyring = /c.keyring  # all clients\n"
        "[client.docker]\n\tkeyring = /etc/ceph/$cluster.$id.keyring\n"
    )
    assert seed.find_keyring(conf, "ceph", "docker") == Path("/etc/ceph/ceph.docker.keyring")
    assert seed.find_keyring(conf, "ceph", "other") == Path("/c.keyring")
    conf.write_text("[global]\nkeyring = /a.keyring,/b.keyring\n")
    assert seed.find_keyring(conf, "ceph", "x") == Path("/a.keyring")


def test_keyring_search_takes_the_first_that_exists(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    second, third = tmp_path / "prod.keyring", tmp_path / "ceph.client.u.keyring"
    conf.write_text(f"[global]\nkeyring = {third},{second}\n")
    second.write_text("")
    assert seed.find_keyring(conf, "prod", "u") == second


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fs=btrfs"], "--fs 'btrfs': rbdplugin formats ext4 or xfs"),
        (["--size=0"], "--size 0: must be a positive number of MB"),
        (["--name=Bad Name"], "--name 'Bad Name': a driver name is lower-case"),
    ],
)
def test_bad_flags_are_refused(ceph_conf: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        seed.load(seed.translate(seed.flags_from(parse(f"--config={ceph_conf}", *argv))), {})


def test_a_dotted_driver_name_is_a_quoted_table(ceph_conf: Path) -> None:
    translation = seed.translate(seed.flags_from(parse(f"--config={ceph_conf}", "--name=rbd.v2")))
    assert '[tenants."rbd.v2"]' in translation.toml
    assert seed.load(translation, {}).tenants[0].driver == "rbd.v2"


def test_missing_ceph_conf_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such ceph\.conf"):
        seed.translate(seed.flags_from(parse(f"--config={tmp_path}/nope.conf", "--create")))


def test_bad_remove_action_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--remove=shred")
    assert "invalid choice: 'shred'" in capsys.readouterr().err


def test_config_clash_rule(tmp_path: Path, ceph_conf: Path) -> None:
    ours = tmp_path / "rbdplugin.toml"
    ours.write_text("[tenants.rbd]\n")
    toml_without_tenants = tmp_path / "odd.conf"
    toml_without_tenants.write_text("[global]\n")  # valid TOML and a valid ceph.conf
    assert not seed.config_is_ceph_conf(ours)
    assert seed.config_is_ceph_conf(ceph_conf)
    assert seed.config_is_ceph_conf(toml_without_tenants)
    assert not seed.config_is_ceph_conf(tmp_path / "missing")  # our loader names the problem


def test_serve_picks_the_mode(tmp_path: Path, ceph_conf: Path) -> None:
    ours = tmp_path / "rbdplugin.toml"
    ours.write_text("[tenants.mine]\n")
    assert cli._serve_config(parse(f"--config={ours}")).tenants[0].name == "mine"
    # A ceph.conf alone, or any seed flag, is seed mode.
    assert cli._serve_config(parse(f"--config={ceph_conf}")).tenants[0].name == "rbd"
    assert cli._serve_config(parse(f"--config={ceph_conf}", "--name=x")).tenants[0].name == "x"
    # A seed flag makes --config the ceph.conf even when it is our TOML (it has no keyring).
    assert cli._serve_config(parse(f"--config={ours}", "--pool=p")).ceph.conf == ours
