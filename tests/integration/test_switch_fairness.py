"""The venet switch shares a port fairly among sources, through real processes.

Three VMs on one switch: ``a`` floods port 1 (VM ``b``) with valid frames; ``c`` sends
frames to ``b`` and checks that every one comes back, in order, intact; ``b`` reflects
only what comes from ``c``. The traffic is bracketed by events, not by time: ``c`` starts
only once ``a`` answers a probe (which it does only after its flood began) and ends the
flood with a stop frame once it has all its echoes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import BrokerHandle
from tests.integration.test_dataplane import run_vmm

pytestmark = pytest.mark.timeout(240)


def net_vm(name: str, **params: Any) -> dict[str, Any]:
    return {
        "name": name,
        "devices": [{"model": "venet", "name": "net0"}],
        "workload": ["--workload", "net", "--params", json.dumps({"timeout": 120, **params})],
    }


def test_flooding_source_cannot_starve_another_source_to_the_same_port(
    broker: BrokerHandle,
) -> None:
    count = 2000
    spec = {
        "vms": [
            net_vm("a", role="flood", peer=1),
            net_vm("b", role="reflect", peer=2, count=count, others="count"),
            net_vm("c", role="send", peer=1, count=count, window=64, stop=[0]),
        ],
        "switches": [{"name": "sw0", "ports": ["a/net0", "b/net0", "c/net0"]}],
    }
    result = run_vmm(broker, spec, timeout=150)  # type: ignore[arg-type]
    assert result["returncode"] == 0, result
    res = result["results"]
    sender, reflector, flooder = res["c"], res["b"], res["a"]
    # c's traffic went through whole while a flooded the same port
    assert sender["ok"] and sender["frames"] == count, sender
    assert flooder["ok"] and flooder["stopped_by"] == 2, flooder
    assert flooder["probes_answered"] >= 1 and flooder["frames"] > 0, flooder
    # the reflector returned only c's frames; a's were counted as someone else's
    assert reflector["ok"] and reflector["frames"] == count, reflector
    assert set(reflector["foreign_from"]) <= {"0"}, reflector
    port_b = result["stats"]["b"]["devices"]["net0"]["model"]
    # none of c's frames was lost at b's port: at most probes sent before b's RX ring was up
    assert port_b["rx_dropped_from"].get("2", 0) < sender["probes"], (port_b, sender)
    # a's frames reached b's port (delivered or dropped, and counted as a's)
    from_a = port_b["rx_from"].get("0", 0) + port_b["rx_dropped_from"].get("0", 0)
    assert from_a > 0, port_b
    assert result["errors"] == []
