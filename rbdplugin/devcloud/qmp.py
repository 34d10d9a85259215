"""A small QMP client: hot-plug and unplug a virtio disk in a running QEMU.

The kernel tier's guest (guest/run) listens for QMP on a Unix socket. Plugging a
``virtio-blk-pci`` device with a ``serial`` into it is what Nova's libvirt driver
does for a Cinder volume: the guest's own kernel and udev then announce the disk and
make ``/dev/disk/by-id/virtio-<serial>``. Used by the kernel tier's udev test and by
the Nova stand-in's guest disk maker. Standard library only (QMP is JSON lines).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

SERIAL_CHARS = 20  # virtio-blk cuts serials to 20 bytes


class QmpError(RuntimeError):
    """QEMU refused a command, or did not answer in time."""


class Qmp:
    """One QMP session; commands run one at a time, events are kept for waiters."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self._timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self._message()  # the greeting
        self.command("qmp_capabilities")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QmpError("QEMU closed the QMP socket")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._message()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            else:
                return reply.get("return")

    def wait_event(self, name: str, device: str, seconds: float) -> None:
        """Wait for event ``name`` about ``device`` (e.g. DEVICE_DELETED after device_del)."""
        deadline = time.monotonic() + seconds
        try:
            while not any(_about(e, name, device) for e in self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QmpError(f"no {name} for {device} within {seconds:.0f} s")
                self._sock.settimeout(left)
                try:
                    message = self._message()
                except TimeoutError:
                    continue  # the deadline check above reports it
                if "event" in message:
                    self.events.append(message)
        finally:
            self._sock.settimeout(self._timeout)


def children(qmp: Qmp, path: str) -> set[str]:
    """Names of the QOM children of ``path`` (``/machine/peripheral``: device ids given
    with ``device_add id=...``; ``/objects``: ``object-add`` ids)."""
    entries = qmp.command("qom-list", path=path)
    return {e["name"] for e in entries if str(e.get("type", "")).startswith("child<")}


def device_ids(qmp: Qmp) -> set[str]:
    """Ids of the devices added with an ``id`` (command line or ``device_add``)."""
    return children(qmp, "/machine/peripheral")


def object_ids(qmp: Qmp) -> set[str]:
    return children(qmp, "/objects")


def block_nodes(qmp: Qmp) -> set[str]:
    """Node names of the block graph (``blockdev-add`` ones and QEMU's own)."""
    nodes = qmp.command("query-named-block-nodes", flat=True)
    return {n["node-name"] for n in nodes if n.get("node-name")}


def delete_device(qmp: Qmp, device_id: str, seconds: float) -> None:
    """``device_del`` and wait until the guest let it go; nothing to do if it is gone.

    QmpError if it is still there after ``seconds`` (the unplug request stays pending:
    a guest may still release it later)."""
    if device_id not in device_ids(qmp):
        return
    try:
        qmp.command("device_del", id=device_id)
    except QmpError as exc:
        if device_id not in device_ids(qmp):
            return  # gone in between
        if "in the process of unplug" not in str(exc):
            raise
    deadline = time.monotonic() + seconds
    while device_id in device_ids(qmp):
        left = deadline - time.monotonic()
        if left <= 0:
            raise QmpError(f"the guest did not release device {device_id} within {seconds:.0f} s")
        with contextlib.suppress(QmpError):
            qmp.wait_event("DEVICE_DELETED", device_id, min(left, 1.0))


def _about(event: dict[str, Any], name: str, device: str) -> bool:
    return bool(event.get("event") == name and event.get("data", {}).get("device") == device)


def plug_disk(qmp: Qmp, device_id: str, image: Path, serial: str) -> None:
    """Hot-plug raw file ``image`` as a virtio disk with ``serial`` (cut to 20 bytes)."""
    node = f"{device_id}-node"
    qmp.command("blockdev-add", **{"driver": "raw", "node-name": node,
                                   "file": {"driver": "file", "filename": str(image)}})  # fmt: skip
    try:
        qmp.command("device_add", driver="virtio-blk-pci", id=device_id, drive=node,
                    serial=serial[:SERIAL_CHARS])  # fmt: skip
    except QmpError:
        qmp.command("blockdev-del", **{"node-name": node})
        raise


def unplug_disk(qmp: Qmp, device_id: str, seconds: float = 60) -> None:
    """Unplug the disk (the guest must agree, as a real one does) and free its node."""
    qmp.command("device_del", id=device_id)
    qmp.wait_event("DEVICE_DELETED", device_id, seconds)
    qmp.command("blockdev-del", **{"node-name": f"{device_id}-node"})
