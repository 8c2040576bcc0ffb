"""A malicious guest against real processes: it corrupts its own echo device's
TX ring in guest memory; the device marks only that queue broken, reports it (DeviceReport
-> VMM -> QUEUE_BROKEN register), keeps its other queue and its process, and another VM on
the same broker, VMM and host keeps echoing.

One VMM run carries every attack (one hostile VM each, ``guestemu/workloads/evil.py``) next
to a well-behaved VM: the processes start once, which keeps the file fast on a small box;
each attack is still checked by its own parametrized test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestemu.workloads.evil import ATTACKS
from hostemu.launcher import start_broker
from shared.channel import Channel
from shared.wire import Policy
from tests import timing
from tests.conftest import BrokerHandle
from tests.integration.test_dataplane import echo_vm, run_vmm

pytestmark = pytest.mark.timeout(240)

GOOD_FRAMES = 3000
EXPECTED_REASON = {
    "index_jump": "avail index jumped",
    "head_out_of_range": "out of range (queue size",
    "next_out_of_range": "has next 259 >= queue size 256",
    "loop": "descriptor loop",
    "addr_outside": "is outside guest memory",
    "addr_overflow": "overflows the 64-bit address space",
    "zero_len": "zero-length buffer",
    "huge_len": "longer than the",
    "too_many": "the same head was made available twice",
    "bad_indirect": "not a non-zero multiple of 16",
}
"""What the device's ring code must say: each attack hits the check meant for it."""


def evil_vm(name: str, attack: str, **params: Any) -> dict[str, Any]:
    return {
        "name": name,
        "memory": 4 << 20,
        "devices": [{"model": "echo", "name": "echo0"}],
        "workload": [
            "--workload",
            "evil",
            "--params",
            json.dumps({"attack": attack, "frames": 8, **params}),
        ],
    }


def queue_broken_reports(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result["reports"] if r.get("event") == "queue_broken"]


@pytest.fixture(scope="module")
def module_broker() -> Iterator[BrokerHandle]:
    """One broker for the module's one VMM run (the conftest broker is per test)."""
    d = Path(tempfile.mkdtemp(prefix="vb-"))
    log = d / "broker.log"
    run = d / "run"
    run.mkdir(mode=0o700)
    path = str(run / "broker.sock")
    try:
        with open(log, "w") as logf:
            proc = start_broker(path, Policy.REFCOUNT, stderr=logf, stdout=logf)
        handle = BrokerHandle(path, proc, log)
        yield handle
        for ch in handle.channels:
            ch.close()
        status = proc.stop()
        assert status == 0, f"broker exited with {status}:\n{handle.log_text()}"
        assert "Traceback" not in handle.log_text(), handle.log_text()
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def attacked(module_broker: BrokerHandle) -> dict[str, Any]:
    """Every attack in its own VM, and one good VM, in one VMM run."""
    vms = [evil_vm(f"evil-{a}", a) for a in ATTACKS]
    vms.append(echo_vm("good", GOOD_FRAMES, size=200))
    result = run_vmm(module_broker, vms, timeout=90)
    with Channel.connect(module_broker.path) as ch:
        result["objects_left"] = ch.state()["objects"]
    return result


def test_vmm_run_is_clean_and_the_good_vm_is_unaffected(attacked: dict[str, Any]) -> None:
    assert attacked["errors"] == [], attacked["errors"]
    assert attacked["returncode"] == 0, attacked
    good = attacked["results"]["good"]
    assert good["ok"] and good["frames"] == GOOD_FRAMES and good["error"] is None, good
    dev = attacked["stats"]["good"]["devices"]["echo0"]
    assert dev["model"]["echoed"] == GOOD_FRAMES
    assert "queues_broken" not in dev["counters"]
    assert all(q["broken"] is None for q in dev["queues"].values()), dev["queues"]
    # one report per hostile VM, none for the good one
    assert len(queue_broken_reports(attacked)) == len(ATTACKS), attacked["reports"]
    assert len({r["device"] for r in queue_broken_reports(attacked)}) == len(ATTACKS)
    assert not attacked["objects_left"], "the VMM's objects outlived it"


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_breaks_only_the_attacked_queue(attacked: dict[str, Any], attack: str) -> None:
    vm = f"evil-{attack}"
    r = attacked["results"][vm]
    # the guest saw QUEUE_BROKEN of TX set (through exits to the VMM), RX not, NEEDS_RESET set
    assert r["ok"], r
    assert r["frames"] == 8 and r["error"] is None, r
    assert r["queue_broken"] == {"0": 1, "1": 0} and r["broken_reason"] == 1, r
    assert r["needs_reset"] is True, r
    # the device process is alive (it answered stats) and knows which ring broke and why
    dev = attacked["stats"][vm]["devices"]["echo0"]
    assert dev["counters"]["queues_broken"] == 1, dev
    reason = dev["queues"]["0"]["broken"]
    assert reason is not None and EXPECTED_REASON[attack] in reason, reason
    assert dev["queues"]["1"]["broken"] is None, dev["queues"]
    assert dev["model"]["echoed"] == 8, dev
    # the VMM got the device's report for exactly that queue
    mine = [rep for rep in queue_broken_reports(attacked) if rep["reason"] == reason]
    assert len(mine) == 1 and mine[0]["queue"] == 0, attacked["reports"]


def test_rx_queue_broken_while_serving_tx_is_reported(broker: BrokerHandle) -> None:
    """The RX ring is corrupted; the device finds it while handling a TX kick (echo fills RX
    from its TX handler). The report must still reach the VMM."""
    result = run_vmm(
        broker, [evil_vm("evil-rx", "zero_len", queue=1, wait=timing.scaled(3.0))], timeout=60
    )
    dev = result["stats"]["evil-rx"]["devices"]["echo0"]
    reason = dev["queues"]["1"]["broken"]
    assert reason is not None and "zero-length buffer" in reason, dev  # the attack landed
    assert dev["queues"]["0"]["broken"] is None, dev
    r = result["results"]["evil-rx"]
    assert queue_broken_reports(result), r  # regression: rx_broken_found_in_tx_handler
    assert dev["counters"]["queues_broken"] == 1, dev
    assert r["ok"] and r["queue_broken"] == {"1": 1, "0": 0}, r
    assert result["errors"] == [] and result["returncode"] == 0, result
