"""The ``cycle`` workload: a routing cycle at full rate.

Brings up the ``cycle`` device (:mod:`hostemu.devices.cycle`: each doorbell on its queue is
answered with one interrupt) and installs an interrupt handler on the queue's gsi that
rings the same doorbell ``fanout`` times. One ring starts a loop that runs on its own
for ``seconds``: doorbell -> ioeventfd -> the device's kickfd -> its handler -> irqfd ->
this handler -> doorbell. With ``fanout`` > 1 every turn multiplies the signals, so
anything that queued them one by one (instead of coalescing them in the eventfd
counters) would grow without bound.

Result: ``interrupts`` (handler calls), ``signals`` (counter values they drained),
``max_signals`` (the largest single drain: the depth the queue between device and guest
reached), ``doorbells``, ``max_gap_s`` (the longest wait for an interrupt while the cycle
ran: a stall or deadlock shows here), ``depth_min`` / ``depth_max`` (the handler's stack
depth: equal unless something recursed) and ``reentered`` (handler entered while running).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from guestemu.drivers import GuestRam, Virtqueue, boot, find, start_device
from shared import pci_layout as pl
from shared.errors import VbusError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

DEVICE_CYCLE = 0xC7C1
"""The ``cycle`` device's id (``hostemu.devices.cycle.DEVICE_ID``)."""


def _stack_depth() -> int:
    depth = 0
    frame = sys._getframe(1)
    while frame.f_back is not None:
        frame = frame.f_back
        depth += 1
    return depth


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    seconds = float(params.get("seconds", 2.0))
    fanout = max(1, int(params.get("fanout", 2)))
    result: dict[str, Any] = {"workload": "cycle", "ok": False, "error": None}
    try:
        found = find(boot(agent.vcpu), DEVICE_CYCLE)
        if not found:
            result["error"] = "no cycle device on the bus"
            return result
        fn = found[0]
        start_device(fn, 0)
        vq = Virtqueue(agent.vcpu, GuestRam(agent.memory.map), fn, 0, 16, vector=0, event_idx=False)
        if not fn.driver.set_driver_ok():
            result["error"] = "the device did not go live"
            return result
    except VbusError as e:
        result["error"] = f"{type(e).__name__}: {e}"
        return result

    counts = {"interrupts": 0, "signals": 0, "max_signals": 0, "doorbells": 0, "reentered": 0}
    depth_min, depth_max = sys.maxsize, 0
    running = True
    nesting = 0
    last = time.monotonic()
    max_gap = 0.0

    def ring() -> None:
        for _ in range(fanout):
            agent.vcpu.write(vq.notify_addr, pl.NOTIFY_SIZE, vq.index)  # the fast path
        counts["doorbells"] += fanout

    def on_interrupt(gsi: int, signals: int) -> None:
        nonlocal nesting, last, max_gap, depth_min, depth_max
        nesting += 1
        try:
            if nesting > 1:
                counts["reentered"] += 1
            depth = _stack_depth()
            depth_min, depth_max = min(depth_min, depth), max(depth_max, depth)
            now = time.monotonic()
            if running:
                max_gap = max(max_gap, now - last)
            last = now
            counts["interrupts"] += 1
            counts["signals"] += signals
            counts["max_signals"] = max(counts["max_signals"], signals)
            if running:
                ring()
        finally:
            nesting -= 1

    agent.irq.handlers[vq.gsi] = on_interrupt
    start = last = time.monotonic()
    end = start + seconds
    ring()
    agent.vcpu.halt(lambda: time.monotonic() >= end, timeout=seconds + 5.0)
    running = False
    max_gap = max(max_gap, time.monotonic() - last)  # a cycle that stopped shows here
    elapsed = time.monotonic() - start
    result.update(
        counts,
        ok=True,
        max_gap_s=max_gap,
        elapsed=elapsed,
        interrupts_per_s=counts["interrupts"] / max(elapsed, 1e-9),
        depth_min=depth_min if counts["interrupts"] else None,
        depth_max=depth_max if counts["interrupts"] else None,
    )
    return result
