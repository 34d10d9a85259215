"""Volume back-ends: where a volume's storage lives and how it is created and removed.

The service talks to a :class:`VolumeBackend` and never knows which one it holds:
:mod:`.rbd` (images in the tenant's pool, driven through librbd) today, a Cinder
back-end (volumes created in Cinder and attached through Nova) later. Back-ends
are chosen in one place, :func:`rbdplugin.daemon.build_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from rbdplugin.spec import CreateRequest, VolumeSpec

RemoveOutcome = Literal["deleted", "trashed", "kept", "absent"]


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
    # Ceph clients that have the image open (a mapping anywhere shows here).
    watchers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    volumes: int
    provisioned: int


class VolumeBackend(Protocol):
    async def create(self, request: CreateRequest, host_id: str) -> VolumeInfo:
        """Create the volume; :class:`~rbdplugin.errors.Conflict` if the name is taken."""
        ...

    async def adopt(self, request: CreateRequest) -> None:
        """Record a Create's fstype and options on a volume made outside the plugin."""
        ...

    async def inspect(self, name: str) -> VolumeInfo:
        """The volume's info; :class:`~rbdplugin.errors.NotFound` if there is none."""
        ...

    async def removed_hint(self, name: str) -> str:
        """How a removed volume ``name`` can be brought back (trash, kept copy), or ""."""
        ...

    async def names(self) -> list[str]:
        """Every volume name, without opening each volume."""
        ...

    async def remove(self, name: str) -> RemoveOutcome:
        """Remove by the tenant's policy; refuse with VolumeBusy while anything uses it."""
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

    async def usage(self) -> Usage:
        """How many volumes and bytes count against the tenant's quota."""
        ...

    async def close(self) -> None: ...
