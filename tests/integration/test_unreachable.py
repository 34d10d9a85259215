"""When Ceph cannot be reached, Get and List answer from what the daemon knows.

Docker drops a volume from its store when Get fails at start-up, so a daemon
that restarts during a Ceph outage must still know its volumes. The outage here
is a second daemon sharing the first one's state directory but pointed at a
monitor address where nothing listens.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

from rbdplugin.devcluster import DevCluster
from tests.conftest import StartDaemon, tenant_toml
from tests.helpers import unique


def _dead_conf(cluster: DevCluster, target: Path) -> Path:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    text, replaced = re.subn(r"mon host = .*", f"mon host = v1:127.0.0.1:{port}",
                             cluster.conf.read_text())  # fmt: skip
    assert replaced == 1, "the cluster's ceph.conf has no 'mon host' line to point elsewhere"
    target.write_text(text)
    return target


def test_get_and_list_answer_from_local_state(
    cluster: DevCluster, daemon_factory: StartDaemon, short_tmp: Path
) -> None:
    tenants = tenant_toml(cluster, "alpha", table="outage", driver="outage")
    state = short_tmp / "outage-state"
    live = daemon_factory(tenants, wait_for="outage", state_dir=str(state))
    name = unique("known")
    client = live.client("outage")
    assert client.create(name, {"size": "16M"}) == {"Err": ""}
    assert client.get(name)["Err"] == ""
    live.stop()
    # The known volumes are a cache a person may have edited: a name Docker could never
    # have given, or a CreatedAt of the wrong type, must not break the whole List.
    known = state / "outage" / "known-volumes.json"
    entries = json.loads(known.read_text())
    entries["bad name/.."] = {"created_at": "2026-11-30T12:01:02Z"}
    entries[name] = {**entries[name], "created_at": ["not", "a", "time"]}
    known.write_text(json.dumps(entries))

    dead = daemon_factory(
        tenants, wait_for="outage", state_dir=str(state),
        conf=_dead_conf(cluster, short_tmp / "dead.conf"),
    )  # fmt: skip
    client = dead.client("outage")
    started = time.monotonic()
    got = client.get(name)
    assert got["Err"] == ""
    status = got["Volume"]["Status"]
    assert status["size"] == "16M" and status["pool"] == "alpha"
    assert status["ceph"].startswith("unreachable: ")
    assert time.monotonic() - started < 30  # bounded by client_timeout, not hung
    listed = client.names()  # answered: the invalid name is left out, the volume listed
    assert name in listed and "bad name/.." not in listed, listed
    # A volume the daemon never saw is an error that says why, not "not found".
    err = client.get(unique("never"))["Err"]
    assert "Ceph" in err and ("unreachable" in err or "cannot connect" in err)
    # Writes need Ceph: a clear error, not a hang.
    assert (
        "cannot connect to Ceph as client.alpha" in client.create(unique(), {"size": "8M"})["Err"]
    )
