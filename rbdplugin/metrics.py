"""Prometheus metrics of the daemon, on an injected registry.

Counters and histograms are updated where the work happens (requests, stages,
leases). What describes the present (volumes mounted, mapped devices, filesystem
use, Ceph connections) is computed at scrape time by :class:`StateCollector`, not
kept in counters that could drift. Label values are bounded: drivers, tenants,
endpoints, stages, reasons, and the names of volumes mounted on this host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rbdplugin import __version__

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# inspect: reading a volume's info; claim and release: its lease; mark: our mkfs's
# progress marks; reconcile: the whole start-up check of the mount table.
STAGES = (
    "create", "inspect", "claim", "map", "probe", "mark", "mkfs", "mount", "unmount", "unmap",
    "release", "remove", "reconcile", "snapshot", "uuid", "fsck",
)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "rbdplugin_requests", "Docker plugin API requests by driver, endpoint and outcome",
            ["driver", "endpoint", "outcome"], registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "rbdplugin_request_duration_seconds", "Time to answer a Docker plugin API request",
            ["endpoint"], buckets=STAGE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "rbdplugin_stage_duration_seconds", "Time of each stage of volume work",
            ["stage"], buckets=STAGE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.errors = Counter(
            "rbdplugin_errors",
            "Errors answered to Docker, by reason",
            ["reason"],
            registry=registry,
        )
        self.lock_conflicts = Counter(
            "rbdplugin_lock_conflicts", "Mounts refused because another host holds the volume",
            ["tenant"], registry=registry,
        )  # fmt: skip
        self.takeovers = Counter(
            "rbdplugin_takeovers", "Volumes taken over from a dead or frozen host", ["tenant"],
            registry=registry,
        )  # fmt: skip
        self.fencings = Counter(
            "rbdplugin_fencings", "Ceph client addresses blocklisted (fenced)", ["tenant"],
            registry=registry,
        )  # fmt: skip
        self.leases_lost = Counter(
            "rbdplugin_leases_lost", "Volumes this host found taken over by another host",
            ["tenant"], registry=registry,
        )  # fmt: skip
        build = Gauge("rbdplugin_build_info", "rbdplugin version", ["version"], registry=registry)
        build.labels(__version__).set(1)
        for stage in STAGES:  # export every stage from the start, at zero
            self.stage_seconds.labels(stage)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - started)


@dataclass(frozen=True)
class MountedVolume:
    tenant: str
    volume: str
    mapper: str
    references: int
    fs_size: int | None
    fs_used: int | None
    broken: bool = False


@dataclass(frozen=True)
class Snapshot:
    """What the daemon has right now, for one scrape."""

    mounted: list[MountedVolume]
    tenants: list[str]
    ceph_connected: dict[str, bool]  # RBD tenants: their Ceph connection
    # Cinder tenants: whether their last call reached Keystone and Cinder.
    openstack_connected: dict[str, bool] = field(default_factory=dict)
    # The daemon's asyncio tasks at scrape time (None: not known, no running loop).
    event_loop_tasks: int | None = None


class StateCollector(Collector):
    """Computes the present-state metrics at scrape time from ``snapshot()``."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot()
        mounted = GaugeMetricFamily("rbdplugin_volumes_mounted", "Volumes mounted on this host",
                                    labels=["tenant"])  # fmt: skip
        refs = GaugeMetricFamily("rbdplugin_mount_references",
                                 "Docker mount references (per ID counts) held",
                                 labels=["tenant"])  # fmt: skip
        mapped = GaugeMetricFamily("rbdplugin_mapped_devices", "Block devices mapped, per mapper",
                                   labels=["mapper"])  # fmt: skip
        size = GaugeMetricFamily("rbdplugin_volume_fs_size_bytes",
                                 "Size of a mounted volume's filesystem",
                                 labels=["tenant", "volume"])  # fmt: skip
        used = GaugeMetricFamily("rbdplugin_volume_fs_used_bytes",
                                 "Bytes used in a mounted volume's filesystem",
                                 labels=["tenant", "volume"])  # fmt: skip
        broken = GaugeMetricFamily("rbdplugin_volume_broken",
                                   "1 if a mounted volume's mapping died under it (I/O fails)",
                                   labels=["tenant", "volume"])  # fmt: skip
        ceph = GaugeMetricFamily("rbdplugin_ceph_connected",
                                 "1 if the tenant's Ceph connection is up",
                                 labels=["tenant"])  # fmt: skip
        openstack = GaugeMetricFamily("rbdplugin_openstack_connected",
                                      "1 if a Cinder-mode tenant's last call reached OpenStack",
                                      labels=["tenant"])  # fmt: skip
        tasks = GaugeMetricFamily("rbdplugin_event_loop_tasks",
                                  "asyncio tasks alive in the daemon's event loop")  # fmt: skip
        if snap.event_loop_tasks is not None:
            tasks.add_metric([], snap.event_loop_tasks)
        per_mapper: dict[str, int] = {}
        for tenant in snap.tenants:
            mine = [m for m in snap.mounted if m.tenant == tenant]
            mounted.add_metric([tenant], len(mine))
            refs.add_metric([tenant], sum(m.references for m in mine))
            if tenant in snap.openstack_connected:
                openstack.add_metric([tenant], 1 if snap.openstack_connected[tenant] else 0)
            else:
                ceph.add_metric([tenant], 1 if snap.ceph_connected.get(tenant) else 0)
        for m in snap.mounted:
            per_mapper[m.mapper] = per_mapper.get(m.mapper, 0) + 1
            broken.add_metric([m.tenant, m.volume], 1 if m.broken else 0)
            if m.fs_size is not None and m.fs_used is not None:
                size.add_metric([m.tenant, m.volume], m.fs_size)
                used.add_metric([m.tenant, m.volume], m.fs_used)
        for mapper, count in sorted(per_mapper.items()):
            mapped.add_metric([mapper], count)
        yield from (mounted, refs, mapped, size, used, broken, ceph, openstack, tasks)
