"""The subprocess choke point, with real child processes: output, failures, deadlines."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbdplugin import posix_spawn, process
from rbdplugin.errors import DeadlineExceeded, ProcessError
from rbdplugin.process import (
    KILL_GRACE,
    Command,
    pid_alive,
    reap_spawned,
    redact,
    run,
    run_sync,
    spawn,
    spawn_async,
    stop_pid,
    stuck_children,
)
from tests.helpers import slow_fuse_file

KEY = "AQBkM0hnAAAAABAAm3tnDWFRr8ymYfb5kPJ0vA=="


class Heartbeat:
    """Counts how often the event loop got to run a task due every ``period`` seconds:
    a loop that stood still counts nothing."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            self.ticks += 1


def test_redact_hides_cephx_keys_and_named_secrets() -> None:
    text = f"key = {KEY} password=hunter2"
    assert redact(text, ["hunter2"]) == "key = <redacted> password=<redacted>"


def test_sync_success_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    done = run_sync(Command(["sh", "-c", "echo out; echo err >&2"], timeout=5))
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    assert caplog.records == []


def test_failure_keeps_redacted_output(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ProcessError) as err:
        run_sync(Command(["sh", "-c", f"echo 'bad key {KEY}' >&2; exit 3"], timeout=5))
    assert err.value.returncode == 3
    assert "exit 3" in str(err.value)
    assert KEY not in err.value.output and KEY not in caplog.text
    assert "<redacted>" in err.value.output


def test_missing_program() -> None:
    with pytest.raises(ProcessError, match="not installed"):
        run_sync(Command(["no-such-program-rbdplugin"], timeout=5))


def test_unchecked_failure_returns_code() -> None:
    assert run_sync(Command(["false"], timeout=5, check=False)).returncode == 1


def test_input_is_fed_to_stdin() -> None:
    assert run_sync(Command(["cat"], timeout=5, input="hello")).stdout == "hello"


def test_sync_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not finish within 1 s"):
        run_sync(Command(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=1))
    assert time.monotonic() - started < 10
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild)


def test_async_run_and_timeout() -> None:
    async def scenario() -> None:
        done = await run(Command(["sh", "-c", "echo hi"], timeout=5))
        assert done.stdout == "hi\n"
        with pytest.raises(DeadlineExceeded):
            await run(Command(["sleep", "30"], timeout=0.5))
        with pytest.raises(ProcessError, match="exit 4"):
            await run(Command(["sh", "-c", "exit 4"], timeout=5))

    asyncio.run(scenario())


def test_async_cancel_kills_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    async def scenario() -> None:
        task = asyncio.create_task(
            run(Command(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], timeout=60))
        )
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert not pid_alive(int(pidfile.read_text()))


def test_spawn_and_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    out = tmp_path / "log" / "d.out"
    pid = spawn(["sh", "-c", "echo started; exec sleep 60"], out)
    deadline = time.monotonic() + 5
    while "started" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "started" in out.read_text()
    assert pid_alive(pid)
    assert stop_pid(pid, timeout=5)
    assert not pid_alive(pid)


# On SIGTERM its main thread ends alone (the leader turns zombie) while another thread
# finishes its work, as an export's librbd threads finish their I/O.
_LEADER_FIRST = """
import ctypes, signal, threading, time
threading.Thread(target=time.sleep, args=(0.5,)).start()
signal.signal(signal.SIGTERM, lambda *_: ctypes.CDLL(None).pthread_exit(None))
print("ready", flush=True)
time.sleep(30)
"""


def test_stop_waits_until_the_last_thread_ended_and_reaps(tmp_path: Path) -> None:
    out = tmp_path / "leader.out"
    pid = spawn([sys.executable, "-c", _LEADER_FIRST], out)
    while "ready" not in out.read_text():
        time.sleep(0.02)
    started = time.monotonic()
    assert stop_pid(pid, timeout=5)
    assert time.monotonic() - started > 0.2  # its other thread was still at work
    assert not Path(f"/proc/{pid}").exists()  # and it was reaped: no zombie left


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    pid = spawn(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"],
                tmp_path / "stubborn.out")  # fmt: skip
    while "ready" not in (tmp_path / "stubborn.out").read_text():
        time.sleep(0.02)
    started = time.monotonic()
    assert stop_pid(pid, timeout=0.5)
    assert time.monotonic() - started < 6
    assert not pid_alive(pid)


