"""The guest's interrupt controller and its ioeventfd table (no loop, no sockets).

Invariants
----------
* Each irqfd binding the broker attached is one :class:`IrqLine` holding the guest's own
  copies of the eventfd (and, for level-triggered lines, the resamplefd). A line wakes
  once per write to the eventfd (per batch of writes made before it looks), whatever
  count it holds -- KVM's irqfd sits on the eventfd's wait queue the same way. Two ways
  to watch it, chosen at attach (:attr:`IrqLine.edges`):

  - *direct*: the caller's loop watches the eventfd itself. A delivery reads the whole
    count, so the eventfd is not readable again until the next write: once per write,
    one syscall per interrupt. Only where that holds: the eventfd is not in semaphore
    mode (a read would take 1 and leave it readable) and holds no count at attach (a
    count KVM leaves unread would keep it readable), as the kernel's fdinfo says;
  - *edge*: otherwise (and where fdinfo cannot tell), an epoll instance watching the
    eventfd edge-triggered, which the caller's loop watches: readable once per write
    since the last :meth:`IrqLine.take_edge`, whatever is left in the eventfd.
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
* Level-triggered lines (RESAMPLE) follow KVM's resampler, which is one per gsi: an
  injection raises the gsi's level (:attr:`InterruptController.level`); while it is high
  a write to any irqfd of that gsi is read but makes no new edge, so it injects nothing.
  The EOI of the gsi (:meth:`InterruptController.eoi`, KVM's ack notifier) lowers the
  level and signals the resamplefd of *every* resampling irqfd of the gsi, so the device
  re-asserts if it still needs service; detaching the gsi's last resampling irqfd lowers
  it too. An EOI on a gsi with no resampling irqfd changes nothing.
* Taking interrupts: by default every injection is taken and EOI'd at once (the guest's
  handler services it). :meth:`InterruptController.hold` makes the guest behave like a
  vCPU running with interrupts disabled, as the conformance oracle's does: an injection
  on gsi 0-23 only latches a request (one per gsi, like the PIC's request register and
  the local APIC's), and :meth:`InterruptController.take` takes every latched request and
  EOIs it, in the order KVM delivers them: the PIC lines by priority (0, 1, 2, 8-15,
  3-7), then the IOAPIC-only pins 23 down to 16 (the local APIC takes the highest vector
  first). A request stays latched when its line falls again (the PIC latches edges), so
  detaching an asserted irqfd leaves it to be taken.
* A masked gsi is not read: its writes stay pending in the eventfds (coalescing there,
  as in hardware's pending bit) and, in edge mode, their edges in each line's epoll;
  the caller stops watching a masked line (see :meth:`fds_of`) and, on unmask, watches
  it again: pending writes are then delivered as one interrupt. A count pending at
  attach on a masked gsi is held (:attr:`IrqLine.held`) and injected, unread, on
  unmask.
* Each gsi may have a handler, called with ``(gsi, signals)`` on every injection
  (``signals`` is 0 for a count pending at attach, which is not read).
* An ioeventfd match follows KVM: same bus and exact address; length 0 matches any
  width; otherwise equal width and (wildcard or value == datamatch), the value taken at
  the access width (a 1-byte write carries one byte, so it never matches a datamatch
  that does not fit in one). A hit signals the eventfd with 1 (the in-kernel fast path);
  a miss is an exit to the VMM.
"""

from __future__ import annotations

import contextlib
import select
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from shared.fds import (
    EventConsumer,
    EventNotifier,
    OwnedFd,
    eventfd_info,
    fdinfo_shows_semaphore,
)

TAKE_ORDER: Final = (0, 1, 2, *range(8, 16), *range(3, 8), *range(23, 15, -1))
"""The gsis an interrupt can be taken on, in the order KVM delivers requests latched
together: the PIC pair by priority (the slave's lines sit at the master's line 2), then
the IOAPIC-only pins, highest vector first."""
_TAKE_RANK: Final = {gsi: rank for rank, gsi in enumerate(TAKE_ORDER)}


