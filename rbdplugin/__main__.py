import sys

from rbdplugin.cli import main

sys.exit(main())