def test_a_spawned_child_that_dies_on_its_own_is_reaped_when_asked_about(tmp_path: Path) -> None:
    pid = spawn(["sh", "-c", "exit 3"], tmp_path / "short.out")
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + 5
    while stat.exists() and " Z " not in stat.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert " Z " in stat.read_text()  # dead, and nobody waited for it yet
    assert not pid_alive(pid)
    assert not stat.exists()  # reaped: no zombie left behind


def test_a_spawned_child_is_reaped_by_us_only_not_by_the_next_subprocess(tmp_path: Path) -> None:
    # A dropped Popen is put on subprocess's own list, and the next Popen anywhere in the
    # process reaps it: its pid is free for reuse while we still hold it for stop_pid.
    pid = spawn(["sh", "-c", "exit 3"], tmp_path / "quick.out")
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + 5
    while " Z " not in stat.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    subprocess.run(["true"], check=True)
    assert " Z " in stat.read_text()  # still ours to reap
    assert pid in reap_spawned()
    assert not stat.exists()


def test_spawned_children_that_died_unasked_are_reaped_in_one_sweep(tmp_path: Path) -> None:
    # Still running when the next is spawned (which would reap the dead through subprocess).
    pids = [spawn(["sh", "-c", "sleep 0.3"], tmp_path / f"{n}.out") for n in range(3)]
    stats = [Path(f"/proc/{pid}/stat") for pid in pids]
    deadline = time.monotonic() + 5
    while any(" Z " not in s.read_text() for s in stats) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(" Z " in s.read_text() for s in stats)  # zombies until someone reaps them
    assert set(pids) <= set(reap_spawned())
    assert not any(s.exists() for s in stats)
    assert not set(pids) & set(reap_spawned())  # each reaped once


def test_pid_alive_for_missing_pid() -> None:
    assert not pid_alive(2**22 + 12345)
    assert pid_alive(os.getpid())


def test_every_program_runs_with_english_messages(tmp_path: Path) -> None:
    # Tools' messages are parsed ("No such device", "busy"): a German host must not change them.
    german = {**os.environ, "LANG": "de_DE.UTF-8", "LC_ALL": "de_DE.UTF-8", "LC_MESSAGES": "de"}
    probe = ["sh", "-c", "echo $LC_ALL"]
    assert run_sync(Command(probe, timeout=5, env=german)).stdout == "C\n"
    assert asyncio.run(run(Command(probe, timeout=5, env=german))).stdout == "C\n"
    os.environ["LC_ALL"] = "de_DE.UTF-8"  # the daemon's own environment, inherited by default
    try:
        assert run_sync(Command(probe, timeout=5)).stdout == "C\n"
        out = tmp_path / "spawned.out"
        pid = spawn(probe, out)
        while pid_alive(pid):
            time.sleep(0.02)
        assert out.read_text() == "C\n"
    finally:
        del os.environ["LC_ALL"]


@pytest.fixture
def slow_fuse(tmp_path: Path) -> Iterator[Path]:
    with slow_fuse_file(tmp_path / "slow", seconds=8) as path:
        yield path


def test_a_child_stuck_in_the_kernel_is_reported_not_awaited(
    slow_fuse: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader = ["dd", f"if={slow_fuse}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"]

    async def scenario() -> tuple[float, int]:
        async with Heartbeat(0.1) as beat:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="stuck in the kernel") as err:
                await run(Command(reader, timeout=1))
            elapsed = time.monotonic() - started
            assert "did not finish within 1 s" in str(err.value)
            assert stuck_children() == 1
            while stuck_children():  # reaped in the background once the server answers
                await asyncio.sleep(0.1)
        return elapsed, beat.ticks

    elapsed, ticks = asyncio.run(scenario())
    assert elapsed < 1 + KILL_GRACE + 1.5  # not the server's 8 s
    assert ticks >= 10  # the event loop kept running meanwhile
    assert "stuck in the kernel (state D" in caplog.text


# -- starting programs: posix_spawn from a worker thread -----------------------------------


def test_starting_a_program_lets_the_event_loop_run(tmp_path: Path) -> None:
    """exec of a program whose file reads take 2 s: the event loop keeps ticking while the
    spawn waits for it (a fork from the loop, as asyncio's subprocesses do, froze it: 0
    ticks), and the failed exec is a ProcessError saying why."""
    with slow_fuse_file(tmp_path / "slow", seconds=2, writable=True) as program:
        program.chmod(0o755)

        async def scenario() -> tuple[int, float, str]:
            async with Heartbeat(0.01) as beat:
                started = time.monotonic()
                with pytest.raises(ProcessError) as err:
                    await run(Command([str(program)], timeout=30))
                took = time.monotonic() - started
            return beat.ticks, took, str(err.value)

        ticks, took, message = asyncio.run(scenario())
    assert took >= 1.9  # the exec did wait for the slow file
    assert ticks >= 50, f"the event loop stood still while the program started ({ticks} ticks)"
    assert message == f"{program} could not be started: Exec format error"


