"""Launched children die with their parent and leave SIGINT to it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

MIDDLE = """
import subprocess, sys, time
from shared.lifeline import child_setup
import os
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         preexec_fn=child_setup(os.getpid()))
print(child.pid, flush=True)
time.sleep(60)
"""


def sigint_ignored(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return bool(int(fields["SigIgn"], 16) & (1 << (signal.SIGINT - 1)))


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.timeout(60)
def test_child_ignores_sigint_and_dies_with_its_parent() -> None:
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], stdout=subprocess.PIPE, text=True)
    try:
        assert middle.stdout is not None
        child = int(middle.stdout.readline())
        assert sigint_ignored(child)
        assert not sigint_ignored(middle.pid)
    finally:
        middle.kill()  # a parent that dies without cleaning up
        middle.wait(10)
        if middle.stdout is not None:
            middle.stdout.close()
    deadline = time.monotonic() + 10
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gone(child), "the child outlived its parent"  # dead (at most a zombie for init)
