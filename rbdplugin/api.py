"""The Docker Volume Plugin protocol over HTTP: transport only.

Each handler decodes the body the way dockerd sends it (POST, no Content-Type,
an empty body for Activate, ``{}`` for List and Capabilities, ``Opts: null``),
calls one service method, and answers JSON. Every error becomes
``{"Err": "..."}``: errors of ours with their own message, anything else with a
generic one (the details go to the log). Every request that changes something or
fails gets one log line; successful queries (Get, List, Path, ...) are logged at
debug level, since Docker sends them all the time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from rbdplugin.errors import InvalidArgument, InvalidRequest, RbdPluginError
from rbdplugin.metrics import Metrics
from rbdplugin.service import VolumeService, VolumeView

log = logging.getLogger("rbdplugin.requests")

MAX_BODY = 64 * 1024
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
SERVICE = web.AppKey("service", VolumeService)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Body = dict[str, Any]


def reply(data: Body, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def error_reply(message: str, status: int) -> web.Response:
    return reply({"Err": message}, status)


class BodyTooLarge(InvalidRequest):
    """The body is over :data:`MAX_BODY` (answered with HTTP 413)."""


BODY = web.RequestKey("body", dict)


async def decode(request: web.Request) -> Body:
    """The request's JSON object; an empty body counts as ``{}``."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(
            f"request body is larger than the limit of {MAX_BODY // 1024} KiB"
        ) from exc
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # [[[...]]] deeper than the parser's recursion limit
        raise InvalidRequest("request body is JSON nested too deeply") from exc
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"request body must be a JSON object, not a JSON {type(body).__name__}"
        )
    return body


def volume_name(body: Body) -> str:
    if "Name" not in body:
        raise InvalidArgument('request has no Name: send {"Name": "VOLUME", ...}')
    name = body["Name"]
    if not isinstance(name, str):
        raise InvalidArgument("Name must be a string")
    return name


def _view(view: VolumeView, with_status: bool) -> Body:
    out: Body = {"Name": view.name, "Mountpoint": view.mountpoint}
    if view.created_at:
        out["CreatedAt"] = view.created_at
    if with_status:
        out["Status"] = view.status
    return out


# -- handlers ------------------------------------------------------------------------


async def activate(request: web.Request) -> web.Response:
    return reply({"Implements": ["VolumeDriver"]})


async def capabilities(request: web.Request) -> web.Response:
    # RBD images are reachable from every host of the cluster.
    return reply({"Capabilities": {"Scope": "global"}})


async def create(request: web.Request) -> web.Response:
    body = request[BODY]
    await request.app[SERVICE].create(volume_name(body), body.get("Opts"))
    return reply({"Err": ""})


async def get(request: web.Request) -> web.Response:
    body = request[BODY]
    view = await request.app[SERVICE].get(volume_name(body))
    return reply({"Volume": _view(view, with_status=True), "Err": ""})


async def list_volumes(request: web.Request) -> web.Response:
    views = await request.app[SERVICE].list()
    return reply({"Volumes": [_view(v, with_status=False) for v in views], "Err": ""})


async def path(request: web.Request) -> web.Response:
    body = request[BODY]
    return reply({"Mountpoint": request.app[SERVICE].path(volume_name(body)), "Err": ""})


async def mount(request: web.Request) -> web.Response:
    body = request[BODY]
    mountpoint = await request.app[SERVICE].mount(volume_name(body), body.get("ID"))
    return reply({"Mountpoint": mountpoint, "Err": ""})


async def unmount(request: web.Request) -> web.Response:
    body = request[BODY]
    await request.app[SERVICE].unmount(volume_name(body), body.get("ID"))
    return reply({"Err": ""})


async def remove(request: web.Request) -> web.Response:
    body = request[BODY]
    await request.app[SERVICE].remove(volume_name(body))
    return reply({"Err": ""})


ROUTES: dict[str, Handler] = {
    "/Plugin.Activate": activate,
    "/VolumeDriver.Capabilities": capabilities,
    "/VolumeDriver.Create": create,
    "/VolumeDriver.Get": get,
    "/VolumeDriver.List": list_volumes,
    "/VolumeDriver.Path": path,
    "/VolumeDriver.Remove": remove,
    "/VolumeDriver.Mount": mount,
    "/VolumeDriver.Unmount": unmount,
}


