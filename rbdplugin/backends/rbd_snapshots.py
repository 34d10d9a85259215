"""Snapshots of RBD volumes and copy-on-write clones made from them (librbd, blocking:
run in the Ceph client's thread pool).

A clone is made from a protected snapshot (clone format 1: every Ceph release and
``require_min_compat_client`` accepts it), so librbd itself refuses to delete a
snapshot that clones still read from. Snapshot operations on an image another client
has open for writing are carried out by that client (librbd asks the lock owner), as
for ``rbd snap create``; a kernel mapping made with ``exclusive`` does not take such
requests, so they fail there with EROFS, which :func:`translate_lock` explains (rbd-nbd's
librbd, even with ``--exclusive``, carries them out).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

import rados
import rbd

from rbdplugin.errors import InvalidArgument, NotFound, RbdPluginError, VolumeBusy


def take(ioctx: rados.Ioctx, volume: str, snapshot: str) -> None:
    with rbd.Image(ioctx, volume) as image:
        image.create_snap(snapshot)


def remove(ioctx: rados.Ioctx, volume: str, snapshot: str) -> None:
    with rbd.Image(ioctx, volume) as image:
        if snapshot not in names(image):
            raise NotFound(f"volume {volume!r} has no snapshot {snapshot!r}{_listing(image)}")
        if image.is_protected_snap(snapshot):
            image.set_snap(snapshot)
            children = [f"{pool}/{child}" for pool, child in image.list_children()]
            image.set_snap(None)
            if children:
                raise VolumeBusy(
                    f"snapshot {volume}@{snapshot} has clones that read from it: "
                    f"{', '.join(children)}; remove those volumes first"
                )
            image.unprotect_snap(snapshot)
        image.remove_snap(snapshot)


@dataclass(frozen=True)
class ParentSnapshot:
    """The snapshot a clone reads from, wherever its image is (live or in the trash)."""

    pool: str
    image_id: str
    image: str
    snapshot: str


def clear_for_purge(ioctx: rados.Ioctx, image_id: str, label: str) -> ParentSnapshot | None:
    """Before the trashed image ``image_id`` is purged: remove its snapshots (they went
    into the trash with it), unless a clone still reads from one, which refuses the
    whole purge of it before anything is removed; its parent snapshot if it is a clone."""
    with rbd.Image(ioctx, image_id=image_id) as image:
        snapshots = names(image)
        readers = {snap: _clones_of(image, snap) for snap in snapshots}
        busy = [f"{snap} (read by {', '.join(c)})" for snap, c in readers.items() if c]
        if busy:
            raise VolumeBusy(
                f"{label}: clones still read from its snapshots: {'; '.join(busy)}; "
                "remove or flatten those volumes (a clone in the trash goes first when its "
                "own delay is over)"
            )
        for snap in snapshots:
            if image.is_protected_snap(snap):
                image.unprotect_snap(snap)
            image.remove_snap(snap)
        try:
            parent = image.get_parent_image_spec()  # (its keys hold no image id here)
            parent_id = image.parent_id()
        except rbd.ImageNotFound:  # not a clone (or flattened)
            return None
    return ParentSnapshot(
        str(parent["pool_name"]), parent_id, str(parent["image_name"]), str(parent["snap_name"])
    )


def drop_if_unread(ioctx: rados.Ioctx, parent: ParentSnapshot) -> bool:
    """Remove ``parent``'s snapshot once no clone reads from it; False if one still does.
    Its image may be live or in the trash: it is opened by id."""
    with rbd.Image(ioctx, image_id=parent.image_id) as image:
        if parent.snapshot not in names(image):
            return True
        if _clones_of(image, parent.snapshot):
            return False
        if image.is_protected_snap(parent.snapshot):
            image.unprotect_snap(parent.snapshot)
        image.remove_snap(parent.snapshot)
    return True


def _clones_of(image: rbd.Image, snapshot: str) -> list[str]:
    """The clones reading from ``snapshot``, those in the trash included (they hold it)."""
    image.set_snap(snapshot)
    try:
        return [f"{c['pool']}/{c['image']}{' (in the trash)' if c['trash'] else ''}"
                for c in image.list_children2()]  # fmt: skip
    finally:
        image.set_snap(None)


def clone(
    origin: rados.Ioctx,
    volume: str,
    snapshot: str,
    target: rados.Ioctx,
    name: str,
    *,
    features: int,
    size: int | None,
) -> int:
    """Clone ``volume@snapshot`` as image ``name``; its size, at least the snapshot's."""
    with rbd.Image(origin, volume) as image:
        sizes = {s["name"]: int(s["size"]) for s in image.list_snaps()}
        if snapshot not in sizes:
            raise NotFound(
                f"volume {name!r}: volume {volume!r} has no snapshot {snapshot!r}{_listing(image)}"
            )
        if size is not None and size < sizes[snapshot]:
            raise InvalidArgument(
                f"volume {name!r}: size {size} bytes is smaller than snapshot "
                f"{volume}@{snapshot} ({sizes[snapshot]} bytes); a clone is at least as large"
            )
        if not image.is_protected_snap(snapshot):
            image.protect_snap(snapshot)
    rbd.RBD().clone(origin, volume, snapshot, target, name, features=features)
    if size is not None and size > sizes[snapshot]:
        with rbd.Image(target, name) as made:
            made.resize(size)
    return size or sizes[snapshot]


def flatten(ioctx: rados.Ioctx, name: str, progress: Callable[[float], None]) -> None:
    def report(done: int, total: int) -> int:
        progress(done / total if total else 1.0)
        return 0

    with rbd.Image(ioctx, name) as image:
        image.flatten(on_progress=report)


def names(image: rbd.Image) -> list[str]:
    return [s["name"] for s in image.list_snaps()]


def _listing(image: rbd.Image) -> str:
    found = names(image)
    return f"; it has: {', '.join(found)}" if found else "; it has none"


def translate_lock(
    exc: RbdPluginError,
    volume: str,
    request: str = "snapshot",
    advice: str = "unmount it first, or use the nbd or fuse mapper for volumes you snapshot live",
) -> RbdPluginError:
    """An operation refused (EROFS) because krbd maps the image with ``exclusive``: the
    kernel carries out no request of another client and keeps its lock."""
    cause = exc.__cause__
    if getattr(cause, "errno", None) == errno.EROFS:
        return VolumeBusy(
            f"volume {volume!r}: its image is mapped exclusively by krbd (the kernel "
            f"client's exclusive option), which does not take {request} requests from other "
            f"clients; {advice}"
        )
    return exc
