"""``python -m rbdplugin.devcloud ACTION ...``: the same as ``rbdplugin devcloud ACTION ...``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rbdplugin.cli import main as rbdplugin_main


def main(argv: Sequence[str] | None = None) -> int:
    return rbdplugin_main(["devcloud", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
