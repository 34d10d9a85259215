"""The Nova stand-in's logic: Nova's API side and compute side for volume attachments.

What real Nova does when a server's owner attaches a volume, kept in Nova's order:

- API (synchronous): validate the caller's token against Keystone, find the server
  in the caller's project, refuse a volume this server already has, *reserve* the
  volume by creating a Cinder attachment with the server's uuid (no connector), record
  a block device mapping (BDM) with a device name that must not be trusted, answer.
- compute (in the background, one operation at a time per server): update the
  attachment with this host's connector (Cinder answers with ``connection_info``),
  make the disk appear in the server (a :class:`~rbdplugin.devcloud.disks.DiskMaker`),
  then ``os-complete`` (volume ``in-use``). Any failure rolls back: disk removed,
  attachment deleted (volume ``available``), BDM dropped.
- detach: API calls ``os-begin_detaching`` (volume ``detaching``) and answers 202;
  compute removes the disk and deletes the attachment with Nova's *service token*
  (Cinder only lets a service delete an attachment that is connected to a server
  without asking Nova first). A disk the guest still uses rolls the detach back.
- external events (``POST /os-server-external-events``, from Cinder): answered at once
  per event as Nova does (200 ``completed``; 404 ``failed`` for an unknown server; 400
  ``failed`` for a ``volume-extended`` without its volume id as tag). For
  ``volume-extended`` the compute side then reads the volume's new size from Cinder
  and grows the server's disk to it (libvirt's ``block_resize``); a volume the server
  does not have is only logged, as Nova's compute does.

Every Cinder call carries the user's token plus our service token, as Nova sends it
(an expired user token is then still accepted). BDMs are persisted atomically, so
after a stop the server's disks come back (``recover``), and operations that a crash
interrupted are undone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from rbdplugin.devcloud.disks import Disk, DiskMaker, HostPlaces, make_disk_maker
from rbdplugin.errors import RbdPluginError

log = logging.getLogger("devcloud.nova")

CINDER_VERSION = "volume 3.71"
GiB = 1 << 30
# Nova's external event names, from the microversion that brought each.
EVENT_NAMES: Mapping[str, tuple[int, int]] = {
    "network-changed": (2, 1),
    "network-vif-plugged": (2, 1),
    "network-vif-unplugged": (2, 1),
    "network-vif-deleted": (2, 1),
    "volume-extended": (2, 51),
    "power-update": (2, 76),
    "accelerator-request-bound": (2, 82),
    "volume-reimaged": (2, 93),
}
TAG_REQUIRED = frozenset({"volume-extended", "power-update", "accelerator-request-bound"})
EVENT_STATUSES = frozenset({"failed", "completed", "in-progress"})
TOKEN_CACHE_SECONDS = 60.0
HTTP_TIMEOUT = 30.0


class NovaFault(Exception):
    """An answer of Nova's API that is not a success: HTTP status, fault kind, message."""

    KINDS: Mapping[int, str] = {
        400: "badRequest",
        401: "unauthorized",
        403: "forbidden",
        404: "itemNotFound",
        409: "conflict",
        500: "computeFault",
        503: "serviceUnavailable",
    }

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def kind(self) -> str:
        return self.KINDS.get(self.status, "computeFault")


class CinderFault(NovaFault):
    """Cinder refused or failed; Nova passes 400/404 on and calls the rest a fault."""


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    id: str
    name: str
    project_id: str
    disks: str  # a key of disks.DISK_MAKERS
    qmp: str = ""  # the QMP socket of the server's QEMU (the "qmp" disk maker)


@dataclass(frozen=True)
class NovaSpec:
    port: int
    keystone_url: str  # .../v3
    user: str
    password_file: Path
    project: str  # the service project the user logs in to
    servers: tuple[ServerSpec, ...]
    ceph_dir: Path
    exports: Path
    state: Path
    by_id: Path
    timeout: float

    @classmethod
    def load(cls, path: Path) -> NovaSpec:
        data = json.loads(path.read_text())
        return cls(
            port=int(data["port"]),
            keystone_url=data["keystone_url"],
            user=data["user"],
            password_file=Path(data["password_file"]),
            project=data["project"],
            servers=tuple(ServerSpec(**s) for s in data["servers"]),
            ceph_dir=Path(data["ceph_dir"]),
            exports=Path(data["exports"]),
            state=Path(data["state"]),
            by_id=Path(data["by_id"]),
            timeout=float(data["timeout"]),
        )


# -- Keystone ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """A validated token: who calls, in which project, with which roles and catalog."""

    token: str
    user_id: str
    project_id: str
    roles: frozenset[str]
    cinder_url: str


