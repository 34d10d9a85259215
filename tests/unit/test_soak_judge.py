"""The soak's verdicts (bench/soak.py), on made-up figures: which Errs the pool model
expects, and what counts as growth."""

from __future__ import annotations

from bench.soak import VERBS, Look, Outcome, Settings, error_shape, expected_kind, judge

THERE = Look(there=True, removed=0, sizes=frozenset({"64M"}), held=False, moved=0, settled=False)


def test_an_err_is_expected_only_when_the_race_could_cause_it() -> None:
    gone = "volume 'v' does not exist (driver d)"
    assert expected_kind("Get", gone, THERE, THERE, "") is None  # surely there all along
    removed = Look(**{**vars(THERE), "removed": 1})
    assert expected_kind("Get", gone, THERE, removed, "") == "missing volume"
    busy = "volume 'v' is mounted on host h at /m (1 mount(s) by containers); stop ..."
    assert expected_kind("Remove", busy, THERE, THERE, "") is None  # never held meanwhile
    held = Look(**{**vars(THERE), "held": True})
    assert expected_kind("Remove", busy, held, THERE, "") == "mounted volume"
    differs = "volume 'v' already exists (p/v) and differs: size=128M (it has 64M)"
    assert expected_kind("Create", differs, THERE, THERE, "64M") is None
    assert expected_kind("Create", differs, THERE, THERE, "128M") == "existing volume, other size"
    assert expected_kind("Unmount", "its clean-up did not finish", THERE, THERE, "") is None


def outcome(threads: dict[str, int], rss: float = 80.0, tasks: float = 6.0) -> Outcome:
    row = {"n": 1, "verdict": "-", "p50_ms": 1.0, "p99_ms": 1.0, "target": "report"}
    start = {"rss_mib": 80.0, "fds": 33, "threads": 39, "tasks": 6.0,
             "thread_names": {"python": 11, "msgr-worker-0": 2}}  # fmt: skip
    end = {**start, "rss_mib": rss, "tasks": tasks, "thread_names": threads,
           "threads": 39 + sum(threads.values()) - 13}  # fmt: skip
    return Outcome(Settings(), {v: row for v in VERBS}, {}, {}, [], start, end,
                   {"mounts": []}, [], 1.0)  # fmt: skip


def test_growth_is_judged_leak_by_leak() -> None:
    assert judge(outcome({"python": 11, "msgr-worker-0": 2})) == []
    # The pools start whole: one more Python thread is growth too, not a pool filling up.
    assert "'python': 1" in judge(outcome({"python": 12, "msgr-worker-0": 2}))[0]
    assert "msgr-worker-0" in judge(outcome({"python": 11, "msgr-worker-0": 3}))[0]
    assert "RSS grew 9.0 MiB" in judge(outcome({"python": 11, "msgr-worker-0": 2}, rss=89.0))[0]
    assert "tasks grew" in judge(outcome({"python": 11, "msgr-worker-0": 2}, tasks=7.0))[0]


def test_alike_errors_group_without_their_names_and_times() -> None:
    first = error_shape("volume 'soak-00012' clean-up (started 2026-11-30T21:20:28Z) runs")
    second = error_shape("volume 'soak-00977' clean-up (started 2026-11-30T21:27:48Z) runs")
    assert first == second == "volume NAME clean-up (started TIME) runs"
