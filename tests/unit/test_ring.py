"""Tests for the split ring (shared/virtio): layout, both ring sides, suppression, a malicious
guest, wrap-around, a model-based property test and a two-thread lost-wakeup stress test. No
processes, no fds except the one SharedRegion test (closed before the leak guard looks)."""

from __future__ import annotations

import random
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import UsageError
from shared.memory import GuestMemoryMap, SharedRegion
from shared.virtio import (
    DESC_DTYPE,
    INDEX_MASK,
    MAX_BUFFER_LEN,
    USED_ELEM_DTYPE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    Batch,
    DeviceRing,
    DriverRing,
    RingLayout,
    Segment,
    full_barrier,
    need_event,
    valid_queue_size,
)
from tests import timing


class _Paths:
    """Which paths the rings built by this module's tests take (``fast_path``)."""

    fast = True


PATHS = _Paths()


@pytest.fixture(autouse=True, scope="module", params=["scalar", "vectorized"])
def ring_paths(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs twice: with the scalar paths for small batches (the default) and with
    the vectorized paths only (the reference; see tests/unit/test_ring_scalar.py)."""
    PATHS.fast = request.param == "scalar"
    try:
        yield request.param
    finally:
        PATHS.fast = True


# Guest-physical map used by most tests:
#   slot 0  RAM   [0x000000, 0x100000)   rings at RING_A / RING_B, buffers above BUF
#   (gap)         [0x100000, 0x200000)
#   slot 1  RAM   [0x200000, 0x210000)
#   slot 2  RAM   [0x210000, 0x220000)   adjacent to slot 1
#   slot 3  ROM   [0x300000, 0x301000)
RING_A = 0x0000
RING_B = 0x8000
BUF_A = 0x20000
BUF_B = 0x60000
TABLES = 0x90000
GAP_START = 0x100000
SLOT1 = 0x200000
SLOT2 = 0x210000
ROM = 0x300000
TOP = 1 << 64


def make_memory() -> tuple[GuestMemoryMap, npt.NDArray[np.uint8]]:
    mem = GuestMemoryMap()
    ram = np.zeros(0x100000, dtype=np.uint8)
    mem.add(0, 0, ram)
    mem.add(1, SLOT1, np.zeros(0x10000, dtype=np.uint8))
    mem.add(2, SLOT2, np.zeros(0x10000, dtype=np.uint8))
    rom = np.zeros(0x1000, dtype=np.uint8)
    rom.flags.writeable = False
    mem.add(3, ROM, rom)
    return mem, ram


class Raw:
    """Unvalidated access to a ring area, as a malicious guest has it (offsets from the spec)."""

    def __init__(self, area: npt.NDArray[np.uint8], q: int) -> None:
        used = (16 * q + 6 + 2 * q + 3) & ~3
        self.q = q
        self.desc = area[: 16 * q].view(DESC_DTYPE)
        self.avail_flags = area[16 * q : 16 * q + 2].view("<u2")
        self.avail_idx = area[16 * q + 2 : 16 * q + 4].view("<u2")
        self.avail_ring = area[16 * q + 4 : 16 * q + 4 + 2 * q].view("<u2")
        self.used_event = area[16 * q + 4 + 2 * q : 16 * q + 6 + 2 * q].view("<u2")
        self.used_flags = area[used : used + 2].view("<u2")
        self.used_idx = area[used + 2 : used + 4].view("<u2")
        self.used_ring = area[used + 4 : used + 4 + 8 * q].view(USED_ELEM_DTYPE)
        self.avail_event = area[used + 4 + 8 * q : used + 6 + 8 * q].view("<u2")

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.desc[i] = (addr, length, flags, nxt)

    def post(self, *heads: int) -> None:
        idx = int(self.avail_idx[0])
        for h in heads:
            self.avail_ring[idx % self.q] = h
            idx += 1
        self.avail_idx[0] = idx & INDEX_MASK


class Pair:
    """A driver and a device over the same ring in one memory map."""

    def __init__(
        self,
        mem: GuestMemoryMap,
        ring_gpa: int,
        q: int,
        *,
        event_idx: bool = False,
        start_index: int = 0,
        **device_kw: Any,
    ) -> None:
        self.mem = mem
        self.layout = RingLayout(q)
        self.area = mem.translate(ring_gpa, self.layout.size)
        self.driver = DriverRing(
            self.area,
            self.layout,
            event_idx=event_idx,
            start_index=start_index,
            fast_path=PATHS.fast,
        )
        self.device = DeviceRing.from_layout(
            mem,
            ring_gpa,
            self.layout,
            event_idx=event_idx,
            start_index=start_index,
            fast_path=PATHS.fast,
            **device_kw,
        )
        self.raw = Raw(self.area, q)


@pytest.fixture
def memory() -> tuple[GuestMemoryMap, npt.NDArray[np.uint8]]:
    return make_memory()


@pytest.fixture
def pair(memory: tuple[GuestMemoryMap, npt.NDArray[np.uint8]]) -> Pair:
    return Pair(memory[0], RING_A, 8)


def round_trip(p: Pair, buf: int, n: int = 4, size: int = 32) -> None:
    """Post n buffers (half readable, half writable), serve them, check contents and lengths."""
    mem = p.mem
    addrs = buf + np.arange(n, dtype=np.uint64) * size
    writable = np.arange(n) % 2 == 1
    for i in range(n):
        mem.write(int(addrs[i]), bytes([i + 1]) * size)
    heads = p.driver.add_batch(addrs, np.full(n, size), writable)
    batch = p.device.pop_batch()
    assert p.device.broken is None
    assert batch.heads.tolist() == heads.tolist()
    data, copied = p.device.read_payloads(batch, size)
    for i in range(n):
        if writable[i]:
            assert copied[i] == 0
        else:
            assert data[i].tolist() == [i + 1] * size
    reply = np.full((n, size), 0xEE, dtype=np.uint8)
    written = p.device.write_payloads(batch, reply, np.where(writable, size // 2, 0))
    p.device.push_used(batch.heads, written)
    ids, lens = p.driver.get_used()
    assert p.driver.broken is None
    assert sorted(ids.tolist()) == sorted(heads.tolist())
    for i in range(n):
        got = mem.read(int(addrs[i]), size)
        if writable[i]:
            assert got == b"\xee" * (size // 2) + bytes([i + 1]) * (size // 2)
        else:
            assert got == bytes([i + 1]) * size
    assert dict(zip(ids.tolist(), lens.tolist(), strict=True)) == {
        int(h): (size // 2 if w else 0) for h, w in zip(heads, writable, strict=True)
    }


# ============================================================================ layout


@pytest.mark.parametrize("q", [1, 2, 4, 8, 16, 128, 256, 1024, 4096, 32768])
def test_layout_matches_spec_formulas(q: int) -> None:
    lay = RingLayout(q)
    # virtio 1.x §2.7: descriptor table 16*Q, available ring 6+2*Q, used ring 6+8*Q.
    assert (lay.desc_offset, lay.desc_size) == (0, 16 * q)
    assert (lay.avail_offset, lay.avail_size) == (16 * q, 6 + 2 * q)
    used = -(-(16 * q + 6 + 2 * q) // 4) * 4
    assert (lay.used_offset, lay.used_size) == (used, 6 + 8 * q)
    assert lay.size == used + 6 + 8 * q
    assert lay.desc_offset % 16 == 0 and lay.avail_offset % 2 == 0 and lay.used_offset % 4 == 0
    assert lay.desc_offset + lay.desc_size <= lay.avail_offset
    assert (
        lay.avail_offset + lay.avail_size <= lay.used_offset < lay.avail_offset + lay.avail_size + 4
    )
    assert lay.avail_flags_offset == lay.avail_offset
    assert lay.avail_idx_offset == lay.avail_offset + 2
    assert lay.avail_ring_offset == lay.avail_offset + 4
    assert lay.used_event_offset == lay.avail_offset + lay.avail_size - 2
    assert lay.used_flags_offset == lay.used_offset
    assert lay.used_idx_offset == lay.used_offset + 2
    assert lay.used_ring_offset == lay.used_offset + 4
    assert lay.avail_event_offset == lay.size - 2
    assert lay.used_ring_offset % 4 == 0  # used elements are naturally aligned
    assert lay.addresses(0x1000) == (0x1000, 0x1000 + 16 * q, 0x1000 + used)


def test_dtypes_are_little_endian_and_packed() -> None:
    assert DESC_DTYPE.itemsize == 16
    desc_fields = DESC_DTYPE.fields
    used_fields = USED_ELEM_DTYPE.fields
    assert desc_fields is not None and used_fields is not None
    assert [desc_fields[f][1] for f in ("addr", "len", "flags", "next")] == [0, 8, 12, 14]
    assert [desc_fields[f][0].str for f in ("addr", "len", "flags", "next")] == [
        "<u8",
        "<u4",
        "<u2",
        "<u2",
    ]
    assert USED_ELEM_DTYPE.itemsize == 8
    assert [used_fields[f][1] for f in ("id", "len")] == [0, 4]
    assert all(used_fields[f][0].str == "<u4" for f in ("id", "len"))
    raw = np.zeros(1, dtype=DESC_DTYPE)
    raw[0] = (0x0102030405060708, 0x0A0B0C0D, 0x0E0F, 0x1011)
    assert raw.view(np.uint8).tolist() == [8, 7, 6, 5, 4, 3, 2, 1, 13, 12, 11, 10, 15, 14, 17, 16]


def test_flag_constants() -> None:
    assert (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert VRING_AVAIL_F_NO_INTERRUPT == 1 and VRING_USED_F_NO_NOTIFY == 1


@pytest.mark.parametrize("q", [0, 3, 6, 100, 32769, 65536, -1, True, 2.0, "8", None])
def test_bad_queue_size_is_refused(q: Any) -> None:
    assert not valid_queue_size(q)
    with pytest.raises(UsageError, match="power of two"):
        RingLayout(q)
    mem, _ = make_memory()
    with pytest.raises(UsageError, match="power of two"):
        DeviceRing(mem, 0, 0x100, 0x200, q, event_idx=False)


def test_constructor_checks(memory: tuple[GuestMemoryMap, Any]) -> None:
    mem, ram = memory
    lay = RingLayout(8)
    with pytest.raises(UsageError, match="aligned"):
        DriverRing(ram[8 : 8 + lay.size], lay, event_idx=False)
    with pytest.raises(UsageError, match="bytes"):
        DriverRing(ram[: lay.size - 1], lay, event_idx=False)
    with pytest.raises(UsageError, match="uint8"):
        DriverRing(np.zeros(lay.size, dtype=np.uint16), lay, event_idx=False)
    ro = np.zeros(lay.size, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(UsageError, match="writable"):
        DriverRing(ro, lay, event_idx=False)
    with pytest.raises(UsageError, match="start_index"):
        DriverRing(ram[: lay.size], lay, event_idx=False, start_index=65536)
    with pytest.raises(UsageError, match="start_index"):
        DeviceRing.from_layout(mem, 0, lay, event_idx=False, start_index=-1)
    with pytest.raises(UsageError, match="max_buffer_len"):
        DeviceRing.from_layout(mem, 0, lay, event_idx=False, max_buffer_len=0)
    with pytest.raises(UsageError, match="GuestMemoryMap"):
        DeviceRing(ram, 0, 0x100, 0x200, 8, event_idx=False)
    with pytest.raises(UsageError, match="desc_gpa"):
        DeviceRing(mem, 1 << 64, 0x100, 0x200, 8, event_idx=False)


def test_driver_reset_reinitialises_the_ring(pair: Pair) -> None:
    pair.driver.add_batch([BUF_A, BUF_A + 8], [8, 8])
    pair.driver.reset(start_index=100)
    assert pair.driver.in_flight == 0 and pair.driver.free_descriptors == 8
    assert int(pair.raw.avail_idx[0]) == int(pair.raw.used_idx[0]) == 100
    assert not pair.raw.desc.view(np.uint8).any()


def test_smaller_max_buffer_len(memory: tuple[GuestMemoryMap, Any]) -> None:
    p = Pair(memory[0], RING_A, 8, max_buffer_len=4096)
    p.driver.add_batch([BUF_A], [4096])
    assert len(p.device.pop_batch()) == 1
    p.driver.add_batch([BUF_A], [4097])
    assert len(p.device.pop_batch()) == 0
    assert p.device.broken is not None and "4096-byte limit" in p.device.broken


# ============================================================================ need_event, barrier


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # moved past the event
        (0, 0, 0, False),  # no movement never notifies
        (1, 1, 0, False),  # event not reached yet
        (5, 10, 5, True),  # event == old
        (9, 10, 5, True),  # event == new - 1
        (10, 10, 5, False),  # event == new: not yet passed
        (4, 10, 5, False),  # event behind old: already notified
        (0xFFFF, 0, 0xFFFF, True),  # wrap: old 65535 -> new 0
        (0xFFFF, 1, 0xFFFE, True),
        (0, 2, 0xFFFF, True),
        (1, 2, 0xFFFF, True),
        (2, 2, 0xFFFF, False),
        (0xFFFE, 1, 0xFFFF, False),
        (0x7FFF, 0x8000, 0, True),
        (0x8000, 0x8000, 0, False),
    ],
)
def test_need_event_table(event: int, new: int, old: int, expected: bool) -> None:
    assert need_event(event, new, old) is expected


@given(
    event=st.integers(0, INDEX_MASK),
    old=st.integers(0, INDEX_MASK),
    step=st.integers(0, INDEX_MASK),
)
def test_need_event_means_event_in_old_new(event: int, old: int, step: int) -> None:
    new = (old + step) & INDEX_MASK
    assert need_event(event, new, old) == ((event - old) & INDEX_MASK < step)


def test_full_barrier_is_cheap_and_reentrant_across_threads() -> None:
    with timing.within(2.0, "20000 barriers"):  # cheap: no syscall, no lock
        for _ in range(20000):
            full_barrier()

    def hammer() -> None:
        for _ in range(2000):
            full_barrier()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timing.scaled(10))
        assert not t.is_alive()


# ============================================================================ round trips


def test_single_buffer_round_trip(pair: Pair, memory: tuple[GuestMemoryMap, Any]) -> None:
    mem, _ = memory
    mem.write(BUF_A, b"hello virtio")
    head = pair.driver.add_chain([(BUF_A, 12, False)])
    assert pair.driver.in_flight == 1 and pair.driver.free_descriptors == 7
    batch = pair.device.pop_batch()
    assert len(batch) == 1 and batch.simple and batch.heads.tolist() == [head]
    assert batch.chains() == [(Segment(BUF_A, 12, False),)]
    data, copied = pair.device.read_payloads(batch, 16)
    assert bytes(data[0, :12]) == b"hello virtio" and copied.tolist() == [12]
    assert not data[0, 12:].any()
    assert pair.device.in_flight == 1
    pair.device.push_used(batch.heads, [0])
    assert pair.device.in_flight == 0
    ids, lens = pair.driver.get_used()
    assert ids.tolist() == [head] and lens.tolist() == [0]
    assert pair.driver.in_flight == 0 and pair.driver.free_descriptors == 8
    assert pair.device.pop_batch().heads.shape == (0,)
    assert pair.driver.get_used()[0].shape == (0,)


def test_batch_round_trip(pair: Pair) -> None:
    for _ in range(5):  # several laps: descriptors are recycled
        round_trip(pair, BUF_A, n=8)
    assert pair.driver.free_descriptors == 8


def test_round_trip_over_a_real_shared_region() -> None:
    """Driver and device map the same POSIX shm object separately, as two processes would."""
    with SharedRegion.create(1 << 16) as guest_side:
        host_side = SharedRegion.from_fd(guest_side.fd.dup(), 1 << 16)
        try:
            guest_mem, host_mem = GuestMemoryMap(), GuestMemoryMap()
            guest_mem.add(0, 0x10000, guest_side.array)
            host_mem.add(0, 0x10000, host_side.array)
            lay = RingLayout(16)
            driver = DriverRing(
                guest_mem.translate(0x10000, lay.size), lay, event_idx=True, fast_path=PATHS.fast
            )
            device = DeviceRing.from_layout(
                host_mem, 0x10000, lay, event_idx=True, fast_path=PATHS.fast
            )
            guest_mem.write(0x18000, b"ping")
            driver.add_chain([(0x18000, 4, False), (0x18100, 8, True)])
            assert driver.kick_needed()
            batch = device.pop_batch()
            assert batch.chains() == [
                (Segment(0x18000, 4, False), Segment(0x18100, 8, True)),
            ]
            assert bytes(device.read_payloads(batch, 4)[0][0]) == b"ping"
            reply = np.frombuffer(b"pong!!", dtype=np.uint8).reshape(1, 6).copy()
            assert device.push_used(batch.heads, device.write_payloads(batch, reply, [6]))
            _, lens = driver.get_used()
            assert lens.tolist() == [6] and guest_mem.read(0x18100, 6) == b"pong!!"
            del driver, device, batch, guest_mem, host_mem
        finally:
            host_side.close()


def test_chain_round_trip(pair: Pair, memory: tuple[GuestMemoryMap, Any]) -> None:
    mem, _ = memory
    mem.write(BUF_A, b"HDR:")
    mem.write(BUF_A + 0x100, b"body")
    head = pair.driver.add_chain(
        [(BUF_A, 4, False), (BUF_A + 0x100, 4, False), (BUF_A + 0x200, 8, True), (SLOT1, 8, True)]
    )
    assert pair.driver.free_descriptors == 4
    batch = pair.device.pop_batch()
    assert not batch.simple and batch.heads.tolist() == [head]
    assert batch.readable_lens.tolist() == [8] and batch.writable_lens.tolist() == [16]
    data, copied = pair.device.read_payloads(batch, 6)  # truncated to the caller's width
    assert bytes(data[0]) == b"HDR:bo" and copied.tolist() == [6]
    data, copied = pair.device.read_payloads(batch, 10)
    assert bytes(data[0]) == b"HDR:body\0\0" and copied.tolist() == [8]
    reply = np.arange(1, 13, dtype=np.uint8).reshape(1, 12)
    written = pair.device.write_payloads(batch, reply, [12])
    assert pair.device.push_used(batch.heads, written)
    ids, lens = pair.driver.get_used()
    assert ids.tolist() == [head] and lens.tolist() == [12]
    assert mem.read(BUF_A + 0x200, 8) == bytes(range(1, 9))
    assert mem.read(SLOT1, 4) == bytes(range(9, 13))
    assert pair.driver.free_descriptors == 8


def test_indirect_round_trip(pair: Pair, memory: tuple[GuestMemoryMap, Any]) -> None:
    mem, _ = memory
    mem.write(BUF_A, b"indirect")
    table = mem.translate(TABLES, 64)
    head = pair.driver.add_indirect(
        table, TABLES, [(BUF_A, 8, False), (BUF_A + 0x40, 4, True), (BUF_A + 0x80, 4, True)]
    )
    assert pair.driver.free_descriptors == 7
    batch = pair.device.pop_batch()
    assert batch.chains() == [
        (Segment(BUF_A, 8, False), Segment(BUF_A + 0x40, 4, True), Segment(BUF_A + 0x80, 4, True))
    ]
    assert bytes(pair.device.read_payloads(batch, 8)[0][0]) == b"indirect"
    written = pair.device.write_payloads(batch, np.full((1, 8), 7, dtype=np.uint8), [6])
    pair.device.push_used(batch.heads, written)
    ids, lens = pair.driver.get_used()
    assert ids.tolist() == [head] and lens.tolist() == [6]
    assert mem.read(BUF_A + 0x40, 8) == b"\x07" * 4 + b"\0" * 4
    assert mem.read(BUF_A + 0x80, 4) == b"\x07\x07\0\0"


@pytest.mark.parametrize("leading", [0, 1, 2])
def test_normal_descriptors_then_an_indirect_one(
    pair: Pair, memory: tuple[GuestMemoryMap, Any], leading: int
) -> None:
    """virtio 1.2, 2.7.5.3.2: "zero or more normal chained descriptors followed by a single
    descriptor with VIRTQ_DESC_F_INDIRECT" -- the chain's buffers are the normal ones, then
    the table's."""
    mem, _ = memory
    lead = [(BUF_A + 0x10 * i, 4, False) for i in range(leading)]
    for i in range(leading):
        mem.write(BUF_A + 0x10 * i, f"ld{i}:".encode())
    mem.write(BUF_A + 0x100, b"table")
    segs = [(BUF_A + 0x100, 5, False), (BUF_A + 0x200, 4, True), (SLOT1, 4, True)]
    head = pair.driver.add_indirect(mem.translate(TABLES, 48), TABLES, segs, leading=lead)
    assert pair.driver.free_descriptors == 8 - leading - 1
    batch = pair.device.pop_batch()
    assert pair.device.broken is None and batch.head_list == [head]
    expected = tuple(Segment(a, n, w) for a, n, w in [*lead, *segs])
    assert batch.chain(0) == expected and batch.chains() == [expected]
    assert batch.readable_list == [4 * leading + 5] and batch.writable_list == [8]
    data, copied = pair.device.read_payloads(batch, 32)
    want = b"".join(f"ld{i}:".encode() for i in range(leading)) + b"table"
    assert bytes(data[0][: len(want)]) == want and copied.tolist() == [len(want)]
    written = pair.device.write_payloads(batch, np.arange(1, 9, dtype=np.uint8).reshape(1, 8), [8])
    assert pair.device.push_used(batch.heads, written)
    ids, lens = pair.driver.get_used()
    assert pair.driver.broken is None and ids.tolist() == [head] and lens.tolist() == [8]
    assert mem.read(BUF_A + 0x200, 4) == bytes(range(1, 5)) and mem.read(SLOT1, 4) == bytes(
        range(5, 9)
    )
    assert pair.driver.free_descriptors == 8


def test_normal_then_indirect_by_hand_among_other_chains(
    pair: Pair, memory: tuple[GuestMemoryMap, Any]
) -> None:
    """The same chain written straight into the ring (no DriverRing checks), in one batch
    with a plain buffer and a head-indirect chain; the table fills the queue's bound."""
    mem, _ = memory
    p = pair.raw
    mem.write(
        TABLES,
        _indirect_table(
            *[(BUF_A + 8 * i, 8, VRING_DESC_F_NEXT, i + 1) for i in range(5)],
            (BUF_A + 40, 8, VRING_DESC_F_WRITE, 0),
        ),
    )
    mem.write(TABLES + 0x100, _indirect_table((BUF_B, 8, 0, 0)))
    p.set_desc(0, BUF_B + 0x100, 8, VRING_DESC_F_NEXT, 5)
    p.set_desc(5, BUF_B + 0x200, 8, VRING_DESC_F_NEXT, 2)
    p.set_desc(2, TABLES, 16 * 6, VRING_DESC_F_INDIRECT)  # 2 + 6 buffers: exactly Q
    p.set_desc(3, BUF_B + 0x300, 8)
    p.set_desc(4, TABLES + 0x100, 16, VRING_DESC_F_INDIRECT)
    p.post(3, 0, 4)
    batch = pair.device.pop_batch(max_descriptors=64)  # the 9 read for chain 0 count too
    assert pair.device.broken is None and batch.head_list == [3, 0, 4]
    assert [len(c) for c in batch.chains()] == [1, 8, 1]
    assert batch.chain(1)[:3] == (
        Segment(BUF_B + 0x100, 8, False),
        Segment(BUF_B + 0x200, 8, False),
        Segment(BUF_A, 8, False),
    )
    assert batch.chain(1)[-1] == Segment(BUF_A + 40, 8, True)
    assert batch.writable_list == [0, 8, 0]
    assert pair.device.in_flight == 3


def test_chain_of_exactly_qsize_descriptors_is_fine(pair: Pair) -> None:
    head = pair.driver.add_chain([(BUF_A + 16 * i, 16, i >= 4) for i in range(8)])
    batch = pair.device.pop_batch()
    assert pair.device.broken is None and len(batch.chain(0)) == 8
    pair.device.push_used([head], [64])
    assert pair.driver.get_used()[1].tolist() == [64]


def test_vectorized_batch_equals_per_buffer_posting(memory: tuple[GuestMemoryMap, Any]) -> None:
    mem, _ = memory
    a = Pair(mem, RING_A, 16)
    b = Pair(mem, RING_B, 16)
    rng = np.random.default_rng(1)
    for _ in range(3):
        n = int(rng.integers(1, 17))
        addrs = (BUF_A + rng.integers(0, 0x1000, n) * 16).astype(np.uint64)
        lens = rng.integers(1, 64, n)
        writable = rng.integers(0, 2, n).astype(bool)
        heads_a = a.driver.add_batch(addrs, lens, writable)
        heads_b = [
            b.driver.add_chain([(int(x), int(n_), bool(w))])
            for x, n_, w in zip(addrs, lens, writable, strict=True)
        ]
        assert heads_a.tolist() == heads_b
        assert a.driver.kick_needed() == b.driver.kick_needed()
        # Same bytes in the descriptor table and available ring (the used ring is the device's).
        lay = a.layout
        assert a.area[: lay.used_offset].tobytes() == b.area[: lay.used_offset].tobytes()
        batch_a = a.device.pop_batch()
        batch_b = b.device.pop_batch(max_n=1)  # one at a time: the same result, piecewise
        while len(more := b.device.pop_batch(max_n=1)):
            batch_b = _concat(batch_b, more)
        assert batch_a.chains() == batch_b.chains()
        assert batch_a.heads.tolist() == batch_b.heads.tolist()
        order = rng.permutation(n)
        for p, batch in ((a, batch_a), (b, batch_b)):
            wl = np.minimum(batch.writable_lens[order], 3)
            p.device.push_used(batch.heads[order], wl)
        ids_a, lens_a = a.driver.get_used()
        ids_b, lens_b = b.driver.get_used()
        assert ids_a.tolist() == ids_b.tolist() and lens_a.tolist() == lens_b.tolist()


def _concat(x: Batch, y: Batch) -> Batch:
    return Batch(
        heads=np.concatenate([x.heads, y.heads]),
        starts=np.concatenate([x.starts, y.starts[1:] + x.starts[-1]]),
        addrs=np.concatenate([x.addrs, y.addrs]),
        lens=np.concatenate([x.lens, y.lens]),
        flags=np.concatenate([x.flags, y.flags]),
        readable_lens=np.concatenate([x.readable_lens, y.readable_lens]),
        writable_lens=np.concatenate([x.writable_lens, y.writable_lens]),
    )


def test_fast_and_chained_paths_agree(memory: tuple[GuestMemoryMap, Any]) -> None:
    """The same single buffers, once alone (vectorized path) and once next to a chain (walk)."""
    mem, ram = memory
    ram[BUF_A : BUF_A + 0x4000] = np.random.default_rng(2).integers(0, 256, 0x4000)
    mem.write(SLOT1, bytes(range(256)))
    singles = [
        (BUF_A, 64, False),
        (BUF_A + 0x100, 17, False),
        (SLOT1 + 3, 100, False),
        (BUF_A + 0x200, 64, False),
        (BUF_A + 0x1000, 48, True),
        (SLOT2 + 0xFFF0, 16, True),  # ends exactly at the slot's end
        (BUF_A + 0x1100, 64, True),
    ]
    a = Pair(mem, RING_A, 16)
    b = Pair(mem, RING_B, 16)
    a.driver.add_batch([s[0] for s in singles], [s[1] for s in singles], [s[2] for s in singles])
    for s in singles:
        b.driver.add_chain([s])
    b.driver.add_chain([(BUF_B, 4, False), (BUF_B + 0x10, 4, True)])  # forces the walk
    fast, slow = a.device.pop_batch(), b.device.pop_batch()
    assert fast.simple and not slow.simple
    assert fast.chains() == slow.chains()[: len(singles)]
    data_f, n_f = a.device.read_payloads(fast, 80)
    data_s, n_s = b.device.read_payloads(slow, 80)
    assert np.array_equal(data_f, data_s[: len(singles)])
    assert n_f.tolist() == n_s[: len(singles)].tolist() == [64, 17, 80, 64, 0, 0, 0]
    assert bytes(data_f[2, :80]) == bytes(range(3, 83))
    rng = np.random.default_rng(3)
    reply = rng.integers(0, 256, (len(singles) + 1, 64)).astype(np.uint8)
    lens = np.array([0, 0, 0, 0, 40, 16, 64, 4])
    snapshot = [mem.read(g, 64) for g in (BUF_A + 0x1000, SLOT2 + 0xFFF0 - 48, BUF_A + 0x1100)]
    a.device.write_payloads(fast, reply[: len(singles)], lens[: len(singles)])
    after_fast = [mem.read(g, 64) for g in (BUF_A + 0x1000, SLOT2 + 0xFFF0 - 48, BUF_A + 0x1100)]
    for g, old in zip((BUF_A + 0x1000, SLOT2 + 0xFFF0 - 48, BUF_A + 0x1100), snapshot, strict=True):
        mem.write(g, old)
    b.device.write_payloads(slow, reply, lens)
    after_slow = [mem.read(g, 64) for g in (BUF_A + 0x1000, SLOT2 + 0xFFF0 - 48, BUF_A + 0x1100)]
    assert after_fast == after_slow
    assert mem.read(BUF_A + 0x1000, 48) == reply[4, :40].tobytes() + snapshot[0][40:48]
    assert mem.read(SLOT2 + 0xFFF0, 16) == reply[5, :16].tobytes()


def test_posting_errors_are_usage_errors_and_post_nothing(pair: Pair) -> None:
    d = pair.driver
    with pytest.raises(UsageError, match="free descriptors"):
        d.add_batch(np.arange(9) * 64 + BUF_A, np.full(9, 64))
    with pytest.raises(UsageError, match="lengths"):
        d.add_batch([BUF_A], [0])
    with pytest.raises(UsageError, match="lengths"):
        d.add_batch([BUF_A], [1 << 32])
    with pytest.raises(UsageError, match="address space"):
        d.add_batch([TOP - 8], [16])
    with pytest.raises(UsageError, match="negative"):
        d.add_batch([-1], [16])
    with pytest.raises(UsageError, match="lengths"):
        d.add_batch([BUF_A, BUF_A], [16])
    with pytest.raises(UsageError, match="device_writable"):
        d.add_batch([BUF_A, BUF_A], [16, 16], [True, False, True])
    with pytest.raises(UsageError, match="before device-writable"):
        d.add_chain([(BUF_A, 4, True), (BUF_A + 4, 4, False)])
    with pytest.raises(UsageError, match="at least one"):
        d.add_chain([])
    with pytest.raises(UsageError, match="longer than the queue"):
        d.add_chain([(BUF_A + i, 1, False) for i in range(9)])
    with pytest.raises(UsageError, match="indirect table must be"):
        d.add_indirect(np.zeros(8, dtype=np.uint8), TABLES, [(BUF_A, 1, False)])  # too small
    table = np.zeros(256, dtype=np.uint8)
    with pytest.raises(UsageError, match="before device-writable"):  # across both parts
        d.add_indirect(table, TABLES, [(BUF_A, 4, False)], leading=[(BUF_A, 4, True)])
    with pytest.raises(UsageError, match="chain of 9 buffers is longer than the queue"):
        d.add_indirect(
            table,
            TABLES,
            [(BUF_A + i, 1, False) for i in range(6)],
            leading=[(BUF_A, 1, False)] * 3,
        )
    with pytest.raises(UsageError, match="needs at least one"):
        d.add_indirect(table, TABLES, [], leading=[(BUF_A, 1, False)])
    assert not table.any()
    assert d.avail_idx == 0 and d.free_descriptors == 8 and d.in_flight == 0
    assert d.add_batch([], []).shape == (0,)
    assert not d.kick_needed()
    d.add_batch(BUF_A + np.arange(6), np.ones(6, dtype=np.int64))
    with pytest.raises(UsageError, match="only 2 free"):
        d.add_chain([(BUF_A + i, 1, False) for i in range(3)])
    assert d.avail_idx == 6 and d.free_descriptors == 2 and d.in_flight == 6


def test_completion_errors_are_usage_errors(pair: Pair) -> None:
    pair.driver.add_batch([BUF_A, BUF_A + 64], [64, 64], [True, False])
    batch = pair.device.pop_batch()
    dev = pair.device
    with pytest.raises(UsageError, match="not in flight"):
        dev.push_used([5], [0])
    with pytest.raises(UsageError, match="out of range"):
        dev.push_used([8], [0])
    with pytest.raises(UsageError, match="twice"):
        dev.push_used([0, 0], [0, 0])
    with pytest.raises(UsageError, match="capacity"):
        dev.push_used([0], [65])
    with pytest.raises(UsageError, match="capacity"):
        dev.push_used([1], [1])  # a device-readable buffer holds nothing
    with pytest.raises(UsageError, match="capacity"):
        dev.write_payloads(batch, np.zeros((2, 100), dtype=np.uint8), [65, 0])
    with pytest.raises(UsageError, match="width"):
        dev.write_payloads(batch, np.zeros((2, 10), dtype=np.uint8), [11, 0])
    with pytest.raises(UsageError, match="uint8"):
        dev.write_payloads(batch, np.zeros((3, 10), dtype=np.uint8), [1, 0, 0])
    assert dev.next_used == 0 and dev.in_flight == 2  # nothing was written
    assert dev.push_used(batch.heads, [64, 0])
    with pytest.raises(UsageError, match="no longer in flight"):
        dev.read_payloads(batch, 8)
    with pytest.raises(UsageError, match="not in flight"):
        dev.push_used([0], [0])


# ============================================================================ wrap-around


@pytest.mark.parametrize("event_idx", [False, True])
def test_indices_wrap_from_near_65535(memory: tuple[GuestMemoryMap, Any], event_idx: bool) -> None:
    p = Pair(memory[0], RING_A, 8, event_idx=event_idx, start_index=65530)
    served = 0
    for lap in range(12):
        n = 1 + lap % 8
        heads = p.driver.add_batch(BUF_A + np.arange(n) * 16, np.full(n, 16), True)
        assert p.driver.kick_needed() in (True, False)
        batch = p.device.pop_batch()
        assert batch.heads.tolist() == heads.tolist()
        assert p.driver.used_pending() == 0 and not p.driver.has_used()
        p.device.push_used(batch.heads[::-1], np.arange(n))
        assert p.driver.used_pending() == n and p.driver.has_used()  # across the wrap too
        ids, lens = p.driver.get_used()
        assert ids.tolist() == heads[::-1].tolist() and lens.tolist() == list(range(n))
        assert p.driver.used_pending() == 0
        served += n
    assert p.driver.avail_idx == (65530 + served) & INDEX_MASK < 65530
    assert p.device.last_avail == p.device.next_used == p.driver.last_used == p.driver.avail_idx
    assert p.driver.broken is None and p.device.broken is None


@pytest.mark.parametrize("event_idx", [False, True])
def test_more_than_65536_buffers_through_a_small_ring(
    memory: tuple[GuestMemoryMap, Any], event_idx: bool
) -> None:
    mem, ram = memory
    q = 256
    p = Pair(mem, RING_A, q, event_idx=event_idx)
    addrs = BUF_A + np.arange(q, dtype=np.uint64) * 8
    kicks = interrupts = total = 0
    while total < 70000:
        p.driver.add_batch(addrs, np.full(q, 8), True)
        kicks += p.driver.kick_needed()
        batch = p.device.pop_batch()
        written = p.device.write_payloads(
            batch, np.full((q, 8), total & 0xFF, dtype=np.uint8), np.full(q, 8)
        )
        interrupts += p.device.push_used(batch.heads, written)
        ids, lens = p.driver.get_used()
        assert len(ids) == q and bool((lens == 8).all())
        total += q
    assert ram[BUF_A] == (total - q) & 0xFF
    assert p.driver.avail_idx == total & INDEX_MASK
    assert kicks == interrupts == total // q  # nobody suppressed anything


# ============================================================================ suppression


def test_kick_suppression_without_event_idx(pair: Pair) -> None:
    d, v = pair.driver, pair.device
    assert not d.kick_needed()  # nothing published
    d.add_chain([(BUF_A, 8, False)])
    assert d.kick_needed()
    assert not d.kick_needed()  # already decided for that one
    v.disable_notifications()
    assert pair.raw.used_flags[0] == VRING_USED_F_NO_NOTIFY
    d.add_chain([(BUF_A, 8, False)])
    assert not d.kick_needed()
    assert v.enable_notifications()  # both buffers are waiting: process, don't sleep
    assert pair.raw.used_flags[0] == 0
    assert len(v.pop_batch()) == 2
    assert not v.enable_notifications()  # nothing left: may sleep
    d.add_chain([(BUF_A, 8, False)])
    assert d.kick_needed()


def test_interrupt_suppression_without_event_idx(pair: Pair) -> None:
    d, v = pair.driver, pair.device
    d.add_batch([BUF_A, BUF_A + 8, BUF_A + 16], [8, 8, 8])
    batch = v.pop_batch()
    assert v.push_used(batch.heads[:1], [0])
    d.disable_interrupts()
    assert pair.raw.avail_flags[0] == VRING_AVAIL_F_NO_INTERRUPT
    assert not v.push_used(batch.heads[1:2], [0])
    assert d.enable_interrupts()  # used entries pending: don't sleep
    assert pair.raw.avail_flags[0] == 0
    assert len(d.get_used()[0]) == 2
    assert not d.enable_interrupts()
    assert v.push_used(batch.heads[2:], [0])


def test_kick_suppression_with_event_idx(memory: tuple[GuestMemoryMap, Any]) -> None:
    p = Pair(memory[0], RING_A, 8, event_idx=True)
    d, v = p.driver, p.device
    d.add_chain([(BUF_A, 8, False)])
    assert d.kick_needed()  # avail_event == 0 lies in [0, 1)
    d.add_chain([(BUF_A, 8, False)])
    assert not d.kick_needed()  # device has not caught up: it was already told
    assert len(v.pop_batch()) == 2  # avail_event follows last_avail (notifications on)
    assert int(p.raw.avail_event[0]) == 2
    d.add_chain([(BUF_A, 8, False)])
    assert d.kick_needed()
    v.disable_notifications()
    assert int(p.raw.avail_event[0]) == 1  # one behind last_avail (2): no kick for the third
    assert int(p.raw.used_flags[0]) == 0  # with EVENT_IDX the flag stays 0 (virtio 2.7.10)
    assert len(v.pop_batch()) == 1
    assert int(p.raw.avail_event[0]) == 2  # refreshed, still one behind
    d.add_batch([BUF_A, BUF_A + 8], [8, 8])
    assert not d.kick_needed()
    assert v.enable_notifications()  # two waiting
    assert int(p.raw.avail_event[0]) == 3
    assert len(v.pop_batch()) == 2
    assert not v.enable_notifications()
    d.add_chain([(BUF_A, 8, False)])
    assert d.kick_needed()


def test_interrupt_suppression_with_event_idx(memory: tuple[GuestMemoryMap, Any]) -> None:
    p = Pair(memory[0], RING_A, 8, event_idx=True)
    d, v = p.driver, p.device
    d.add_batch(BUF_A + np.arange(6) * 8, np.full(6, 8))
    heads = v.pop_batch().heads
    assert v.push_used(heads[:1], [0])  # used_event == 0 in [0, 1)
    assert not v.push_used(heads[1:2], [0])  # driver has not consumed: already interrupted
    assert len(d.get_used()[0]) == 2  # interrupts on: used_event follows last_used
    assert int(p.raw.used_event[0]) == 2
    assert v.push_used(heads[2:3], [0])
    d.disable_interrupts()
    assert int(p.raw.used_event[0]) == 1 and int(p.raw.avail_flags[0]) == 0
    assert not v.push_used(heads[3:4], [0])
    assert len(d.get_used()[0]) == 2
    assert int(p.raw.used_event[0]) == 3  # refreshed, one behind
    assert not v.push_used(heads[4:5], [0])
    assert d.enable_interrupts()  # pending
    assert len(d.get_used()[0]) == 1
    assert not d.enable_interrupts()
    assert v.push_used(heads[5:], [0])


@pytest.mark.parametrize("event_idx", [False, True])
def test_kick_is_forced_after_65535_unkicked_buffers(
    memory: tuple[GuestMemoryMap, Any], event_idx: bool
) -> None:
    """2**16-1 or more buffers published without a kick decision: old..new is ambiguous."""
    p = Pair(memory[0], RING_A, 256, event_idx=event_idx)
    d, v = p.driver, p.device
    v.disable_notifications()
    addrs, lens = BUF_A + np.arange(256) * 8, np.full(256, 8)
    for _ in range(65535 // 256 + 1):
        d.add_batch(addrs, lens)
        v.push_used(v.pop_batch().heads, np.zeros(256, dtype=np.int64))
        d.get_used()
    assert d.kick_needed()  # conservative (spurious) rather than possibly lost


def test_work_bound_per_pass(memory: tuple[GuestMemoryMap, Any]) -> None:
    p = Pair(memory[0], RING_A, 16)
    p.driver.add_batch(BUF_A + np.arange(16) * 8, np.full(16, 8))
    assert len(p.device.pop_batch(max_n=3)) == 3
    assert len(p.device.pop_batch(max_n=0)) == 0
    assert len(p.device.pop_batch()) == 13
    p.device.push_used(np.arange(16), np.zeros(16, dtype=np.int64))
    p.driver.get_used()
    for i in range(4):  # four chains of four descriptors
        p.driver.add_chain([(BUF_A + 64 * i + 8 * j, 8, False) for j in range(4)])
    batch = p.device.pop_batch(max_descriptors=5)  # stops after the chain that crossed 5
    assert len(batch) == 2 and p.device.last_avail == 18
    assert len(p.device.pop_batch(max_descriptors=1)) == 1  # always at least one chain
    with pytest.raises(UsageError):
        p.device.pop_batch(max_n=-1)


# ============================================================================ malicious guest


@pytest.fixture
def victim_and_bystander(memory: tuple[GuestMemoryMap, Any]) -> Iterator[tuple[Pair, Pair]]:
    mem, _ = memory
    victim, bystander = Pair(mem, RING_A, 8), Pair(mem, RING_B, 8)
    round_trip(victim, BUF_A)  # both work before the attack
    round_trip(bystander, BUF_B)
    yield victim, bystander
    # The victim is broken, stays quiet, and never raises; the bystander keeps working.
    dev = victim.device
    assert dev.broken is not None
    assert len(dev.pop_batch()) == 0
    assert not dev.push_used([], [])
    assert not dev.enable_notifications()
    dev.disable_notifications()
    assert not dev.has_available()
    assert dev.broken is not None
    round_trip(bystander, BUF_B, n=8)
    assert bystander.device.broken is None and bystander.driver.broken is None
    # A reset (and the driver re-initialising its ring) brings the victim back.
    victim.driver.reset()
    dev.reset()
    assert dev.broken is None
    round_trip(victim, BUF_A)


def expect_broken(p: Pair, pattern: str) -> None:
    batch = p.device.pop_batch()  # must not raise
    assert len(batch) == 0
    assert p.device.broken is not None
    assert re.search(pattern, p.device.broken), p.device.broken


def test_avail_index_jump(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    v.raw.avail_idx[0] = int(v.raw.avail_idx[0]) + 9
    expect_broken(v, "avail index jumped")


def test_head_out_of_range(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    v.raw.set_desc(0, BUF_A, 8)
    v.raw.post(0, 8)
    expect_broken(v, "head 8 out of range")
    assert v.device.in_flight == 0  # nothing was taken, not even the good head


def test_next_out_of_range(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    v.raw.set_desc(0, BUF_A, 8, VRING_DESC_F_NEXT, 200)
    v.raw.post(0)
    expect_broken(v, "next 200")


def test_descriptor_loop(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    v.raw.set_desc(0, BUF_A, 8, VRING_DESC_F_NEXT, 1)
    v.raw.set_desc(1, BUF_A, 8, VRING_DESC_F_NEXT, 2)
    v.raw.set_desc(2, BUF_A, 8, VRING_DESC_F_NEXT, 0)
    v.raw.post(0)
    with timing.within(1.0, "finding the descriptor loop"):  # bounded walk, no spinning
        expect_broken(v, "loop")


def test_self_loop(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    v.raw.set_desc(3, BUF_A, 8, VRING_DESC_F_NEXT, 3)
    v.raw.post(3)
    expect_broken(v, "loop")


def test_chain_longer_than_queue(
    victim_and_bystander: tuple[Pair, Pair], memory: tuple[GuestMemoryMap, Any]
) -> None:
    v, _ = victim_and_bystander
    mem, _ = memory
    table = np.zeros(9, dtype=DESC_DTYPE)
    for i in range(9):
        table[i] = (BUF_A + 8 * i, 8, VRING_DESC_F_NEXT if i < 8 else 0, i + 1 if i < 8 else 0)
    mem.write(TABLES, table)
    v.raw.set_desc(0, TABLES, 16 * 9, VRING_DESC_F_INDIRECT)
    v.raw.post(0)
    expect_broken(v, "longer than the queue")


def _indirect_table(*entries: tuple[int, int, int, int]) -> npt.NDArray[Any]:
    table = np.zeros(len(entries), dtype=DESC_DTYPE)
    for i, e in enumerate(entries):
        table[i] = e
    return table


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("len0", "not a non-zero multiple of 16"),
        ("len24", "not a non-zero multiple of 16"),
        ("nested", "nested indirect"),
        ("outside", "indirect table outside guest memory"),
        ("gap", "indirect table outside guest memory"),
        ("with_next", "indirect descriptor also has NEXT"),
        ("after_normal_with_next", "indirect descriptor 1 also has NEXT"),
        ("after_normal_nested", "nested indirect"),
        ("after_normal_len24", "not a non-zero multiple of 16"),
        ("after_normal_outside", "indirect table outside guest memory"),
        ("after_normal_table_too_long", "indirect table of 9 descriptors is longer than"),
        ("after_normal_too_many", "2 buffers and an indirect table: longer than the queue"),
        ("after_normal_writable_then_readable", "follows a device-writable"),
        ("after_normal_huge_buffer", "longer than the 16777216-byte limit"),
        ("after_normal_bad_normal", "outside guest memory"),
        ("next_range", "next 5 >= table size 2"),
        ("loop", "loop in its indirect table"),
        ("bad_buffer", "outside guest memory"),
    ],
)
def test_bad_indirect(
    victim_and_bystander: tuple[Pair, Pair],
    memory: tuple[GuestMemoryMap, Any],
    case: str,
    pattern: str,
) -> None:
    v, _ = victim_and_bystander
    mem, _ = memory
    good = _indirect_table((BUF_A, 8, VRING_DESC_F_NEXT, 1), (BUF_A + 8, 8, VRING_DESC_F_WRITE, 0))
    mem.write(TABLES, good)
    head = (TABLES, 32, VRING_DESC_F_INDIRECT, 0)
    if case == "len0":
        head = (TABLES, 0, VRING_DESC_F_INDIRECT, 0)
    elif case == "len24":
        head = (TABLES, 24, VRING_DESC_F_INDIRECT, 0)
    elif case == "nested":
        mem.write(TABLES, _indirect_table((BUF_A, 8, VRING_DESC_F_NEXT, 1), (TABLES, 32, 4, 0)))
    elif case == "outside":
        head = (0x5000_0000, 32, VRING_DESC_F_INDIRECT, 0)
    elif case == "gap":
        head = (GAP_START - 16, 32, VRING_DESC_F_INDIRECT, 0)
    elif case == "with_next":
        head = (TABLES, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1)
    elif case.startswith("after_normal"):
        # one or two normal descriptors, then the indirect one (allowed in itself)
        head = (BUF_A, 8, VRING_DESC_F_NEXT, 1)
        ind = (TABLES, 32, VRING_DESC_F_INDIRECT, 0)
        if case == "after_normal_with_next":
            ind = (TABLES, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 2)
            v.raw.set_desc(2, BUF_A + 0x40, 8, VRING_DESC_F_WRITE)
        elif case == "after_normal_nested":
            mem.write(TABLES, _indirect_table((BUF_A, 8, VRING_DESC_F_NEXT, 1), (TABLES, 32, 4, 0)))
        elif case == "after_normal_len24":
            ind = (TABLES, 24, VRING_DESC_F_INDIRECT, 0)
        elif case == "after_normal_outside":
            ind = (GAP_START - 16, 32, VRING_DESC_F_INDIRECT, 0)
        elif case == "after_normal_table_too_long":
            ind = (TABLES, 16 * 9, VRING_DESC_F_INDIRECT, 0)
        elif case == "after_normal_too_many":
            # two normal buffers and a table of 7: 9 buffers in a queue of 8
            head = (BUF_A, 8, VRING_DESC_F_NEXT, 2)
            v.raw.set_desc(2, BUF_A + 8, 8, VRING_DESC_F_NEXT, 1)
            mem.write(
                TABLES,
                _indirect_table(
                    *[(BUF_A + 8 * i, 8, VRING_DESC_F_NEXT, i + 1) for i in range(6)],
                    (BUF_A + 48, 8, 0, 0),
                ),
            )
            ind = (TABLES, 16 * 7, VRING_DESC_F_INDIRECT, 0)
        elif case == "after_normal_writable_then_readable":
            head = (BUF_A, 8, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1)  # table starts readable
        elif case == "after_normal_huge_buffer":
            mem.write(
                TABLES, _indirect_table((BUF_A, MAX_BUFFER_LEN + 1, 0, 0), (BUF_A, 8, 0, 0))[:1]
            )
            ind = (TABLES, 16, VRING_DESC_F_INDIRECT, 0)
        elif case == "after_normal_bad_normal":
            head = (0x7000_0000, 8, VRING_DESC_F_NEXT, 1)
        v.raw.set_desc(1, *ind)
    elif case == "next_range":
        mem.write(TABLES, _indirect_table((BUF_A, 8, VRING_DESC_F_NEXT, 5), (BUF_A, 8, 0, 0)))
    elif case == "loop":
        mem.write(
            TABLES,
            _indirect_table((BUF_A, 8, VRING_DESC_F_NEXT, 1), (BUF_A, 8, VRING_DESC_F_NEXT, 0)),
        )
    elif case == "bad_buffer":
        mem.write(TABLES, _indirect_table((0x7000_0000, 8, 0, 0), (BUF_A, 8, 0, 0)))
    v.raw.set_desc(0, *head)
    v.raw.post(0)
    expect_broken(v, pattern)


@pytest.mark.parametrize(
    ("addr", "length", "flags", "pattern"),
    [
        (0x4000_0000, 8, 0, "outside guest memory"),  # beyond every slot
        (GAP_START + 0x1000, 8, 0, "outside guest memory"),  # inside the gap
        (TOP - 8, 16, 0, "overflows the 64-bit address space"),
        (TOP - 1, 1, 0, "outside guest memory"),  # no overflow, just unmapped
        (GAP_START - 8, 16, 0, "crosses the end of its memory slot"),  # straddles the gap
        (SLOT2 - 8, 16, 0, "crosses the end of its memory slot"),  # spans two adjacent slots
        (BUF_A, 0, 0, "zero-length"),
        (BUF_A, 0xFFFF_FFFF, 0, "longer than the 16777216-byte limit"),  # a "4 GiB" buffer
        (BUF_A, MAX_BUFFER_LEN + 1, 0, "longer than"),
        (ROM, 16, VRING_DESC_F_WRITE, "read-only memory"),
    ],
)
def test_bad_buffer(
    victim_and_bystander: tuple[Pair, Pair], addr: int, length: int, flags: int, pattern: str
) -> None:
    v, _ = victim_and_bystander
    v.raw.set_desc(0, BUF_A, 8)  # a good buffer first: the whole batch is refused
    v.raw.set_desc(1, addr, length, flags)
    v.raw.post(0, 1)
    expect_broken(v, pattern)


def test_bad_buffer_inside_a_chain(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    v.raw.set_desc(0, BUF_A, 8, VRING_DESC_F_NEXT, 1)
    v.raw.set_desc(1, GAP_START - 4, 8, VRING_DESC_F_WRITE)
    v.raw.post(0)
    expect_broken(v, "crosses the end")


def test_readable_after_writable_in_a_chain(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    v.raw.set_desc(0, BUF_A, 8, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1)
    v.raw.set_desc(1, BUF_A + 8, 8, 0)
    v.raw.post(0)
    expect_broken(v, "follows a device-writable")


def test_reading_rom_is_fine(pair: Pair) -> None:
    pair.driver.add_chain([(ROM, 16, False)])
    batch = pair.device.pop_batch()
    assert pair.device.broken is None
    assert pair.device.read_payloads(batch, 16)[1].tolist() == [16]


def test_more_in_flight_than_queue_size(victim_and_bystander: tuple[Pair, Pair]) -> None:
    """CVE-2016-5403: the guest makes more requests available than the queue can hold."""
    v, _ = victim_and_bystander
    v.driver.add_batch(BUF_A + np.arange(8) * 8, np.full(8, 8))
    assert len(v.device.pop_batch()) == 8
    v.raw.post(0)  # a ninth request while all eight are in flight
    expect_broken(v, "exceed the queue size")


def test_head_reused_while_in_flight(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    head = v.driver.add_chain([(BUF_A, 8, False)])
    assert len(v.device.pop_batch()) == 1
    v.raw.post(head)
    expect_broken(v, "again while in flight")


def test_head_posted_twice_in_one_batch(victim_and_bystander: tuple[Pair, Pair]) -> None:
    v, _ = victim_and_bystander
    v.raw.set_desc(2, BUF_A, 8)
    v.raw.post(2, 2)
    expect_broken(v, "twice")


def test_descriptor_rewritten_after_posting(pair: Pair, memory: tuple[GuestMemoryMap, Any]) -> None:
    """The device acts on its private copy: a later rewrite changes nothing (no TOCTOU)."""
    mem, _ = memory
    mem.write(BUF_A, b"original")
    pair.driver.add_batch([BUF_A, BUF_A + 0x100], [8, 8], [False, True])
    batch = pair.device.pop_batch()
    pair.raw.set_desc(0, 0xDEAD_0000, 0xFFFF_FFFF, VRING_DESC_F_NEXT, 77)  # now pure garbage
    pair.raw.set_desc(1, ROM, 4096, VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT, 99)
    mem.write(BUF_A + 0x100, b"\0" * 8)
    assert batch.chains() == [(Segment(BUF_A, 8, False),), (Segment(BUF_A + 0x100, 8, True),)]
    data, _ = pair.device.read_payloads(batch, 8)
    assert bytes(data[0]) == b"original"
    written = pair.device.write_payloads(batch, np.full((2, 8), 0x55, dtype=np.uint8), [0, 8])
    assert mem.read(BUF_A + 0x100, 8) == b"\x55" * 8
    pair.device.push_used(batch.heads, written)
    assert pair.device.broken is None
    assert pair.driver.get_used()[1].tolist() == [0, 8]


def test_chained_descriptor_is_read_once(pair: Pair, memory: tuple[GuestMemoryMap, Any]) -> None:
    """Even in the slow path every descriptor comes from one read: rewriting the chain's tail
    after pop_batch does not change the batch."""
    head = pair.driver.add_chain([(BUF_A, 8, False), (BUF_A + 8, 8, True)])
    batch = pair.device.pop_batch()
    tail = int(pair.raw.desc[head]["next"])
    pair.raw.set_desc(tail, 0x4000_0000, 1, VRING_DESC_F_NEXT, tail)
    assert batch.chain(0) == (Segment(BUF_A, 8, False), Segment(BUF_A + 8, 8, True))
    assert pair.device.push_used(batch.heads, [8]) and pair.device.broken is None


@pytest.mark.parametrize(
    ("addrs", "pattern"),
    [
        ((0x8, 0x1000, 0x2000), "misaligned"),
        ((0x0, 0x1001, 0x2000), "misaligned"),
        ((0x0, 0x1000, 0x2002), "misaligned"),
        ((0x5000_0000, 0x1000, 0x2000), "outside guest memory"),
        ((GAP_START - 16, 0x1000, 0x2000), "outside guest memory"),
        ((0x0, 0x1000, ROM), "read-only"),
    ],
)
def test_bad_ring_addresses_start_broken(
    memory: tuple[GuestMemoryMap, Any], addrs: tuple[int, int, int], pattern: str
) -> None:
    mem, _ = memory
    dev = DeviceRing(mem, *addrs, 8, event_idx=False)
    assert dev.broken is not None and pattern in dev.broken
    assert len(dev.pop_batch()) == 0 and not dev.enable_notifications()
    dev.reset()
    assert dev.broken is not None and pattern in dev.broken


def test_kick_storm_is_bounded(memory: tuple[GuestMemoryMap, Any]) -> None:
    """A guest re-posting as fast as it can never makes one pass do more than max_n chains."""
    p = Pair(memory[0], RING_A, 64)
    for _ in range(20):
        while p.driver.free_descriptors:
            p.driver.add_chain([(BUF_A, 8, False)])
        batch = p.device.pop_batch(max_n=16)
        assert len(batch) == 16
        p.device.push_used(batch.heads, np.zeros(16, dtype=np.int64))
        p.driver.get_used()


# ============================================================================ malicious device


@pytest.mark.parametrize(
    ("tamper", "pattern", "returned"),
    [
        ("id_range", "out of range", 1),
        ("not_in_flight", "not in flight", 1),
        ("duplicate", "not in flight", 1),
        ("len", "exceeds its writable capacity", 1),
        ("idx_jump", "used index moved by 5", 0),
    ],
)
def test_driver_does_not_trust_the_device(
    pair: Pair, tamper: str, pattern: str, returned: int
) -> None:
    heads = pair.driver.add_batch([BUF_A, BUF_A + 8, BUF_A + 16], [8, 8, 8], True)
    raw = pair.raw
    raw.used_ring[0] = (int(heads[0]), 8)
    second = {
        "id_range": (8, 0),
        "not_in_flight": (5, 0),
        "duplicate": (int(heads[0]), 0),
        "len": (int(heads[1]), 9),
        "idx_jump": (int(heads[1]), 0),
    }[tamper]
    raw.used_ring[1] = second
    raw.used_idx[0] = 5 if tamper == "idx_jump" else 2
    assert pair.driver.used_pending() == (5 if tamper == "idx_jump" else 2)  # its word, unchecked
    ids, _ = pair.driver.get_used()
    assert len(ids) == returned
    assert pair.driver.broken is not None and pattern in pair.driver.broken
    assert pair.driver.used_pending() == 0
    assert len(pair.driver.get_used()[0]) == 0
    assert not pair.driver.kick_needed() and not pair.driver.enable_interrupts()
    with pytest.raises(UsageError, match="broken"):
        pair.driver.add_chain([(BUF_A, 8, False)])
    pair.driver.reset()
    pair.device.reset()
    round_trip(pair, BUF_A)


# ============================================================================ property test


class Model:
    """Drives both sides through a random program and checks them against a reference."""

    def __init__(self, q: int, event_idx: bool, start: int, seed: int) -> None:
        mem, _ = make_memory()
        self.p = Pair(mem, RING_A, q, event_idx=event_idx, start_index=start)
        self.mem = mem
        self.q = q
        self.rng = random.Random(seed)
        self.serial = 0  # one per posted chain
        self.addr = 0
        self.posted: dict[int, int] = {}  # driver: head -> serial
        self.cap: dict[int, int] = {}  # serial -> writable capacity
        self.held: list[int] = []  # device: heads taken, not completed
        self.expected: dict[int, int] = {}  # head -> used len pushed by the device
        self.returned: set[int] = set()
        self.tables = list(range(q))  # indirect table slots
        self.table_of: dict[int, int] = {}
        self.chain_len: dict[int, int] = {}  # head -> descriptors, for chains of several
        self.dev_sleeping = self.drv_sleeping = False
        self.kick_pending = self.irq_pending = False

    # -- driver
    def _buffer(self) -> tuple[int, int]:
        self.addr = (self.addr + 32) % 0x20000
        return BUF_A + self.addr, 1 + self.rng.randrange(32)

    def _posted(self, head: int, cap: int) -> None:
        self.serial += 1
        self.posted[head] = self.serial
        self.cap[self.serial] = cap

    def _after_publish(self) -> None:
        if self.p.driver.kick_needed():
            if self.dev_sleeping:
                self.dev_sleeping = False  # the kick wakes it
            else:
                self.kick_pending = True

    def add_batch(self, arg: int) -> None:
        self.drv_sleeping = False
        free = self.p.driver.free_descriptors
        if not free:
            return
        n = 1 + arg % free
        bufs = [self._buffer() for _ in range(n)]
        writable = [self.rng.random() < 0.5 for _ in range(n)]
        first = self.serial + 1
        self.serial += n
        heads = self.p.driver.add_batch([b[0] for b in bufs], [b[1] for b in bufs], writable)
        for i, h in enumerate(heads.tolist()):
            self.posted[h] = first + i
            self.cap[first + i] = bufs[i][1] if writable[i] else 0
        self._after_publish()

    def add_chain(self, arg: int) -> None:
        self.drv_sleeping = False
        free = self.p.driver.free_descriptors
        if not free:
            return
        n = 1 + arg % min(free, 3)
        segs = []
        for i in range(n):
            addr, length = self._buffer()
            segs.append((addr, length, i > 0 and arg & 1 == 1))
        indirect = arg & 2 == 2 and bool(self.tables)
        if indirect:
            slot = self.tables.pop()
            gpa = TABLES + slot * 64
            head = self.p.driver.add_indirect(self.mem.translate(gpa, 64), gpa, segs)
            self.table_of[head] = slot
        else:
            head = self.p.driver.add_chain(segs)
        self.chain_len[head] = 1 if indirect else n  # descriptors taken from the ring
        self._posted(head, sum(s[1] for s in segs if s[2]))
        self._after_publish()

    def get_used(self, arg: int) -> None:
        self.drv_sleeping = False
        ids, lens = self.p.driver.get_used(1 + arg % self.q)
        for head, length in zip(ids.tolist(), lens.tolist(), strict=True):
            serial = self.posted.pop(head)
            assert serial not in self.returned, "a buffer came back twice"
            self.returned.add(serial)
            assert length == self.expected.pop(head)
            self.chain_len.pop(head, None)
            if head in self.table_of:
                self.tables.append(self.table_of.pop(head))

    def drv_disable(self, arg: int) -> None:
        self.drv_sleeping = False
        self.p.driver.disable_interrupts()

    def drv_sleep(self, arg: int) -> None:
        if self.p.driver.enable_interrupts():
            self.drv_sleeping = False  # work is there: process instead
        elif self.irq_pending:
            self.irq_pending = False  # the eventfd is already readable
            self.drv_sleeping = False
        else:
            self.drv_sleeping = True

    # -- device
    def pop(self, arg: int) -> None:
        self.dev_sleeping = False
        batch = self.p.device.pop_batch(1 + arg % self.q)
        self.held.extend(batch.heads.tolist())

    def complete(self, arg: int) -> None:
        self.dev_sleeping = False
        if not self.held:
            return
        self.rng.shuffle(self.held)
        k = 1 + arg % len(self.held)
        done, self.held = self.held[:k], self.held[k:]
        lens = [self.rng.randint(0, self.cap[self.posted[h]]) for h in done]
        for h, n in zip(done, lens, strict=True):
            self.expected[h] = n
        if self.p.device.push_used(done, lens):
            if self.drv_sleeping:
                self.drv_sleeping = False
            else:
                self.irq_pending = True

    def dev_disable(self, arg: int) -> None:
        self.dev_sleeping = False
        self.p.device.disable_notifications()

    def dev_sleep(self, arg: int) -> None:
        if self.p.device.enable_notifications():
            self.dev_sleeping = False
        elif self.kick_pending:
            self.kick_pending = False
            self.dev_sleeping = False
        else:
            self.dev_sleeping = True

    def check(self) -> None:
        assert self.p.driver.broken is None and self.p.device.broken is None
        # No lost notification: a sleeper never has work waiting without a signal.
        if self.dev_sleeping:
            assert not self.p.device.has_available(), "device sleeps on available work"
        if self.drv_sleeping:
            assert not self.p.driver.has_used(), "driver sleeps on used entries"
        assert self.p.driver.in_flight == len(self.posted)
        assert self.p.device.in_flight == len(self.held)
        # The module's invariants:
        d, v = self.p.driver, self.p.device
        assert (d.avail_idx - d.last_used) & INDEX_MASK == d.in_flight <= self.q
        assert (v.last_avail - v.next_used) & INDEX_MASK == v.in_flight <= self.q
        assert d.free_descriptors + sum(self.chain_len.get(h, 1) for h in self.posted) == self.q

    def drain(self) -> None:
        for _ in range(2 * self.q + 2):  # whatever suppression says, polling finds it all
            self.pop(self.q - 1)  # max_n = q
            self.complete(max(len(self.held) - 1, 0))  # all of them
            self.get_used(self.q - 1)
            self.check()
        assert not self.posted and not self.held
        assert self.returned == set(range(1, self.serial + 1))


OPS = [
    "add_batch",
    "add_chain",
    "get_used",
    "drv_disable",
    "drv_sleep",
    "pop",
    "complete",
    "dev_disable",
    "dev_sleep",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.sampled_from([1, 2, 4, 8]),
    event_idx=st.booleans(),
    start=st.one_of(st.just(0), st.integers(65520, 65535), st.integers(0, INDEX_MASK)),
    seed=st.integers(0, 2**32),
    program=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 255)), min_size=5, max_size=80),
)
def test_both_sides_against_a_reference_model(
    q: int, event_idx: bool, start: int, seed: int, program: list[tuple[str, int]]
) -> None:
    model = Model(q, event_idx, start, seed)
    for op, arg in program:
        getattr(model, op)(arg)
        model.check()
    model.drain()
    model.check()


@pytest.mark.parametrize("event_idx", [False, True])
def test_reference_model_seeded_programs(event_idx: bool) -> None:
    """The same model over many plain random programs: a deterministic complement to the
    shrinking search above, long enough to wrap the indices of small rings."""
    rng = random.Random(7)
    for run in range(120):
        q = rng.choice([1, 2, 4, 8, 16])
        start = rng.choice([0, 65535 - rng.randrange(40), rng.randrange(1 << 16)])
        model = Model(q, event_idx, start, run)
        for _ in range(150):
            getattr(model, rng.choice(OPS))(rng.randrange(256))
            model.check()
        model.drain()
        model.check()


# ============================================================================ threads


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_lost_wakeup_between_two_threads(event_idx: bool) -> None:
    """Driver and device threads sleep on threading.Events (the "eventfds") only when the ring
    API says they may. The driver pipelines bursts (posting while the device works, waiting
    only when the ring is full or at a random drain point); the device takes and completes
    random-sized pieces. Everything must complete, nobody may time out."""
    mem, _ = make_memory()
    p = Pair(mem, RING_A, 16, event_idx=event_idx)
    kick, irq, stop = threading.Event(), threading.Event(), threading.Event()
    errors: list[str] = []
    bursts, timeout = 1500, timing.scaled(10.0)
    stats = {"kicks": 0, "irqs": 0, "dev_sleeps": 0, "drv_sleeps": 0, "completed": 0}

    def device() -> None:
        try:
            dev = p.device
            rng = random.Random(11)
            while not stop.is_set():
                dev.disable_notifications()
                while len(batch := dev.pop_batch(max_n=1 + rng.randrange(16))):
                    cut = rng.randrange(len(batch) + 1)
                    for part in (slice(0, cut), slice(cut, None)):
                        heads = batch.heads[part]
                        if rng.random() < 0.2:
                            time.sleep(0)
                        if dev.push_used(heads, np.minimum(batch.writable_lens[part], 4)):
                            stats["irqs"] += 1
                            irq.set()
                if dev.broken:
                    errors.append(f"device broke: {dev.broken}")
                    return
                if rng.random() < 0.3:
                    time.sleep(0)  # jitter: widen the "found nothing, not yet re-enabled" window
                if dev.enable_notifications():
                    continue  # more arrived while notifications were off
                stats["dev_sleeps"] += 1
                if not kick.wait(timeout):
                    errors.append("device: lost kick (slept with work pending)")
                    return
                kick.clear()
        except Exception as e:  # reported by the main thread
            errors.append(f"device raised {e!r}")

    def driver() -> None:
        drv = p.driver
        jitter = random.Random(6)

        def reap_or_sleep() -> bool:
            drv.disable_interrupts()
            got = len(drv.get_used()[0])
            stats["completed"] += got
            if not got and jitter.random() < 0.3:
                time.sleep(0)  # widen the "found nothing, not yet re-enabled" window
            if got or drv.enable_interrupts():
                return True
            stats["drv_sleeps"] += 1
            if not irq.wait(timeout):
                errors.append(f"driver: lost interrupt ({drv.in_flight} in flight)")
                return False
            irq.clear()
            return True

        try:
            rng = random.Random(5)
            for _ in range(bursts):
                n = 1 + rng.randrange(8)
                while drv.free_descriptors < n:  # ring full: wait for completions
                    if not reap_or_sleep():
                        return
                drv.add_batch(BUF_A + np.arange(n) * 16, np.full(n, 16), rng.random() < 0.5)
                if drv.kick_needed():
                    stats["kicks"] += 1
                    kick.set()
                if rng.random() < 0.1:  # sometimes wait for everything
                    while drv.in_flight:
                        if not reap_or_sleep():
                            return
                if drv.broken:
                    errors.append(f"driver broke: {drv.broken}")
                    return
            while drv.in_flight:
                if not reap_or_sleep():
                    return
        except Exception as e:
            errors.append(f"driver raised {e!r}")
        finally:
            stop.set()
            kick.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: more interleavings
    try:
        threads = [threading.Thread(target=device), threading.Thread(target=driver)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * timeout)
        hung = [t for t in threads if t.is_alive()]
        if hung:
            stop.set()
            kick.set()
            irq.set()
            for t in hung:
                t.join(timing.scaled(5))
    finally:
        sys.setswitchinterval(old)
    assert not hung, f"threads hung: {stats}"
    assert not errors, f"{errors} {stats}"
    assert p.driver.in_flight == 0 and p.device.in_flight == 0
    assert p.driver.avail_idx == p.driver.last_used == p.device.next_used
    assert stats["kicks"] > 0 and stats["irqs"] > 0 and stats["drv_sleeps"] > 0


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("writable", [False, True])
def test_add_one_is_add_batch_of_one(event_idx: bool, writable: bool) -> None:
    """Same heads, same ring bytes, same private state as one-buffer add_batch calls."""
    mem_a, _ = make_memory()
    mem_b, _ = make_memory()
    a = Pair(mem_a, RING_A, 8, event_idx=event_idx)
    b = Pair(mem_b, RING_A, 8, event_idx=event_idx)
    for i in range(20):  # wraps the ring twice
        addr, length = SLOT1 + 64 * i, 1 + i
        head = a.driver.add_one(addr, length, writable)
        assert isinstance(head, int)
        assert [head] == b.driver.add_batch([addr], [length], writable).tolist()
        assert bytes(a.area) == bytes(b.area)
        assert a.driver.kick_needed() == b.driver.kick_needed()
        for p in (a, b):
            batch = p.device.pop_batch()
            p.device.push_used(batch.heads, np.zeros(len(batch), np.uint32))
            p.driver.get_used()
        assert a.driver.free_descriptors == b.driver.free_descriptors


@pytest.mark.parametrize(
    ("addr", "length", "match"),
    [
        (-1, 8, "non-negative ints"),
        (1 << 64, 8, "non-negative ints"),
        (0, -1, "non-negative"),
        (True, 8, "non-negative ints"),
        (0, 8.0, "non-negative ints"),
        (0, 0, "lengths must be"),
        (0, 1 << 32, "lengths must be"),
        ((1 << 64) - 4, 8, "past the end"),
    ],
)
def test_add_one_refuses_bad_buffers_and_posts_nothing(
    pair: Pair, addr: Any, length: Any, match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        pair.driver.add_one(addr, length)
    assert pair.driver.free_descriptors == 8 and pair.driver.avail_idx == 0


def test_add_one_needs_a_free_descriptor(pair: Pair) -> None:
    for i in range(8):
        pair.driver.add_one(SLOT1 + i, 1)
    with pytest.raises(UsageError, match="free descriptors"):
        pair.driver.add_one(SLOT1, 1)
    assert pair.driver.avail_idx == 8


def test_read_payloads_into_the_devices_buffer(memory: tuple[GuestMemoryMap, Any]) -> None:
    """``out``: the same bytes and counts as without it, written into (a view of) the
    caller's buffer, stale bytes beyond each copy zeroed -- simple and chained batches."""
    mem, ram = memory
    ram[BUF_A : BUF_A + 0x4000] = np.random.default_rng(5).integers(0, 256, 0x4000)
    p = Pair(mem, RING_A, 64)
    n = 40  # above the scalar threshold: the vectorized gather when the path allows it
    p.driver.add_batch([BUF_A + 64 * i for i in range(n)], [64 - i % 3 for i in range(n)])
    p.driver.add_chain([(BUF_A, 8, False), (BUF_A + 0x100, 8, False)])
    p.driver.add_batch([BUF_A + 0x2000], [64])
    for batch in (p.device.pop_batch(max_n=n), p.device.pop_batch(max_n=1), p.device.pop_batch()):
        want, want_n = p.device.read_payloads(batch, 64)
        out = np.full((len(batch) + 3, 80), 0xEE, dtype=np.uint8)
        got, got_n = p.device.read_payloads(batch, 64, out=out)
        assert np.array_equal(got, want) and got_n.tolist() == want_n.tolist()
        assert np.shares_memory(got, out) and (out[len(batch) :] == 0xEE).all()


@pytest.mark.parametrize(
    "out",
    [
        np.zeros((1, 64), dtype=np.uint8),
        np.zeros((4, 8), dtype=np.uint8),
        np.zeros((4, 64), dtype=np.int16),
        np.zeros(256, dtype=np.uint8),
        np.zeros((64, 4), dtype=np.uint8).T,
        b"\0" * 256,
    ],
    ids=["rows", "width", "dtype", "1-D", "not-contiguous", "bytes"],
)
def test_read_payloads_refuses_a_bad_out(pair: Pair, out: Any) -> None:
    pair.driver.add_batch([BUF_A, BUF_A + 64], [16, 16])
    batch = pair.device.pop_batch()
    with pytest.raises(UsageError, match="out must be"):
        pair.device.read_payloads(batch, 16, out=out)
    assert pair.device.broken is None


def test_batch_rows_are_the_chains_they_slice(memory: tuple[GuestMemoryMap, Any]) -> None:
    mem, _ = memory
    p = Pair(mem, RING_A, 16)
    p.driver.add_batch([BUF_A, BUF_A + 64], [16, 16])
    p.driver.add_chain([(BUF_A + 128, 8, False), (BUF_A + 256, 8, True)])
    p.driver.add_chain([(BUF_A + 512, 4, False), (BUF_A + 520, 4, False), (BUF_A + 600, 2, True)])
    p.driver.add_batch([BUF_A + 700], [5], True)
    batch = p.device.pop_batch()
    chains = batch.chains()
    for lo in range(-1, 6):
        for hi in range(lo, 7):
            part = batch.rows(lo, hi)
            want = chains[max(lo, 0) : max(hi, 0)]
            assert part.chains() == want, (lo, hi)
            assert part.head_list == batch.head_list[max(lo, 0) : max(hi, 0)]
            assert len(part) == len(want)
            assert part.readable_list == batch.readable_list[max(lo, 0) : max(hi, 0)]
            assert part.writable_list == batch.writable_list[max(lo, 0) : max(hi, 0)]
    data, copied = p.device.read_payloads(batch.rows(2, 3), 16)
    assert copied.tolist() == [8] and len(data) == 1


class _CountingArray(np.ndarray):  # type: ignore[type-arg]
    """An array view that counts the items its ``tolist`` converts (slices are views of the
    same class, so converting a slice counts only its items)."""

    converted = 0

    def tolist(self) -> Any:
        _CountingArray.converted += self.size
        return super().tolist()


def test_walking_a_32768_chain_batch_is_linear() -> None:
    """chain(i) converts only chain i's entries and chains() each field once: walking a full
    queue of 32768 chains chain by chain converts O(N) items (converting whole fields on
    every call took minutes)."""
    q = 32768
    layout = RingLayout(q)
    mem = GuestMemoryMap()
    mem.add(0, 0, np.zeros(layout.size + 0x10000, dtype=np.uint8))
    buf = layout.size + 0x100
    driver = DriverRing(
        mem.translate(0, layout.size), layout, event_idx=False, fast_path=PATHS.fast
    )
    device = DeviceRing.from_layout(mem, 0, layout, event_idx=False, fast_path=PATHS.fast)
    writable = np.arange(q) % 3 == 0
    heads = driver.add_batch(buf + np.arange(q) % 512, 1 + np.arange(q) % 7, writable)
    batch = device.pop_batch()
    assert device.broken is None and len(batch) == q
    for k in (1, 2, 3, 4):  # starts, addrs, lens, flags
        batch._arrays[k] = batch._arrays[k].view(_CountingArray)  # type: ignore[union-attr]
    _CountingArray.converted = 0
    walked = [batch.chain(i) for i in range(q)]
    assert _CountingArray.converted <= 5 * q  # 2 starts and 3 fields of 1 segment per chain
    assert batch.chain(-1) == walked[-1]
    _CountingArray.converted = 0
    assert batch.chains() == walked
    assert _CountingArray.converted == 4 * q + 1  # each field once
    # chain i is buffer i, in posting order
    assert walked == [(Segment(buf + i % 512, 1 + i % 7, bool(writable[i])),) for i in range(q)]
    assert batch.head_list == heads.tolist()
    with pytest.raises(IndexError):
        batch.chain(q)


def test_walking_a_batch_of_chains_is_linear(memory: tuple[GuestMemoryMap, Any]) -> None:
    """The same for a batch of multi-descriptor chains (and write_payloads, which walks it)."""
    mem, _ = memory
    p = Pair(mem, RING_A, 256)
    for i in range(128):
        p.driver.add_chain([(BUF_A + 16 * i, 8, False), (BUF_A + 0x4000 + 16 * i, 8, True)])
    batch = p.device.pop_batch()
    assert len(batch) == 128 and not batch.simple
    for k in (1, 2, 3, 4):
        batch._arrays[k] = batch._arrays[k].view(_CountingArray)  # type: ignore[union-attr]
    _CountingArray.converted = 0
    for i in range(128):
        assert batch.chain(i) == (
            Segment(BUF_A + 16 * i, 8, False),
            Segment(BUF_A + 0x4000 + 16 * i, 8, True),
        )
    p.device.write_payloads(batch, np.full((128, 8), 9, dtype=np.uint8), np.full(128, 8))
    assert _CountingArray.converted <= 2 * (2 + 3 * 2) * 128
    assert mem.read(BUF_A + 0x4000, 8) == b"\x09" * 8


# ============================================================================ separate areas

# q = 8: desc 128 bytes, avail 22, used 70. Non-adjacent, in the order avail < used < desc,
# each only minimally aligned (desc 16 but not 32, avail 2 but not 4, used 4 but not 8).
SEP_DESC, SEP_AVAIL, SEP_USED = 0x7010, 0x3002, 0x5004


@pytest.mark.parametrize("event_idx", [False, True])
def test_separately_placed_areas_interoperate(
    memory: tuple[GuestMemoryMap, Any], event_idx: bool
) -> None:
    mem, ram = memory
    ram[0x3000:0x8000] = 0xAA  # everything outside the three areas must stay untouched
    area = mem.translate(0, 0x10000)
    driver = DriverRing(
        area,
        RingLayout(8),
        event_idx=event_idx,
        areas=(SEP_DESC, SEP_AVAIL, SEP_USED),
        fast_path=PATHS.fast,
    )
    assert driver.areas == (SEP_DESC, SEP_AVAIL, SEP_USED)
    device = DeviceRing(
        mem, SEP_DESC, SEP_AVAIL, SEP_USED, 8, event_idx=event_idx, fast_path=PATHS.fast
    )
    assert device.broken is None
    outside = np.ones(0x5000, dtype=np.bool_)
    for start, size in ((SEP_DESC, 128), (SEP_AVAIL, 22), (SEP_USED, 70)):
        outside[start - 0x3000 : start - 0x3000 + size] = False
    assert (ram[0x3000:0x8000][outside] == 0xAA).all()
    assert not ram[SEP_DESC : SEP_DESC + 128].any() and not ram[SEP_USED : SEP_USED + 70].any()
    mem.write(BUF_A, b"abcdefgh")
    for rnd in range(40):  # past several wraps of the 8 entries, every kind of chain
        heads = [
            int(driver.add_batch([BUF_A, BUF_A + 0x100], [8, 8], [False, True])[0]),
            driver.add_chain([(BUF_A, 4, False), (BUF_A + 0x200, 8, True)]),
            driver.add_indirect(
                mem.translate(TABLES, 32),
                TABLES,
                [(BUF_A + 4, 4, False), (BUF_A + 0x300, 8, True)],
                leading=[(BUF_A, 4, False)],
            ),
        ]
        driver.kick_needed()
        assert device.has_available()
        batch = device.pop_batch()
        assert device.broken is None and len(batch) == 4
        data, copied = device.read_payloads(batch, 8)
        assert copied.tolist() == [8, 0, 4, 8] and bytes(data[3]) == b"abcdefgh"
        written = device.write_payloads(
            batch, np.full((4, 8), rnd, dtype=np.uint8), batch.writable_lens
        )
        device.push_used(batch.heads, written)
        ids, lens = driver.get_used()
        assert driver.broken is None
        assert ids.tolist()[0] == heads[0] and sorted(lens.tolist()) == [0, 8, 8, 8]
        assert mem.read(BUF_A + 0x300, 8) == bytes([rnd]) * 8
        assert driver.free_descriptors == 8 and not device.in_flight
    assert (ram[0x3000:0x8000][outside] == 0xAA).all()


@pytest.mark.parametrize(
    ("areas", "pattern"),
    [
        ((SEP_DESC + 8, SEP_AVAIL, SEP_USED), "misaligned"),
        ((SEP_DESC, SEP_AVAIL + 1, SEP_USED), "misaligned"),
        ((SEP_DESC, SEP_AVAIL, SEP_USED + 2), "misaligned"),
        ((SEP_DESC, SEP_DESC + 0x70, SEP_USED), r"overlap \(desc .* and avail"),
        ((SEP_DESC, SEP_AVAIL, SEP_AVAIL + 18), r"overlap \(avail .* and used"),
        ((SEP_DESC, SEP_DESC, SEP_USED), "overlap"),
        ((0xFFF0, SEP_AVAIL, SEP_USED), r"desc ring area \[0xfff0, 0x10070\) runs past 0x10000"),
        ((SEP_DESC, SEP_AVAIL, 0x10000 - 68), "used ring area .* runs past 0x10000"),
        ((SEP_DESC, SEP_AVAIL), "must be \\(desc, avail, used\\)"),
        ((SEP_DESC, SEP_AVAIL, -4), "used offset"),
    ],
)
def test_badly_placed_areas_are_refused(
    memory: tuple[GuestMemoryMap, Any], areas: Any, pattern: str
) -> None:
    mem, ram = memory
    area = mem.translate(0, 0x10000)
    ram[:0x10000] = 0x55
    with pytest.raises(UsageError, match=pattern):
        DriverRing(area, RingLayout(8), event_idx=False, areas=areas)
    assert (ram[:0x10000] == 0x55).all()  # nothing written


@pytest.mark.parametrize(
    ("gpas", "pattern"),
    [
        ((SEP_DESC, SEP_DESC + 0x70, SEP_USED), "overlap"),
        ((SEP_DESC, SEP_AVAIL, SEP_DESC + 0x40), "overlap"),
    ],
)
def test_device_with_overlapping_areas_starts_broken(
    memory: tuple[GuestMemoryMap, Any], gpas: tuple[int, int, int], pattern: str
) -> None:
    mem, _ = memory
    dev = DeviceRing(mem, *gpas, 8, event_idx=False)
    assert dev.broken is not None and pattern in dev.broken
    assert len(dev.pop_batch()) == 0
