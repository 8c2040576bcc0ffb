"""The ring's scalar paths (few chains: plain ints through memoryview/struct) against its
vectorized paths (numpy), which stay the reference.

Two identical guest memories each get a driver and a device over the same ring layout; one
pair runs with the scalar paths on (the default), the other with them off. Random programs
-- hostile ones included: descriptors, ring entries and indices rewritten, used entries
forged -- drive both, and after every step the results, the errors (type and message), the
broken reasons, every byte of guest memory and the private bookkeeping must be identical.
No processes, no fds.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.errors import UsageError
from shared.memory import GuestMemoryMap
from shared.virtio import (
    DESC_DTYPE,
    DRIVER_SCALAR_MAX,
    INDEX_MASK,
    SCALAR_MAX,
    USED_ELEM_DTYPE,
    Batch,
    DeviceRing,
    DriverRing,
    RingLayout,
)

RING = 0x0000
BUF = 0x10000
TABLES = 0x8000  # 64 indirect tables of 64 bytes
SLOT1 = 0x200000  # a second RAM slot after a gap
ROM = 0x300000
TOP = 1 << 64


def memory() -> GuestMemoryMap:
    mem = GuestMemoryMap()
    ram = np.zeros(0x40000, dtype=np.uint8)
    ram[BUF:] = np.arange(0x40000 - BUF, dtype=np.uint32).astype(np.uint8)
    mem.add(0, 0, ram)
    mem.add(1, SLOT1, np.zeros(0x1000, dtype=np.uint8))
    rom = np.full(0x1000, 7, dtype=np.uint8)
    rom.flags.writeable = False
    mem.add(2, ROM, rom)
    return mem


class Side:
    """One driver + device pair over its own memory; ``scalar`` picks the paths, ``jit``
    whether batches beyond the scalar path go to the compiled kernels."""

    def __init__(
        self, q: int, event_idx: bool, start: int, scalar: bool, jit: bool = False
    ) -> None:
        self.mem = memory()
        self.layout = RingLayout(q)
        self.area = self.mem.translate(RING, self.layout.size)
        self.driver = DriverRing(
            self.area,
            self.layout,
            event_idx=event_idx,
            start_index=start,
            fast_path=scalar,
            jit=jit,
        )
        self.device = DeviceRing.from_layout(
            self.mem,
            RING,
            self.layout,
            event_idx=event_idx,
            start_index=start,
            fast_path=scalar,
            jit=jit,
        )
        self.batches: list[Batch] = []

    def ram(self) -> bytes:
        return b"".join(self.mem.read(s.gpa, s.size) for s in self.mem.slots())

    def state(self) -> tuple[Any, ...]:
        d, v = self.driver, self.device
        return (
            d.broken,
            d.in_flight,
            d.free_descriptors,
            d.avail_idx,
            d.last_used,
            d._free[: d._nfree].tolist(),
            d._in_flight.tolist(),
            d._multi.tolist(),
            d._wcap.tolist(),
            sorted(d._chains.items()),
            d.interrupts_enabled,
            v.broken,
            v.in_flight,
            v.last_avail,
            v.next_used,
            v.notifications_enabled,
            v._in_flight.tolist(),
            v._wcap.tolist(),
        )


def outcome(fn: Any, *args: Any, **kw: Any) -> Any:
    """A call's result in comparable form, or its UsageError."""
    try:
        return norm(fn(*args, **kw))
    except UsageError as e:
        return ("UsageError", str(e))


def norm(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.shape, value.tolist())
    if isinstance(value, tuple):
        return tuple(norm(v) for v in value)
    if isinstance(value, Batch):
        return (
            "Batch",
            norm(value.heads),
            norm(value.starts),
            norm(value.addrs),
            norm(value.lens),
            norm(value.flags),
            norm(value.readable_lens),
            norm(value.writable_lens),
            value.simple,
            value.chains(),
        )
    return value


