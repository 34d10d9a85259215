"""Metrics on a fresh registry per test: each one moves with what it measures."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from rbdplugin.metrics import Metrics, MountedVolume, Snapshot, StateCollector


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_stage_timer_observes_even_on_failure() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert value(registry, "rbdplugin_stage_duration_seconds_count", stage="mkfs") == 0
    with metrics.stage("mkfs"):
        time.sleep(0.01)
    with pytest.raises(RuntimeError), metrics.stage("mkfs"):
        raise RuntimeError("mkfs failed")
    assert value(registry, "rbdplugin_stage_duration_seconds_count", stage="mkfs") == 2
    assert value(registry, "rbdplugin_stage_duration_seconds_sum", stage="mkfs") >= 0.01
    assert value(registry, "rbdplugin_stage_duration_seconds_bucket", stage="mkfs", le="0.001") <= 1


def test_every_stage_is_exported_from_the_start() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    text = generate_latest(registry).decode()
    for stage in ("create", "map", "probe", "mkfs", "mount", "unmount", "unmap", "remove"):
        assert f'rbdplugin_stage_duration_seconds_count{{stage="{stage}"}} 0.0' in text
    assert 'rbdplugin_build_info{version="' in text


def test_lease_counters() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.takeovers.labels("alpha").inc()
    metrics.fencings.labels("alpha").inc(2)
    metrics.lock_conflicts.labels("alpha").inc()
    assert value(registry, "rbdplugin_takeovers_total", tenant="alpha") == 1
    assert value(registry, "rbdplugin_fencings_total", tenant="alpha") == 2
    assert value(registry, "rbdplugin_lock_conflicts_total", tenant="alpha") == 1


def test_state_collector_reads_the_present_at_scrape_time() -> None:
    registry = CollectorRegistry()
    present: list[MountedVolume] = []
    connected = {"alpha": True, "beta": False}
    registry.register(StateCollector(lambda: Snapshot(list(present), ["alpha", "beta"], connected)))
    assert value(registry, "rbdplugin_volumes_mounted", tenant="alpha") == 0
    present.append(MountedVolume("alpha", "db", "fuse", 3, 1000, 250))
    present.append(MountedVolume("alpha", "logs", "fuse", 1, None, None))  # statvfs failed
    assert value(registry, "rbdplugin_volumes_mounted", tenant="alpha") == 2
    assert value(registry, "rbdplugin_mount_references", tenant="alpha") == 4
    assert value(registry, "rbdplugin_mapped_devices", mapper="fuse") == 2
    assert value(registry, "rbdplugin_volume_fs_used_bytes", tenant="alpha", volume="db") == 250
    assert value(registry, "rbdplugin_volume_fs_size_bytes", tenant="alpha", volume="db") == 1000
    assert (
        registry.get_sample_value(
            "rbdplugin_volume_fs_used_bytes", {"tenant": "alpha", "volume": "logs"}
        )
        is None
    )
    assert value(registry, "rbdplugin_ceph_connected", tenant="alpha") == 1
    assert value(registry, "rbdplugin_ceph_connected", tenant="beta") == 0
    present.clear()
    assert value(registry, "rbdplugin_volumes_mounted", tenant="alpha") == 0
    assert (
        registry.get_sample_value(
            "rbdplugin_volume_fs_used_bytes", {"tenant": "alpha", "volume": "db"}
        )
        is None
    )
