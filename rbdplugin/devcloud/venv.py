"""The OpenStack virtualenv the devcloud's Keystone and Cinder run in.

Kept apart from the project's venv on purpose: Keystone and Cinder bring ~100
pinned wheels, and a venv with Debian's system site-packages breaks them
(Debian's pyOpenSSL against the venv's cryptography). So this venv is made from
/usr/bin/python3 *without* system site-packages, and only Debian's ``rados`` and
``rbd`` extension modules (not on PyPI) are linked into it, for Cinder's RBD driver.

It lives in a cache outside the checkout, named by a hash of its pins, and is
reused while present. A build happens under a lock into ``venv-<hash>.d`` and is
published by atomically renaming a symlink ``venv-<hash>`` onto it: whoever sees
``venv-<hash>`` sees a complete venv, and the scripts pip wrote keep valid paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from rbdplugin.errors import RbdPluginError
from rbdplugin.process import Command, run_sync

log = logging.getLogger(__name__)

PINS = ("keystone==30.0.0", "cinder==29.0.0", "openstacksdk", "fixtures")
BASE_PYTHON = Path("/usr/bin/python3")
DEFAULT_CACHE = Path("/var/cache/rbdplugin-openstack")
CACHE_ENV = "RBDPLUGIN_OPENSTACK_CACHE"
# Debian's bindings, built for /usr/bin/python3 (same ABI as the venv made from it).
BINDINGS = ("rados", "rbd")
PIP_TIMEOUT = 1200
# What must import in a finished venv: the services, the SDK, the RBD driver's bindings.
_SMOKE = "import keystone, cinder, openstack, keystonemiddleware, fixtures, rados, rbd"


class VenvError(RbdPluginError):
    reason = "openstack_venv"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def pins_hash(pins: tuple[str, ...] = PINS) -> str:
    text = "\n".join((*pins, f"python={BASE_PYTHON}", *BINDINGS))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def venv_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"venv-{pins_hash()}"


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(cache: Path | None = None) -> Path:
    """The OpenStack venv, built first if the cache does not hold one for these pins."""
    final = venv_path(cache)
    if python(final).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with (final.parent / f"{final.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel start waits for one build, then reuses it
        if not python(final).exists():
            _build(final)
    return final


def _build(final: Path) -> None:
    started = time.monotonic()
    real = final.with_name(final.name + ".d")
    shutil.rmtree(real, ignore_errors=True)  # a build that died half-way
    log.info("building the OpenStack venv in %s (first use; about a minute)", real)
    _run(str(BASE_PYTHON), "-m", "venv", str(real))
    _link_bindings(real)
    _run(
        str(python(real)),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "--only-binary=:all:",
        *PINS,
    )
    _run(str(python(real)), "-c", _SMOKE)
    freeze = _run(str(python(real)), "-m", "pip", "freeze", "--disable-pip-version-check")
    (real / "pins.txt").write_text("\n".join(PINS) + "\n")
    (real / "freeze.txt").write_text(freeze)
    link = final.with_name(final.name + ".link")
    link.unlink(missing_ok=True)
    link.symlink_to(real.name)
    link.replace(final)
    log.info("OpenStack venv ready in %.0f s: %s", time.monotonic() - started, final)


def _link_bindings(venv: Path) -> None:
    found = _run(
        str(BASE_PYTHON),
        "-c",
        f"import {', '.join(BINDINGS)}; print({', '.join(f'{m}.__file__' for m in BINDINGS)})",
    ).split()
    site = _run(str(python(venv)), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    for so in found:
        target = Path(site.strip()) / Path(so).name
        target.symlink_to(so)


def _run(*argv: str) -> str:
    try:
        return run_sync(Command(argv, timeout=PIP_TIMEOUT)).stdout
    except RbdPluginError as exc:
        hint = ""
        if argv[0] == str(BASE_PYTHON):
            hint = " (needs Debian's python3-venv, python3-rados and python3-rbd)"
        raise VenvError(f"building the OpenStack venv failed{hint}: {exc}") from exc
