"""Guest drivers: bring up the PCI-like bus, then virtqueues on it.

Theory of operation
-------------------
:func:`boot` enumerates the bus through config-space exits, gives every function a BAR
address (the VMM binds the queue doorbells as ioeventfds there) and programs each MSI
vector with a fresh gsi (the VMM binds an irqfd to it and hands the same eventfd to the
device as its shm-signal). :class:`Virtqueue` allocates a ring in guest RAM, programs it
through the BAR registers and wraps a :class:`~shared.virtio.DriverRing`; a kick is a write
of the queue index to its notify register -- caught by the ioeventfd, so no exit -- and
happens only when the ring says the device asked for one (EVENT_IDX suppression).
Counters record doorbells rung vs suppressed and interrupts taken.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from guestemu import pci
from shared import pci_layout as pl
from shared.errors import UsageError
from shared.frames import HEADER, check, fault_message, stamp
from shared.memory import GuestMemoryMap
from shared.virtio import DRIVER_SCALAR_MAX, DriverRing, RingLayout
from shared.virtio.args import STAGE_DONE, STAGE_START

if TYPE_CHECKING:
    from guestemu.vcpu import Vcpu

F_EVENT_IDX = 1
_TAIL_TABLE = 32
"""Bytes of the two-entry indirect table of a buffer posted with ``indirect_tail``."""
SMALL_BATCH = DRIVER_SCALAR_MAX
"""Posting at most this many buffers uses lists of ints (the ring's scalar path)."""


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

    def __init__(
        self,
        vcpu: Vcpu,
        ram: GuestRam,
        fn: Function,
        index: int,
        size: int,
        vector: int,
        *,
        event_idx: bool,
        jit: bool | None = False,
    ) -> None:
        """``jit``: None runs the ring on the compiled kernels when ``VBUSEMU_JIT`` allows
        (the packet queues); False (low-rate queues) keeps the reference path, so a guest
        that drives no packet queue never imports numba."""
        self.vcpu = vcpu
        self.fn = fn
        self.index = index
        self.layout = RingLayout(size)
        gpa = ram.alloc(self.layout.size, align=4096)
        self.ring = DriverRing(
            ram.view(gpa, self.layout.size), self.layout, event_idx=event_idx, jit=jit
        )
        desc, avail, used = self.layout.addresses(gpa)
        if not fn.driver.setup_queue(index, size, desc, avail, used, vector):
            raise UsageError(f"the device refused queue {index}")
        self.gsi = fn.gsis[vector]
        self.notify_addr = fn.driver.queue_notify_address(index)
        self.counters: Counter[str] = Counter()
        self.always_kick = False  # benchmarks' "notify always" mode ignores suppression

    def kick(self) -> bool:
        """Ring the doorbell if the ring asks (or always, if forced); whether it asked."""
        # kick_needed() runs even when forced: it keeps the ring's last-kick bookkeeping
        needed = self.ring.kick_needed()
        self.doorbell(needed)
        return needed

    def doorbell(self, needed: bool) -> None:
        """Ring the doorbell if the ring said it is ``needed`` (or always, if forced)."""
        if needed or self.always_kick:
            self.vcpu.write(self.notify_addr, pl.NOTIFY_SIZE, self.index)
            self.counters["doorbells"] += 1
        else:
            self.counters["doorbells_suppressed"] += 1


class BufferPool:
    """``count`` fixed-size buffers in guest RAM, as one 2-D numpy view, and a stack of the
    free ones (numpy, so the fused kernels take and give buffers in place)."""

    def __init__(self, ram: GuestRam, count: int, size: int) -> None:
        self.size = size
        self.base = ram.alloc(count * size, align=4096)
        self.data = ram.view(self.base, count * size).reshape(count, size)
        # The guest kernel hands out zeroed pages: touching them now backs them with memory
        # (as a running guest's RAM is), instead of page faults inside the first transfers.
        self.data.fill(0)
        self.flat = self.data.reshape(-1).data  # byte-level memoryview (small frames)
        self.stack = np.arange(count - 1, -1, -1, dtype=np.int64)  # free slots, top last
        self.free = count  # how many: stack[:free]

    def addrs(self, slots: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any] = np.uint64(self.base) + slots.astype(np.uint64) * np.uint64(
            self.size
        )
        return out

    def take(self, n: int) -> np.ndarray[Any, Any]:
        """The top ``n`` free slots, the top first (as popping them one by one)."""
        if n > self.free:
            raise UsageError(f"{n} buffers wanted, {self.free} free")
        top = self.free
        self.free = top - n
        out: np.ndarray[Any, Any] = self.stack[top - n : top][::-1].copy()
        return out

    def take_list(self, n: int) -> list[int]:
        """:meth:`take` as a list of ints (few buffers: cheaper than numpy arrays)."""
        if n > self.free:
            raise UsageError(f"{n} buffers wanted, {self.free} free")
        top = self.free
        self.free = top - n
        taken: list[int] = self.stack[top - n : top].tolist()
        taken.reverse()
        return taken

    def addr_list(self, slots: list[int]) -> list[int]:
        return [self.base + s * self.size for s in slots]

    def give(self, slots: np.ndarray[Any, Any] | list[int]) -> None:
        n = len(slots)
        self.stack[self.free : self.free + n] = slots
        self.free += n


class PacketQueues:
    """A TX/RX queue pair of fixed-size buffers (queues 0 and 1, vectors 0 and 1): the
    driver half that echo and venet ports share. RX is kept full; TX buffers come back as
    the device completes them; :meth:`wait` halts with interrupts on, after a re-check."""

    def __init__(
        self,
        vcpu: Vcpu,
        ram: GuestRam,
        fn: Function,
        size: int,
        qsize: int = 256,
        *,
        event_idx: bool = True,
        always_kick: bool = False,
        indirect_tail: bool = False,
    ) -> None:
        self.vcpu = vcpu
        self.fn = fn
        accepted = start_device(fn, F_EVENT_IDX if event_idx else 0)
        event_idx = bool(accepted & F_EVENT_IDX)
        self.tx = Virtqueue(vcpu, ram, fn, 0, qsize, vector=0, event_idx=event_idx, jit=None)
        self.rx = Virtqueue(vcpu, ram, fn, 1, qsize, vector=1, event_idx=event_idx, jit=None)
        self.tx.always_kick = self.rx.always_kick = always_kick
        # interrupts only while halted waiting for something (see wait())
        self.tx.ring.disable_interrupts()
        self.rx.ring.disable_interrupts()
        fn.driver.set_driver_ok()
        self.size = size
        # With ``indirect_tail`` every buffer is posted as a chain of one normal descriptor
        # followed by an indirect one whose table holds the buffer's other two pieces (virtio
        # 1.2, 2.7.5.3.2); two descriptors per buffer, so half as many buffers.
        self.indirect_tail = indirect_tail
        count = max(1, qsize // 2) if indirect_tail else qsize
        if indirect_tail and size < 3:
            raise UsageError(f"indirect_tail needs buffers of >= 3 bytes, not {size}")
        self.tx_pool = BufferPool(ram, count, size)
        self.rx_pool = BufferPool(ram, count, size)
        self._tables: dict[int, tuple[int, np.ndarray[Any, Any]]] = {}
        if indirect_tail:
            for q in (self.tx, self.rx):  # one 2-entry table per buffer, 16-aligned
                gpa = ram.alloc(count * _TAIL_TABLE, align=16)
                self._tables[q.index] = (gpa, ram.view(gpa, count * _TAIL_TABLE))
        self.tx_slot = np.full(qsize, -1, dtype=np.int64)  # head -> buffer slot
        self.rx_slot = np.full(qsize, -1, dtype=np.int64)
        self.tx_completed = 0  # TX buffers the device has given back, in all
        # Whether send_frames and receive_frames run a fused kernel per step: the rings are
        # on the compiled path and post single descriptors.
        self.fused = (
            self.tx.ring.kernels is not None
            and self.rx.ring.kernels is not None
            and not indirect_tail
            and size > HEADER
        )
        self.post_rx()

    def post_rx(self) -> None:
        """Post every free RX buffer (none once the ring broke: the caller reports it)."""
        n = self.rx_pool.free
        if n and self.rx.ring.broken is None:
            self._post(self.rx, self.rx_pool, self.rx_slot, self._take(self.rx_pool, n), True)
            self.rx.kick()

    @staticmethod
    def _take(pool: BufferPool, n: int) -> list[int] | np.ndarray[Any, Any]:
        """A few buffers as a list of ints (the ring's scalar path), many as an array."""
        return pool.take_list(n) if n <= SMALL_BATCH else pool.take(n)

    def _post(
        self,
        q: Virtqueue,
        pool: BufferPool,
        slot_of: np.ndarray[Any, Any],
        slots: list[int] | np.ndarray[Any, Any],
        writable: bool,
    ) -> None:
        """Post whole buffers ``slots`` of ``pool`` on ``q`` and remember head -> slot."""
        if self.indirect_tail:
            slot_list = slots if isinstance(slots, list) else slots.tolist()
            self._post_tail(q, pool, slot_of, slot_list, [self.size] * len(slot_list), writable)
        elif isinstance(slots, list):
            heads = q.ring.add_batch(pool.addr_list(slots), [self.size] * len(slots), writable)
            for h, slot in zip(heads.tolist(), slots, strict=True):
                slot_of[h] = slot
        else:
            heads = q.ring.add_batch(pool.addrs(slots), np.full(len(slots), self.size), writable)
            slot_of[heads] = slots

    def _post_tail(
        self,
        q: Virtqueue,
        pool: BufferPool,
        slot_of: np.ndarray[Any, Any],
        slots: list[int],
        lens: list[int],
        writable: bool,
    ) -> None:
        """Post each buffer as a normal descriptor (its first quarter) followed by an
        indirect one, whose table (the slot's own) holds the rest in two pieces."""
        gpa, view = self._tables[q.index]
        for slot, n in zip(slots, lens, strict=True):
            addr = pool.base + slot * self.size
            h = max(1, n // 4)
            m = h + max(1, (n - h) // 2)
            off = slot * _TAIL_TABLE
            head = q.ring.add_indirect(
                view[off : off + _TAIL_TABLE],
                gpa + off,
                [(addr + h, m - h, writable), (addr + m, n - m, writable)],
                leading=[(addr, h, writable)],
            )
            slot_of[head] = slot

    def send(self, frames: np.ndarray[Any, Any]) -> bool:
        """Post whole ``frames`` (N x size); the caller checked :meth:`tx_room`. Whether
        the ring asked for a kick."""
        slots = self._take(self.tx_pool, len(frames))
        self.tx_pool.data[slots] = frames
        # store->store: the frames are in guest RAM before the descriptors that publish them
        self._post(self.tx, self.tx_pool, self.tx_slot, slots, False)
        return self.tx.kick()

    def send_rows(self, n: int, fill: Callable[[np.ndarray[Any, Any], int], None]) -> None:
        """Post ``n`` TX buffers after ``fill(row, i)`` wrote frame ``i`` straight into its
        buffer ``row`` in guest RAM (no staging array, no extra copy)."""
        slots = self.tx_pool.take_list(n)
        data = self.tx_pool.data
        try:
            for i, slot in enumerate(slots):
                fill(data[slot], i)
        except BaseException:
            self.tx_pool.give(slots[::-1])  # nothing posted: the buffers are free again
            raise
        self._post(self.tx, self.tx_pool, self.tx_slot, slots, False)
        self.tx.kick()

    def send_bytes(self, frames: list[bytes]) -> None:
        """Post small ``frames`` given as ``bytes`` (each at most the buffer size, posted
        with its own length): one slice store each, straight into a free TX buffer --
        cheaper than numpy for a few small frames. The caller checked :meth:`tx_room`."""
        pool, size, ring = self.tx_pool, self.size, self.tx.ring
        slots = pool.take_list(len(frames))
        flat = pool.flat
        try:
            for slot, frame in zip(slots, frames, strict=True):
                if len(frame) > size:
                    raise UsageError(f"a {len(frame)}-byte frame in {size}-byte buffers")
                flat[slot * size : slot * size + len(frame)] = frame
            # store->store: the frames are in guest RAM before the descriptors publish them
            if self.indirect_tail:
                self._post_tail(self.tx, pool, self.tx_slot, slots, [len(f) for f in frames], False)
            elif len(slots) == 1:  # one frame per kick: the ring's single-buffer path
                self.tx_slot[ring.add_one(pool.base + slots[0] * size, len(frames[0]))] = slots[0]
            else:
                heads = ring.add_batch(pool.addr_list(slots), [len(f) for f in frames], False)
                for h, slot in zip(heads.tolist(), slots, strict=True):
                    self.tx_slot[h] = slot
        except BaseException:
            pool.give(slots[::-1])  # nothing posted: the buffers are free again
            raise
        self.tx.kick()

    def tx_room(self) -> int:
        """Free TX buffers, after taking back what the device completed."""
        if self.tx.ring.has_used():  # the cheap poll first: usually there is nothing
            ids, _ = self.tx.ring.get_used()
            if len(ids):
                self.tx_pool.give(self.tx_slot[ids])
                self.tx_completed += len(ids)
        return self.tx_pool.free

    # -------------------------------------------------- test frames (shared.frames)

    def send_frames(self, first: int, max_n: int, limit: int = 0) -> int:
        """Post test frames ``first, first + 1...`` (:mod:`shared.frames`), each written
        straight into its buffer, in steps: take back completed TX buffers, post up to
        ``max_n`` frames as one batch, kick if the ring asks -- and, while it does not ask,
        step again until ``limit`` frames in all (default: one step). How many were posted.

        Each batch is published and decided on alone, exactly as separate calls would;
        the steps only save the interpreter's round trips between them. A forced doorbell
        (``always_kick``) rings after every batch, so there it is one step per call. On the
        compiled path one fused kernel does the steps
        (:func:`~shared.virtio.fused.driver_send_frames`); the reference is a step at a
        time: :meth:`tx_room`, :func:`~shared.frames.stamp` and :meth:`send`."""
        ring, pool, vq = self.tx.ring, self.tx_pool, self.tx
        limit = max_n if vq.always_kick else max(limit, max_n)
        total = 0
        kern = ring.kernels
        if self.fused and kern is not None and ring.broken is None:
            stage, taken, posted, kick, batches = kern.send_frames(
                ring, pool.data, pool.stack, pool.free, self.tx_slot, pool.base, first, max_n, limit
            )
            pool.free += taken - posted
            self.tx_completed += taken
            total = posted
            # every batch before the last needed no kick; the last one's decision is ``kick``
            # if the steps completed -- if not (declined part-way: an unusual ring), the
            # reference finishes them
            done = stage == STAGE_DONE
            if batches > done:
                vq.counters["doorbells_suppressed"] += batches - done
            if done:
                if batches:
                    vq.doorbell(kick)
                return total
        while True:  # (a step takes back completions even when it has nothing to post)
            n = min(max_n, limit - total, self.tx_room())
            if n <= 0 or ring.broken is not None:  # (a broken ring is the caller's to report)
                return total
            frames = np.empty((n, self.size), dtype=np.uint8)
            stamp(frames, np.arange(first + total, first + total + n))
            total += n
            if self.send(frames) or total >= limit:
                return total

    def receive_frames(self, first: int) -> tuple[int, str | None]:
        """Take the received test frames, verify them (expected ``first, first + 1...``;
        :func:`~shared.frames.check`), repost their buffers and kick if the ring asks: how
        many, and the first discrepancy or None. On the compiled path one fused kernel
        verifies them in place (:func:`~shared.virtio.fused.driver_receive_frames`); the
        reference is :meth:`receive` and :func:`~shared.frames.check`."""
        ring, pool = self.rx.ring, self.rx_pool
        kern = ring.kernels
        if self.fused and kern is not None and ring.broken is None:
            stage, taken, posted, kick, fault, index, value = kern.receive_frames(
                ring, pool.data, pool.stack, pool.free, self.rx_slot, pool.base, first
            )
            pool.free += taken - posted
            if stage != STAGE_START:
                error = fault_message(fault, first + index, value, self.size) if taken else None
                if stage == STAGE_DONE:
                    if posted:
                        self.rx.doorbell(kick)
                else:
                    self.post_rx()  # declined at the repost: the reference posts
                return taken, error
        frames, lens = self.receive()
        return len(frames), (check(frames, lens, first) if len(frames) else None)

    def receive(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Received frames (copies) and their lengths; the buffers are reposted at once."""
        ids, lens = self.rx.ring.get_used()
        if not len(ids):
            return np.zeros((0, self.size), np.uint8), np.zeros(0, np.uint32)
        slots = self.rx_slot[ids]
        frames = self.rx_pool.data[slots]  # fancy indexing copies
        self.rx_pool.give(slots)
        self.post_rx()
        return frames, lens

    def receive_rows(self) -> tuple[list[np.ndarray[Any, Any]], list[int], list[int]]:
        """Received frames *in place*: ``(rows, lens, slots)``, each row a view of its RX
        buffer in guest RAM. The buffers stay the caller's until :meth:`release_rx`."""
        ids, lens = self.rx.ring.get_used()
        slots: list[int] = self.rx_slot[ids].tolist()
        data = self.rx_pool.data
        return [data[s] for s in slots], lens.tolist(), slots

    def release_rx(self, slots: list[int]) -> None:
        """Repost RX buffers taken by :meth:`receive_rows`."""
        if slots:
            self.rx_pool.give(slots)
            self.post_rx()

    def broken(self) -> str | None:
        return self.tx.ring.broken or self.rx.ring.broken

    def wait(self, deadline: float, *, need_tx: bool | None = None) -> bool:
        """Halt until RX has completions -- or TX, when ``need_tx`` (default: when no TX
        buffer is free); interrupts on for those, re-check first. TX completions are
        otherwise reclaimed lazily: being woken for them would double the wakeups of a
        request/response exchange."""
        if need_tx is None:
            need_tx = not self.tx_pool.free
        if self.rx.ring.enable_interrupts() | (need_tx and self.tx.ring.enable_interrupts()):
            return True
        ok = self.vcpu.halt(
            lambda: self.rx.ring.has_used() or (need_tx and self.tx.ring.has_used()),
            max(0.0, deadline - time.monotonic()),
        )
        self.rx.ring.disable_interrupts()
        if need_tx:
            self.tx.ring.disable_interrupts()
        return ok

    def counters(self) -> dict[str, int]:
        return {
            "doorbells": self.tx.counters["doorbells"] + self.rx.counters["doorbells"],
            "doorbells_suppressed": (
                self.tx.counters["doorbells_suppressed"] + self.rx.counters["doorbells_suppressed"]
            ),
        }


def find(functions: list[Function], device_id: int) -> list[Function]:
    return [f for f in functions if f.found.device_id == device_id]


def start_device(fn: Function, want: int = F_EVENT_IDX) -> int:
    """Reset, negotiate ``want`` (EVENT_IDX by default); returns the accepted features."""
    fn.driver.reset()
    accepted = fn.driver.negotiate(want)
    if accepted is None:
        raise UsageError(f"function {fn.found.slot} refused its features")
    return accepted
