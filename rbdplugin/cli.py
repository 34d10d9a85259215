"""The ``rbdplugin`` command: serve, devcluster, devcloud, check-config, status, locks,
trash, volume, snapshot, example-config."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from rbdplugin import __version__, locks, seed, trash
from rbdplugin.config import Config, load_config, only_tenant
from rbdplugin.daemon import serve
from rbdplugin.devcloud.cli import register as register_devcloud
from rbdplugin.devcluster import DevCluster
from rbdplugin.errors import ConfigError, CorruptLease, RbdPluginError

DEFAULT_CONFIG = Path("/etc/rbdplugin/rbdplugin.toml")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(seed.normalize_argv(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    try:
        result: int = args.func(args)
    except RbdPluginError as exc:
        print(f"rbdplugin: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbdplugin", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rbdplugin {version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    s = commands.add_parser("serve", help="run the Docker volume plugin daemon")
    s.add_argument(
        "--config",
        type=Path,
        help=f"config file (default {DEFAULT_CONFIG}); with {seed.SEED} flags, or when FILE "
        "is not TOML with a [tenants] table: that plugin's ceph.conf",
    )
    s.add_argument(
        "--embedded-cluster",
        type=Path,
        metavar="DIR",
        help="start a throwaway dev Ceph cluster in DIR, serve it, stop it on exit",
    )
    s.add_argument("--socket-dir", type=Path, help="with --embedded-cluster: where sockets go")
    _one_tenant_arguments(s)
    seed.add_arguments(s)
    s.set_defaults(func=_serve)

    c = commands.add_parser("check-config", help="validate a config file and print it")
    c.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    c.set_defaults(func=_check_config)

    st = commands.add_parser("status", help="ask the running daemon what it has mounted")
    st.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    _locks_commands(commands)
    _trash_commands(commands)
    _volume_commands(commands)
    _snapshot_commands(commands)

    d = commands.add_parser("devcluster", help="a throwaway single-node Ceph cluster")
    dc = d.add_subparsers(required=True, metavar="ACTION")
    start = dc.add_parser("start", help="start (or restart) the cluster in DIR")
    start.add_argument("--dir", type=Path, required=True)
    start.add_argument("--tenant", action="append", dest="tenants", metavar="NAME")
    start.add_argument("--socket-dir", type=Path)
    start.add_argument("--store", choices=("memstore", "bluestore"), default="memstore")
    start.add_argument("--watch-timeout", type=int, default=30, metavar="SECONDS")
    start.set_defaults(func=_dev_start)
    stop = dc.add_parser("stop", help="stop the cluster's daemons")
    stop.add_argument("--dir", type=Path, required=True)
    stop.add_argument("--purge", action="store_true", help="also delete DIR")
    stop.set_defaults(func=_dev_stop)
    status = dc.add_parser("status", help="what runs")
    status.add_argument("--dir", type=Path, required=True)
    status.set_defaults(func=_dev_status)
    ex = commands.add_parser(
        "example-config", help="print an example config or unit file shipped with rbdplugin"
    )
    ex.add_argument("name", nargs="?", help="e.g. single-tenant.toml; without it: list them")
    ex.set_defaults(func=_example_config)
    register_devcloud(commands)
    return parser


ONE_DRIVER = "the volume's driver (needed with several tenants)"
ANY_DRIVER = "only this driver (tenant)"


def _action(
    group: Any, name: str, text: str, func: Callable[[argparse.Namespace], int],
    *, targets: Sequence[str] = (), driver: str = ONE_DRIVER, listing: bool = False,
) -> argparse.ArgumentParser:  # fmt: skip
    """One operator command: its positional ``targets``, the config, the driver, and
    ``--json`` for those that print a listing or a result."""
    p: argparse.ArgumentParser = group.add_parser(name, help=text)
    for target in targets:
        p.add_argument(target.lower(), metavar=target)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--driver", help=driver)
    if listing:
        p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return p


def _locks_commands(commands: Any) -> None:
    lk = commands.add_parser("locks", help="who holds which volume; break a lock")
    group = lk.add_subparsers(required=True, metavar="ACTION")
    _action(group, "ls", "list the hosts holding volumes", _locks_ls, driver=ANY_DRIVER,
            listing=True)  # fmt: skip
    br = _action(group, "break", "fence the holder of VOLUME and release its lock", _locks_break,
                 targets=["VOLUME"])  # fmt: skip
    br.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _volume_commands(commands: Any) -> None:
    vol = commands.add_parser("volume", help="operate on one volume through the daemon")
    group = vol.add_subparsers(required=True, metavar="ACTION")
    text = "grow VOLUME to SIZE, online where it is mounted on this host (never shrinks)"
    rs = _action(group, "resize", text, _volume_resize, targets=["VOLUME", "SIZE"], listing=True)
    rs.description = (
        "Grow VOLUME's image to SIZE (e.g. 40G, binary units; never smaller); where it is "
        "mounted on this host, also its device and filesystem, without unmounting. Exit 0: "
        "done; 2: the image grew but its filesystem grows only at its next Mount (the reason "
        "is printed); 1: error."
    )


def _snapshot_commands(commands: Any) -> None:
    snap = commands.add_parser("snapshot", help="snapshots of a volume, through the daemon")
    group = snap.add_subparsers(required=True, metavar="ACTION")
    for action, target, text in (
        ("create", "VOLUME@SNAPSHOT", "take a snapshot (the filesystem frozen if mounted here)"),
        ("rm", "VOLUME@SNAPSHOT", "remove a snapshot (refused while clones read from it)"),
        ("ls", "VOLUME", "list a volume's snapshots"),
    ):
        p = _action(group, action, text, _snapshot, listing=True)
        p.add_argument("target", metavar=target)
        p.set_defaults(action=action)


def _trash_commands(commands: Any) -> None:
    t = commands.add_parser("trash", help="removed volumes in the RBD trash: list, restore, purge")
    group = t.add_subparsers(required=True, metavar="ACTION")
    _action(group, "ls", "list the trash of every RBD tenant (or --driver's)", _trash_ls,
            driver=ANY_DRIVER, listing=True)  # fmt: skip
    rs = _action(group, "restore", "bring a removed volume back", _trash_restore,
                 targets=["VOLUME"])  # fmt: skip
    rs.add_argument("--id", dest="image_id", help="which entry, when VOLUME is there twice")
    rs.add_argument("--as", dest="new_name", metavar="NAME", help="restore under this name")
    pg = _action(group, "purge", "delete the entries whose trash_delay is over", _trash_purge,
                 driver=ANY_DRIVER)  # fmt: skip
    pg.add_argument("--dry-run", action="store_true", help="say what would be deleted")


def version() -> str:
    try:
        return importlib.metadata.version("rbdplugin")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout
        return __version__


def _configure_logging(config: Config) -> None:
    logging.getLogger().setLevel(config.daemon.log_level.upper())


def _one_tenant_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--only-tenant",
        metavar="NAME",
        help="serve only this tenant of the config (a managed plugin serves one)",
    )
    s.add_argument(
        "--as-driver",
        metavar="DRIVER",
        help="with --only-tenant: serve it under this driver name (a managed plugin: rbd)",
    )


def _serve(args: argparse.Namespace) -> int:
    if args.embedded_cluster is None:
        config = _serve_config(args)
        _configure_logging(config)
        asyncio.run(serve(config))
        return 0
    cluster = DevCluster(args.embedded_cluster)
    cluster.start(socket_dir=args.socket_dir)
    try:
        config = load_config(cluster.daemon_config)
        _configure_logging(config)
        asyncio.run(serve(config))
    finally:
        logging.getLogger(__name__).info(
            "stopping the embedded cluster: %s", ", ".join(cluster.stop())
        )
    return 0


def _serve_config(args: argparse.Namespace) -> Config:
    seed_mode = seed.seed_flags_given(args) or (
        args.config is not None and seed.config_is_ceph_conf(args.config)
    )
    if not seed_mode:
        config = load_config(args.config or DEFAULT_CONFIG)
        if args.only_tenant:
            return only_tenant(config, args.only_tenant, args.as_driver)
        if args.as_driver:
            raise ConfigError("--as-driver needs --only-tenant: one tenant gets the new name")
        return config
    log = logging.getLogger("rbdplugin.seed")
    translation = seed.translate(seed.flags_from(args))
    config = seed.load(translation, os.environ)
    log.info(
        "serving %s's flags as this config (save it as %s and start with --config to keep it):\n%s",
        seed.SEED,
        DEFAULT_CONFIG,
        translation.toml,
    )
    for note in translation.notes:
        log.warning("%s flags: %s", seed.SEED, note)
    return config


def _example_config(args: argparse.Namespace) -> int:
    found = examples()
    if args.name is None:
        for name, path in sorted(found.items()):
            print(f"{name}\t{path}")
        return 0
    if args.name not in found:
        raise ConfigError(f"no example {args.name!r}; there are: {', '.join(sorted(found))}")
    sys.stdout.write(found[args.name].read_text())
    return 0


def examples() -> dict[str, Path]:
    """The example configs and unit files: installed with the wheel under
    <prefix>/share/rbdplugin/, or in a source checkout's config/ and systemd/."""
    found: dict[str, Path] = {}
    try:
        dist = importlib.metadata.distribution("rbdplugin")
        for file in dist.files or ():
            if "share/rbdplugin/" in file.as_posix():
                path = Path(str(dist.locate_file(file))).resolve()
                found.setdefault(path.name, path)
    except importlib.metadata.PackageNotFoundError:
        pass
    if found:
        return found
    checkout = Path(__file__).resolve().parents[1]
    for folder in ("config", "systemd"):
        for path in sorted((checkout / folder).glob("*")):
            if path.is_file():
                found.setdefault(path.name, path)
    return found


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: OK")
    for tenant in config.tenants:
        if tenant.cinder is not None:
            where = f"Cinder volumes of cloud {tenant.cinder.cloud}"
        else:
            namespace = "/" + tenant.namespace if tenant.namespace else ""
            where = f"pool {tenant.pool}{namespace} as client.{tenant.user}"
        print(
            f"  driver {tenant.driver}: {where}, "
            f"socket {config.daemon.socket_dir / (tenant.driver + '.sock')}"
        )
    return 0


