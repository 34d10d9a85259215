"""The daemon's pool for blocking calls runs all its threads from the start."""

from __future__ import annotations

import os
import threading
from concurrent.futures import wait

from rbdplugin.pools import started_pool


def threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


def test_every_thread_runs_at_once_and_a_burst_adds_none() -> None:
    before = threads_now()
    pool = started_pool(5, "t")
    try:
        started = threads_now()
        assert started == before + 5
        # A burst as wide as the pool, each task holding its thread until all run:
        # a lazily grown pool would start threads here.
        gate = threading.Barrier(5)
        wait([pool.submit(gate.wait, 10) for _ in range(5)])
        wait([pool.submit(sum, range(9)) for _ in range(200)])
        assert threads_now() == started
    finally:
        pool.shutdown()
