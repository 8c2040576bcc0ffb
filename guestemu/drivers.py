"""Guest drivers: bring up the PCI-like bus, then virtqueues on it.

Theory of operation
-------------------
:func:`boot` enumerates the bus through config-space exits, gives every function a BAR
address (the VMM binds the queue doorbells as ioeventfds there) and programs each MSI
vector with a fresh gsi (the VMM binds an irqfd to it and hands the same eventfd to the
device as its shm-signal). :class:`Virtqueue` allocates a ring in guest RAM, programs it
through the BAR registers and wraps a :class:`~shared.ring.DriverRing`; a kick is a write
of the queue index to its notify register -- caught by the ioeventfd, so no exit -- and
happens only when the ring says the device asked for one (EVENT_IDX suppression).
Counters record doorbells rung vs suppressed and interrupts taken.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from guestemu import pci
from shared import pci_layout as pl
from shared.errors import UsageError
from shared.memory import GuestMemoryMap
from shared.ring import DriverRing, RingLayout

if TYPE_CHECKING:
    from guestemu.vcpu import Vcpu

F_EVENT_IDX = 1


class GuestRam:
    """A bump allocator over guest-physical memory (the guest kernel's page allocator)."""

    def __init__(self, memory: GuestMemoryMap, start: int = 0x10000) -> None:
        self.memory = memory
        self.next = start

    def alloc(self, size: int, align: int = 64) -> int:
        gpa = (self.next + align - 1) // align * align
        self.memory.translate(gpa, size)  # raises MemoryAccessError when RAM runs out
        self.next = gpa + size
        return gpa

    def view(self, gpa: int, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        return self.memory.translate(gpa, size)


@dataclass
class Function:
    found: pci.FoundFunction
    driver: pci.PciDriver
    gsis: dict[int, int] = field(default_factory=dict)  # vector -> gsi


def boot(vcpu: Vcpu, *, first_gsi: int = 1) -> list[Function]:
    """Enumerate the bus, place BARs, program MSI vectors. Returns the functions."""
    bars = pci.BarAllocator()
    functions = []
    gsi = first_gsi
    for found in pci.enumerate_bus(vcpu):
        driver = pci.PciDriver(vcpu, found)
        driver.program_bar(bars.allocate(found.bar_size))
        fn = Function(found, driver)
        for vector in range(found.num_vectors):
            driver.program_msi(vector, gsi)
            fn.gsis[vector] = gsi
            gsi += 1
        functions.append(fn)
    return functions


class Virtqueue:
    """One queue of one function: ring in guest RAM, doorbell, interrupt line."""

    def __init__(self, vcpu: Vcpu, ram: GuestRam, fn: Function, index: int, size: int,
                 vector: int, *, event_idx: bool) -> None:
        self.vcpu = vcpu
        self.fn = fn
        self.index = index
        self.layout = RingLayout(size)
        gpa = ram.alloc(self.layout.size, align=4096)
        self.ring = DriverRing(ram.view(gpa, self.layout.size), self.layout,
                               event_idx=event_idx)
        desc, avail, used = self.layout.addresses(gpa)
        if not fn.driver.setup_queue(index, size, desc, avail, used, vector):
            raise UsageError(f"the device refused queue {index}")
        self.gsi = fn.gsis[vector]
        self.notify_addr = fn.driver.queue_notify_address(index)
        self.counters: Counter[str] = Counter()

    def kick(self) -> None:
        if self.ring.kick_needed():
            self.vcpu.write(self.notify_addr, pl.NOTIFY_SIZE, self.index)
            self.counters["doorbells"] += 1
        else:
            self.counters["doorbells_suppressed"] += 1


class BufferPool:
    """``count`` fixed-size buffers in guest RAM, as one 2-D numpy view."""

    def __init__(self, ram: GuestRam, count: int, size: int) -> None:
        self.size = size
        self.base = ram.alloc(count * size, align=4096)
        self.data = ram.view(self.base, count * size).reshape(count, size)
        self.free = list(range(count - 1, -1, -1))

    def addrs(self, slots: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any] = (np.uint64(self.base)
                                     + slots.astype(np.uint64) * np.uint64(self.size))
        return out

    def take(self, n: int) -> np.ndarray[Any, Any]:
        if n > len(self.free):
            raise UsageError(f"{n} buffers wanted, {len(self.free)} free")
        out = np.array([self.free.pop() for _ in range(n)], dtype=np.int64)
        return out

    def give(self, slots: np.ndarray[Any, Any]) -> None:
        self.free.extend(int(s) for s in slots)


def find(functions: list[Function], device_id: int) -> list[Function]:
    return [f for f in functions if f.found.device_id == device_id]


def start_device(fn: Function) -> int:
    """Reset, negotiate EVENT_IDX; returns the accepted features."""
    fn.driver.reset()
    accepted = fn.driver.negotiate(F_EVENT_IDX)
    if accepted is None:
        raise UsageError(f"function {fn.found.slot} refused its features")
    return accepted
