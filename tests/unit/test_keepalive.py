"""The daemon's HTTP listeners close idle client connections (aiohttp alone holds them an hour)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from rbdplugin.daemon import KEEPALIVE_SECONDS, http_runner
from rbdplugin.health import control_app

KEEPALIVE = 0.5  # the test's own, short: the daemon's is KEEPALIVE_SECONDS


async def _status() -> dict[str, Any]:
    return {"status": "ok"}


async def _idle_after_one_request(socket_path: Path) -> tuple[bytes, float, bytes]:
    """Serve the control app on ``socket_path``; make one keep-alive request and stay
    quiet: the response head, how long until the server closed, and what came after."""
    runner = http_runner(control_app(_status), keepalive=KEEPALIVE)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(socket_path)).start()
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(b"GET /status HTTP/1.1\r\nHost: rbdplugin\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            idle_since = time.monotonic()
            after = await asyncio.wait_for(reader.read(), timeout=5)  # b"" once closed
            return head, time.monotonic() - idle_since, after
        finally:
            writer.close()
    finally:
        await runner.cleanup()


def test_an_idle_connection_is_closed_after_the_keepalive(tmp_path: Path) -> None:
    head, idle, after = asyncio.run(_idle_after_one_request(tmp_path / "control.sock"))
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"connection: close" not in head.lower(), head  # kept alive, until idle
    assert after == b""  # the server closed it, sending nothing more
    assert KEEPALIVE * 0.8 <= idle < KEEPALIVE + 1.5, idle


def test_the_daemon_keeps_idle_connections_for_about_a_minute() -> None:
    assert 30 <= KEEPALIVE_SECONDS <= 120