def _status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    control = config.daemon.state_dir / "control.sock"
    status = asyncio.run(_ask_daemon(control))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if status["health"]["ready"] else 3
    health = status["health"]
    mapper = f"mapper {status['mapper']}" if status["mapper"] else "no mapper (Cinder mode only)"
    print(f"host {status['host_id']}, {mapper}, "
          f"{'ready' if health['ready'] else 'NOT READY'}")  # fmt: skip
    for driver, state in health["drivers"].items():
        listening = "listening" if state["listening"] else "NOT LISTENING"
        starting = "" if state.get("reconciled", True) else ", STILL RECONCILING"
        # RBD tenants report their Ceph connection, Cinder tenants Keystone and Cinder.
        where = "ceph" if "ceph" in state else "openstack"
        print(f"  driver {driver}: {state['socket']} {listening}, {where} {state.get(where)}"
              f"{starting}")  # fmt: skip
    if status.get("stuck_children"):
        print(f"  {status['stuck_children']} killed tool(s) still stuck in the kernel (see log)")
    rows = [("DRIVER", "VOLUME", "ACCESS", "PHASE", "DEVICE", "MOUNTPOINT", "MOUNTS", "PROBLEM")]
    for v in status["volumes"]:
        counts = ",".join(f"{k}={n}" for k, n in v["mounts"].items()) or "-"
        rows.append((v["driver"], v["volume"], v["access"], v["phase"], v["device"] or "-",
                     v["mountpoint"], counts, _problem(v)))  # fmt: skip
    print(_table(rows) if status["volumes"] else "no volumes mounted on this host")
    return 0 if health["ready"] else 3


