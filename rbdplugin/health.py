"""What operators and their tools ask the daemon: metrics, health, status.

- On ``[daemon] metrics`` (TCP): ``/metrics`` (Prometheus), ``/healthz`` (the
  process runs) and ``/readyz`` (every driver's socket listens and every tenant's
  Ceph connection answers), each readiness answer a JSON body saying what is wrong.
- On ``state_dir/control.sock`` (root only): ``/status``, the daemon's own view
  for ``rbdplugin status``; the operator's actions on volumes as ``POST /volumes/ACTION``
  with a JSON body (``{"Driver", "Name", ...}``): ``resize`` (``"Size"``) for ``rbdplugin
  volume resize``, ``snapshot`` (``"Snapshot"``, ``"Action"``: create, rm, ls) for
  ``rbdplugin snapshot``; answered ``{"Err": ...}`` on failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from rbdplugin.errors import InvalidRequest, RbdPluginError
from rbdplugin.service import VolumeService

log = logging.getLogger(__name__)
PROBE_SECONDS = 3.0
Readiness = Callable[[], Awaitable[dict[str, Any]]]
Status = Callable[[], Awaitable[dict[str, Any]]]
# A control action: the request's JSON body -> what was done.
Action = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class CephProbe:
    """Asks a tenant's back-end for one cheap answer (Ceph: an OSD; Cinder mode: Keystone
    and Cinder); one probe in flight."""

    def __init__(self, service: VolumeService) -> None:
        self.service = service
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> str:
        """ "up", or what is wrong."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._probe())
            # A probe that fails after its caller stopped waiting: the next check starts
            # a new one and nobody reads this outcome (asyncio would log it as lost).
            self._task.add_done_callback(_outcome_read)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), PROBE_SECONDS)
        except TimeoutError:
            return f"down: no answer from {self.service.where} within {PROBE_SECONDS:.0f} s"
        except RbdPluginError as exc:
            return f"down: {exc}"
        return "up"

    async def _probe(self) -> None:
        await self.service.backend.probe()


def _outcome_read(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=1), status=status, content_type="application/json"
    )


def metrics_app(registry: CollectorRegistry, readiness: Readiness) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        report = await readiness()
        return _json(report, 200 if report["ready"] else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def control_app(status: Status, actions: Mapping[str, Action] | None = None) -> web.Application:
    """``actions``: ``POST /volumes/<name>`` with a JSON body, answered with the action's
    result, or ``{"Err": ...}`` (400 for a bad request, 500 for the rest)."""

    async def handler(_: web.Request) -> web.Response:
        return _json(await status())

    def answering(name: str, action: Action) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def answer(request: web.Request) -> web.Response:
            # Imported here: api imports this module's neighbours, not the other way round.
            from rbdplugin.api import decode  # noqa: PLC0415

            body: dict[str, Any] = {}
            try:
                body = await decode(request)
                return _json(await action(body))
            except RbdPluginError as exc:
                log.info("control: %s of %r failed: %s", name, body.get("Name"), exc)
                code = 400 if isinstance(exc, InvalidRequest) else 500
                return _json({"Err": str(exc)}, code)

        return answer

    app = web.Application()
    app.router.add_get("/status", handler)
    for name, action in (actions or {}).items():
        app.router.add_post(f"/volumes/{name}", answering(name, action))
    return app
