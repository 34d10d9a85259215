"""The example configs in config/: each is valid, checked by the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rbdplugin.config import load_config

CONFIG = Path(__file__).parents[2] / "config"
EXAMPLES = sorted(CONFIG.glob("*.toml"))


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbdplugin", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_three_kinds_of_example_exist() -> None:
    assert {"single-tenant.toml", "many-tenants.toml", "cinder.toml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_check_config_accepts_each_example(path: Path) -> None:
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: OK")


def test_many_tenants_is_a_pool_per_business_line_and_a_namespace_per_team() -> None:
    config = load_config(CONFIG / "many-tenants.toml", environ={})
    places = {(t.pool, t.namespace) for t in config.tenants}
    assert len(places) == len(config.tenants) >= 4
    assert {t.pool for t in config.tenants} == {"payments", "analytics"}
    assert all(t.namespace for t in config.tenants)
    assert len({t.user for t in config.tenants}) == len(config.tenants)


def test_cinder_example_is_cinder_mode() -> None:
    config = load_config(CONFIG / "cinder.toml", environ={})
    assert {t.backend for t in config.tenants} == {"cinder"}
    assert all(t.cinder is not None and t.cinder.cloud for t in config.tenants)
    result = check_config(CONFIG / "cinder.toml")
    assert "driver vm: Cinder volumes of cloud project-a" in result.stdout


def test_example_config_lists_and_prints_them() -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "rbdplugin", "example-config"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    names = {line.split("\t")[0] for line in listing.splitlines()}
    assert {p.name for p in EXAMPLES} | {"rbdplugin.service"} <= names
    shown = subprocess.run(
        [sys.executable, "-m", "rbdplugin", "example-config", "single-tenant.toml"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert shown == (CONFIG / "single-tenant.toml").read_text()
