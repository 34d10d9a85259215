"""The guest-side relay (rbdplugin.devcloud.bridge), here on loopback: 127.0.0.2:PORT
relayed to 127.0.0.1:PORT, as the guest's 127.0.0.1:PORT is relayed to 10.0.2.100:PORT."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from rbdplugin.devcluster import free_ports

SIZE = 8 * 1024 * 1024


def _upstream(listener: socket.socket, got: list[str]) -> None:
    """Read until the client half-closes, then answer with as much data and close."""
    conn, _ = listener.accept()
    with conn:
        digest, total = hashlib.sha256(), 0
        while chunk := conn.recv(65536):
            digest.update(chunk)
            total += len(chunk)
        got.append(f"{total} {digest.hexdigest()}")
        conn.sendall(b"y" * SIZE)


@pytest.fixture
def bridge() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "rbdplugin.devcloud.bridge", "--listen", "127.0.0.2",
         "--to", "127.0.0.1", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("bridge: ready")
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_relays_both_ways_with_half_close_and_stops_on_sigterm(
    bridge: tuple[int, subprocess.Popen[str]],
) -> None:
    port, process = bridge
    got: list[str] = []
    with socket.create_server(("127.0.0.1", port)) as listener:
        thread = threading.Thread(target=_upstream, args=(listener, got), daemon=True)
        thread.start()
        data = os.urandom(SIZE)
        with socket.create_connection(("127.0.0.2", port), timeout=30) as client:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)  # the upstream answers only after this EOF
            answer = bytearray()
            while chunk := client.recv(65536):
                answer += chunk
        thread.join(timeout=30)
    assert got == [f"{SIZE} {hashlib.sha256(data).hexdigest()}"]
    assert answer == b"y" * SIZE
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "bridge: stopped" in out
