"""Volume back-ends: where a volume lives, and how it reaches this host.

A back-end has two faces, and the code above it never knows which back-end it holds:

- storage, :class:`VolumeBackend`: create, inspect, list and remove volumes (the service);
- attachment, :class:`Attachment`: claim a volume for this host, expose it as a block
  :class:`Device`, find, check and undo that (the generic :class:`~rbdplugin.attach.Attacher`).

:mod:`.rbd` and :mod:`.rbd_attach` are RBD's (images in the tenant's pool through librbd;
a RADOS lease and a mapper); a Cinder back-end (volumes created in Cinder, attached
through Nova, found by udev by their serial) joins later. Back-ends are chosen in one
place, :func:`rbdplugin.daemon.build_backend`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from rbdplugin.errors import RbdPluginError
from rbdplugin.spec import CreateRequest, VolumeSpec, clone_snapshot_prefix

log = logging.getLogger(__name__)

RemoveOutcome = Literal["deleted", "trashed", "kept", "absent"]
# Where a volume's storage is (or how its device is found again), in a back-end's own
# terms: kept in the mount table, read back only by the back-end that wrote it.
Locator = dict[str, str]


@dataclass(frozen=True)
class VolumeInfo:
    """What a back-end knows about one volume."""

    name: str
    spec: VolumeSpec
    location: str  # where it lives, for people: "pool/image" or "pool/ns/image"
    created_at: str = ""
    created_by: str = ""
    # Never formatted by us yet: mkfs may use fast flags (still only after a blank probe).
    fresh: bool = False
    # When our mkfs finished on it ("" if never): such a volume is never formatted again,
    # even if it reads as blank; ``unformat_hint`` says how an operator clears the mark.
    formatted: str = ""
    unformat_hint: str = ""
    # Ceph clients that have the image open (a mapping anywhere shows here), or the
    # servers a Cinder volume is attached to.
    watchers: tuple[str, ...] = ()
    # Their client addresses as Ceph gives them (RBD only), which leases are judged by.
    watcher_addrs: frozenset[str] = frozenset()
    # What Get should say about it beyond its spec (e.g. a size rounded up by Cinder).
    notes: tuple[str, ...] = ()
    snapshots: tuple[str, ...] = ()  # oldest first
    # A clone whose filesystem still has its origin's UUID: the first Mount gives it a
    # new one, so that origin and clone can be mounted side by side.
    renew_uuid: bool = False
    # A clone still reading from its origin's snapshot (False once flattened).
    linked: bool = False


@dataclass(frozen=True)
class Usage:
    volumes: int
    provisioned: int


@dataclass(frozen=True)
class Device:
    """A volume's block device on this host, as the mount table keeps it."""

    path: str  # "" while an attachment is only partly there (found after a crash)
    via: str  # how it reached this host, for people and metrics (e.g. the mapper)
    locator: Locator = field(default_factory=dict)  # enough to find, check and undo it

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "via": self.via, "locator": dict(self.locator)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Device:
        locator = data.get("locator") or {}
        if not isinstance(locator, dict):
            raise ValueError(f"bad device locator in state: {locator!r}")
        return cls(
            str(data["path"]), str(data["via"]), {str(k): str(v) for k, v in locator.items()}
        )


@dataclass(frozen=True)
class Holder:
    """A host's claim on a volume, as Get's Status and Remove show it."""

    host: str
    access: str  # "rw" or "ro"
    since: str
    alive: bool


class VolumeBackend(Protocol):
    async def connect(self) -> None:
        """Reach where volumes live (raises what is wrong); later calls reconnect as needed."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (for metrics; never blocks)."""
        ...

    async def probe(self) -> None:
        """One cheap round trip to where volumes live, for readiness; raises what is wrong."""
        ...

    async def create(self, request: CreateRequest, host_id: str) -> VolumeInfo:
        """Create the volume; :class:`~rbdplugin.errors.Conflict` if the name is taken."""
        ...

    async def adopt(self, request: CreateRequest) -> None:
        """Record a Create's fstype and options on a volume made outside the plugin."""
        ...

    async def inspect(self, name: str, *, watchers: bool = True) -> VolumeInfo:
        """The volume's info; :class:`~rbdplugin.errors.NotFound` if there is none.
        ``watchers=False``: who has it open is not needed (it may cost a round trip)."""
        ...

    async def removed_hint(self, name: str) -> str:
        """How a removed volume ``name`` can be brought back (trash, kept copy), or ""."""
        ...

    async def names(self) -> list[str]:
        """Every volume name, without opening each volume; only names Docker could give
        (:func:`~rbdplugin.spec.is_volume_name`): List shows them unchecked."""
        ...

    async def resize(self, name: str, size: int) -> None:
        """Grow the volume's storage to ``size`` bytes (never shrinks), also while it
        is attached and in use."""
        ...

    async def remove(self, name: str) -> RemoveOutcome:
        """Remove by the tenant's policy; refuse with VolumeBusy while anything uses it."""
        ...

    async def snapshot(self, name: str, snapshot: str) -> None:
        """Take snapshot ``snapshot`` of volume ``name`` (Conflict if the name is taken)."""
        ...

    async def remove_snapshot(self, name: str, snapshot: str) -> None:
        """Delete it; VolumeBusy while clones depend on it, NotFound if there is none."""
        ...

    async def flatten(self, name: str, progress: Callable[[float], None]) -> None:
        """Copy a clone's data from its origin (as long as it takes), then free the
        snapshot made for it; ``progress`` gets the fraction done, from another thread."""
        ...

    async def uuid_renewed(self, name: str) -> None:
        """Record that a clone's filesystem has a UUID of its own now."""
        ...

    async def formatting_started(self, name: str) -> None:
        """Mark that our mkfs is about to run (so an interrupted one can be told apart)."""
        ...

    async def formatting_done(self, name: str) -> None:
        """Clear that mark and the ``fresh`` flag: the volume holds a filesystem now."""
        ...

    async def formatting_interrupted(self, name: str) -> bool:
        """True if our mkfs started on this volume and never finished."""
        ...

    async def ends_unwritten(self, name: str, region: int) -> bool:
        """True only if the first and last ``region`` bytes of the volume were provably
        never written, so they read as zeros (no signature can be there); False when
        that cannot be told without reading the device."""
        ...

    async def usage(self) -> Usage:
        """How many volumes and bytes count against the tenant's quota."""
        ...

    async def close(self) -> None: ...


