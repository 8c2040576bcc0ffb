"""A guest that storms I/O exits does not starve the other VMs.

VM ``storm`` (``guestemu/workloads/exit_storm.py``) makes exits back to back, as fast as its
vCPU goes, and keeps trying to pipeline more (which the broker refuses with EBUSY). Only
once it is storming are VMs ``a`` and ``b`` started on the same broker and VMM: they boot
over their own exits and run an echo workload each. The storm is stopped (SIGTERM) only
after both reported success, so it ran through their whole boot and workload.

Oracles: both quiet VMs succeed; the storm saw EBUSY and no error; the VMM served exactly
the storm's exits that the broker accepted (a refused one reached nobody).

The test plays the VMM in-process (:class:`hostemu.vmm.Vmm`, as ``vbusemu soak`` does), so
it can start the quiet VMs after the storm began and stop the storm when they are done.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from hostemu.vmm import DeviceSpec, Vmm, VmmVm, VmSpec
from shared.loop import EventLoop
from tests.conftest import BrokerHandle

pytestmark = pytest.mark.timeout(300)

QUIET_FRAMES = 1500


def echo_spec(name: str) -> VmSpec:
    params = {"count": QUIET_FRAMES, "size": 200, "batch": 16}
    return VmSpec(
        name=name,
        memory=4 << 20,
        devices=(DeviceSpec("echo", "echo0"),),
        workload=("--workload", "echo", "--params", json.dumps(params)),
    )


def done(vm: VmmVm) -> bool:
    return vm.guest is not None and any(e.get("event") == "workload_done" for e in vm.guest.events)


def test_exit_storm_does_not_starve_other_vms(broker: BrokerHandle, sockdir: Path) -> None:
    storm_spec = VmSpec(
        name="storm",
        memory=1 << 20,
        workload=("--workload", "exit_storm", "--params", json.dumps({"seconds": 250})),
    )
    events: list[dict[str, Any]] = []
    loop = EventLoop()
    with open(sockdir / "vmm-children.log", "w") as log:
        vmm = Vmm(broker.connect(), stderr=log)
        vmm.on_event = events.append  # type: ignore[method-assign]
        try:
            storm = vmm.create_vm(storm_spec)
            vmm.start()
            assert storm.guest is not None
            storm.guest.wait_event("exit_storm_started", timeout=30)
            # The storm's first exit is on its way: from here on it never stops exiting.
            quiet = [vmm.create_vm(echo_spec(name)) for name in ("a", "b")]
            vmm.start()
            stopped: list[bool] = []

            def stop_storm_when_quiet_vms_are_done() -> None:
                if all(done(vm) for vm in quiet):
                    assert storm.guest is not None
                    storm.guest.proc.send_signal(signal.SIGTERM)
                    stopped.append(True)
                else:
                    loop.call_at(time.monotonic() + 0.05, stop_storm_when_quiet_vms_are_done)

            loop.call_at(time.monotonic(), stop_storm_when_quiet_vms_are_done)
            results = vmm.run_until_guests_exit(loop, timeout=240)
            stats = vmm.stats()
        finally:
            vmm.shutdown()
            loop.close()
    assert vmm.errors == [], vmm.errors
    assert stopped, f"the quiet VMs never finished: {results}"
    for name in ("a", "b"):
        r = results[name]
        assert r["ok"] and r["frames"] == QUIET_FRAMES and r["error"] is None, r
    s = results["storm"]
    assert s["ok"] and s["stopped"] and s["error"] is None, s
    assert s["exits"] > 0 and s["busy"] > 0, s
    assert s["pipelined_served"] + s["busy"] == s["pipelined"], s
    # Exits refused with EBUSY reached nobody: the VMM served exactly the accepted ones.
    assert stats["storm"]["exits"] == s["served"], (stats["storm"], s)
    print(
        f"storm: {s['exits']:,} synchronous exits, {s['pipelined']:,} pipelined "
        f"({s['busy']:,} EBUSY), {s['exits_per_s']:,.0f} exits/s; quiet VMs served "
        f"{stats['a']['exits']} and {stats['b']['exits']} exits"
    )
