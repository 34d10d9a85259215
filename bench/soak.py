"""``make soak``: many concurrent Docker-like clients against a real daemon, for minutes.

    .venv/bin/python -m bench.soak                      # 200 clients, 1000 names, 600 s
    .venv/bin/python -m bench.soak --clients 50 --volumes 200 --seconds 45 --warmup 15

A throwaway dev cluster and a real daemon (bench/harness.py: loopback only, the fuse
mapper), and ``--clients`` asyncio clients, each on its own aiohttp connection to the
tenant's socket, mixing every verb (Create, Get, List, Path, Mount, Unmount, Remove,
Capabilities) over a pool of ``--volumes`` names (tenant ``benchdel``, remove policy
delete: no trash piles up). Mounts are real (qemu-storage-daemon export, loop device,
ext4), at most ``--max-mounted`` volumes at a time, each held a few seconds.

Every reply is checked. An ``Err`` is *expected* only when the client-side model of the
pool says the race could produce it over the request's whole flight: Get or Mount of a
name that was not surely there ("does not exist"), Remove of a name that was possibly
mounted ("is mounted"), Create of an existing name with another size ("already exists
... and differs"). A second Mount of a volume another client holds is no error on one
host (one more reference, same mountpoint). Anything else is *unexpected*, and so is a
Mount whose mountpoint is not mounted, a Path that contradicts a settled mount, or a
mount still there after its last Unmount.

Phases: pre-create half the names; warm up for ``--warmup`` s; drain (every client stops
and unmounts) and sample the idle daemon (RSS, fds, threads from /proc; asyncio tasks
from its ``rbdplugin_event_loop_tasks`` gauge); run for ``--seconds`` s, sampling as it
goes; drain and sample the idle daemon again; remove every volume and check nothing
leaked (mounts, loop devices, exports, images, trash) with the system's own tools.

Passes (exit 0) when: no unexpected error; Get and List within their bench targets
(bench/cases.py); idle RSS grew ≤ 8 MiB, and fds, tasks and threads not at all (the
daemon's thread pools start whole, rbdplugin/pools.py, so an idle daemon's thread count
is fixed: one more thread of any name is a leak); nothing leaked. Writes
``<out>/soak-<date>.{json,md}`` (default out: bench/results).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import re
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import DELETE_TENANT, Env
from bench.proc import MiB, footprint
from bench.stats import Summary, Target, absolute
from tests import oracle
from tests.helpers import Admin

RESULTS = Path(__file__).resolve().parent / "results"
ACCEPT = "application/vnd.docker.plugins.v1.2+json"
VERBS = ("Create", "Get", "List", "Path", "Mount", "Unmount", "Remove", "Capabilities")
# The bench's absolute targets (bench/cases.py: api() and scale()); the other verbs are
# judged there against a floor, so here they are reported only.
TARGETS: dict[str, Target] = {
    "Get": absolute(0.002, 0.010, "p50 ≤ 2 ms, p99 ≤ 10 ms"),
    "List": absolute(0.020, text="p50 ≤ 20 ms"),
}
# Weights of the verbs a client picks (Unmount comes when a held mount is due).
MIX = {"Get": 28, "Create": 18, "Path": 14, "Remove": 12, "Capabilities": 10, "Mount": 12,
       "List": 3}  # fmt: skip
OTHER_SIZE = "128M"  # Create of an existing name with this size must conflict
REQUEST_TIMEOUT = 120.0


@dataclass(frozen=True)
class Settings:
    clients: int = 200
    volumes: int = 1000
    seconds: float = 600.0
    warmup: float = 60.0
    max_mounted: int = 20
    size: str = "64M"
    think: float = 1.0  # mean seconds between one client's requests
    hold: tuple[float, float] = (1.0, 5.0)  # seconds a client keeps a mount
    rss_tolerance: float = 8.0  # MiB
    sample_every: float = 5.0
    seed: int = 14


# -- the client-side model of the pool ----------------------------------------------------


@dataclass
class Model:
    """What the clients know of the pool. Single-threaded (one event loop): no locks."""

    size: str
    exists: dict[str, str] = field(default_factory=dict)  # name -> size it was created with
    creating: dict[str, Counter[str]] = field(default_factory=dict)  # sizes in flight
    removing: Counter[str] = field(default_factory=Counter)  # Removes in flight
    removed: Counter[str] = field(default_factory=Counter)  # Removes done (a version)
    # Mount IDs per volume, mounting/mounted/unmounting: a volume with any takes a slot.
    held: dict[str, dict[str, str]] = field(default_factory=dict)
    moved: Counter[str] = field(default_factory=Counter)  # mount changes (a version)
    mountpoints: dict[str, str] = field(default_factory=dict)

    def surely_there(self, name: str) -> bool:
        return name in self.exists and not self.removing[name]

    def sizes_of(self, name: str) -> set[str]:
        sizes = {s for s, n in self.creating.get(name, Counter()).items() if n}
        if name in self.exists:
            sizes.add(self.exists[name])
        return sizes

    def settled_mount(self, name: str) -> bool | None:
        """True: mounted and nothing in flight; False: not held at all; None: moving."""
        states = set(self.held.get(name, {}).values())
        if not states:
            return False
        return True if states == {"mounted"} else None


@dataclass(frozen=True)
class Look:
    """The model's view of one name, taken when a request is sent and when it returns."""

    there: bool
    removed: int
    sizes: frozenset[str]
    held: bool
    moved: int
    settled: bool | None

    @classmethod
    def of(cls, model: Model, name: str) -> Look:
        return cls(
            there=model.surely_there(name), removed=model.removed[name],
            sizes=frozenset(model.sizes_of(name)), held=bool(model.held.get(name)),
            moved=model.moved[name], settled=model.settled_mount(name),
        )  # fmt: skip


