"""The benchmark's ratio for alternating rounds: paired, so drift cannot decide it."""

from __future__ import annotations

import pytest

from bench.model import CaseResult
from bench.stats import paired_ratio, ratio_min

# A real run's sequential-write rounds (MiB/s), ours and the hand-made mapping back to
# back: the same export command and losetup on both sides, and the machine drifting.
OURS = [465.3, 490.6, 450.7, 452.3]
HAND = [479.4, 481.0, 465.4, 424.0]


def test_paired_ratio_is_the_median_of_the_rounds_ratios() -> None:
    assert paired_ratio([2.0, 3.0, 10.0], [1.0, 3.0, 4.0]) == pytest.approx(2.0)
    assert paired_ratio(OURS, HAND) == pytest.approx((465.3 / 479.4 + 490.6 / 481.0) / 2)


def test_drift_between_rounds_no_longer_decides_the_data_path_verdict() -> None:
    unpaired = CaseResult("fio", "write", "MiB/s", "hand", ratio_min(0.98), OURS, HAND)
    paired = CaseResult("fio", "write", "MiB/s", "hand", ratio_min(0.98), OURS, HAND, paired=True)
    assert unpaired.ratio == pytest.approx(0.971, abs=0.001)
    assert unpaired.verdict == "MISSED"  # the two medians come from different rounds
    assert paired.ratio == pytest.approx(0.996, abs=0.001)
    assert paired.verdict == "ok"


def test_a_path_slower_in_every_round_still_misses_when_paired() -> None:
    slower = [h * 0.95 for h in HAND]
    case = CaseResult("fio", "write", "MiB/s", "hand", ratio_min(0.98), slower, HAND, paired=True)
    assert case.ratio == pytest.approx(0.95)
    assert case.verdict == "MISSED"


def test_pairs_of_unequal_length_fall_back_to_the_ratio_of_medians() -> None:
    case = CaseResult("x", "t", "MiB/s", "f", ratio_min(0.98), [1.0, 2.0, 3.0], [2.0, 2.0],
                      paired=True)  # fmt: skip
    assert case.ratio == pytest.approx(1.0)
