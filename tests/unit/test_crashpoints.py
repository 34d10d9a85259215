"""The test-only crash points: the registry matches the code, and the hook kills as asked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rbdplugin import crashpoints
from rbdplugin.crashpoints import ENV, POINTS, parse

SOURCE = Path(crashpoints.__file__).parent


def _used_in_code() -> list[str]:
    found = []
    for path in SOURCE.rglob("*.py"):
        found += re.findall(r"""crash_point\(\s*["']([^"']+)["']\s*\)""", path.read_text())
    return found


def test_the_registry_is_exactly_the_points_in_the_code() -> None:
    used = _used_in_code()
    assert sorted(set(used)) == sorted(POINTS)
    assert len(used) == len(set(used)), "a point name is used at two places"
    assert len(POINTS) >= 25


def test_every_point_is_described_in_the_module_docstring() -> None:
    listed = re.findall(r"^    ([a-z]+\.[a-z-]+) ", crashpoints.__doc__ or "", re.MULTILINE)
    assert sorted(listed) == sorted(POINTS)


def test_parse() -> None:
    assert parse("") == {}
    assert parse("map.after-loop, mkfs.after-mkfs@3") == {"map.after-loop": 1, "mkfs.after-mkfs": 3}
    with pytest.raises(ValueError, match=re.escape("unknown crash point 'map.after-lop'")):
        parse("map.after-lop")
    with pytest.raises(ValueError, match="positive integer"):
        parse("map.after-loop@0")


def test_unset_the_hook_does_nothing() -> None:
    assert os.environ.get(ENV) is None
    for point in POINTS:
        crashpoints.crash_point(point)  # still alive


def _run(env: str, calls: int) -> subprocess.CompletedProcess[str]:
    script = (
        "from rbdplugin.crashpoints import crash_point\n"
        f"for i in range({calls}):\n"
        "    crash_point('mkfs.after-mkfs'); crash_point('map.after-loop'); print(i, flush=True)\n"
    )
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, ENV: env},
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip


def test_the_nth_time_a_point_is_reached_kills_with_sigkill() -> None:
    done = _run("mkfs.after-mkfs@3", calls=5)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["0", "1"]
    assert "crash point mkfs.after-mkfs (time 3): SIGKILL" in done.stderr
    assert _run("map.after-loop", calls=5).stdout.split() == []
    assert _run("", calls=2).returncode == 0


def test_an_unknown_point_fails_the_start_clearly() -> None:
    done = _run("nosuch.point", calls=1)
    assert done.returncode == 1 and "unknown crash point 'nosuch.point'" in done.stderr
