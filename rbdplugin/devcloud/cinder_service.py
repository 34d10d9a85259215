"""Run a real Cinder: API, scheduler and volume service in ONE process.

Runs as its own process with the OpenStack venv's python (never imported by
rbdplugin): ``python cinder_service.py CINDER.CONF``. The three services talk over
oslo.messaging's in-memory ``fake://`` transport, so no broker runs; the database
is SQLite, migrated on first start. What this does is what cinder-api,
cinder-scheduler and cinder-volume each do at start, once, then one
``ServiceLauncher`` runs all three. SIGTERM stops them (exit 0).
"""

from cinder import monkey_patch  # type: ignore[import-not-found]  # isort: skip

monkey_patch.patch()  # before anything else is imported, as cinder's own commands do

import logging as python_logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from cinder import (  # noqa: E402
    coordination,
    objects,
    rpc,
    service,
    version,
)
from cinder.common import config, constants  # type: ignore[import-not-found]  # noqa: E402
from cinder.db import migration  # type: ignore[import-not-found]  # noqa: E402
from oslo_config import cfg  # type: ignore[import-not-found]  # noqa: E402
from oslo_log import log as logging  # type: ignore[import-not-found]  # noqa: E402
from oslo_service import service as oslo_service  # type: ignore[import-not-found]  # noqa: E402

CONF = cfg.CONF


def main() -> None:
    objects.register_all()
    CONF(["--config-file", sys.argv[1]], project="cinder", version=version.version_string())
    config.set_middleware_defaults()
    logging.setup(CONF, "cinder")
    python_logging.captureWarnings(True)
    log = logging.getLogger("devcloud.cinder")
    migration.db_sync()
    coordination.COORDINATOR.start()
    rpc.init(CONF)
    launcher = oslo_service.ServiceLauncher(CONF, restart_method="mutate")
    launcher.launch_service(service.Service.create(binary="cinder-scheduler"))
    for backend in filter(None, CONF.enabled_backends):
        volume = service.Service.create(
            host=f"{CONF.host}@{backend}",
            service_name=backend,
            binary=constants.VOLUME_BINARY,
            coordination=True,
        )
        launcher.launch_service(volume)
    api = service.WSGIService("osapi_volume")
    launcher.launch_service(api)
    log.info("cinder api, scheduler and volume running in pid %s", os.getpid())
    print(
        f"cinder listening on {CONF.osapi_volume_listen}:{CONF.osapi_volume_listen_port}",
        flush=True,
    )
    launcher.wait()


if __name__ == "__main__":
    main()
