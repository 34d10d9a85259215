"""A Nova stand-in for Cinder-attach mode: Nova's volume-attachment API over real HTTP.

There is no real Nova here. This serves the part of Nova's compute API (v2.1) that a
plugin inside a server uses, on 127.0.0.1, registered in Keystone's catalog as the
``compute`` service:

- ``GET /``, ``GET /v2.1``: version discovery (microversions 2.1 to 2.96);
- ``GET /v2.1/servers[/detail]``, ``GET /v2.1/servers/{id}``: the pretend servers of
  the caller's project;
- ``GET|POST /v2.1/servers/{id}/os-volume_attachments`` and
  ``GET|DELETE /v2.1/servers/{id}/os-volume_attachments/{volume_id}``: attach and detach,
  asynchronous like Nova's (see :mod:`rbdplugin.devcloud.compute`);
- ``POST /v2.1/os-server-external-events``: Cinder's events; ``volume-extended`` grows
  the server's disk to the volume's new size (Cinder's in-use extend).

Tokens are validated against the real Keystone (401 with ``WWW-Authenticate: Keystone
uri=...`` otherwise). aiohttp is only the transport: handlers decode, call one method of
:class:`~rbdplugin.devcloud.compute.Compute`, and encode Nova's answer or fault.

Run: ``python -m rbdplugin.devcloud.nova SPEC.json`` (what ``devcloud start`` does).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from rbdplugin.devcloud.compute import (
    HTTP_TIMEOUT,
    Bdm,
    Caller,
    Cinder,
    Compute,
    Keystone,
    NovaFault,
    NovaSpec,
    Server,
)

log = logging.getLogger("devcloud.nova")

DRAIN_SECONDS = 10.0
MIN_VERSION = (2, 1)
MAX_VERSION = (2, 96)
SPEC = web.AppKey("spec", NovaSpec)
COMPUTE = web.AppKey("compute", Compute)
KEYSTONE = web.AppKey("keystone", Keystone)
CALLER = web.RequestKey("caller", Caller)
VERSION = web.RequestKey("version", tuple)
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def _fault(fault: NovaFault) -> web.Response:
    return _json({fault.kind: {"code": fault.status, "message": fault.message}}, fault.status)


def _unauthorized(keystone: Keystone, message: str) -> web.Response:
    response = _json({"error": {"code": 401, "title": "Unauthorized", "message": message}}, 401)
    response.headers["WWW-Authenticate"] = keystone.www_authenticate
    return response


# -- microversions ---------------------------------------------------------------------------


def requested_version(request: web.Request) -> tuple[int, int]:
    wanted = request.headers.get("X-OpenStack-Nova-API-Version", "")
    for item in request.headers.get("OpenStack-API-Version", "").split(","):
        service, _, value = item.strip().partition(" ")
        if service.lower() == "compute":
            wanted = value.strip()
    if not wanted:
        return MIN_VERSION
    if wanted.lower() == "latest":
        return MAX_VERSION
    match = _VERSION_RE.match(wanted)
    version = (int(match[1]), int(match[2])) if match else (0, 0)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise web.HTTPNotAcceptable(
            text=f"Version {wanted} is not supported by the API. Minimum is 2.1 and maximum "
            f"is {MAX_VERSION[0]}.{MAX_VERSION[1]}."
        )
    return version


def _version_doc(request: web.Request) -> dict[str, Any]:
    return {
        "id": "v2.1",
        "status": "CURRENT",
        "updated": "2013-07-23T11:33:21Z",
        "version": f"{MAX_VERSION[0]}.{MAX_VERSION[1]}",
        "min_version": "2.1",
        "links": [{"rel": "self", "href": f"{request.url.origin()}/v2.1/"}],
        "media-types": [
            {
                "base": "application/json",
                "type": "application/vnd.openstack.compute+json;version=2.1",
            }
        ],
    }


# -- middleware ------------------------------------------------------------------------------


@web.middleware
async def openstack_api(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Token check, microversion, and Nova's fault bodies around every API call."""
    keystone = request.app[KEYSTONE]
    if request.path.rstrip("/") in ("", "/v2.1"):
        return await handler(request)
    try:
        version = requested_version(request)
        token = request.headers.get("X-Auth-Token", "")
        if not token:
            return _unauthorized(keystone, "The request you have made requires authentication.")
        request[CALLER] = await request.app[KEYSTONE].validate(token)
        request[VERSION] = version
        response = await handler(request)
    except NovaFault as fault:
        if fault.status == 401:
            return _unauthorized(keystone, fault.message)
        return _fault(fault)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _fault(NovaFault(500, "Unexpected API Error. Please report this."))
    text = f"{version[0]}.{version[1]}"
    response.headers["OpenStack-API-Version"] = f"compute {text}"
    response.headers["X-OpenStack-Nova-API-Version"] = text
    response.headers["Vary"] = "OpenStack-API-Version, X-OpenStack-Nova-API-Version"
    return response


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError as exc:
        raise NovaFault(400, "Malformed request body") from exc
    if not isinstance(data, dict):
        raise NovaFault(400, "Malformed request body")
    return data


# -- views -------------------------------------------------------------------------------------


def attachment_view(server_id: str, bdm: Bdm, version: tuple[int, int]) -> dict[str, Any]:
    view: dict[str, Any] = {"device": bdm.device, "serverId": server_id, "volumeId": bdm.volume_id}
    if version < (2, 89):
        view["id"] = bdm.volume_id
    if version >= (2, 70):
        view["tag"] = bdm.tag
    if version >= (2, 79):
        view["delete_on_termination"] = bdm.delete_on_termination
    if version >= (2, 89):
        view["attachment_id"] = bdm.attachment_id
        view["bdm_uuid"] = bdm.bdm_uuid
    return view


