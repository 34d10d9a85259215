"""docs/plugin-api.openapi.yaml describes the protocol the daemon really serves.

Read from the code's own tables (the routes the aiohttp app registers, the Create option
tables, the filesystem, access and feature lists), so the description cannot fall behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import yaml
from prometheus_client import CollectorRegistry

from rbdplugin.api import build_app
from rbdplugin.metrics import Metrics
from rbdplugin.service import VolumeService
from rbdplugin.spec import ACCESS, CINDER_OPTIONS, FEATURES, FSTYPES, OPTIONS

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "plugin-api.openapi.yaml"


def load_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return spec


def registered_routes() -> set[str]:
    # The handlers never run here: the app is only built to read its router.
    app = build_app("t", cast(VolumeService, object()), Metrics(CollectorRegistry()))
    paths = {resource.canonical for resource in app.router.resources()}
    return paths - {"/{tail}"}  # the catch-all that answers unknown endpoints with an Err


def create_options(spec: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = spec["components"]["schemas"]["CreateOptions"]["properties"]
    return options


def test_every_registered_route_is_described_as_a_post() -> None:
    paths = load_spec()["paths"]
    routes = registered_routes()
    assert "/VolumeDriver.Mount" in routes  # the router was really read
    assert set(paths) == routes
    for route, operations in paths.items():
        assert set(operations) == {"post"}, route
        responses = operations["post"]["responses"]
        assert "200" in responses, route
        assert {"400", "405", "413"} <= set(responses), route


def test_every_create_option_the_daemon_accepts_is_described() -> None:
    described = create_options(load_spec())
    assert set(described) == set(OPTIONS) | set(CINDER_OPTIONS)
    schema = load_spec()["components"]["schemas"]["CreateOptions"]
    for key in described:  # each named in the text that says which tenant takes it
        assert key in schema["description"], key


def test_described_choices_are_the_daemons() -> None:
    described = create_options(load_spec())
    assert tuple(described["fstype"]["enum"]) == FSTYPES
    assert tuple(described["access"]["enum"]) == ACCESS
    assert tuple(described["features"]["x-items"]) == tuple(FEATURES)


def test_readme_links_the_description() -> None:
    readme = (SPEC_PATH.parents[1] / "README.md").read_text()
    assert "docs/plugin-api.openapi.yaml" in readme
