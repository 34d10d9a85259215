"""``python -m rbdplugin.devcloud start|stop|status --dir DIR``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rbdplugin.devcloud.cli import register
from rbdplugin.errors import RbdPluginError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbdplugin")
    register(parser.add_subparsers(required=True, metavar="COMMAND"))
    args = parser.parse_args(["devcloud", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
    except RbdPluginError as exc:
        print(f"devcloud: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
