"""The kernel tier: krbd, rbd-nbd and udev for real.

This host's kernel has neither rbd nor nbd, so one session-wide boot of the cached
QEMU guest (guest/run: Debian's own kernel, systemd, udev) runs the project's own
suites inside it (tests/kernel/inside.sh): the mount suite and its failure and
crash points with krbd, the mount suite with rbd-nbd, the two-host lease suite's
kernel-relevant cases with krbd, the udev checks, a Docker journey, systemd and Cinder
mode. The run starts in the background at collection, beside the host tests
(tests/kernel/tier.py); these tests are collected last and each judges one suite from
the JUnit report the guest wrote.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.kernel import tier

pytestmark = pytest.mark.kernel

# Suite -> the fewest tests it must have run (a suite that collects nothing proves nothing).
SUITES = {
    "kernel": 5,
    "krbd-mount": 11,
    "krbd-faults": 6,
    "nbd": 11,
    "krbd-locks": 5,
    "krbd-docker": 4,
    "cinder": 2,
}


@pytest.fixture(scope="session")
def guest_run() -> Path:
    """The folder the guest's run wrote, once it is over (started at collection)."""
    run = tier.start_in_background()  # already running unless collection skipped it
    try:
        out = run.result()
    except tier.GuestFailed as error:
        pytest.fail(str(error), pytrace=False)
    print("\n" + run.summary(out))
    return out


@pytest.mark.timeout(tier.GUEST_DEADLINE + 180)  # the first one waits for the whole guest run
@pytest.mark.parametrize("suite", list(SUITES))
def test_suite_passes_in_the_guest(guest_run: Path, suite: str) -> None:
    report = guest_run / f"{suite}.xml"
    problem = tier.RUN.problem if tier.RUN else ""
    assert report.exists(), f"suite {suite} did not run in the guest ({problem}); see {guest_run}"
    root = ET.parse(report).getroot()  # noqa: S314 - our own guest wrote it
    counts = root if root.tag == "testsuite" else root.find("testsuite")
    assert counts is not None, f"{report} has no test suite"
    tests, skipped = int(counts.get("tests", 0)), int(counts.get("skipped", 0))
    failures, errors = int(counts.get("failures", 0)), int(counts.get("errors", 0))
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in counts.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    assert (failures, errors) == (0, 0), (
        f"{suite} in the guest: {failures} failed, {errors} errors: {failed}; "
        f"output in {guest_run / (suite + '.log')}"
    )
    assert tests - skipped >= SUITES[suite], (
        f"{suite} ran only {tests - skipped} tests in the guest; see {guest_run / (suite + '.log')}"
    )
