"""The local mount table: which volumes are mapped and mounted here, for whom.

Persisted atomically after every change so that a daemon killed at any moment
restarts knowing what it was doing. ``phase`` records the stage a Mount or
Unmount had reached; only ``mounted`` is a finished state.

    mapping -> mapped -> mounting -> mounted -> unmounting -> (gone)

(``mapping``: claiming the volume and attaching its device; ``mapped``: the device
is there.) Where the volume lives and how its device is found again are the
back-end's own :data:`~rbdplugin.backends.Locator` dicts; entries from before
back-ends had them are brought up to date by the back-end's ``upgrade_record``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rbdplugin.backends import Device, Locator
from rbdplugin.errors import StateUnwritable
from rbdplugin.state import read_json, write_json, write_text

log = logging.getLogger(__name__)

Phase = Literal["mapping", "mapped", "mounting", "mounted", "unmounting"]
# Turns a table entry in an older format into today's (and leaves today's alone).
Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class MountRecord:
    volume: str
    locator: Locator  # where the volume's storage is, from the back-end's ``locate``
    mountpoint: str
    phase: Phase = "mapping"
    device: Device | None = None
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
            "volume": self.volume, "locator": dict(self.locator),
            "mountpoint": self.mountpoint, "phase": self.phase,
            "device": self.device.to_json() if self.device else None, "fstype": self.fstype,
            "since": self.since, "counts": dict(self.counts), "mode": self.mode,
            "lost": self.lost, "broken": self.broken,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MountRecord:
        device, locator = data.get("device"), data["locator"]
        if not isinstance(locator, dict):
            raise ValueError(f"bad locator {locator!r}")
        return cls(
            volume=data["volume"], locator={str(k): str(v) for k, v in locator.items()},
            mountpoint=data["mountpoint"], phase=data["phase"],
            device=Device.from_json(device) if device else None,
            fstype=data.get("fstype", ""), since=data.get("since", ""),
            counts={str(k): int(v) for k, v in data.get("counts", {}).items()},
            mode=data.get("mode", "rw"), lost=data.get("lost", ""),
            broken=data.get("broken", ""),
        )  # fmt: skip


class MountTable:
    """Volume name -> :class:`MountRecord`, saved to ``path`` on every change (awaited:
    a caller goes on once the change is on disk; the loop meanwhile serves others)."""

    def __init__(self, path: Path, upgrade: Upgrade = lambda entry: entry) -> None:
        self.path = path
        raw = read_json(path, {})
        self._records: dict[str, MountRecord] = {}
        self._changes = 0  # changes made in memory, counted
        # The write under way, and how many changes it holds.
        self._writing: tuple[asyncio.Future[None], int] | None = None
        aside = path.with_name(path.name + ".bad")
        if not isinstance(raw, dict):
            log.error("%s is not a table of mounts; ignoring it (kept in %s)", path, aside)
            write_json(aside, raw)
            return
        bad: dict[str, Any] = {}
        for name, entry in raw.items():
            try:
                self._records[name] = MountRecord.from_json(upgrade(entry))
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

    async def save(self, record: MountRecord) -> None:
        """Record ``record``; returns once the file says so. If the file cannot be written,
        a new record is forgotten again (the caller undoes its changes to a known one) and
        StateUnwritable raised."""
        known = record.volume in self._records
        self._records[record.volume] = record
        try:
            await self._flush()
        except StateUnwritable:
            if not known and self._records.get(record.volume) is record:
                del self._records[record.volume]
            raise

    async def drop(self, volume: str) -> None:
        record = self._records.pop(volume, None)
        if record is not None:
            try:
                await self._flush()
            except StateUnwritable:
                self._records.setdefault(volume, record)  # as the file still says
                raise

    async def _flush(self) -> None:
        """Write the table as it is now, or join a write that will include this change.

        The write and its fsyncs run in a thread: the event loop never waits for the
        disk (every Mount and Unmount saves a few times). One write at a time, each of
        the whole table as it was when that write began, so the file only moves forward;
        changes made while one is under way share the next write.
        """
        self._changes += 1
        wanted = self._changes
        while True:
            if self._writing is None or self._writing[0].done():
                text = self._text()  # on the loop: a consistent snapshot
                write: asyncio.Future[None] = asyncio.ensure_future(
                    asyncio.to_thread(self._write, text)
                )
                self._writing = (write, self._changes)
            write, covers = self._writing
            try:
                await asyncio.shield(write)  # a caller that goes away leaves it to finish
            except StateUnwritable:
                if covers >= wanted:
                    raise
                continue  # a write begun before this change failed: try with it
            if covers >= wanted:
                return

    def _text(self) -> str:
        # One volume per line, each by the C encoder: json.dumps with an indent runs
        # Python's own, twice as slow, on the event loop for every save of a Mount.
        lines = (f"{json.dumps(name)}: {json.dumps(self._records[name].to_json(), sort_keys=True)}"
                 for name in sorted(self._records))  # fmt: skip
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def _write(self, text: str) -> None:
        try:
            write_text(self.path, text)
        except OSError as exc:
            raise StateUnwritable(
                f"cannot record the mount table in {self.path}: {exc.strerror or exc}; nothing "
                "was changed. Free space (or fix the filesystem) under the daemon's state_dir, "
                "then retry"
            ) from exc
