"""One writer per image across hosts: leases, liveness, fencing and takeover.

The lease of an image is a small RADOS object, ``rbdplugin.lease.<image>``, in the
image's pool and namespace, holding JSON: at most one read-write *writer* claim
and any number of read-only *reader* claims, each naming a host, since when, and
every Ceph client address that host uses for the image. A host is its ``host_id`` plus
a random UUID made once in its state directory, so two machines that share a
hostname are still two hosts. It is only ever changed
by a version-guarded write (compare-and-swap), so two hosts racing for it cannot
both win.

Liveness comes from Ceph, not from timers of ours: a host that mounts a volume
keeps the image open read-write in its daemon (the *presence* handle, which
never writes), so the image header carries a watch for it; its mapping (krbd,
rbd-nbd, or the FUSE export) adds one more. A claim is alive while any of its
addresses still watches the header. A daemon that crashed while its mapping
lives is therefore still alive (the container still writes), and a host that is
dead, frozen or cut off loses its watches after ``osd_client_watch_timeout``.

Taking over a dead writer's claim fences it first: every address in the claim is
blocklisted (the tenant's own cephx user may do that with ``profile rbd``), so a
frozen host that wakes up cannot write a single byte; then the claim is replaced.
A host learns it lost a volume when its periodic :meth:`Leases.check` finds the
claim gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import rados

from rbdplugin.ceph import CephClient
from rbdplugin.crashpoints import crash_point

# The two lease errors live in the error tree: callers above the back-ends catch them
# without knowing leases.
from rbdplugin.errors import CephUnavailable, CorruptLease, LeaseConflict
from rbdplugin.metrics import Metrics

log = logging.getLogger(__name__)

Mode = Literal["rw", "ro"]
Takeover = Literal["auto", "manual"]
PREFIX = "rbdplugin.lease."
MAX_LEASE_BYTES = 64 * 1024
CAS_ATTEMPTS = 8


@dataclass(frozen=True)
class HostIdentity:
    """Who a host is in leases: its name for people, and a UUID that tells apart two
    machines with the same name (or a reinstalled one)."""

    host: str
    uuid: str


@dataclass
class Claim:
    host: str
    mode: Mode
    since: str
    addrs: list[str] = field(default_factory=list)
    uuid: str = ""

    @property
    def key(self) -> str:
        return self.uuid or self.host

    def belongs_to(self, me: HostIdentity) -> bool:
        return self.host == me.host and self.uuid == me.uuid

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "mode": self.mode, "since": self.since, "addrs": self.addrs,
                "uuid": self.uuid}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claim:
        mode = data["mode"]
        if mode not in ("rw", "ro") or not isinstance(data["host"], str):
            raise ValueError(f"bad claim {data!r}")
        addrs = [str(a) for a in data.get("addrs", [])]
        return cls(data["host"], mode, str(data["since"]), addrs, str(data.get("uuid", "")))


@dataclass
class LeaseDoc:
    writer: Claim | None = None
    readers: dict[str, Claim] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.writer is None and not self.readers

    def claims(self) -> list[Claim]:
        return ([self.writer] if self.writer else []) + list(self.readers.values())

    def claim_of(self, me: HostIdentity) -> Claim | None:
        if self.writer is not None and self.writer.belongs_to(me):
            return self.writer
        return self.readers.get(me.uuid)

    def encode(self) -> bytes:
        data = {
            "writer": self.writer.to_json() if self.writer else None,
            "readers": {h: c.to_json() for h, c in self.readers.items()},
        }
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LeaseDoc:
        """Parse a lease; :class:`ValueError` (or a subclass) if it is not one."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        writer = data.get("writer")
        readers = [Claim.from_json(c) for c in (data.get("readers") or {}).values()]
        return cls(
            writer=Claim.from_json(writer) if writer else None,
            readers={c.key: c for c in readers},
        )


# Turns the lease as read into the lease to write; None leaves it as it is.
Change = Callable[[LeaseDoc], Awaitable[LeaseDoc | None]]


