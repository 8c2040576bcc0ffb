"""Where vbusemu differs from KVM on purpose, and the differences not fixed yet.

Each entry names a difference the conformance run may meet at a step that cites it. A
*deviation* is deliberate and stays; a *bug* is known and open: it should be fixed, and
the scenario that shows it is expected to fail until it is (``docs/semantics.md`` lists
both with the same names).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deviation:
    name: str
    kind: str  # "deviation" | "bug"
    reason: str


DEVIATIONS: dict[str, Deviation] = {
    d.name: d
    for d in (
        Deviation(
            "resample-self",
            "deviation",
            "A resampling irqfd whose resamplefd is its own eventfd is refused (EINVAL). "
            "KVM accepts it, and then every EOI re-signals the line: an interrupt storm.",
        ),
        Deviation(
            "vm-id",
            "deviation",
            "VMs are named by broker ids, not file descriptors: after teardown the id is "
            "unknown (ENOENT) where KVM sees a closed descriptor (EBADF).",
        ),
        Deviation(
            "refcount",
            "deviation",
            "Under the refcount release policy an irqfd outlives the last close of its "
            "eventfd (the 2009 proposal); KVM detaches it (HUP). Run under the hup "
            "policy the broker behaves like KVM.",
        ),
        Deviation(
            "late-attach",
            "deviation",
            "vbusemu's guest learns of an irqfd from the broker's attach notice, after the "
            "assign returned: a signal made in between counts as pending at assign (one "
            "injection, the count left in the eventfd) where KVM reads it at once. Not a "
            "scenario step: every step waits until the guest holds what the broker bound.",
        ),
        Deviation(
            "merged-writes",
            "deviation",
            "vbusemu's guest sees an irqfd's writes as edges of its own epoll: writes made "
            "before it looks merge into one edge, one read, one injection. KVM reads and "
            "injects once per write. The total read is the same for a normal eventfd; a "
            "semaphore-mode eventfd gives 1 per read, so k merged writes leave k-1 more in "
            "it than KVM would. Not a scenario step: whether writes merge is a race.",
        ),
        Deviation(
            "sync-hup",
            "deviation",
            "KVM detaches an irqfd on the last close from a workqueue: for a moment a "
            "signal through another holder can still inject. vbusemu's detach is "
            "synchronous (the kernel side waits the window out).",
        ),
        Deviation(
            "page-split",
            "deviation",
            "KVM splits an MMIO access that crosses a 4 KiB page into one access per page: "
            "each is matched (and exits) on its own, so neither matches an ioeventfd of the "
            "whole width, while halves can match ioeventfds of their own. vbusemu's guest "
            "has no paging: its access is one guest-physical range, matched whole.",
        ),
    )
}