class Keystone:
    """Our service identity (``nova`` in the service project) and token validation."""

    def __init__(self, http: aiohttp.ClientSession, spec: NovaSpec) -> None:
        self.http = http
        self.spec = spec
        self._token = ""
        self._token_until = 0.0
        self._cache: dict[str, tuple[Caller, float]] = {}

    @property
    def www_authenticate(self) -> str:
        return f'Keystone uri="{self.spec.keystone_url.removesuffix("/v3")}"'

    async def service_token(self, fresh: bool = False) -> str:
        if fresh or time.monotonic() > self._token_until:
            await self._login()
        return self._token

    async def _login(self) -> None:
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": self.spec.user,
                            "domain": {"id": "default"},
                            "password": self.spec.password_file.read_text().strip(),
                        }
                    },
                },
                "scope": {"project": {"name": self.spec.project, "domain": {"id": "default"}}},
            }
        }
        url = f"{self.spec.keystone_url}/auth/tokens?nocatalog"
        async with self.http.post(url, json=body) as response:
            if response.status != 201:
                text = await response.text()
                raise NovaFault(503, f"the Nova stand-in cannot log in to Keystone: {text}")
            data = await response.json()
            self._token = response.headers["X-Subject-Token"]
        left = _seconds_left(data["token"]["expires_at"])
        # Renew well before expiry, also with the very short lifetimes some tests use.
        self._token_until = time.monotonic() + max(left - 60, left / 2)

    async def validate(self, token: str) -> Caller:
        """The caller behind ``token``; NovaFault(401) if Keystone does not know it."""
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        data = await self._validate(token)
        caller = _caller(token, data["token"])
        until = min(
            time.monotonic() + TOKEN_CACHE_SECONDS,
            time.monotonic() + _seconds_left(data["token"]["expires_at"]),
        )
        self._cache = {k: v for k, v in self._cache.items() if v[1] > time.monotonic()}
        self._cache[key] = (caller, until)
        return caller

    async def _validate(self, token: str) -> dict[str, Any]:
        for fresh in (False, True):
            headers = {"X-Auth-Token": await self.service_token(fresh), "X-Subject-Token": token}
            async with self.http.get(
                f"{self.spec.keystone_url}/auth/tokens", headers=headers
            ) as response:
                if response.status == 200:
                    data: dict[str, Any] = await response.json()
                    return data
                if response.status == 401 and not fresh:
                    continue  # our own token expired or was revoked: log in again once
                if response.status in (401, 404):
                    break
                text = await response.text()
                raise NovaFault(
                    503, f"Keystone failed to validate a token ({response.status}): {text[:300]}"
                )
        raise NovaFault(401, "The request you have made requires authentication.")


def _seconds_left(expires_at: str) -> float:
    expires = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    return (expires - datetime.now(UTC)).total_seconds()


def _caller(token: str, info: dict[str, Any]) -> Caller:
    project = info.get("project") or {}
    if not project.get("id"):
        raise NovaFault(403, "a project-scoped token is required")
    return Caller(
        token=token,
        user_id=info["user"]["id"],
        project_id=project["id"],
        roles=frozenset(role["name"] for role in info.get("roles", [])),
        cinder_url=_endpoint(info.get("catalog", []), "volumev3"),
    )


def _endpoint(catalog: list[dict[str, Any]], kind: str) -> str:
    for service in catalog:
        if service.get("type") == kind:
            for endpoint in service.get("endpoints", []):
                if endpoint.get("interface") == "public":
                    return str(endpoint["url"]).rstrip("/")
    return ""


# -- Cinder --------------------------------------------------------------------------------


class Cinder:
    """The Cinder calls Nova makes, with the user's token plus our service token."""

    def __init__(self, http: aiohttp.ClientSession, keystone: Keystone) -> None:
        self.http = http
        self.keystone = keystone

    async def call(
        self, method: str, url: str, user_token: str | None, body: Any = None
    ) -> dict[str, Any]:
        service = await self.keystone.service_token()
        headers = {
            "X-Auth-Token": user_token or service,
            "X-Service-Token": service,
            "OpenStack-API-Version": CINDER_VERSION,
            "Accept": "application/json",
        }
        try:
            async with self.http.request(method, url, headers=headers, json=body) as response:
                text = await response.text()
                if response.status >= 400:
                    raise CinderFault(_cinder_status(response.status), _cinder_message(text))
                data: dict[str, Any] = json.loads(text) if text.strip() else {}
                return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CinderFault(503, f"Cinder did not answer {method} {url}: {exc}") from exc


