"""The ``echo`` workload: send ``count`` frames of ``size`` bytes through the echo device
in batches and check that each comes back exactly once, in order, intact. Every frame carries its
sequence number and a checksum of its payload (written and verified with vectorized
numpy). The workload keeps the RX queue full, sends as fast as TX buffers free up, and
halts only when nothing can progress -- re-enabling interrupts first and re-checking the
rings, so no completion is ever slept through.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from guestemu import pci
from guestemu.drivers import GuestRam, PacketQueues, boot, find
from guestemu.workloads.frames import HEADER, check, stamp
from shared import pci_layout as pl
from shared.errors import VbusError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

class EchoSession:
    """An echo device brought up by the driver, and frames pushed through it."""

    def __init__(self, agent: GuestAgent, size: int, batch: int, qsize: int = 256, *,
                 event_idx: bool = True, always_kick: bool = False) -> None:
        self.agent = agent
        self.vcpu = vcpu = agent.vcpu
        self.ram = ram = GuestRam(agent.memory.map)
        self.functions = boot(vcpu)
        echo = find(self.functions, pl.DEVICE_ECHO)
        if not echo:
            raise VbusError("no echo device on the bus")
        self.fn = fn = echo[0]
        self.size = max(size, HEADER + 1)
        self.batch = batch
        self.queues = q = PacketQueues(vcpu, ram, fn, self.size, qsize, event_idx=event_idx,
                                       always_kick=always_kick)
        self.window = qsize  # frames outstanding at most; 1 = stop-and-wait (round trips)
        self.rtts: list[float] = []  # per frame, when window == 1
        # the rings and pools, for callers (and hostile tests) that need them
        self.tx, self.rx, self.tx_pool, self.rx_pool = q.tx, q.rx, q.tx_pool, q.rx_pool
        self.sent = self.received = 0
        self.elapsed = 0.0

    def transfer(self, count: int, timeout: float = 60.0) -> str | None:
        """Send ``count`` more frames and receive them back; the first discrepancy or None."""
        q = self.queues
        goal = self.received + count
        error: str | None = None
        start = time.monotonic()
        deadline = start + timeout
        sent_at = time.perf_counter()
        while self.received < goal and error is None:
            progressed = False
            n = min(self.batch, goal - self.sent, q.tx_room(),
                    self.window - (self.sent - self.received))
            if n > 0:
                frames = np.zeros((n, self.size), dtype=np.uint8)
                stamp(frames, np.arange(self.sent, self.sent + n))
                sent_at = time.perf_counter()
                q.send(frames)
                self.sent += n
                progressed = True
            frames, lens = q.receive()
            if len(frames):
                if self.window == 1:
                    self.rtts.append(time.perf_counter() - sent_at)
                error = check(frames, lens, self.received)
                self.received += len(frames)
                progressed = True
            if q.broken():
                error = f"ring broken: {q.broken()}"
            if not progressed and error is None and not q.wait(deadline):
                error = f"timed out: sent {self.sent}, received {self.received} of {goal}"
        self.elapsed += time.monotonic() - start
        return error

    def move_bar(self) -> int:
        """Reprogram BAR0 to a fresh address; the doorbells follow (ioeventfds rebound)."""
        fn = self.fn
        new = pci.BarAllocator(pl.Window(pl.MMIO_WINDOW.start + 0x100000,
                                         pl.MMIO_WINDOW.end)).allocate(fn.found.bar_size)
        fn.driver.program_bar(new)
        for q in (self.tx, self.rx):
            q.notify_addr = fn.driver.queue_notify_address(q.index)
        return new

    def move_vectors(self, first_gsi: int) -> list[int]:
        """Reprogram every MSI vector to new gsis (irqfds and shm-signals rebound)."""
        moved = []
        for vector in sorted(self.fn.gsis):
            gsi = first_gsi + vector
            self.fn.driver.program_msi(vector, gsi)
            self.fn.gsis[vector] = gsi
            moved.append(gsi)
        self.tx.gsi, self.rx.gsi = self.fn.gsis[0], self.fn.gsis[1]
        return moved

    def result(self, error: str | None, **extra: Any) -> dict[str, Any]:
        tx, rx = self.tx, self.rx
        elapsed = max(self.elapsed, 1e-9)
        return {"workload": "echo", "ok": error is None and self.received == self.sent,
                "error": error, "frames": self.received, "bytes": self.received * self.size,
                "elapsed": elapsed, "frames_per_s": self.received / elapsed,
                "mb_per_s": self.received * self.size / elapsed / 1e6,
                "doorbells": tx.counters["doorbells"] + rx.counters["doorbells"],
                "doorbells_suppressed": (tx.counters["doorbells_suppressed"]
                                         + rx.counters["doorbells_suppressed"]),
                "interrupts": {str(k): v for k, v in self.agent.irq.wakeups.items()},
                "vcpu": dict(self.vcpu.counters), **extra}


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    """The echo workload: ``count`` frames of ``size`` bytes in batches of ``batch``. With
    ``rebind`` the BAR and then the MSI vectors move between three equal thirds of the
    transfer, and every frame must still arrive."""
    count = int(params.get("count", 1000))
    rebind = bool(params.get("rebind", False))
    notify = str(params.get("notify", "event_idx"))
    if notify not in ("always", "event_idx"):
        raise VbusError(f"echo: notify must be 'always' or 'event_idx', not {notify!r}")
    session = EchoSession(agent, int(params.get("size", 64)), int(params.get("batch", 32)),
                          int(params.get("qsize", 256)), event_idx=notify == "event_idx",
                          always_kick=notify == "always")
    session.window = max(1, int(params.get("window", session.window)))
    agent.emit("echo_ready")
    if not rebind:
        error = session.transfer(count)
        extra: dict[str, Any] = {}
        if session.rtts:
            rtt = np.array(session.rtts) * 1e6
            extra = {"rtt_p50_us": float(np.percentile(rtt, 50)),
                     "rtt_p99_us": float(np.percentile(rtt, 99)), "rtt_samples": len(rtt)}
        return session.result(error, **extra)
    third = max(1, count // 3)
    error = session.transfer(third)
    bar = session.move_bar() if error is None else None
    error = error or session.transfer(third)
    gsis = session.move_vectors(first_gsi=16) if error is None else []
    error = error or session.transfer(count - 2 * third)
    return session.result(error, moved_bar=bar, moved_gsis=gsis)
