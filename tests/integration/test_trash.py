"""``rbdplugin trash ls|restore|purge``: the trash a tenant's removed volumes go to, read
and changed with the tenant's identity, against the real cluster; purge honours the
tenant's ``trash_delay``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rbd

from rbdplugin.devcluster import DevCluster
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import Admin, unique

POOL = "alpha"
DELAY = 25  # seconds: every step before the purge that must keep entries, even under load


def rbdplugin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbdplugin", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def trash_entries(admin: Admin) -> dict[str, list[dict[str, Any]]]:
    """The pool's trash as the admin sees it: name -> entries (the oracle)."""
    found: dict[str, list[dict[str, Any]]] = {}
    with admin.cluster.open_ioctx(POOL) as ioctx:
        for entry in rbd.RBD().trash_list(ioctx):
            found.setdefault(entry["name"], []).append(dict(entry))
    return found


def test_trash_ls_restore_and_purge_after_the_delay(
    cluster: DevCluster, admin: Admin, daemon_factory: StartDaemon
) -> None:
    daemon = daemon_factory(
        tenant_toml(cluster, POOL, table="trashy", trash_delay=f"{DELAY}s", default_size="64M"),
        wait_for="trashy",
    )
    config = str(daemon.config)
    c = daemon.client("trashy")
    kept, taken, doomed = (unique(f"tr{part}") for part in ("kept", "taken", "doomed"))
    for name in (kept, taken, doomed):
        assert c.create(name) == {"Err": ""}
    admin.write(POOL, kept, 4096, b"restore me" * 100)
    removed_at = time.time()
    for name in (kept, taken, doomed):
        assert c.remove(name) == {"Err": ""}
    before = trash_entries(admin)
    assert {kept, taken, doomed} <= before.keys()

    listed = rbdplugin("trash", "ls", "--config", config, "--json")
    assert listed.returncode == 0, listed.stderr
    ours = {kept, taken, doomed}  # the pool's trash also holds other tests' volumes
    mine = {e["volume"]: e for e in json.loads(listed.stdout) if e["volume"] in ours}
    assert mine.keys() == ours
    for name, entry in mine.items():
        assert entry["id"] == before[name][0]["id"] and entry["driver"] == "trashy"
        assert entry["purgeable"] is False
        purgeable = datetime.strptime(entry["purgeable_from"], "%Y-%m-%dT%H:%M:%SZ")
        assert abs(purgeable.replace(tzinfo=UTC).timestamp() - (removed_at + DELAY)) < 5
    table = rbdplugin("trash", "ls", "--config", config)
    assert table.returncode == 0 and kept in table.stdout and "PURGEABLE FROM" in table.stdout

    early = rbdplugin("trash", "purge", "--config", config)  # within the delay: keeps all
    # The pool's trash is shared with other tests, whose entries may fail to purge (an
    # origin a live clone still reads from); only ours are judged here.
    assert not [line for line in early.stderr.splitlines() if "FAILED" in line and
                any(name in line for name in (kept, taken, doomed))], early.stderr  # fmt: skip
    assert f"kept trashy/{doomed}" in early.stdout and "kept until" in early.stdout
    assert {kept, taken, doomed} <= trash_entries(admin).keys()

    back = rbdplugin("trash", "restore", kept, "--config", config)
    assert back.returncode == 0, back.stderr
    assert kept in admin.images(POOL) and kept not in trash_entries(admin)
    assert admin.read(POOL, kept, 4096, 1000) == b"restore me" * 100
    assert c.get(kept)["Err"] == ""  # Docker sees it again

    assert c.create(taken) == {"Err": ""}  # the name is taken by a new volume
    clash = rbdplugin("trash", "restore", taken, "--config", config)
    assert clash.returncode == 1
    assert f"volume {taken!r} exists" in clash.stderr and "--as NAME" in clash.stderr
    assert taken in trash_entries(admin)  # nothing changed
    renamed = f"{taken}-old"
    moved = rbdplugin("trash", "restore", taken, "--as", renamed, "--config", config)
    assert moved.returncode == 0, moved.stderr
    assert renamed in admin.images(POOL) and taken not in trash_entries(admin)

    missing = rbdplugin("trash", "restore", unique("never"), "--config", config)
    assert missing.returncode == 1 and "is not in the trash" in missing.stderr

    time.sleep(max(0.0, removed_at + DELAY + 1.5 - time.time()))
    dry = rbdplugin("trash", "purge", "--dry-run", "--config", config)
    assert f"would delete trashy/{doomed}" in dry.stdout
    assert doomed in trash_entries(admin)
    purged = rbdplugin("trash", "purge", "--config", config)
    assert f"FAILED trashy/{doomed}" not in purged.stderr, purged.stderr
    assert f"deleted trashy/{doomed}" in purged.stdout
    assert doomed not in trash_entries(admin)
    for name in (kept, taken, renamed):
        assert c.remove(name) == {"Err": ""}


