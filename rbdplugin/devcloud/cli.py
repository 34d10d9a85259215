"""The ``devcloud`` command (``python -m rbdplugin.devcloud`` or ``rbdplugin devcloud``).

Only argparse at import time: the daemon's command line can register this without
loading the devcloud (or aiohttp's client, or the Ceph bindings) on its serve path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    """Add ``devcloud start|stop|status`` to an argparse subparsers object."""
    d = commands.add_parser(
        "devcloud", help="Ceph, Keystone, Cinder and a Nova stand-in on loopback (Cinder mode)"
    )
    dc = d.add_subparsers(required=True, metavar="ACTION")
    start = dc.add_parser("start", help="start (or start again) the devcloud in DIR")
    start.add_argument("--dir", type=Path, required=True)
    start.add_argument(
        "--token-lifetime",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="Keystone token lifetime (short ones test re-authentication)",
    )
    start.add_argument(
        "--guest-qmp",
        type=Path,
        default=None,
        metavar="PATH",
        help="the pretend server 'vm' is the QEMU guest whose QMP socket is PATH "
        "(GUEST_QMP_SOCKET of guest/run; it may boot later): its volumes are hot-plugged "
        "there. Kept for later starts",
    )
    start.set_defaults(func=_start)
    stop = dc.add_parser("stop", help="stop its processes and remove the pretend server's disks")
    stop.add_argument("--dir", type=Path, required=True)
    stop.add_argument("--purge", action="store_true", help="also delete DIR")
    stop.set_defaults(func=_stop)
    build = dc.add_parser("venv", help="build the OpenStack venv if missing; print its path")
    build.set_defaults(func=_venv)
    status = dc.add_parser("status", help="what runs, where, and the last start's timings")
    status.add_argument("--dir", type=Path, required=True)
    status.add_argument(
        "--ports",
        action="store_true",
        help="print only the Keystone, Cinder and Nova ports, space-separated "
        "(for guest/run --forward and rbdplugin.devcloud.bridge)",
    )
    status.set_defaults(func=_status)


def _start(args: argparse.Namespace) -> int:
    from rbdplugin.devcloud.cloud import DevCloud  # noqa: PLC0415 - off the daemon's path

    cloud = DevCloud(args.dir)
    state = cloud.start(token_lifetime=args.token_lifetime, guest_qmp=args.guest_qmp)
    print(
        f"devcloud running in {state.timings.get('total', 0):.1f} s: "
        f"keystone {cloud.url('keystone')}, cinder {cloud.url('cinder')}, "
        f"nova {cloud.url('nova')}"
    )
    print(f"clouds.yaml {cloud.clouds_yaml}, daemon config {cloud.daemon_config}")
    vm = cloud.server()
    if vm.disks == "qmp":
        print(f"server {vm.name} ({vm.id}) is the QEMU guest with QMP socket {vm.qmp}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from rbdplugin.devcloud.cloud import DevCloud  # noqa: PLC0415

    cloud = DevCloud(args.dir)
    stopped = cloud.stop()
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if args.purge:
        shutil.rmtree(cloud.root, ignore_errors=True)
    return 0


def _status(args: argparse.Namespace) -> int:
    from rbdplugin.devcloud.cloud import DevCloud  # noqa: PLC0415

    status = DevCloud(args.dir).status()
    if args.ports:
        if not status["exists"]:
            print(f"{args.dir} holds no devcloud", file=sys.stderr)
            return 3
        print(" ".join(str(port) for port in status["ports"].values()))
        return 0
    print(json.dumps(status, indent=2))
    return 0 if status["exists"] and not status["stopped"] else 3


def _venv(args: argparse.Namespace) -> int:
    from rbdplugin.devcloud.venv import ensure_venv  # noqa: PLC0415

    print(ensure_venv())
    return 0
