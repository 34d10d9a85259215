"""Run a real Keystone: set it up on first start, then serve its public API.

Runs as its own process with the OpenStack venv's python (never imported by
rbdplugin): ``python keystone_service.py SPEC.json``. SPEC names the config file,
the port, and for a first start the bootstrap values; the admin password comes from
a 0600 file, never from the command line. The ``keystone-manage`` steps run in this
one process (one set of imports: ~1.5 s instead of 3-4 s per separate command), then
the WSGI app is served by the standard library's threaded server on 127.0.0.1 in the
same process; that takes resetting what the steps leave behind (the parsed config,
keystone-manage's subcommand option, the locked registry of provider APIs).
SIGTERM exits 0.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import socketserver
import sys
import time
from pathlib import Path
from typing import Any
from wsgiref import simple_server

from keystone.cmd import cli  # type: ignore[import-not-found]
from keystone.common import provider_api  # type: ignore[import-not-found]
from oslo_config import cfg  # type: ignore[import-not-found]


def _manage(conf: str, *args: str) -> None:
    cfg.CONF.reset()
    cfg.CONF.clear()
    cli.main(argv=["keystone-manage", "--config-file", conf, *args])


def setup(spec: dict[str, Any]) -> None:
    """db_sync, key repositories and bootstrap: what a fresh Keystone needs once."""
    conf = spec["config"]
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    owner = ("--keystone-user", user, "--keystone-group", group)
    _manage(conf, "db_sync")
    _manage(conf, "fernet_setup", *owner)
    _manage(conf, "credential_setup", *owner)
    bootstrap = {
        "username": "admin",
        "project-name": "admin",
        "role-name": "admin",
        "service-name": "keystone",
        "region-id": "RegionOne",
        "admin-url": spec["public_url"],
        "public-url": spec["public_url"],
        "internal-url": spec["public_url"],
    }
    args = [item for key, value in bootstrap.items() for item in (f"--bootstrap-{key}", value)]
    os.environ["OS_BOOTSTRAP_PASSWORD"] = Path(spec["admin_password_file"]).read_text().strip()
    try:
        _manage(conf, "bootstrap", *args)
    finally:
        del os.environ["OS_BOOTSTRAP_PASSWORD"]
    Path(spec["setup_done"]).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


class _Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True


class _QuietHandler(simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("%s %s\n" % (self.address_string(), format % args))  # noqa: UP031


def serve(spec: dict[str, Any]) -> None:
    cfg.CONF.reset()
    cfg.CONF.clear()
    if "command" in cfg.CONF:  # keystone-manage's subcommand option, left by setup()
        cfg.CONF.unregister_opt(cli.command_opt)
    # setup() locked keystone's registry of provider APIs; the app registers them anew.
    provider_api.ProviderAPIs._clear_registry_instances()
    os.environ["OS_KEYSTONE_CONFIG_FILES"] = spec["config"]
    sys.argv = sys.argv[:1]  # the app parses the command line as its own
    from keystone.server import wsgi  # type: ignore[import-not-found]  # noqa: PLC0415

    app = wsgi.initialize_public_application()
    server = simple_server.make_server(
        "127.0.0.1", int(spec["port"]), app, server_class=_Server, handler_class=_QuietHandler
    )
    print(f"keystone listening on 127.0.0.1:{spec['port']}", flush=True)
    server.serve_forever()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    spec = json.loads(Path(sys.argv[1]).read_text())
    if not Path(spec["setup_done"]).exists():
        started = time.monotonic()
        setup(spec)
        print(f"keystone set up in {time.monotonic() - started:.1f} s", flush=True)
    serve(spec)


if __name__ == "__main__":
    main()
