"""The one place rbdplugin runs other programs.

Quiet on success, the full (redacted) output on failure, every call under a
deadline, and on timeout the child's whole process group is killed. A child that
survives SIGKILL (stuck in the kernel, e.g. I/O to a dead cluster) is reported and
left to a background reaper: the caller still gets its error at the deadline.
Every program runs with ``LC_ALL=C`` because callers parse its messages.
Callers that must be testable take a :class:`Runner` and tests hand in a fake at
this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Protocol

from rbdplugin import posix_spawn
from rbdplugin.errors import DeadlineExceeded, ProcessError

log = logging.getLogger(__name__)

# cephx keys are base64 of 28 bytes (40 chars, '==' padded); never let one reach a log.
_KEY_RE = re.compile(r"[A-Za-z0-9+/]{38}==")
OUTPUT_TAIL = 2000
# How long a SIGKILLed child may take to go; longer means it is stuck in the kernel.
KILL_GRACE = 3.0
# Killed children still stuck in the kernel, reaped in the background when they go.
_abandoned: set[asyncio.Task[int]] = set()


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return _KEY_RE.sub("<redacted>", text)


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return (self.stderr + self.stdout).strip()


@dataclass(frozen=True)
class Command:
    """One program to run: what, for how long, with which input and secrets to hide."""

    argv: Sequence[str]
    timeout: float
    input: str | None = None
    env: Mapping[str, str] | None = None
    check: bool = True
    secrets: Sequence[str] = field(default_factory=tuple)


class Runner(Protocol):
    async def __call__(self, command: Command) -> Completed: ...


def _describe(argv: Sequence[str], secrets: Sequence[str]) -> str:
    return redact(" ".join(argv), secrets)


def _result(command: Command, returncode: int, stdout: str, stderr: str) -> Completed:
    done = Completed(tuple(command.argv), returncode, stdout, stderr)
    if command.check and returncode != 0:
        output = redact(done.output, command.secrets)[-OUTPUT_TAIL:]
        what = _describe(command.argv, command.secrets)
        log.warning("command failed (exit %s): %s\n%s", returncode, what, output)
        raise ProcessError(
            f"{command.argv[0]} failed (exit {returncode}): {_last_line(output)}",
            returncode=returncode,
            output=output,
        )
    return done


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _timed_out(command: Command, stuck: str = "") -> DeadlineExceeded:
    what = _describe(command.argv, command.secrets)
    log.warning("command killed after %.0f s: %s", command.timeout, what)
    killed = f"killed it, but {stuck}" if stuck else "killed it"
    return DeadlineExceeded(
        f"{command.argv[0]} did not finish within {command.timeout:.0f} s; {killed}"
    )


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def environment(env: Mapping[str, str] | None) -> dict[str, str]:
    """The child's environment: ``env`` (default: ours) with English messages."""
    merged = dict(os.environ if env is None else env)
    merged["LC_ALL"] = "C"
    return merged


