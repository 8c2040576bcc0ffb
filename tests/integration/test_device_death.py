"""A device process that dies is reported to its guest and to the user; nothing hangs."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from typing import Any

import pytest

from hostemu.launcher import python_module
from tests import timing
from tests.conftest import BrokerHandle
from tests.integration.test_dataplane import echo_vm

pytestmark = pytest.mark.timeout(120)


def children_of(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(name))
            except OSError:
                continue
    return kids


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def read_until(proc: subprocess.Popen[str], want: str, deadline: float) -> dict[str, Any]:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            obj: dict[str, Any] = json.loads(line)
            if obj.get("event") == want or obj.get("name") == want:
                return obj
    raise AssertionError(f"no {want!r} from the VMM")


def test_echo_device_killed_mid_transfer_fails_the_guest_fast(broker: BrokerHandle) -> None:
    spec = json.dumps([echo_vm("vm0", 50_000_000, batch=8)])
    vmm = subprocess.Popen(
        python_module(
            "hostemu.vmm",
            "--socket",
            broker.path,
            "--spec",
            spec,
            "--timeout",
            str(timing.scaled(60)),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        read_until(vmm, "echo_ready", timing.deadline(30))
        (device,) = [p for p in children_of(vmm.pid) if "hostemu.devices" in cmdline(p)]
        os.kill(device, signal.SIGKILL)
        done = read_until(vmm, "vmm_done", timing.deadline(20))  # reported in time, no hang
        result = done["results"]["vm0"]
        assert not result["ok"] and "gone" in result["error"], result
        assert any("device process" in e and "exited" in e for e in done["errors"]), done
        assert vmm.wait(timing.scaled(30)) == 1
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait(timing.scaled(10))
        for pipe in (vmm.stdout, vmm.stderr):
            if pipe is not None:
                pipe.close()
    assert broker.connect().ping(5) == 5
