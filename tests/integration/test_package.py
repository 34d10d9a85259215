"""The wheel: built with pip, installed into a fresh venv, run from there.

Offline, as every test is (no traffic beyond loopback): the wheel is built with this
venv's own setuptools (no build isolation), installed without dependencies, and the
fresh venv sees the runtime dependencies through a .pth file naming this venv's
site-packages (rados and rbd come from Debian's python3-rados and python3-rbd, seen
through --system-site-packages)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rbdplugin import __version__

ROOT = Path(__file__).parents[2]
SOURCES = ("pyproject.toml", "README.md", "rbdplugin", "config", "systemd")
SYSTEM_PYTHON = "/usr/bin/python3"


def run(*argv: str | Path, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                            timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, f"{argv}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy, so that setuptools' build/ and egg-info never land in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        ".", "-w", dist, cwd=src)  # fmt: skip
    (found,) = dist.glob("rbdplugin-*.whl")
    return found


def test_wheel_carries_the_examples_and_unit_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    data = f"rbdplugin-{__version__}.data/data/share/rbdplugin"
    for example in (ROOT / "config").glob("*.toml"):
        assert f"{data}/config/{example.name}" in names
    assert f"{data}/systemd/rbdplugin.service" in names
    assert "rbdplugin/py.typed" in names
    assert "rbdplugin/seed.py" in names


def test_wheel_installs_and_runs(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    run(venv / "bin/pip", "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    # The dependencies (aiohttp, prometheus-client, ...) as this venv has them: no download.
    (site,) = (venv / "lib").glob("python3*/site-packages")
    deps = [p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)]
    (site / "rbdplugin-test-deps.pth").write_text("\n".join(deps) + "\n")
    # Run from tmp_path: nothing of the checkout may be imported.
    assert (
        run(venv / "bin/rbdplugin", "--version", cwd=tmp_path).strip() == f"rbdplugin {__version__}"
    )
    listing = dict(line.split("\t") for line in run(venv / "bin/rbdplugin", "example-config",
                                                    cwd=tmp_path).splitlines())  # fmt: skip
    share = venv / "share/rbdplugin"
    assert listing["rbdplugin.service"] == str(share / "systemd/rbdplugin.service")
    for example in ("single-tenant.toml", "many-tenants.toml", "cinder.toml", "rbdplugin.toml"):
        installed = share / "config" / example
        assert listing[example] == str(installed)
        assert installed.read_text() == (ROOT / "config" / example).read_text()
        assert "OK" in run(
            venv / "bin/rbdplugin", "check-config", "--config", installed, cwd=tmp_path
        )
    # The Ceph bindings come from Debian's packages through the system site.
    run(venv / "bin/python", "-c", "import rados, rbd, rbdplugin.backends.rbd", cwd=tmp_path)
    where = run(
        venv / "bin/python", "-c", "import rbdplugin; print(rbdplugin.__file__)", cwd=tmp_path
    )
    assert where.startswith(str(site)), where  # the wheel's copy, not the checkout
