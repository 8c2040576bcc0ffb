"""The guest's console driver, and the ``console`` workload that prints boot messages.

:class:`Console` drives a ``console`` device (:mod:`hostemu.devices.console`) found by
:func:`guestemu.drivers.boot`: it starts the function, sets up queue 0 (TX) and offers
:meth:`Console.write` and :meth:`Console.flush` to any workload. Text is UTF-8; the host
shows it line by line, a line appearing once its ``\\n`` arrives.

Theory of operation
-------------------
``write`` copies the text into fixed-size buffers of a pool in guest RAM (one chunk per
buffer, vectorized), posts them as one batch, and kicks (EVENT_IDX may suppress the
doorbell). It returns without waiting for the device -- unless every buffer is in flight,
then it waits for some to come back (back-pressure: text is never dropped by the guest).
Completed buffers are reclaimed opportunistically on every ``write``. ``flush`` waits until
the device has consumed everything posted.

Interrupts stay *disabled* while the console is not waiting: a console that only prints
does not want an interrupt per line. Before halting, the driver re-enables them and
re-checks the ring (:meth:`~shared.virtio.DriverRing.enable_interrupts`), so a completion
that raced the decision to sleep is never slept through; after waking it disables them
again.

Invariants
----------
* A pool buffer is either free or owned by exactly one chain in flight
  (``slot_of[head]``); ``len(free) + ring.in_flight == qsize``.
* Bytes reach the device in the order ``write`` was called with them.
* A broken ring (the device misbehaved) or a wait longer than ``timeout`` raises
  :class:`~shared.errors.VbusError`; a workload turns it into ``ok: false``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from guestemu.drivers import (
    F_EVENT_IDX,
    BufferPool,
    Function,
    GuestRam,
    Virtqueue,
    boot,
    find,
    start_device,
)
from shared import pci_layout as pl
from shared.errors import ConfigError, VbusError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent
    from guestemu.vcpu import Vcpu

TX = 0
DEFAULT_QSIZE = 64
DEFAULT_BUF_SIZE = 512


class Console:
    """The driver of one console function (already enumerated by :func:`boot`)."""

    def __init__(
        self,
        vcpu: Vcpu,
        ram: GuestRam,
        fn: Function,
        *,
        qsize: int = DEFAULT_QSIZE,
        buf_size: int = DEFAULT_BUF_SIZE,
        timeout: float = 30.0,
    ) -> None:
        if fn.found.device_id != pl.DEVICE_CONSOLE:
            raise ConfigError(
                f"function {fn.found.slot} is not a console (device id {fn.found.device_id})"
            )
        if buf_size < 1:
            raise ConfigError(f"console buffers need at least 1 byte, got {buf_size}")
        self.vcpu = vcpu
        self.fn = fn
        self.timeout = timeout
        event_idx = bool(start_device(fn) & F_EVENT_IDX)
        self.tx = Virtqueue(vcpu, ram, fn, TX, qsize, vector=0, event_idx=event_idx)
        fn.driver.set_driver_ok()
        self.tx.ring.disable_interrupts()  # wanted only while waiting (see the docstring)
        self.pool = BufferPool(ram, qsize, buf_size)
        self.slot_of = np.full(qsize, -1, dtype=np.int64)  # head -> pool slot
        self.counters: Counter[str] = Counter()

    @classmethod
    def first(cls, vcpu: Vcpu, ram: GuestRam, functions: list[Function], **kw: Any) -> Console:
        """The driver of the first console on the bus; :class:`VbusError` if there is none."""
        consoles = find(functions, pl.DEVICE_CONSOLE)
        if not consoles:
            raise VbusError("no console device on the bus")
        return cls(vcpu, ram, consoles[0], **kw)

    # ------------------------------------------------------------------ output

    def write(self, text: str) -> None:
        """Post ``text`` (UTF-8) to the device and kick; waits only if no buffer is free."""
        data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        size = self.pool.size
        pos = 0
        while pos < len(data):
            self.reclaim()
            if not self.pool.free:
                self._wait(lambda: bool(self.pool.free))
                continue
            want = -(-(len(data) - pos) // size)  # buffers still needed (ceil)
            n = min(want, self.pool.free)
            take = min(n * size, len(data) - pos)
            chunks = np.zeros(n * size, dtype=np.uint8)
            chunks[:take] = data[pos : pos + take]
            lens = np.minimum(size, take - size * np.arange(n))
            slots = self.pool.take(n)
            self.pool.data[slots] = chunks.reshape(n, size)
            heads = self.tx.ring.add_batch(self.pool.addrs(slots), lens, False)
            self.slot_of[heads] = slots
            self.tx.kick()
            pos += take
            self.counters["buffers"] += n
        self.counters["bytes"] += len(data)

    def reclaim(self) -> int:
        """Take back the buffers the device consumed; returns how many."""
        ids, _ = self.tx.ring.get_used()
        if self.tx.ring.broken:
            raise VbusError(f"console ring broken: {self.tx.ring.broken}")
        if len(ids):
            slots = self.slot_of[ids]
            self.slot_of[ids] = -1
            self.pool.give(slots)
        return len(ids)

    def flush(self) -> None:
        """Return once the device has consumed every byte written so far."""
        self.reclaim()
        while self.tx.ring.in_flight:
            self._wait(lambda: self.tx.ring.in_flight == 0)

    def _wait(self, done: Callable[[], bool]) -> None:
        """Halt until the device returns buffers, then reclaim them (and check ``done``)."""
        ring = self.tx.ring
        while not done():
            if self.reclaim():
                continue
            # Re-enable, barrier, re-check inside: completions that raced us are seen now.
            if ring.enable_interrupts():
                ring.disable_interrupts()
                continue
            woke = self.vcpu.halt(lambda: ring.has_used() or ring.broken is not None, self.timeout)
            ring.disable_interrupts()
            self.counters["waits"] += 1
            if not woke:
                raise VbusError(
                    f"console: the device consumed nothing for {self.timeout}s "
                    f"({ring.in_flight} buffers in flight)"
                )

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "doorbells": self.tx.counters["doorbells"],
            "doorbells_suppressed": self.tx.counters["doorbells_suppressed"],
        }


def default_lines(functions: list[Function]) -> list[str]:
    return [
        "vbusemu guest booting",
        f"pci: {len(functions)} function{'' if len(functions) == 1 else 's'}",
        "console: ready",
    ]


PARAMS = frozenset({"lines", "qsize", "buf_size"})


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    """Boot, print ``params["lines"]`` (default: a few boot messages) on the first console,
    wait until the device consumed them. ``qsize`` and ``buf_size`` size the TX queue and
    its buffers (a small ``buf_size`` makes lines span buffers)."""
    unknown = set(params) - PARAMS
    if unknown:
        raise ConfigError(
            f"console workload: unknown parameters {sorted(unknown)} (known: {sorted(PARAMS)})"
        )
    ram = GuestRam(agent.memory.map)
    functions = boot(agent.vcpu)
    lines = params.get("lines", default_lines(functions))
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise ConfigError("console workload: lines must be a list of strings")
    console = Console.first(
        agent.vcpu,
        ram,
        functions,
        qsize=int(params.get("qsize", DEFAULT_QSIZE)),
        buf_size=int(params.get("buf_size", DEFAULT_BUF_SIZE)),
    )
    for line in lines:
        console.write(line + "\n")
    console.flush()
    stats = console.stats()
    return {
        "workload": "console",
        "ok": True,
        "error": None,
        "lines": len(lines),
        "bytes": stats.get("bytes", 0),
        "doorbells": stats["doorbells"],
        "doorbells_suppressed": stats["doorbells_suppressed"],
        "console": stats,
        "interrupts": {str(k): v for k, v in agent.irq.wakeups.items()},
        "vcpu": dict(agent.vcpu.counters),
    }
