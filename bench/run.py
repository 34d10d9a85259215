"""``make bench``: every case against a throwaway dev cluster and a real daemon, each next
to its floor measured in the same run.

    .venv/bin/python -m bench.run                  # full run; exit 1 if a target is missed
    .venv/bin/python -m bench.run --smoke --out D  # tiny counts, never judged on targets

Prints each case as it finishes (with where the daemon's time went, from its own stage
metrics, and the floor's steps), then the table; writes ``<out>/<date>.{json,md,svg}``
and plain copies ``latest.md`` and ``latest.svg`` (default out: bench/results).
A case that crashes is a failure in both modes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import report
from bench.cases import FULL, SMOKE, Cases
from bench.cinder import cinder_case
from bench.harness import Env
from bench.model import CaseResult
from bench.promtext import moved, scrape

GROUPS = (
    "api", "create", "remove", "create_mount", "parallel", "big", "datapath", "cycles",
    "scale", "restart", "cinder",
)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts; targets not judged")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results are written")
    parser.add_argument("--only", default="", help=f"comma-separated groups of: {GROUPS}")
    parser.add_argument("--cycles", type=int, help="Mount/Unmount cycles (full: 1000)")
    parser.add_argument("--volumes", type=int, help="volumes known to the daemon (full: 1000)")
    parser.add_argument("--no-cinder", action="store_true", help="leave the Cinder case out")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    counts = SMOKE if args.smoke else FULL
    if args.cycles is not None:
        counts = dataclasses.replace(counts, cycles=args.cycles)
    if args.volumes is not None:
        counts = dataclasses.replace(counts, known=args.volumes)
    groups = [g for g in args.only.split(",") if g] or list(GROUPS)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    started = time.monotonic()
    results: list[CaseResult] = []
    env = Env()
    print(f"bench: work directory {env.root}", flush=True)
    try:
        env.start()
        cases = Cases(env, counts)
        for group in groups:
            if group == "cinder":
                run = lambda: cinder_case(env, args.smoke, skip=args.no_cinder)  # noqa: E731
            else:
                run = getattr(cases, group)
            results += run_group(env, group, run)
    except Exception:  # the set-up itself failed
        traceback.print_exc()
        results.append(CaseResult("setup", "set-up", "s", "-", error=traceback.format_exc(-1)))
    finally:
        env.close(keep=args.keep)
    seconds = time.monotonic() - started
    meta = {
        "date": datetime.date.today().isoformat(),
        "mode": "smoke" if args.smoke else "full",
        "command": "python -m bench.run" + (" --smoke" if args.smoke else ""),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "seconds": seconds,
        "counts": dataclasses.asdict(counts),
    }
    paths = report.write(results, meta, args.out)
    print(f"\n{report.markdown_table(results)}\n")
    print(f"bench: {seconds:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    failed = [r.key for r in results if r.verdict == "FAILED"]
    missed = [r.key for r in results if r.verdict == "MISSED"]
    if failed:
        print(f"bench: FAILED (crashed): {', '.join(failed)}")
    if missed and not args.smoke:
        print(f"bench: targets MISSED: {', '.join(missed)}")
    return 1 if failed or (missed and not args.smoke) else 0


def run_group(env: Env, group: str, run: Callable[[], list[CaseResult]]) -> list[CaseResult]:
    print(f"\n== {group}", flush=True)
    before = scrape(env.metrics_url())
    for hand in env.hands.values():
        hand.steps.clear()
    started = time.monotonic()
    try:
        results = run()
    except Exception as exc:
        traceback.print_exc()
        results = [CaseResult(group, group, "s", "-", error=f"{type(exc).__name__}: {exc}")]
        with contextlib.suppress(Exception):
            env.unmount_everything()
        for hand in env.hands.values():
            with contextlib.suppress(Exception):
                for mapping in list(hand.live.values()):
                    env.run(hand.teardown(mapping))
    stages = moved(before, scrape(env.metrics_url()))
    for result in results:
        result.stages = result.stages or stages  # a case with a daemon of its own set them
        row = report.table_rows([result])[0]
        print(f"{row[0]}: ours p50 {row[1]} p99 {row[2]}, floor p50 {row[3]}, "
              f"ratio {row[4]} (target {row[5]}): {row[6]}")  # fmt: skip
    if results:
        for line in report.breakdown_lines(results[0]):
            print(f"   {line}")
    print(f"   ({time.monotonic() - started:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
