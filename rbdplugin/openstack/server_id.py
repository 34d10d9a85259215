"""Which Nova server this VM is: the id Cinder-attach mode attaches volumes to.

In order, the first that answers wins:

1. ``server_id`` from the config;
2. the config drive: ``openstack/latest/meta_data.json`` ``"uuid"`` on the filesystem
   labelled ``config-2`` (a directory where it is already mounted, else the block
   device mounted read-only in a temporary directory for the read);
3. the metadata service (``meta_data.json`` over HTTP, short timeout);
4. the DMI product UUID (Nova sets the SMBIOS system UUID to the server's id).

:func:`discover` returns ``(server_id, source)`` so the daemon can log which source
was used. Every path and the mount are injectable for tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rbdplugin.errors import ConfigError, RbdPluginError
from rbdplugin.process import Command, run_sync

log = logging.getLogger(__name__)

CONFIG_DRIVE_LABEL = "config-2"
META_DATA = Path("openstack", "latest", "meta_data.json")
DEFAULT_METADATA_URL = "http://169.254.169.254/openstack/latest/meta_data.json"
MOUNT_SECONDS = 10.0

# The sources, as :func:`discover` names them.
FROM_CONFIG = "config"
FROM_CONFIG_DRIVE = "config-drive"
FROM_METADATA_SERVICE = "metadata-service"
FROM_DMI = "dmi"

# Mounts the config drive's block device read-only for the duration of the context.
MountReadOnly = Callable[[Path], AbstractContextManager[Path]]


@dataclass(frozen=True)
class Places:
    """Where to look; the defaults are the real system's."""

    # A config drive already mounted here (tests; or an image that mounts it itself).
    config_drive_dir: Path | None = None
    by_label: Path = Path("/dev/disk/by-label")
    metadata_url: str = DEFAULT_METADATA_URL
    metadata_timeout: float = 2.0
    product_uuid: Path = Path("/sys/class/dmi/id/product_uuid")


def server_uuid(text: str) -> str | None:
    """``text`` as a canonical (lower-case, dashed) UUID, or None if it is not one."""
    try:
        return str(uuid.UUID(text.strip()))
    except (ValueError, AttributeError):
        return None


def _uuid_in_meta_data(raw: bytes | str, where: str) -> str:
    try:
        data: Any = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{where} is not JSON: {exc}") from exc
    found = server_uuid(str(data.get("uuid", ""))) if isinstance(data, dict) else None
    if found is None:
        raise ConfigError(f"{where} holds no server uuid")
    return found


@contextlib.contextmanager
def mount_read_only(device: Path) -> Iterator[Path]:
    """Mount ``device`` read-only in a temporary directory; unmount and remove it after."""
    target = Path(tempfile.mkdtemp(prefix="rbdplugin-config-drive-"))
    try:
        run_sync(Command(("mount", "-o", "ro,nosuid,nodev,noexec", str(device), str(target)),
                         timeout=MOUNT_SECONDS))  # fmt: skip
        try:
            yield target
        finally:
            run_sync(Command(("umount", str(target)), timeout=MOUNT_SECONDS))
    finally:
        with contextlib.suppress(OSError):
            target.rmdir()


def from_config_drive(places: Places, mount: MountReadOnly = mount_read_only) -> str | None:
    """The uuid on the config drive; None if this VM has none."""
    if places.config_drive_dir is not None:
        path = places.config_drive_dir / META_DATA
        if not path.is_file():
            return None
        return _uuid_in_meta_data(path.read_bytes(), str(path))
    device = places.by_label / CONFIG_DRIVE_LABEL
    if not device.exists():
        return None
    with mount(Path(os.path.realpath(device))) as root:
        path = root / META_DATA
        if not path.is_file():
            raise ConfigError(f"the config drive {device} has no {META_DATA}")
        return _uuid_in_meta_data(path.read_bytes(), f"{META_DATA} on the config drive")


def from_metadata_service(places: Places) -> str:
    """The uuid the metadata service tells (ConfigError if it does not answer well)."""
    url = places.metadata_url
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"metadata_url {url!r} is not an http(s) URL")
    try:
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked
        with urllib.request.urlopen(request, timeout=places.metadata_timeout) as response:  # noqa: S310
            raw = response.read(1024 * 1024)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"the metadata service at {url} did not answer: {exc}") from exc
    return _uuid_in_meta_data(raw, f"the metadata service's answer at {url}")


def from_dmi(places: Places) -> str:
    try:
        text = places.product_uuid.read_text()
    except OSError as exc:
        raise ConfigError(f"{places.product_uuid}: {exc.strerror or exc}") from exc
    found = server_uuid(text)
    if found is None:
        raise ConfigError(f"{places.product_uuid} holds no UUID")
    return found


def discover(
    configured: str | None,
    places: Places | None = None,
    mount: MountReadOnly = mount_read_only,
) -> tuple[str, str]:
    """``(server_id, source)``; ConfigError saying what each source answered if none did."""
    if configured:
        found = server_uuid(configured)
        if found is None:
            raise ConfigError(f"server_id {configured!r} is not a UUID")
        return found, FROM_CONFIG
    places = places or Places()
    misses: list[str] = []
    try:
        drive = from_config_drive(places, mount)
        if drive is not None:
            return drive, FROM_CONFIG_DRIVE
        misses.append(f"no {CONFIG_DRIVE_LABEL} config drive")
    except RbdPluginError as exc:
        misses.append(f"config drive: {exc}")
    for source, find in ((FROM_METADATA_SERVICE, from_metadata_service), (FROM_DMI, from_dmi)):
        try:
            return find(places), source
        except ConfigError as exc:
            misses.append(str(exc))
    log.debug("server id not found: %s", "; ".join(misses))
    raise ConfigError(
        "cannot tell which server this VM is (" + "; ".join(misses) + "): set server_id "
        "in the tenant's table"
    )