def _cinder_status(status: int) -> int:
    return status if status in (400, 404, 409) else 500


def _cinder_message(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500] or "no message"
    if isinstance(data, dict):
        for fault in data.values():
            if isinstance(fault, dict) and "message" in fault:
                return str(fault["message"])
    return text.strip()[:500]


def _checked_events(events: object, version: tuple[int, int]) -> list[dict[str, Any]]:
    """The request's events, validated as Nova's schema does (400 for the whole request)."""
    if not isinstance(events, list) or not events:
        raise NovaFault(400, "Invalid input for field/attribute events.")
    checked = []
    for event in events:
        if not isinstance(event, dict) or set(event) - {"name", "server_uuid", "status", "tag"}:
            raise NovaFault(400, "Invalid input for field/attribute events.")
        since = EVENT_NAMES.get(event.get("name"))  # type: ignore[arg-type]
        if since is None or version < since:
            raise NovaFault(400, f"Invalid input for field/attribute name: {event.get('name')!r}")
        if not isinstance(event.get("server_uuid"), str):
            raise NovaFault(400, "Invalid input for field/attribute server_uuid.")
        if event.get("status", "completed") not in EVENT_STATUSES:
            raise NovaFault(400, "Invalid input for field/attribute status.")
        if not isinstance(event.get("tag", ""), str):
            raise NovaFault(400, "Invalid input for field/attribute tag.")
        checked.append(event)
    return checked


def nova_connection_info(attachment: Mapping[str, Any]) -> dict[str, Any]:
    """Cinder's flat ``connection_info`` in the shape Nova keeps it: type + ``data``."""
    info = dict(attachment.get("connection_info") or {})
    if not info or "data" in info:
        return info
    kind = info.pop("driver_volume_type", None)
    return {"driver_volume_type": kind, "data": info}


def _without_project(cinder_url: str) -> str:
    """``http://host:port/v3/<project id>`` -> ``http://host:port/v3``."""
    head, _, last = cinder_url.rstrip("/").rpartition("/")
    return head if re.fullmatch(r"[0-9a-f]{32}", last) else cinder_url


# -- state ---------------------------------------------------------------------------------


@dataclass
class Bdm:
    """A block device mapping: one volume of one server, from reservation to detach."""

    volume_id: str
    attachment_id: str
    device: str
    cinder_url: str
    status: str = "attaching"  # attaching -> attached -> detaching -> (gone)
    bdm_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    tag: str | None = None
    delete_on_termination: bool = False
    connection_info: dict[str, Any] = field(default_factory=dict)

    @property
    def disk(self) -> Disk:
        return Disk(self.volume_id, self.connection_info)


@dataclass
class Server:
    spec: ServerSpec
    maker: DiskMaker
    bdms: dict[str, Bdm] = field(default_factory=dict)
    # Nova's compute manager serialises a server's attach/detach work on the instance.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def free_device(self) -> str:
        taken = {bdm.device for bdm in self.bdms.values()}
        for letter in "bcdefghijklmnopqrstuvwxyz":
            if f"/dev/vd{letter}" not in taken:
                return f"/dev/vd{letter}"
        raise NovaFault(400, f"server {self.spec.id} has no free device name left")


def server_places(places: HostPlaces, server: ServerSpec) -> HostPlaces:
    """``places`` with the server's own QMP socket, if it has one."""
    return replace(places, qmp_socket=Path(server.qmp)) if server.qmp else places


# -- the stand-in ---------------------------------------------------------------------------


