"""An RBD image's own RADOS objects, read and written without opening the image.

Opening an image with librbd costs about ten round trips (id, immutable and mutable
metadata, snapshots, parent, ...), 4-5 ms on a fast cluster, and most of Create and
Get went there. What the plugin needs is three small records of librbd's format-2
layout, stable since 2012:

- ``rbd_id.<name>``: the image's id (a length-prefixed string);
- ``rbd_header.<id>``'s omap: ``size`` and ``features`` (little-endian u64),
  ``create_timestamp`` (a utime_t: u32 seconds, u32 nanoseconds), and each
  image-meta key as ``metadata_<key>`` with its raw value;
- each snapshot as ``snapshot_<id, 16 hex digits>``: a cls_rbd_snap record, versioned
  (u8 version, u8 compat, u32 length), then the id (u64) and the name (a
  length-prefixed string), the only fields read here;
- writes of image-meta go through the ``rbd`` object class's ``metadata_set`` and
  ``metadata_remove`` methods, the same server-side calls librbd makes, so no
  exclusive lock is taken (librbd takes it for every metadata write on an image
  with exclusive-lock, a watch and two more round trips each).

Who has an image open (its watchers) is the one thing RADOS cannot tell through
the Python bindings without librbd; :class:`WatcherLens` keeps a few read-only
handles for that (a read-only open registers no watch, so the lens is invisible).
"""

from __future__ import annotations

import errno
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import rados
import rbd

ID_PREFIX = "rbd_id."
HEADER_PREFIX = "rbd_header."
META_PREFIX = "metadata_"
SNAPSHOT_PREFIX = "snapshot_"  # + the id as 16 hex digits: sorted keys are in id order
# Reading the header's omap in one go: a header holds a dozen keys plus image-meta.
MAX_HEADER_KEYS = 4096


@dataclass(frozen=True)
class Header:
    image_id: str
    size: int
    features: int
    created: datetime | None
    metadata: dict[str, str] = field(default_factory=dict)
    order: int = 22  # objects of 2**order bytes
    object_prefix: str = ""  # the data objects' names: <prefix>.<16 hex digits>
    # A clone (its data partly in its parent) or an image with a separate data pool:
    # its data objects are not all <prefix>.* in this pool.
    data_elsewhere: bool = False
    snapshots: tuple[str, ...] = ()  # names, oldest first
    linked: bool = False  # a clone still reading from its parent (not flattened)


def lookup_id(ioctx: rados.Ioctx, name: str) -> str | None:
    """The id of image ``name`` in ``ioctx``'s pool and namespace, None if there is none."""
    try:
        raw: bytes = ioctx.read(ID_PREFIX + name, 4096)
    except rados.ObjectNotFound:
        return None
    return _string(raw)


def read_header(ioctx: rados.Ioctx, image_id: str) -> Header | None:
    """The image's size, features, creation time and image-meta; None if it is gone."""
    with header_read(ioctx, image_id) as raw:
        pass
    return parse_header(image_id, raw.values)


def header_read(ioctx: rados.Ioctx, image_id: str) -> OmapRead:
    """:func:`read_header`'s round trip, asked asynchronously (:func:`parse_header` its
    ``values`` once the ``with`` block has ended)."""
    return OmapRead(ioctx, HEADER_PREFIX + image_id, limit=MAX_HEADER_KEYS)


def parse_header(image_id: str, values: dict[str, bytes]) -> Header | None:
    """The header of ``image_id`` from its omap; None if it is gone (no omap)."""
    if "size" not in values:  # not a format-2 header (or one being created)
        return None
    metadata = {
        key.removeprefix(META_PREFIX): value.decode(errors="replace")
        for key, value in values.items()
        if key.startswith(META_PREFIX)
    }
    return Header(
        image_id=image_id,
        size=_u64(values["size"]),
        features=_u64(values.get("features", b"")),
        created=_utime(values.get("create_timestamp", b"")),
        metadata=metadata,
        order=values["order"][0] if values.get("order") else 22,
        object_prefix=_string(values["object_prefix"]) if values.get("object_prefix") else "",
        data_elsewhere="parent" in values or "data_pool_id" in values,
        linked="parent" in values,
        snapshots=tuple(
            _snapshot_name(values[key]) for key in sorted(values) if key.startswith(SNAPSHOT_PREFIX)
        ),
    )


def _snapshot_name(raw: bytes) -> str:
    # cls_rbd_snap: ENCODE_START's u8 version, u8 compat, u32 length; u64 id; the name.
    return _string(raw[14:])


