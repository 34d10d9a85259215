"""Summaries of samples (percentiles, means) and the targets they are checked against."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated between closest ranks."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p99: float
    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            n=len(samples),
            p50=percentile(samples, 50),
            p99=percentile(samples, 99),
            mean=sum(samples) / len(samples),
            low=min(samples),
            high=max(samples),
        )


TargetKind = Literal["ratio_max", "ratio_min", "absolute", "growth_max", "none"]


@dataclass(frozen=True)
class Target:
    """What a case must meet. ``gating``: a miss fails ``make bench``."""

    kind: TargetKind
    limit: float = math.nan  # ratio bound, or absolute bound on p50, or growth bound
    p99_limit: float = math.nan  # absolute kind only
    text: str = ""
    gating: bool = True

    def check(self, ours: Summary, floor: Summary, value: float | None = None) -> bool | None:
        """True when met, False when missed, None when there is nothing to check.
        ``value``: the ratio to judge, when it is not ours.p50 / floor.p50 (paired)."""
        if self.kind == "none" or ours.n == 0:
            return None
        if self.kind == "absolute":
            ok = ours.p50 <= self.limit
            return ok and (math.isnan(self.p99_limit) or ours.p99 <= self.p99_limit)
        if floor.n == 0:
            return None
        if self.kind == "growth_max":
            return ours.p50 - floor.p50 <= self.limit
        if value is None:
            value = ratio(ours, floor)
        return value <= self.limit if self.kind == "ratio_max" else value >= self.limit


def ratio(ours: Summary, floor: Summary) -> float:
    if floor.n == 0 or floor.p50 == 0:
        return math.nan
    return ours.p50 / floor.p50


def paired_ratio(ours: Sequence[float], floor: Sequence[float]) -> float:
    """The median of ``ours[i] / floor[i]``: for rounds that alternate ours and the floor,
    each pair measured back to back, so a drift of the machine between rounds (another
    tenant of the host, the OSD compacting) cancels out instead of deciding the ratio."""
    pairs = [o / f for o, f in zip(ours, floor, strict=True) if f]
    return percentile(pairs, 50)


def ratio_max(limit: float, text: str = "", gating: bool = True) -> Target:
    return Target("ratio_max", limit, text=text or f"≤ {limit:g}x", gating=gating)


def ratio_min(limit: float, text: str = "") -> Target:
    return Target("ratio_min", limit, text=text or f"≥ {limit:g}x")


def absolute(p50: float, p99: float = math.nan, text: str = "") -> Target:
    return Target("absolute", p50, p99, text=text)


def growth_max(limit: float, text: str) -> Target:
    return Target("growth_max", limit, text=text)


NO_TARGET = Target("none", text="report")
