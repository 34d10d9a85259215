"""Operator commands on removed volumes: ``rbdplugin trash ls|restore|purge``.

A tenant whose ``remove_policy`` is ``trash`` moves a removed volume's image into the RBD
trash of its pool (and namespace), deferred by ``trash_delay``: until then librbd itself
refuses to delete it. These commands read and change that trash with the tenant's own
cephx identity, like ``rbdplugin locks``: the tenant's caps, not this code, confine
them to its pools and namespace.

Purge deletes only entries whose deferment has ended and that a user moved to the trash;
entries librbd put there itself (a migration or mirroring in progress, a removal under
way) are never touched. A purged entry's snapshots go with it, and so does the snapshot
a clone-of Create took of its origin; an entry a clone still reads from waits for it.
Restore gives the image back under its name (or a new one) when no volume of the tenant
uses that name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import rados
import rbd

from rbdplugin.backends import rbd_snapshots
from rbdplugin.backends.rbd import RbdBackend
from rbdplugin.backends.rbd_snapshots import ParentSnapshot
from rbdplugin.ceph import CephClient
from rbdplugin.config import Config, TenantConfig
from rbdplugin.errors import ConfigError, Conflict, NotFound, RbdPluginError, VolumeBusy
from rbdplugin.spec import clone_snapshot_prefix, validate_name

# librbd's name for entries moved by `rbd trash mv` / rbd_trash_move: the only ones ours.
USER_SOURCE = "USER"


@dataclass(frozen=True)
class TrashEntry:
    driver: str
    pool: str
    name: str
    image_id: str
    source: str
    deleted_at: datetime
    purgeable_at: datetime

    def purgeable(self, now: datetime) -> bool:
        return self.source == USER_SOURCE and self.purgeable_at <= now


@dataclass
class Purged:
    removed: list[TrashEntry] = field(default_factory=list)
    waiting: list[TrashEntry] = field(default_factory=list)  # deferment not over, or not ours
    failed: list[tuple[TrashEntry, str]] = field(default_factory=list)


def rbd_tenants(config: Config, driver: str | None) -> tuple[TenantConfig, ...]:
    """The tenants whose trash to look at: ``driver``'s, or every RBD tenant's."""
    tenants = tuple(t for t in config.tenants if t.backend == "rbd")
    if driver is None:
        return tenants
    found = tuple(t for t in tenants if t.driver == driver)
    if found:
        return found
    if any(t.driver == driver for t in config.tenants):
        raise ConfigError(
            f"driver {driver!r} is a Cinder-mode tenant: Cinder has no trash (its removed "
            "volumes are deleted or kept, per remove_policy)"
        )
    raise ConfigError(
        f"no driver {driver!r} in the config; drivers: {', '.join(t.driver for t in tenants)}"
    )


def one_tenant(config: Config, driver: str | None) -> TenantConfig:
    tenants = rbd_tenants(config, driver)
    if len(tenants) != 1:
        names = ", ".join(t.driver for t in tenants) or "none"
        raise ConfigError(f"several drivers in the config ({names}): name one with --driver")
    return tenants[0]


@asynccontextmanager
async def _client(config: Config, tenant: TenantConfig) -> AsyncIterator[CephClient]:
    client = CephClient(config.ceph, tenant, deadline=config.daemon.op_timeout)
    try:
        yield client
    finally:
        await client.close()


async def list_trash(config: Config, driver: str | None = None) -> list[TrashEntry]:
    """Every trash entry of the tenants' pools, oldest removal first."""
    found: list[TrashEntry] = []
    for tenant in rbd_tenants(config, driver):
        async with _client(config, tenant) as client:
            found += await _entries(client, tenant)
    return sorted(found, key=lambda e: (e.deleted_at, e.driver, e.name))


async def _entries(client: CephClient, tenant: TenantConfig) -> list[TrashEntry]:
    found: list[TrashEntry] = []
    for pool in tenant.pools:

        def read(ioctx: rados.Ioctx, pool: str = pool) -> list[TrashEntry]:
            return [_entry(tenant.driver, pool, raw) for raw in rbd.RBD().trash_list(ioctx)]

        found += await client.read(pool, "listing the trash", read)
    return found


def _entry(driver: str, pool: str, raw: dict[str, object]) -> TrashEntry:
    return TrashEntry(driver, pool, str(raw["name"]), str(raw["id"]), str(raw["source"]),
                      _utc(raw["deletion_time"]), _utc(raw["deferment_end_time"]))  # fmt: skip