def unwritten(ioctx: rados.Ioctx, header: Header, regions: list[tuple[int, int]]) -> bool:
    """Whether no data object under ``regions`` (start, length) of the image exists, so
    those bytes read as zeros; False whenever that cannot be told this way."""
    if header.data_elsewhere or not header.object_prefix:
        return False
    size = 1 << header.order
    numbers = {n for start, length in regions if length
               for n in range(start // size, (start + length - 1) // size + 1)}  # fmt: skip
    for number in sorted(numbers):
        try:
            ioctx.stat(f"{header.object_prefix}.{number:016x}")
        except rados.ObjectNotFound:
            continue
        return False
    return True


def set_metadata(ioctx: rados.Ioctx, image_id: str, put: dict[str, str], drop: list[str]) -> None:
    """Set ``put`` and remove ``drop`` in the image's image-meta, in one write."""
    with rados.WriteOpCtx() as op:
        if put:
            op.execute("rbd", "metadata_set", _encode_map(put))
        for key in drop:
            op.execute("rbd", "metadata_remove", _encode_str(key))
        ioctx.operate_write_op(op, HEADER_PREFIX + image_id)


def _string(raw: bytes) -> str:
    (length,) = struct.unpack_from("<I", raw)
    return raw[4 : 4 + length].decode()


def _u64(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0


def _utime(raw: bytes) -> datetime | None:
    if len(raw) < 8:
        return None
    seconds, _ = struct.unpack("<II", raw[:8])
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


def _encode_str(value: str) -> bytes:
    data = value.encode()
    return struct.pack("<I", len(data)) + data


def _encode_map(values: dict[str, str]) -> bytes:
    # Ceph's encoding of map<string, bufferlist>: a count, then each key and value
    # length-prefixed.
    out = [struct.pack("<I", len(values))]
    for key, value in values.items():
        out += [_encode_str(key), _encode_str(value)]
    return b"".join(out)


class OmapRead:
    """An object's omap (or only ``keys`` of it), asked asynchronously when the ``with``
    block starts and read when it ends: the round trip overlaps the block's own work.
    ``values`` is empty if the object does not exist; any other failure raises."""

    def __init__(
        self, ioctx: rados.Ioctx, oid: str, keys: tuple[str, ...] | None = None, limit: int = 16
    ) -> None:
        self.ioctx = ioctx
        self.oid = oid
        self.keys = keys
        self.limit = limit
        self.values: dict[str, bytes] = {}

    def __enter__(self) -> OmapRead:
        self._op = rados.ReadOpCtx().__enter__()
        if self.keys is None:
            self._entries, _ = self.ioctx.get_omap_vals(self._op, "", "", self.limit)
        else:
            self._entries, _ = self.ioctx.get_omap_vals_by_keys(self._op, self.keys)
        self._done = self.ioctx.operate_aio_read_op(self._op, self.oid)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._done.wait_for_complete()  # always: the op must outlive the request
            code = self._done.get_return_value()
            if code == 0:
                self.values = dict(self._entries)
            elif code != -errno.ENOENT:
                raise rados.Error(f"reading the omap of {self.oid}", errno=-code)
        finally:
            self._op.__exit__(None, None, None)


class IdRead:
    """:func:`lookup_id` asked asynchronously when the ``with`` block starts; ``value``
    is the id (None if there is no such image) once it has ended."""

    def __init__(self, ioctx: rados.Ioctx, name: str) -> None:
        self.ioctx = ioctx
        self.oid = ID_PREFIX + name
        self.value: str | None = None
        self._data: bytes | None = None

    def __enter__(self) -> IdRead:
        def keep(_: rados.Completion, data: bytes | None) -> None:  # librados' thread
            self._data = data

        self._done = self.ioctx.aio_read(self.oid, 4096, 0, keep)
        return self

    def __exit__(self, *exc: object) -> None:
        # Until the callback too has run: wait_for_complete() may return before it.
        self._done.wait_for_complete_and_cb()
        code = self._done.get_return_value()
        if code >= 0 and self._data is not None:
            self.value = _string(self._data)
        elif code not in (0, -errno.ENOENT):
            raise rados.Error(f"reading {self.oid}", errno=-code)


class IdCache:
    """Image ids of names seen lately, to read an image's records alongside its id
    rather than after it. Only ever a guess: whoever uses one reads the name's id in
    the same round trip and drops what it read if the two differ (an image removed
    and made again under the same name, or moved to the trash, has another id or
    none). Bounded; thread-safe."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._ids: OrderedDict[tuple[str, str], str] = OrderedDict()

    def get(self, pool: str, name: str) -> str | None:
        with self._lock:
            return self._ids.get((pool, name))

    def put(self, pool: str, name: str, image_id: str) -> None:
        with self._lock:
            self._ids[(pool, name)] = image_id
            self._ids.move_to_end((pool, name))
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)

    def drop(self, pool: str, name: str) -> None:
        with self._lock:
            self._ids.pop((pool, name), None)


class WatcherLens:
    """Read-only librbd handles kept open to ask who watches an image's header.

    Keyed by image id (ids are never reused, so a rename or a new image under an old
    name can never be answered for by a stale handle). The least recently used
    handle is closed beyond ``size``: each costs a third of a MiB. Thread-safe; the
    handles are closed with the connection they belong to.
    """

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._handles: OrderedDict[tuple[str, str], rbd.Image] = OrderedDict()

    def watchers(self, ioctx: rados.Ioctx, pool: str, image_id: str) -> list[dict[str, object]]:
        key = (pool, image_id)
        with self._lock:
            handle = self._handles.pop(key, None)
        if handle is None:
            handle = rbd.Image(ioctx, image_id=image_id, read_only=True)
        try:
            found = [dict(w) for w in handle.watchers_list()]
        except BaseException:
            handle.close()  # removed meanwhile, or the connection broke: never reuse it
            raise
        self._keep(key, handle)
        return found

    def drop(self, pool: str, image_id: str) -> None:
        """Close the handle of an image now asked through another one (a presence
        handle): a third of a MiB each, twice for every mounted volume otherwise."""
        with self._lock:
            handle = self._handles.pop((pool, image_id), None)
        if handle is not None:
            handle.close()

    def kept(self) -> int:
        with self._lock:
            return len(self._handles)

    def _keep(self, key: tuple[str, str], handle: rbd.Image) -> None:
        with self._lock:
            self._handles[key] = handle
            evicted = []
            while len(self._handles) > self.size:
                evicted.append(self._handles.popitem(last=False)[1])
        for old in evicted:
            old.close()

    def close(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), OrderedDict()
        for handle in handles:
            handle.close()