# -- the tally ---------------------------------------------------------------------------


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VERBS})
    expected: Counter[str] = field(default_factory=Counter)  # "Verb: kind"
    unexpected: Counter[str] = field(default_factory=Counter)  # "Verb: text"
    examples: list[str] = field(default_factory=list)
    recording: bool = True

    def fail(self, verb: str, text: str) -> None:
        self.unexpected[f"{verb}: {error_shape(text)}"] += 1
        if len(self.examples) < 30:
            self.examples.append(f"{verb}: {text[:400]}")


_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z?")


def error_shape(text: str) -> str:
    """An error text with the volume name and times taken out, to group alike errors."""
    out = []
    for word in _TIME.sub("TIME", text).split():
        out.append("NAME" if "soak-" in word else word)
    return " ".join(out)[:200]


def expected_kind(verb: str, err: str, sent: Look, back: Look, size: str) -> str | None:
    """The expected error ``err`` is, or None if the model says it could not happen."""
    if verb in ("Get", "Mount") and "does not exist" in err:
        surely = sent.there and back.there and sent.removed == back.removed
        return None if surely else "missing volume"
    if verb == "Remove" and "is mounted" in err:
        possibly = sent.held or back.held or sent.moved != back.moved
        return "mounted volume" if possibly else None
    if verb == "Create" and "already exists" in err and "differs" in err:
        other = (sent.sizes | back.sizes) - {size}
        return "existing volume, other size" if other else None
    return None


# -- one client --------------------------------------------------------------------------


