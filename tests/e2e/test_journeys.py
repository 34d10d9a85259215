"""The user journeys, typed as a user types them: the docker CLI against a real
dockerd, our daemon behind it, a real Ceph cluster behind that."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from rbdplugin.devcluster import DevCluster
from tests.conftest import StartDaemon, tenant_toml
from tests.e2e.conftest import IMAGE, Engine, Plugins, Stack
from tests.helpers import Admin, unique, wait_until

RUN = ("run", "--rm", "--network", "none")


def test_1_create_ls_inspect(stack: Stack, admin: Admin) -> None:
    driver, name = stack.drivers["alpha"], unique("j1")
    stack.docker("volume", "create", "-d", driver, "--opt", "size=1G", "--opt", "fstype=xfs", name)
    listed = stack.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.splitlines()
    assert f"{driver} {name}" in listed
    volume = json.loads(stack.docker("volume", "inspect", name).stdout)[0]
    assert volume["Driver"] == driver and volume["Scope"] == "global"
    status = volume["Status"]
    assert (status["pool"], status["size"], status["fstype"]) == ("alpha", "1G", "xfs")
    assert name in admin.images("alpha")


def test_2_write_in_one_container_read_in_the_next(stack: Stack) -> None:
    driver, name = stack.drivers["alpha"], unique("j2")
    stack.docker("volume", "create", "-d", driver, "--opt", "size=1G", name)
    stack.docker(*RUN, "--volume-driver", driver, "-v", f"{name}:/mnt/v1", IMAGE,
                 "sh", "-c", "echo hello > /mnt/v1/f; sync")  # fmt: skip
    read = stack.docker(*RUN, "--volume-driver", driver, "-v", f"{name}:/mnt/v1", IMAGE,
                        "sh", "-c", "cat /mnt/v1/f; df -k /mnt/v1 | tail -1")  # fmt: skip
    lines = read.stdout.splitlines()
    assert lines[0] == "hello"
    size_kib = int(lines[1].split()[1])
    assert 900 * 1024 < size_kib <= 1024 * 1024  # the volume's 1G, less ext4's overhead


def test_3_implicit_create_with_defaults_and_with_an_option(stack: Stack, admin: Admin) -> None:
    driver = stack.drivers["alpha"]
    fresh, fresh2 = unique("j3"), unique("j3b")
    stack.docker(*RUN, "--volume-driver", driver, "-v", f"{fresh}:/data", IMAGE, "touch", "/data/x")
    assert admin.size("alpha", fresh) == 256 << 20  # the tenant's default_size
    stack.docker(*RUN, "--mount",
                 f"type=volume,source={fresh2},target=/data,volume-driver={driver},volume-opt=size=2G",
                 IMAGE, "touch", "/data/x")  # fmt: skip
    assert admin.size("alpha", fresh2) == 2 << 30


def _long_running(stack: Stack, name: str, driver: str, *extra: str) -> str:
    done = stack.docker("run", "-d", "--network", "none", "--volume-driver", driver, "-v",
                        f"{name}:/data", *extra, IMAGE, "sh", "-c",
                        "i=0; while :; do i=$((i+1)); echo $i >> /data/log; sync; sleep 0.1; done")  # fmt: skip
    return done.stdout.strip()


def test_4_two_containers_share_a_volume_on_this_host(stack: Stack) -> None:
    driver, name = stack.drivers["alpha"], unique("j4")
    first = _long_running(stack, name, driver)
    second = stack.docker("run", "-d", "--network", "none", "--volume-driver", driver, "-v",
                          f"{name}:/data", IMAGE, "sleep", "600").stdout.strip()  # fmt: skip
    stack.docker("rm", "-f", second)
    before = int(stack.docker("exec", first, "sh", "-c", "tail -1 /data/log").stdout)
    time.sleep(1)
    after = int(stack.docker("exec", first, "sh", "-c", "tail -1 /data/log").stdout)
    assert after > before  # stopping one did not unmount the other's volume
    stack.docker("rm", "-f", first)


def test_5_docker_cp_in_and_out_keeps_the_mount(stack: Stack, tmp_path: Path) -> None:
    driver, name = stack.drivers["alpha"], unique("j5")
    container = _long_running(stack, name, driver)
    source = tmp_path / "in.txt"
    source.write_text("copied in\n")
    stack.docker("cp", str(source), f"{container}:/data/in.txt")
    stack.docker("cp", f"{container}:/data/in.txt", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "copied in\n"
    before = int(stack.docker("exec", container, "sh", "-c", "tail -1 /data/log").stdout)
    time.sleep(1)
    after = int(stack.docker("exec", container, "sh", "-c", "tail -1 /data/log").stdout)
    assert after > before  # docker cp's Unmount left the container's mount alive
    assert stack.docker("exec", container, "cat", "/data/in.txt").stdout == "copied in\n"
    stack.docker("rm", "-f", container)


def test_6_remove_in_use_fails_then_follows_the_policy(stack: Stack, admin: Admin) -> None:
    driver, name = stack.drivers["alpha"], unique("j6")
    container = _long_running(stack, name, driver)
    refused = stack.docker("volume", "rm", name, check=False)
    assert refused.returncode != 0
    assert "volume is in use" in refused.stderr or "is mounted on host host-a" in refused.stderr
    stack.docker("rm", "-f", container)
    stack.docker("volume", "rm", name)
    assert name not in admin.images("alpha")
    assert name in admin.trash("alpha")  # alpha's remove_policy is trash


def test_7_anonymous_volume_goes_with_run_rm(stack: Stack, admin: Admin) -> None:
    driver = stack.drivers["alpha"]
    before = admin.images("alpha")
    stack.docker(*RUN, "--volume-driver", driver, "-v", "/anon", IMAGE, "touch", "/anon/x")
    after = admin.images("alpha")
    assert after == before  # created, mounted, and removed again at exit
    trashed = admin.trash("alpha")
    assert any(len(name) == 64 for name in trashed)  # Docker names anonymous volumes by 64 hex


def test_8_restart_our_daemon_while_a_container_writes(stack: Stack) -> None:
    driver, name = stack.drivers["alpha"], unique("j8")
    container = _long_running(stack, name, driver)
    time.sleep(0.5)
    stack.daemon.stop()
    time.sleep(1)  # the daemon is down; the container still writes
    stack.daemon.start(wait_for="alpha")
    before = int(stack.docker("exec", container, "sh", "-c", "tail -1 /data/log").stdout)
    time.sleep(1)
    last = int(stack.docker("exec", container, "sh", "-c", "tail -1 /data/log").stdout)
    assert last > before
    stack.docker("stop", "-t", "1", container)
    lines = stack.docker(*RUN, "--volume-driver", driver, "-v", f"{name}:/data", IMAGE,
                         "cat", "/data/log").stdout.split()  # fmt: skip
    assert [int(x) for x in lines] == list(range(1, len(lines) + 1))  # no gap, nothing lost
    assert int(lines[-1]) >= last
    stack.docker("rm", container)


def test_9_restart_dockerd_keeps_volumes(stack: Stack) -> None:
    driver, name = stack.drivers["alpha"], unique("j9")
    stack.docker("volume", "create", "-d", driver, "--opt", "size=1G", name)
    stack.docker(*RUN, "-v", f"{name}:/data", IMAGE, "sh", "-c", "echo kept > /data/f")
    stack.engine.stop()
    stack.engine.start()
    listed = stack.docker("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert name in listed
    assert stack.docker(*RUN, "-v", f"{name}:/data", IMAGE, "cat", "/data/f").stdout == "kept\n"


def test_10_bad_options_show_our_message(stack: Stack, admin: Admin) -> None:
    driver = stack.drivers["alpha"]
    before = admin.images("alpha")
    bad_size = stack.docker(
        "volume", "create", "-d", driver, "--opt", "size=abc", unique(), check=False
    )
    assert bad_size.returncode != 0
    assert "size 'abc' is not a size: use a number with a binary unit" in bad_size.stderr
    colour = stack.docker(
        "volume", "create", "-d", driver, "--opt", "colour=red", unique(), check=False
    )
    assert "unknown option 'colour'; valid options: size" in colour.stderr
    assert admin.images("alpha") == before


def test_11_tenants_cannot_see_or_reach_each_other(stack: Stack, admin: Admin) -> None:
    alpha, beta = stack.drivers["alpha"], stack.drivers["beta"]
    name = unique("j11")
    stack.docker("volume", "create", "-d", alpha, "--opt", "size=1G", name)
    stack.docker(*RUN, "-v", f"{name}:/data", IMAGE, "sh", "-c", "echo secret > /data/s")
    beta_ls = stack.docker(
        "volume", "ls", "--filter", f"driver={beta}", "--format", "{{.Name}}"
    ).stdout
    assert name not in beta_ls.split()
    wrong = stack.docker(*RUN, "--volume-driver", beta, "-v", f"{name}:/data", IMAGE,
                         "cat", "/data/s", check=False)  # fmt: skip
    assert "secret" not in wrong.stdout
    assert name not in admin.images("beta")


def test_12_two_hosts_one_writer(
    stack: Stack, cluster: DevCluster, daemon_factory: StartDaemon,
    docker_engines: Callable[[str], Engine], plugins: Plugins,
) -> None:  # fmt: skip
    host_b = daemon_factory(tenant_toml(cluster, "alpha", default_size="256M"),
                            wait_for="alpha", host_id="host-b")  # fmt: skip
    driver_b = plugins.register("hostb", host_b.socket_dir / "alpha.sock")
    engine_b = docker_engines("b")
    driver_a, name = stack.drivers["alpha"], unique("j12")
    stack.docker("volume", "create", "-d", driver_a, "--opt", "size=1G", name)
    engine_b.run("volume", "create", "-d", driver_b, name)  # the same volume, seen from host B
    container = _long_running(stack, name, driver_a)
    refused = engine_b.run(*RUN, "-v", f"{name}:/data", IMAGE, "true", check=False)
    assert refused.returncode != 0
    assert "is mounted read-write on host host-a" in refused.stderr
    stack.docker("rm", "-f", container)

    def b_can_mount() -> bool:
        run = engine_b.run(
            *RUN, "-v", f"{name}:/data", IMAGE, "test", "-s", "/data/log", check=False
        )
        return run.returncode == 0

    wait_until(b_can_mount, 30, "host B mounting after host A's container left")


def test_journeys_leave_no_container_mounts(stack: Stack) -> None:
    # Every container above is gone; nothing of ours may stay mounted for them.
    left = subprocess.run(
        ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True, check=True
    ).stdout
    ours = [
        line
        for line in left.splitlines()
        if line.startswith(str(stack.daemon.config.parent / "mounts"))
    ]
    assert ours == []
