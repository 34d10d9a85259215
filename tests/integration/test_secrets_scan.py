"""The session's secrets scan (tests/secretscan.py, wired in tests/conftest.py) finds a
key where one was planted, so it cannot silently scan nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rbdplugin.devcluster import DevCluster
from tests import secretscan
from tests.conftest import RECORDER
from tests.helpers import DaemonProcess

REPO = Path(__file__).resolve().parents[2]
PLANT = "RBDPLUGIN_TEST_PLANT_SECRET"


def alpha_key(cluster: DevCluster) -> str:
    (key,) = secretscan.keyring_secrets(cluster.keyring("alpha"))
    return key.decode()


def test_scan_finds_a_planted_key_and_never_shows_it(
    cluster: DevCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = alpha_key(cluster)
    (tmp_path / "ceph").mkdir()
    (tmp_path / "ceph" / "ceph.client.alpha.keyring").write_bytes(
        cluster.keyring("alpha").read_bytes()
    )  # where the key belongs: learnt from, never reported
    daemon_dir = tmp_path / "d7"
    daemon_dir.mkdir()
    (daemon_dir / "daemon.log").write_text("x" * 1000 + f"connect with key {key}\n")
    (daemon_dir / "state.json").write_text("{}\n")  # clean: scanned, nothing found
    monkeypatch.setattr(secretscan, "CHUNK", 1010)  # the key straddles two reads
    scan = secretscan.Scan()
    scan.harvest(tmp_path)
    assert key.encode() in scan.secrets
    scan.scan_tree(tmp_path)
    assert [(f.path, f.offset) for f in scan.findings] == [
        (daemon_dir / "daemon.log", 1000 + len("connect with key "))
    ]
    assert "cephx key of client.alpha" in scan.findings[0].label
    assert key not in str(scan.findings[0]) and key not in scan.summary()
    assert scan.files == 2 and "2 files" in scan.summary()


def test_recorder_keeps_plugin_replies_for_the_scan(daemon: DaemonProcess) -> None:
    daemon.client("alpha").get("never-made-recorded")
    replies = (RECORDER.root / "plugin-replies.log").read_text()
    assert "never-made-recorded" in replies  # the Err text, kept to be scanned


def test_a_planted_key_fails_the_session() -> None:
    """A whole pytest session whose daemon directory holds a key exits non-zero, naming
    the file and the offset, and not printing the key."""
    here = Path(__file__).relative_to(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{here}::test_planted_leak"],
        cwd=REPO, env={**os.environ, PLANT: "1"}, capture_output=True, text=True, timeout=240,
        check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert "1 passed" in out, out[-3000:]  # the planted test itself passed...
    assert done.returncode == 1, out[-3000:]  # ...yet the session failed
    assert "SECRET LEAKED:" in out and "/planted/daemon.log at byte 12:" in out, out[-3000:]
    assert "cephx key of client.alpha" in out
    assert re.search(r"clean|FAILED: 1 secret\(s\) found; [1-9]\d* files, ", out), out[-3000:]
    assert not re.search(r"AQ[A-Za-z0-9+/]{36}==", out)  # no cephx key printed anywhere


if os.environ.get(PLANT) == "1":  # only in the session test_a_planted_key_fails_the_session runs

    def test_planted_leak(cluster: DevCluster, short_tmp: Path) -> None:
        planted = short_tmp / "planted"
        planted.mkdir()
        (planted / "daemon.log").write_text(f"oops: key = {alpha_key(cluster)}\n")