def _problem(volume: dict[str, Any]) -> str:
    if volume.get("lost_to"):
        return f"LOST to {volume['lost_to']}"
    if volume.get("broken"):
        return f"BROKEN: {volume['broken']}"
    if volume.get("cleaning_since"):
        return f"clean-up running since {volume['cleaning_since']}"
    return "-"


async def _ask_daemon(
    control: Path, path: str = "/status", body: dict[str, Any] | None = None, seconds: float = 30
) -> dict[str, Any]:
    """GET ``path`` of the daemon's control socket, or POST ``body`` to it."""
    if not control.exists():
        raise RbdPluginError(f"no daemon answers at {control}: is rbdplugin serve running?")
    connector = aiohttp.UnixConnector(path=str(control))
    timeout = aiohttp.ClientTimeout(total=seconds)
    method = "GET" if body is None else "POST"
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, f"http://daemon{path}", json=body) as response,
        ):
            result: dict[str, Any] = await response.json()
            return result
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RbdPluginError(f"the daemon at {control} did not answer: {exc}") from exc


def _volume_resize(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    control = config.daemon.state_dir / "control.sock"
    body = {"Driver": args.driver, "Name": args.volume, "Size": args.size}
    # The daemon's own deadline (op_timeout) ends the work first; then its answer comes.
    answer = asyncio.run(
        _ask_daemon(control, "/volumes/resize", body, config.daemon.op_timeout + 10)
    )
    if answer.get("Err"):
        raise RbdPluginError(str(answer["Err"]))
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"volume {answer['Name']} (driver {answer['Driver']}): {answer['Before']} -> "
              f"{answer['Size']}; {answer['Filesystem']}")  # fmt: skip
    return 0 if answer["Complete"] else 2


