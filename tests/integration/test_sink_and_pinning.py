"""The echo device's one-way ``sink`` mode and CPU pinning of guest and device processes,
through real processes (the benchmark's small-message and round-trip placements). No
timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from hostemu.launcher import python_module
from tests import timing
from tests.conftest import BrokerHandle
from tests.integration.test_dataplane import run_vmm

pytestmark = pytest.mark.timeout(180)


def sink_vm(count: int, batch: int, **extra: Any) -> dict[str, Any]:
    params = {"count": count, "size": 64, "batch": batch, "sink": True}
    return {
        "name": "vm0",
        **extra,
        "devices": [{"model": "echo", "name": "echo0", "params": {"sink": True}}],
        "workload": ["--workload", "echo", "--params", json.dumps(params)],
    }


@pytest.mark.parametrize("batch", [1, 16, 200])
def test_sink_consumes_every_frame_in_order(broker: BrokerHandle, batch: int) -> None:
    result = run_vmm(broker, [sink_vm(3000, batch)])
    assert result["returncode"] == 0, result
    r = result["results"]["vm0"]
    assert r["ok"] and r["sink"] and r["frames"] == 3000, r
    dev = result["stats"]["vm0"]["devices"]["echo0"]
    assert dev["model"]["sunk"] == 3000 and dev["model"]["seq_errors"] == 0, dev
    assert dev["model"]["bytes"] == 3000 * 64
    assert dev["queues"]["0"]["in_flight"] == 0 and dev["queues"]["0"]["broken"] is None
    assert not broker.connect().state()["objects"]


def test_guest_and_device_run_on_the_cpus_given(broker: BrokerHandle) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    guest_cpu, device_cpu = cpus[0], cpus[-1]
    vm = sink_vm(500, 16, cpus=[guest_cpu])
    vm["devices"][0]["cpus"] = [device_cpu]
    result = run_vmm(broker, [vm])
    assert result["returncode"] == 0, result
    assert result["results"]["vm0"]["cpus"] == [guest_cpu]
    assert result["stats"]["vm0"]["devices"]["echo0"]["cpus"] == [device_cpu]


def test_unpinned_processes_may_run_anywhere(broker: BrokerHandle) -> None:
    result = run_vmm(broker, [sink_vm(100, 16)])
    usable = sorted(os.sched_getaffinity(0))
    assert result["results"]["vm0"]["cpus"] == usable
    assert result["stats"]["vm0"]["devices"]["echo0"]["cpus"] == usable


@pytest.mark.parametrize("where", ["vm", "device"])
def test_unusable_cpus_are_refused_before_anything_starts(broker: BrokerHandle, where: str) -> None:
    vm = sink_vm(10, 1)
    (vm if where == "vm" else vm["devices"][0])["cpus"] = [1 << 20]
    out = subprocess.run(
        python_module("hostemu.vmm", "--socket", broker.path, "--spec", json.dumps([vm])),
        capture_output=True,
        text=True,
        timeout=timing.scaled(60),
    )
    assert out.returncode == 2, out
    assert "are not all usable here" in out.stderr and "Traceback" not in out.stderr
    assert not broker.connect().state()["objects"]