def server_view(request: web.Request, server: Server) -> dict[str, Any]:
    spec = server.spec
    link = f"{request.url.origin()}/v2.1/servers/{spec.id}"
    return {
        "id": spec.id,
        "name": spec.name,
        "status": "ACTIVE",
        "tenant_id": spec.project_id,
        "user_id": request[CALLER].user_id,
        "metadata": {},
        "addresses": {},
        "hostId": "",
        "image": "",
        "flavor": {"original_name": "devcloud"},
        "created": "2026-01-01T00:00:00Z",
        "updated": "2026-01-01T00:00:00Z",
        "OS-EXT-STS:vm_state": "active",
        "OS-EXT-STS:task_state": None,
        "OS-EXT-STS:power_state": 1,
        "OS-EXT-AZ:availability_zone": "nova",
        "locked": False,
        "os-extended-volumes:volumes_attached": [
            {"id": b.volume_id, "delete_on_termination": b.delete_on_termination}
            for b in server.bdms.values()
        ],
        "links": [{"rel": "self", "href": link}, {"rel": "bookmark", "href": link}],
    }


# -- handlers ----------------------------------------------------------------------------------


async def versions(request: web.Request) -> web.Response:
    return _json({"versions": [_version_doc(request)]})


async def version(request: web.Request) -> web.Response:
    return _json({"version": _version_doc(request)})


async def list_servers(request: web.Request) -> web.Response:
    caller = request[CALLER]
    servers = [
        s for s in request.app[COMPUTE].servers.values() if s.spec.project_id == caller.project_id
    ]
    if request.path.rstrip("/").endswith("/detail"):
        return _json({"servers": [server_view(request, s) for s in servers]})
    return _json({"servers": [{"id": s.spec.id, "name": s.spec.name} for s in servers]})


async def show_server(request: web.Request) -> web.Response:
    server = request.app[COMPUTE].server(request[CALLER], request.match_info["server"])
    return _json({"server": server_view(request, server)})


async def list_attachments(request: web.Request) -> web.Response:
    server_id = request.match_info["server"]
    server = request.app[COMPUTE].server(request[CALLER], server_id)
    views = [attachment_view(server_id, b, request[VERSION]) for b in server.bdms.values()]
    return _json({"volumeAttachments": views})


async def show_attachment(request: web.Request) -> web.Response:
    server_id, volume_id = request.match_info["server"], request.match_info["volume"]
    bdm = request.app[COMPUTE].bdm(request[CALLER], server_id, volume_id)
    return _json({"volumeAttachment": attachment_view(server_id, bdm, request[VERSION])})


async def attach(request: web.Request) -> web.Response:
    server_id = request.match_info["server"]
    body = (await _body(request)).get("volumeAttachment")
    if not isinstance(body, dict) or not isinstance(body.get("volumeId"), str):
        raise NovaFault(400, "Invalid input for field/attribute volumeAttachment.volumeId")
    bdm = await request.app[COMPUTE].attach(
        request[CALLER],
        server_id,
        body["volumeId"],
        tag=body.get("tag"),
        delete_on_termination=bool(body.get("delete_on_termination", False)),
    )
    return _json({"volumeAttachment": attachment_view(server_id, bdm, request[VERSION])})


async def detach(request: web.Request) -> web.Response:
    server_id, volume_id = request.match_info["server"], request.match_info["volume"]
    await request.app[COMPUTE].detach(request[CALLER], server_id, volume_id)
    return web.Response(status=202)


async def external_events(request: web.Request) -> web.Response:
    events = (await _body(request)).get("events")
    answered, status = request.app[COMPUTE].external_events(
        request[CALLER], events, request[VERSION]
    )
    return _json({"events": answered}, status)


# -- the app -----------------------------------------------------------------------------------


async def _services(app: web.Application) -> AsyncIterator[None]:
    spec = app[SPEC]
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        keystone = Keystone(http, spec)
        compute = Compute(spec, keystone, Cinder(http, keystone))
        app[KEYSTONE] = keystone
        app[COMPUTE] = compute
        await compute.recover()
        yield
        # Short of the stop's SIGKILL; work cut off here is undone at the next start.
        await compute.drain(DRAIN_SECONDS)


def make_app(spec: NovaSpec) -> web.Application:
    app = web.Application(middlewares=[openstack_api], client_max_size=64 * 1024)
    app[SPEC] = spec
    app.cleanup_ctx.append(_services)
    servers = "/v2.1/servers/{server}"
    attachments = f"{servers}/os-volume_attachments"
    app.router.add_get("/", versions)
    app.router.add_get("/v2.1", version)
    app.router.add_get("/v2.1/", version)
    app.router.add_get("/v2.1/servers", list_servers)
    app.router.add_get("/v2.1/servers/detail", list_servers)
    app.router.add_get(servers, show_server)
    app.router.add_get(attachments, list_attachments)
    app.router.add_post(attachments, attach)
    app.router.add_get(f"{attachments}/{{volume}}", show_attachment)
    app.router.add_delete(f"{attachments}/{{volume}}", detach)
    app.router.add_post("/v2.1/os-server-external-events", external_events)
    return app


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    spec = NovaSpec.load(Path(args[0]))
    web.run_app(
        make_app(spec),
        host="127.0.0.1",
        port=spec.port,
        print=None,
        shutdown_timeout=5.0,
        access_log_format='%a "%r" %s %Tf',
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