def kernel_wait(pid: int) -> str:
    """Where ``pid`` waits, for a report: its state letter and kernel wait channel."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "?"
    except OSError:
        wchan = "?"
    return f"state {state}, in {wchan}"


async def _reap_or_abandon(proc: _Child, command: Command) -> str:
    """Wait briefly for a killed child; return "" once it is gone, else a report of it.

    A child in uninterruptible sleep ignores SIGKILL until the kernel lets go (krbd or
    a FUSE export waiting on dead OSDs): waiting for it would hang the caller forever.
    """
    waiting = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait_for(asyncio.shield(waiting), KILL_GRACE)
        return ""
    except TimeoutError:
        _abandoned.add(waiting)
        waiting.add_done_callback(_abandoned.discard)
        report = (
            f"pid {proc.pid} ({_describe(command.argv, command.secrets)[:200]}) did not die "
            f"after SIGKILL: it is stuck in the kernel ({kernel_wait(proc.pid)}); left behind"
        )
        log.error("%s", report)
        return report


def stuck_children() -> int:
    """How many killed children are still stuck in the kernel."""
    return len(_abandoned)


async def stuck_gone() -> None:
    """Wait until no killed child is stuck in the kernel any more."""
    while _abandoned:
        await asyncio.wait(set(_abandoned))


async def run(command: Command) -> Completed:
    """Run ``command`` without blocking the event loop (the daemon's default runner)."""
    try:
        child = await _Child.start(command)
    except FileNotFoundError as exc:
        raise ProcessError(f"{command.argv[0]} is not installed (not found on PATH)") from exc
    except OSError as exc:  # found but not runnable: not executable, not a program
        raise ProcessError(f"{command.argv[0]} could not be started: {exc.strerror}") from exc
    data = command.input.encode() if command.input is not None else None
    try:
        out, err = await asyncio.wait_for(child.communicate(data), command.timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        _kill_group(child.pid)
        stuck = await _reap_or_abandon(child, command)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise _timed_out(command, stuck) from exc
    return _result(
        command, child.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
    )


class _Child:
    """A program started by ``posix_spawn``, its pipes read and its exit awaited on the
    event loop.

    Not ``asyncio.create_subprocess_exec``: its fork holds the GIL until the child has
    called exec, and on a busy machine that is milliseconds. With 20 Mounts in
    parallel on 2 cores, forks held the GIL a fifth of the time (``py-spy --gil``),
    and the event loop with every other request stood still. So the spawn runs in a
    worker thread through :mod:`rbdplugin.posix_spawn`, which lets go of the GIL.
    Like ``Popen(close_fds=True, start_new_session=True, restore_signals=True)``: its
    own session, no descriptor of ours but its three pipes, SIGPIPE and SIGXFSZ at
    their defaults.
    """

    def __init__(self, pid: int, stdin: int | None, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pipes = (stdin, stdout, stderr)
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        _on_exit(pid, self._set)

    @classmethod
    async def start(cls, command: Command) -> _Child:
        env = environment(command.env)
        path = _program(command.argv[0], env)
        parent: list[int] = []
        child: list[int] = []
        try:
            if command.input is not None:
                read_end, write_end = _pipe()
                parent.append(write_end)
                child.append(read_end)
            for _ in (1, 2):
                read_end, write_end = _pipe()
                parent.append(read_end)
                child.append(write_end)
        except BaseException:
            for fd in parent + child:
                os.close(fd)
            raise
        stdin = child[0] if command.input is not None else None
        stdout, stderr = child[-2:]
        spawning = asyncio.get_running_loop().run_in_executor(
            None, partial(_spawn, path, list(command.argv), env, stdin=stdin, stdout=stdout,
                          stderr=stderr),
        )  # fmt: skip
        try:
            pid = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # The thread still spawns with our pipes. Undo it all before the cancel goes on:
            # a roll-back that runs next looks for what the program made, and must not
            # race it (a losetup that attaches a loop device after the roll-back looked).
            await _undo_spawn(spawning, parent + child, command)
            raise
        except BaseException:
            for fd in parent + child:
                os.close(fd)
            raise
        for fd in child:
            os.close(fd)
        stdin = parent.pop(0) if command.input is not None else None
        return cls(pid, stdin, parent[0], parent[1])

    def _set(self, code: int) -> None:
        self.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def communicate(self, data: bytes | None) -> tuple[bytes, bytes]:
        stdin, stdout, stderr = self._pipes
        reading = asyncio.gather(_drain(stdout), _drain(stderr))
        if stdin is not None:
            await asyncio.gather(reading, _feed(stdin, data or b""))
        out, err = await reading
        await self.wait()
        return out, err


def _program(name: str, env: Mapping[str, str]) -> str:
    """The file ``name`` runs, looked up in the child's PATH as exec would."""
    path = shutil.which(name, path=env.get("PATH", os.defpath))
    if path is None:
        raise FileNotFoundError(name)
    return path


RESTORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)  # ignored by Python, not by them


def _spawn(
    path: str, argv: list[str], env: dict[str, str], *, stdin: int | None, stdout: int,
    stderr: int,
) -> int:  # fmt: skip
    """Start the program (in a worker thread); its pid."""
    if posix_spawn.AVAILABLE:
        return posix_spawn.spawn(path, argv, env, stdin=stdin, stdout=stdout, stderr=stderr,
                                 signals_to_default=RESTORED_SIGNALS)  # fmt: skip
    # Another C library: os.posix_spawn holds the GIL, and closes only the descriptors
    # that an exec would pass on, as found just before.
    first: tuple[int, ...] | tuple[int, int, str, int, int] = (
        (os.POSIX_SPAWN_DUP2, stdin, 0) if stdin is not None
        else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
    )  # fmt: skip
    actions = [first, (os.POSIX_SPAWN_DUP2, stdout, 1), (os.POSIX_SPAWN_DUP2, stderr, 2)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()]
    return os.posix_spawn(
        path, argv, env, file_actions=actions, setsid=True, setsigmask=(),
        setsigdef=RESTORED_SIGNALS,
    )  # fmt: skip


async def _undo_spawn(spawning: asyncio.Future[int], fds: list[int], command: Command) -> None:
    """After a cancelled start: wait for the spawn, close its pipes, kill what it started
    and reap it (or report it stuck in the kernel). A second cancel meanwhile waits too:
    the spawn takes milliseconds, and what it starts must not outlive the caller."""
    await _to_its_end(spawning)
    for fd in fds:
        os.close(fd)
    if spawning.cancelled() or spawning.exception() is not None:
        return
    child = _Child(spawning.result(), None, -1, -1)
    _kill_group(child.pid)
    await _to_its_end(asyncio.ensure_future(_reap_or_abandon(child, command)))  # ≤ KILL_GRACE


async def _to_its_end(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, whatever cancels the caller meanwhile (they are
    not lost: the caller is on its way out with a CancelledError already)."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])


def _on_exit(pid: int, then: Callable[[int], None]) -> None:
    """Reap child ``pid`` when it exits, then call ``then`` with its exit code (on the
    running loop)."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # Linux before 5.3: a thread waits, as asyncio's own watcher does

        def wait() -> None:
            code = _waitpid(pid)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(then, code)

        threading.Thread(target=wait, daemon=True, name=f"waitpid-{pid}").start()
        return

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        then(_waitpid(pid))  # it has exited: this does not block

    loop.add_reader(pidfd, exited)


def _pipe() -> tuple[int, int]:
    """A pipe, both ends close-on-exec and above 2 (dup2 onto 0-2 in the child)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    return _above_stdio(read_end), _above_stdio(write_end)


def _above_stdio(fd: int) -> int:
    if fd > 2:
        return fd
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)  # our own stdio was closed
    os.close(fd)
    return high


def _inheritable_fds() -> list[int]:
    """Our descriptors above 2 that an exec would pass on (a library's, opened without
    close-on-exec): the child closes them."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own, or closed meanwhile
                if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                    found.append(fd)
    return found


def _waitpid(pid: int) -> int:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped elsewhere: its status is lost
        log.warning("pid %s was reaped elsewhere; its exit status is unknown", pid)
        return 255
    return os.waitstatus_to_exitcode(status)


async def _drain(fd: int) -> bytes:
    """Everything the child writes to ``fd`` until it closes it."""
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    closed = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            chunks.append(data)
        elif not closed.done():
            closed.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        await closed
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return b"".join(chunks)


async def _feed(fd: int, data: bytes) -> None:
    """Write ``data`` to the child's stdin, then close it."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    os.set_blocking(fd, False)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(fd, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(fd)
            except BrokenPipeError:  # it stopped reading: its exit status tells
                break
    finally:
        os.close(fd)


def run_sync(command: Command) -> Completed:
    """Run ``command`` from synchronous code (CLI tools, the dev cluster)."""
    try:
        proc = subprocess.Popen(
            list(command.argv),
            stdin=subprocess.PIPE if command.input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment(command.env),
            start_new_session=True,
            text=True,
        )
    except FileNotFoundError as exc:
        raise ProcessError(f"{command.argv[0]} is not installed (not found on PATH)") from exc
    try:
        out, err = proc.communicate(command.input, timeout=command.timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc.pid)
        try:
            proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            stuck = f"pid {proc.pid} did not die after SIGKILL ({kernel_wait(proc.pid)})"
            log.error("%s: %s", _describe(command.argv, command.secrets)[:200], stuck)
            raise _timed_out(command, stuck) from exc
        raise _timed_out(command) from exc
    return _result(command, proc.returncode, out, err)


# Children started by spawn() and spawn_async() and not known to be reaped yet (see
# reap_spawned). The Popen objects are kept on purpose: a dropped Popen polls in its
# __del__, which reaps a child that already died (a fast failure) behind our back and
# frees its pid for reuse while we still hold it, so a later stop_pid could signal a
# stranger. (spawn_async starts no Popen: None.)
_SPAWNED: dict[int, subprocess.Popen[bytes] | None] = {}


def spawn(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> int:
    """Start a long-running daemon in its own session, output to ``log_path``; return its pid.

    The child is not waited for here: :func:`stop_pid` reaps it, or, if it dies on its
    own, :func:`pid_alive` or :func:`reap_spawned`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logfile: IO[bytes]
    with log_path.open("ab") as logfile:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=environment(env),
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ProcessError(f"{argv[0]} is not installed (not found on PATH)") from exc
    _SPAWNED[proc.pid] = proc
    return proc.pid


async def spawn_async(
    argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> int:
    """:func:`spawn` for the daemon: started from a worker thread without the GIL (see
    :class:`_Child`), so the event loop goes on meanwhile."""
    if not posix_spawn.AVAILABLE:
        return spawn(argv, log_path, env)
    merged = environment(env)
    try:
        path = _program(argv[0], merged)
    except FileNotFoundError as exc:
        raise ProcessError(f"{argv[0]} is not installed (not found on PATH)") from exc
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logfd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    spawning = asyncio.get_running_loop().run_in_executor(
        None, partial(posix_spawn.spawn, path, list(argv), merged, stdin=None, stdout=logfd,
                      stderr=logfd, signals_to_default=RESTORED_SIGNALS),
    )  # fmt: skip
    spawning.add_done_callback(lambda _: os.close(logfd))
    spawning.add_done_callback(_record_spawned)
    try:
        return await asyncio.shield(spawning)
    except asyncio.CancelledError:
        # It starts all the same: the roll-back that runs next must find it to stop it.
        await _to_its_end(spawning)
        raise


def _record_spawned(spawning: asyncio.Future[int]) -> None:
    if not spawning.cancelled() and spawning.exception() is None:
        _SPAWNED[spawning.result()] = None


def _forget(pid: int) -> None:
    proc = _SPAWNED.pop(pid, None)
    if proc is not None and proc.returncode is None:
        proc.returncode = -1  # reaped by waitpid here: its __del__ must not poll nor warn


def reap_spawned() -> list[int]:
    """Reap every spawned child that has died (one that failed and was never asked about
    stays a zombie otherwise); the pids reaped."""
    reaped = []
    for pid in list(_SPAWNED):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere already
            done = pid
        if done == pid:
            _forget(pid)
            reaped.append(pid)
    return reaped


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (``kill -0`` succeeds on zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    if state == "Z":  # if it is our child (an export that died on its own), reap it now
        _reap(pid)
    return state not in ("Z", "X")


def pid_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM ``pid``, then SIGKILL after ``timeout``; True once it is gone.

    For synchronous callers only (the CLI, the dev cluster); the daemon awaits
    :func:`stop_pid_async`.
    """
    return asyncio.run(stop_pid_async(pid, timeout))


def _reap(pid: int) -> bool:
    """Collect ``pid`` if it is our dead child; True once it is reaped (or not ours)."""
    # Not our child: PID 1 reaps it, and pid_alive() already treats a zombie as gone.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = pid
    if done == pid:
        _forget(pid)
    return done == pid


def pid_ended(pid: int) -> bool:
    """Whether ``pid`` has ended: for a child we spawned, a waitpid() (under a µs; no
    file read). Such a child has ended only once reaped: its leader shows as a zombie
    as soon as its main thread exits, while its other threads (librbd's, finishing
    I/O) still run, and waitpid() cannot collect it yet."""
    if pid in _SPAWNED:
        return _reap(pid)
    return not pid_alive(pid)


# An export process exits within tens of ms of SIGTERM: every Unmount waits for it.
STOP_POLL = 0.005
# How long stop_pid waits for a SIGKILLed process before reporting it stuck.
KILL_WAIT = 5.0


async def stop_pid_async(pid: int, timeout: float = 10.0) -> bool:
    """:func:`stop_pid` without blocking the event loop."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, KILL_WAIT)):
        if sig == signal.SIGKILL:
            log.warning("pid %s (%s) ignored SIGTERM for %.0f s; killing it", pid,
                        " ".join(pid_cmdline(pid))[:200], timeout)  # fmt: skip
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if pid_ended(pid):
                return True
            await asyncio.sleep(STOP_POLL)
    return pid_ended(pid)
