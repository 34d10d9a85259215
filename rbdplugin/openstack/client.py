"""Keystone, Cinder and Nova for Cinder-attach mode, through openstacksdk.

A thin, typed layer: openstacksdk reads ``clouds.yaml`` and keystoneauth keeps the
session (a new token before the old one expires, and one retry with a new token when
a service answers 401), so this module only shapes requests and answers into
:class:`Volume`, :class:`Attachment` and :class:`Limits`, and translates
openstacksdk's and keystoneauth's exceptions into :mod:`rbdplugin.errors`, here and
only here. Everything else of the SDK stays behind :class:`OpenStackClient`, typed
``Any`` at this edge.

Every call is synchronous and meant to run off the event loop (``asyncio.to_thread``).
Every HTTP request is bounded by :attr:`CloudSettings.timeout`; one method may make a
few (a token, version discovery on first use, the request, a retry with a new token),
so callers keep their own deadline around the whole call.

Secrets (the application credential's secret, passwords, tokens) never reach our
messages, logs or reprs: only the cloud's name, the clouds.yaml path and URLs do.
keystoneauth itself never logs authentication bodies and logs tokens only as hashes.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keystoneauth1.exceptions as ksa
import openstack.config
import openstack.connection
import openstack.exceptions as sdk

from rbdplugin.errors import (
    ConfigError,
    Conflict,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    OpenStackError,
    OpenStackUnavailable,
    PermissionDenied,
    QuotaExceeded,
    RbdPluginError,
    VolumeBusy,
    VolumeFailed,
)

log = logging.getLogger(__name__)

KEYSTONE, CINDER, NOVA = "Keystone", "Cinder", "Nova"
# Cinder's microversions: user messages came with 3.3, growing an in-use volume with
# 3.42 (below it Cinder refuses os-extend on an attached volume); plain v3 for the rest.
MESSAGES_MICROVERSION = "3.3"
EXTEND_IN_USE_MICROVERSION = "3.42"
# Where a volume can end up when something went wrong on Cinder's side.
FAILED_STATUSES = frozenset({"error", "error_deleting", "error_extending", "error_restoring"})
POLL_SECONDS = 0.5
_URL_RE = re.compile(r"https?://[^\s/:'\"]+(?::\d+)?")


@dataclass(frozen=True)
class CloudSettings:
    """Which cloud to use and how long one HTTP request may take."""

    cloud: str
    # None: openstacksdk's search path (./clouds.yaml, ~/.config/openstack, /etc/openstack).
    clouds_yaml: Path | None = None
    timeout: float = 10.0
    region: str | None = None


@dataclass(frozen=True)
class Attachment:
    """A volume attached to a server, as Cinder or Nova tells it.

    ``device`` is Nova's guess at the guest's device name: never use it to find the disk.
    """

    volume_id: str
    server_id: str
    attachment_id: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size_gib: int
    status: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    volume_type: str | None = None
    availability_zone: str | None = None
    attachments: tuple[Attachment, ...] = ()
    created_at: str | None = None

    @property
    def servers(self) -> tuple[str, ...]:
        """The servers this volume is attached to (Cinder's view)."""
        return tuple(dict.fromkeys(a.server_id for a in self.attachments))


@dataclass(frozen=True)
class Snapshot:
    """A Cinder snapshot of a volume."""

    id: str
    name: str
    volume_id: str
    size_gib: int
    status: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    created_at: str | None = None


def snapshot_from(data: Mapping[str, Any]) -> Snapshot:
    """A :class:`Snapshot` from Cinder's JSON (or an SDK resource's ``to_dict()``)."""
    metadata = data.get("metadata") or {}
    return Snapshot(
        id=str(data["id"]),
        name=str(data.get("name") or ""),
        volume_id=str(data.get("volume_id") or ""),
        size_gib=int(data.get("size") or 0),
        status=str(data.get("status") or ""),
        metadata={str(k): str(v) for k, v in metadata.items()},
        created_at=_str_or_none(data.get("created_at")),
    )


@dataclass(frozen=True)
class Limits:
    """The project's Cinder usage and quota; ``None`` is unlimited."""

    volumes_used: int
    volumes_max: int | None
    gigabytes_used: int
    gigabytes_max: int | None


def _str_or_none(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _attachment(data: Mapping[str, Any], volume_id: str | None = None) -> Attachment:
    return Attachment(
        volume_id=str(data.get("volume_id") or data.get("volumeId") or volume_id or ""),
        server_id=str(data.get("server_id") or data.get("serverId") or ""),
        attachment_id=_str_or_none(data.get("attachment_id")),
        device=_str_or_none(data.get("device")),
    )


def volume_from(data: Mapping[str, Any]) -> Volume:
    """A :class:`Volume` from Cinder's JSON (or an SDK resource's ``to_dict()``)."""
    volume_id = str(data["id"])
    metadata = data.get("metadata") or {}
    return Volume(
        id=volume_id,
        name=str(data.get("name") or ""),
        size_gib=int(data.get("size") or 0),
        status=str(data.get("status") or ""),
        metadata={str(k): str(v) for k, v in metadata.items()},
        volume_type=_str_or_none(data.get("volume_type")),
        availability_zone=_str_or_none(data.get("availability_zone")),
        attachments=tuple(_attachment(a, volume_id) for a in data.get("attachments") or ()),
        created_at=_str_or_none(data.get("created_at")),
    )


def _unlimited(value: Any) -> int | None:
    number = int(value if value is not None else -1)
    return None if number < 0 else number


# -- error translation ---------------------------------------------------------------------


def _details(exc: sdk.HttpException) -> str:
    """The service's own message (Cinder's and Nova's fault bodies), else the status."""
    text = str(exc.details or "").strip()
    return text or f"HTTP {exc.status_code}"


def _http_error(status: int | None, service: str, what: str, details: str) -> RbdPluginError:
    message = f"{service} refused {what}: {details}"
    if status == 400:
        return InvalidArgument(message)
    if status in (401, 403):
        return PermissionDenied(f"{message} (check the cloud's credentials and roles)")
    if status == 404:
        return NotFound(message)
    if status == 409:
        return Conflict(message)
    if status == 413:
        return QuotaExceeded(message)
    if status in (502, 503, 504):
        return OpenStackUnavailable(f"{service} is unavailable ({what}): {details}")
    return OpenStackError(f"{service} failed {what}: {details}")


class Translator:
    """Turns the SDK's and keystoneauth's exceptions into ours for one cloud."""

    def __init__(self, cloud: str, keystone_url: str) -> None:
        self.cloud = cloud
        self.keystone = urllib.parse.urlsplit(keystone_url).netloc

    def service_of(self, exc: BaseException, service: str) -> str:
        """Keystone if the failed request went there, else the service being called."""
        if isinstance(exc, ksa.HttpError) and not isinstance(exc, ksa.HttpServerError):
            return KEYSTONE  # the SDK raises its own HTTP errors; ksa's come from auth
        urls = _URL_RE.findall(str(exc))
        if self.keystone and any(urllib.parse.urlsplit(u).netloc == self.keystone for u in urls):
            return KEYSTONE
        return service

    def translate(self, exc: Exception, service: str, what: str) -> RbdPluginError:
        if isinstance(exc, RbdPluginError):
            return exc
        if isinstance(exc, sdk.HttpException):
            return _http_error(exc.status_code, service, what, _details(exc))
        if isinstance(exc, ksa.ConnectionError):
            where = self.service_of(exc, service)
            kind = "timed out" if isinstance(exc, ksa.ConnectTimeout) else "unreachable"
            return OpenStackUnavailable(
                f"{where} {kind} ({what}, cloud {self.cloud!r}): {_last_part(exc)}"
            )
        if isinstance(exc, ksa.Unauthorized):
            return PermissionDenied(
                f"Keystone refused cloud {self.cloud!r}'s credentials ({what}): check the "
                "application credential or password in clouds.yaml"
            )
        if isinstance(exc, ksa.HttpError):
            where = self.service_of(exc, service)
            return _http_error(exc.http_status, where, what, exc.message or str(exc))
        if isinstance(exc, ksa.EndpointNotFound | sdk.EndpointNotFound):
            return ConfigError(
                f"cloud {self.cloud!r} has no {service} endpoint in its catalog ({what}): "
                f"check region_name and interface in clouds.yaml ({exc})"
            )
        if isinstance(exc, ksa.DiscoveryFailure):
            return OpenStackUnavailable(f"{service} version discovery failed ({what}): {exc}")
        if isinstance(exc, ksa.AuthPluginException | ksa.MissingRequiredOptions):
            return ConfigError(f"cloud {self.cloud!r} cannot authenticate ({what}): {exc}")
        if isinstance(exc, sdk.SDKException | ksa.ClientException):
            return OpenStackError(f"{service} failed {what}: {exc}")
        return OpenStackError(f"{service} failed {what}: {type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def calling(self, service: str, what: str) -> Iterator[None]:
        try:
            yield
        except RbdPluginError:
            raise
        except Exception as exc:
            raise self.translate(exc, service, what) from exc


def _last_part(exc: BaseException) -> str:
    """keystoneauth's message without urllib3's nested reprs: the URL and the cause."""
    text = str(exc)
    for marker in ("Failed to establish a new connection: ", "Read timed out", "timed out"):
        if marker in text:
            tail = text.split(marker, 1)[1].split("'))", 1)[0].strip(" :(")
            url = next(iter(_URL_RE.findall(text)), "")
            cause = tail or marker.strip(": ")
            return f"{url}: {cause}" if url else cause
    return text


# -- connecting --------------------------------------------------------------------------------


def load_cloud(settings: CloudSettings) -> Any:
    """openstacksdk's CloudRegion for ``settings`` (ConfigError when missing or invalid)."""
    files = [str(settings.clouds_yaml)] if settings.clouds_yaml is not None else None
    if settings.clouds_yaml is not None and not settings.clouds_yaml.is_file():
        raise ConfigError(f"clouds.yaml {settings.clouds_yaml} does not exist")
    try:
        config = openstack.config.OpenStackConfig(
            config_files=files,
            secure_files=[] if files else None,
            vendor_files=[] if files else None,
            load_envvars=False,  # the daemon's environment must not choose the cloud
        )
        options: dict[str, Any] = {"api_timeout": settings.timeout}
        if settings.region:
            options["region_name"] = settings.region
        return config.get_one(cloud=settings.cloud, **options)
    except (sdk.SDKException, ksa.ClientException, OSError, ValueError) as exc:
        where = settings.clouds_yaml or "clouds.yaml on the standard search path"
        raise ConfigError(f"cloud {settings.cloud!r} from {where}: {exc}") from exc


def connect(settings: CloudSettings) -> OpenStackClient:
    """A client for ``settings.cloud``. Makes no request: the first call authenticates."""
    region = load_cloud(settings)
    auth_url = str(region.config.get("auth", {}).get("auth_url") or "")
    if not auth_url:
        raise ConfigError(f"cloud {settings.cloud!r} has no auth_url in clouds.yaml")
    connection = openstack.connection.Connection(config=region)
    return OpenStackClient(connection, settings, auth_url)


class OpenStackClient:
    """One project's view of Cinder and Nova, authenticated as the cloud's credential."""

    def __init__(self, connection: Any, settings: CloudSettings, auth_url: str) -> None:
        self._conn = connection
        self.settings = settings
        self.auth_url = auth_url
        self.errors = Translator(settings.cloud, auth_url)
        self._lock = threading.Lock()  # the SDK builds each proxy (discovery) on first use

    def __repr__(self) -> str:
        return f"OpenStackClient(cloud={self.settings.cloud!r}, auth_url={self.auth_url!r})"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()

    # -- the SDK's edge --------------------------------------------------------------------

    @property
    def session(self) -> Any:
        """keystoneauth's Session (tests reach the auth plugin through it)."""
        return self._conn.session

    def _cinder(self) -> Any:
        with self._lock:
            return self._conn.block_storage

    def _nova(self) -> Any:
        with self._lock:
            return self._conn.compute

    def _json(self, response: Any) -> dict[str, Any]:
        sdk.raise_from_response(response)
        data: dict[str, Any] = response.json()
        return data

    # -- identity ------------------------------------------------------------------------------

    @property
    def project_id(self) -> str:
        with self.errors.calling(KEYSTONE, "logging in"):
            return str(self._conn.current_project_id)

    def authenticate(self) -> str:
        """Log in now (or reuse a valid token); return the project id."""
        return self.project_id

    # -- volumes -----------------------------------------------------------------------------

    def create_volume(
        self,
        size_gib: int,
        name: str,
        *,
        metadata: Mapping[str, str],
        volume_type: str | None = None,
        availability_zone: str | None = None,
        snapshot_id: str | None = None,
    ) -> Volume:
        """Ask Cinder for a volume, blank or from ``snapshot_id`` (its data, at least its
        size); it is ``creating`` (see :meth:`wait_for_volume`)."""
        if size_gib < 1:
            raise InvalidArgument(f"volume {name}: size must be at least 1 GiB, not {size_gib}")
        attrs: dict[str, Any] = {"size": size_gib, "name": name, "metadata": dict(metadata)}
        if volume_type:
            attrs["volume_type"] = volume_type
        if availability_zone:
            attrs["availability_zone"] = availability_zone
        if snapshot_id:
            attrs["snapshot_id"] = snapshot_id
        origin = f" from snapshot {snapshot_id}" if snapshot_id else ""
        with self.errors.calling(CINDER, f"creating volume {name} ({size_gib} GiB){origin}"):
            created = self._cinder().create_volume(**attrs)
            return volume_from(created.to_dict(computed=False))

    def get_volume(self, volume_id: str) -> Volume:
        with self.errors.calling(CINDER, f"reading volume {volume_id}"):
            return volume_from(self._cinder().get_volume(volume_id).to_dict(computed=False))

    def list_volumes(self, metadata: Mapping[str, str] | None = None) -> list[Volume]:
        """This project's volumes carrying every ``metadata`` key with its value.

        Cinder filters on the server (``?metadata={...}``, every page followed), and the
        answer is checked again here: a filter a cloud's policy ignores must not let a
        stranger's volume through. (openstacksdk 4.22's ``volumes(metadata=...)`` drops
        Cinder's matches on the client side, so the listing is requested directly.)
        """
        wanted = dict(metadata or {})
        params: dict[str, str] = {"metadata": repr(wanted)} if wanted else {}
        found: list[Volume] = []
        with self.errors.calling(CINDER, "listing volumes"):
            cinder = self._cinder()
            url: str | None = "/volumes/detail"
            while url:
                data = self._json(cinder.get(url, params=params))
                found += [volume_from(v) for v in data.get("volumes") or ()]
                url = next((link["href"] for link in data.get("volumes_links") or ()
                            if link.get("rel") == "next"), None)  # fmt: skip
                params = {}  # the next link carries the query
        return [v for v in found if all(v.metadata.get(k) == val for k, val in wanted.items())]

    def find_volume(self, metadata: Mapping[str, str]) -> Volume | None:
        """The one volume carrying ``metadata``; None if there is none.

        Conflict when several do (an earlier create was retried after its answer was lost):
        the caller decides which to keep, nothing here picks one silently."""
        found = self.list_volumes(metadata)
        if len(found) > 1:
            ids = ", ".join(sorted(v.id for v in found))
            raise Conflict(f"several Cinder volumes carry {dict(metadata)}: {ids}")
        return found[0] if found else None

    def set_metadata(self, volume_id: str, values: Mapping[str, str]) -> None:
        """Set (add or replace) metadata keys of the volume; Cinder allows it while in use."""
        with self.errors.calling(CINDER, f"updating volume {volume_id}'s metadata"):
            response = self._cinder().post(
                f"/volumes/{volume_id}/metadata", json={"metadata": dict(values)}
            )
            self._json(response)

    def unset_metadata(self, volume_id: str, key: str) -> None:
        """Remove one metadata key of the volume (no error if it is absent)."""
        with self.errors.calling(CINDER, f"updating volume {volume_id}'s metadata"):
            response = self._cinder().delete(f"/volumes/{volume_id}/metadata/{key}")
            if response.status_code != 404:
                sdk.raise_from_response(response)

    def volume_failure(self, volume_id: str) -> str:
        """Cinder's user messages about ``volume_id``, newest first ('' if none)."""
        with self.errors.calling(CINDER, f"reading Cinder's messages about volume {volume_id}"):
            response = self._cinder().get(
                "/messages",
                params={"resource_uuid": volume_id, "sort": "created_at:desc"},
                microversion=MESSAGES_MICROVERSION,
            )
            messages = self._json(response).get("messages") or ()
        texts = [str(m.get("user_message") or "") for m in messages
                 if m.get("resource_uuid") == volume_id]  # fmt: skip
        return "; ".join(dict.fromkeys(t for t in texts if t))

    def wait_for_volume(
        self,
        volume_id: str,
        statuses: Collection[str],
        timeout: float,
        *,
        failures: Collection[str] = FAILED_STATUSES,
        interval: float = POLL_SECONDS,
    ) -> Volume:
        """Poll until the volume's status is in ``statuses``.

        VolumeFailed with Cinder's reason if it reaches one of ``failures``;
        DeadlineExceeded with the last status seen after ``timeout`` seconds;
        NotFound if the volume is gone."""
        deadline = time.monotonic() + timeout
        while True:
            volume = self.get_volume(volume_id)
            if volume.status in statuses:
                return volume
            if volume.status in failures:
                reason = self._failure_reason(volume_id)
                raise VolumeFailed(
                    f"Cinder volume {volume_id} went to {volume.status}: {reason}",
                    volume_id=volume_id,
                    status=volume.status,
                )
            if time.monotonic() + interval > deadline:
                wanted = " or ".join(sorted(statuses))
                raise DeadlineExceeded(
                    f"Cinder volume {volume_id} is {volume.status}, not {wanted}, "
                    f"after {timeout:.0f} s"
                )
            time.sleep(interval)

    def _failure_reason(self, volume_id: str) -> str:
        try:
            return self.volume_failure(volume_id) or "Cinder gives no reason"
        except RbdPluginError as exc:
            return f"Cinder's reason could not be read ({exc})"

    def delete_volume(self, volume_id: str) -> bool:
        """Ask Cinder to delete the volume; False if it was already gone.

        VolumeBusy (with Cinder's message) while it is attached or otherwise in use."""
        what = f"deleting volume {volume_id}"
        try:
            with self.errors.calling(CINDER, what):
                self._cinder().delete_volume(volume_id, ignore_missing=False)
        except NotFound:
            return False
        except InvalidArgument as exc:
            raise VolumeBusy(str(exc)) from exc
        return True

    def wait_deleted(self, volume_id: str, timeout: float, interval: float = POLL_SECONDS) -> None:
        """Poll until Cinder no longer knows the volume."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                volume = self.get_volume(volume_id)
            except NotFound:
                return
            if volume.status == "error_deleting":
                reason = self._failure_reason(volume_id)
                raise VolumeFailed(
                    f"Cinder could not delete volume {volume_id}: {reason}",
                    volume_id=volume_id,
                    status=volume.status,
                )
            if time.monotonic() + interval > deadline:
                raise DeadlineExceeded(
                    f"Cinder volume {volume_id} still exists ({volume.status}) "
                    f"after {timeout:.0f} s"
                )
            time.sleep(interval)

    def extend_volume(self, volume_id: str, size_gib: int) -> None:
        """Ask Cinder to grow the volume to ``size_gib`` (os-extend, asynchronous:
        ``extending``, then back to ``available`` or ``in-use``). Microversion 3.42, so an
        attached volume grows too: Cinder grows the image, then tells Nova (event
        ``volume-extended``), which grows the disk in the server."""
        with self.errors.calling(CINDER, f"extending volume {volume_id} to {size_gib} GiB"):
            response = self._cinder().post(
                f"/volumes/{volume_id}/action",
                json={"os-extend": {"new_size": size_gib}},
                microversion=EXTEND_IN_USE_MICROVERSION,
            )
            sdk.raise_from_response(response)

    # -- snapshots -----------------------------------------------------------------------------

    def create_snapshot(self, volume_id: str, name: str, metadata: Mapping[str, str]) -> Snapshot:
        """Ask Cinder for a snapshot of the volume, also while it is attached (force);
        it is ``creating`` (see :meth:`wait_for_snapshot`)."""
        with self.errors.calling(CINDER, f"taking snapshot {name} of volume {volume_id}"):
            made = self._cinder().create_snapshot(
                volume_id=volume_id, name=name, is_forced=True, metadata=dict(metadata)
            )
            return snapshot_from(made.to_dict(computed=False))

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        with self.errors.calling(CINDER, f"reading snapshot {snapshot_id}"):
            return snapshot_from(self._cinder().get_snapshot(snapshot_id).to_dict(computed=False))

    def list_snapshots(
        self, metadata: Mapping[str, str], volume_id: str | None = None
    ) -> list[Snapshot]:
        """This project's snapshots carrying every ``metadata`` key with its value (and of
        ``volume_id`` if given), oldest first. Cinder filters on the server, every page
        followed; the answer is checked again here, as in :meth:`list_volumes`."""
        wanted = dict(metadata)
        params: dict[str, str] = {"metadata": repr(wanted)}
        if volume_id:
            params["volume_id"] = volume_id
        found: list[Snapshot] = []
        with self.errors.calling(CINDER, "listing snapshots"):
            cinder = self._cinder()
            url: str | None = "/snapshots/detail"
            while url:
                data = self._json(cinder.get(url, params=params))
                found += [snapshot_from(s) for s in data.get("snapshots") or ()]
                url = next((link["href"] for link in data.get("snapshots_links") or ()
                            if link.get("rel") == "next"), None)  # fmt: skip
                params = {}
        mine = [s for s in found if (not volume_id or s.volume_id == volume_id)
                and all(s.metadata.get(k) == v for k, v in wanted.items())]  # fmt: skip
        return sorted(mine, key=lambda s: (s.created_at or "", s.id))

    def wait_for_snapshot(self, snapshot_id: str, timeout: float,
                          interval: float = POLL_SECONDS) -> Snapshot:  # fmt: skip
        """Poll until the snapshot is ``available``; VolumeFailed with Cinder's reason if
        it goes to ``error``, DeadlineExceeded after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.get_snapshot(snapshot_id)
            if snapshot.status == "available":
                return snapshot
            if snapshot.status in FAILED_STATUSES:
                raise VolumeFailed(
                    f"Cinder snapshot {snapshot_id} went to {snapshot.status}: "
                    f"{self._failure_reason(snapshot_id)}",
                    volume_id=snapshot.volume_id,
                    status=snapshot.status,
                )
            if time.monotonic() + interval > deadline:
                raise DeadlineExceeded(
                    f"Cinder snapshot {snapshot_id} is {snapshot.status}, not available, "
                    f"after {timeout:.0f} s"
                )
            time.sleep(interval)

    def delete_snapshot(self, snapshot_id: str, timeout: float,
                        interval: float = POLL_SECONDS) -> None:  # fmt: skip
        """Delete the snapshot and wait until Cinder no longer knows it.

        Cinder accepts the request and may refuse it later (its volume driver finds the
        snapshot busy: volumes were made from it): the snapshot is ``available`` again
        then, and VolumeBusy carries Cinder's message."""
        with self.errors.calling(CINDER, f"deleting snapshot {snapshot_id}"):
            self._cinder().delete_snapshot(snapshot_id, ignore_missing=False)
        deadline = time.monotonic() + timeout
        while True:
            try:
                snapshot = self.get_snapshot(snapshot_id)
            except NotFound:
                return
            if snapshot.status in ("available", "error_deleting"):
                reason = self._failure_reason(snapshot_id)
                raise VolumeBusy(
                    f"Cinder did not delete snapshot {snapshot_id} (it is {snapshot.status} "
                    f"again): {reason}"
                )
            if time.monotonic() + interval > deadline:
                raise DeadlineExceeded(
                    f"Cinder snapshot {snapshot_id} still exists ({snapshot.status}) "
                    f"after {timeout:.0f} s"
                )
            time.sleep(interval)

    def limits(self) -> Limits:
        """The project's volume usage and quota (one cheap request)."""
        with self.errors.calling(CINDER, "reading the project's limits"):
            absolute = self._json(self._cinder().get("/limits"))["limits"]["absolute"]
        return Limits(
            volumes_used=int(absolute.get("totalVolumesUsed") or 0),
            volumes_max=_unlimited(absolute.get("maxTotalVolumes")),
            gigabytes_used=int(absolute.get("totalGigabytesUsed") or 0),
            gigabytes_max=_unlimited(absolute.get("maxTotalVolumeGigabytes")),
        )

    # -- attachments (Nova) --------------------------------------------------------------------

    def attach(self, server_id: str, volume_id: str) -> Attachment:
        """Ask Nova to attach the volume to the server. Nova finishes asynchronously:
        the volume goes ``in-use`` and the disk appears later.

        Conflict naming the server(s) if the volume is attached elsewhere."""
        what = f"attaching volume {volume_id} to server {server_id}"
        try:
            with self.errors.calling(NOVA, what):
                made = self._nova().create_volume_attachment(server_id, volume=volume_id)
                return _attachment({**made.to_dict(computed=False), "server_id": server_id},
                                   volume_id)  # fmt: skip
        except InvalidArgument as exc:
            others = [s for s in self._servers_of(volume_id) if s != server_id]
            if others:
                raise Conflict(
                    f"volume {volume_id} is attached to server {', '.join(others)}; "
                    f"detach it there first ({exc})"
                ) from exc
            raise

    def _servers_of(self, volume_id: str) -> tuple[str, ...]:
        try:
            return self.get_volume(volume_id).servers
        except RbdPluginError:
            return ()

    def server_attachments(self, server_id: str) -> list[Attachment]:
        """The volumes Nova has attached (or is attaching) to the server."""
        with self.errors.calling(NOVA, f"listing the volumes of server {server_id}"):
            return [
                _attachment({**a.to_dict(computed=False), "server_id": server_id})
                for a in self._nova().volume_attachments(server_id)
            ]

    def detach(self, server_id: str, volume_id: str) -> bool:
        """Ask Nova to detach the volume (asynchronous); False if it was not attached there."""
        what = f"detaching volume {volume_id} from server {server_id}"
        try:
            with self.errors.calling(NOVA, what):
                self._nova().delete_volume_attachment(server_id, volume_id, ignore_missing=False)
        except NotFound:
            return False
        return True

    # -- health --------------------------------------------------------------------------------

    def check(self) -> dict[str, str]:
        """{"keystone": ..., "cinder": ...}: "up" or what is wrong, for /readyz."""
        result: dict[str, str] = {}
        try:
            with self.errors.calling(KEYSTONE, "probing Keystone"):
                response = self.session.get(self.auth_url, authenticated=False, raise_exc=False)
                if response.status_code >= 500:
                    raise OpenStackUnavailable(f"Keystone answered HTTP {response.status_code}")
            result["keystone"] = "up"
        except RbdPluginError as exc:
            result["keystone"] = f"down: {exc}"
        try:
            self.limits()
            result["cinder"] = "up"
        except RbdPluginError as exc:
            result["cinder"] = f"down: {exc}"
        return result