def snapshots_by_id(admin: Admin, image_id: str) -> list[str]:
    """The snapshots of an image, live or in the trash, opened by id (the oracle)."""
    with admin.cluster.open_ioctx(POOL) as ioctx, rbd.Image(ioctx, image_id=image_id) as image:
        return [snap["name"] for snap in image.list_snaps()]


def test_purge_takes_trashed_clones_before_their_origins_and_their_snapshots_with_them(
    cluster: DevCluster, admin: Admin, daemon_factory: StartDaemon
) -> None:
    delay = 3
    daemon = daemon_factory(
        tenant_toml(
            cluster, POOL, table="trashclones", trash_delay=f"{delay}s", default_size="64M"
        ),
        wait_for="trashclones",
    )
    config = str(daemon.config)
    c = daemon.client("trashclones")
    origin, copy, live = (unique(f"tc{part}") for part in ("origin", "copy", "live"))
    assert c.create(origin) == {"Err": ""}
    with admin.cluster.open_ioctx(POOL) as ioctx, rbd.Image(ioctx, origin) as image:
        image.create_snap("mine")  # a user's snapshot: it goes into the trash with the volume
    for clone in (copy, live):
        assert c.create(clone, {"clone-of": origin}) == {"Err": ""}
    # Listed after its clone, as the trash lists by id: purge must not depend on order.
    for name in (origin, copy):
        assert c.remove(name) == {"Err": ""}
    origin_id = trash_entries(admin)[origin][0]["id"]
    taken = snapshots_by_id(admin, origin_id)
    assert "mine" in taken and len(taken) == 3, taken  # one clone.NAME.TIME per clone

    def purge() -> subprocess.CompletedProcess[str]:
        time.sleep(delay + 1.5)
        done = rbdplugin("trash", "purge", "--config", config)
        print(done.stdout, done.stderr)
        return done

    first = purge()  # a live clone still reads from the origin: it waits, untouched
    assert f"deleted trashclones/{copy}" in first.stdout
    refused = [line for line in first.stderr.splitlines() if f"FAILED trashclones/{origin}" in line]
    assert refused and live in refused[0] and "clones still read from" in refused[0], first.stderr
    assert first.returncode == 1
    assert copy not in trash_entries(admin) and origin in trash_entries(admin)
    left = snapshots_by_id(admin, origin_id)  # the copy's snapshot went with the copy
    assert "mine" in left and len(left) == 2 and not any(copy in snap for snap in left), left

    assert c.remove(live) == {"Err": ""}
    second = purge()
    assert f"deleted trashclones/{live}" in second.stdout
    assert f"deleted trashclones/{origin}" in second.stdout, second.stderr
    mine = (origin, copy, live)
    assert not [line for line in second.stderr.splitlines() if any(n in line for n in mine)]
    assert not set(mine) & trash_entries(admin).keys()
    assert not set(mine) & set(admin.images(POOL))


def test_trash_commands_refuse_a_cinder_or_unknown_driver() -> None:
    config = str(Path(__file__).resolve().parents[2] / "config" / "cinder.toml")
    cinder = rbdplugin("trash", "purge", "--config", config, "--driver", "vm")
    assert cinder.returncode == 1 and "Cinder has no trash" in cinder.stderr, cinder.stderr
    unknown = rbdplugin("trash", "ls", "--config", config, "--driver", "nope")
    assert unknown.returncode == 1 and "no driver 'nope'" in unknown.stderr, unknown.stderr