class Twin:
    """The same program on two sides, compared step by step: by default a scalar side and
    a vectorized side, both on the reference (numpy) path; ``fast``/``slow`` give each
    side's ``(scalar, jit)``."""

    def __init__(
        self,
        q: int,
        event_idx: bool,
        start: int,
        seed: int,
        fast: tuple[bool, bool] = (True, False),
        slow: tuple[bool, bool] = (False, False),
    ) -> None:
        self.q = q
        self.rng = random.Random(seed)
        self.fast = Side(q, event_idx, start, scalar=fast[0], jit=fast[1])
        self.slow = Side(q, event_idx, start, scalar=slow[0], jit=slow[1])
        self.sides = (self.fast, self.slow)
        self.table = 0  # the next indirect table slot

    def both(self, op: Any) -> None:
        results = [op(side) for side in self.sides]
        assert norm(results[0]) == norm(results[1])
        assert self.fast.state() == self.slow.state()
        assert self.fast.ram() == self.slow.ram()

    # -- arguments drawn once, used on both sides
    def _n(self, hi: int) -> int:
        return self.rng.choice(
            [1, 1, 2, 3, SCALAR_MAX, SCALAR_MAX + 1, DRIVER_SCALAR_MAX, DRIVER_SCALAR_MAX + 1, hi]
        )

    def _buffer(self, hostile: bool) -> tuple[int, int]:
        r = self.rng
        if hostile and r.random() < 0.3:
            return r.choice(
                [
                    (0, 0),
                    (TOP - 8, 16),
                    (0x3F000, 0x2000),
                    (SLOT1 + 0xFF0, 0x20),
                    (ROM, 16),
                    (0x100000, 8),
                    (BUF, 0xFFFFFFFF),
                    (TOP - 1, 1),
                ]
            )
        return BUF + r.randrange(0, 0x20000), r.randrange(1, 200)

    # -- driver
    def add_batch(self, hostile: bool) -> None:
        free = self.fast.driver.free_descriptors
        n = min(self._n(self.q), max(free, 1))
        bufs = [self._buffer(hostile) for _ in range(n)]
        wr_choice = self.rng.choice(["all_r", "all_w", "mixed"])
        if wr_choice == "mixed":
            writable: Any = [self.rng.random() < 0.5 for _ in range(n)]
        else:
            writable = wr_choice == "all_w"
        as_array = self.rng.random() < 0.5

        def op(side: Side) -> Any:
            addrs: Any = [a for a, _ in bufs]
            lens: Any = [n_ for _, n_ in bufs]
            if as_array:
                addrs, lens = np.array(addrs, dtype=np.uint64), np.array(lens, dtype=np.int64)
            if side.driver.broken:
                return None
            return outcome(side.driver.add_batch, addrs, lens, writable)

        self.both(op)
        self.both(lambda side: side.driver.kick_needed())

    def add_chain(self, hostile: bool) -> None:
        free = self.fast.driver.free_descriptors
        if free < 2 or self.fast.driver.broken:
            return
        k = self.rng.randrange(2, min(free, 4) + 1)
        segs = []
        for i in range(k):
            addr, length = self._buffer(hostile)
            segs.append((addr, max(length, 1), i > 0 and self.rng.random() < 0.6))
        self.both(lambda side: outcome(side.driver.add_chain, segs))
        self.both(lambda side: side.driver.kick_needed())

    def add_indirect(self, hostile: bool) -> None:
        """A chain of 0-2 normal descriptors ending in an indirect one (virtio 1.2,
        2.7.5.3.2), its table in one of 64 table slots taken round-robin."""
        free = self.fast.driver.free_descriptors
        if free < 1 or self.fast.driver.broken:
            return
        lead_n = self.rng.randrange(0, min(free - 1, 2) + 1)
        k = self.rng.randrange(1, 4)
        segs = []
        for i in range(lead_n + k):
            addr, length = self._buffer(hostile)
            segs.append((addr, max(length, 1), i > 0 and self.rng.random() < 0.6))
        gpa = TABLES + 64 * self.table
        self.table = (self.table + 1) % 64

        def op(side: Side) -> Any:
            table = side.mem.translate(gpa, 64)
            return outcome(
                side.driver.add_indirect, table, gpa, segs[lead_n:], leading=segs[:lead_n]
            )

        self.both(op)
        self.both(lambda side: side.driver.kick_needed())

    def get_used(self) -> None:
        max_n = self.rng.choice(
            [None, 1, 2, SCALAR_MAX, SCALAR_MAX + 1, DRIVER_SCALAR_MAX, DRIVER_SCALAR_MAX + 1]
        )
        self.both(lambda side: outcome(side.driver.get_used, max_n))

    def interrupts(self) -> None:
        on = self.rng.random() < 0.5
        self.both(
            lambda side: side.driver.enable_interrupts() if on else side.driver.disable_interrupts()
        )

    # -- device
    def pop(self) -> None:
        max_n = self.rng.choice([None, 1, 2, 3, SCALAR_MAX, SCALAR_MAX + 1])
        budget = self.rng.choice([None, None, 1, 2])

        def op(side: Side) -> Any:
            batch = side.device.pop_batch(max_n, budget)
            if len(batch):
                side.batches.append(batch)
            return batch

        self.both(op)

    def payloads(self) -> None:
        if not self.fast.batches:
            return
        i = self.rng.randrange(len(self.fast.batches))
        width = self.rng.choice([0, 1, 16, 64, 300])
        if self.rng.random() < 0.5:
            self.both(lambda side: outcome(side.device.read_payloads, side.batches[i], width))
        else:  # into the device's own buffer, wider than asked
            rows = len(self.fast.batches[i])

            def read_into(side: Side) -> Any:
                out = np.full((rows + 1, width + 3), 0xEE, dtype=np.uint8)
                return outcome(side.device.read_payloads, side.batches[i], width, out), out

            self.both(read_into)
        fb = self.fast.batches[i]
        caps = fb.writable_lens.tolist()
        lens = [self.rng.randint(0, c) if c else 0 for c in caps]
        if self.rng.random() < 0.2:  # our own mistake: a length beyond the capacity
            lens[0] = caps[0] + 1
        w = max([*lens, 1])
        data = (
            np.random.default_rng(self.rng.randrange(1 << 30))
            .integers(0, 256, (len(fb), w))
            .astype(np.uint8)
        )
        as_list = self.rng.random() < 0.5
        self.both(
            lambda side: outcome(
                side.device.write_payloads,
                side.batches[i],
                data,
                lens if as_list else np.array(lens),
            )
        )

    def complete(self) -> None:
        if not self.fast.batches:
            return
        batch = self.fast.batches.pop(self.rng.randrange(len(self.fast.batches)))
        j = self.slow.batches.index(
            next(b for b in self.slow.batches if b.heads.tolist() == batch.heads.tolist())
        )
        self.slow.batches.pop(j)
        heads = batch.heads.tolist()
        self.rng.shuffle(heads)
        caps = dict(zip(batch.heads.tolist(), batch.writable_lens.tolist(), strict=True))
        lens = [self.rng.randint(0, caps[h]) for h in heads]
        mistake = self.rng.random()
        if mistake < 0.1:
            heads = heads + heads[:1]  # completed twice
            lens = lens + lens[:1]
        elif mistake < 0.15:
            lens[0] = caps[heads[0]] + 1  # beyond the capacity
        elif mistake < 0.2:
            heads[0] = self.q  # out of range
        as_array = self.rng.random() < 0.5

        def op(side: Side) -> Any:
            ids: Any = heads
            ls: Any = lens
            if as_array:
                ids, ls = np.array(heads, dtype=np.uint16), np.array(lens, dtype=np.uint32)
            return outcome(side.device.push_used, ids, ls)

        self.both(op)

    def notifications(self) -> None:
        on = self.rng.random() < 0.5
        self.both(
            lambda side: (
                side.device.enable_notifications() if on else side.device.disable_notifications()
            )
        )

    # -- a hostile guest (the driver's area) and a hostile device (the used ring)
    def corrupt(self) -> None:
        r, q = self.rng, self.q
        what = r.choice(["desc", "avail_entry", "avail_idx", "used_entry", "used_idx"])
        i = r.randrange(q)
        flags = r.choice([0, 1, 2, 3, 4, 5, 6])
        desc = (
            r.choice([BUF + 64, 0, TOP - 4, ROM, SLOT1 + 0xFFC, 0x100000]),
            r.choice([0, 4, 16, 64, 0x2000, 0xFFFFFFFF]),
            flags,
            r.randrange(q + 2),
        )
        entry = r.choice([0, i, q, q + 1, 0xFFFF])
        jump = r.choice([1, 2, q, q + 1, 0x8000])
        used = (r.choice([0, i, q, 0xFFFF]), r.choice([0, 1, 0xFFFFFFFF]))
        bump = r.choice([1, 2])
        lay = self.fast.layout

        def op(side: Side) -> None:
            a = side.area
            if what == "desc":
                a[: lay.desc_size].view(DESC_DTYPE)[i] = desc
            elif what == "avail_entry":
                a[lay.avail_ring_offset : lay.avail_ring_offset + 2 * q].view("<u2")[i] = entry
            elif what == "avail_idx":
                v = a[lay.avail_idx_offset : lay.avail_idx_offset + 2].view("<u2")
                v[0] = (int(v[0]) + jump) & INDEX_MASK
            elif what == "used_entry":
                ring = a[lay.used_ring_offset : lay.used_ring_offset + 8 * q]
                ring.view(USED_ELEM_DTYPE)[i] = used
            else:
                v = a[lay.used_idx_offset : lay.used_idx_offset + 2].view("<u2")
                v[0] = (int(v[0]) + bump) & INDEX_MASK

        self.both(op)

    def step(self, hostile: bool) -> None:
        ops = [
            lambda: self.add_batch(hostile),
            lambda: self.add_chain(hostile),
            lambda: self.add_indirect(hostile),
            self.pop,
            self.pop,
            self.payloads,
            self.complete,
            self.complete,
            self.get_used,
            self.interrupts,
            self.notifications,
        ]
        if hostile:
            ops.append(self.corrupt)
        self.rng.choice(ops)()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.sampled_from([1, 2, 4, 8, 16, 64]),
    event_idx=st.booleans(),
    start=st.one_of(st.just(0), st.integers(65530, 65535), st.integers(0, INDEX_MASK)),
    seed=st.integers(0, 2**32),
    steps=st.integers(5, 60),
    hostile=st.booleans(),
)
# Overlapping writable buffers of different lengths: both paths write in chain order.
@example(q=64, event_idx=False, start=0, seed=10812, steps=25, hostile=False)
def test_scalar_and_vectorized_paths_agree(
    q: int, event_idx: bool, start: int, seed: int, steps: int, hostile: bool
) -> None:
    twin = Twin(q, event_idx, start, seed)
    for _ in range(steps):
        twin.step(hostile)


