"""The cases: each runs ours (through the daemon's socket) and its floor, interleaved.

Every case discards warm-up iterations, then alternates ours and the floor (their
order rotating each iteration, so drift and caches hit both alike), and returns one
:class:`CaseResult` per table row. Work that is not measured (clean-up, set-up) runs
outside the timed regions.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.floors import Hand, HandMapping
from bench.harness import DELETE_TENANT, TENANT, Env
from bench.model import CaseResult
from bench.proc import Footprint, MiB, footprint
from bench.stats import absolute, growth_max, ratio_max, ratio_min
from rbdplugin.ceph import LENS_HANDLES
from rbdplugin.daemon import TRIM_SECONDS
from tests.helpers import PluginClient

GiB = 1024 * MiB


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Counts:
    warmup: int  # cheap cases
    heavy_warmup: int  # cases that map and mount
    create_reps: int
    api_warmup: int
    api_reps: int
    mount_reps: int
    parallel: int
    parallel_reps: int
    remove_reps: int
    big_reps: int
    fio_rounds: int
    fio_size: str
    fio_runtime: int  # seconds per job; 0: one pass over fio_size
    cycles: int
    cycle_workers: int
    cycle_warmup: int  # per worker
    known: int
    mounted: int
    restart_mounts: int
    restart_reps: int
    list_reps: int


FULL = Counts(
    warmup=3, heavy_warmup=1, create_reps=30, api_warmup=30, api_reps=300, mount_reps=8,
    parallel=20, parallel_reps=6, remove_reps=20, big_reps=4, fio_rounds=6, fio_size="256M",
    fio_runtime=3, cycles=1000, cycle_workers=4, cycle_warmup=5, known=1000, mounted=27,
    restart_mounts=100, restart_reps=5, list_reps=50,
)  # fmt: skip
SMOKE = Counts(
    warmup=1, heavy_warmup=0, create_reps=2, api_warmup=2, api_reps=5, mount_reps=1,
    parallel=3, parallel_reps=1, remove_reps=2, big_reps=1, fio_rounds=1, fio_size="8M",
    fio_runtime=0, cycles=4, cycle_workers=2, cycle_warmup=1, known=12, mounted=2,
    restart_mounts=3, restart_reps=1, list_reps=3,
)  # fmt: skip

Side = Callable[[int], float]


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleave(
    warmup: int, reps: int, sides: Sequence[Side], after_warmup: Callable[[], None] | None = None
) -> list[list[float]]:
    """Run each side ``warmup + reps`` times, rotating who goes first; keep the last ``reps``."""
    kept: list[list[float]] = [[] for _ in sides]
    for i in range(warmup + reps):
        if i == warmup and after_warmup is not None:
            after_warmup()
        for k in range(len(sides)):
            j = (i + k) % len(sides)
            seconds = sides[j](i)
            if i >= warmup:
                kept[j].append(seconds)
    return kept


class Cases:
    def __init__(self, env: Env, counts: Counts) -> None:
        self.env = env
        self.n = counts
        self.idle = _connected_idle(env)
        self.listed: list[str] = []

    @property
    def hand(self) -> Hand:
        return self.env.hand(TENANT)

    def _floor_steps(self) -> dict[str, list[float]]:
        steps: dict[str, list[float]] = {}
        for hand in self.env.hands.values():
            for name, values in hand.steps.seconds.items():
                steps.setdefault(name, []).extend(values)
        return steps

    def _clear_steps(self) -> None:
        for hand in self.env.hands.values():
            hand.steps.clear()

    # -- Create ----------------------------------------------------------------------------

    def create(self) -> list[CaseResult]:
        env, hand = self.env, self.hand
        tenant = env.tenants[TENANT]
        cli = [
            "rbd", "create", "--size", "1G", "--image-feature", ",".join(tenant.features),
            "--id", tenant.user, "--keyring", str(tenant.keyring), "-c", str(env.cluster.conf),
        ]  # fmt: skip

        def run_cli(i: int) -> None:
            subprocess.run([*cli, f"{tenant.pool}/b-crc-{i}"], check=True, capture_output=True)

        ours, lib, shell = interleave(self.n.warmup, self.n.create_reps, [
            lambda i: timed(lambda: env.create(f"b-cr-{i}", "1G")),
            lambda i: timed(lambda: hand.create_image(f"b-crl-{i}", GiB)),
            lambda i: timed(lambda: run_cli(i)),
        ])  # fmt: skip
        self._remove_images(hand, [n for n in hand.images() if n.startswith("b-cr")])
        return [
            CaseResult("create", "Create 1 GiB via the socket", "s",
                       "librbd create (same features, same user)", ratio_max(1.3), ours, lib),
            CaseResult("create_cli", "Create 1 GiB via the socket", "s",
                       "`rbd create` CLI", ratio_max(0.125, "≤ 0.125x (≥ 8x faster)"), ours,
                       shell),
        ]  # fmt: skip

    def _remove_images(self, hand: Hand, names: list[str]) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(hand.remove_image, names))

    # -- Get, Capabilities, Path -----------------------------------------------------------

    def api(self) -> list[CaseResult]:
        env = self.env
        env.create("b-get", "1G")
        env.create("b-getm", "1G")
        mount_id, _ = env.mount("b-getm")  # its holders are read and judged too
        bare = env.bare_server()
        bare.start()
        ours_client, bare_client = env.client(), PluginClient(bare.socket)
        calls = [
            ("get", "Get (existing, unmounted)", "VolumeDriver.Get", {"Name": "b-get"},
             absolute(0.002, 0.010, "p50 ≤ 2 ms, p99 ≤ 10 ms")),
            ("get_mounted", "Get (mounted here)", "VolumeDriver.Get", {"Name": "b-getm"},
             absolute(0.002, 0.010, "p50 ≤ 2 ms, p99 ≤ 10 ms")),
            ("capabilities", "Capabilities", "VolumeDriver.Capabilities", {}, ratio_max(1.1)),
            ("path", "Path (unmounted)", "VolumeDriver.Path", {"Name": "b-get"}, ratio_max(1.1)),
        ]  # fmt: skip
        results = []
        for key, title, endpoint, body, target in calls:
            reply = ours_client.call(endpoint, body)
            if reply.get("Err"):
                raise BenchError(f"{endpoint}: {reply['Err']}")

            def call(client: PluginClient, endpoint: str = endpoint, body: object = body) -> float:
                return timed(lambda: client.call(endpoint, body))

            ours, floor = interleave(self.n.api_warmup, self.n.api_reps, [
                lambda _: call(ours_client), lambda _: call(bare_client),
            ])  # fmt: skip
            results.append(CaseResult(key, title, "s", "bare aiohttp handler", target, ours, floor))
        results.append(self._get_cold(ours_client, bare_client))
        bare.stop()
        env.unmount("b-getm", mount_id)
        env.remove("b-getm")
        env.remove("b-get")
        return results

    def _get_cold(self, ours_client: PluginClient, bare_client: PluginClient) -> CaseResult:
        """Get of volumes asked in turn, more of them than the daemon keeps handles for:
        each Get opens its image to list who watches it (see ``LENS_HANDLES``)."""
        names = [f"b-getc-{k}" for k in range(3 * LENS_HANDLES)]
        for name in names:
            self.env.create(name, "1G")

        def call(client: PluginClient, i: int) -> float:
            body = {"Name": names[i % len(names)]}
            return timed(lambda: client.call("VolumeDriver.Get", body))

        ours, floor = interleave(self.n.api_warmup, self.n.api_reps, [
            lambda i: call(ours_client, i), lambda i: call(bare_client, i),
        ])  # fmt: skip
        for name in names:
            self.env.remove(name)
        title = f"Get (existing, unmounted; {len(names)} volumes in turn)"
        target = absolute(0.002, 0.010, "p50 ≤ 2 ms, p99 ≤ 10 ms")
        return CaseResult("get_cold", title, "s", "bare aiohttp handler", target, ours, floor)

    # -- Create + Mount --------------------------------------------------------------------

    def create_mount(self) -> list[CaseResult]:
        env, hand = self.env, self.hand

        def ours(i: int) -> float:
            name = f"b-cm-{i}"
            started = time.perf_counter()
            env.create(name, "10G")
            mount_id, _ = env.mount(name)
            took = time.perf_counter() - started
            env.unmount(name, mount_id)
            env.remove(name)
            return took

        def floor(i: int) -> float:
            name = f"b-cmf-{i}"
            started = time.perf_counter()
            mapping = env.run(hand.create_and_mount(name, 10 * GiB))
            took = time.perf_counter() - started
            env.run(hand.teardown(mapping))
            hand.remove_image(name)
            return took

        mine, hands = interleave(self.n.heavy_warmup, self.n.mount_reps, [ours, floor],
                                 after_warmup=self._clear_steps)  # fmt: skip
        hand.purge_trash()
        return [
            CaseResult("create_mount", "Create + Mount fresh 10 GiB ext4", "s",
                       "by hand: librbd, q-s-d export, losetup, mkfs, mount", ratio_max(1.15),
                       mine, hands, floor_steps=self._floor_steps()),
        ]  # fmt: skip

    def parallel(self) -> list[CaseResult]:
        env, hand, count = self.env, self.hand, self.n.parallel

        def ours(i: int) -> float:
            names = [f"b-par{i}-{k}" for k in range(count)]

            def one(name: str) -> tuple[str, str]:
                env.create(name, "10G")
                return name, env.mount(name)[0]

            with ThreadPoolExecutor(count) as pool:
                started = time.perf_counter()
                done = list(pool.map(one, names))
                took = time.perf_counter() - started
                list(pool.map(lambda nm: _unmount_remove(env, *nm), done))
            return took

        def floor(i: int) -> float:
            names = [f"b-parf{i}-{k}" for k in range(count)]

            async def all_of() -> list[HandMapping]:
                return await asyncio.gather(*(hand.create_and_mount(n, 10 * GiB) for n in names))

            started = time.perf_counter()
            mappings = env.run(all_of())
            took = time.perf_counter() - started
            env.run(_gather(hand.teardown(m) for m in mappings))
            self._remove_images(hand, names)
            return took

        mine, hands = interleave(self.n.heavy_warmup, self.n.parallel_reps, [ours, floor],
                                 after_warmup=self._clear_steps)  # fmt: skip
        hand.purge_trash()
        return [
            CaseResult("parallel", f"{count} volumes Create + Mount in parallel (wall)", "s",
                       f"the same {count} by hand in parallel", ratio_max(1.15), mine, hands,
                       floor_steps=self._floor_steps(), paired=True,
                       notes=[_rounds_note(mine, hands)]),
        ]  # fmt: skip

    # -- Remove ----------------------------------------------------------------------------

    def remove(self) -> list[CaseResult]:
        results = []
        total = self.n.warmup + self.n.remove_reps
        for tenant, policy in ((TENANT, "trash"), (DELETE_TENANT, "delete")):
            env, hand = self.env, self.env.hand(tenant)
            floor_op = hand.trash_image if policy == "trash" else hand.remove_image
            for i in range(total):
                env.create(f"b-rm-{i}", "1G", tenant)
                hand.create_image(f"b-rmf-{i}", GiB)
            ours, floor = interleave(self.n.warmup, self.n.remove_reps, [
                _remover(env, tenant), _floor_remover(floor_op),
            ])  # fmt: skip
            hand.purge_trash()
            floor_name = "librbd trash_move" if policy == "trash" else "librbd remove"
            target = ratio_max(1.3, gating=False)
            results.append(CaseResult(f"remove_{policy}", f"Remove, policy {policy}", "s",
                                      floor_name, target, ours, floor))  # fmt: skip
        return results

    # -- 1 TiB -----------------------------------------------------------------------------

    def big(self) -> list[CaseResult]:
        env = self.env

        def mount_fresh(size: str, name: str) -> float:
            env.create(name, size)
            took = 0.0
            started = time.perf_counter()
            mount_id, _ = env.mount(name)
            took = time.perf_counter() - started
            env.unmount(name, mount_id)
            env.remove(name)
            return took

        big, small = interleave(self.n.heavy_warmup, self.n.big_reps, [
            lambda i: mount_fresh("1T", f"b-big-{i}"), lambda i: mount_fresh("10G", f"b-sml-{i}"),
        ])  # fmt: skip
        self.hand.purge_trash()
        return [CaseResult("mount_1tib", "Mount fresh 1 TiB", "s", "Mount fresh 10 GiB",
                           ratio_max(2.0), big, small)]  # fmt: skip

    # -- data path -------------------------------------------------------------------------

    FIO_JOBS = (
        ("seq_write", "write", "1M"),
        ("seq_read", "read", "1M"),
        ("rand_read", "randread", "4k"),
        ("rand_write", "randwrite", "4k"),
    )

    def datapath(self) -> list[CaseResult]:
        if shutil.which("fio") is None:
            raise BenchError("fio not found: apt-get install -y fio (make setup installs it)")
        env, hand, name = self.env, self.hand, "b-fio"
        env.create(name, "2G")
        mount_id, mountpoint = env.mount(name)
        self._fio(mountpoint, "write", "1M", warm=True)  # lays out the file; warms up
        env.unmount(name, mount_id)
        ours: dict[str, list[float]] = {key: [] for key, _, _ in self.FIO_JOBS}
        floor: dict[str, list[float]] = {key: [] for key, _, _ in self.FIO_JOBS}

        def through_ours() -> None:
            mount_id, mountpoint = env.mount(name)
            for key, rw, bs in self.FIO_JOBS:
                ours[key].append(self._fio(mountpoint, rw, bs))
            env.unmount(name, mount_id)

        def through_hand() -> None:
            mapping = env.run(hand.map(name))
            try:
                env.run(hand.mount(mapping))
                assert mapping.mountpoint is not None
                for key, rw, bs in self.FIO_JOBS:
                    floor[key].append(self._fio(str(mapping.mountpoint), rw, bs))
            finally:
                env.run(hand.teardown(mapping))

        for i in range(self.n.fio_rounds):
            for side in (
                (through_ours, through_hand) if i % 2 == 0 else (through_hand, through_ours)
            ):
                side()
        env.remove(name)
        hand.purge_trash()
        what = f"fio {self.n.fio_size} file, direct, iodepth 16"
        return [
            CaseResult(f"fio_{key}", f"data path {rw} {bs} ({what})", "MiB/s",
                       "hand-made mapping of the same image", ratio_min(0.98), ours[key],
                       floor[key], paired=True, notes=[_rounds_note(ours[key], floor[key])])
            for key, rw, bs in self.FIO_JOBS
        ]  # fmt: skip

    def _fio(self, directory: str, rw: str, bs: str, warm: bool = False) -> float:
        argv = [
            "fio", "--name=bench", f"--filename={directory}/fio.dat", f"--size={self.n.fio_size}",
            f"--rw={rw}", f"--bs={bs}", "--direct=1", "--ioengine=libaio", "--iodepth=16",
            "--output-format=json",
        ]  # fmt: skip
        if self.n.fio_runtime and not warm:
            argv += ["--time_based", f"--runtime={self.n.fio_runtime}", "--ramp_time=1"]
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
        job = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
        direction = "read" if "read" in rw else "write"
        return float(job[direction]["bw_bytes"]) / MiB

    # -- footprint after Mount/Unmount cycles ----------------------------------------------

    def cycles(self) -> list[CaseResult]:
        env, workers = self.env, self.n.cycle_workers
        names = [f"b-cyc-{k}" for k in range(workers)]
        for name in names:
            env.create(name, "1G")
        latencies: list[float] = []

        def cycle(name: str, times: int) -> list[float]:
            took = []
            for _ in range(times):
                started = time.perf_counter()
                mount_id, _ = env.mount(name)
                env.unmount(name, mount_id)
                took.append(time.perf_counter() - started)
            return took

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(cycle, names, [1 + self.n.cycle_warmup] * workers))
            before = _settled(env.pid)
            shares = [self.n.cycles // workers + (k < self.n.cycles % workers)
                      for k in range(workers)]  # fmt: skip
            for took in pool.map(cycle, names, shares):
                latencies += took
            after = _settled(env.pid)
        for name in names:
            env.remove(name)
        self.hand.purge_trash()
        note = (f"{len(latencies)} cycles over {workers} volumes in parallel; Mount+Unmount "
                f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
                f"max {max(latencies) * 1000:.0f} ms")  # fmt: skip
        what = f"after {self.n.cycles} Mount/Unmount cycles"
        return [
            CaseResult("cycles_rss", f"daemon RSS {what}", "MiB", "RSS before (after warm-up)",
                       growth_max(4.0, "growth ≤ 4 MiB"), [f.rss / MiB for f in after],
                       [f.rss / MiB for f in before], notes=[note]),
            CaseResult("cycles_fds", f"daemon fds {what}", "count", "fds before",
                       growth_max(0, "growth 0"), [f.fds for f in after],
                       [f.fds for f in before]),
            CaseResult("cycles_threads", f"daemon threads {what}", "count", "threads before",
                       growth_max(0, "growth 0"), [f.threads for f in after],
                       [f.threads for f in before]),
        ]  # fmt: skip

    # -- many volumes: List and RSS --------------------------------------------------------

    def scale(self) -> list[CaseResult]:
        env = self.env
        names = [f"b-list-{i:05d}" for i in range(self.n.known)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda name: env.create(name, "1G"), names))
            list(pool.map(env.mount, names[: self.n.mounted]))
        client = env.client()
        self.listed = client.names()
        bare = env.bare_server(volumes=len(self.listed))
        bare.start()
        bare_client = PluginClient(bare.socket)
        ours, floor = interleave(self.n.warmup, self.n.list_reps, [
            lambda _: timed(lambda: client.call("VolumeDriver.List", {})),
            lambda _: timed(lambda: bare_client.call("VolumeDriver.List", {})),
        ])  # fmt: skip
        bare.stop()
        time.sleep(0.5)
        rss = [footprint(env.pid).rss / MiB for _ in range(5)]
        return [
            CaseResult("list", f"List of {len(self.listed)} volumes", "s",
                       "bare aiohttp handler, same reply", absolute(0.020, text="p50 ≤ 20 ms"),
                       ours, floor),
            CaseResult("rss_known", f"daemon RSS, {len(self.listed)} volumes known, "
                       f"{self.n.mounted} mounted", "MiB",
                       "the daemon idle, connected to Ceph, no volume yet",
                       absolute(64.0, text="≤ 64 MiB"), rss,
                       [f.rss / MiB for f in self.idle]),
        ]  # fmt: skip

    # -- restart ---------------------------------------------------------------------------

    def restart(self) -> list[CaseResult]:
        env = self.env
        need = max(self.n.restart_mounts - len(env.mounted), 0)
        busy = {volume for _, volume, _ in env.mounted}
        spare = [n for n in self.listed if n.startswith("b-list-") and n not in busy][:need]
        fresh = [f"b-rst-{i}" for i in range(need - len(spare))]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda name: env.create(name, "1G"), fresh))
            list(pool.map(env.mount, spare + fresh))
        mounted = len(env.mounted)
        activated: list[float] = []
        ready: list[float] = []
        floor: list[float] = []

        def ours(_: int) -> float:
            to_socket, to_ready = env.restart_daemon()
            activated.append(to_socket)
            ready.append(to_ready)
            return to_socket

        def bare(_: int) -> float:
            server = env.bare_server()
            took = server.start()
            server.stop()
            return took

        _, floor = interleave(self.n.heavy_warmup, self.n.restart_reps, [ours, bare])
        warm = self.n.heavy_warmup
        activated, ready = activated[warm:], ready[warm:]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda m: env.unmount(m[1], m[2], m[0]), list(env.mounted)))
        return [
            CaseResult("restart_activate", f"restart with {mounted} mounts: exec → Activate",
                       "s", "bare aiohttp server: exec → Activate",
                       absolute(0.5, text="≤ 0.5 s"), activated, floor),
            CaseResult("restart_ready", f"restart with {mounted} mounts: exec → /readyz 200",
                       "s", "bare aiohttp server: exec → Activate",
                       absolute(1.0, text="≤ 1 s"), ready, floor),
        ]  # fmt: skip


def _connected_idle(env: Env) -> list[Footprint]:
    """The daemon's footprint once it is ready (connected to Ceph: librados' threads and
    pages, some 6 MiB more than at Activate) and idle long enough to have trimmed."""
    deadline = time.monotonic() + 30
    while not env.ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(TRIM_SECONDS + 1)
    return [footprint(env.pid) for _ in range(3)]


def _settled(pid: int) -> list[Footprint]:
    time.sleep(0.5)
    samples = []
    for _ in range(5):
        samples.append(footprint(pid))
        time.sleep(0.1)
    return samples


async def _gather(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*coros)


def _unmount_remove(env: Env, name: str, mount_id: str) -> None:
    env.unmount(name, mount_id)
    env.remove(name)


def _floor_remover(op: Callable[[str], None]) -> Side:
    return lambda i: timed(lambda: op(f"b-rmf-{i}"))


def _remover(env: Env, tenant: str) -> Side:
    return lambda i: timed(lambda: env.remove(f"b-rm-{i}", tenant))


def _rounds_note(ours: list[float], floor: list[float]) -> str:
    """Each round's ratio: a paired row's ratio is their median (rounds alternate which
    side goes first, so each pair ran back to back; the machine's drift between rounds,
    e.g. the floor of 20 parallel mounts at 0.79 to 1.04 s across runs, cancels out)."""
    each = ", ".join(f"{o / f:.2f}" for o, f in zip(ours, floor, strict=True) if f)
    return f"per-round ratios (ours / hand-made, back to back): {each}"
