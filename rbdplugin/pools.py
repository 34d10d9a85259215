"""Thread pools that start whole.

A :class:`~concurrent.futures.ThreadPoolExecutor` starts a thread only when a task
finds none idle, up to its size. So a daemon's thread count crept up for hours: by
one whenever a burst first overlapped one more time (asyncio's default pool, the
Ceph pools), which reads like a leak to anyone watching it. Started whole, the
count is fixed from the start.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


def started_pool(size: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose ``size`` threads all run from the start."""
    pool = ThreadPoolExecutor(size, name)
    all_running = threading.Barrier(size)
    for _ in range(size):  # each waits for the others, so none is idle for the next
        pool.submit(all_running.wait)
    return pool