@pytest.mark.parametrize("hostile", [False, True])
def test_scalar_and_vectorized_paths_agree_seeded(hostile: bool) -> None:
    """Long deterministic programs: enough steps to wrap small rings' indices."""
    rng = random.Random(11)
    for run in range(40):
        twin = Twin(
            rng.choice([1, 2, 4, 8, 16, 64]),
            rng.random() < 0.5,
            rng.choice([0, 65535 - rng.randrange(8), rng.randrange(1 << 16)]),
            run,
        )
        for _ in range(200):
            twin.step(hostile)


def _copy_pair(
    scalar: bool,
) -> tuple[GuestMemoryMap, DriverRing, DeviceRing, DriverRing, DeviceRing]:
    mem = memory()
    lay = RingLayout(16)
    rings = []
    for gpa in (RING, RING + 0x2000):
        drv = DriverRing(mem.translate(gpa, lay.size), lay, event_idx=True, fast_path=scalar)
        dev = DeviceRing.from_layout(mem, gpa, lay, event_idx=True, fast_path=scalar)
        rings += [drv, dev]
    return mem, rings[0], rings[1], rings[2], rings[3]


@pytest.mark.parametrize("scalar", [True, False])
def test_copy_payloads_equals_read_then_write(scalar: bool) -> None:
    """copy_payloads == read_payloads + write_payloads(min(copied, capacity)), for simple
    buffers, chains (readable segments concatenated, writable ones filled in order, a
    readable one first in the destination skipped) and truncation by width or capacity."""
    results: list[tuple[list[int], bytes]] = []
    for direct in (True, False):
        mem, tx_drv, tx_dev, rx_drv, rx_dev = _copy_pair(scalar)
        tx_drv.add_batch([BUF, BUF + 0x100], [40, 8], False)
        tx_drv.add_chain([(BUF + 0x200, 5, False), (BUF + 0x300, 30, False)])
        tx_drv.add_chain([(BUF + 0x400, 100, False), (BUF + 0x500, 10, True)])
        rx_drv.add_batch([BUF + 0x8000, BUF + 0x8100], [64, 4], True)
        rx_drv.add_chain(
            [(BUF + 0x8200, 3, False), (BUF + 0x8300, 10, True), (BUF + 0x8400, 50, True)]
        )
        rx_drv.add_batch([BUF + 0x8500], [64], True)
        tx, rx = tx_dev.pop_batch(), rx_dev.pop_batch()
        assert len(tx) == len(rx) == 4
        width = 90
        if direct:
            lens = tx_dev.copy_payloads(tx, rx_dev, rx, width)
        else:
            data, copied = tx_dev.read_payloads(tx, width)
            lens = rx_dev.write_payloads(rx, data, np.minimum(copied, rx.writable_lens))
        results.append((lens.tolist(), mem.read(BUF + 0x8000, 0x600)))
    assert results[0] == results[1]
    assert results[0][0] == [40, 4, 35, 64]


