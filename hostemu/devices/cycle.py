"""``cycle``: a device that answers every doorbell with an interrupt (a routing cycle).

One queue, one vector, no ring work: each pass of the queue handler -- a kick drained from
the queue's kickfd -- signals the queue's vector once. With a guest whose interrupt
handler rings the same doorbell (:mod:`guestemu.workloads.cycle`) this closes a loop that
runs at full rate: doorbell -> ioeventfd -> kickfd -> this handler -> shm-signal eventfd
= irqfd -> the guest's handler -> doorbell. A fault test checks that it stays
bounded: both hops are eventfd counters, so signals coalesce (the queue between two
handlers is one counter, never a list); each side runs its handler from its own event
loop, so the cycle never recurses; and neither side waits for the other.

The model counts its passes and records the stack depth of its handler (constant when
nothing recurses) and whether it was ever re-entered.
"""

from __future__ import annotations

import sys
from typing import Any

from hostemu.devices.runtime import DeviceModel, Queue, no_params

DEVICE_ID = 0xC7C1
"""Not in :data:`shared.pci_layout.DEVICE_IDS`: a test device (class "unassigned")."""
QUEUES = 1
VECTORS = 1


def stack_depth() -> int:
    """Frames on the calling thread's stack (cheap: no source lines are read)."""
    depth = 0
    frame = sys._getframe(1)
    while frame.f_back is not None:
        frame = frame.f_back
        depth += 1
    return depth


class CycleModel(DeviceModel):
    name = "cycle"

    def __init__(self) -> None:
        self.passes = 0
        self.depth_min: int | None = None
        self.depth_max = 0
        self.nesting = 0
        self.reentered = 0

    def on_queue(self, q: Queue) -> bool:
        self.nesting += 1
        try:
            if self.nesting > 1:
                self.reentered += 1
            depth = stack_depth()
            self.depth_min = depth if self.depth_min is None else min(self.depth_min, depth)
            self.depth_max = max(self.depth_max, depth)
            self.passes += 1
            self.runtime.interrupt(q.vector)
        finally:
            self.nesting -= 1
        return False  # one interrupt per pass, however many doorbells it drained

    def stats(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "depth_min": self.depth_min,
            "depth_max": self.depth_max,
            "reentered": self.reentered,
        }


def check_params(params: dict[str, Any]) -> None:
    """Checked by the topology before anything starts: no options."""
    no_params("cycle", params)


def make_model(params: dict[str, Any]) -> DeviceModel:
    check_params(params)
    return CycleModel()
