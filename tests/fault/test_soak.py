"""A 20-second soak -- random SIGKILL and restart of guests and devices, churn
of assign/deassign, continuous echo and blk traffic -- loses nothing and leaks nothing.

The soak runner (``hostemu/soak.py``) checks its own oracles and exits non-zero on any loss,
leak, traceback or failed workload; this test runs it as ``./run.sh soak`` would, with a
fixed seed so a failure can be replayed (``vbusemu soak --seconds 20 --seed N``), and
also checks that faults were really injected and traffic really flowed.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from hostemu.launcher import python_module
from tests import timing

pytestmark = pytest.mark.timeout(240)

SECONDS = float(os.environ.get("VBUSEMU_SOAK_SECONDS", "20"))


def number(text: str, pattern: str) -> int:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the report:\n{text}"
    return int(m.group(1).replace(",", ""))


def test_soak_loses_nothing_and_leaks_nothing() -> None:
    seed = int(os.environ.get("VBUSEMU_SOAK_SEED", "20261125"))
    out = subprocess.run(
        python_module(
            "hostemu.cli",
            "soak",
            "--seconds",
            str(SECONDS),
            "--seed",
            str(seed),
            "--fault-every",
            "0.7",
        ),
        capture_output=True,
        text=True,
        timeout=SECONDS + timing.scaled(180),
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "soak: PASSED" in report, report
    assert number(report, r"lost\s+(\d+)") == 0
    assert number(report, r"leaks\s+(\d+)") == 0
    faults = re.search(r"faults\s+\{([^}]*)\}", report)
    assert faults and "'device'" in faults.group(1) and "'guest'" in faults.group(1), report
    assert number(report, r"received ([\d,]+)") > 0
    assert number(report, r"blk passes ([\d,]+)") > 0
    assert number(report, r"churn assign/deassign ([\d,]+)") > 0
