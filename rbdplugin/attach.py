"""Attach and detach volumes on this host: claim, attach, format once, mount; and back.

What is the same for every back-end lives here; how a volume is claimed and how its
block device appears (RBD: a lease and a mapper) is the back-end's
:class:`~rbdplugin.backends.Attachment`, which this module only ever sees through
that face.

Every stage is recorded in the :class:`~rbdplugin.mounts.MountTable` before it
starts, so a failure undoes exactly the stages done (Docker never sends Unmount
after a failed Mount), and a daemon killed mid-way is put right at start-up by
:meth:`Attacher.reconcile`: a mount a container still uses is kept with its
counts; anything half-done is taken down; nothing is mapped twice.

Callers serialise work per volume; this class holds no lock. A teardown (a
rollback or an Unmount) is never abandoned: it runs as a task of its own, and
while it runs past its caller's budget the volume refuses Mounts with a clear
error instead of letting a newer Mount race it. A teardown only ever drops the
record it was started for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rbdplugin.backends import Attachment, Device, Holder, Locator, VolumeBackend, VolumeInfo
from rbdplugin.config import TenantConfig
from rbdplugin.crashpoints import crash_point
from rbdplugin.errors import (
    CephUnavailable,
    DeadlineExceeded,
    InvalidArgument,
    OpenStackUnavailable,
    ProcessError,
    RbdPluginError,
    StateUnwritable,
    VolumeBusy,
)
from rbdplugin.filesystem import (
    SIGNATURE_REGION,
    UNRECOGNISED,
    Filesystems,
    FsckProblems,
    Usage,
)
from rbdplugin.metrics import Metrics
from rbdplugin.mounts import MountRecord, MountTable
from rbdplugin.process import stuck_gone
from rbdplugin.spec import ROOT_ID_MAX, check_mkfs_words, parse_mount_options
from rbdplugin.units import format_size

log = logging.getLogger(__name__)
T = TypeVar("T", str, Sequence[str])
# Holders asked for ahead of knowing the volume: the locator guessed, and the read.
Ahead = tuple[Locator, "asyncio.Task[list[Holder]]"]
# Always on volume mounts unless the tenant opts out: a volume is tenant data, and a
# setuid binary or device node on it must not act on the host.
HOST_SAFE_OPTIONS = ("nosuid", "nodev")
# Failures an outage explains: a clean-up no caller waits for any more is tried again
# after them (Docker never repeats an Unmount), every RETRY_FIRST s doubling up to
# RETRY_MAX s, so the export process and loop device go once the outage ends.
PASSING_FAILURES = (CephUnavailable, OpenStackUnavailable, DeadlineExceeded)
RETRY_FIRST = 1.0
RETRY_MAX = 15.0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Attacher:
    def __init__(
        self,
        *,
        tenant: TenantConfig,
        mount_root: Path,
        filesystems: Filesystems,
        backend: VolumeBackend,
        attachment: Attachment,
        table: MountTable,
        metrics: Metrics,
        teardown_seconds: float = 25.0,
    ) -> None:
        self.tenant = tenant
        self.mount_root = mount_root
        self.fs = filesystems
        self.backend = backend
        self.attachment = attachment
        self.table = table
        self.metrics = metrics
        self.teardown_seconds = teardown_seconds
        # fsck=auto: the last check that found something, per volume (Get shows it).
        self.checks: dict[str, str] = {}
        # Volumes whose new filesystem's root is being owned as asked; their formatted
        # mark waits for it (a crash before it leaves the mkfs to be redone).
        self._owning: dict[str, asyncio.Event] = {}
        # Teardowns still running (past their caller's budget), by volume: the task, since
        # when, and the event that ends its wait before the next try.
        self._teardowns: dict[str, tuple[asyncio.Task[None], str, asyncio.Event]] = {}

    def mountpoint(self, volume: str) -> Path:
        return self.mount_root / self.tenant.name / volume

    def mounted(self, volume: str) -> MountRecord | None:
        """The record of a finished, still-present mount of ``volume``."""
        record = self.table.get(volume)
        if record and record.phase == "mounted" and self._intact(record):
            return record
        return None

    def _intact(self, record: MountRecord) -> bool:
        source = self.fs.mounted_from(Path(record.mountpoint))
        return bool(record.device and source and source == record.device.path)

    # -- what callers ask ------------------------------------------------------------------

    def recorded(self, volume: str) -> MountRecord | None:
        """The table's record of ``volume`` in whatever phase (None: nothing here)."""
        return self.table.get(volume)

    def records(self) -> list[MountRecord]:
        return self.table.all()

    def mounted_volumes(self) -> list[tuple[MountRecord, Device]]:
        """Mounts that finished, with their devices (intact or not)."""
        return [(r, r.device) for r in self.table.all() if r.phase == "mounted" and r.device]

    def half_done(self) -> bool:
        """Whether any record is mid-way (its clean-up may need the back-end)."""
        return any(r.phase != "mounted" for r in self.table.all())

    def usage(self, record: MountRecord) -> Usage:
        """The filesystem usage of a mounted record; OSError if it cannot be read."""
        return self.fs.usage(Path(record.mountpoint))

    def holders_ahead(
        self, name: str, watching: asyncio.Future[set[str]] | None = None
    ) -> Ahead | None:
        """Start reading the holders of volume ``name`` before the volume is read, where
        its locator can be guessed: :meth:`holders` takes the answer if the guess held.
        ``watching``: who watches it, as the volume's own read will tell."""
        locator = self.attachment.likely_locator(name)
        if locator is None:
            return None
        return locator, asyncio.ensure_future(self.attachment.holders(locator, watching))

    async def holders(
        self,
        info: VolumeInfo,
        ahead: Ahead | None = None,
        watching: asyncio.Future[set[str]] | None = None,
    ) -> list[Holder]:
        locator = self.attachment.locate(info)
        if ahead is not None:
            guessed, task = ahead
            if guessed == locator:
                return await task
            abandon(task)
        return await self.attachment.holders(locator, watching)

    def describe(self, record: MountRecord) -> str:
        return self.attachment.describe(record.locator)

    # -- Mount ---------------------------------------------------------------------------

    async def await_cleaning(self, volume: str, what: str = "Mounts") -> None:
        """A volume whose last teardown still runs takes no Mount (nor Remove) until that
        ends. One waiting to try again (after an outage) tries now, and the caller waits
        for it as an Unmount would: with Ceph back, the next Remove or Mount succeeds
        rather than being refused until the retry's backoff (up to RETRY_MAX) has run."""
        running = self._teardowns.get(volume)
        if running is None or running[0].done():
            return
        task, since, retry_now = running
        retry_now.set()
        with contextlib.suppress(TimeoutError, RbdPluginError):
            await asyncio.wait_for(asyncio.shield(task), self.teardown_seconds)
        if not task.done():
            raise VolumeBusy(
                f"volume {volume!r}: the clean-up of its previous mount (started {since}) "
                f"is still running and took longer than its budget; it refuses {what} until "
                "that ends. See `rbdplugin status` and the daemon's log for the stage it waits on"
            )

    async def add_reference(self, volume: str, mount_id: str) -> str | None:
        """Count one more Mount of a volume mounted here; None if it is not mounted."""
        await self.await_cleaning(volume)
        record = self.mounted(volume)
        if record is None:
            return None
        if record.broken:
            raise VolumeBusy(
                f"volume {volume!r} is mounted here at {record.mountpoint} but broken: "
                f"{record.broken}. Stop the containers using it; once they are gone its last "
                "Unmount cleans up and the next Mount maps it afresh"
            )
        counts = dict(record.counts)
        record.counts[mount_id] = record.counts.get(mount_id, 0) + 1
        try:
            await self.table.save(record)
        except StateUnwritable:
            record.counts = counts  # as the table on disk still says
            raise
        crash_point("mount.after-reference-saved")
        return record.mountpoint

    async def mount(self, info: VolumeInfo, mount_id: str) -> str:
        """Map, format if blank, and mount a volume that is not mounted here yet."""
        await self.await_cleaning(info.name)
        leftover = self.table.get(info.name)
        if leftover is not None:
            await self._owned_teardown(leftover)
        record = MountRecord(
            volume=info.name, locator=self.attachment.locate(info),
            mountpoint=str(self.mountpoint(info.name)),
            mode="ro" if info.spec.access == "ro" else "rw",
        )  # fmt: skip
        await self.table.save(record)
        crash_point("mount.after-record")
        try:
            await self._attach(info, record, mount_id)
        except BaseException as exc:
            log.warning(
                "volume %s: mount failed at %s (%s); rolling back", info.name, record.phase, exc
            )
            await self._owned_teardown(record)
            raise
        return record.mountpoint

    async def _attach(self, info: VolumeInfo, record: MountRecord, mount_id: str) -> None:
        read_only = record.mode == "ro"
        sharing = self._sharing(record)
        claim = asyncio.ensure_future(self._claim(info.name, record.locator, read_only))
        expose: asyncio.Future[Device] | None = None
        blank: asyncio.Future[bool] | None = None
        if self.attachment.attach_while_claiming and not sharing:
            # The mapping comes up while the claim is made (it takes ~40 ms, the claim
            # ~6): nothing writes before both are done, and should the claim fail, the
            # roll-back undoes the mapping like that of any failed Mount.
            expose, blank = self._start_expose(info, record, read_only, claim)
        try:
            await claim
            if sharing:
                raise VolumeBusy(
                    f"volume {info.name!r}: its image {self.describe(record)} is already mounted "
                    f"on this host as volume {sharing[0].volume!r}; one host mounts an image once"
                )
            if expose is None:
                expose, blank = self._start_expose(info, record, read_only, claim)
            record.device = await expose
            record.phase = "mapped"
            await self.table.save(record)
            crash_point("mount.after-mapped-saved")
            assert blank is not None  # noqa: S101 - started with expose
            proven = await blank
        finally:
            if blank is not None:
                abandon(blank)
            if expose is not None and not expose.done():
                # The roll-back looks for what it mapped: not before it has stopped.
                expose.cancel()
                await asyncio.wait([expose])
            if expose is not None:
                _consume(expose)
        spec = info.spec
        owner = (spec.root_uid, spec.root_gid, spec.root_mode) != (None, None, None)
        if owner and not read_only:
            # A new filesystem's mark waits until its root is owned as asked (see _own).
            self._owning[info.name] = asyncio.Event()
        try:
            await self._make_and_mount(info, record, read_only, proven)
        finally:
            self._owning.pop(info.name, None)
        crash_point("mount.after-mount-syscall")
        record.phase = "mounted"
        record.since = _now()
        record.counts = {mount_id: 1}
        await self.table.save(record)
        crash_point("mount.after-mounted-saved")
        log.info("volume %s: mounted %s at %s (%s)", info.name, record.device.path,
                 record.mountpoint, record.device.via)  # fmt: skip

    async def _make_and_mount(
        self, info: VolumeInfo, record: MountRecord, read_only: bool, proven: bool
    ) -> None:
        assert record.device is not None  # noqa: S101 - mapped by now
        record.fstype, marking = await self._format_once(
            info, record.device.path, read_only, proven
        )
        if info.spec.fsck == "auto" and not read_only and marking is None:
            await self._check(info, record.device.path, record.fstype)
        if info.renew_uuid and not read_only and marking is None:
            await self._renew_uuid(info, record.device.path, record.fstype)
        # A volume grown while not mounted here (or where the kernel refused to grow it
        # online) fills its device now: ext4 before the mount, xfs (online only) after.
        grow = marking is None and not read_only
        grow = grow and await self.fs.room_to_grow(record.device.path, record.fstype)
        if grow and record.fstype == "ext4":
            await self._grow_at_mount(info, record, None)
        gate = self._owning.get(info.name)
        try:
            await self._mount(info, record, record.device.path, read_only)
            if marking is not None and gate is not None:
                await self._own(info, Path(record.mountpoint))
                gate.set()
        finally:
            if marking is not None and (gate is None or gate.is_set()):
                await marking  # its mkfs is done: the mark is true either way
            elif marking is not None:
                # Never marked formatted: the next Mount formats afresh (nothing was
                # handed out yet), then owns the root as asked.
                abandon(marking)
        if grow and record.fstype == "xfs":
            await self._grow_at_mount(info, record, Path(record.mountpoint))

    async def _mount(
        self, info: VolumeInfo, record: MountRecord, device: str, read_only: bool
    ) -> None:
        # Not saved: a crash from here on finds the mount by its mount point (a teardown
        # of any phase unmounts it), so this costs no fsync on every Mount.
        record.phase = "mounting"
        stored = _stored(
            "mount-options", info, parse_mount_options, ",".join(info.spec.mount_options)
        )
        options = stored + (READ_ONLY_OPTIONS[record.fstype] if read_only else ())
        if self.tenant.nosuid_nodev:
            options += HOST_SAFE_OPTIONS
        with self.metrics.stage("mount"):
            await self.fs.mount(device, Path(record.mountpoint), record.fstype, options)

    async def _check(self, info: VolumeInfo, device: str, fstype: str) -> None:
        """fsck=auto: a filesystem not cleanly unmounted is checked (safe modes only)."""
        scratch = self.mount_root / ".fsck" / self.tenant.name / info.name
        try:
            with self.metrics.stage("fsck"):
                found = await self.fs.check(device, fstype, scratch)
        except FsckProblems as exc:
            self.checks[info.name] = f"{_now()}: PROBLEMS: {exc}"
            raise
        if found is not None:
            self.checks[info.name] = f"{_now()}: {found}"
            log.warning("volume %s: %s was not cleanly unmounted; checked: %s", info.name,
                        fstype, found)  # fmt: skip

    async def _renew_uuid(self, info: VolumeInfo, device: str, fstype: str) -> None:
        """A clone's first Mount: its own filesystem UUID, so it mounts beside its origin.
        A crash before the mark lands renews it again: harmless, nothing was mounted."""
        scratch = self.mount_root / ".uuid" / self.tenant.name / info.name
        with self.metrics.stage("uuid"):
            await self.fs.renew_uuid(device, fstype, scratch)
        await self.backend.uuid_renewed(info.name)
        log.info("volume %s: clone of %s, gave its %s a new UUID", info.name, info.spec.origin,
                 fstype)  # fmt: skip

    async def _own(self, info: VolumeInfo, root: Path) -> None:
        """Give a new filesystem's root the owner and mode Create asked for (uid, gid,
        mode), before its path is handed out; never again on later Mounts, so an
        operator's later chown or chmod stays."""
        spec = info.spec
        try:
            uid, gid, mode = _checked_owner(info.name, spec.root_uid, spec.root_gid, spec.root_mode)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"{exc}; it is stored with the volume ({info.location}), not in this request: "
                "fix or remove it there"
            ) from exc
        try:
            await asyncio.to_thread(_chown_chmod, root, uid, gid, mode)
        except OSError as exc:
            raise ProcessError(f"volume {info.name!r}: cannot set the owner or mode of "
                               f"{root}: {exc}") from exc  # fmt: skip
        log.info("volume %s: its new filesystem's root is %s:%s mode %s", info.name,
                 "-" if uid < 0 else uid, "-" if gid < 0 else gid,
                 "-" if mode is None else f"{mode:04o}")  # fmt: skip

    async def _grow_at_mount(self, info: VolumeInfo, record: MountRecord, at: Path | None) -> None:
        assert record.device is not None  # noqa: S101 - mapped by now
        try:
            await self.fs.grow(record.device.path, record.fstype, at)
        except ProcessError as exc:  # the data is fine: it mounts at its present size
            log.warning("volume %s: could not grow its %s filesystem to fill %s: %s",
                        info.name, record.fstype, record.device.path, exc)  # fmt: skip
            return
        log.info("volume %s: grew its %s filesystem to fill %s", info.name, record.fstype,
                 record.device.path)  # fmt: skip

    async def grow(self, volume: str, size: int) -> Growth | None:
        """Bring a volume mounted here up to its storage's new ``size``: its device,
        then its filesystem, in place; None if it is not mounted here."""
        record = self.mounted(volume)
        if record is None or record.device is None:
            return None
        if record.lost or record.broken:
            raise VolumeBusy(
                f"volume {volume!r}: its storage grew to {format_size(size)}, but its mount "
                f"here is {'LOST' if record.lost else 'BROKEN'} "
                f"({record.lost or record.broken}); its filesystem grows at its next Mount"
            )
        device = record.device.path
        await self.attachment.grow(record.device, size)
        try:
            await self.fs.grow(device, record.fstype, Path(record.mountpoint))
        except ProcessError as exc:
            reason = _grow_refusal(exc.output) or str(exc)
            log.warning("volume %s: %s grew to %s, its %s filesystem did not: %s",
                        volume, device, format_size(size), record.fstype, reason)  # fmt: skip
            return Growth(device, done=False, detail=reason)
        log.info("volume %s: grew %s and its %s filesystem at %s to %s online", volume, device,
                 record.fstype, record.mountpoint, format_size(size))  # fmt: skip
        return Growth(device, done=True, detail="")

    def _sharing(self, record: MountRecord) -> list[MountRecord]:
        """Other volumes of this table on the same storage (a source and its companions)."""
        return [
            other for other in self.table.all()
            if other.volume != record.volume and other.locator == record.locator
        ]  # fmt: skip

    async def _claim(self, volume: str, locator: Locator, read_only: bool) -> None:
        with self.metrics.stage("claim"):
            await self.attachment.claim(volume, locator, read_only)

    def _start_expose(
        self, info: VolumeInfo, record: MountRecord, read_only: bool, claim: asyncio.Future[None]
    ) -> tuple[asyncio.Future[Device], asyncio.Future[bool]]:
        """The mapping, and (asked meanwhile) whether Ceph shows a fresh volume unwritten."""
        expose = asyncio.ensure_future(self._expose(info, record.locator, read_only, claim))
        return expose, asyncio.ensure_future(self._proven_blank(info))

    async def _expose(
        self, info: VolumeInfo, locator: Locator, read_only: bool, claimed: Awaitable[None]
    ) -> Device:
        found = await self.attachment.find(locator)
        if found is not None and read_only and self.fs.mount_points_of(found.path):
            found = None  # someone else's read-only use: a second read-only map is harmless
        if found is not None:
            # Not in our table, so not ours to keep: a leftover from a crash, or someone else's.
            users = self.fs.mount_points_of(found.path)
            if users:
                raise VolumeBusy(
                    f"image {self.attachment.describe(locator)} is already mapped at {found.path} "
                    f"and mounted at {', '.join(users)} outside rbdplugin; unmount it there first"
                )
            log.info("volume %s: removing a leftover mapping %s", info.name, found)
            await self.attachment.detach(found)
        with self.metrics.stage("map"):
            return await self.attachment.attach(info, locator, read_only, claimed)

    async def _proven_blank(self, info: VolumeInfo) -> bool:
        """True if Ceph shows that a fresh volume's ends were never written."""
        if not info.fresh:
            return False
        # One round trip; reading the device through its mapping took ~10 ms.
        with self.metrics.stage("probe"):
            return await self.backend.ends_unwritten(info.name, SIGNATURE_REGION)

    async def _format_once(
        self, info: VolumeInfo, device: str, read_only: bool, proven_blank: bool
    ) -> tuple[str, asyncio.Task[None] | None]:
        """The filesystem to mount, after making it if the volume is blank; and the
        write of the mark that says so, still under way (see :meth:`_mkfs`)."""
        wanted = info.spec.fstype
        signature = None
        if not proven_blank:
            with self.metrics.stage("probe"):
                signature = await self.fs.probe(device)
        if signature is None and read_only:
            raise InvalidArgument(
                f"volume {info.name!r}: its source {info.spec.source!r} holds no filesystem yet; "
                "mount the source read-write once (it is formatted then), then this companion"
            )
        if signature is None and info.formatted:
            raise InvalidArgument(
                f"volume {info.name!r}: rbdplugin formatted it ({info.location}) {info.formatted}, "
                f"yet {device} reads as blank; refusing to format it. Check that the volume "
                "and its mapping are healthy (rbd info, rbd status, dmesg). Only if its data is "
                f"really gone, allow a new filesystem with: {info.unformat_hint}"
            )
        if signature is not None:
            if not read_only and await self.backend.formatting_interrupted(info.name):
                # Our own mkfs died half-way: nothing was ever mounted, so redo it.
                log.warning("volume %s: finishing an interrupted mkfs", info.name)
                return wanted, await self._mkfs(info, device, wanted, force=True)
            kind = signature.mountable_as
            if signature.type == UNRECOGNISED:
                raise InvalidArgument(
                    f"volume {info.name!r}: device {device} holds data that no probe recognises "
                    "as a filesystem (or blkid could not read it); it is never formatted over. "
                    f"Inspect it (blkid -p {device}; hexdump -C {device} | head); if it holds "
                    "nothing of value, wipe it yourself"
                )
            if kind is None:
                raise InvalidArgument(
                    f"volume {info.name!r}: device {device} carries a {signature.type} signature, "
                    "not a filesystem rbdplugin mounts (ext4, xfs); it is never formatted over. "
                    "Inspect it with blkid; if it holds nothing of value, wipe it yourself "
                    "(wipefs -a)"
                )
            if wanted and kind != wanted:
                log.warning("volume %s: has %s, not the requested %s; mounting it as it is",
                            info.name, kind, wanted)  # fmt: skip
            return kind, None
        if not wanted:
            raise InvalidArgument(
                f"volume {info.name!r} is blank and has no fstype; create it with --opt fstype=ext4"
            )
        return wanted, await self._mkfs(info, device, wanted, force=False)

    async def _mkfs(
        self, info: VolumeInfo, device: str, fstype: str, force: bool
    ) -> asyncio.Task[None]:
        with self.metrics.stage("mark"):
            await self.backend.formatting_started(info.name)
        crash_point("mkfs.after-mark-started")
        started = time.monotonic()
        extra = _stored(
            "mkfs-options", info, lambda name, words: check_mkfs_words(name, fstype, words),
            info.spec.mkfs_options,
        )  # fmt: skip
        with self.metrics.stage("mkfs"):
            await self.fs.mkfs(device, fstype, fast=info.fresh, extra=extra, force=force)
        crash_point("mkfs.after-mkfs")
        log.info("volume %s: made %s on %s in %.1f s%s", info.name, fstype, device,
                 time.monotonic() - started, " (fast)" if info.fresh else "")  # fmt: skip
        # Marked done while the new filesystem is mounted, not before: should the mark
        # not land (a crash), the next Mount redoes the mkfs, harmless since this Mount
        # has not answered, so nothing was written to the filesystem yet.
        return asyncio.ensure_future(self._formatted(info))

    async def _formatted(self, info: VolumeInfo) -> None:
        gate = self._owning.get(info.name)
        if gate is not None:
            await gate.wait()
        with self.metrics.stage("mark"):
            await self.backend.formatting_done(info.name)
        crash_point("mkfs.after-mark-done")

    # -- Unmount -------------------------------------------------------------------------

    async def unmount(self, volume: str, mount_id: str) -> None:
        record = self.table.get(volume)
        if record is None or mount_id not in record.counts:
            log.info("volume %s: Unmount of unknown ID %s: nothing to do", volume, mount_id)
            return
        counts, phase = dict(record.counts), record.phase
        record.counts[mount_id] -= 1
        if record.counts[mount_id] <= 0:
            del record.counts[mount_id]
        if not record.counts:
            record.phase = "unmounting"
        try:
            await self.table.save(record)
        except StateUnwritable:
            record.counts, record.phase = counts, phase  # as the table on disk still says
            raise
        if record.counts:
            crash_point("unmount.after-reference-saved")
            return
        crash_point("unmount.after-unmounting-saved")
        try:
            await self._owned_teardown(record)
        except RbdPluginError:
            if self._intact(record):
                record.phase = "mounted"  # still mounted, unreferenced: a later Mount reuses it
                await self.table.save(record)
            raise
        log.info("volume %s: unmounted and unmapped", volume)

    async def _owned_teardown(self, record: MountRecord) -> None:
        """Run ``_teardown(record)`` to its end as a task of its own.

        The caller waits at most ``teardown_seconds`` (also when it is cancelled: the
        work goes on regardless); past that a Mount or Remove of the volume waits for it as
        long again (:meth:`await_cleaning`), and is refused while it still runs.
        """
        orphaned = asyncio.Event()  # set once no caller waits for the outcome
        retry_now = asyncio.Event()
        task = asyncio.ensure_future(self._teardown_to_the_end(record, orphaned, retry_now))
        self._teardowns[record.volume] = (task, _now(), retry_now)
        task.add_done_callback(lambda done: self._teardown_ended(record.volume, done))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.teardown_seconds)
        except asyncio.CancelledError:
            try:
                with contextlib.suppress(TimeoutError, RbdPluginError):
                    await asyncio.wait_for(asyncio.shield(task), self.teardown_seconds)
            finally:
                orphaned.set()
            raise
        except TimeoutError as exc:
            orphaned.set()
            raise DeadlineExceeded(
                f"volume {record.volume!r}: its clean-up did not finish within "
                f"{self.teardown_seconds:.0f} s; it goes on in the background and the volume "
                "refuses Mounts until it ends"
            ) from exc

    def _teardown_ended(self, volume: str, task: asyncio.Task[None]) -> None:
        running = self._teardowns.get(volume)
        if running is not None and running[0] is task:
            del self._teardowns[volume]
        if not task.cancelled() and task.exception() is not None:
            log.error("volume %s: clean-up failed: %s", volume, task.exception())

    def cleaning(self) -> dict[str, str]:
        """Volumes whose teardown still runs, and since when (for status)."""
        return {v: since for v, (task, since, _) in self._teardowns.items() if not task.done()}

    async def _teardown_to_the_end(
        self, record: MountRecord, orphaned: asyncio.Event, retry_now: asyncio.Event
    ) -> None:
        """``_teardown(record)``, tried again after a failure an outage explains once its
        caller has gone (a caller still waiting gets the error, as before).

        Nothing else would finish it: the Unmount was Docker's last word on the volume.
        Before each new try, tools of the last one still stuck in the kernel (a umount
        flushing to a frozen OSD) must have gone: another try would only join them. A
        Mount or Remove of the volume (``retry_now``) cuts the wait between tries short.
        """
        delay, tries = RETRY_FIRST, 1
        while True:
            try:
                await self._teardown(record)
                if tries > 1:
                    log.info("volume %s: clean-up finished (try %d); unmounted and unmapped",
                             record.volume, tries)  # fmt: skip
                return
            except PASSING_FAILURES as exc:
                if not orphaned.is_set() or self.table.get(record.volume) is not record:
                    raise
                log.warning("volume %s: clean-up failed (%s); trying again in %.0f s, once no "
                            "tool is stuck in the kernel", record.volume, exc, delay)  # fmt: skip
            await stuck_gone()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(retry_now.wait(), delay)
            retry_now.clear()
            delay, tries = min(delay * 2, RETRY_MAX), tries + 1

    async def _teardown(self, record: MountRecord) -> None:
        """Undo whatever stages of ``record`` happened; then forget it (and only it)."""
        with self.metrics.stage("unmount"):
            await self.fs.unmount(Path(record.mountpoint))
        crash_point("unmount.after-umount")
        # Another volume mounted here on the same storage owns that device and claim.
        shared = bool(self._sharing(record))
        if record.device is not None:
            with self.metrics.stage("unmap"):
                await self.attachment.detach(record.device)
        elif not shared:
            await self._detach_unrecorded(record.locator)
        crash_point("unmount.after-unmap")
        with contextlib.suppress(OSError):
            Path(record.mountpoint).rmdir()
        if self.table.get(record.volume) is not record:
            log.error("volume %s: a newer mount record replaced this one; leaving it alone",
                      record.volume)  # fmt: skip
            return
        if not shared:  # only our own claim: after a takeover the claim is someone else's
            with self.metrics.stage("release"):
                await self.attachment.release(record.locator)
        await self.table.drop(record.volume)
        crash_point("unmount.after-record-drop")

    async def _detach_unrecorded(self, locator: Locator) -> None:
        """A device of ``locator`` our crash or roll-back may have left unrecorded; never one
        that is mounted (that is someone's in use, e.g. another client's on this kernel)."""
        leftover = await self.attachment.find(locator)
        if leftover is None:
            return
        users = self.fs.mount_points_of(leftover.path) if leftover.path else []
        if users:
            log.warning("image %s: leaving %s alone: it is mounted at %s",
                        self.attachment.describe(locator), leftover.path,
                        ", ".join(users))  # fmt: skip
            return
        with self.metrics.stage("unmap"):
            await self.attachment.detach(leftover)

    # -- checks --------------------------------------------------------------------------

    async def check(self, volume: str) -> None:
        """Check a mounted volume's device, then (unless lost already) its claim."""
        record = self.table.get(volume)
        if record is None or record.phase != "mounted":
            return
        await self.check_mapping(record)
        if not record.lost:
            await self.check_leases_of(volume)

    async def check_lease(self, record: MountRecord, renew: bool = True) -> None:
        """Notice (once) that another host took this mounted volume over."""
        claimed = await self.attachment.still_claimed(record.locator, renew)
        if claimed or record.lost:
            return
        holder = await self.attachment.claimant(record.locator)
        record.lost = f"{holder} at {_now()}"
        await self.table.save(record)
        self.metrics.leases_lost.labels(self.tenant.name).inc()
        log.error(
            "volume %s: LOST: this host's lease is gone (now held by %s); our access to the image "
            "is fenced and I/O on %s fails. Stop the containers using it here.",
            record.volume, holder, record.mountpoint,
        )  # fmt: skip

    async def check_mapping(self, record: MountRecord) -> None:
        """Notice (once) that a mounted volume's mapping died under it: I/O fails now."""
        if record.device is None or record.broken:
            return
        reason = await self.attachment.broken(record.device)
        if reason is None:
            return
        record.broken = f"{reason} (noticed {_now()})"
        await self.table.save(record)
        log.error(
            "volume %s: BROKEN: %s; I/O on %s fails. Stop the containers using it; the last "
            "Unmount cleans up, and the next Mount maps it afresh",
            record.volume, reason, record.mountpoint,
        )  # fmt: skip

    async def check_leases_of(self, volume: str) -> None:
        record = self.table.get(volume)
        if record is not None and record.phase == "mounted" and not record.lost:
            await self.check_lease(record)

    # -- start-up ------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make the table match the truth after a restart or crash."""
        kept: list[MountRecord] = []
        leftovers: list[MountRecord] = []
        for record in self.table.all():
            intact = record.phase == "mounted" and self._intact(record) and record.counts
            (kept if intact else leftovers).append(record)
        # Mounts that are still there are checked side by side (each waits on Ceph for
        # its lease and presence handle); a hundred of them must not take seconds.
        limit = asyncio.Semaphore(RECONCILE_AT_ONCE)

        async def keep(record: MountRecord) -> None:
            async with limit:
                await self._keep(record)

        await asyncio.gather(*(keep(record) for record in kept))
        for record in leftovers:  # one at a time: they may share storage (companions)
            log.warning("volume %s: cleaning up a %s entry left by a previous run",
                        record.volume, record.phase)  # fmt: skip
            try:
                await self._teardown(record)
            except RbdPluginError as exc:
                log.error("volume %s: could not clean up (%s); will retry on next Mount",
                          record.volume, exc)  # fmt: skip

    async def _keep(self, record: MountRecord) -> None:
        await self.check_mapping(record)
        log.info("volume %s: still mounted at %s for %d reference(s); kept",
                 record.volume, record.mountpoint, record.references)  # fmt: skip
        try:
            # The claim is read now; the new connection's watch on the image (which a
            # mounted image does not need meanwhile: its mapping's own client watches
            # it) is renewed by the first round of lease checks, right after start-up.
            await self.check_lease(record, renew=False)
        except RbdPluginError as exc:
            log.error("volume %s: cannot check its lease yet: %s", record.volume, exc)


