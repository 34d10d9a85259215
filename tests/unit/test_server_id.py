"""Which server this VM is: config, config drive, metadata service, DMI, in that order.

Config drives and DMI are fixture folders under tests/unit/server_id/; the metadata
service is a real HTTP server on loopback; the config drive's block device is a label
link to a file and the mount is a fake at the injected boundary.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbdplugin.errors import ConfigError
from rbdplugin.openstack.server_id import (
    FROM_CONFIG,
    FROM_CONFIG_DRIVE,
    FROM_DMI,
    FROM_METADATA_SERVICE,
    Places,
    discover,
    server_uuid,
)

FIXTURES = Path(__file__).parent / "server_id"
DRIVE_UUID = "0b5b0a51-3e47-4b0c-9d2c-7a0f3f6c1a11"
DMI_UUID = "d3a1e7f0-6b2c-4c55-8e0a-0c7e2b9f4d21"  # the fixture holds it in upper case
SERVICE_UUID = "6f1c2d3e-4a5b-4c6d-8e7f-901a2b3c4d5e"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MetadataService:
    """A loopback HTTP server answering ``body`` (after ``delay`` seconds) at any path."""

    def __init__(self, body: bytes, delay: float = 0.0, status: int = 200) -> None:
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                time.sleep(delay)
                with contextlib.suppress(OSError):  # the client may have given up
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/openstack/latest/meta_data.json"

    def __enter__(self) -> MetadataService:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_service() -> str:
    return f"http://127.0.0.1:{_free_port()}/openstack/latest/meta_data.json"  # refused


def places(tmp_path: Path, url: str, config_drive_dir: Path | None = None,
           product_uuid: Path = FIXTURES / "dmi" / "product_uuid") -> Places:  # fmt: skip
    return Places(
        config_drive_dir=config_drive_dir,
        by_label=tmp_path / "by-label",  # no config-2 label unless a test makes one
        metadata_url=url,
        metadata_timeout=0.5,
        product_uuid=product_uuid,
    )


def never_mount(device: Path) -> contextlib.AbstractContextManager[Path]:
    raise AssertionError(f"nothing should be mounted, asked for {device}")


def test_config_wins_and_is_normalised(tmp_path: Path, no_service: str) -> None:
    found = discover(DMI_UUID.upper(), places(tmp_path, no_service), never_mount)
    assert found == (DMI_UUID, FROM_CONFIG)
    with pytest.raises(ConfigError, match="not a UUID"):
        discover("vm-1", places(tmp_path, no_service), never_mount)


def test_a_mounted_config_drive_comes_next(tmp_path: Path) -> None:
    with MetadataService(json.dumps({"uuid": SERVICE_UUID}).encode()) as service:
        found = discover(
            None,
            places(tmp_path, service.url, config_drive_dir=FIXTURES / "config-drive"),
            never_mount,
        )
        assert found == (DRIVE_UUID, FROM_CONFIG_DRIVE)
        assert service.requests == []  # not asked when the drive answered


def test_the_labelled_block_device_is_mounted_read_only_for_the_read(tmp_path: Path,
                                                                     no_service: str) -> None:  # fmt: skip
    by_label = tmp_path / "by-label"
    by_label.mkdir()
    device = tmp_path / "sr0"
    device.write_bytes(b"")
    (by_label / "config-2").symlink_to("../sr0")
    mounted: list[Path] = []

    @contextlib.contextmanager
    def fake_mount(dev: Path) -> Iterator[Path]:
        mounted.append(dev)
        yield FIXTURES / "config-drive"
        mounted.append(Path("unmounted"))

    found = discover(None, places(tmp_path, no_service), fake_mount)
    assert found == (DRIVE_UUID, FROM_CONFIG_DRIVE)
    assert mounted == [device, Path("unmounted")]  # the link's target, and unmounted after


def test_the_metadata_service_comes_after_the_drive(tmp_path: Path) -> None:
    with MetadataService(json.dumps({"uuid": SERVICE_UUID, "name": "vm"}).encode()) as service:
        found = discover(None, places(tmp_path, service.url), never_mount)
        assert found == (SERVICE_UUID, FROM_METADATA_SERVICE)
        assert service.requests == ["/openstack/latest/meta_data.json"]
        # A drive without openstack/latest/meta_data.json does not count.
        other = places(tmp_path, service.url, config_drive_dir=FIXTURES / "other-drive")
        assert discover(None, other, never_mount) == (SERVICE_UUID, FROM_METADATA_SERVICE)


def test_dmi_is_last_and_a_slow_metadata_service_costs_only_its_timeout(tmp_path: Path) -> None:
    with MetadataService(b'{"uuid": "x"}', delay=3.0) as service:
        started = time.monotonic()
        found = discover(None, places(tmp_path, service.url), never_mount)
        took = time.monotonic() - started
    assert found == (DMI_UUID, FROM_DMI)
    assert took < 2.0, took  # the 0.5 s timeout, not the 3 s answer


@pytest.mark.parametrize(
    ("body", "status"),
    [(b"<html>not json</html>", 200), (b'{"uuid": "not-a-uuid"}', 200), (b"[]", 200),
     (b'{"uuid": "' + SERVICE_UUID.encode() + b'"}', 404)],
)  # fmt: skip
def test_a_bad_metadata_answer_falls_through_to_dmi(tmp_path: Path, body: bytes,
                                                     status: int) -> None:  # fmt: skip
    with MetadataService(body, status=status) as service:
        assert discover(None, places(tmp_path, service.url), never_mount) == (DMI_UUID, FROM_DMI)


def test_a_broken_config_drive_is_reported_and_skipped(tmp_path: Path, no_service: str) -> None:
    broken = places(tmp_path, no_service, config_drive_dir=FIXTURES / "broken-drive")
    assert discover(None, broken, never_mount) == (DMI_UUID, FROM_DMI)
    unreadable = places(tmp_path, no_service, config_drive_dir=FIXTURES / "broken-drive",
                        product_uuid=tmp_path / "no-dmi")  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        discover(None, unreadable, never_mount)
    message = str(caught.value)
    assert "broken-drive/openstack/latest/meta_data.json is not JSON" in message
    assert "did not answer" in message and "no-dmi" in message
    assert "set server_id" in message


def test_nothing_found_says_what_each_source_answered(tmp_path: Path, no_service: str) -> None:
    bad_dmi = tmp_path / "product_uuid"
    bad_dmi.write_text("Not Settable\n")
    with pytest.raises(ConfigError) as caught:
        discover(None, places(tmp_path, no_service, product_uuid=bad_dmi), never_mount)
    message = str(caught.value)
    assert "no config-2 config drive" in message
    assert no_service in message
    assert f"{bad_dmi} holds no UUID" in message


def test_only_http_metadata_urls(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"uuid": SERVICE_UUID}))
    found = discover(None, places(tmp_path, secret.as_uri()), never_mount)
    assert found == (DMI_UUID, FROM_DMI)  # file:// is refused, DMI answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [(DMI_UUID.upper() + "\n", DMI_UUID), ("  " + DRIVE_UUID, DRIVE_UUID), ("", None),
     ("0b5b0a51", None)],
)  # fmt: skip
def test_server_uuid(text: str, expected: str | None) -> None:
    assert server_uuid(text) == expected


def test_default_places_are_the_real_systems() -> None:
    real = Places()
    assert real.metadata_url == "http://169.254.169.254/openstack/latest/meta_data.json"
    assert real.by_label == Path("/dev/disk/by-label")
    assert real.product_uuid == Path("/sys/class/dmi/id/product_uuid")
    assert real.config_drive_dir is None
