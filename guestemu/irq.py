"""The guest's interrupt controller and its ioeventfd table (no loop, no sockets).

Invariants
----------
* Each irqfd binding the broker attached is one :class:`IrqLine` holding the guest's own
  copies of the eventfd (and, for level-triggered lines, the resamplefd).
* ``delivered[gsi]`` counts *signals* (the sum of every counter value drained from the
  gsi's eventfds while attached); ``wakeups[gsi]`` counts interrupt deliveries (one per
  drain that found a non-zero counter). Signals still pending when a line detaches are
  drained without injection -- like KVM's irqfd shutdown -- and counted in
  ``drained_at_detach``, so ``delivered + drained_at_detach`` always equals what was
  signaled while the binding existed.
* Level-triggered lines (RESAMPLE): a delivery asserts the line; :meth:`eoi` de-asserts
  it and signals the resamplefd so the device can re-assert if it still needs service.
* A masked gsi is not drained: its signals stay pending in the eventfds (coalescing there,
  as in hardware's pending bit) and are delivered as one interrupt on unmask. The caller
  stops watching a masked line's fd (epoll is level-triggered) -- see :meth:`fds_of`.
* Each gsi may have a handler, called with ``(gsi, signals)`` on every delivery.
* An ioeventfd match follows KVM: same bus and exact address; length 0 matches any
  width; otherwise equal width and (wildcard or value == datamatch), the value taken at
  the access width (a 1-byte write carries one byte, so it never matches a datamatch
  that does not fit in one). A hit signals the eventfd with 1 (the in-kernel fast path);
  a miss is an exit to the VMM.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from shared.fds import EventConsumer, EventNotifier, OwnedFd


@dataclass(eq=False)
class IrqLine:
    binding: int
    gsi: int
    consumer: EventConsumer
    resample: EventNotifier | None = None
    asserted: bool = False

    def close(self) -> None:
        self.consumer.close()
        if self.resample is not None:
            self.resample.close()


@dataclass(eq=False)
class IoEventFd:
    binding: int
    pio: bool
    addr: int
    length: int
    datamatch: int | None
    notifier: EventNotifier

    def matches(self, pio: bool, addr: int, length: int, value: int) -> bool:
        if pio != self.pio or addr != self.addr:
            return False
        if self.length == 0:
            return True
        return length == self.length and (self.datamatch is None or value == self.datamatch)


class InterruptController:
    """gsi bookkeeping for irqfds: deliver, EOI/resample, detach."""

    def __init__(self) -> None:
        self.lines: dict[int, IrqLine] = {}
        self.delivered: Counter[int] = Counter()
        self.wakeups: Counter[int] = Counter()
        self.drained_at_detach: Counter[int] = Counter()
        self.eois: Counter[int] = Counter()
        self.masked: set[int] = set()
        self.handlers: dict[int, Callable[[int, int], None]] = {}

    def fds_of(self, gsi: int) -> list[int]:
        """The eventfds feeding ``gsi`` (to stop or resume watching on mask / unmask)."""
        return [line.consumer.fileno() for line in self.lines.values() if line.gsi == gsi]

    def mask(self, gsi: int) -> None:
        self.masked.add(gsi)

    def unmask(self, gsi: int) -> None:
        self.masked.discard(gsi)

    def add(self, binding: int, gsi: int, fd: OwnedFd, resample: OwnedFd | None = None) -> IrqLine:
        line = IrqLine(
            binding,
            gsi,
            EventConsumer(fd),
            EventNotifier(resample) if resample is not None else None,
        )
        self.lines[binding] = line
        return line

    def deliver(self, binding: int) -> int:
        """The line's eventfd is readable: drain it and inject. Returns signals drained."""
        line = self.lines[binding]
        if line.gsi in self.masked:
            return 0  # stays pending in the eventfd until unmasked
        n = line.consumer.drain()
        if n:
            self.delivered[line.gsi] += n
            self.wakeups[line.gsi] += 1
            if line.resample is not None:
                line.asserted = True
            handler = self.handlers.get(line.gsi)
            if handler is not None:
                handler(line.gsi, n)
        return n

    def eoi(self, gsi: int) -> int:
        """End of interrupt on ``gsi``: de-assert level lines and signal their resamplefds."""
        count = 0
        for line in self.lines.values():
            if line.gsi == gsi and line.asserted and line.resample is not None:
                line.asserted = False
                line.resample.notify(1)
                count += 1
        self.eois[gsi] += count
        return count

    def remove(self, binding: int) -> int:
        """Detach: drain without injecting, close our copies. Returns signals drained."""
        line = self.lines.pop(binding)
        n = line.consumer.drain()
        self.drained_at_detach[line.gsi] += n
        line.close()
        return n

    def close(self) -> None:
        for binding in list(self.lines):
            self.remove(binding)


class IoEventTable:
    """The guest's view of the VM's ioeventfds (kept current by the broker)."""

    def __init__(self) -> None:
        self.entries: dict[int, IoEventFd] = {}
        self.hits = 0
        self.misses = 0

    def add(self, entry: IoEventFd) -> None:
        self.entries[entry.binding] = entry

    def remove(self, binding: int) -> bool:
        entry = self.entries.pop(binding, None)
        if entry is None:
            return False
        entry.notifier.close()
        return True

    def write(self, pio: bool, addr: int, length: int, value: int) -> bool:
        """A guest write: signal the matching eventfd (True) or exit to the VMM (False).
        ``value`` is taken at the access width, as the bus does."""
        value &= (1 << (8 * length)) - 1
        for entry in self.entries.values():
            if entry.matches(pio, addr, length, value):
                entry.notifier.notify(1)
                self.hits += 1
                return True
        self.misses += 1
        return False

    def close(self) -> None:
        for binding in list(self.entries):
            self.remove(binding)