# -- errors and request log ------------------------------------------------------------


def _status_of(error: RbdPluginError) -> int:
    if isinstance(error, BodyTooLarge):
        return 413
    if isinstance(error, InvalidRequest) and not isinstance(error, InvalidArgument):
        return 400
    return 500


def _shown_name(body: Body) -> str:
    name = body.get("Name", "-")
    if not isinstance(name, str) or not name.isprintable():
        return repr(name)[:80]
    return name[:80] or "''"


# Queries Docker sends all the time (docker volume ls and inspect, container starts):
# logged at debug when they succeed, so the log shows what changed (and every error).
QUERIES = frozenset(
    {"/Plugin.Activate", "/VolumeDriver.Capabilities", "/VolumeDriver.Get",
     "/VolumeDriver.List", "/VolumeDriver.Path"}
)  # fmt: skip


def _serving(route: str, handler: Handler, driver: str, metrics: Metrics) -> Handler:
    """``handler`` with the protocol's errors, its request log line and metrics.

    A wrapper per route rather than a middleware, with its metric children looked up
    once: the cheap calls (Capabilities, Path) are a few tens of microseconds of work,
    and a middleware plus label look-ups per request cost as much again.
    """
    endpoint = route.lstrip("/") if route in ROUTES else "unknown"  # bounded label values
    answered_ok = metrics.requests.labels(driver, endpoint, "ok")
    seconds = metrics.request_seconds.labels(endpoint)
    ok_level = logging.DEBUG if route in QUERIES else logging.INFO

    async def serve(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        name = "-"
        try:
            if request.method != "POST":
                raise web.HTTPMethodNotAllowed(request.method, ["POST"])
            request[BODY] = body = await decode(request)
            name = _shown_name(body)
            response = await handler(request)
            outcome = "ok"
        except RbdPluginError as exc:
            outcome = f"error:{exc.reason}"
            response = error_reply(str(exc), _status_of(exc))
        except web.HTTPNotFound:
            outcome = "error:unknown_endpoint"
            response = error_reply(
                f"unknown endpoint {request.path!r}; this plugin implements {', '.join(ROUTES)}",
                404,
            )
        except web.HTTPRequestEntityTooLarge:
            outcome = "error:invalid_request"
            response = error_reply(
                f"request body is larger than the limit of {MAX_BODY // 1024} KiB", 413
            )
        except web.HTTPMethodNotAllowed:
            outcome = "error:method"
            response = error_reply(f"{request.method} is not allowed: every call is a POST", 405)
        except Exception:
            log.exception("driver=%s endpoint=%s volume=%s: unexpected error",
                          driver, request.path.lstrip("/"), name)  # fmt: skip
            outcome = "error:internal"
            response = error_reply(
                f"internal error in rbdplugin while handling {request.path.lstrip('/')}; "
                "see the daemon's log",
                500,
            )
        elapsed = time.monotonic() - started
        seconds.observe(elapsed)
        if outcome == "ok":
            answered_ok.inc()
            level = ok_level
        else:
            metrics.requests.labels(driver, endpoint, "error").inc()
            metrics.errors.labels(outcome.removeprefix("error:")).inc()
            level = logging.INFO
        if log.isEnabledFor(level):
            message = (
                response.text if isinstance(response, web.Response) and outcome != "ok" else ""
            )
            log.log(
                level, "driver=%s endpoint=%s volume=%s outcome=%s duration=%.3fs%s",
                driver, request.path.lstrip("/"), name, outcome, elapsed,
                f" err={message}" if message else "",
            )  # fmt: skip
        return response

    return serve


async def unknown(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


def build_app(driver: str, service: VolumeService, metrics: Metrics) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[SERVICE] = service
    for route, handler in ROUTES.items():
        app.router.add_route("*", route, _serving(route, handler, driver, metrics))
    app.router.add_route("*", "/{tail:.*}", _serving("", unknown, driver, metrics))
    return app
