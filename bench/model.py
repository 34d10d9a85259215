"""One row of the results: a case, its samples next to its floor's, and its target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.promtext import Moved
from bench.stats import NO_TARGET, Summary, Target, paired_ratio, ratio

Unit = Literal["s", "MiB/s", "MiB", "count"]
Verdict = Literal["ok", "MISSED", "over (report only)", "FAILED", "not run", "-"]


@dataclass
class CaseResult:
    key: str
    title: str
    unit: Unit
    floor_name: str
    target: Target = NO_TARGET
    ours: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    stages: list[Moved] = field(default_factory=list)  # the daemon's, during this case
    floor_steps: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""  # the case crashed
    not_run: str = ""  # left out on purpose, and why
    # ours[i] and floor[i] were measured back to back (alternating rounds): the ratio is
    # the median of the per-round ratios, not the ratio of the two medians.
    paired: bool = False

    @property
    def ours_summary(self) -> Summary:
        return Summary.of(self.ours)

    @property
    def floor_summary(self) -> Summary:
        return Summary.of(self.floor)

    @property
    def ratio(self) -> float:
        if self.paired and self.ours and len(self.ours) == len(self.floor):
            return paired_ratio(self.ours, self.floor)
        return ratio(self.ours_summary, self.floor_summary)

    @property
    def verdict(self) -> Verdict:
        if self.error:
            return "FAILED"
        if self.not_run:
            return "not run"
        met = self.target.check(self.ours_summary, self.floor_summary, self.ratio)
        if met is None:
            return "-"
        if met:
            return "ok"
        return "MISSED" if self.target.gating else "over (report only)"

    def to_json(self) -> dict[str, Any]:
        def summary(s: Summary) -> dict[str, float | None]:
            return {k: None if math.isnan(v) else v for k, v in vars(s).items()}

        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "floor_name": self.floor_name,
            "target": self.target.text,
            "gating": self.target.gating,
            "verdict": self.verdict,
            "ratio": None if math.isnan(self.ratio) else self.ratio,
            "ours": {**summary(self.ours_summary), "samples": self.ours},
            "floor": {**summary(self.floor_summary), "samples": self.floor},
            "stages": [vars(m) for m in self.stages],
            "floor_steps": {
                name: Summary.of(values).mean for name, values in self.floor_steps.items()
            },
            "notes": self.notes,
            "error": self.error,
            "not_run": self.not_run,
        }
