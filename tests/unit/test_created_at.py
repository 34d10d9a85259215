"""CreatedAt in Docker's Get and List: RFC 3339, whatever the back-end stored."""

from __future__ import annotations

import pytest

from rbdplugin.api import _view
from rbdplugin.service import VolumeView, rfc3339


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ("2026-11-30T12:01:02Z", "2026-11-30T12:01:02Z"),  # ours
        ("2026-11-30T12:01:02.123456", "2026-11-30T12:01:02Z"),  # Cinder: UTC without a zone
        ("2026-11-30T13:01:02+01:00", "2026-11-30T12:01:02Z"),
        ("", ""),
        (None, ""),
        ("yesterday", ""),
    ],
)
def test_rfc3339(stored: object, shown: str) -> None:
    assert rfc3339(stored) == shown


def test_created_at_is_in_the_volume_only_when_known() -> None:
    assert _view(VolumeView("v", created_at="2026-11-30T12:01:02Z"), with_status=False) == {
        "Name": "v", "Mountpoint": "", "CreatedAt": "2026-11-30T12:01:02Z",
    }  # fmt: skip
    assert "CreatedAt" not in _view(VolumeView("v"), with_status=True)
