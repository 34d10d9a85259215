"""sd_notify(3) without libsystemd: tell the service manager how start-up goes.

systemd (``Type=notify``) passes ``NOTIFY_SOCKET``, a Unix datagram socket (a name
starting with ``@`` is in the abstract namespace). Each message is newline-separated
``KEY=VALUE`` lines: ``STATUS=`` text for ``systemctl status``, ``READY=1`` once the
service accepts work, ``STOPPING=1`` when it begins to shut down. Without
``NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager; a no-op without an address."""

    def __init__(self, address: str | None) -> None:
        self.address = _socket_address(address) if address else None

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Take ``NOTIFY_SOCKET`` out of the environment: the export processes the daemon
        starts (and that outlive it) must not speak for the service."""
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False if there is no manager to tell."""
        if self.address is None:
            return False
        message = "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:  # the manager going away must not stop the daemon
            log.warning("could not notify the service manager at %s: %s", self.address, exc)
            return False
        return True

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.send(STOPPING="1", STATUS=status)


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _one_line(value: str) -> str:
    return " ".join(value.split("\n"))
