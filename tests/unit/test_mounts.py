"""The mount table across an upgrade: entries written before back-ends had locators
(pool, namespace and image fields, the mapping as ``mapped``) still load, with their
counts, and the RBD attachment finds and undoes their mappings exactly as before."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import cast

import pytest
from pytest import MonkeyPatch

from rbdplugin.backends import VolumeInfo
from rbdplugin.backends.rbd_attach import RbdAttachment, upgrade_record
from rbdplugin.config import TenantConfig
from rbdplugin.errors import StateUnwritable
from rbdplugin.lease import Leases
from rbdplugin.mapping import ImageRef, MappedDevice
from rbdplugin.mounts import MountRecord, MountTable
from rbdplugin.spec import VolumeSpec

# Byte for byte what the table wrote before locators (write_json: indent 1, keys sorted):
# a krbd read-write mount used twice by one ID, a FUSE read-only mount in a namespace
# that another host took over, and a Mount cut short before anything was mapped.
OLD_TABLE = """{
 "half": {
  "broken": "",
  "counts": {},
  "fstype": "",
  "image": "half",
  "lost": "",
  "mapped": null,
  "mode": "rw",
  "mountpoint": "/var/lib/rbdplugin/mounts/alpha/half",
  "namespace": "",
  "phase": "mapping",
  "pool": "alpha",
  "since": "",
  "volume": "half"
 },
 "logs-ro": {
  "broken": "",
  "counts": {
   "c3": 1
  },
  "fstype": "xfs",
  "image": "logs",
  "lost": "host-b at 2026-11-03T10:00:00Z",
  "mapped": {
   "details": {
    "export": "/var/lib/rbdplugin/exports/beta.team.logs",
    "pid": 4242
   },
   "device": "/dev/loop7",
   "image": "beta/team/logs",
   "mapper": "fuse"
  },
  "mode": "ro",
  "mountpoint": "/var/lib/rbdplugin/mounts/alpha/logs-ro",
  "namespace": "team",
  "phase": "mounted",
  "pool": "beta",
  "since": "2026-11-02T09:00:00Z",
  "volume": "logs-ro"
 },
 "web": {
  "broken": "",
  "counts": {
   "c1": 2,
   "c2": 1
  },
  "fstype": "ext4",
  "image": "web",
  "lost": "",
  "mapped": {
   "details": {
    "id": 3
   },
   "device": "/dev/rbd3",
   "image": "alpha/web",
   "mapper": "krbd"
  },
  "mode": "rw",
  "mountpoint": "/var/lib/rbdplugin/mounts/alpha/web",
  "namespace": "",
  "phase": "mounted",
  "pool": "alpha",
  "since": "2026-11-02T08:00:00Z",
  "volume": "web"
 }
}"""

TENANT = TenantConfig("alpha", "rbd", "alpha", "", "alpha", Path("/etc/ceph/keyring"))
WEB_MAPPING = MappedDevice("krbd", "alpha/web", "/dev/rbd3", {"id": 3})


class FakeMapper:
    """Records what the attachment hands the mapper."""

    name = "krbd"
    locks_image = True

    def __init__(self, found: MappedDevice | None = None) -> None:
        self.found = found
        self.unmapped: list[MappedDevice] = []
        self.asked: list[ImageRef] = []

    async def map(self, image: ImageRef, read_only: bool = False) -> MappedDevice:
        raise AssertionError("not mapped in these tests")

    async def unmap(self, mapped: MappedDevice) -> None:
        self.unmapped.append(mapped)

    async def find(self, image: ImageRef) -> MappedDevice | None:
        self.asked.append(image)
        return self.found

    async def broken(self, mapped: MappedDevice) -> str | None:
        return f"checked {mapped}"

    async def grow(self, mapped: MappedDevice, size: int) -> None:
        raise AssertionError("not grown in these tests")


def _attachment(mapper: FakeMapper) -> RbdAttachment:
    # Leases are not touched by finding, checking or undoing a mapping.
    return RbdAttachment(TENANT, Path("/etc/ceph/ceph.conf"), mapper, cast(Leases, None))


def _old_table(tmp_path: Path) -> Path:
    path = tmp_path / "mounts.json"
    path.write_text(OLD_TABLE)
    return path


def test_an_old_table_loads_with_its_counts(tmp_path: Path) -> None:
    table = MountTable(_old_table(tmp_path), upgrade=upgrade_record)
    web, logs, half = table.get("web"), table.get("logs-ro"), table.get("half")
    assert web is not None and logs is not None and half is not None
    assert web.locator == {"pool": "alpha", "namespace": "", "image": "web"}
    assert (web.phase, web.counts, web.references) == ("mounted", {"c1": 2, "c2": 1}, 3)
    assert (web.fstype, web.mode, web.since) == ("ext4", "rw", "2026-11-02T08:00:00Z")
    assert web.mountpoint == "/var/lib/rbdplugin/mounts/alpha/web"
    assert web.device is not None
    assert (web.device.path, web.device.via) == ("/dev/rbd3", "krbd")
    assert logs.locator == {"pool": "beta", "namespace": "team", "image": "logs"}
    assert (logs.mode, logs.lost) == ("ro", "host-b at 2026-11-03T10:00:00Z")
    assert logs.device is not None and logs.device.path == "/dev/loop7"
    assert (half.phase, half.device, half.counts) == ("mapping", None, {})
    assert not (tmp_path / "mounts.json.bad").exists()


def test_an_old_entry_undoes_and_checks_the_same_mapping(tmp_path: Path) -> None:
    table = MountTable(_old_table(tmp_path), upgrade=upgrade_record)
    mapper = FakeMapper()
    attachment = _attachment(mapper)
    web, logs = table.get("web"), table.get("logs-ro")
    assert web is not None and web.device is not None
    assert logs is not None and logs.device is not None
    asyncio.run(attachment.detach(web.device))
    asyncio.run(attachment.detach(logs.device))
    fuse = MappedDevice("fuse", "beta/team/logs", "/dev/loop7",
                        {"export": "/var/lib/rbdplugin/exports/beta.team.logs", "pid": 4242})  # fmt: skip
    assert mapper.unmapped == [WEB_MAPPING, fuse]
    assert asyncio.run(attachment.broken(web.device)) == f"checked {WEB_MAPPING}"


def test_an_old_entry_finds_its_image_and_matches_a_new_mount(tmp_path: Path) -> None:
    table = MountTable(_old_table(tmp_path), upgrade=upgrade_record)
    half = table.get("half")
    assert half is not None
    mapper = FakeMapper(found=MappedDevice("krbd", "alpha/half", "/dev/rbd5", {"id": 5}))
    attachment = _attachment(mapper)
    found = asyncio.run(attachment.find(half.locator))
    assert mapper.asked[0].spec == "alpha/half"
    assert found is not None and (found.path, found.via) == ("/dev/rbd5", "krbd")
    # A new Mount of the same volume locates the same storage (the one-mount-per-image
    # check compares locators).
    spec = VolumeSpec(size=1 << 30, fstype="ext4", pool="alpha", features=())
    assert attachment.locate(VolumeInfo("half", spec, "alpha/half")) == half.locator


def test_an_upgraded_table_is_saved_in_the_new_format(tmp_path: Path) -> None:
    path = _old_table(tmp_path)
    table = MountTable(path, upgrade=upgrade_record)
    web = table.get("web")
    assert web is not None
    web.counts["c4"] = 1
    asyncio.run(table.save(web))
    saved = json.loads(path.read_text())
    assert all("pool" not in entry and "mapped" not in entry for entry in saved.values())
    assert saved["web"]["locator"] == {"pool": "alpha", "namespace": "", "image": "web"}
    again = MountTable(path)  # today's format needs no upgrade
    assert [r.to_json() for r in again.all()] == [r.to_json() for r in table.all()]
    assert MountTable(path, upgrade=upgrade_record).get("web") == again.get("web")


def test_a_bad_old_entry_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "mounts.json"
    path.write_text(json.dumps({"junk": {"volume": "junk", "phase": 7}, "odd": "not a record"}))
    table = MountTable(path, upgrade=upgrade_record)
    assert table.all() == []
    assert set(json.loads((tmp_path / "mounts.json.bad").read_text())) == {"junk", "odd"}


def _record(name: str) -> MountRecord:
    return MountRecord(name, {"pool": "alpha", "namespace": "", "image": name}, f"/m/{name}")


def test_saves_wait_for_the_disk_off_the_event_loop(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    # Each fsync takes 0.2 s (a busy disk): the loop keeps serving meanwhile, every save
    # returns only once its change is in the file, and saves made while one write is
    # under way share the next write instead of queueing one fsync each.
    real_fsync, fsyncs = os.fsync, []

    def slow_fsync(fd: int) -> None:
        time.sleep(0.2)
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    path = tmp_path / "mounts.json"
    table = MountTable(path)

    async def scenario() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        names = [f"v{i}" for i in range(6)]
        await asyncio.gather(*(_saved(table, path, _record(name)) for name in names))
        ticking.cancel()
        return ticks

    ticks = asyncio.run(scenario())
    assert ticks >= 20, f"the event loop stood still while the table was written ({ticks} ticks)"
    assert sorted(json.loads(path.read_text())) == [f"v{i}" for i in range(6)]
    assert len(fsyncs) <= 2 * 2  # two writes (file and directory each): the first, then the rest


async def _saved(table: MountTable, path: Path, record: MountRecord) -> None:
    await table.save(record)
    assert record.volume in json.loads(path.read_text())  # on disk when save returns


def test_a_save_that_cannot_be_written_is_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "state" / "mounts.json"
    table = MountTable(path)
    asyncio.run(table.save(_record("kept")))
    path.unlink()  # root ignores modes: the directory becomes a file instead
    path.parent.rmdir()
    path.parent.write_text("not a directory")
    with pytest.raises(StateUnwritable, match="cannot record the mount table"):
        asyncio.run(table.save(_record("new")))
    assert [r.volume for r in table.all()] == ["kept"]