class Compute:
    """Nova for volume attachments: the API answers, the compute work runs behind."""

    def __init__(self, spec: NovaSpec, keystone: Keystone, cinder: Cinder) -> None:
        self.spec = spec
        self.keystone = keystone
        self.cinder = cinder
        places = HostPlaces(ceph_dir=spec.ceph_dir, exports=spec.exports, by_id=spec.by_id)
        self.servers = {
            s.id: Server(s, make_disk_maker(s.disks, server_places(places, s), spec.timeout))
            for s in spec.servers
        }
        self.tasks: set[asyncio.Task[None]] = set()
        self.connector_host = socket.gethostname()

    # -- API side ------------------------------------------------------------------------------

    def server(self, caller: Caller, server_id: str) -> Server:
        server = self.servers.get(server_id)
        if server is None or (
            server.spec.project_id != caller.project_id and "admin" not in caller.roles
        ):
            raise NovaFault(404, f"Instance {server_id} could not be found.")
        return server

    def check_member(self, caller: Caller) -> None:
        if not caller.roles & {"member", "admin"}:
            raise NovaFault(403, "Policy doesn't allow this operation to be performed.")

    async def attach(
        self,
        caller: Caller,
        server_id: str,
        volume_id: str,
        tag: str | None = None,
        delete_on_termination: bool = False,
    ) -> Bdm:
        self.check_member(caller)
        server = self.server(caller, server_id)
        if not caller.cinder_url:
            raise NovaFault(500, "no volumev3 endpoint in the caller's service catalog")
        if volume_id in server.bdms:
            raise NovaFault(400, f"Invalid volume: volume {volume_id} already attached")
        volume_url = f"{caller.cinder_url}/volumes/{volume_id}"
        await self.cinder.call("GET", volume_url, caller.token)
        reserved = await self.cinder.call(
            "POST",
            f"{caller.cinder_url}/attachments",
            caller.token,
            {"attachment": {"volume_uuid": volume_id, "instance_uuid": server_id}},
        )
        bdm = Bdm(
            volume_id,
            reserved["attachment"]["id"],
            server.free_device(),
            caller.cinder_url,
            tag=tag,
            delete_on_termination=delete_on_termination,
        )
        server.bdms[volume_id] = bdm
        self.save()
        self._behind(self._attach_work(server, bdm, caller.token), f"attach {volume_id}")
        return bdm

    async def detach(self, caller: Caller, server_id: str, volume_id: str) -> None:
        self.check_member(caller)
        server = self.server(caller, server_id)
        bdm = server.bdms.get(volume_id)
        if bdm is None:
            raise NovaFault(404, f"volume_id not found: {volume_id}")
        action = f"{bdm.cinder_url}/volumes/{volume_id}/action"
        await self.cinder.call("POST", action, caller.token, {"os-begin_detaching": None})
        bdm.status = "detaching"
        self.save()
        self._behind(self._detach_work(server, bdm, caller.token), f"detach {volume_id}")

    def bdm(self, caller: Caller, server_id: str, volume_id: str) -> Bdm:
        bdm = self.server(caller, server_id).bdms.get(volume_id)
        if bdm is None:
            raise NovaFault(404, f"Volume {volume_id} is not attached to {server_id}.")
        return bdm

    def external_events(
        self, caller: Caller, events: object, version: tuple[int, int]
    ) -> tuple[list[dict[str, Any]], int]:
        """Nova's answer to Cinder's events: each event back with ``code`` and ``status``,
        and the HTTP status (207 if any failed); the accepted work runs behind."""
        if not caller.roles & {"service", "admin"}:
            raise NovaFault(
                403,
                "Policy doesn't allow os_compute_api:os-server-external-events:create "
                "to be performed.",
            )
        checked = _checked_events(events, version)
        answered: list[dict[str, Any]] = []
        accepted = 0
        for event in checked:
            server = self.servers.get(event["server_uuid"])
            if server is None:
                answered.append({**event, "status": "failed", "code": 404})
                continue
            if event["name"] in TAG_REQUIRED and event.get("tag") is None:
                answered.append({**event, "status": "failed", "code": 400})
                continue
            accepted += 1
            answered.append({**event, "status": "completed", "code": 200})
            if event["name"] == "volume-extended":
                volume_id = str(event["tag"])
                self._behind(self._extend_work(server, volume_id), f"extend {volume_id}")
        if not accepted:
            raise NovaFault(404, "No instances found for any event")
        return answered, 200 if accepted == len(checked) else 207

    # -- compute side --------------------------------------------------------------------------

    def _behind(self, work: Awaitable[None], what: str) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def connector(self, server: Server, device: str) -> dict[str, Any]:
        return {
            "platform": "x86_64",
            "os_type": "linux",
            "ip": "127.0.0.1",
            "host": self.connector_host,
            "multipath": False,
            "do_local_attach": False,
            "initiator": f"iqn.2004-10.org.rbdplugin:devcloud:{server.spec.name}",
            "system uuid": server.spec.id,
            "mountpoint": device,
            "mode": "rw",
        }

    async def _attach_work(self, server: Server, bdm: Bdm, token: str) -> None:
        async with server.lock:
            started = time.monotonic()
            attachment = f"{bdm.cinder_url}/attachments/{bdm.attachment_id}"
            try:
                updated = await self.cinder.call(
                    "PUT",
                    attachment,
                    token,
                    {"attachment": {"connector": self.connector(server, bdm.device)}},
                )
                bdm.connection_info = nova_connection_info(updated["attachment"])
                self.save()
                device = await server.maker.plug(bdm.disk)
                await self.cinder.call("POST", f"{attachment}/action", token, {"os-complete": None})
            except BaseException as exc:
                log.warning(
                    "attach of %s to %s failed, rolling back: %s",
                    bdm.volume_id,
                    server.spec.id,
                    exc,
                )
                await asyncio.shield(self._undo(server, bdm, token))
                raise
            bdm.status = "attached"
            self.save()
            log.info(
                "volume %s attached to %s as %s (here: %s) in %.2f s",
                bdm.volume_id,
                server.spec.id,
                bdm.device,
                device or "-",
                time.monotonic() - started,
            )

    async def _undo(self, server: Server, bdm: Bdm, token: str | None) -> None:
        """Remove the disk and the Cinder attachment, drop the BDM (volume available).

        Without the user's token (recovery after a restart) the delete goes as our own
        admin service user, to the URL without the project id (microversion 3.67+):
        Cinder refuses a project in the URL that is not the token's own."""
        try:
            if bdm.connection_info:
                await server.maker.unplug(bdm.disk)
        finally:
            base = bdm.cinder_url if token else _without_project(bdm.cinder_url)
            try:
                await self.cinder.call("DELETE", f"{base}/attachments/{bdm.attachment_id}", token)
            except CinderFault as exc:
                log.error("could not delete attachment %s of volume %s: %s",
                          bdm.attachment_id, bdm.volume_id, exc)  # fmt: skip
            server.bdms.pop(bdm.volume_id, None)
            self.save()

    async def _detach_work(self, server: Server, bdm: Bdm, token: str) -> None:
        async with server.lock:
            try:
                if bdm.connection_info:
                    await server.maker.unplug(bdm.disk)
            except BaseException as exc:
                log.warning(
                    "detach of %s from %s failed, rolling back: %s",
                    bdm.volume_id,
                    server.spec.id,
                    exc,
                )
                bdm.status = "attached"
                self.save()
                await asyncio.shield(
                    self.cinder.call(
                        "POST",
                        f"{bdm.cinder_url}/volumes/{bdm.volume_id}/action",
                        token,
                        {"os-roll_detaching": None},
                    )
                )
                raise
            await self.cinder.call(
                "DELETE", f"{bdm.cinder_url}/attachments/{bdm.attachment_id}", token
            )
            server.bdms.pop(bdm.volume_id, None)
            self.save()
            log.info("volume %s detached from %s", bdm.volume_id, server.spec.id)

    async def _extend_work(self, server: Server, volume_id: str) -> None:
        """Nova's compute ``extend_volume``: the disk takes the volume's new size."""
        async with server.lock:
            bdm = server.bdms.get(volume_id)
            if bdm is None or bdm.status != "attached":
                log.warning("extend of volume %s failed: it is not attached to %s",
                            volume_id, server.spec.id)  # fmt: skip
                return
            # As our own (admin) service user: the URL without the user's project id.
            url = f"{_without_project(bdm.cinder_url)}/volumes/{volume_id}"
            volume = (await self.cinder.call("GET", url, None))["volume"]
            size = int(volume["size"]) * GiB
            await server.maker.grow(bdm.disk, size)
            log.info("volume %s of %s grown to %d GiB", volume_id, server.spec.id,
                     size // GiB)  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------------

    def save(self) -> None:
        data = {sid: [asdict(b) for b in s.bdms.values()] for sid, s in self.servers.items()}
        tmp = self.spec.state.with_name(self.spec.state.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.spec.state)

    def load(self) -> None:
        if not self.spec.state.exists():
            return
        for sid, bdms in json.loads(self.spec.state.read_text()).items():
            if sid in self.servers:
                self.servers[sid].bdms = {b["volume_id"]: Bdm(**b) for b in bdms}

    async def recover(self) -> None:
        """After a start: attached disks come back; interrupted operations are undone."""
        self.load()
        for server in self.servers.values():
            for bdm in list(server.bdms.values()):
                try:
                    await self._recover(server, bdm)
                except (RbdPluginError, NovaFault, OSError) as exc:
                    log.error(
                        "recovering volume %s of %s failed: %s", bdm.volume_id, server.spec.id, exc
                    )

    async def _recover(self, server: Server, bdm: Bdm) -> None:
        if bdm.status == "attached":
            if not await server.maker.present(bdm.disk):
                await server.maker.plug(bdm.disk)
                log.info("volume %s is back in %s", bdm.volume_id, server.spec.id)
            return
        log.warning("volume %s: %s was interrupted; undoing it", bdm.volume_id, bdm.status)
        await self._undo(server, bdm, None)

    async def drain(self, timeout: float) -> None:
        """Let running attach/detach work finish (a stop), up to ``timeout``."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
