"""Command agent of the rbdplugin test guest: runs host commands sent over virtio-serial.

Installed by guest/build as /usr/local/lib/rbdplugin-guest/agent.py and started by systemd
(rbdplugin-guest-agent.service). guest/run is the other end.

Protocol, one request at a time on the port named ``rbdplugin.agent``:
  host -> guest: one JSON line {"argv": [...], "env": {...}, "cwd": "...", "wait_boot": bool}
  guest -> host: frames of one type byte, a 4-byte big-endian length and a payload:
    S  the command is starting; JSON {"uptime": s, "state": systemd state, "failed": [...]}
    O  a chunk of the command's stdout      E  a chunk of its stderr
    X  the command ended; JSON {"status": exit status, 128+N for signal N, 127 if not started}
"""

from __future__ import annotations

import json
import os
import selectors
import struct
import subprocess
import time
from pathlib import Path

PORT_NAME = "rbdplugin.agent"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PYTHONPATH": "/src",
    # /src is read-only: byte code goes to a cache on the (throwaway) root disk instead, which
    # saves each later Python process of the same boot recompiling the project (~4 s under TCG).
    "PYTHONPYCACHEPREFIX": "/var/cache/rbdplugin-pycache",
}
BOOT_WAIT_SECONDS = 300
DRAIN_SECONDS = 2.0


def find_port() -> str:
    """Return the character device of our virtio-serial port, waiting for it to appear."""
    while True:
        for entry in sorted(Path("/sys/class/virtio-ports").glob("*")):
            try:
                name = (entry / "name").read_text().strip()
            except OSError:
                continue
            if name == PORT_NAME:
                return f"/dev/{entry.name}"
        time.sleep(0.2)


class Channel:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.buffer = b""

    def read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                # The host end is not connected (virtio-serial reads return 0 then): wait.
                time.sleep(0.1)
                continue
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def send(self, kind: bytes, payload: bytes) -> None:
        data = kind + struct.pack(">I", len(payload)) + payload
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]


def boot_state(wait: bool) -> dict[str, object]:
    """Wait until systemd has finished booting (if asked) and describe its state."""
    command = ["systemctl", "is-system-running"]
    if wait:
        command.append("--wait")
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=BOOT_WAIT_SECONDS, check=False
        )
        state = result.stdout.strip() or result.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        state = f"unknown ({error})"
    failed: list[str] = []
    if state != "running":
        listing = subprocess.run(
            ["systemctl", "--failed", "--plain", "--no-legend", "--no-pager"],
            capture_output=True,
            text=True,
            check=False,
        )
        failed = [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return {"uptime": uptime, "state": state, "failed": failed}


def run(channel: Channel, request: dict[str, object]) -> int:
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        channel.send(b"E", b"guest agent: the request has no command\n")
        return 127
    env = dict(BASE_ENV)
    extra = request.get("env")
    if isinstance(extra, dict):
        env.update({str(k): str(v) for k, v in extra.items()})
    cwd = str(request.get("cwd") or "/")
    if not os.path.isdir(cwd):
        cwd = "/"
    try:
        process = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    except OSError as error:
        channel.send(b"E", f"guest agent: cannot run {argv[0]}: {error}\n".encode())
        return 127
    assert process.stdout is not None  # noqa: S101 - Popen with PIPE
    assert process.stderr is not None  # noqa: S101
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, b"O")
    selector.register(process.stderr, selectors.EVENT_READ, b"E")
    open_streams = 2
    drain_until: float | None = None
    while open_streams:
        if drain_until is None and process.poll() is not None:
            # A background child (`daemon &`) may keep the pipes open: read on briefly, then stop.
            drain_until = time.monotonic() + DRAIN_SECONDS
        if drain_until is not None and time.monotonic() > drain_until:
            break
        for key, _ in selector.select(timeout=0.2):
            chunk = os.read(key.fd, 65536)
            if chunk:
                channel.send(key.data, chunk)
            else:
                selector.unregister(key.fileobj)
                open_streams -= 1
    selector.close()
    process.stdout.close()
    process.stderr.close()
    status = process.wait()
    return 128 - status if status < 0 else status


def main() -> None:
    channel = Channel(find_port())
    print(f"guest agent: listening on {PORT_NAME}", flush=True)
    booted = False
    while True:
        line = channel.read_line()
        try:
            request = json.loads(line)
        except ValueError:
            continue
        if not isinstance(request, dict):
            continue
        state = boot_state(wait=bool(request.get("wait_boot", True)) and not booted)
        booted = True
        channel.send(b"S", json.dumps(state).encode())
        status = run(channel, request)
        channel.send(b"X", json.dumps({"status": status}).encode())


if __name__ == "__main__":
    main()
