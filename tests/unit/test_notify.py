"""sd_notify against a real Unix datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rbdplugin.daemon import report_progress
from rbdplugin.notify import Notifier


@dataclass
class Manager:
    """The service manager's end: what it received, message by message."""

    sock: socket.socket
    address: str

    def received(self) -> list[dict[str, str]]:
        messages: list[dict[str, str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return messages
            lines = data.decode().splitlines()
            messages.append(dict(line.split("=", 1) for line in lines))


def _manager(address: str | bytes, shown: str) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    try:
        yield Manager(sock, shown)
    finally:
        sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    path = tmp_path / "notify"
    yield from _manager(str(path), str(path))


@pytest.fixture
def abstract_manager() -> Iterator[Manager]:
    name = f"rbdplugin-test-{uuid.uuid4().hex}"
    yield from _manager(b"\0" + name.encode(), "@" + name)


def test_ready_and_status_arrive_as_one_datagram(manager: Manager) -> None:
    notifier = Notifier(manager.address)
    assert notifier.ready("listening for alpha")
    assert notifier.status("reconciling\nmounts")  # one line: STATUS must not split
    assert notifier.stopping("stopping")
    assert manager.received() == [
        {"READY": "1", "STATUS": "listening for alpha"},
        {"STATUS": "reconciling mounts"},
        {"STOPPING": "1", "STATUS": "stopping"},
    ]


def test_an_abstract_socket_name_starts_with_at(abstract_manager: Manager) -> None:
    assert Notifier(abstract_manager.address).ready("up")
    assert abstract_manager.received() == [{"READY": "1", "STATUS": "up"}]


def test_without_notify_socket_nothing_is_sent() -> None:
    environ: dict[str, str] = {}
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    assert not notifier.ready("up")


def test_the_address_is_taken_out_of_the_environment(manager: Manager) -> None:
    # Export processes the daemon starts must not inherit it: they outlive the daemon.
    environ = {"NOTIFY_SOCKET": manager.address, "PATH": "/bin"}
    notifier = Notifier.from_environ(environ)
    assert environ == {"PATH": "/bin"}
    assert notifier.status("x") and manager.received() == [{"STATUS": "x"}]


def test_a_manager_gone_away_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    assert notifier.enabled
    assert not notifier.ready("up")


@dataclass
class _Tenant:
    driver: str


@dataclass
class _Service:
    ready: bool = False


@dataclass
class _Driver:
    tenant: _Tenant
    service: _Service


@dataclass
class _Daemon:
    drivers: list[_Driver]


def test_status_follows_reconciling_until_every_driver_is_ready(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("rbdplugin.daemon.PROGRESS_SECONDS", 0.01)
    alpha, beta = _Driver(_Tenant("alpha"), _Service()), _Driver(_Tenant("beta"), _Service())
    daemon: Any = _Daemon([alpha, beta])

    async def reconcile() -> None:
        task = asyncio.create_task(report_progress(daemon, Notifier(manager.address)))
        await asyncio.sleep(0.05)
        beta.service.ready = True
        await asyncio.sleep(0.05)
        alpha.service.ready = True
        await asyncio.wait_for(task, 1)

    asyncio.run(reconcile())
    assert [m["STATUS"] for m in manager.received()] == [
        "listening for alpha, beta; reconciling mounts of alpha, beta",
        "listening for alpha, beta; reconciling mounts of alpha",
        "listening for alpha, beta; mounts reconciled, ready",
    ]