def _utc(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"librbd gave {value!r} for a trash time")
    # The binding's times are naive UTC (utcfromtimestamp).
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def restore(
    config: Config,
    tenant: TenantConfig,
    volume: str,
    image_id: str | None = None,
    new_name: str | None = None,
) -> TrashEntry:
    """Bring the trashed ``volume`` back as ``new_name`` (default: its own name)."""
    target = validate_name(new_name or volume)
    async with _client(config, tenant) as client:
        entry = _pick(volume, image_id, await _entries(client, tenant))
        try:
            existing = await RbdBackend(client, tenant).inspect(target)
        except NotFound:
            pass
        else:
            raise Conflict(
                f"cannot restore {volume!r} (image id {entry.image_id}): volume {target!r} "
                f"exists ({existing.location}); restore under another name with --as NAME"
            )

        def back(ioctx: rados.Ioctx) -> None:
            rbd.RBD().trash_restore(ioctx, entry.image_id, target)

        await client.run(entry.pool, f"restoring {volume!r} as {target!r}", back)
        return entry


def _pick(volume: str, image_id: str | None, entries: Iterable[TrashEntry]) -> TrashEntry:
    named = [e for e in entries if e.name == volume and image_id in (None, e.image_id)]
    if not named:
        which = f" with image id {image_id}" if image_id else ""
        raise NotFound(
            f"volume {volume!r}{which} is not in the trash; `rbdplugin trash ls` shows what is"
        )
    if len(named) > 1:
        ids = ", ".join(f"{e.image_id} (removed {stamp(e.deleted_at)})" for e in named)
        raise Conflict(f"volume {volume!r} is in the trash {len(named)} times: {ids}; "
                       "pick one with --id ID")  # fmt: skip
    return named[0]


async def purge(
    config: Config, driver: str | None = None, dry_run: bool = False, now: datetime | None = None
) -> Purged:
    """Delete the entries whose deferment is over; report the rest."""
    result = Purged()
    for tenant in rbd_tenants(config, driver):
        async with _client(config, tenant) as client:
            when = now or datetime.now(UTC)  # after connecting: what the deletion will see
            due = []
            for entry in await _entries(client, tenant):
                if not entry.purgeable(when):
                    result.waiting.append(entry)
                elif dry_run:
                    result.removed.append(entry)
                else:
                    due.append(entry)
            await _remove_all(client, due, result)
    return result


async def _remove_all(client: CephClient, due: list[TrashEntry], result: Purged) -> None:
    """Purge ``due`` in rounds: an origin whose snapshot a trashed clone reads from can
    go only once that clone is gone, whatever order the trash lists them in."""
    while due:
        blocked: dict[TrashEntry, str] = {}
        for entry in due:
            try:
                await _remove(client, entry)
            except VolumeBusy as exc:
                blocked[entry] = str(exc)
            except RbdPluginError as exc:
                result.failed.append((entry, str(exc)))
            else:
                result.removed.append(entry)
        if len(blocked) == len(due):  # no round frees what the rest wait for
            result.failed += blocked.items()
            return
        due = list(blocked)


async def _remove(client: CephClient, entry: TrashEntry) -> None:
    label = f"{entry.name!r} ({entry.image_id})"

    def remove(ioctx: rados.Ioctx) -> ParentSnapshot | None:
        # Its snapshots went into the trash with it (librbd refuses to delete an image
        # that has any), unless a clone still reads from one.
        parent = rbd_snapshots.clear_for_purge(ioctx, entry.image_id, f"cannot purge {label}")
        # force=False: librbd refuses an entry whose deferment has not ended, whatever
        # our clock says.
        rbd.RBD().trash_remove(ioctx, entry.image_id, force=False)
        return parent

    parent = await client.run(entry.pool, f"purging {label}", remove)
    if parent is not None and parent.snapshot.startswith(clone_snapshot_prefix(entry.name)):
        # The snapshot a clone-of Create took of its origin for it: nobody else's.
        await client.run(
            parent.pool,
            f"dropping snapshot {parent.image}@{parent.snapshot}, taken for clone {entry.name!r}",
            lambda ioctx: rbd_snapshots.drop_if_unread(ioctx, parent),
        )


def stamp(when: datetime) -> str:
    """A trash time as the commands print it (UTC, seconds)."""
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
