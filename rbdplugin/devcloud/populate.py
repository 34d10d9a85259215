"""Fill a fresh Keystone for the devcloud, then wait until Cinder serves its pool.

Runs as its own process with the OpenStack venv's python (never imported by
rbdplugin): ``python populate.py SPEC.json``. With openstacksdk, as Keystone's
bootstrap admin, it makes (each only if missing):

- a project and a member user in it, and an application credential of that user
  (what a tenant's plugin logs in with);
- the ``service`` project with one user per service (Cinder validates tokens as
  ``cinder``; the Nova stand-in validates tokens and sends its service token as
  ``nova``), each with the roles the spec names;
- the catalog: ``volumev3`` (Cinder) and ``compute`` (the Nova stand-in).

Then it waits until Cinder lists the RBD back-end's pool (the scheduler has heard
from the volume service) and writes the ids and the credential's secret to the
spec's ``output`` file (mode 0600). Passwords come from 0600 files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import openstack  # type: ignore[import-not-found,unused-ignore]  # the extra may be absent

DOMAIN = "default"


def _secret(path: str) -> str:
    return Path(path).read_text().strip()


def _connect(spec: dict[str, Any], user: str, password: str, project: str) -> Any:
    # No clouds.yaml and no OS_* variables: a clouds.yaml in the working directory would
    # otherwise leak into these logins.
    return openstack.connect(
        auth_url=spec["auth_url"],
        username=user,
        password=password,
        project_name=project,
        user_domain_id=DOMAIN,
        project_domain_id=DOMAIN,
        region_name=spec["region"],
        load_yaml_config=False,
        load_envvars=False,
    )


def _project(conn: Any, name: str, description: str) -> Any:
    found = conn.identity.find_project(name, domain_id=DOMAIN)
    return found or conn.identity.create_project(
        name=name, domain_id=DOMAIN, description=description
    )


def _user(conn: Any, name: str, password: str, project: Any) -> Any:
    found = conn.identity.find_user(name, domain_id=DOMAIN)
    if found is not None:
        return conn.identity.update_user(found, password=password)
    return conn.identity.create_user(
        name=name, password=password, domain_id=DOMAIN, default_project_id=project.id
    )


def _grant(conn: Any, project: Any, user: Any, role_name: str) -> None:
    role = conn.identity.find_role(role_name)
    if role is None:
        role = conn.identity.create_role(name=role_name)
    conn.identity.assign_project_role_to_user(project, user, role)


def _service(conn: Any, name: str, kind: str, url: str, region: str) -> Any:
    service = next(iter(conn.identity.services(type=kind)), None)
    if service is None:
        service = conn.identity.create_service(name=name, type=kind, enabled=True)
    for endpoint in list(conn.identity.endpoints(service_id=service.id)):
        conn.identity.delete_endpoint(endpoint)
    for interface in ("public", "internal", "admin"):
        conn.identity.create_endpoint(
            service_id=service.id, interface=interface, url=url, region_id=region
        )
    return service


def populate(spec: dict[str, Any]) -> dict[str, Any]:
    admin = _connect(spec, "admin", _secret(spec["admin_password_file"]), "admin")
    project = _project(admin, spec["project"], "the devcloud's tenant project")
    member = _user(admin, spec["member"], _secret(spec["member_password_file"]), project)
    _grant(admin, project, member, "member")
    service_project = _project(admin, "service", "service users of the devcloud")
    for name, svc in spec["services"].items():
        user = _user(admin, name, _secret(svc["password_file"]), service_project)
        for role in svc["roles"]:
            _grant(admin, service_project, user, role)
        _service(admin, name, svc["type"], svc["url"], spec["region"])
    as_member = _connect(
        spec, spec["member"], _secret(spec["member_password_file"]), spec["project"]
    )
    name = spec["app_credential_name"]
    old = as_member.identity.find_application_credential(member.id, name)
    if old is not None:
        as_member.identity.delete_application_credential(member.id, old)
    credential = as_member.identity.create_application_credential(
        member.id, name=name, description="rbdplugin's Cinder mode in the devcloud"
    )
    # A new login: the first admin token's catalog predates the endpoints made above.
    fresh = _connect(spec, "admin", _secret(spec["admin_password_file"]), "admin")
    _wait_for_cinder(fresh, spec["cinder_backend"], float(spec["cinder_timeout"]))
    return {
        "project_id": project.id,
        "member_user_id": member.id,
        "service_project_id": service_project.id,
        "app_credential_id": credential.id,
        "app_credential_secret": credential.secret,
    }


def _wait_for_cinder(admin: Any, backend: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            pools = [pool.name for pool in admin.block_storage.backend_pools()]
            if any(f"@{backend}#" in name for name in pools):
                return
            last = f"pools so far: {pools}"
        except Exception as exc:  # Cinder still starting: any error means "not yet"
            last = exc
        time.sleep(0.2)
    raise SystemExit(f"cinder did not list the {backend} pool within {timeout:.0f} s: {last}")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("wait_only"):  # a restart: Keystone already holds everything
        admin = _connect(spec, "admin", _secret(spec["admin_password_file"]), "admin")
        _wait_for_cinder(admin, spec["cinder_backend"], float(spec["cinder_timeout"]))
        return
    result = populate(spec)
    out = Path(spec["output"])
    fd = os.open(out.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh, indent=2)
    out.with_suffix(".tmp").replace(out)


if __name__ == "__main__":
    main()
