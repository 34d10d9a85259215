"""The session's secrets scan: no cephx key and no OpenStack secret may appear in anything
the daemons wrote or answered during the test session.

What is scanned: every regular file under the session's directory (daemon logs, state
files, configs, the soak's scrapes and Err texts), and what :class:`Recorder` kept of
replies that never touch the disk (plugin API replies with their Err texts, metric and
health scrapes, ``rbdplugin status`` output). What is looked for: every ``key = ...`` of
every keyring file found there (the dev clusters' cephx keys), and the devclouds'
passwords and application-credential secrets. Where secrets legitimately live is not
scanned: keyring files, a dev cluster's mon and OSD data (``mon.*``, ``osd.*`` next to
its ``cluster.json``), and a devcloud's whole directory (next to its ``devcloud.json``).

Findings name the file, the byte offset and which secret it is, never the secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

from tests.helpers import PluginClient

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Finding:
    path: Path
    offset: int
    label: str

    def __str__(self) -> str:
        return f"{self.path} at byte {self.offset}: {self.label}"


def keyring_secrets(path: Path) -> dict[bytes, str]:
    """``key = ...`` of every section of a Ceph keyring file."""
    found, section = {}, "?"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line.startswith("key") and "=" in line:
            key = line.split("=", 1)[1].strip()
            if len(key) >= 16:
                found[key.encode()] = f"cephx key of {section} ({path.name})"
    return found


def devcloud_secrets(root: Path) -> dict[bytes, str]:
    """A devcloud's passwords (DIR/secrets/*.password) and the secrets of its clouds.yaml
    files (application credential, admin password)."""
    found: dict[bytes, str] = {}
    for path in sorted((root / "secrets").glob("*.password")):
        with _quiet():
            value = path.read_text().strip()
            if len(value) >= 8:
                found[value.encode()] = f"OpenStack password of {path.stem} (devcloud)"
    for path in [root / "clouds.yaml", *sorted((root / "secrets").glob("*.yaml"))]:
        with _quiet():
            for line in path.read_text().splitlines():
                key, _, value = line.strip().partition(":")
                value = value.strip().strip("'\"")
                if ("secret" in key or "password" in key) and len(value) >= 8:
                    found[value.encode()] = f"OpenStack {key.strip()} ({path.name}, devcloud)"
    return found


class _quiet:
    """Suppress OSError (a file that vanished or cannot be read)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return isinstance(value, OSError)


@dataclass
class Scan:
    secrets: dict[bytes, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    roots: list[str] = field(default_factory=list)
    blind: str = ""  # why the scan could not look (then it fails too)

    def summary(self) -> str:
        what = (f"{self.files} files, {self.bytes / 2**20:.1f} MiB scanned for "
                f"{len(self.secrets)} secrets (cephx keys, OpenStack secrets)")  # fmt: skip
        if self.blind:
            return f"FAILED: {self.blind}; {what}"
        if self.findings:
            return f"FAILED: {len(self.findings)} secret(s) found; {what}"
        if not self.secrets:
            return "nothing to look for: no dev cluster or devcloud ran in this session"
        return f"clean: {what}"

    def harvest(self, root: Path) -> None:
        """Learn the secrets kept under ``root``: keyrings, devclouds."""
        for path in _walk(root, skip_secret_homes=False):
            if _is_keyring(path):
                self.secrets.update(keyring_secrets(path))
            elif path.name == "devcloud.json":
                self.secrets.update(devcloud_secrets(path.parent))

    def scan_tree(self, root: Path) -> None:
        if not root.exists():
            return
        self.roots.append(str(root))
        for path in _walk(root, skip_secret_homes=True):
            if not _is_keyring(path):
                self.scan_file(path)

    def scan_file(self, path: Path) -> None:
        if not self.secrets:
            return
        longest = max(len(s) for s in self.secrets)
        try:
            with path.open("rb") as fh:
                self.files += 1
                base, tail = 0, b""
                while chunk := fh.read(CHUNK):
                    data = tail + chunk
                    self.bytes += len(chunk)
                    for secret, label in self.secrets.items():
                        at = data.find(secret)
                        while at != -1:
                            finding = Finding(path, base - len(tail) + at, label)
                            if finding not in self.findings:
                                self.findings.append(finding)
                            at = data.find(secret, at + 1)
                    base += len(chunk)
                    tail = data[-(longest - 1) :] if longest > 1 else b""
        except OSError:
            return


def _is_keyring(path: Path) -> bool:
    return path.name.endswith("keyring")


def _walk(root: Path, skip_secret_homes: bool) -> Iterator[Path]:
    """Regular files under ``root`` (symlinks not followed). With ``skip_secret_homes``:
    not into a dev cluster's mon/OSD data, nor into a devcloud's directory."""
    for top, dirs, files in os.walk(root, followlinks=False):
        here, names = Path(top), files
        if skip_secret_homes:
            if "devcloud.json" in files:
                dirs[:] = []
                continue
            if "cluster.json" in files:
                dirs[:] = [d for d in dirs if not d.startswith(("mon.", "osd."))]
                names = [f for f in files if not f.startswith(("mon.", "osd."))]
        for name in names:
            path = here / name
            if path.is_file() and not path.is_symlink():
                yield path


# -- what never reaches the disk ------------------------------------------------------------

HEALTH_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/status"})


class Recorder:
    """Appends to files in ``root`` what the tests received from daemons without it being
    written anywhere: plugin API replies, metric/health scrapes, ``rbdplugin status``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def record(self, kind: str, text: str | bytes) -> None:
        data = text.encode(errors="replace") if isinstance(text, str) else text
        with (self.root / f"{kind}.log").open("ab") as fh:
            fh.write(data + b"\n")

    def install(self) -> None:
        """Wrap the ways tests receive such output (this process only)."""
        recorder = self
        raw = PluginClient.raw
        read: Callable[..., bytes] = HTTPResponse.read
        run: Callable[..., Any] = subprocess.run

        def raw_recorded(
            self: PluginClient, endpoint: str, body: bytes, method: str = "POST"
        ) -> tuple[int, dict[str, Any]]:
            status, reply = raw(self, endpoint, body, method)
            recorder.record("plugin-replies", json.dumps(reply))
            return status, reply

        def read_recorded(self: HTTPResponse, *args: Any, **kwargs: Any) -> bytes:
            data = read(self, *args, **kwargs)
            url = getattr(self, "url", "") or ""
            if url and urllib.parse.urlsplit(url).path in HEALTH_PATHS:
                recorder.record("scrapes", data)
            return data

        def run_recorded(*args: Any, **kwargs: Any) -> Any:
            done = run(*args, **kwargs)
            argv = args[0] if args else kwargs.get("args")
            if isinstance(argv, list | tuple):
                words = [str(a) for a in argv]
                if "status" in words and any(w.endswith("rbdplugin") for w in words):
                    for out in (done.stdout, done.stderr):
                        if out:
                            recorder.record("status", out)
            return done

        PluginClient.raw = raw_recorded  # type: ignore[method-assign]
        HTTPResponse.read = read_recorded  # type: ignore[method-assign]
        subprocess.run = run_recorded


def devcloud_roots_since(started: float, base: Path = Path("/tmp")) -> list[Path]:
    """Devclouds (DIR/devcloud.json) made under ``base`` since ``started`` (epoch s)."""
    found = []
    for marker in base.glob("*/devcloud.json"):
        with _quiet():
            if marker.stat().st_mtime >= started - 5:
                found.append(marker.parent)
    return found
