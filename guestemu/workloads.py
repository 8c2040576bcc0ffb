"""Guest workloads: what a booted guest does with its devices.

``echo``: send ``count`` frames of ``size`` bytes through the echo device in batches and
check that each comes back exactly once, in order, intact. Every frame carries its
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
from guestemu.drivers import BufferPool, GuestRam, Virtqueue, boot, find, start_device
from shared import pci_layout as pl
from shared.errors import VbusError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

HEADER = 8  # seq u32, checksum u32


def stamp(frames: np.ndarray[Any, Any], seqs: np.ndarray[Any, Any]) -> None:
    """Fill ``frames`` (N x size) with a payload derived from each seq, then its header."""
    size = frames.shape[1]
    body = (seqs[:, None].astype(np.uint32) * np.uint32(2654435761)
            + np.arange(size - HEADER, dtype=np.uint32)[None, :]) >> np.uint32(24)
    frames[:, HEADER:] = body.astype(np.uint8)
    checksum = frames[:, HEADER:].sum(axis=1, dtype=np.uint32)
    frames[:, 0:4] = seqs.astype("<u4")[:, None].view(np.uint8).reshape(-1, 4)
    frames[:, 4:8] = checksum.astype("<u4")[:, None].view(np.uint8).reshape(-1, 4)


def check(frames: np.ndarray[Any, Any], lens: np.ndarray[Any, Any],
          expect_first: int) -> str | None:
    """The first discrepancy in received frames, or None if all are intact and in order."""
    n, size = frames.shape
    seqs = frames[:, 0:4].copy().view("<u4").reshape(n)
    want = np.arange(expect_first, expect_first + n, dtype=np.uint32)
    bad = np.nonzero(seqs != want)[0]
    if bad.size:
        i = int(bad[0])
        return f"frame {expect_first + i}: got sequence number {int(seqs[i])}"
    short = np.nonzero(lens != size)[0]
    if short.size:
        i = int(short[0])
        return f"frame {expect_first + i}: {int(lens[i])} bytes, expected {size}"
    sums = frames[:, 4:8].copy().view("<u4").reshape(n)
    actual = frames[:, HEADER:].sum(axis=1, dtype=np.uint32)
    bad = np.nonzero(sums != actual)[0]
    if bad.size:
        return f"frame {expect_first + int(bad[0])}: checksum mismatch (payload corrupted)"
    return None


class EchoSession:
    """An echo device brought up by the driver, and frames pushed through it."""

    def __init__(self, agent: GuestAgent, size: int, batch: int, qsize: int = 256) -> None:
        self.agent = agent
        self.vcpu = vcpu = agent.vcpu
        self.ram = ram = GuestRam(agent.memory.map)
        self.functions = boot(vcpu)
        echo = find(self.functions, pl.DEVICE_ECHO)
        if not echo:
            raise VbusError("no echo device on the bus")
        self.fn = fn = echo[0]
        event_idx = bool(start_device(fn) & 1)
        self.tx = Virtqueue(vcpu, ram, fn, 0, qsize, vector=0, event_idx=event_idx)
        self.rx = Virtqueue(vcpu, ram, fn, 1, qsize, vector=1, event_idx=event_idx)
        fn.driver.set_driver_ok()
        self.size = max(size, HEADER + 1)
        self.batch = batch
        self.tx_pool = BufferPool(ram, qsize, self.size)
        self.rx_pool = BufferPool(ram, qsize, self.size)
        self.tx_slot = np.full(qsize, -1, dtype=np.int64)
        self.rx_slot = np.full(qsize, -1, dtype=np.int64)
        self.sent = self.received = 0
        self.elapsed = 0.0
        self._post_rx()

    def _post_rx(self) -> None:
        n = len(self.rx_pool.free)
        if n:
            slots = self.rx_pool.take(n)
            heads = self.rx.ring.add_batch(self.rx_pool.addrs(slots), np.full(n, self.size),
                                           True)
            self.rx_slot[heads] = slots
            self.rx.kick()

    def transfer(self, count: int, timeout: float = 60.0) -> str | None:
        """Send ``count`` more frames and receive them back; the first discrepancy or None."""
        tx, rx, tx_pool, rx_pool = self.tx, self.rx, self.tx_pool, self.rx_pool
        goal = self.received + count
        error: str | None = None
        start = time.monotonic()
        deadline = start + timeout
        while self.received < goal and error is None:
            progressed = False
            n = min(self.batch, goal - self.sent, len(tx_pool.free))
            if n > 0:
                slots = tx_pool.take(n)
                frames = tx_pool.data[slots]  # fancy indexing copies: stamp, then write back
                stamp(frames, np.arange(self.sent, self.sent + n))
                tx_pool.data[slots] = frames
                heads = tx.ring.add_batch(tx_pool.addrs(slots), np.full(n, self.size), False)
                self.tx_slot[heads] = slots
                tx.kick()
                self.sent += n
                progressed = True
            ids, _ = tx.ring.get_used()
            if len(ids):
                tx_pool.give(self.tx_slot[ids])
                progressed = True
            ids, lens = rx.ring.get_used()
            if len(ids):
                slots = self.rx_slot[ids]
                error = check(rx_pool.data[slots], lens, self.received)
                self.received += len(ids)
                rx_pool.give(slots)
                self._post_rx()
                progressed = True
            if tx.ring.broken or rx.ring.broken:
                error = f"ring broken: {tx.ring.broken or rx.ring.broken}"
            if progressed or error:
                continue
            # Nothing to do: ask for interrupts, re-check, then halt.
            if rx.ring.enable_interrupts() | tx.ring.enable_interrupts():
                continue
            if not self.vcpu.halt(lambda: rx.ring.has_used() or tx.ring.has_used(),
                                  max(0.0, deadline - time.monotonic())):
                error = f"timed out: sent {self.sent}, received {self.received} of {goal}"
            rx.ring.disable_interrupts()
            tx.ring.disable_interrupts()
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


def run_echo(agent: GuestAgent, count: int, size: int, batch: int,
             rebind: bool = False) -> dict[str, Any]:
    """The echo workload; with ``rebind`` the BAR and then the MSI vectors move between
    three equal thirds of the transfer, and every frame must still arrive."""
    session = EchoSession(agent, size, batch)
    if not rebind:
        return session.result(session.transfer(count))
    third = max(1, count // 3)
    error = session.transfer(third)
    bar = session.move_bar() if error is None else None
    error = error or session.transfer(third)
    gsis = session.move_vectors(first_gsi=16) if error is None else []
    error = error or session.transfer(count - 2 * third)
    return session.result(error, moved_bar=bar, moved_gsis=gsis)