def test_copy_payloads_checks_its_arguments() -> None:
    _, tx_drv, tx_dev, rx_drv, rx_dev = _copy_pair(True)
    tx_drv.add_batch([BUF], [8], False)
    rx_drv.add_batch([BUF + 0x100, BUF + 0x200], [8, 8], True)
    tx, rx = tx_dev.pop_batch(), rx_dev.pop_batch()
    with pytest.raises(UsageError, match="destination chains"):
        tx_dev.copy_payloads(tx, rx_dev, rx, 8)
    with pytest.raises(UsageError, match="no longer in flight"):
        tx_dev.copy_payloads(rx, rx_dev, rx, 8)  # rx is not this ring's batch
    with pytest.raises(UsageError, match="DeviceRing"):
        tx_dev.copy_payloads(tx, rx_drv, rx, 8)  # type: ignore[arg-type]


def test_copy_payloads_breaks_the_ring_whose_memory_went_away() -> None:
    mem, tx_drv, tx_dev, rx_drv, rx_dev = _copy_pair(True)
    tx_drv.add_batch([BUF], [8], False)
    rx_drv.add_batch([SLOT1], [8], True)
    tx, rx = tx_dev.pop_batch(), rx_dev.pop_batch()
    mem.remove(1)  # the VMM unmapped the slot under an in-flight RX buffer
    assert tx_dev.copy_payloads(tx, rx_dev, rx, 8).tolist() == []
    assert rx_dev.broken and "guest memory changed" in rx_dev.broken
    assert tx_dev.broken is None


