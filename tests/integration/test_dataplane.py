"""The data plane through real processes: broker, VMM, guest vCPU, echo device process.

A guest boots over exits (config space, BAR and MSI programming), its doorbells go out
through ioeventfds, interrupts come back through irqfds fed by the device's shm-signals,
and every frame is checked for sequence and checksum by the guest.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from hostemu.launcher import python_module
from shared.wire import Policy
from tests import timing
from tests.conftest import BrokerHandle

pytestmark = pytest.mark.timeout(180)


def run_vmm_lines(
    broker: BrokerHandle, vms: list[dict[str, Any]], timeout: float = 60, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """Run ``vms`` in a VMM process (``timeout``: its liveness bound, scaled here); the
    process and every JSON line it printed."""
    limit = timing.scaled(timeout)
    out = subprocess.run(
        python_module(
            "hostemu.vmm",
            "--socket",
            broker.path,
            "--spec",
            json.dumps(vms),
            "--timeout",
            str(limit),
            *args,
        ),
        capture_output=True,
        text=True,
        timeout=limit + timing.scaled(60),
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out, [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def run_vmm(
    broker: BrokerHandle, vms: list[dict[str, Any]], timeout: float = 60, *args: str
) -> dict[str, Any]:
    """Run ``vms`` in a VMM process (``args``: more VMM options); its final result, with
    its exit status."""
    out, lines = run_vmm_lines(broker, vms, timeout, *args)
    done = [obj for obj in lines if obj.get("event") == "vmm_done"]
    assert done, f"no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}"
    result: dict[str, Any] = done[-1]
    result["returncode"] = out.returncode
    return result


def echo_vm(name: str, count: int, size: int = 200, **params: Any) -> dict[str, Any]:
    params = {"count": count, "size": size, "batch": 16, **params}
    return {
        "name": name,
        "devices": [{"model": "echo", "name": "echo0"}],
        "workload": ["--workload", "echo", "--params", json.dumps(params)],
    }


@pytest.mark.parametrize("policy", list(Policy), ids=lambda p: p.name.lower())
def test_echo_round_trip_through_every_process(broker_factory, policy: Policy) -> None:  # type: ignore[no-untyped-def]
    broker = broker_factory(policy=policy)
    result = run_vmm(broker, [echo_vm("vm0", 3000)])
    assert result["returncode"] == 0, result
    r = result["results"]["vm0"]
    assert r["ok"] and r["frames"] == 3000 and r["error"] is None, r
    # doorbells went through the ioeventfd fast path, and EVENT_IDX suppressed some
    assert r["vcpu"]["fast_writes"] == r["doorbells"] > 0
    assert r["doorbells_suppressed"] > 0
    dev = result["stats"]["vm0"]["devices"]["echo0"]
    assert dev["model"]["echoed"] == 3000
    # every interrupt the guest took was sent by the device; several may coalesce into one.
    # (Whether it took any depends on scheduling: a guest whose halt-poll finds every
    # completion needs none. The sleep-always test below needs them all.)
    assert sum(r["interrupts"].values()) <= dev["counters"].get("interrupts", 0), (r, dev)
    assert result["errors"] == []
    # everything the VMM created was torn down
    assert not broker.connect().state()["objects"]


def test_pipelined_echo_keeps_rx_stocked_and_waits_on_replies(broker: BrokerHandle) -> None:
    """A guest keeps an RX buffer posted for every frame in flight -- a reply seen but not
    taken still holds its buffer -- so the echo device never holds a request with nowhere to
    put its reply until the guest reposts. Guest and device share one CPU here: each runs
    while the other waits, and a guest that sent before reposting would leave the device
    with requests and no buffers (it did, counting seen replies as back)."""
    cpu = min(os.sched_getaffinity(0))
    vm = echo_vm("vm0", 20000, size=64)
    vm["cpus"] = [cpu]
    vm["devices"][0]["cpus"] = [cpu]
    result = run_vmm(broker, [vm])
    assert result["returncode"] == 0, result
    assert result["results"]["vm0"]["frames"] == 20000
    dev = result["stats"]["vm0"]["devices"]["echo0"]
    assert dev["model"]["echoed"] == 20000
    assert dev["model"]["rx_waits"] == 0, dev
    # and it waits for replies, not for TX completions: the device completes a TX buffer in
    # the pass that delivers its reply, so a guest woken by both takes two interrupts per
    # pass (one per vector); this one takes the TX completions when the replies wake it
    guest = result["results"]["vm0"]
    per_vector = sorted(guest["interrupts"].values())
    assert per_vector and (len(per_vector) == 1 or per_vector[0] * 10 <= per_vector[-1]), guest


def test_bar_move_and_msi_reprogramming_rebind_without_loss(broker: BrokerHandle) -> None:
    result = run_vmm(broker, [echo_vm("vm0", 1500, rebind=True)])
    assert result["returncode"] == 0, result
    r = result["results"]["vm0"]
    assert r["ok"] and r["frames"] == 1500, r
    assert r["moved_bar"] is not None and r["moved_gsis"] == [16, 17]
    # interrupts arrived only on programmed gsis (whether any came after the move depends
    # on scheduling: a guest whose polling finds every completion needs none)
    assert set(r["interrupts"]) <= {"1", "2", "16", "17"}
    assert not broker.connect().state()["objects"]


def test_two_vms_share_one_broker(broker: BrokerHandle) -> None:
    result = run_vmm(broker, [echo_vm("vm0", 1000), echo_vm("vm1", 1000)])
    assert result["returncode"] == 0, result
    for name in ("vm0", "vm1"):
        assert result["results"][name]["ok"], result["results"][name]


def test_start_together_holds_every_transfer_until_every_vm_is_ready(
    broker: BrokerHandle,
) -> None:
    """``--start-together``: each guest boots, then waits at its start gate; no VM's
    measured transfer starts before the last VM is ready (what the bench's scale figure
    needs to be an aggregate of VMs running side by side)."""
    vms = [echo_vm(f"vm{i}", 500, size=64) for i in range(3)]
    result = run_vmm(broker, vms, 60, "--start-together")
    assert result["returncode"] == 0, result
    rs = [result["results"][f"vm{i}"] for i in range(3)]
    assert all(r["ok"] and r["frames"] == 500 for r in rs), rs
    assert min(r["started"] for r in rs) >= max(r["ready"] for r in rs), rs
    assert all(r["ended"] >= r["started"] > 0 for r in rs), rs
    assert not broker.connect().state()["objects"]


@pytest.mark.parametrize("halt_poll_ns", [0, -1], ids=["sleep-always", "adaptive-poll"])
def test_no_lost_wakeup_under_suppression_many_short_bursts(
    broker: BrokerHandle, halt_poll_ns: int
) -> None:
    """Batches of 1..3 frames with EVENT_IDX suppression on both sides: every burst makes
    each side decide whether to notify and whether to sleep; a lost wakeup is a hang."""
    vms = []
    for i, batch in enumerate((1, 3)):
        vm = echo_vm(f"vm{i}", 2000, size=64, batch=batch)
        vm["workload"] += ["--halt-poll-ns", str(halt_poll_ns)]
        vms.append(vm)
    result = run_vmm(broker, vms, timeout=90)
    assert result["returncode"] == 0, result
    for name in ("vm0", "vm1"):
        r = result["results"][name]
        assert r["ok"] and r["frames"] == 2000, r
        if halt_poll_ns == 0:
            assert r["vcpu"].get("halt_polls_ok", 0) == 0  # it really slept every time


@pytest.mark.parametrize("size", [200, 8192], ids=["staged", "direct"])
def test_echo_with_normal_descriptors_then_an_indirect_one(broker: BrokerHandle, size: int) -> None:
    """virtio 1.2, 2.7.5.3.2: every TX and RX buffer is a normal descriptor followed by an
    indirect one (its table holding the rest); the echo device process must serve them
    (small frames go through its staging arrays, large ones straight TX -> RX)."""
    result = run_vmm(broker, [echo_vm("vm0", 600, size=size, chains="indirect_tail")])
    assert result["returncode"] == 0, result
    r = result["results"]["vm0"]
    assert r["ok"] and r["frames"] == 600 and r["error"] is None, r
    dev = result["stats"]["vm0"]["devices"]["echo0"]
    assert dev["model"]["echoed"] == 600
    assert all(q["broken"] is None for q in dev["queues"].values()), dev["queues"]
    assert result["errors"] == []
