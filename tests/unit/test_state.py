"""Local state: atomic replacement, and the known-volumes cache used when Ceph is down."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from rbdplugin.state import KnownVolumes, read_json, write_json


def test_write_json_is_private_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_corrupt_state_falls_back_to_default(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    assert read_json(path, {"empty": True}) == {"empty": True}


def test_known_volumes_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "known.json"
    known = KnownVolumes(path)
    known.remember("a", {"size": "1G"})
    known.remember("b", {"size": "2G"})
    known.forget("b")
    again = KnownVolumes(path)
    assert again.names() == ["a"]
    entry = again.get("a")
    assert entry is not None and entry["size"] == "1G" and "seen_at" in entry


def test_replace_names_tracks_a_listing(tmp_path: Path) -> None:
    known = KnownVolumes(tmp_path / "known.json")
    known.remember("old", {"size": "1G"})
    known.remember("kept", {"size": "2G"})
    known.replace_names(["kept", "new"])
    assert known.names() == ["kept", "new"]
    assert known.get("kept") == {**known.get("kept"), "size": "2G"}  # type: ignore[dict-item]
    assert KnownVolumes(tmp_path / "known.json").names() == ["kept", "new"]


def test_unchanged_status_does_not_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "known.json"
    known = KnownVolumes(path)
    known.remember("a", {"size": "1G"})
    before = path.stat().st_mtime_ns
    known.remember("a", {"size": "1G"})
    assert path.stat().st_mtime_ns == before
