"""Operator commands on leases: ``rbdplugin locks ls`` and ``rbdplugin locks break``.

They talk to Ceph directly with the tenant's own identity (a dead daemon cannot
answer, and breaking its lock is what these commands are for).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from rbdplugin.backends.rbd import RbdBackend
from rbdplugin.ceph import CephClient
from rbdplugin.config import Config, TenantConfig
from rbdplugin.errors import ConfigError, CorruptLease, NotFound
from rbdplugin.lease import Holder, HostIdentity, Leases


@dataclass(frozen=True)
class VolumeLock:
    driver: str
    volume: str
    holder: Holder


def tenants_for(config: Config, driver: str | None) -> tuple[TenantConfig, ...]:
    """The RBD tenants to look at: leases are RBD's (in Cinder mode, Cinder's attachment
    is the lock: ``openstack volume show`` names the server holding a volume)."""
    rbd = tuple(t for t in config.tenants if t.backend == "rbd")
    if driver is None:
        return rbd
    found = tuple(t for t in rbd if t.driver == driver)
    if not found:
        if any(t.driver == driver for t in config.tenants):
            raise ConfigError(
                f"driver {driver!r} is a Cinder-mode tenant: it has no leases; Cinder's "
                "attachment is its lock (openstack volume show VOLUME names the server)"
            )
        valid = ", ".join(t.driver for t in rbd)
        raise ConfigError(f"no driver {driver!r} in the config; drivers: {valid}")
    return found


@asynccontextmanager
async def _session(
    config: Config, tenant: TenantConfig
) -> AsyncIterator[tuple[RbdBackend, Leases]]:
    # No address_file: an operator's command must never fence the daemon's connection.
    client = CephClient(config.ceph, tenant, deadline=config.daemon.op_timeout)
    operator = HostIdentity(f"{config.daemon.host_id}-operator", "")
    leases = Leases(client, operator, tenant.takeover, config.daemon.fence_seconds)
    try:
        yield RbdBackend(client, tenant), leases
    finally:
        await client.close()


async def list_locks(config: Config, driver: str | None = None) -> list[VolumeLock]:
    found = []
    for tenant in tenants_for(config, driver):
        async with _session(config, tenant) as (backend, leases):
            for name in sorted(await backend.names()):
                try:
                    info = await backend.inspect(name)
                except NotFound:
                    continue  # removed since the listing (or a half-created image): no lock
                if info.spec.source:
                    continue  # a companion's claims live on its source's lease
                try:
                    holders = await leases.holders(info.spec.pool, name)
                except CorruptLease:
                    # Shown, not fatal: `locks break` is how an operator clears it.
                    holders = [Holder(name, "(corrupt lease)", "rw", "", (), False)]
                found += [VolumeLock(tenant.driver, name, holder) for holder in holders]
    return found


async def break_lock(config: Config, tenant: TenantConfig, volume: str) -> list[str]:
    """Fence the writer of ``volume`` and clear its lease; the fenced addresses."""
    async with _session(config, tenant) as (backend, leases):
        info = await backend.inspect(volume)
        image = info.spec.source or volume
        return await leases.break_lease(info.spec.pool, image)


async def holders_of(config: Config, tenant: TenantConfig, volume: str) -> list[Holder]:
    async with _session(config, tenant) as (backend, leases):
        info = await backend.inspect(volume)
        return await leases.holders(info.spec.pool, info.spec.source or volume)