@dataclass(frozen=True)
class Holder:
    """A claim as operators see it (``rbdplugin locks ls``, Get's Status)."""

    image: str
    host: str
    mode: Mode
    since: str
    addrs: tuple[str, ...]
    alive: bool


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def _opened(presence: asyncio.Future[bool]) -> bool:
    """Whether ``presence`` opened a handle that was not open before (waiting for it)."""
    try:
        return await asyncio.shield(presence)
    except Exception:
        return False


def describe(claim: Claim) -> str:
    return f"host {claim.host} (since {claim.since}, from {', '.join(claim.addrs) or 'no address'})"


class Leases:
    """The leases of one tenant, taken with the tenant's own Ceph identity."""

    def __init__(
        self,
        client: CephClient,
        me: HostIdentity,
        takeover: Takeover,
        fence_seconds: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.me = me
        self.takeover = takeover
        self.fence_seconds = fence_seconds

    # -- the lease object ----------------------------------------------------------------

    async def read(self, pool: str, image: str) -> tuple[LeaseDoc, int | None]:
        raw, version = await self._read_raw(pool, image)
        return self._decode(raw, pool, image), version

    async def _read_raw(self, pool: str, image: str) -> tuple[bytes, int | None]:
        def read(ioctx: rados.Ioctx) -> tuple[bytes, int | None]:
            try:
                raw: bytes = ioctx.read(PREFIX + image, MAX_LEASE_BYTES)
            except rados.ObjectNotFound:
                return b"", None
            version: int = ioctx.get_last_version()
            return raw, version

        return await self.client.run_private(
            pool, f"reading the lease of {image!r}", read, reads=True
        )

    def _decode(self, raw: bytes, pool: str, image: str) -> LeaseDoc:
        try:
            return LeaseDoc.decode(raw) if raw else LeaseDoc()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            ns = self.client.tenant.namespace
            where = f"pool {pool}" + (f" namespace {ns}" if ns else "")
            raise CorruptLease(
                f"the lease of image {image!r} (RADOS object {PREFIX}{image} in {where}) is "
                f"corrupt ({type(exc).__name__}: {exc}); nobody can mount it until an operator "
                "checks that no host still uses the volume and runs `rbdplugin locks break "
                "VOLUME` for it"
            ) from exc

    async def _write(self, pool: str, image: str, doc: LeaseDoc, version: int | None) -> bool:
        """Replace the lease if nobody changed it since ``version``; False if someone did."""
        if doc.empty and version is None:
            return True  # no lease object, and none needed

        def write(ioctx: rados.Ioctx) -> bool:
            with rados.WriteOpCtx() as op:
                if version is None:
                    op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                else:
                    op.assert_version(version)
                if doc.empty:
                    op.remove()
                else:
                    op.write_full(doc.encode())
                try:
                    ioctx.operate_write_op(op, PREFIX + image)
                except (rados.ObjectExists, rados.ObjectNotFound):
                    return False
                except rados.Error as exc:
                    if getattr(exc, "errno", None) in (34, 75):  # ERANGE/EOVERFLOW: version moved
                        return False
                    raise
            return True

        return await self.client.run_private(pool, f"updating the lease of {image!r}", write)

    async def _update(
        self, pool: str, image: str, change: Change, corrupt_as_empty: bool = False
    ) -> LeaseDoc:
        """Read, ``await change(doc)`` into a new doc, write it guarded; retry on a race."""
        for _ in range(CAS_ATTEMPTS):
            raw, version = await self._read_raw(pool, image)
            try:
                doc = self._decode(raw, pool, image)
            except CorruptLease as exc:
                if not corrupt_as_empty:
                    raise
                log.warning("%s; replacing it", exc)
                doc = LeaseDoc()
            new = await change(doc)
            if new is None or await self._write(pool, image, new, version):
                return new or doc
        raise LeaseConflict(
            f"the lease of image {image!r} changed {CAS_ATTEMPTS} times while we updated it; retry"
        )

    # -- liveness --------------------------------------------------------------------------

    async def watchers(self, pool: str, image: str) -> set[str]:
        found = await self.client.watchers(pool, image, None, f"reading who has {image!r} open")
        return {str(w["addr"]) for w in found}

    @staticmethod
    def alive(claim: Claim, watchers: set[str]) -> bool:
        return any(addr in watchers for addr in claim.addrs)

    # -- taking and giving back ------------------------------------------------------------

    async def acquire(self, pool: str, image: str, mode: Mode, volume: str) -> None:
        """Claim ``image`` for this host in ``mode``, or raise :class:`LeaseConflict`."""
        # The presence handle opens while the lease is read; it must be up before our
        # claim is written (from then on, other hosts judge us alive by its watch).
        presence = asyncio.ensure_future(self._open_presence(pool, image))
        try:
            own, _ = await self.client.address()

            async def change(doc: LeaseDoc) -> LeaseDoc:
                # Who is alive matters only for claims of other hosts.
                others = [c for c in doc.claims() if not c.belongs_to(self.me)]
                watchers = await self.watchers(pool, image) if others else set()
                new = await self._claim(
                    doc, watchers, own, pool=pool, image=image, mode=mode, volume=volume
                )
                await presence
                crash_point("lease.after-presence")
                return new

            await self._update(pool, image, change)
            crash_point("lease.after-claim")
        except BaseException:
            # A presence handle that was already open serves a mount that is still here.
            if await _opened(presence):
                await self._close_presence(pool, image)
            raise

    async def _claim(
        self, doc: LeaseDoc, watchers: set[str], own: str, *, pool: str, image: str, mode: Mode,
        volume: str,
    ) -> LeaseDoc:  # fmt: skip
        me = self.me
        writer = doc.writer
        if writer is not None and not writer.belongs_to(me):
            if self.alive(writer, watchers):
                raise LeaseConflict(
                    f"volume {volume!r} is mounted read-write on {describe(writer)}; stop the "
                    f"containers using it there first. If that host is dead and its mapping still "
                    f"shows, Ceph drops it within osd_client_watch_timeout and a retry takes over"
                )
            await self._take_over(writer, pool, image, volume)
            writer = None
        readers = {
            k: c for k, c in doc.readers.items() if c.belongs_to(me) or self.alive(c, watchers)
        }
        if mode == "rw":
            if me.uuid in readers:
                raise LeaseConflict(
                    f"volume {volume!r}: this host ({me.host}) has it mounted read-only; "
                    "unmount the read-only companion first"
                )
            if readers:
                hosts = ", ".join(describe(c) for c in readers.values())
                raise LeaseConflict(
                    f"volume {volume!r} is mounted read-only on {hosts}; a read-write mount "
                    "waits until every read-only mount is gone"
                )
            since = writer.since if writer else _now()
            addrs = sorted({*(writer.addrs if writer else []), own})
            return LeaseDoc(writer=Claim(me.host, "rw", since, addrs, me.uuid), readers={})
        if writer is not None:  # our own host holds it read-write
            raise LeaseConflict(
                f"volume {volume!r}: this host ({me.host}) has it mounted read-write; "
                "unmount it before mounting it read-only"
            )
        mine = readers.get(me.uuid)
        readers[me.uuid] = Claim(me.host, "ro", mine.since if mine else _now(),
                                 sorted({*(mine.addrs if mine else []), own}), me.uuid)  # fmt: skip
        return LeaseDoc(writer=None, readers=readers)

    async def _take_over(self, writer: Claim, pool: str, image: str, volume: str) -> None:
        if self.takeover == "manual":
            raise LeaseConflict(
                f"volume {volume!r} was mounted read-write on {describe(writer)}, which no longer "
                "shows as alive; takeover is manual for this driver: check that host is down, "
                f"then run `rbdplugin locks break {volume}` and mount again"
            )
        await self.fence(writer, image)
        crash_point("takeover.after-fence")
        log.warning("volume %s: took over from %s after fencing it", volume, describe(writer))
        if self.metrics is not None:
            self.metrics.takeovers.labels(self.client.tenant.name).inc()

    async def fence(self, claim: Claim, image: str) -> list[str]:
        """Blocklist every address of ``claim`` so that it can never write again."""
        own, _ = await self.client.address()
        fenced = [addr for addr in claim.addrs if addr != own]
        for addr in fenced:
            await self.client.run_cluster(
                f"fencing {addr} of host {claim.host} for image {image!r}",
                lambda cluster, a=addr: cluster.blocklist_add(a, self.fence_seconds),  # type: ignore[misc]
            )
            crash_point("fence.after-blocklist")
        log.warning("image %s: fenced host %s (%s)", image, claim.host, ", ".join(fenced))
        if self.metrics is not None:
            self.metrics.fencings.labels(self.client.tenant.name).inc(len(fenced))
        return fenced

    async def record_mapping(self, pool: str, image: str) -> None:
        """Add the mapping's own client address(es) to our claim, for fencing."""
        own, _ = await self.client.address()
        watchers = await self.watchers(pool, image) - {own}

        async def change(doc: LeaseDoc) -> LeaseDoc | None:
            claim = doc.claim_of(self.me)
            if claim is None or watchers <= set(claim.addrs):
                return None
            claim.addrs = sorted({*claim.addrs, *watchers})
            return doc

        await self._update(pool, image, change)
        crash_point("lease.after-record-mapping")

    async def release(self, pool: str, image: str) -> None:
        """Drop this host's claim (never anyone else's)."""

        async def change(doc: LeaseDoc) -> LeaseDoc | None:
            if doc.claim_of(self.me) is None:
                return None
            if doc.writer is not None and doc.writer.belongs_to(self.me):
                doc.writer = None
            doc.readers.pop(self.me.uuid, None)
            return doc

        try:
            await self._update(pool, image, change)
            crash_point("lease.after-release")
        except CorruptLease as exc:
            # Not ours to repair: the operator must check and break it (the Err of every
            # later Mount says how); the unmount itself is done.
            log.error("%s", exc)
        finally:
            await self._close_presence(pool, image)
        crash_point("lease.after-presence-close")

    async def check(self, pool: str, image: str, renew: bool = True) -> Claim | None:
        """Our claim on ``image`` as it stands in Ceph (None: lost), keeping presence up
        (unless not ``renew``)."""
        doc, _ = await self.read(pool, image)
        claim = doc.claim_of(self.me)
        if claim is None:
            await self._close_presence(pool, image)
            return None
        # A new connection (a restart, or a reset one) watches again.
        if renew and not self.client.keeps_open(pool, image):
            await self._open_presence(pool, image)
            own, _ = await self.client.address()

            async def change(doc: LeaseDoc) -> LeaseDoc | None:
                mine = doc.claim_of(self.me)
                if mine is None or own in mine.addrs:
                    return None
                mine.addrs = sorted({*mine.addrs, own})
                return doc

            await self._update(pool, image, change)
        return claim

    async def holders(
        self, pool: str, image: str, watching: Awaitable[set[str]] | None = None
    ) -> list[Holder]:
        """The claims on ``image``, each judged alive by the watchers: ``watching`` when
        given (read beside the lease by the caller), else read after the lease."""
        doc, _ = await self.read(pool, image)
        if doc.empty:
            return []
        watchers = await (watching or self.watchers(pool, image))
        claims = doc.claims()
        return [
            Holder(image, c.host, c.mode, c.since, tuple(c.addrs), self.alive(c, watchers))
            for c in claims
        ]

    async def break_lease(self, pool: str, image: str) -> list[str]:
        """Fence the writer (alive or not) and clear every claim: ``rbdplugin locks break``."""
        fenced: list[str] = []

        async def change(doc: LeaseDoc) -> LeaseDoc | None:
            if doc.writer is not None:
                fenced.extend(await self.fence(doc.writer, image))
            return LeaseDoc()

        # A corrupt lease names nobody to fence: it is cleared, and the operator was told
        # to check first that no host still uses the volume.
        await self._update(pool, image, change, corrupt_as_empty=True)
        return fenced

    # -- presence handles ------------------------------------------------------------------

    # A presence handle belongs to the connection it was opened on, which closes it
    # before it shuts down: the client keeps it (see CephClient.keep_open).

    async def _open_presence(self, pool: str, image: str) -> bool:
        """Open the presence handle of ``image``; False if it was open already."""
        return await self.client.keep_open(pool, image, f"opening {image!r}")

    async def _close_presence(self, pool: str, image: str) -> None:
        # If the connection is gone, so is the watch, and its shutdown closes the handle.
        with contextlib.suppress(CephUnavailable):
            await self.client.close_kept(pool, image, f"closing {image!r}")
