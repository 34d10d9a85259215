"""What the daemon remembers on local disk, written atomically (temp, fsync, rename).

:class:`KnownVolumes` keeps the last status seen of every volume of a tenant, so
that Get and List can still answer while Ceph is unreachable: Docker drops a
volume from its store when Get says "not found" at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# How long a failed write of the known volumes waits before trying again (doubling).
RETRY_FIRST, RETRY_LAST = 1.0, 30.0


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON so that readers see the old or the new file."""
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def host_uuid(state_dir: Path) -> str:
    """This host's UUID, made once and kept in ``state_dir``: two machines that share a
    hostname (or a reinstalled one) are never the same host in a lease."""
    path = state_dir / "host-uuid"
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if _is_uuid(value):
        return value
    if value:
        log.warning("%s does not hold a UUID (%r); making a new one", path, value[:40])
    value = str(uuid.uuid4())
    write_text(path, value + "\n")
    return value


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        # A corrupt cache must not stop the daemon; the truth is in Ceph.
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return default


class KnownVolumes:
    """Name -> last known Status of a tenant's volumes, persisted in ``path``.

    Inside the event loop, changes are written ``delay`` seconds later, in a thread,
    many at once: the file is a cache (the truth is in Ceph), and writing and fsyncing
    a thousand volumes' status on every Create or Get would stall every request.
    """

    def __init__(self, path: Path, delay: float = 1.0) -> None:
        self.path = path
        self.delay = delay
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None
        self._writing = threading.Lock()  # one write of the file at a time
        raw = read_json(path, {})
        entries = raw.items() if isinstance(raw, dict) else ()
        # A cache: entries of the wrong shape are dropped, never fatal.
        self._volumes: dict[str, dict[str, Any]] = {
            name: entry for name, entry in entries if isinstance(entry, dict)
        }

    def names(self) -> list[str]:
        return sorted(self._volumes)

    def get(self, name: str) -> dict[str, Any] | None:
        return self._volumes.get(name)

    def remember(self, name: str, status: dict[str, Any]) -> None:
        entry = {**status, "seen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        old = self._volumes.get(name)
        if old is None or {k: v for k, v in old.items() if k != "seen_at"} != status:
            self._volumes[name] = entry
            self._save()

    def forget(self, name: str) -> None:
        if self._volumes.pop(name, None) is not None:
            self._save()

    def replace_names(self, names: list[str]) -> None:
        """Make the set of names match a fresh listing from Ceph."""
        current = set(names)
        changed = False
        for gone in set(self._volumes) - current:
            del self._volumes[gone]
            changed = True
        for new in current - set(self._volumes):
            self._volumes[new] = {}
            changed = True
        if changed:
            self._save()

    def _save(self) -> None:
        self._dirty = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tools, tests): write now
            self.flush()
            return
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_later())

    async def _write_later(self) -> None:
        await asyncio.sleep(self.delay)
        retry = RETRY_FIRST
        while self._dirty:
            self._dirty = False
            text = json.dumps(self._volumes)  # on the loop: a consistent snapshot
            try:
                await asyncio.to_thread(self._write, text)
            except OSError as exc:  # a full disk: serve on, and write it once space returns
                log.warning("cannot write %s (%s); trying again in %.0f s", self.path, exc, retry)
                self._dirty = True
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_LAST)

    def _write(self, text: str) -> None:
        with self._writing:
            write_text(self.path, text)

    def flush(self) -> None:
        """Write pending changes now."""
        if self._dirty:
            self._dirty = False
            self._write(json.dumps(self._volumes))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        try:
            self.flush()
        except OSError as exc:  # a cache: the next start learns it again from Ceph
            log.error("cannot write %s (%s); its last changes are lost", self.path, exc)