class Soak:
    def __init__(self, env: Env, settings: Settings) -> None:
        self.env = env
        self.s = settings
        self.socket = env.socket_dir / f"{DELETE_TENANT}.sock"
        self.names = [f"soak-{i:05d}" for i in range(settings.volumes)]
        self.model = Model(settings.size)
        self.tally = Tally()
        self.samples: list[dict[str, Any]] = []
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        # Every Err text and scrape, kept next to the daemon's log (the test session's
        # secrets scan reads them there).
        self.err_log = env.root / "soak-errors.log"
        self.scrape_log = env.root / "soak-scrapes.txt"

    async def call(
        self, http: aiohttp.ClientSession, verb: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any], float]:
        began = time.perf_counter()
        async with http.post(
            f"http://plugin/VolumeDriver.{verb}", data=json.dumps(body), headers={"Accept": ACCEPT}
        ) as response:
            reply: dict[str, Any] = json.loads(await response.read())
        took = time.perf_counter() - began
        if self.tally.recording:
            self.tally.latencies[verb].append(took)
        return reply, took

    async def checked(
        self, http: aiohttp.ClientSession, verb: str, name: str, body: dict[str, Any],
        size: str = "",
    ) -> dict[str, Any] | None:  # fmt: skip
        """Send; the reply if it has no Err; None after tallying an expected Err."""
        sent = Look.of(self.model, name)
        try:
            reply, _ = await self.call(http, verb, body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.tally.fail(verb, f"no answer: {type(exc).__name__}: {exc}")
            return None
        err = reply.get("Err", "")
        if not err:
            return reply
        with self.err_log.open("a") as fh:
            fh.write(f"{verb} {name}: {err}\n")
        kind = expected_kind(verb, err, sent, Look.of(self.model, name), size)
        if kind is None:
            self.tally.fail(verb, err)
        elif self.tally.recording:
            self.tally.expected[f"{verb}: {kind}"] += 1
        return None

    def session(self, connections: int = 1) -> aiohttp.ClientSession:
        """One client: its own connection (kept alive) to the socket, as a dockerd has."""
        connector = aiohttp.UnixConnector(path=str(self.socket), limit=connections)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        return aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def client(self, index: int) -> None:
        rng = random.Random(self.s.seed * 100_003 + index)  # noqa: S311 (a load, not crypto)
        mine: list[tuple[str, str, float]] = []  # (name, mount ID, due)
        verbs, weights = list(MIX), list(MIX.values())
        async with self.session() as http:
            while not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    pause = rng.expovariate(1 / self.s.think)
                    await asyncio.wait_for(self.stopping.wait(), pause)
                    break
                if mine and mine[0][2] <= time.monotonic():
                    await self.unmount(http, *mine.pop(0)[:2])
                    continue
                verb = rng.choices(verbs, weights)[0]
                if verb == "Mount" and mine:
                    verb = "Get"  # one mount per client at a time
                got = await self.one(http, rng, verb)
                if got is not None:
                    low, high = self.s.hold
                    mine.append((*got, time.monotonic() + rng.uniform(low, high)))
            for name, mount_id, _ in mine:  # drain: give back what this client holds
                await self.unmount(http, name, mount_id)

    async def one(
        self, http: aiohttp.ClientSession, rng: random.Random, verb: str
    ) -> tuple[str, str] | None:
        model = self.model
        existing = list(model.exists)
        if verb == "Mount":
            return await self.mount(http, rng, existing)
        if verb == "Create":
            if existing and rng.random() < 0.1:
                await self.create(http, rng.choice(existing), OTHER_SIZE)
            else:
                await self.create(http, rng.choice(self.names), self.s.size)
        elif verb == "Get":
            pick = rng.choice(existing) if existing and rng.random() < 0.8 else None
            name = pick or rng.choice(self.names)
            await self.checked(http, "Get", name, {"Name": name})
        elif verb == "Remove":
            held = list(model.held)
            name = rng.choice(held) if held and rng.random() < 0.2 else rng.choice(self.names)
            await self.remove(http, name)
        elif verb == "Path":
            held = list(model.held)
            name = rng.choice(held) if held and rng.random() < 0.5 else rng.choice(self.names)
            await self.path(http, name)
        elif verb == "List":
            reply = await self.checked(http, "List", "", {})
            if reply is not None and not isinstance(reply.get("Volumes"), list):
                self.tally.fail("List", f"no Volumes list: {str(reply)[:200]}")
        elif verb == "Capabilities":
            reply = await self.checked(http, "Capabilities", "", {})
            if reply is not None and reply.get("Capabilities") != {"Scope": "global"}:
                self.tally.fail("Capabilities", f"unexpected reply {reply}")
        return None

    async def create(self, http: aiohttp.ClientSession, name: str, size: str) -> None:
        model = self.model
        flying = model.creating.setdefault(name, Counter())
        flying[size] += 1
        try:
            body = {"Name": name, "Opts": {"size": size}}
            reply = await self.checked(http, "Create", name, body, size)
        finally:
            flying[size] -= 1
            if not +flying:
                model.creating.pop(name, None)
        if reply is not None:
            model.exists.setdefault(name, size)

    async def remove(self, http: aiohttp.ClientSession, name: str) -> None:
        model = self.model
        model.removing[name] += 1
        try:
            reply = await self.checked(http, "Remove", name, {"Name": name})
        finally:
            model.removing[name] -= 1
        if reply is not None:
            model.exists.pop(name, None)
            model.removed[name] += 1

    async def path(self, http: aiohttp.ClientSession, name: str) -> None:
        before = Look.of(self.model, name)
        reply = await self.checked(http, "Path", name, {"Name": name})
        after = Look.of(self.model, name)
        if reply is None or before.moved != after.moved or before.settled is None:
            return  # a mount moved meanwhile: either answer is right
        shown = reply.get("Mountpoint")
        want = self.model.mountpoints.get(name, "?") if before.settled else ""
        if shown != want:
            self.tally.fail("Path", f"Mountpoint {shown!r}, the settled mount says {want!r}")

    async def mount(
        self, http: aiohttp.ClientSession, rng: random.Random, existing: list[str]
    ) -> tuple[str, str] | None:
        model = self.model
        held = [n for n in model.held if model.settled_mount(n)]
        if held and rng.random() < 0.3:
            name = rng.choice(held)  # another client's volume: one more reference
        else:
            free = [n for n in existing if n not in model.held and not model.removing[n]]
            if not free or len(model.held) >= self.s.max_mounted:
                return None  # all slots taken: this client passes its turn
            name = rng.choice(free)
        mount_id = uuid.uuid4().hex
        model.held.setdefault(name, {})[mount_id] = "mounting"
        model.moved[name] += 1
        reply = None
        try:
            reply = await self.checked(http, "Mount", name, {"Name": name, "ID": mount_id})
        finally:
            model.moved[name] += 1
            if reply is None:
                self._release(name, mount_id)
        if reply is None:
            return None
        model.held[name][mount_id] = "mounted"
        mountpoint = str(reply.get("Mountpoint", ""))
        if model.mountpoints.setdefault(name, mountpoint) != mountpoint:
            self.tally.fail("Mount", f"mountpoint {mountpoint}, before {model.mountpoints[name]}")
        if not oracle.is_mounted(mountpoint):
            self.tally.fail("Mount", f"{mountpoint} answered but not mounted (mountinfo)")
        return name, mount_id

    def _release(self, name: str, mount_id: str) -> None:
        holders = self.model.held.get(name, {})
        holders.pop(mount_id, None)
        if not holders:
            self.model.held.pop(name, None)

    async def unmount(self, http: aiohttp.ClientSession, name: str, mount_id: str) -> None:
        model = self.model
        model.held[name][mount_id] = "unmounting"
        model.moved[name] += 1
        try:
            reply = await self.checked(http, "Unmount", name, {"Name": name, "ID": mount_id})
        finally:
            self._release(name, mount_id)
            model.moved[name] += 1
        last = name not in model.held
        if reply is not None and last and oracle.is_mounted(model.mountpoints[name]):
            self.tally.fail("Unmount", f"{model.mountpoints[name]} still mounted after the last")

    # -- phases ------------------------------------------------------------------------

    async def run_load(self, seconds: float, phase: str) -> None:
        self.stopping.clear()
        clients = [asyncio.create_task(self.client(i)) for i in range(self.s.clients)]
        sampler = asyncio.create_task(self.sample_while(phase))
        await asyncio.sleep(seconds)
        self.stopping.set()
        await asyncio.gather(*clients)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler

    async def sample_while(self, phase: str) -> None:
        while True:
            self.samples.append(await self.sample(phase))
            await asyncio.sleep(self.s.sample_every)

    async def sample(self, phase: str) -> dict[str, Any]:
        now = footprint(self.env.pid)
        gauges = await self.gauges()
        return {
            "t": round(time.monotonic() - self.started, 1), "phase": phase,
            "rss_mib": round(now.rss / MiB, 2), "fds": now.fds, "threads": now.threads,
            "tasks": gauges.get("rbdplugin_event_loop_tasks"),
            "mounted": gauges.get("rbdplugin_volumes_mounted", 0.0),
            "held": len(self.model.held), "known": len(self.model.exists),
        }  # fmt: skip

    async def gauges(self) -> dict[str, float]:
        """The daemon's gauges (summed over labels), from its /metrics."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.env.metrics_url(), timeout=aiohttp.ClientTimeout(total=10)) as reply,
        ):
            text = await reply.text()
        with self.scrape_log.open("a") as fh:
            fh.write(text)
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.type == "gauge":
                for sample in family.samples:
                    found[sample.name] = found.get(sample.name, 0.0) + sample.value
        return found

    async def idle(self, phase: str) -> dict[str, Any]:
        """The daemon once idle (nothing mounted, tasks steady): median of five samples."""
        deadline = time.monotonic() + 60
        last: float | None = None
        while time.monotonic() < deadline:
            gauges = await self.gauges()
            tasks = gauges.get("rbdplugin_event_loop_tasks")
            if not gauges.get("rbdplugin_volumes_mounted") and tasks == last:
                break
            last = tasks
            await asyncio.sleep(1.0)
        picked = []
        for _ in range(5):
            picked.append(await self.sample(phase))
            await asyncio.sleep(0.2)
        self.samples += picked
        keys = ("rss_mib", "fds", "threads", "tasks")
        idle = {k: sorted(p[k] for p in picked)[2] if picked[0][k] is not None else None
                for k in keys}  # fmt: skip
        return {**idle, "thread_names": thread_names(self.env.pid)}

    async def create_all(self, names: list[str]) -> None:
        limit = asyncio.Semaphore(16)

        async def one(http: aiohttp.ClientSession, name: str) -> None:
            async with limit:
                await self.create(http, name, self.s.size)

        async with self.session(16) as http:
            await asyncio.gather(*(one(http, name) for name in names))

    async def remove_all(self) -> None:
        limit = asyncio.Semaphore(16)

        async def one(http: aiohttp.ClientSession, name: str) -> None:
            async with limit:
                await self.remove(http, name)

        async with self.session(16) as http:
            reply, _ = await self.call(http, "List", {})
            listed = {v["Name"] for v in reply.get("Volumes", [])}
            await asyncio.gather(*(one(http, n) for n in sorted(listed | set(self.model.exists))))


# -- the run -------------------------------------------------------------------------------


@dataclass
class Outcome:
    settings: Settings
    verbs: dict[str, dict[str, Any]]
    expected: dict[str, int]
    unexpected: dict[str, int]
    examples: list[str]
    idle_start: dict[str, Any]
    idle_end: dict[str, Any]
    leaks: dict[str, list[str]]
    samples: list[dict[str, Any]]
    seconds: float
    failures: list[str] = field(default_factory=list)
    log_excerpt: list[str] = field(default_factory=list)  # the daemon on what went wrong

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = not self.failures
        return data


def verb_table(tally: Tally, seconds: float) -> dict[str, dict[str, Any]]:
    table = {}
    for verb in VERBS:
        samples = tally.latencies[verb]
        summary = Summary.of(samples)
        target = TARGETS.get(verb)
        met = target.check(summary, Summary.of([])) if target else None
        table[verb] = {
            "n": summary.n, "per_s": round(summary.n / seconds, 2) if seconds else 0.0,
            "p50_ms": _ms(summary.p50), "p99_ms": _ms(summary.p99), "max_ms": _ms(summary.high),
            "target": target.text if target else "report",
            "verdict": "-" if met is None else ("ok" if met else "MISSED"),
        }  # fmt: skip
    return table


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 2)


def leaks(env: Env, orphans_before: set[str]) -> dict[str, list[str]]:
    """What is left under the soak's directory and in its pool, read by the system's tools.
    A loop device orphaned during the soak (not before it) counts as the soak's: its
    export's path is lost, so it cannot be told from its backing file."""
    inside = f"{env.root}/"
    admin = Admin(env.cluster.conf)
    try:
        pool = env.tenants[DELETE_TENANT].pool
        images, trash = sorted(admin.images(pool)), sorted(admin.trash(pool))
    finally:
        admin.close()
    return {
        "mounts": [e["target"] for e in oracle.mountinfo() if e["target"].startswith(inside)],
        "loops": sorted(
            [d for d, b in oracle.loop_devices().items() if b.startswith(inside)]
            + list(oracle.orphan_loops() - orphans_before)
        ),
        "exports": [str(p) for p in oracle.pids_of_program_with("qemu-storage-daemon", inside)],
        "images": images,
        "trash": trash,
    }


def excerpt(log_text: str, examples: list[str], limit: int = 80) -> list[str]:
    """The daemon's log lines about the volumes of unexpected errors, and its tracebacks."""
    names = {w.strip("'\":,") for e in examples for w in e.split() if "soak-" in w}
    picked = [
        line for line in log_text.splitlines()
        if any(n in line for n in names) or "Traceback" in line or " ERROR " in line
    ]  # fmt: skip
    return picked[-limit:]


def thread_names(pid: int) -> dict[str, int]:
    """The daemon's threads by name (/proc/PID/task/*/comm): Ceph's threads are named,
    Python's show as the interpreter's name."""
    names: Counter[str] = Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/comm") as fh:
            names[fh.read().strip()] += 1
    return dict(sorted(names.items()))


def judge(outcome: Outcome) -> list[str]:
    failures = []
    if outcome.unexpected:
        total = sum(outcome.unexpected.values())
        failures.append(f"{total} unexpected error(s): {dict(outcome.unexpected)}")
    for verb, row in outcome.verbs.items():
        if row["n"] == 0:
            failures.append(f"{verb} never ran")
        if row["verdict"] == "MISSED":
            failures.append(f"{verb} p50 {row['p50_ms']} ms / p99 {row['p99_ms']} ms "
                            f"missed its target ({row['target']})")  # fmt: skip
    start, end = outcome.idle_start, outcome.idle_end
    grew = end["rss_mib"] - start["rss_mib"]
    if grew > outcome.settings.rss_tolerance:
        failures.append(f"idle RSS grew {grew:.1f} MiB (> {outcome.settings.rss_tolerance} MiB): "
                        f"{start['rss_mib']} -> {end['rss_mib']}")  # fmt: skip
    for key in ("fds", "tasks"):
        if start[key] is None or end[key] is None:
            failures.append(f"no {key} figure (rbdplugin_event_loop_tasks missing?)")
        elif end[key] > start[key]:
            failures.append(f"idle {key} grew: {start[key]} -> {end[key]}")
    before, after = start["thread_names"], end["thread_names"]
    more = {n: c - before.get(n, 0) for n, c in after.items() if c > before.get(n, 0)}
    if more or end["threads"] > start["threads"]:
        failures.append(f"idle threads grew: {start['threads']} -> {end['threads']}, "
                        f"more threads named {more}")  # fmt: skip
    for what, left in outcome.leaks.items():
        if left:
            failures.append(f"leaked {what}: {left[:10]}")
    return failures


async def soak(env: Env, settings: Settings, log: Callable[[str], None]) -> Outcome:
    run = Soak(env, settings)
    rng = random.Random(settings.seed)  # noqa: S311
    first = rng.sample(run.names, settings.volumes // 2)
    run.tally.recording = False  # latencies and expected errors count from the load on
    await run.create_all(first)
    log(f"soak: {len(run.model.exists)} volumes created; warming up {settings.warmup:.0f} s")
    await run.run_load(settings.warmup, "warm-up")
    start = await run.idle("idle after warm-up")
    log(f"soak: idle after warm-up {start}; load for {settings.seconds:.0f} s, "
        f"{settings.clients} clients")  # fmt: skip
    # Unexpected errors of the set-up and warm-up count as well.
    run.tally = Tally(unexpected=run.tally.unexpected, examples=run.tally.examples)
    began = time.monotonic()
    await run.run_load(settings.seconds, "load")
    took = time.monotonic() - began
    end = await run.idle("idle at the end")
    log(f"soak: idle at the end {end}; removing every volume")
    await run.remove_all()
    return Outcome(
        settings=settings, verbs=verb_table(run.tally, took), expected=dict(run.tally.expected),
        unexpected=dict(run.tally.unexpected), examples=run.tally.examples, idle_start=start,
        idle_end=end, leaks={}, samples=run.samples, seconds=took,
    )  # fmt: skip


def run_soak(
    settings: Settings, out: Path, root: Path | None = None, keep: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[Outcome, dict[str, Path]]:  # fmt: skip
    """Start a cluster and a daemon, soak, check for leaks, write the report."""
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    env = Env(root)
    log(f"soak: work directory {env.root}")
    orphans_before = oracle.orphan_loops()
    try:
        env.start()
        outcome = env.run(soak(env, settings, log))
        outcome.leaks = leaks(env, orphans_before)
        outcome.failures = judge(outcome)
        log_text = env.daemon.log_path.read_text(errors="replace") if env.daemon else ""
        internal = log_text.count("unexpected error")
        if internal:
            outcome.failures.append(f"the daemon logged {internal} unexpected error(s)")
        outcome.log_excerpt = excerpt(log_text, outcome.examples)
    finally:
        env.close(keep=keep)
    return outcome, write(outcome, out)


def write(outcome: Outcome, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"soak-{datetime.date.today().isoformat()}"
    data = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "cpus": os.cpu_count(), **outcome.to_json()}  # fmt: skip
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    paths["md"].write_text(markdown(outcome, data["date"]))
    return paths


def markdown(outcome: Outcome, date: str) -> str:
    s = outcome.settings
    lines = [
        f"# rbdplugin soak, {date}",
        "",
        f"{s.clients} clients, {s.volumes} names, {outcome.seconds:.0f} s of load after "
        f"{s.warmup:.0f} s of warm-up; at most {s.max_mounted} mounted, {s.size} volumes, "
        f"think time {s.think} s. Verdict: **{'PASS' if not outcome.failures else 'FAIL'}**",
        "",
        "| verb | n | per s | p50 | p99 | max | target | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for verb, row in outcome.verbs.items():
        lines.append(f"| {verb} | {row['n']} | {row['per_s']} | {row['p50_ms']} ms | "
                     f"{row['p99_ms']} ms | {row['max_ms']} ms | {row['target']} | "
                     f"{row['verdict']} |")  # fmt: skip
    start, end = outcome.idle_start, outcome.idle_end
    lines += ["", "| idle daemon | after warm-up | at the end |", "|---|---|---|"]
    lines += [f"| {key} | {start[key]} | {end[key]} |" for key in start if key != "thread_names"]
    left = {k: v for k, v in outcome.leaks.items() if v}
    lines += ["", f"Expected errors: {outcome.expected or 'none'}",
              f"Unexpected errors: {outcome.unexpected or 'none'}",
              f"Leaks after clean-up: {left or 'none'}"]  # fmt: skip
    if outcome.failures:
        lines += ["", "Failures:", *(f"- {f}" for f in outcome.failures)]
    if outcome.log_excerpt:
        lines += ["", "The daemon's log on them:", "", "```", *outcome.log_excerpt, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--volumes", type=int, default=1000, help="names in the pool")
    parser.add_argument("--seconds", type=float, default=600, help="seconds of measured load")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up (default: 10%%, ≤ 60)")
    parser.add_argument("--max-mounted", type=int, default=20)
    parser.add_argument("--size", default="64M")
    parser.add_argument("--think", type=float, default=1.0, help="mean pause per client (s)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(60.0, max(10.0, args.seconds / 10))
    settings = Settings(
        clients=args.clients, volumes=args.volumes, seconds=args.seconds, warmup=warmup,
        max_mounted=args.max_mounted, size=args.size, think=args.think, seed=args.seed,
    )  # fmt: skip
    outcome, paths = run_soak(settings, args.out, keep=args.keep,
                              log=lambda m: print(m, flush=True))  # fmt: skip
    print(paths["md"].read_text())
    print(f"soak: wrote {paths['json']}, {paths['md']}")
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
