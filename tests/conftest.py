"""Fixtures: one real Ceph cluster per test session, daemons as real processes.

Tests marked ``ceph`` talk to the cluster; it starts on first use (about 2 s) and
stops at the end of the session. Every test uses volume names of its own, so
tests share the cluster and the daemon without seeing each other.

Tests never skip silently. A test whose tools are missing fails, naming the Debian
packages to install, unless the run opts out of its group with the group's variable
(``RBDPLUGIN_SKIP_E2E=1``, ``RBDPLUGIN_SKIP_PROMETHEUS=1``, ``RBDPLUGIN_SKIP_KERNEL=1``);
the terminal summary then says what was not run.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests import oracle, secretscan
from tests.helpers import (
    LOG_TAIL_LINES,
    TEST_MAPPER,
    Admin,
    DaemonProcess,
    log_tails,
    take_down_under,
    write_config,
)
from tests.kernel import tier

# alpha: trash policy (default); beta: delete; gamma: keep; delta: quotas.
TENANTS = ("alpha", "beta", "gamma", "delta")
# Shortened from Ceph's 30 s so that dead clients' watches (and takeovers) end quickly.
WATCH_TIMEOUT = 10


@dataclass(frozen=True)
class ToolGroup:
    """The tests carrying ``marker`` need ``tools`` (program or absolute path -> Debian package)."""

    marker: str
    what: str
    tools: dict[str, str]
    opt_out: str = ""  # the environment variable that skips the group; "" = none

    @property
    def opted_out(self) -> bool:
        return bool(self.opt_out) and os.environ.get(self.opt_out, "") not in ("", "0")

    @functools.cached_property
    def missing(self) -> dict[str, str]:
        def found(tool: str) -> bool:
            return Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None

        return {tool: package for tool, package in self.tools.items() if not found(tool)}


# What the test daemons' mapper needs (the kernel tier runs the suites with krbd and nbd).
MAPPER_TOOLS = {
    "fuse": {"qemu-storage-daemon": "qemu-system-common", "fusermount3": "fuse3"},
    "krbd": {"rbd": "ceph-common"},
    "nbd": {"rbd": "ceph-common", "rbd-nbd": "rbd-nbd"},
}
TOOL_GROUPS = (
    ToolGroup("ceph", "the tests against a real Ceph cluster (-m 'not ceph' runs the others)", {
        "ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd",
        "losetup": "mount", "blkid": "util-linux", "mkfs.ext4": "e2fsprogs",
        "mkfs.xfs": "xfsprogs",
        **MAPPER_TOOLS[TEST_MAPPER],
    }),
    ToolGroup("e2e", "the docker journeys (tests/e2e)", {
        "dockerd": "docker.io", "/usr/bin/docker": "docker.io", "containerd": "containerd",
        "/bin/busybox": "busybox-static",
    }, opt_out="RBDPLUGIN_SKIP_E2E"),
    ToolGroup("prometheus", "the tests with a real Prometheus server and promtool", {
        "prometheus": "prometheus", "promtool": "prometheus",
    }, opt_out="RBDPLUGIN_SKIP_PROMETHEUS"),
    ToolGroup("kernel", "the kernel tier: krbd, rbd-nbd and udev in a QEMU guest (tests/kernel)", {
        "qemu-system-x86_64": "qemu-system-x86", "debootstrap": "debootstrap",
        "qemu-img": "qemu-utils", "depmod": "kmod",
    }, opt_out="RBDPLUGIN_SKIP_KERNEL"),
)  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "prometheus: needs a real Prometheus server or promtool")
    RECORDER.install()


# The secrets scan (tests/secretscan.py): what the daemons wrote under short_tmp (scanned
# before it is deleted) and what the tests received (the recorder), against the dev
# clusters' cephx keys and the devclouds' secrets. A finding fails the session.
SECRETS = secretscan.Scan()
RECORDER = secretscan.Recorder(Path(tempfile.mkdtemp(prefix="rbdp-rec-", dir="/tmp")))
SESSION_STARTED = time.time()
# Loop devices orphaned before the session (see oracle.orphan_loops): any other one found
# at its end was left by a test or a daemon it ran, and fails the session.
ORPHANS_BEFORE = oracle.orphan_loops()
ORPHANED: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # Devclouds live outside short_tmp and go at their module's end: learn their secrets
    # while they exist.
    for root in secretscan.devcloud_roots_since(SESSION_STARTED):
        SECRETS.secrets.update(secretscan.devcloud_secrets(root))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # A failure under load is often a slow step only the daemon's log names, and the
    # log goes with the session's folders: its tail goes into the failure's report.
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for path, tail in log_tails(since=call.start - 1):
            report.sections.append((f"daemon log {path} (last {LOG_TAIL_LINES} lines)", tail))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if tier.RUN is not None:  # a session cut short (-x, ^C) leaves no guest running
        tier.RUN.cancel()
    SECRETS.scan_tree(RECORDER.root)
    shutil.rmtree(RECORDER.root, ignore_errors=True)
    for device in sorted(oracle.orphan_loops() - ORPHANS_BEFORE):
        ORPHANED.append(device)
        subprocess.run(["losetup", "--detach", device], check=False)
    if SECRETS.findings or SECRETS.blind or ORPHANED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Set by tests/kernel/inside.sh: this run is inside the kernel-tier guest.
IN_GUEST = os.environ.get("RBDPLUGIN_IN_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests of a real kernel client and udev run inside the guest; on the host the kernel
    # tier (tests/kernel/test_kernel_tier.py) runs them there and reports them.
    elsewhere = [i for i in items if bool(i.get_closest_marker("kernel_inside")) != IN_GUEST
                 and (i.get_closest_marker("kernel_inside") or i.get_closest_marker("kernel"))]  # fmt: skip
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [i for i in items if i not in elsewhere]
    # The kernel tier's guest runs for half an hour under TCG: start it now, beside the host
    # tests, and report it last (tests/kernel/tier.py).
    items.sort(key=lambda i: bool(i.get_closest_marker("kernel")))
    kernel = next(g for g in TOOL_GROUPS if g.marker == "kernel")
    wanted = any(i.get_closest_marker("kernel") for i in items)
    if wanted and not (IN_GUEST or kernel.opted_out or kernel.missing or config.option.collectonly):
        tier.start_in_background()
    for item in items:
        if "integration" in item.path.parts or "e2e" in item.path.parts:
            item.add_marker(pytest.mark.ceph)
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
        for group in TOOL_GROUPS:
            if group.opted_out and item.get_closest_marker(group.marker):
                item.add_marker(pytest.mark.skip(reason=f"opted out by {group.opt_out}"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for group in TOOL_GROUPS:
        if group.missing and item.get_closest_marker(group.marker):
            tools = ", ".join(group.missing)
            packages = " ".join(sorted(set(group.missing.values())))
            hint = f", or set {group.opt_out}=1 to run without them" if group.opt_out else ""
            pytest.fail(
                f"{tools} not found, needed by {group.what}: "
                f"apt-get install {packages} (make setup does){hint}",
                pytrace=False,
            )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    lines = []
    for group in TOOL_GROUPS:
        if group.opted_out:
            count = sum(1 for report in skipped if group.marker in report.keywords)
            lines.append(f"{group.opt_out}={os.environ[group.opt_out]}: {count} test(s) not "
                         f"run: {group.what}")  # fmt: skip
    opted = {group.marker for group in TOOL_GROUPS if group.opted_out}
    other = [r.nodeid for r in skipped if not opted & set(r.keywords)]
    lines += [f"skipped without an opt-out (a bug in the tests): {nodeid}" for nodeid in other]
    if lines:
        terminalreporter.section("NOT RUN", sep="=", yellow=True, bold=True)
        for line in lines:
            terminalreporter.write_line(line, yellow=True)
    if ORPHANED:
        terminalreporter.section("leaked loop devices", sep="=", red=True, bold=True)
        terminalreporter.write_line(
            f"LEAKED: {', '.join(ORPHANED)} stayed attached to FUSE exports whose mounts "
            "were gone (backing file \"/\"); detached now", red=True,
        )  # fmt: skip
    failed = bool(SECRETS.findings or SECRETS.blind)
    terminalreporter.section("secrets scan", sep="=", red=failed, bold=failed)
    terminalreporter.write_line(SECRETS.summary(), red=failed)
    for finding in SECRETS.findings[:50]:
        terminalreporter.write_line(f"SECRET LEAKED: {finding}", red=True)


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes: keep the root short.
    root = Path(tempfile.mkdtemp(prefix="rbdp-", dir="/tmp"))
    yield root
    take_down_under(root)
    SECRETS.harvest(root)
    SECRETS.scan_tree(root)
    if (root / "ceph" / "cluster.json").exists() and not SECRETS.secrets:
        SECRETS.blind = f"the session's dev cluster ran, yet no cephx key was found under {root}"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(short_tmp: Path) -> Iterator[DevCluster]:
    dev = DevCluster(short_tmp / "ceph")
    dev.start(tenants=TENANTS, watch_timeout=WATCH_TIMEOUT)
    yield dev
    dev.stop()


@pytest.fixture(scope="session")
def admin(cluster: DevCluster) -> Iterator[Admin]:
    client = Admin(cluster.conf)
    yield client
    client.close()


def tenant_toml(cluster: DevCluster, name: str, **extra: object) -> str:
    lines = [
        f"[tenants.{extra.pop('table', name)}]",
        f'pool = "{name}"',
        f'user = "{name}"',
        f'keyring = "{cluster.keyring(name)}"',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def daemon_toml(root: Path, conf: Path, tenants: str, **daemon: object) -> str:
    settings = {
        "socket_dir": str(root / "plugins"),
        "state_dir": str(root / "state"),
        "mount_root": str(root / "mounts"),
        "host_id": "host-a",
        "metrics": "",
        # The tests read FUSE exports and loop devices; the kernel tier sets krbd or nbd.
        "mapper": TEST_MAPPER,
        # The kernel tier's guest runs under TCG, several times slower: it raises this.
        "op_timeout": int(os.environ.get("RBDPLUGIN_TEST_OP_TIMEOUT", "25")),
        **daemon,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    return f'[daemon]\n{body}\n\n[ceph]\nconf = "{conf}"\nclient_timeout = 5\n\n{tenants}'


StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture(scope="session")
def daemon_factory(short_tmp: Path, cluster: DevCluster) -> Iterator[StartDaemon]:
    """Start a daemon on a config of its own; every daemon started is stopped at the end."""
    started: list[DaemonProcess] = []
    counter = iter(range(1000))

    def start(
        tenants: str,
        wait_for: str,
        conf: Path | None = None,
        env: dict[str, str] | None = None,
        **daemon: object,
    ) -> DaemonProcess:
        root = short_tmp / f"d{next(counter)}"
        root.mkdir()
        config = write_config(
            root / "rbdplugin.toml", daemon_toml(root, conf or cluster.conf, tenants, **daemon)
        )
        proc = DaemonProcess(config, root / "daemon.log", root / "plugins", env=env)
        started.append(proc)
        return proc.start(wait_for)

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def daemon(cluster: DevCluster, daemon_factory: StartDaemon) -> DaemonProcess:
    """The main daemon: alpha (trash), beta (delete), gamma (keep), delta (quotas)."""
    tenants = (
        tenant_toml(cluster, "alpha", default_size="1G")
        + tenant_toml(cluster, "beta", remove_policy="delete")
        + tenant_toml(cluster, "gamma", remove_policy="keep", default_size="64M")
        + tenant_toml(
            cluster, "delta", remove_policy="delete", max_volumes=3, max_total_size="3G",
            default_size="1G",
        )
    )  # fmt: skip
    return daemon_factory(tenants, wait_for="alpha")
