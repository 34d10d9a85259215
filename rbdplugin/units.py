"""Sizes and durations as operators write them: ``20G``, ``512M``, ``1.5T``, ``7d``."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from rbdplugin.errors import InvalidArgument

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_SIZE_UNITS = {"K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1024**5}
# A number, then one unit letter, optionally followed by "i", "B" or "iB": 20G, 20GiB, 1.5t.
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGTP])(?:I?B)?$", re.IGNORECASE)
_SIZE_HELP = "a number with a binary unit K, M, G or T, for example 512M, 20G or 1.5T"

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^(\d+)\s*([smhd]?)$")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in ``text``, rounded up to a whole MiB (RBD images are sized in MiB here)."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise InvalidArgument(f"{what} {text!r} is not a size: use {_SIZE_HELP}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:  # pragma: no cover - the regex only admits decimals
        raise InvalidArgument(f"{what} {text!r} is not a size: use {_SIZE_HELP}") from exc
    size = int(number * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise InvalidArgument(f"{what} {text!r} must be greater than zero: use {_SIZE_HELP}")
    return -(-size // MiB) * MiB


def format_size(size: int) -> str:
    """The shortest exact spelling of ``size`` bytes: 20G, 1536M, 12345B."""
    for unit in ("P", "T", "G", "M", "K"):
        factor = _SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_duration(text: str | int, what: str = "duration") -> int:
    """Seconds in ``text``: a whole number of seconds, or with a unit s, m, h or d."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidArgument(f"{what} {text} must not be negative")
        return text
    match = _DURATION_RE.match(str(text).strip())
    if not match:
        raise InvalidArgument(
            f"{what} {text!r} is not a duration: use whole seconds or a number with s, m, h or d"
        )
    return int(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
