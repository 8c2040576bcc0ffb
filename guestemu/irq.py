"""The guest's interrupt controller and its ioeventfd table (no loop, no sockets).

Invariants
----------
* Each irqfd binding the broker attached is one :class:`IrqLine` holding the guest's own
  copies of the eventfd (and, for level-triggered lines, the resamplefd), and an epoll
  instance watching that eventfd *edge-triggered* (:attr:`IrqLine.edges`): the caller's
  loop watches that instance, so a line wakes once per write to the eventfd, whatever
  count it holds -- KVM's irqfd sits on the eventfd's wait queue the same way.
* A delivery (a new write) reads the eventfd once -- the whole count, or 1 in semaphore
  mode, as KVM's irqfd wakeup does -- and injects. ``delivered[gsi]`` counts the signals
  those reads took; ``wakeups[gsi]`` counts injections.
* A count already pending when the line attaches is injected once *without being read*
  (KVM's assign polls the eventfd and injects, leaving the count): ``wakeups`` grows,
  ``delivered`` does not, and the count stays in the eventfd until the next write (whose
  read takes it along) or the detach. "Attaches" is when the guest takes the broker's
  attach notice: a signal made between the broker's answer to the assign and that moment
  counts as pending at assign (one injection, not read yet). Detaching reads what is
  left without injecting -- like KVM's irqfd shutdown -- and counts it in
  ``drained_at_detach``. So ``delivered + drained_at_detach`` always equals what the
  eventfd held while the line was attached: the count pending at attach plus every
  signal since (for a semaphore-mode eventfd, at most that: a read takes 1).
* Level-triggered lines (RESAMPLE): an injection asserts the line; :meth:`eoi` de-asserts
  it and signals the resamplefd so the device can re-assert if it still needs service.
* A masked gsi is not read: its writes stay pending in the eventfds (coalescing there,
  as in hardware's pending bit) and their edges in each line's epoll; the caller stops
  watching a masked line (see :meth:`fds_of`) and, on unmask, watches it again: pending
  writes are then delivered as one interrupt. A count pending at attach on a masked gsi
  is held (:attr:`IrqLine.held`) and injected, unread, on unmask.
* Each gsi may have a handler, called with ``(gsi, signals)`` on every injection
  (``signals`` is 0 for a count pending at attach, which is not read).
* An ioeventfd match follows KVM: same bus and exact address; length 0 matches any
  width; otherwise equal width and (wildcard or value == datamatch), the value taken at
  the access width (a 1-byte write carries one byte, so it never matches a datamatch
  that does not fit in one). A hit signals the eventfd with 1 (the in-kernel fast path);
  a miss is an exit to the VMM.
"""

from __future__ import annotations

import select
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.fds import EventConsumer, EventNotifier, OwnedFd


@dataclass(eq=False)
class IrqLine:
    binding: int
    gsi: int
    consumer: EventConsumer
    resample: EventNotifier | None = None
    asserted: bool = False
    edges: select.epoll = field(default_factory=select.epoll)
    """The eventfd, edge-triggered: readable once per write since the last :meth:`take_edge`."""
    held: bool = False
    """A count pending at attach, not injected yet (the gsi was masked)."""

    def __post_init__(self) -> None:
        try:
            self.edges.register(self.consumer.fileno(), select.EPOLLIN | select.EPOLLET)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        """What a loop watches (level-triggered) to learn of new writes."""
        return self.edges.fileno()

    def take_edge(self) -> bool:
        """True once per batch of writes since the last call (or since the line attached,
        for a count already pending then)."""
        return bool(self.edges.poll(0))

    def close(self) -> None:
        self.edges.close()
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
        """What a loop watches for ``gsi``'s lines (to stop or resume on mask / unmask)."""
        return [line.fileno() for line in self.lines.values() if line.gsi == gsi]

    def mask(self, gsi: int) -> None:
        self.masked.add(gsi)

    def unmask(self, gsi: int) -> None:
        self.masked.discard(gsi)

    def add(self, binding: int, gsi: int, fd: OwnedFd, resample: OwnedFd | None = None) -> IrqLine:
        """Attach a line. A count already pending is not read: the line is marked
        :attr:`~IrqLine.held`, and the caller's next :meth:`deliver` (at once, or on
        unmask) injects it once."""
        line = IrqLine(
            binding,
            gsi,
            EventConsumer(fd),
            EventNotifier(resample) if resample is not None else None,
        )
        # Registering it made the edge epoll ready if a count was pending: take that
        # edge now, so that only writes from here on read the eventfd.
        line.held = line.take_edge()
        self.lines[binding] = line
        return line

    def deliver(self, binding: int) -> bool:
        """The line's epoll is readable (a write), or it holds a count pending at attach:
        read the eventfd once if written and inject. Returns whether it injected."""
        line = self.lines[binding]
        if line.gsi in self.masked:
            return False  # stays pending in the eventfd (and its edge in the epoll)
        n = line.consumer.drain() if line.take_edge() else 0
        if not n and not line.held:
            return False
        line.held = False
        self.delivered[line.gsi] += n
        self.wakeups[line.gsi] += 1
        if line.resample is not None:
            line.asserted = True
        handler = self.handlers.get(line.gsi)
        if handler is not None:
            handler(line.gsi, n)
        return True

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
        """Detach: read what is left without injecting (a count pending since attach too),
        close our copies. Returns signals drained."""
        line = self.lines.pop(binding)
        n = line.consumer.drain()
        self.drained_at_detach[line.gsi] += n
        line.close()
        return n

    def close(self) -> None:
        for binding in list(self.lines):
            self.remove(binding)


class IoEventTable:
    """The guest's view of the VM's ioeventfds (kept current by the broker).

    A write looks its (bus, address, width, value) up in a small cache of earlier hits
    before it walks the table: a queue's doorbell is the same write every time, and it sits
    on the path from a wakeup to the device's kick. Any change to the table empties the
    cache, so a write always signals what a walk of the current table would."""

    CACHE_MAX = 64

    def __init__(self) -> None:
        self.entries: dict[int, IoEventFd] = {}
        self.hits = 0
        self.misses = 0
        self._hit_cache: dict[tuple[bool, int, int, int], EventNotifier] = {}

    def add(self, entry: IoEventFd) -> None:
        self._hit_cache.clear()
        self.entries[entry.binding] = entry

    def remove(self, binding: int) -> bool:
        self._hit_cache.clear()
        entry = self.entries.pop(binding, None)
        if entry is None:
            return False
        entry.notifier.close()
        return True

    def match(self, pio: bool, addr: int, length: int, value: int) -> IoEventFd | None:
        """The ioeventfd a write hits (the first that matches), or None: an exit."""
        value &= (1 << (8 * length)) - 1
        for entry in self.entries.values():
            if entry.matches(pio, addr, length, value):
                return entry
        return None

    def write(self, pio: bool, addr: int, length: int, value: int) -> bool:
        """A guest write: signal the matching eventfd (True) or exit to the VMM (False).
        ``value`` is taken at the access width, as the bus does."""
        key = (pio, addr, length, value)
        notifier = self._hit_cache.get(key)
        if notifier is None:
            entry = self.match(pio, addr, length, value)
            if entry is None:
                self.misses += 1
                return False
            notifier = entry.notifier
            if len(self._hit_cache) < self.CACHE_MAX:
                self._hit_cache[key] = notifier
        notifier.notify(1)
        self.hits += 1
        return True

    def close(self) -> None:
        for binding in list(self.entries):
            self.remove(binding)
