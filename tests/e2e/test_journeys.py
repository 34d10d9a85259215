"""The user journeys, typed as a user types them: the docker CLI against a real
dockerd, our daemon behind it, a real Ceph cluster behind that.

Docker answers some requests itself (a volume in use by one of its own containers,
a name taken by another driver). Every journey therefore checks that our plugin was
really asked: an Err only the plugin produces, its request log since the action,
its state (Get), or what it left in Ceph and on the host."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests import oracle
from tests.e2e.conftest import IMAGE, Stack
from tests.helpers import TEST_MAPPER, Admin, unique, wait_until

RUN = ("run", "--rm", "--network", "none")
# sync -f flushes only the volume's filesystem: a plain sync(2) would wait on every
# filesystem of the machine, including other test runs' volumes on a stopped cluster.
WRITER = "i=0; while :; do i=$((i+1)); echo $i >> /data/log; sync -f /data/log; sleep 0.1; done"


def _long_running(stack: Stack, name: str, driver: str) -> str:
    done = stack.docker("run", "-d", "--network", "none", "--volume-driver", driver, "-v",
                        f"{name}:/data", IMAGE, "sh", "-c", WRITER)  # fmt: skip
    container = done.stdout.strip()
    wait_until(lambda: _last_written(stack, container) >= 2, 30, "the container writing")
    return container


def _last_written(stack: Stack, container: str) -> int:
    tail = stack.docker("exec", container, "sh", "-c", "tail -1 /data/log", check=False).stdout
    return int(tail) if tail.strip().isdigit() else 0


def _still_writes(stack: Stack, container: str) -> bool:
    before = _last_written(stack, container)
    time.sleep(1)
    return _last_written(stack, container) > before


def _mount_ids(stack: Stack, tenant: str, name: str) -> dict[str, int]:
    """The Docker mount IDs our daemon counts for ``name`` (its own state, via Get)."""
    got = stack.plugin(tenant).get(name)
    assert got["Err"] == "", got
    mounts: dict[str, int] = got["Volume"]["Status"].get("mounts", {})
    return mounts


def _ok(lines: list[str]) -> bool:
    return any(" outcome=ok " in f"{line} " for line in lines)


def test_1_create_ls_inspect(stack: Stack, admin: Admin) -> None:
    driver, name = stack.drivers["alpha"], unique("j1")
    mark = stack.log_mark()
    stack.docker("volume", "create", "-d", driver, "--opt", "size=1G", "--opt", "fstype=xfs", name)
    assert _ok(stack.requests_since(mark, "alpha", "Create", name))
    assert admin.size("alpha", name) == 1 << 30
    assert admin.metadata("alpha", name)["rbdplugin.fstype"] == "xfs"
    listed = stack.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.splitlines()
    assert f"{driver} {name}" in listed
    volume = json.loads(stack.docker("volume", "inspect", name).stdout)[0]
    # Scope and Status come only from the plugin (Capabilities and Get); Docker's default is local.
    assert volume["Driver"] == driver and volume["Scope"] == "global"
    status = volume["Status"]
    assert (status["pool"], status["size"], status["fstype"]) == ("alpha", "1G", "xfs")


def test_2_write_in_one_container_read_in_the_next(stack: Stack) -> None:
    driver, name = stack.drivers["alpha"], unique("j2")
    stack.docker("volume", "create", "-d", driver, "--opt", "size=1G", name)
    stack.docker(*RUN, "--volume-driver", driver, "-v", f"{name}:/mnt/v1", IMAGE,
                 "sh", "-c", "echo hello > /mnt/v1/f; sync -f /mnt/v1/f")  # fmt: skip
    # Between the containers the volume is unmounted and unmapped: the data is in the image.
    assert not oracle.is_mounted(stack.mountpoint("alpha", name))
    read = stack.docker(*RUN, "--volume-driver", driver, "-v", f"{name}:/mnt/v1", IMAGE,
                        "sh", "-c", "cat /mnt/v1/f; df -k /mnt/v1 | tail -1; "
                        "grep ' /mnt/v1 ' /proc/mounts")  # fmt: skip
    lines = read.stdout.splitlines()
    assert lines[0] == "hello"
    size_kib = int(lines[1].split()[1])
    assert 900 * 1024 < size_kib <= 1024 * 1024  # the volume's 1G, less ext4's overhead
    print(f"inside the container ({TEST_MAPPER} mapper): {lines[2]}")
    device = lines[2].split()[0]  # what the container's mount table says backs /mnt/v1
    assert device.startswith(
        {"fuse": "/dev/loop", "krbd": "/dev/rbd", "nbd": "/dev/nbd"}[TEST_MAPPER]
    )


def test_3_implicit_create_with_defaults_and_with_an_option(stack: Stack, admin: Admin) -> None:
    driver = stack.drivers["alpha"]
    fresh, fresh2 = unique("j3"), unique("j3b")
    stack.docker(*RUN, "--volume-driver", driver, "-v", f"{fresh}:/data", IMAGE, "touch", "/data/x")
    assert admin.size("alpha", fresh) == 256 << 20  # the tenant's default_size
    stack.docker(*RUN, "--mount",
                 f"type=volume,source={fresh2},target=/data,volume-driver={driver},volume-opt=size=2G",
                 IMAGE, "touch", "/data/x")  # fmt: skip
    assert admin.size("alpha", fresh2) == 2 << 30


def test_4_two_containers_share_a_volume_on_this_host(stack: Stack) -> None:
    driver, name = stack.drivers["alpha"], unique("j4")
    mountpoint = stack.mountpoint("alpha", name)
    first = _long_running(stack, name, driver)
    second = stack.docker("run", "-d", "--network", "none", "--volume-driver", driver, "-v",
                          f"{name}:/data", IMAGE, "sleep", "600").stdout.strip()  # fmt: skip
    assert sorted(_mount_ids(stack, "alpha", name).values()) == [1, 1]  # one ID per container
    stack.docker("rm", "-f", second)
    wait_until(lambda: len(_mount_ids(stack, "alpha", name)) == 1, 20, "the second's Unmount")
    assert oracle.is_mounted(mountpoint)
    assert _still_writes(stack, first)  # stopping one did not unmount the other's volume
    stack.docker("rm", "-f", first)
    wait_until(lambda: not oracle.is_mounted(mountpoint), 20, "the last Unmount unmounting")


def test_5_docker_cp_in_and_out_keeps_the_mount(stack: Stack, tmp_path: Path) -> None:
    driver, name = stack.drivers["alpha"], unique("j5")
    container = _long_running(stack, name, driver)
    ids = _mount_ids(stack, "alpha", name)
    source = tmp_path / "in.txt"
    source.write_text("copied in\n")
    mark = stack.log_mark()
    stack.docker("cp", str(source), f"{container}:/data/in.txt")
    stack.docker("cp", f"{container}:/data/in.txt", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "copied in\n"
    # docker cp mounted and unmounted the volume through the plugin, under the container's ID.
    assert _ok(stack.requests_since(mark, "alpha", "Unmount", name))
    assert _mount_ids(stack, "alpha", name) == ids
    assert (stack.mountpoint("alpha", name) / "in.txt").read_text() == "copied in\n"
    assert _still_writes(stack, container)  # docker cp's Unmount left the container's mount alive
    assert stack.docker("exec", container, "cat", "/data/in.txt").stdout == "copied in\n"
    stack.docker("rm", "-f", container)


def test_6_remove_in_use_fails_then_follows_the_policy(
    stack: Stack, stack_b: Stack, admin: Admin
) -> None:
    driver, name = stack.drivers["alpha"], unique("j6")
    container = _long_running(stack, name, driver)
    # This engine refuses by itself: one of its own containers uses the volume.
    refused = stack.docker("volume", "rm", name, check=False)
    assert refused.returncode != 0 and "volume is in use" in refused.stderr
    # Host B's engine knows nothing of that container: the plugin there must refuse.
    stack_b.docker("volume", "create", "-d", stack_b.drivers["alpha"], name)
    mark = stack_b.log_mark()
    refused = stack_b.docker("volume", "rm", name, check=False)
    assert refused.returncode != 0
    assert f"volume '{name}' is mounted (rw on host host-a since" in refused.stderr
    assert stack_b.requests_since(mark, "alpha", "Remove", name)
    assert name in admin.images("alpha")
    stack.docker("rm", "-f", container)
    stack.docker("volume", "rm", name)
    assert name not in admin.images("alpha")
    assert name in admin.trash("alpha")  # alpha's remove_policy is trash
    stack_b.docker("volume", "rm", name, check=False)  # host B's Docker may know it still


def test_7_anonymous_volume_goes_with_run_rm(stack: Stack, admin: Admin) -> None:
    driver = stack.drivers["alpha"]
    container = stack.docker("create", "--rm", "--network", "none", "--volume-driver", driver,
                             "-v", "/anon", IMAGE, "touch", "/anon/x").stdout.strip()  # fmt: skip
    (mount,) = json.loads(stack.docker("inspect", container).stdout)[0]["Mounts"]
    anonymous = mount["Name"]
    assert mount["Driver"] == driver and len(anonymous) == 64  # Docker's 64 hex digits
    assert anonymous in admin.images("alpha")  # Docker had our plugin create it
    stack.docker("start", "-a", container)
    wait_until(lambda: anonymous not in admin.images("alpha"), 30, "the anonymous volume removed")
    assert anonymous in admin.trash("alpha")  # this very volume, by alpha's trash policy


def test_8_restart_our_daemon_while_a_container_writes(stack: Stack) -> None:
    driver, name = stack.drivers["alpha"], unique("j8")
    mountpoint = stack.mountpoint("alpha", name)
    container = _long_running(stack, name, driver)
    ids = _mount_ids(stack, "alpha", name)
    assert len(ids) == 1
    assert stack.daemon.stop() == 0
    assert oracle.is_mounted(mountpoint)
    assert _still_writes(stack, container)  # the daemon is down; the container still writes
    stack.daemon.start(wait_for="alpha")
    assert _mount_ids(stack, "alpha", name) == ids  # the restarted daemon adopted the mount
    assert _still_writes(stack, container)
    last = _last_written(stack, container)
    stack.docker("stop", "-t", "1", container)
    wait_until(lambda: not oracle.is_mounted(mountpoint), 20, "Docker's Unmount after the restart")
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
    listed = stack.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.splitlines()
    assert f"{driver} {name}" in listed
    assert stack.docker(*RUN, "-v", f"{name}:/data", IMAGE, "cat", "/data/f").stdout == "kept\n"


def test_10_bad_options_show_our_message(stack: Stack, admin: Admin) -> None:
    driver = stack.drivers["alpha"]
    bad_size, colour = unique("j10"), unique("j10b")
    done = stack.docker(
        "volume", "create", "-d", driver, "--opt", "size=abc", bad_size, check=False
    )
    assert done.returncode != 0
    assert "size 'abc' is not a size: use a number with a binary unit" in done.stderr
    done = stack.docker(
        "volume", "create", "-d", driver, "--opt", "colour=red", colour, check=False
    )
    assert done.returncode != 0
    assert "unknown option 'colour'; valid options: size" in done.stderr
    assert {bad_size, colour}.isdisjoint(admin.images("alpha"))


def test_11_tenants_cannot_see_or_reach_each_other(
    stack: Stack, stack_b: Stack, admin: Admin
) -> None:
    alpha, beta = stack.drivers["alpha"], stack.drivers["beta"]
    name = unique("j11")
    stack.docker("volume", "create", "-d", alpha, "--opt", "size=1G", name)
    stack.docker(*RUN, "-v", f"{name}:/data", IMAGE, "sh", "-c",
                 "echo secret > /data/s; sync -f /data/s")  # fmt: skip
    mark = stack.log_mark()
    beta_ls = stack.docker(
        "volume", "ls", "--filter", f"driver={beta}", "--format", "{{.Name}}"
    ).stdout
    assert name not in beta_ls.split()
    assert any("driver=beta endpoint=VolumeDriver.List " in line
               for line in stack.log_since(mark).splitlines())  # fmt: skip
    # On this engine the name is alpha's, so Docker alone refuses beta. Host B's engine
    # does not know the name: there beta's plugin is asked, and must not reach alpha's data.
    mark = stack_b.log_mark()
    wrong = stack_b.docker(*RUN, "--volume-driver", stack_b.drivers["beta"], "-v", f"{name}:/data",
                           IMAGE, "sh", "-c", "ls -A /data; cat /data/s", check=False)  # fmt: skip
    assert _ok(stack_b.requests_since(mark, "beta", "Mount", name)), wrong.stderr
    assert "secret" not in wrong.stdout and wrong.returncode != 0  # beta's own volume, empty
    assert admin.size("beta", name) == 256 << 20  # beta's default size: another image
    assert admin.size("alpha", name) == 1 << 30
    assert stack.docker(*RUN, "-v", f"{name}:/data", IMAGE, "cat", "/data/s").stdout == "secret\n"
    stack_b.docker("volume", "rm", name)
    assert name in admin.images("alpha")


def test_12_two_hosts_one_writer(stack: Stack, stack_b: Stack) -> None:
    driver_a, driver_b, name = stack.drivers["alpha"], stack_b.drivers["alpha"], unique("j12")
    stack.docker("volume", "create", "-d", driver_a, "--opt", "size=1G", name)
    stack_b.docker("volume", "create", "-d", driver_b, name)  # the same volume, seen from host B
    container = _long_running(stack, name, driver_a)
    refused = stack_b.docker(*RUN, "-v", f"{name}:/data", IMAGE, "true", check=False)
    assert refused.returncode != 0
    assert "is mounted read-write on host host-a" in refused.stderr
    stack.docker("rm", "-f", container)

    def b_can_mount() -> bool:
        run = stack_b.docker(
            *RUN, "-v", f"{name}:/data", IMAGE, "test", "-s", "/data/log", check=False
        )
        return run.returncode == 0

    wait_until(b_can_mount, 30, "host B mounting after host A's container left")


def test_13_owner_grow_and_clone_as_a_container_sees_them(stack: Stack) -> None:
    """Issue 15 through Docker: a volume owned by a non-root container user, grown under a
    running container (its df shows it), and cloned into a new volume with the data."""
    driver = stack.drivers["alpha"]
    owned, copy, grown = unique("j13own"), unique("j13copy"), unique("j13grow")
    stack.docker("volume", "create", "-d", driver, "--opt", "size=256M", "--opt", "uid=1000",
                 "--opt", "gid=1000", "--opt", "mode=0750", owned)  # fmt: skip
    mine = stack.docker(*RUN, "--user", "1000:1000", "-v", f"{owned}:/data", IMAGE, "sh", "-c",
                        "echo mine > /data/f && sync -f /data/f && ls -lnd /data")  # fmt: skip
    assert mine.stdout.split()[:4] == ["drwxr-x---", mine.stdout.split()[1], "1000", "1000"]
    other = stack.docker(*RUN, "--user", "2000:2000", "-v", f"{owned}:/data", IMAGE, "sh", "-c",
                         "echo theirs > /data/g", check=False)  # fmt: skip
    assert other.returncode != 0 and "Permission denied" in other.stderr, other

    stack.docker("volume", "create", "-d", driver, "--opt", f"clone-of={owned}", copy)
    read = stack.docker(*RUN, "--user", "1000:1000", "-v", f"{copy}:/data", IMAGE,
                        "cat", "/data/f")  # fmt: skip
    assert read.stdout.strip() == "mine"

    stack.docker("volume", "create", "-d", driver, "--opt", "size=300M", "--opt", "fstype=xfs",
                 grown)  # fmt: skip
    container = _long_running(stack, grown, driver)
    before = int(stack.docker("exec", container, "df", "-k", "/data").stdout.split()[-5])
    resized = subprocess.run(
        [sys.executable, "-m", "rbdplugin", "volume", "resize", grown, "600M", "--config",
         str(stack.daemon.config), "--driver", "alpha"],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert resized.returncode == 0, resized.stderr
    after = int(stack.docker("exec", container, "df", "-k", "/data").stdout.split()[-5])
    assert after > before + 250 * 1024, (before, after)  # the running container sees it
    assert _still_writes(stack, container)
    stack.docker("rm", "-f", container)
    for name in (copy, owned, grown):
        stack.docker("volume", "rm", name)


def test_journeys_leave_no_container_mounts(stack: Stack, stack_b: Stack) -> None:
    # Every container above is gone; nothing of our daemons may stay mounted or mapped.
    roots = [f"{s.daemon.config.parent}/" for s in (stack, stack_b)]
    mounted = [e["target"] for e in oracle.mountinfo() if e["target"].startswith(tuple(roots))]
    loops = [dev for dev, back in oracle.loop_devices().items() if back.startswith(tuple(roots))]
    exports = [pid for root in roots
               for pid in oracle.pids_of_program_with("qemu-storage-daemon", root)]  # fmt: skip
    assert (mounted, loops, exports) == ([], [], [])
