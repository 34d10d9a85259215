"""The handles the daemon keeps open per image, on a real cluster: a mounted volume's
presence handle answers who watches it, so the lens must not keep a second one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import rados
import rbd

from rbdplugin.ceph import Connection
from rbdplugin.devcluster import DevCluster
from tests.helpers import unique

POOL = "alpha"


@pytest.fixture
def conn(cluster: DevCluster) -> Iterator[Connection]:
    handle = rados.Rados(
        conffile=str(cluster.conf), rados_id=POOL, conf={"keyring": str(cluster.keyring(POOL))}
    )
    handle.connect(timeout=10)
    connection = Connection(handle, "", "lens-test")
    yield connection
    connection.retire()  # closes the kept handles, the lens and the I/O contexts
    connection.closed.result(timeout=30)


def test_presence_handle_replaces_the_lens_handle_of_the_same_image(conn: Connection) -> None:
    name = unique("lens")
    ioctx = conn.ioctx(POOL)
    rbd.RBD().create(ioctx, name, 64 << 20, old_format=False)
    try:
        assert conn.watchers(POOL, name, None) == []  # asked through a lens handle
        assert conn.lens.kept() == 1
        assert conn.keep_open(POOL, name)
        assert conn.lens.kept() == 0  # the presence handle answers from now on
        own = conn.cluster.get_addrs()
        watching = conn.watchers(POOL, name, None)
        assert [w["addr"] for w in watching] == [own]  # the presence watch, seen by Ceph
        assert conn.lens.kept() == 0  # and no handle was opened again for it
        conn.close_kept(POOL, name)
        assert conn.watchers(POOL, name, None) == []  # back through the lens
    finally:
        conn.close_kept(POOL, name)
        conn.lens.close()
        rbd.RBD().remove(ioctx, name)
