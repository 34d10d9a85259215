"""Metrics on a fresh registry per test, read back from the exposition as Prometheus
reads it. Counters moved by the real daemon (requests, lease conflicts, takeovers,
fencings, lost leases) are checked against real daemons in
tests/integration/test_observability.py and test_locks.py."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rbdplugin.metrics import Metrics, MountedVolume, Snapshot, StateCollector

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def exposition(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_stage_timer_observes_even_on_failure() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    with metrics.stage("mkfs"):
        pass
    with pytest.raises(RuntimeError), metrics.stage("mkfs"):
        time.sleep(0.05)
        raise RuntimeError("mkfs failed")
    got = exposition(registry)
    assert value(got, "rbdplugin_stage_duration_seconds_count", stage="mkfs") == 2
    # The failed stage's 50 ms are in the sum: it was timed, not just counted.
    total = value(got, "rbdplugin_stage_duration_seconds_sum", stage="mkfs") or 0.0
    assert 0.05 <= total < 5
    assert value(got, "rbdplugin_stage_duration_seconds_bucket", stage="mkfs", le="0.025") == 1
    assert value(got, "rbdplugin_stage_duration_seconds_bucket", stage="mkfs", le="+Inf") == 2
    assert value(got, "rbdplugin_stage_duration_seconds_count", stage="map") == 0


def test_every_stage_is_exported_from_the_start() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    text = generate_latest(registry).decode()
    for stage in ("create", "map", "probe", "mkfs", "mount", "unmount", "unmap", "remove"):
        assert f'rbdplugin_stage_duration_seconds_count{{stage="{stage}"}} 0.0' in text
    assert 'rbdplugin_build_info{version="' in text


def test_state_collector_reads_the_present_at_scrape_time() -> None:
    registry = CollectorRegistry()
    present: list[MountedVolume] = []
    connected = {"alpha": True, "beta": False}
    registry.register(StateCollector(lambda: Snapshot(list(present), ["alpha", "beta"], connected)))
    got = exposition(registry)
    assert value(got, "rbdplugin_volumes_mounted", tenant="alpha") == 0
    assert value(got, "rbdplugin_volumes_mounted", tenant="beta") == 0

    present.append(MountedVolume("alpha", "db", "fuse", 3, 1000, 250))
    present.append(MountedVolume("alpha", "logs", "fuse", 1, None, None))  # statvfs failed
    present.append(MountedVolume("beta", "db", "nbd", 5, 4000, 100))
    got = exposition(registry)
    assert value(got, "rbdplugin_volumes_mounted", tenant="alpha") == 2
    assert value(got, "rbdplugin_volumes_mounted", tenant="beta") == 1
    assert value(got, "rbdplugin_mount_references", tenant="alpha") == 4
    assert value(got, "rbdplugin_mount_references", tenant="beta") == 5
    assert value(got, "rbdplugin_mapped_devices", mapper="fuse") == 2
    assert value(got, "rbdplugin_mapped_devices", mapper="nbd") == 1
    assert value(got, "rbdplugin_volume_fs_used_bytes", tenant="alpha", volume="db") == 250
    assert value(got, "rbdplugin_volume_fs_size_bytes", tenant="alpha", volume="db") == 1000
    assert value(got, "rbdplugin_volume_fs_used_bytes", tenant="beta", volume="db") == 100
    assert value(got, "rbdplugin_volume_fs_used_bytes", tenant="alpha", volume="logs") is None
    assert value(got, "rbdplugin_ceph_connected", tenant="alpha") == 1
    assert value(got, "rbdplugin_ceph_connected", tenant="beta") == 0

    present.clear()
    got = exposition(registry)
    assert value(got, "rbdplugin_volumes_mounted", tenant="alpha") == 0
    assert value(got, "rbdplugin_mount_references", tenant="beta") == 0
    assert value(got, "rbdplugin_volume_fs_used_bytes", tenant="alpha", volume="db") is None
    assert value(got, "rbdplugin_mapped_devices", mapper="fuse") is None


def test_event_loop_tasks_gauge_shows_the_snapshot_count() -> None:
    registry = CollectorRegistry()
    tasks: list[int | None] = [7]
    registry.register(
        StateCollector(lambda: Snapshot([], ["alpha"], {}, event_loop_tasks=tasks[0]))
    )
    assert value(exposition(registry), "rbdplugin_event_loop_tasks") == 7
    tasks[0] = None  # unknown (no running loop): no sample rather than a made-up one
    assert value(exposition(registry), "rbdplugin_event_loop_tasks") is None