def _snapshot(args: argparse.Namespace) -> int:
    volume, at, snapshot = args.target.partition("@")
    if (args.action == "ls") == bool(at):
        form = "VOLUME" if args.action == "ls" else "VOLUME@SNAPSHOT"
        raise ConfigError(f"snapshot {args.action} takes {form}, not {args.target!r}")
    config = load_config(args.config)
    body = {"Driver": args.driver, "Name": volume, "Snapshot": snapshot, "Action": args.action}
    control = config.daemon.state_dir / "control.sock"
    wait = config.daemon.op_timeout + 10  # the daemon's own deadline ends the work first
    answer = asyncio.run(_ask_daemon(control, "/volumes/snapshot", body, wait))
    if answer.get("Err"):
        raise RbdPluginError(str(answer["Err"]))
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.action == "ls":
        print("\n".join(answer["Snapshots"]))
    elif args.action == "create":
        how = ("its filesystem frozen around it: consistent" if answer["Frozen"]
               else "not mounted on this host: crash-consistent")  # fmt: skip
        print(f"volume {volume}: snapshot {snapshot} taken ({how})")
    else:
        print(f"volume {volume}: snapshot {snapshot} removed")
    return 0


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _locks_ls(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    rows = asyncio.run(locks.list_locks(config, args.driver))
    if args.json:
        print(json.dumps([{"driver": r.driver, "volume": r.volume, "host": r.holder.host,
                           "access": r.holder.mode, "since": r.holder.since,
                           "addresses": list(r.holder.addrs), "alive": r.holder.alive}
                          for r in rows], indent=2))  # fmt: skip
        return 0
    table = [("DRIVER", "VOLUME", "ACCESS", "HOST", "SINCE", "ALIVE", "ADDRESSES")]
    for r in rows:
        alive = "yes" if r.holder.alive else "NO"
        table.append((r.driver, r.volume, r.holder.mode, r.holder.host, r.holder.since, alive,
                      ",".join(r.holder.addrs)))  # fmt: skip
    print(_table(table))
    return 0


def _locks_break(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    tenants = locks.tenants_for(config, args.driver)
    if len(tenants) != 1:
        names = ", ".join(t.driver for t in tenants)
        raise ConfigError(f"several drivers in the config ({names}): name one with --driver")
    tenant = tenants[0]
    try:
        holders = asyncio.run(locks.holders_of(config, tenant, args.volume))
    except CorruptLease as exc:
        print(f"volume {args.volume}: {exc}")
        print("Its writer cannot be known, so nobody is fenced: make sure no host uses it.")
        holders = []
    else:
        if not holders:
            print(f"volume {args.volume}: nobody holds it")
            return 0
    for h in holders:
        state = "alive" if h.alive else "not alive"
        print(f"volume {args.volume}: {h.mode} on host {h.host} since {h.since} ({state}), "
              f"addresses {', '.join(h.addrs)}")  # fmt: skip
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("refusing to fence without confirmation: add --yes")
        answer = input(
            "Fence the writer (it can no longer write to this image) and release? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing done")
            return 1
    fenced = asyncio.run(locks.break_lock(config, tenant, args.volume))
    print(f"volume {args.volume}: released; fenced {', '.join(fenced) or 'nothing (no writer)'}")
    return 0


def _trash_ls(args: argparse.Namespace) -> int:
    entries = asyncio.run(trash.list_trash(load_config(args.config), args.driver))
    now = datetime.now(UTC)
    if args.json:
        print(json.dumps([{"driver": e.driver, "pool": e.pool, "volume": e.name,
                           "id": e.image_id, "source": e.source.lower(),
                           "removed_at": trash.stamp(e.deleted_at),
                           "purgeable_from": trash.stamp(e.purgeable_at),
                           "purgeable": e.purgeable(now)} for e in entries],
                         indent=2))  # fmt: skip
        return 0
    table = [("DRIVER", "POOL", "VOLUME", "ID", "REMOVED", "PURGEABLE FROM", "SOURCE")]
    table += [(e.driver, e.pool, e.name, e.image_id, trash.stamp(e.deleted_at),
               trash.stamp(e.purgeable_at) + (" (now)" if e.purgeable(now) else ""),
               e.source.lower()) for e in entries]  # fmt: skip
    print(_table(table))
    return 0


def _trash_restore(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    tenant = trash.one_tenant(config, args.driver)
    entry = asyncio.run(trash.restore(config, tenant, args.volume, args.image_id, args.new_name))
    print(f"volume {args.new_name or args.volume}: restored from the trash of pool {entry.pool} "
          f"(image id {entry.image_id}, removed {trash.stamp(entry.deleted_at)})")  # fmt: skip
    return 0


def _trash_purge(args: argparse.Namespace) -> int:
    done = asyncio.run(trash.purge(load_config(args.config), args.driver, args.dry_run))
    verb = "would delete" if args.dry_run else "deleted"
    for e in done.removed:
        print(f"{verb} {e.driver}/{e.name} (pool {e.pool}, image id {e.image_id})")
    for e in done.waiting:
        why = (f"kept until {trash.stamp(e.purgeable_at)}" if e.source == trash.USER_SOURCE
               else f"not ours to delete (put there by librbd: {e.source.lower()})")  # fmt: skip
        print(f"kept {e.driver}/{e.name} (image id {e.image_id}): {why}")
    for e, why in done.failed:
        print(f"FAILED {e.driver}/{e.name} (image id {e.image_id}): {why}", file=sys.stderr)
    return 1 if done.failed else 0


def _dev_start(args: argparse.Namespace) -> int:
    cluster = DevCluster(args.dir)
    cluster.start(
        tenants=args.tenants or ["rbd"],
        socket_dir=args.socket_dir,
        store=args.store,
        watch_timeout=args.watch_timeout,
    )
    print(f"dev cluster running: ceph.conf {cluster.conf}, daemon config {cluster.daemon_config}")
    return 0


def _dev_stop(args: argparse.Namespace) -> int:
    cluster = DevCluster(args.dir)
    stopped = cluster.stop()
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if args.purge:
        shutil.rmtree(cluster.root, ignore_errors=True)
    return 0


def _dev_status(args: argparse.Namespace) -> int:
    status = DevCluster(args.dir).status()
    print(json.dumps(status, indent=2))
    return 0 if status["running"] else 3