def test_a_child_has_only_its_pipes_its_own_session_and_default_sigpipe() -> None:
    inherited = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(inherited, True)  # as a library's descriptor without O_CLOEXEC
    script = "ls /proc/$$/fd; echo sid $(cut -d' ' -f6 /proc/$$/stat) pid $$; cat"
    try:
        done = asyncio.run(run(Command(["sh", "-c", script], timeout=10, input="fed\n")))
    finally:
        os.close(inherited)
    lines = done.stdout.splitlines()
    assert sorted(lines[:-2]) == ["0", "1", "2"], done.stdout  # only the three pipes
    _, sid, _, pid = lines[-2].split()
    assert sid == pid  # a session of its own: a timeout kills its whole group
    assert lines[-1] == "fed"
    status = asyncio.run(run(Command(["cat", "/proc/self/status"], timeout=10))).stdout
    ignored = int(next(ln for ln in status.splitlines() if ln.startswith("SigIgn:")).split()[1], 16)
    assert not ignored & (1 << (13 - 1))  # SIGPIPE at its default, not Python's SIG_IGN


def test_spawn_async_logs_to_its_file_and_is_reaped(tmp_path: Path) -> None:
    log_path = tmp_path / "logs" / "child.out"

    async def scenario() -> int:
        return await spawn_async(["sh", "-c", "echo to-out; echo to-err >&2; exit 3"], log_path)

    pid = asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while pid not in reap_spawned():
        assert time.monotonic() < deadline, "the spawned child was never reaped"
        time.sleep(0.02)
    assert log_path.read_text() == "to-out\nto-err\n"
    assert not Path(f"/proc/{pid}").exists() or pid_alive(pid) is False


def test_a_start_cancelled_mid_spawn_is_undone_before_the_cancel_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Mount whose claim fails cancels its mapping; the roll-back then looks for what
    the mapping made. A program still being started when the cancel came must be dead by
    then, or it acts after the roll-back looked (a losetup that attaches a loop device
    nobody detaches). The spawn is slowed at the process boundary (the worker thread's
    call), as a loaded machine slows it."""
    real_spawn = process._spawn
    spawned: list[int] = []

    def slow_spawn(*args: object, **kwargs: object) -> int:
        time.sleep(1.0)
        pid = real_spawn(*args, **kwargs)  # type: ignore[arg-type]
        spawned.append(pid)
        return pid

    monkeypatch.setattr(process, "_spawn", slow_spawn)

    async def scenario() -> tuple[list[int], list[bool]]:
        task = asyncio.create_task(run(Command(["sleep", "30"], timeout=60)))
        await asyncio.sleep(0.2)  # the worker thread is still starting it
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Killed and reaped: its /proc entry is gone (a zombie would still have one).
        return list(spawned), [Path(f"/proc/{pid}").exists() for pid in spawned]

    started, still_there = asyncio.run(scenario())
    assert started, "the cancel returned while its program was still being started"
    assert still_there == [False], f"pid {started} was still there once the cancel returned"


def test_spawn_async_cancelled_mid_spawn_returns_once_the_program_can_be_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FUSE export's start: a roll-back after a cancel finds the export process by
    its command line and stops it, so the cancel waits until the process exists."""
    real_spawn = posix_spawn.spawn
    spawned: list[int] = []

    def slow_spawn(*args: Any, **kwargs: Any) -> int:
        time.sleep(1.0)
        pid: int = real_spawn(*args, **kwargs)
        spawned.append(pid)
        return pid

    monkeypatch.setattr(posix_spawn, "spawn", slow_spawn)

    async def scenario() -> list[int]:
        task = asyncio.create_task(spawn_async(["sleep", "30"], tmp_path / "out.log"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return list(spawned)

    found = asyncio.run(scenario())
    try:
        assert found, "the cancel returned before the export process existed"
        assert pid_alive(found[0])  # there to be found and stopped by the roll-back
    finally:
        for pid in found:
            stop_pid(pid)
        reap_spawned()
