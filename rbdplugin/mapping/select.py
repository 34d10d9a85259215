"""Choosing and building the mapper: the one place that knows every back-end."""

from __future__ import annotations

import logging
from pathlib import Path

from rbdplugin.devices import Devices
from rbdplugin.mapping import HostPaths, Mapper, MapperUnavailable, unavailable_reason
from rbdplugin.mapping.fuse import FuseMapper
from rbdplugin.mapping.krbd import KrbdMapper
from rbdplugin.mapping.nbd import NbdMapper
from rbdplugin.process import Runner

log = logging.getLogger(__name__)

AUTO_ORDER = ("krbd", "nbd", "fuse")


def choose(name: str, host: HostPaths) -> str:
    """The mapper to use for config value ``name`` (auto or explicit), with reasons logged."""
    if name != "auto":
        reason = unavailable_reason(name, host)
        if reason:
            raise MapperUnavailable(f"mapper {name} cannot work on this host: {reason}")
        return name
    reasons: list[str] = []
    for candidate in AUTO_ORDER:
        reason = unavailable_reason(candidate, host)
        if reason is None:
            skipped = f" (not {', '.join(reasons)})" if reasons else ""
            log.info("mapper auto: using %s%s", candidate, skipped)
            return candidate
        reasons.append(f"{candidate}: {reason}")
    raise MapperUnavailable(f"no mapper works on this host: {'; '.join(reasons)}")


def build_mapper(
    name: str, runner: Runner, host: HostPaths, state_dir: Path, timeout: float
) -> Mapper:
    """The one place mappers are constructed."""
    chosen = choose(name, host)
    if chosen == "fuse":
        return FuseMapper(runner, host, state_dir / "exports", timeout)
    devices = Devices()  # krbd and rbd-nbd devices are announced by udev where it runs
    if chosen == "krbd":
        return KrbdMapper(runner, host, timeout, devices=devices)
    return NbdMapper(runner, host, timeout, devices)
