"""The tenant's Ceph client on the real cluster: short reads (Get, List, leases, who
watches) are never queued behind changes that fill the pool for seconds (deleting big
images), so `docker volume inspect` answers while eight Removes run; and the client
address it gives is always that of the connection in use."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
import rados
import rbd

from rbdplugin.ceph import THREADS_PER_TENANT, CephClient
from rbdplugin.config import CephConfig, TenantConfig
from rbdplugin.devcluster import DevCluster
from rbdplugin.errors import CephUnavailable
from rbdplugin.rbdheader import lookup_id
from tests.helpers import Admin, unique

POOL = "alpha"


def _client(cluster: DevCluster) -> CephClient:
    tenant = TenantConfig(POOL, "rbd", POOL, "", POOL, cluster.keyring(POOL))
    return CephClient(CephConfig(cluster.conf), tenant, deadline=30)


def _held(started: threading.Semaphore, release: threading.Event) -> Callable[[rados.Ioctx], int]:
    """A change that holds its thread until released, as a long delete does."""

    def change(ioctx: rados.Ioctx) -> int:
        started.release()
        release.wait(60)
        return 0

    return change


def test_reads_are_answered_while_slow_changes_fill_the_pool(
    cluster: DevCluster, admin: Admin
) -> None:
    name = unique("lane")
    with admin.cluster.open_ioctx(POOL) as ioctx:
        rbd.RBD().create(ioctx, name, 64 << 20, old_format=False)
        with rbd.Image(ioctx, name, read_only=True) as image:
            image_id = image.id()
    started, release = threading.Semaphore(0), threading.Event()

    async def scenario() -> tuple[str | None, list[dict[str, object]], bool, bool]:
        client = _client(cluster)
        try:
            change = _held(started, release)
            # One more change than the pool has threads: the last one waits its turn.
            changes = [
                asyncio.ensure_future(client.run(POOL, "a slow change", change))
                for _ in range(THREADS_PER_TENANT + 1)
            ]
            for _ in range(THREADS_PER_TENANT):
                assert await asyncio.to_thread(started.acquire, timeout=30), "a change not started"
            queued = not started.acquire(timeout=0.5)  # the pool is full: the ninth waits
            try:
                found = await asyncio.wait_for(
                    client.read(POOL, "looking it up", lambda io: lookup_id(io, name)), 20
                )
                watching = await asyncio.wait_for(
                    client.watchers(POOL, name, None, "asking who watches it"), 20
                )
            except TimeoutError as exc:
                raise AssertionError("a read waited 20 s behind the held changes") from exc
            held = not any(task.done() for task in changes)
            release.set()
            await asyncio.gather(*changes)
            return found, watching, queued, held
        finally:
            release.set()
            await client.close()

    try:
        found, watching, queued, held = asyncio.run(scenario())
    finally:
        with admin.cluster.open_ioctx(POOL) as ioctx:
            rbd.RBD().remove(ioctx, name)
    assert queued, "the changes did not fill the pool, so the test proves nothing"
    assert found == image_id
    assert watching == []
    assert held, "the reads were answered only once a change had ended"


def test_our_address_is_that_of_the_connection_in_use(cluster: DevCluster, admin: Admin) -> None:
    """Read once per connection: after a fencing (a blocklisting) the client reconnects,
    and the address it gives (for leases and fencing) is the one Ceph sees watching."""
    name = unique("addr")
    with admin.cluster.open_ioctx(POOL) as ioctx:
        rbd.RBD().create(ioctx, name, 64 << 20, old_format=False)

    def watching() -> list[str]:
        with admin.cluster.open_ioctx(POOL) as ioctx, rbd.Image(ioctx, name, read_only=True) as im:
            return [str(w["addr"]) for w in im.watchers_list()]

    async def scenario() -> tuple[str, str, list[str]]:
        client = _client(cluster)
        try:
            first, _ = await client.address()
            assert await client.address() == (first, _)
            admin.cluster.blocklist_add(first, 120)  # as another host's takeover does
            with pytest.raises(CephUnavailable):
                await client.read(POOL, "looking it up", lambda io: lookup_id(io, name))
            await client.keep_open(POOL, name, "keeping it open")  # on a new connection
            second, _ = await client.address()
            return first, second, watching()
        finally:
            await client.close()

    try:
        first, second, seen = asyncio.run(scenario())
    finally:
        with admin.cluster.open_ioctx(POOL) as ioctx:
            rbd.RBD().remove(ioctx, name)
    assert second != first, "the address of the fenced connection was given again"
    assert seen == [second]