@dataclass(frozen=True)
class Growth:
    """What a resize did to a volume mounted here."""

    device: str
    done: bool  # the filesystem grew too; else ``detail`` says why not
    detail: str


def _checked_owner(
    name: str, uid: int | None, gid: int | None, mode: int | None
) -> tuple[int, int, int | None]:
    """Stored uid, gid and mode, checked again; -1 for an id not to change."""
    for key, value in (("uid", uid), ("gid", gid)):
        if value is not None and not 0 <= value <= ROOT_ID_MAX:
            raise InvalidArgument(f"volume {name!r}: {key} {value} is not in 0-{ROOT_ID_MAX}")
    if mode is not None and not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"volume {name!r}: mode {mode:o} is not an octal mode 0000-7777")
    return (-1 if uid is None else uid), (-1 if gid is None else gid), mode


def _chown_chmod(root: Path, uid: int, gid: int, mode: int | None) -> None:
    if uid >= 0 or gid >= 0:
        os.chown(root, uid, gid)
    if mode is not None:  # after chown, which clears set-id bits
        os.chmod(root, mode)


def _grow_refusal(output: str) -> str | None:
    if "Permission denied to resize" in output:
        return (
            "the kernel refused to grow the mounted ext4 filesystem (online resize needs "
            "CAP_SYS_RESOURCE, which the daemon lacks here)"
        )
    return None


def abandon(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` if it still runs; its outcome is not wanted (nor logged as lost)."""
    task.cancel()  # a no-op once it is done
    task.add_done_callback(_consume)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _stored(
    key: str, info: VolumeInfo, check: Callable[[str, T], tuple[str, ...]], value: T
) -> tuple[str, ...]:
    """Options stored with a volume, checked again before use: whoever can write the
    volume's metadata (the tenant's own cephx user) must not reach mkfs or mount with
    what Create would refuse."""
    try:
        return check(info.name, value)
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"{exc}; these {key} are stored with the volume ({info.location}), not in this "
            "request: fix or remove them there"
        ) from exc


# Start-up checks of mounts running at once: as many as a tenant's Ceph threads.
RECONCILE_AT_ONCE = 8

READ_ONLY_OPTIONS = {
    # Never replay a journal on a shared read-only device: that would write to it.
    "ext4": ("ro", "noload"),
    "xfs": ("ro", "norecovery"),
}
