"""The floor of the plugin API: a bare aiohttp app on a Unix socket, no service behind it.

    python -m bench.bare_server SOCKET [--volumes N]

Answers every Docker call with a fixed reply of the daemon's shape (List with ``N``
volumes, made per request as the daemon does), so ours / this is what our service adds
on top of the transport.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

CREATED_AT = "2026-01-01T00:00:00Z"


def reply(data: dict[str, Any]) -> web.Response:
    return web.Response(text=json.dumps(data), content_type="application/json")


async def body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    decoded = json.loads(raw) if raw.strip() else {}
    return decoded if isinstance(decoded, dict) else {}


def build_app(volumes: int) -> web.Application:
    async def activate(_: web.Request) -> web.Response:
        return reply({"Implements": ["VolumeDriver"]})

    async def capabilities(request: web.Request) -> web.Response:
        await body(request)
        return reply({"Capabilities": {"Scope": "global"}})

    async def path(request: web.Request) -> web.Response:
        await body(request)
        return reply({"Mountpoint": "", "Err": ""})

    async def get(request: web.Request) -> web.Response:
        name = (await body(request)).get("Name", "")
        status = {"size": "1.0 GiB", "fstype": "ext4", "pool": "bench", "image": name}
        volume = {"Name": name, "Mountpoint": "", "CreatedAt": CREATED_AT, "Status": status}
        return reply({"Volume": volume, "Err": ""})

    async def list_volumes(request: web.Request) -> web.Response:
        await body(request)
        listed = [
            {"Name": f"b-list-{i:05d}", "Mountpoint": "", "CreatedAt": CREATED_AT}
            for i in range(volumes)
        ]
        return reply({"Volumes": listed, "Err": ""})

    app = web.Application()
    app.router.add_post("/Plugin.Activate", activate)
    app.router.add_post("/VolumeDriver.Capabilities", capabilities)
    app.router.add_post("/VolumeDriver.Path", path)
    app.router.add_post("/VolumeDriver.Get", get)
    app.router.add_post("/VolumeDriver.List", list_volumes)
    return app


async def serve(socket_path: Path, volumes: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build_app(volumes), handle_signals=False, access_log=None)
    await runner.setup()
    socket_path.unlink(missing_ok=True)
    await web.UnixSite(runner, str(socket_path), backlog=1024).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket", type=Path)
    parser.add_argument("--volumes", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.socket, args.volumes))


if __name__ == "__main__":
    main()
