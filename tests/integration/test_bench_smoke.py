"""The benchmark suite runs end to end with tiny counts, so it never rots.

Targets are not checked here (timed tests would be flaky): ``make bench`` checks them.
This only proves every case runs, measures ours and its floor, and writes its reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = {
    "create", "create_cli", "get", "get_mounted", "get_cold", "capabilities", "path",
    "create_mount", "parallel", "remove_trash", "remove_delete", "mount_1tib", "fio_seq_write",
    "fio_seq_read", "fio_rand_read", "fio_rand_write", "cycles_rss", "cycles_fds",
    "cycles_threads", "list", "rss_known", "restart_activate", "restart_ready", "cinder",
}  # fmt: skip


def test_smoke_bench_runs_every_case(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    [results] = tmp_path.glob("20*.json")
    cases = {case["key"]: case for case in json.loads(results.read_text())["cases"]}
    assert set(cases) == CASES, done.stdout[-3000:]
    for key, case in cases.items():
        assert not case["error"], (key, case["error"])
        if case["not_run"]:
            continue  # said so in the table: "not run: why"
        for side in ("ours", "floor"):
            assert case[side]["samples"], (key, side)
            assert all(value > 0 for value in case[side]["samples"]), (key, side, case[side])
    ET.parse(tmp_path / "latest.svg")  # noqa: S314 (our own file): well-formed XML
    assert (tmp_path / "latest.md").read_text().startswith("# rbdplugin benchmarks")
    assert "| case |" in done.stdout
