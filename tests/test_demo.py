"""``python -m nbproc demo``: the real-data round trip, run exactly as a user would run it.

A subprocess, not an in-process call, because the demo owns its core, processor and ports and
must leave nothing behind; and what a user sees is its output and exit code.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

FLIGHTS_2013 = 336_776
WITHOUT_DELAYS_2013 = 9_430  # cancelled or diverted: no arrival delay


def demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbproc", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_flights(stdout: str) -> int:
    """Sum of the ``flights`` column of the printed result table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("carrier"))
    total = 0
    for line in lines[start + 1 :]:
        match = re.match(r"\s*[0-9A-Z]{2}\s+.+?\s+(\d+)\s+-?\d", line)
        if not match:
            break
        total += int(match.group(1))
    return total


def test_demo_runs_through_the_core_and_checks_its_numbers():
    done = demo()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(r"run \d+: status at the core: completed", out)
    assert "United Air Lines Inc." in out and "JetBlue Airways" in out
    assert "extracted 14, transformed 14, loaded 14, dropped 0" in out  # 14 chunks of 25,000
    assert f"{FLIGHTS_2013:,} in the data" in out
    assert f"{WITHOUT_DELAYS_2013:,} dropped" in out
    assert table_flights(out) == FLIGHTS_2013 - WITHOUT_DELAYS_2013
    assert "check: OK" in out


def test_demo_one_month():
    done = demo("--month", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "month=2" in done.stdout and "check: OK" in done.stdout
    assert "24,951 in the data" in done.stdout  # February 2013


@pytest.mark.parametrize("month", ["13", "0", "feb", ""])
def test_demo_refuses_a_bad_month(month):
    done = demo("--month", month, timeout=30)
    assert done.returncode == 2
    assert "month must be 1-12 or 'all'" in done.stderr
    assert "Traceback" not in done.stderr
