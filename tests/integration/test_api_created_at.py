"""CreatedAt in Get and List (docker volume inspect shows it; without it, year 1)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.helpers import Admin, DaemonProcess, unique, wait_until


def parse(created_at: str) -> datetime:
    assert created_at.endswith("Z"), created_at  # RFC 3339 in UTC, as Docker parses it
    return datetime.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_get_and_list_say_when_a_volume_was_created(daemon: DaemonProcess) -> None:
    client, name = daemon.client("alpha"), unique()
    before = datetime.now(UTC).replace(microsecond=0)
    assert client.create(name, {"size": "64M"}) == {"Err": ""}
    after = datetime.now(UTC)
    volume = client.get(name)["Volume"]
    created = parse(volume["CreatedAt"])
    assert before - timedelta(seconds=1) <= created <= after
    listed = {v["Name"]: v for v in client.call("VolumeDriver.List", {})["Volumes"]}
    assert listed[name]["CreatedAt"] == volume["CreatedAt"]
    assert client.remove(name) == {"Err": ""}


def test_list_shows_created_at_of_a_volume_this_daemon_never_saw(
    daemon: DaemonProcess, admin: Admin
) -> None:
    # Made behind the daemon's back (another host, or the seed): its image's creation time.
    client, name = daemon.client("alpha"), unique()
    before = datetime.now(UTC).replace(microsecond=0)
    admin.create_image("alpha", name, 64 * 1024 * 1024)

    def listed() -> dict[str, dict[str, str]]:
        return {v["Name"]: v for v in client.call("VolumeDriver.List", {})["Volumes"]}

    # List answers at once and learns an unseen volume's CreatedAt behind it.
    assert name in listed()
    wait_until(lambda: "CreatedAt" in listed()[name], 30, "List to learn the CreatedAt")
    created = parse(listed()[name]["CreatedAt"])
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC)
    assert client.get(name)["Volume"]["CreatedAt"] == listed()[name]["CreatedAt"]
    assert client.remove(name) == {"Err": ""}