class Attachment(Protocol):
    """How a back-end's volumes reach this host, and who else may use them meanwhile.

    The :class:`~rbdplugin.attach.Attacher` calls these in this order, recording each
    stage before it starts: ``claim``, ``attach``, (mount), and back: (unmount),
    ``detach``, ``release``. A stage that failed or was cut short by a crash is undone
    from what the record holds: the ``locator`` from :meth:`locate` always, the
    :class:`Device` once ``attach`` returned it (else :meth:`find` looks for it).

    Where :attr:`attach_while_claiming` is true, ``attach`` starts while ``claim`` is
    still under way (it is handed the claim to wait for); nothing writes to the
    storage before both are done, and a failed claim undoes the attach as above.
    """

    @property
    def attach_while_claiming(self) -> bool:
        """True if exposing the storage takes nothing another host's use could need (no
        lock, no attachment elsewhere undone), so it may overlap the claim."""
        ...

    def locate(self, info: VolumeInfo) -> Locator:
        """Where ``info``'s storage is. Volumes with equal locators share it (a source
        and its read-only companions): one host attaches it once."""
        ...

    def describe(self, locator: Locator) -> str:
        """What ``locator`` names, for people, after the word "image" (e.g. ``pool/image``)."""
        ...

    async def claim(self, volume: str, locator: Locator, read_only: bool) -> None:
        """Make this host a user of the storage: the only writer, or one of its readers.
        :class:`~rbdplugin.errors.LeaseConflict` if another host's use forbids it."""
        ...

    async def attach(
        self, info: VolumeInfo, locator: Locator, read_only: bool, claimed: Awaitable[None]
    ) -> Device:
        """Expose the storage here; the returned device is ready for I/O. Anything that
        needs the claim (e.g. joining the device's client to it) waits for ``claimed``,
        which raises if the claim failed."""
        ...

    async def find(self, locator: Locator) -> Device | None:
        """The device of ``locator`` on this host, if any (also a partial one)."""
        ...

    async def detach(self, device: Device) -> None:
        """Undo ``attach``, also a partial one; succeed if it is already gone."""
        ...

    async def release(self, locator: Locator) -> None:
        """Give back this host's claim (never anyone else's)."""
        ...

    async def still_claimed(self, locator: Locator, renew: bool = True) -> bool:
        """True while this host's claim stands (and, if ``renew``, renewing what keeps
        it alive); False once another host took the storage over."""
        ...

    async def claimant(self, locator: Locator) -> str:
        """Who holds the storage now, for people ("nobody" if no one)."""
        ...

    async def broken(self, device: Device) -> str | None:
        """Why ``device`` can no longer serve I/O, or None if it looks healthy."""
        ...

    async def grow(self, device: Device, size: int) -> None:
        """Make ``device`` show ``size`` bytes after its storage grew (while in use)."""
        ...

    def likely_locator(self, name: str) -> Locator | None:
        """The locator volume ``name`` has if it exists and is no companion, when that
        can be told without asking anyone (None if not): Get reads the holders there
        while the volume itself is read."""
        ...

    async def holders(
        self, locator: Locator, watching: Awaitable[set[str]] | None = None
    ) -> list[Holder]:
        """Every host's claim on the storage at ``locator``. ``watching``: the client
        addresses Ceph shows watching it, from a caller that reads them anyway (Get);
        else they are read when a claim needs judging."""
        ...

    def upgrade_record(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A mount-table entry written before back-ends had locators, in today's format
        (an entry in today's format comes back as it is)."""
        ...


async def drop_clone_snapshot(backend: VolumeBackend, name: str, origin: str) -> None:
    """After clone ``name`` is gone (or flattened): the snapshot of its origin that a
    clone-of Create took for it. A user's snapshot (from-snapshot) is theirs to remove."""
    volume, _, snapshot = origin.partition("@")
    if not snapshot.startswith(clone_snapshot_prefix(name)):
        return
    try:
        await backend.remove_snapshot(volume, snapshot)
    except RbdPluginError as exc:  # its origin is gone, or other volumes read from it
        log.info("volume %s: kept snapshot %s of its origin: %s", name, origin, exc)