def test_available_counts_without_validating() -> None:
    _, tx_drv, tx_dev, _, _ = _copy_pair(True)
    assert tx_dev.available() == 0
    tx_drv.add_batch([BUF, BUF + 64, BUF + 128], [8, 8, 8], False)
    assert tx_dev.available() == 3
    tx_dev.pop_batch(max_n=2)
    assert tx_dev.available() == 1


def test_empty_results_are_shared_and_read_only() -> None:
    side = Side(4, True, 0, scalar=True)
    a, b = side.device.pop_batch(), side.device.pop_batch()
    assert a is b and len(a) == 0 and not a.heads.flags.writeable
    ids, lens = side.driver.get_used()
    assert len(ids) == len(lens) == 0 and not ids.flags.writeable


def test_scalar_batch_makes_arrays_lazily_and_they_win() -> None:
    """A batch from the scalar path answers from its lists until an array is made; after
    that the array (which a caller may change) is what the ring reads."""
    side = Side(8, False, 0, scalar=True)
    side.driver.add_batch([BUF, BUF + 64], [16, 32], True)
    batch = side.device.pop_batch()
    assert batch.head_list == [0, 1] and batch.writable_list == [16, 32]
    assert batch._arrays == [None] * 7
    lens: npt.NDArray[Any] = batch.writable_lens
    assert lens.dtype == np.int64 and lens.tolist() == [16, 32]
    lens[0] = 1  # the caller's array is now the truth
    assert batch.writable_list == [1, 32]
    with pytest.raises(UsageError, match="capacity"):
        side.device.write_payloads(batch, np.zeros((2, 32), np.uint8), [2, 0])
