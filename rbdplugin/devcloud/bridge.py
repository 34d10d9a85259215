"""Make the devcloud's loopback endpoints work inside the kernel tier's guest.

Keystone's catalog (and so clouds.yaml, Cinder's and Nova's URLs) names
``http://127.0.0.1:PORT``. Inside the QEMU guest 127.0.0.1 is the guest itself, and
the host's loopback is only reachable at ``10.0.2.100:PORT`` for the ports given to
``guest/run --forward``. Run this in the guest::

    python3 -m rbdplugin.devcloud.bridge --to 10.0.2.100 KEYSTONE CINDER NOVA &

(the ports: ``rbdplugin devcloud status --dir DIR --ports`` on the host, or the
``ports`` of DIR/devcloud.json). It listens on 127.0.0.1:PORT for each port and
relays every connection, both ways, to ``--to``:PORT; a half-close is passed on.
It prints ``bridge: ready`` once it listens and exits on SIGTERM or SIGINT.

Standard library only, Python 3.11: the guest runs it with Debian's python3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

CHUNK = 65536


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side (drain() keeps memory bounded)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def _relay(
    target: str, port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
) -> None:
    try:
        upstream_r, upstream_w = await asyncio.open_connection(target, port)
    except OSError as exc:
        print(f"bridge: cannot reach {target}:{port}: {exc}", file=sys.stderr, flush=True)
        client_w.transport.abort()
        return
    try:
        await asyncio.gather(_pump(client_r, upstream_w), _pump(upstream_r, client_w))
    finally:
        for writer in (client_w, upstream_w):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def serve(target: str, ports: list[int], listen: str = "127.0.0.1") -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = []
    for port in ports:

        async def handle(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port
        ) -> None:
            await _relay(target, port, r, w)

        servers.append(await asyncio.start_server(handle, listen, port, reuse_address=True))
    print(
        f"bridge: ready ({', '.join(f'{listen}:{p} -> {target}:{p}' for p in ports)})", flush=True
    )
    await stop.wait()
    for server in servers:
        server.close()
    print("bridge: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m rbdplugin.devcloud.bridge",
        description="Relay 127.0.0.1:PORT to TARGET:PORT for each PORT (the devcloud's "
        "endpoints inside the kernel tier's guest).",
    )
    parser.add_argument("--to", required=True, metavar="TARGET", help="e.g. 10.0.2.100")
    parser.add_argument("--listen", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("ports", nargs="+", type=int, metavar="PORT")
    args = parser.parse_args(argv)
    if any(not 0 < port < 65536 for port in args.ports):
        parser.error("a port is out of range")
    try:
        asyncio.run(serve(args.to, args.ports, args.listen))
    except OSError as exc:
        print(f"bridge: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
