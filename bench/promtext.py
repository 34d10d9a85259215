"""The daemon's own stage metrics: scraped before and after a case, printed as deltas.

Generic over label values: whatever stages and endpoints the daemon exports show up,
so stages added to the daemon later need no change here.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Histograms broken down in the report: metric name -> the label that names the part.
BREAKDOWN = {
    "rbdplugin_stage_duration_seconds": "stage",
    "rbdplugin_request_duration_seconds": "endpoint",
}

Key = tuple[str, str]  # (metric, label value)
Scrape = dict[Key, tuple[float, float]]


@dataclass(frozen=True)
class Moved:
    metric: str
    part: str
    count: int
    mean: float  # seconds per observation

    @property
    def total(self) -> float:
        return self.count * self.mean


def scrape(url: str) -> Scrape:
    """(sum, count) per histogram part; {} when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our loopback URL)
            text = response.read().decode()
    except OSError:
        return {}
    found: Scrape = {}
    for family in text_string_to_metric_families(text):
        label = BREAKDOWN.get(family.name)
        if label is None:
            continue
        for sample in family.samples:
            key = (family.name, sample.labels.get(label, ""))
            total, count = found.get(key, (0.0, 0.0))
            if sample.name.endswith("_sum"):
                found[key] = (sample.value, count)
            elif sample.name.endswith("_count"):
                found[key] = (total, sample.value)
    return found


def moved(before: Scrape, after: Scrape) -> list[Moved]:
    """What moved between two scrapes; a daemon restarted in between counts from zero."""
    out = []
    for key, (total, count) in sorted(after.items()):
        total0, count0 = before.get(key, (0.0, 0.0))
        if count < count0:
            total0, count0 = 0.0, 0.0
        if count > count0:
            mean = (total - total0) / (count - count0)
            out.append(Moved(key[0], key[1], int(count - count0), mean))
    return out
