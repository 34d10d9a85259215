"""The local mount table: which volumes are mapped and mounted here, for whom.

Persisted atomically after every change so that a daemon killed at any moment
restarts knowing what it was doing. ``phase`` records the stage a Mount or
Unmount had reached; only ``mounted`` is a finished state.

    mapping -> mapped -> mounting -> mounted -> unmounting -> (gone)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rbdplugin.mapping import MappedDevice
from rbdplugin.state import read_json, write_json

log = logging.getLogger(__name__)

Phase = Literal["mapping", "mapped", "mounting", "mounted", "unmounting"]


@dataclass
class MountRecord:
    volume: str
    pool: str
    namespace: str
    image: str
    mountpoint: str
    phase: Phase = "mapping"
    mapped: MappedDevice | None = None
    fstype: str = ""
    since: str = ""
    mode: str = "rw"
    # Set when another host took this volume over: "HOST at TIME" (our I/O is fenced).
    lost: str = ""
    # Set when the mapping died under the mount: why, and when it was noticed.
    broken: str = ""
    # Docker mount ID -> how many times it is mounted (docker cp and copy-up reuse an ID).
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def references(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": self.volume, "pool": self.pool, "namespace": self.namespace,
            "image": self.image, "mountpoint": self.mountpoint, "phase": self.phase,
            "mapped": self.mapped.to_json() if self.mapped else None, "fstype": self.fstype,
            "since": self.since, "counts": dict(self.counts), "mode": self.mode,
            "lost": self.lost, "broken": self.broken,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountRecord:
        mapped = data.get("mapped")
        return cls(
            volume=data["volume"], pool=data["pool"], namespace=data.get("namespace", ""),
            image=data["image"], mountpoint=data["mountpoint"], phase=data["phase"],
            mapped=MappedDevice.from_json(mapped) if mapped else None,
            fstype=data.get("fstype", ""), since=data.get("since", ""),
            counts={str(k): int(v) for k, v in data.get("counts", {}).items()},
            mode=data.get("mode", "rw"), lost=data.get("lost", ""),
            broken=data.get("broken", ""),
        )  # fmt: skip


class MountTable:
    """Volume name -> :class:`MountRecord`, saved to ``path`` on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = read_json(path, {})
        self._records: dict[str, MountRecord] = {}
        aside = path.with_name(path.name + ".bad")
        if not isinstance(raw, dict):
            log.error("%s is not a table of mounts; ignoring it (kept in %s)", path, aside)
            write_json(aside, raw)
            return
        bad: dict[str, Any] = {}
        for name, entry in raw.items():
            try:
                self._records[name] = MountRecord.from_json(entry)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                # One bad entry must not stop start-up or hide the good ones.
                log.error("volume %s: unreadable entry in %s (%s: %s); ignoring it (kept in %s)",
                          name, path, type(exc).__name__, exc, aside)  # fmt: skip
                bad[name] = entry
        if bad:
            write_json(aside, bad)

    def get(self, volume: str) -> MountRecord | None:
        return self._records.get(volume)

    def all(self) -> list[MountRecord]:
        return list(self._records.values())

    def save(self, record: MountRecord) -> None:
        self._records[record.volume] = record
        self._flush()

    def drop(self, volume: str) -> None:
        if self._records.pop(volume, None) is not None:
            self._flush()

    def _flush(self) -> None:
        write_json(self.path, {name: rec.to_json() for name, rec in self._records.items()})