@dataclass(eq=False)
class IrqLine:
    binding: int
    gsi: int
    consumer: EventConsumer
    resample: EventNotifier | None = None
    edges: select.epoll | None = field(default_factory=select.epoll)
    """Edge mode: the eventfd, edge-triggered -- readable once per write since the last
    :meth:`take_edge`. ``None``: direct mode, the eventfd itself is watched."""
    held: bool = False
    """A count pending at attach, not injected yet (the gsi was masked)."""

    def __post_init__(self) -> None:
        if self.edges is None:
            return
        try:
            self.edges.register(self.consumer.fileno(), select.EPOLLIN | select.EPOLLET)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        """What a loop watches (level-triggered) to learn of new writes."""
        return self.consumer.fileno() if self.edges is None else self.edges.fileno()

    def take_edge(self) -> bool:
        """Edge mode: True once per batch of writes since the last call (or since the line
        attached, for a count already pending then). Direct mode: True -- the read says."""
        return True if self.edges is None else bool(self.edges.poll(0))

    def close(self) -> None:
        if self.edges is not None:
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
    """gsi bookkeeping for irqfds: deliver, take and EOI/resample, detach."""

    def __init__(self) -> None:
        self.lines: dict[int, IrqLine] = {}
        self.delivered: Counter[int] = Counter()
        self.wakeups: Counter[int] = Counter()
        self.drained_at_detach: Counter[int] = Counter()
        self.eois: Counter[int] = Counter()
        """EOIs that reached a resampler (a gsi with at least one resampling irqfd)."""
        self.masked: set[int] = set()
        self.handlers: dict[int, Callable[[int, int], None]] = {}
        self.resamplers: dict[int, list[IrqLine]] = {}
        """gsi -> its resampling lines (KVM's resampler of that gsi), in attach order."""
        self.level: set[int] = set()
        """The gsis a resampling irqfd holds high."""
        self.holding = False
        """Interrupts are disabled: injections latch :attr:`requested` (see :meth:`hold`)."""
        self.requested: set[int] = set()
        """gsis with a request latched and not taken yet (only while :attr:`holding`)."""

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
        info = None
        if fdinfo_shows_semaphore():
            # (out of fds or memory: the edge mode's epoll below fails the same way)
            with contextlib.suppress(OSError):
                info = eventfd_info(fd.fd)
        direct = info is not None and not info.semaphore and info.count == 0
        line = IrqLine(
            binding,
            gsi,
            EventConsumer(fd),
            EventNotifier(resample) if resample is not None else None,
            edges=None if direct else select.epoll(),
        )
        # Edge mode: registering it made the edge epoll ready if a count was pending: take
        # that edge now, so that only writes from here on read the eventfd.
        line.held = not direct and line.take_edge()
        self.lines[binding] = line
        if line.resample is not None:
            self.resamplers.setdefault(gsi, []).append(line)
        return line

    def deliver(self, binding: int) -> bool:
        """The watched fd is readable (a write), or the line holds a count pending at
        attach: read the eventfd once if written and inject -- unless a resampling irqfd
        holds the gsi high already (no new edge). Returns whether it injected."""
        line = self.lines[binding]
        gsi = line.gsi
        if gsi in self.masked:
            return False  # stays pending in the eventfd (and its edge in the epoll)
        n = line.consumer.drain() if line.take_edge() else 0
        if not n and not line.held:
            return False
        line.held = False
        self.delivered[gsi] += n
        if gsi in self.level:
            return False
        self.wakeups[gsi] += 1
        if line.resample is not None:
            self.level.add(gsi)
        if self.holding and gsi in _TAKE_RANK:
            self.requested.add(gsi)
        handler = self.handlers.get(gsi)
        if handler is not None:
            handler(gsi, n)
        return True

    def eoi(self, gsi: int) -> int:
        """End of interrupt on ``gsi`` (KVM's ack notifier): lower the gsi's level and
        signal the resamplefd of every resampling line of the gsi. Returns how many."""
        self.level.discard(gsi)
        lines = self.resamplers.get(gsi)
        if not lines:
            return 0
        for line in lines:
            assert line.resample is not None
            line.resample.notify(1)
        self.eois[gsi] += 1
        return len(lines)

    def hold(self, holding: bool) -> list[int]:
        """Disable (``True``) or enable taking interrupts. While held, injections latch
        requests for :meth:`take`; enabling again takes what is latched (returned)."""
        self.holding = holding
        return [] if holding else self.take()

    def take(self) -> list[int]:
        """Take every latched request and EOI it, in :data:`TAKE_ORDER`; returns the gsis
        taken, in that order."""
        taken = sorted(self.requested, key=_TAKE_RANK.__getitem__)
        self.requested.clear()
        for gsi in taken:
            self.eoi(gsi)
        return taken

    def remove(self, binding: int) -> int:
        """Detach: read what is left without injecting (a count pending since attach too),
        close our copies; the gsi's last resampling line lowers its level. Returns
        signals drained."""
        line = self.lines.pop(binding)
        if line.resample is not None:
            lines = self.resamplers[line.gsi]
            lines.remove(line)
            if not lines:
                del self.resamplers[line.gsi]
                self.level.discard(line.gsi)
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
