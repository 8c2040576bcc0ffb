"""The guest's vCPU: memory-mapped I/O and halting.

Theory of operation
-------------------
A guest process runs its drivers and workload as ordinary code on one thread -- the vCPU.
Two things leave that code:

* **MMIO/PIO accesses** (:meth:`Vcpu.read`, :meth:`Vcpu.write`). A write that matches an
  ioeventfd the broker attached signals that eventfd directly and returns at once: KVM's
  in-kernel fast path, no exit. Every other access is an *exit*: a synchronous
  ``IoExit`` request the broker relays to the VMM; the vCPU waits for the answer (meanwhile
  it still acknowledges detach notices, so a VMM that rebinds in response cannot
  deadlock against it). Like a vCPU blocked in ``KVM_RUN``, it has at most one exit in
  flight: the broker refuses a second one on the VM channel with EBUSY.
* **Halting** (:meth:`Vcpu.halt`): waiting for a condition such as "the device returned
  buffers". Like KVM's halt-polling, the vCPU first polls -- the condition, and its irqfds
  without blocking -- for a window, and only then sleeps in epoll on irqfds, the broker
  channel and its control pipe. The window is adaptive by default (grows when a wakeup
  came soon after sleeping, shrinks when the sleep was long, as ``halt_poll_ns`` does);
  a fixed window, including 0 (never poll), can be configured. The poll checks the
  condition in slices of :data:`POLL_SLICE_NS`, polling the fds and yielding the CPU between
  slices, and gives up (sleeps) as soon as a yield shows another task wanted the CPU --
  KVM stops halt-polling when ``single_task_running()`` is false. It does not poll at all
  while more tasks are runnable than the machine has CPUs
  (:meth:`~shared.loop.EventLoop.oversubscribed`): with several VMs on a few CPUs, a
  poller's window is CPU time another VM's device is waiting for.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from shared import wire
from shared.errors import PeerGoneError, UsageError
from shared.loop import yield_cpu

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

ADAPTIVE = -1
DEFAULT_MAX_POLL_NS = 200_000
GROW_START_NS = 10_000
POLL_SLICE_NS = 20_000
"""While halt-polling, the longest stretch between two non-blocking polls of the fds."""


class Vcpu:
    def __init__(
        self,
        agent: GuestAgent,
        *,
        halt_poll_ns: int = ADAPTIVE,
        max_poll_ns: int = DEFAULT_MAX_POLL_NS,
    ) -> None:
        self.agent = agent
        self.adaptive = halt_poll_ns == ADAPTIVE
        self.max_poll_ns = max_poll_ns
        self.poll_ns = 0 if self.adaptive else max(0, halt_poll_ns)
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ I/O

    def read(self, addr: int, size: int) -> int:
        self.counters["exits"] += 1
        reply = self.agent.channel.call(wire.IoExit(write=0, len=size, addr=addr), wire.IoExitReply)
        return reply.value

    def write(self, addr: int, size: int, value: int) -> None:
        why = wire.access_error(size, addr, value)
        if why is not None:
            raise UsageError(f"write: {why}")
        if self.agent.io.write(False, addr, size, value):
            self.counters["fast_writes"] += 1  # the ioeventfd fired; no exit
            return
        self.counters["exits"] += 1
        self.agent.channel.call(
            wire.IoExit(write=1, len=size, addr=addr, value=value), wire.IoExitReply
        )

    # ------------------------------------------------------------------ halting

    def halt(self, until: Callable[[], bool], timeout: float = 30.0) -> bool:
        """Return once ``until()`` is true (True) or after ``timeout`` seconds (False).

        A stop (the broker channel at EOF, the VM destroyed, stdin at EOF, SIGTERM) ends
        the halt at once with False. Halting again once stopped, on a condition still
        false, raises :class:`~shared.errors.PeerGoneError`: nothing will ever wake this
        vCPU, and a workload that retries until its deadline would otherwise spin on a
        dead channel."""
        if until():
            return True
        loop = self.agent.loop
        if loop.stopping:
            raise PeerGoneError("the vCPU was stopped (broker gone, VM destroyed or told to quit)")
        clock = time.monotonic_ns
        start = now = clock()
        poll_end = start + self.poll_ns
        if self.poll_ns and loop.oversubscribed():
            # Tasks wait for a CPU: polling would take one from them. Sleep at once, as
            # KVM's halt-poll stops when its CPU has other work.
            self.counters["halt_polls_skipped"] += 1
            poll_end = start
        while now < poll_end:
            loop.poll_once(0)  # irqfds and notices, without blocking
            if loop.stopping:
                return False
            if yield_cpu():
                self.counters["halt_polls_contended"] += 1
                break  # another task wants this CPU: stop polling, sleep (see yield_cpu)
            # Then the condition alone for a slice: with a select per check, the syscall --
            # not the condition -- would set how soon the poll notices a completion.
            slice_end = min(poll_end, now + POLL_SLICE_NS)
            while True:
                if until():
                    # What ended the poll usually came with an interrupt: deliver what is
                    # pending now, as KVM's halt-poll does when it sees one.
                    loop.poll_once(0)
                    self.counters["halt_polls_ok"] += 1
                    return True
                now = clock()
                if now >= slice_end:
                    break
        self.counters["halts"] += 1
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0 or loop.stopping:
                return False
            if self.agent.devices_gone:
                # The device process died: unless it comes back within the grace period
                # (a restart), what we wait for never comes. Fail within that bound
                # instead of hanging until the timeout.
                lost = self.agent.lost_devices()
                if lost:
                    raise PeerGoneError(f"device {lost} is gone (its process exited)")
                left = min(left, self.agent.device_grace)  # wake up to re-check
            loop.poll_once(left)
        self._adapt(time.monotonic_ns() - start)
        return True

    def _adapt(self, blocked_ns: int) -> None:
        if not self.adaptive:
            return
        if blocked_ns <= self.max_poll_ns:
            # A short sleep: polling a little longer would have avoided it.
            self.poll_ns = min(self.max_poll_ns, max(GROW_START_NS, self.poll_ns * 2))
        else:
            self.poll_ns //= 2  # long sleeps: polling only burns the CPU
