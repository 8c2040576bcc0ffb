"""Tests for the PCI-like bus: the register ABI (shared.pci_layout), the VMM's device functions
and bus (hostemu.pci) and the guest driver (guestemu.pci) talking to them in-process through
hostemu.pci.BusIo. Pure code: no processes, no fds. Cases that differ only in data loop inside
one test and name the case in the failure message.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestemu import pci as gpci
from guestemu.pci import BarAllocator, FoundFunction, PciDriver, enumerate_bus
from hostemu.pci import (
    BarMoved,
    BusIo,
    DeviceReset,
    Event,
    MsiProgrammed,
    PciBus,
    PciFunction,
    QueueDisabled,
    QueueEnabled,
    QueueNotifyExit,
    StatusChanged,
)
from shared.errors import UsageError
from shared.pci_layout import (
    BAR0_DTYPE,
    BAR0_PROBE_VALUE,
    BAR0_SIZE,
    BLK_CONFIG_DTYPE,
    CFG_BAR0,
    CFG_CLASS_REVISION,
    CFG_COMMAND,
    CFG_ID,
    CFG_MSI_COUNT,
    CFG_MSI_GSI_BASE,
    CMD_MEMORY,
    COMMON_RANGE,
    CONFIG_HEADER_DTYPE,
    DEVICE_BLK,
    DEVICE_CONFIG_OFFSET,
    DEVICE_CONFIG_RANGE,
    DEVICE_CONSOLE,
    DEVICE_ECHO,
    DEVICE_NET,
    ECAM_BASE,
    ECAM_WINDOW,
    EMPTY_SLOT,
    F_EVENT_IDX,
    MAX_FUNCTIONS,
    MAX_MSI_VECTORS,
    MAX_QUEUES,
    MMIO_WINDOW,
    MSI_TABLE_DTYPE,
    MSI_UNPROGRAMMED,
    NET_CONFIG_DTYPE,
    NOTIFY_RANGE,
    QUEUE_AVAIL_ALIGN,
    QUEUE_DESC_ALIGN,
    QUEUE_NO_VECTOR,
    QUEUE_USED_ALIGN,
    REG_DEVICE_FEATURES,
    REG_DEVICE_STATUS,
    REG_DRIVER_FEATURES,
    REG_NUM_QUEUES,
    REG_QUEUE_AVAIL_HI,
    REG_QUEUE_AVAIL_LO,
    REG_QUEUE_BROKEN,
    REG_QUEUE_DESC_HI,
    REG_QUEUE_DESC_LO,
    REG_QUEUE_ENABLE,
    REG_QUEUE_SEL,
    REG_QUEUE_SIZE,
    REG_QUEUE_SIZE_MAX,
    REG_QUEUE_USED_HI,
    REG_QUEUE_USED_LO,
    REG_QUEUE_VECTOR,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VENDOR_ID,
    Window,
    all_ones,
    bar_decodes,
    bar_size_from_probe,
    class_revision,
    ecam_address,
    ecam_decode,
    is_reg_access,
    msi_gsi_offset,
    notify_offset,
    notify_queue,
)
from shared.virtio import layout as ring_layout

BAR_A = 0xC000_0000
BAR_B = 0xC001_0000
NET_CONFIG = bytes(range(1, 13))  # 12 bytes: a MAC and a port id


def make_fn(
    slot: int = 0,
    device_id: int = DEVICE_NET,
    *,
    num_queues: int = 2,
    num_vectors: int = 3,
    queue_size_max: int = 256,
    features: int = F_EVENT_IDX,
    device_config: bytes = NET_CONFIG,
) -> PciFunction:
    return PciFunction(
        slot,
        device_id,
        num_queues=num_queues,
        num_vectors=num_vectors,
        queue_size_max=queue_size_max,
        features=features,
        device_config=device_config,
    )


def cfg(slot: int, offset: int) -> int:
    return ecam_address(slot, offset)


def decoded_fn(slot: int = 0, bar: int = BAR_A, **kw: Any) -> PciFunction:
    """A function with BAR0 programmed at ``bar`` and decode on."""
    fn = make_fn(slot, **kw)
    assert fn.config_write(CFG_BAR0, 4, bar) == []
    assert fn.config_write(CFG_COMMAND, 4, CMD_MEMORY) == [BarMoved(slot, None, bar)]
    return fn


def select(fn: PciFunction, queue: int) -> None:
    assert fn.bar_write(REG_QUEUE_SEL, 4, queue) == []


def program_queue(
    fn: PciFunction,
    queue: int,
    size: int = 64,
    desc: int = 0x10000,
    avail: int = 0x10400,
    used: int = 0x10600,
    vector: int = QUEUE_NO_VECTOR,
) -> list[Event]:
    """Raw register writes (no guest helper); returns the events of QUEUE_ENABLE=1."""
    select(fn, queue)
    for offset, value in (
        (REG_QUEUE_SIZE, size),
        (REG_QUEUE_VECTOR, vector),
        (REG_QUEUE_DESC_LO, desc & 0xFFFF_FFFF),
        (REG_QUEUE_DESC_HI, desc >> 32),
        (REG_QUEUE_AVAIL_LO, avail & 0xFFFF_FFFF),
        (REG_QUEUE_AVAIL_HI, avail >> 32),
        (REG_QUEUE_USED_LO, used & 0xFFFF_FFFF),
        (REG_QUEUE_USED_HI, used >> 32),
    ):
        assert fn.bar_write(offset, 4, value) == []
    return fn.bar_write(REG_QUEUE_ENABLE, 4, 1)


class CountingIo:
    """A GuestIo that counts accesses (to prove a UsageError came before any)."""

    def __init__(self, inner: BusIo) -> None:
        self.inner = inner
        self.accesses = 0

    def read(self, addr: int, size: int) -> int:
        self.accesses += 1
        return self.inner.read(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        self.accesses += 1
        self.inner.write(addr, size, value)


# ---------------------------------------------------------------------------- layout as data


def test_layout_constants() -> None:
    assert (ECAM_BASE, ECAM_WINDOW.start, ECAM_WINDOW.end) == (0xE000_0000,) * 2 + (0xE002_0000,)
    assert (MMIO_WINDOW.start, MMIO_WINDOW.end) == (0xC000_0000, 0xE000_0000)
    assert MMIO_WINDOW.end <= ECAM_WINDOW.start  # a BAR can never shadow ECAM
    assert VENDOR_ID == 0x5642 and BAR0_SIZE == 0x1000 and MAX_QUEUES == 64
    assert (DEVICE_ECHO, DEVICE_NET, DEVICE_BLK, DEVICE_CONSOLE) == (1, 2, 3, 4)
    assert (CFG_ID, CFG_COMMAND, CFG_CLASS_REVISION, CFG_BAR0) == (0x00, 0x04, 0x08, 0x10)
    assert (CFG_MSI_COUNT, CFG_MSI_GSI_BASE, CMD_MEMORY) == (0x40, 0x44, 2)
    assert MSI_UNPROGRAMMED == 0xFFFF_FFFF and EMPTY_SLOT == 0xFFFF_FFFF
    regs = [
        REG_DEVICE_FEATURES,
        REG_DRIVER_FEATURES,
        REG_DEVICE_STATUS,
        REG_NUM_QUEUES,
        REG_QUEUE_SEL,
        REG_QUEUE_SIZE,
        REG_QUEUE_SIZE_MAX,
        REG_QUEUE_VECTOR,
        REG_QUEUE_DESC_LO,
        REG_QUEUE_DESC_HI,
        REG_QUEUE_AVAIL_LO,
        REG_QUEUE_AVAIL_HI,
        REG_QUEUE_USED_LO,
        REG_QUEUE_USED_HI,
        REG_QUEUE_ENABLE,
        REG_QUEUE_BROKEN,
    ]
    assert regs == list(range(0x100, 0x140, 4))
    assert all(COMMON_RANGE.contains(r, 4) for r in regs)
    assert (NOTIFY_RANGE.start, NOTIFY_RANGE.end) == (0x000, 0x100)
    assert (DEVICE_CONFIG_RANGE.start, DEVICE_CONFIG_RANGE.end) == (0x200, 0x300)
    assert not NOTIFY_RANGE.contains(COMMON_RANGE.start)
    assert COMMON_RANGE.end <= DEVICE_CONFIG_RANGE.start
    assert (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK) == (1, 2, 4, 8)
    assert (STATUS_NEEDS_RESET, STATUS_FAILED, F_EVENT_IDX) == (64, 128, 1)
    # the ring alignment the device checks is the split ring's (shared.virtio.layout)
    assert (QUEUE_DESC_ALIGN, QUEUE_AVAIL_ALIGN, QUEUE_USED_ALIGN) == (16, 2, 4)
    assert (QUEUE_DESC_ALIGN, QUEUE_AVAIL_ALIGN, QUEUE_USED_ALIGN) == (
        ring_layout.DESC_ALIGN,
        ring_layout.AVAIL_ALIGN,
        ring_layout.USED_ALIGN,
    )
    assert class_revision(DEVICE_NET) == 0x020000_01
    assert class_revision(0x777) == 0xFF0000_01


def _little_endian(dt: np.dtype[Any]) -> bool:
    base = dt.subdtype[0] if dt.subdtype is not None else dt
    # .str spells the byte order out ("<u4"; "|u1" for single bytes), even when it is native
    return base.str[0] == "<" or (base.str[0] == "|" and base.itemsize == 1)


def _check_record(dt: np.dtype[Any], expected: dict[str, tuple[int, int]], itemsize: int) -> None:
    """Field offsets and sizes as expected, fields disjoint and inside, all little-endian."""
    assert dt.itemsize == itemsize
    assert dt.names is not None and dt.fields is not None
    got = {name: (dt.fields[name][1], dt.fields[name][0].itemsize) for name in dt.names}
    assert got == expected
    spans = sorted((off, off + size) for off, size in got.values())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans
    assert spans[-1][1] <= itemsize
    for name in dt.names:
        assert _little_endian(dt.fields[name][0]), name


def test_bar0_dtype_matches_register_offsets() -> None:
    _check_record(
        BAR0_DTYPE,
        {
            "queue_notify": (0x000, 4 * MAX_QUEUES),
            "device_features": (REG_DEVICE_FEATURES, 4),
            "driver_features": (REG_DRIVER_FEATURES, 4),
            "device_status": (REG_DEVICE_STATUS, 4),
            "num_queues": (REG_NUM_QUEUES, 4),
            "queue_sel": (REG_QUEUE_SEL, 4),
            "queue_size": (REG_QUEUE_SIZE, 4),
            "queue_size_max": (REG_QUEUE_SIZE_MAX, 4),
            "queue_vector": (REG_QUEUE_VECTOR, 4),
            "queue_desc": (REG_QUEUE_DESC_LO, 8),
            "queue_avail": (REG_QUEUE_AVAIL_LO, 8),
            "queue_used": (REG_QUEUE_USED_LO, 8),
            "queue_enable": (REG_QUEUE_ENABLE, 4),
            "queue_broken": (REG_QUEUE_BROKEN, 4),
            "device_config": (DEVICE_CONFIG_OFFSET, 0x100),
        },
        BAR0_SIZE,
    )
    # the u64 ring addresses are their lo/hi register pairs, little-endian
    rec = np.zeros((), BAR0_DTYPE)
    rec["queue_desc"] = 0x1122_3344_5566_7788
    raw = rec.tobytes()
    lo = int.from_bytes(raw[REG_QUEUE_DESC_LO : REG_QUEUE_DESC_LO + 4], "little")
    hi = int.from_bytes(raw[REG_QUEUE_DESC_HI : REG_QUEUE_DESC_HI + 4], "little")
    assert (lo, hi) == (0x5566_7788, 0x1122_3344)


def test_config_and_device_config_dtypes() -> None:
    _check_record(
        CONFIG_HEADER_DTYPE,
        {
            "vendor_id": (0x00, 2),
            "device_id": (0x02, 2),
            "command": (CFG_COMMAND, 4),
            "class_revision": (CFG_CLASS_REVISION, 4),
            "bar": (CFG_BAR0, 24),
            "msi_count": (CFG_MSI_COUNT, 4),
        },
        CFG_MSI_GSI_BASE,
    )
    assert MSI_TABLE_DTYPE.itemsize == 4 * MAX_MSI_VECTORS
    assert CFG_MSI_GSI_BASE + MSI_TABLE_DTYPE.itemsize <= 0x1000
    _check_record(NET_CONFIG_DTYPE, {"mac": (0, 6), "port_id": (8, 4)}, 12)
    _check_record(BLK_CONFIG_DTYPE, {"capacity": (0, 8)}, 8)
    assert NET_CONFIG_DTYPE.itemsize <= DEVICE_CONFIG_RANGE.size
    # the config header as the device shows it, decoded with the dtype
    fn = decoded_fn(device_id=DEVICE_BLK)
    raw = b"".join(fn.config_read(o, 4).to_bytes(4, "little") for o in range(0, 0x44, 4))
    hdr = np.frombuffer(raw, CONFIG_HEADER_DTYPE)[0]
    assert (int(hdr["vendor_id"]), int(hdr["device_id"])) == (VENDOR_ID, DEVICE_BLK)
    assert (int(hdr["command"]), int(hdr["bar"][0]), int(hdr["msi_count"])) == (2, BAR_A, 3)
    assert hdr["bar"][1:].tolist() == [0] * 5


def test_address_helpers() -> None:
    assert ecam_address(0, 0) == ECAM_BASE
    assert ecam_address(3, 0x44) == ECAM_BASE + 0x3000 + 0x44
    assert ecam_address(31, 0xFFF) == ECAM_WINDOW.end - 1
    for f in range(MAX_FUNCTIONS):
        for off in (0, 0x10, 0xFFC):
            assert ecam_decode(ecam_address(f, off)) == (f, off)
    assert ecam_decode(ECAM_BASE - 1) is None and ecam_decode(ECAM_WINDOW.end) is None
    for bad in ((-1, 0), (32, 0), (0, -1), (0, 0x1000)):
        with pytest.raises(UsageError):
            ecam_address(*bad)
    assert [notify_offset(q) for q in (0, 1, 63)] == [0, 4, 252]
    assert [notify_queue(notify_offset(q)) for q in range(MAX_QUEUES)] == list(range(MAX_QUEUES))
    assert notify_queue(2) is None and notify_queue(0x100) is None and notify_queue(-4) is None
    assert msi_gsi_offset(0) == 0x44 and msi_gsi_offset(2) == 0x4C
    bad_calls: list[Callable[[], object]] = [
        lambda: notify_offset(64),
        lambda: notify_offset(-1),
        lambda: msi_gsi_offset(MAX_MSI_VECTORS),
    ]
    for bad_call in bad_calls:
        with pytest.raises(UsageError):
            bad_call()


def test_access_helpers() -> None:
    assert [all_ones(n) for n in (-1, 0, 1, 2, 4, 8)] == [0, 0, 0xFF, 0xFFFF, 2**32 - 1, 2**64 - 1]
    assert is_reg_access(0x10, 4) and not is_reg_access(0x12, 4) and not is_reg_access(0x10, 8)
    assert bar_size_from_probe(BAR0_PROBE_VALUE) == BAR0_SIZE == 0x1000
    assert bar_size_from_probe(0) == 0
    assert bar_size_from_probe(0xFFFF_0000) == 0x10000
    assert bar_decodes(CMD_MEMORY, BAR_A)
    assert not bar_decodes(0, BAR_A)
    assert not bar_decodes(CMD_MEMORY, 0)  # reset value
    assert not bar_decodes(CMD_MEMORY, BAR0_PROBE_VALUE)
    assert bar_decodes(CMD_MEMORY, MMIO_WINDOW.end - BAR0_SIZE)
    assert not bar_decodes(CMD_MEMORY, MMIO_WINDOW.end)
    assert not bar_decodes(CMD_MEMORY, MMIO_WINDOW.start - BAR0_SIZE)


# ---------------------------------------------------------------------------- config space


def test_config_space_reads() -> None:
    bus = PciBus([make_fn(2, DEVICE_CONSOLE, num_vectors=5)])
    assert bus.mmio_read(cfg(2, CFG_ID), 4) == VENDOR_ID | DEVICE_CONSOLE << 16
    assert bus.mmio_read(cfg(2, CFG_CLASS_REVISION), 4) == class_revision(DEVICE_CONSOLE)
    assert bus.mmio_read(cfg(2, CFG_COMMAND), 4) == 0
    assert bus.mmio_read(cfg(2, CFG_BAR0), 4) == 0
    assert bus.mmio_read(cfg(2, CFG_MSI_COUNT), 4) == 5
    assert [bus.mmio_read(cfg(2, msi_gsi_offset(v)), 4) for v in range(6)] == [
        MSI_UNPROGRAMMED
    ] * 5 + [0]
    for off in (0x0C, 0x14, 0x24, 0x3C, 0x100, 0xFFC):
        assert bus.mmio_read(cfg(2, off), 4) == 0, hex(off)
    # read-only registers ignore writes
    for off in (CFG_ID, CFG_CLASS_REVISION, CFG_MSI_COUNT, 0x14):
        before = bus.mmio_read(cfg(2, off), 4)
        assert bus.mmio_write(cfg(2, off), 4, 0x1234_5678) == []
        assert bus.mmio_read(cfg(2, off), 4) == before, hex(off)
    # only CMD_MEMORY is implemented in the command register
    assert bus.mmio_write(cfg(2, CFG_COMMAND), 4, 0xFFFF_FFFF) == []  # BAR 0: not decoded
    assert bus.mmio_read(cfg(2, CFG_COMMAND), 4) == CMD_MEMORY
    # empty slots read all-ones and ignore writes
    for slot in (0, 1, 3, 31):
        assert bus.mmio_read(cfg(slot, CFG_ID), 4) == EMPTY_SLOT
        assert bus.mmio_read(cfg(slot, CFG_BAR0), 4) == EMPTY_SLOT
        assert bus.mmio_write(cfg(slot, CFG_COMMAND), 4, CMD_MEMORY) == []


def test_bar_size_probing() -> None:
    bus = PciBus([make_fn(0)])
    assert bus.mmio_write(cfg(0, CFG_BAR0), 4, 0xFFFF_FFFF) == []  # decode off: no event
    assert bus.mmio_read(cfg(0, CFG_BAR0), 4) == (~(BAR0_SIZE - 1)) & 0xFFFF_FFFF
    assert bar_size_from_probe(bus.mmio_read(cfg(0, CFG_BAR0), 4)) == BAR0_SIZE
    # unimplemented BAR1..5 probe as 0 (no BAR)
    for off in range(0x14, 0x28, 4):
        bus.mmio_write(cfg(0, off), 4, 0xFFFF_FFFF)
        assert bus.mmio_read(cfg(0, off), 4) == 0
    # the guest helper probes the same and restores the BAR
    io = BusIo(bus)
    bus.mmio_write(cfg(0, CFG_BAR0), 4, BAR_B)
    assert gpci.probe_bar_size(io, 0) == BAR0_SIZE
    assert bus.mmio_read(cfg(0, CFG_BAR0), 4) == BAR_B
    assert io.events == []


def test_bar_programming_events() -> None:
    fn = make_fn(4)
    # writing the BAR with decode off: no decoded address, no event
    assert fn.config_write(CFG_BAR0, 4, BAR_A) == []
    assert fn.bar == BAR_A and fn.bar_address is None
    assert fn.config_write(CFG_COMMAND, 4, CMD_MEMORY) == [BarMoved(4, None, BAR_A)]
    assert fn.bar_address == BAR_A
    assert fn.config_write(CFG_COMMAND, 4, CMD_MEMORY) == []  # unchanged
    # reprogramming while decoding moves it in one step
    assert fn.config_write(CFG_BAR0, 4, BAR_B) == [BarMoved(4, BAR_A, BAR_B)]
    assert fn.config_write(CFG_BAR0, 4, BAR_B) == []
    # low bits are read-only zeros: the address is forced size-aligned
    assert fn.config_write(CFG_BAR0, 4, BAR_A + 0x123) == [BarMoved(4, BAR_B, BAR_A)]
    assert fn.config_read(CFG_BAR0, 4) == BAR_A
    # decode off, on
    assert fn.config_write(CFG_COMMAND, 4, 0) == [BarMoved(4, BAR_A, None)]
    assert fn.config_write(CFG_BAR0, 4, BAR_B) == []
    assert fn.config_write(CFG_COMMAND, 4, CMD_MEMORY) == [BarMoved(4, None, BAR_B)]
    # probing while decoding: the probe value is outside the window, so the BAR goes away
    assert fn.config_write(CFG_BAR0, 4, 0xFFFF_FFFF) == [BarMoved(4, BAR_B, None)]
    assert fn.config_write(CFG_BAR0, 4, BAR_B) == [BarMoved(4, None, BAR_B)]
    # outside the MMIO window (RAM, ECAM) is never decoded
    assert fn.config_write(CFG_BAR0, 4, 0x1000) == [BarMoved(4, BAR_B, None)]
    assert fn.config_write(CFG_BAR0, 4, ECAM_BASE) == []
    assert fn.bar_address is None
    assert fn.config_write(CFG_BAR0, 4, MMIO_WINDOW.end - BAR0_SIZE) == [
        BarMoved(4, None, MMIO_WINDOW.end - BAR0_SIZE)
    ]


def test_bar_decoding_on_the_bus() -> None:
    bus = PciBus([make_fn(0, num_queues=7)])
    assert bus.mmio_read(BAR_A + REG_NUM_QUEUES, 4) == 0xFFFF_FFFF  # not decoded yet
    bus.mmio_write(cfg(0, CFG_BAR0), 4, BAR_A)
    assert bus.mmio_read(BAR_A + REG_NUM_QUEUES, 4) == 0xFFFF_FFFF  # decode still off
    assert bus.mmio_write(cfg(0, CFG_COMMAND), 4, CMD_MEMORY) == [BarMoved(0, None, BAR_A)]
    assert bus.mmio_read(BAR_A + REG_NUM_QUEUES, 4) == 7
    assert bus.mmio_read(BAR_A + BAR0_SIZE + REG_NUM_QUEUES, 4) == 0xFFFF_FFFF
    assert bus.mmio_write(cfg(0, CFG_BAR0), 4, BAR_B) == [BarMoved(0, BAR_A, BAR_B)]
    assert bus.mmio_read(BAR_A + REG_NUM_QUEUES, 4) == 0xFFFF_FFFF
    assert bus.mmio_read(BAR_B + REG_NUM_QUEUES, 4) == 7
    assert bus.function(0) is bus.bar_claimant(BAR_B + 0xFFF)
    assert bus.bar_claimant(BAR_B + BAR0_SIZE) is None


def test_overlapping_bars_lowest_slot_wins() -> None:
    low = decoded_fn(1, BAR_A, num_queues=1)
    high = decoded_fn(5, BAR_B, num_queues=9)
    bus = PciBus([high, low])
    assert [f.slot for f in bus.functions] == [1, 5]
    io = BusIo(bus, fast_path=True)
    # the VMM's ioeventfds for the two BARs as they were when plugged in
    io._rebind(BarMoved(1, None, BAR_A))
    io._rebind(BarMoved(5, None, BAR_B))
    io.write(cfg(5, CFG_BAR0), 4, BAR_A)  # slot 5 moves on top of slot 1
    assert io.take_events() == [BarMoved(5, BAR_B, BAR_A)]
    assert low.bar_address == high.bar_address == BAR_A
    assert io.read(BAR_A + REG_NUM_QUEUES, 4) == 1  # slot 1 wins
    # the first ioeventfd binding at the address stays (the broker would say EEXIST)
    io.write(BAR_A + notify_offset(0), 4, 0)
    assert io.kicks == {(1, 0): 1}
    # slot 1 turns decode off: slot 5 is visible at BAR_A
    io.write(cfg(1, CFG_COMMAND), 4, 0)
    assert io.take_events() == [BarMoved(1, BAR_A, None)]
    assert io.read(BAR_A + REG_NUM_QUEUES, 4) == 9
    assert bus.bar_claimant(BAR_A) is high


# ---------------------------------------------------------------------------- MSI


def test_msi_programming_events() -> None:
    bus = PciBus([make_fn(3, num_vectors=3)])
    addr = cfg(3, msi_gsi_offset(1))
    assert bus.mmio_write(addr, 4, 5) == [MsiProgrammed(3, 1, None, 5)]
    assert bus.mmio_read(addr, 4) == 5
    assert bus.mmio_write(addr, 4, 5) == []
    assert bus.mmio_write(addr, 4, 7) == [MsiProgrammed(3, 1, 5, 7)]
    assert bus.mmio_write(addr, 4, MSI_UNPROGRAMMED) == [MsiProgrammed(3, 1, 7, None)]
    # a gsi the broker will refuse is still passed through (the broker validates)
    assert bus.mmio_write(addr, 4, 0x7FFF_FFFF) == [MsiProgrammed(3, 1, None, 0x7FFF_FFFF)]
    # a vector the function does not have: ignored, reads 0
    beyond = cfg(3, msi_gsi_offset(3))
    assert bus.mmio_write(beyond, 4, 9) == []
    assert bus.mmio_read(beyond, 4) == 0
    fn = bus.function(3)
    assert fn is not None
    assert [fn.msi_gsi(v) for v in range(3)] == [None, 0x7FFF_FFFF, None]
    with pytest.raises(UsageError):
        fn.msi_gsi(3)
    # the guest helper
    io = BusIo(bus)
    [found] = enumerate_bus(io)
    gpci.program_msi(io, found, 0, 12)
    gpci.program_msi(io, found, 0, 13)
    gpci.program_msi(io, found, 0, None)
    assert io.take_events() == [
        MsiProgrammed(3, 0, None, 12),
        MsiProgrammed(3, 0, 12, 13),
        MsiProgrammed(3, 0, 13, None),
    ]


# ---------------------------------------------------------------------------- queues


def test_queue_setup_round_trip_through_the_guest_driver() -> None:
    net = make_fn(0, DEVICE_NET, num_queues=2, num_vectors=3, queue_size_max=256)
    blk = make_fn(1, DEVICE_BLK, num_queues=1, num_vectors=1, features=0, device_config=b"\x00\x10")
    bus = PciBus([net, blk])
    io = BusIo(bus, fast_path=True)
    found = enumerate_bus(io)
    assert io.take_events() == []  # probing with decode off is invisible
    alloc = BarAllocator()
    drivers = [PciDriver(io, fn) for fn in found]
    for drv in drivers:
        drv.program_bar(alloc.allocate(drv.fn.bar_size))
    assert io.take_events() == [BarMoved(0, None, BAR_A), BarMoved(1, None, BAR_A + 0x1000)]
    drv = drivers[0]
    drv.program_msi(0, 40)
    drv.program_msi(2, 42)
    drv.reset()
    assert drv.negotiate(F_EVENT_IDX | 0x8000_0000) == F_EVENT_IDX
    assert drv.status() == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    io.take_events()
    layout = ring_layout.RingLayout(128)
    desc, avail, used = layout.addresses(0x1_2345_0000)  # above 4 GiB: hi registers matter
    assert drv.setup_queue(1, 128, desc, avail, used, vector=2)
    expected = QueueEnabled(0, 1, 128, desc, avail, used, 2, True)
    assert [e for e in io.events if isinstance(e, QueueEnabled)] == [expected]
    assert io.take_events() == [expected]
    assert net.queue_config(1) == expected and net.queue_config(0) is None
    # the registers read back what was programmed
    for reg, value in (
        (REG_QUEUE_SEL, 1),
        (REG_QUEUE_SIZE, 128),
        (REG_QUEUE_SIZE_MAX, 256),
        (REG_QUEUE_VECTOR, 2),
        (REG_QUEUE_DESC_LO, desc & 0xFFFF_FFFF),
        (REG_QUEUE_DESC_HI, desc >> 32),
        (REG_QUEUE_AVAIL_LO, avail & 0xFFFF_FFFF),
        (REG_QUEUE_AVAIL_HI, avail >> 32),
        (REG_QUEUE_USED_LO, used & 0xFFFF_FFFF),
        (REG_QUEUE_USED_HI, used >> 32),
        (REG_QUEUE_ENABLE, 1),
        (REG_QUEUE_BROKEN, 0),
    ):
        assert io.read(BAR_A + reg, 4) == value, hex(reg)
    assert drv.set_driver_ok()
    assert io.take_events() == [
        StatusChanged(
            0,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        )
    ]
    # the second function: no features offered, no vector, event_idx off
    drv_blk = drivers[1]
    assert drv_blk.negotiate(F_EVENT_IDX) == 0
    io.take_events()
    assert drv_blk.setup_queue(0, 8, 0x20000, 0x20080, 0x20100, vector=None)
    assert io.take_events() == [QueueEnabled(1, 0, 8, 0x20000, 0x20080, 0x20100, None, False)]
    assert drv_blk.read_device_config(0, 8) == b"\x00\x10" + bytes(6)
    # a disable, then the queue can be set up again with new parameters
    drv.disable_queue(1)
    assert io.take_events() == [QueueDisabled(0, 1)]
    assert drv.setup_queue(1, 64, 0x40000, 0x40400, 0x40600, vector=0)
    assert io.take_events() == [QueueEnabled(0, 1, 64, 0x40000, 0x40400, 0x40600, 0, True)]


def test_event_idx_only_when_negotiated() -> None:
    fn = decoded_fn()
    # features written but FEATURES_OK never set: nothing negotiated
    fn.bar_write(REG_DRIVER_FEATURES, 4, F_EVENT_IDX)
    [ev] = program_queue(fn, 0)
    assert isinstance(ev, QueueEnabled) and not ev.event_idx


def test_feature_negotiation_rules() -> None:
    fn = decoded_fn(features=F_EVENT_IDX)
    # asking for a feature the device lacks: FEATURES_OK does not stick
    fn.bar_write(REG_DRIVER_FEATURES, 4, F_EVENT_IDX | 2)
    ev = fn.bar_write(REG_DEVICE_STATUS, 4, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert ev == [StatusChanged(0, 0, STATUS_ACKNOWLEDGE | STATUS_DRIVER)]
    assert fn.negotiated_features == 0
    fn.bar_write(REG_DRIVER_FEATURES, 4, F_EVENT_IDX)
    fn.bar_write(REG_DEVICE_STATUS, 4, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert fn.negotiated_features == F_EVENT_IDX
    # after FEATURES_OK the driver features are read-only; DEVICE_FEATURES always is
    fn.bar_write(REG_DRIVER_FEATURES, 4, 0)
    fn.bar_write(REG_DEVICE_FEATURES, 4, 0xFF)
    assert fn.bar_read(REG_DRIVER_FEATURES, 4) == F_EVENT_IDX
    assert fn.bar_read(REG_DEVICE_FEATURES, 4) == F_EVENT_IDX
    # a device that refuses: the guest helper reports None
    bus = PciBus([make_fn(0, features=0)])
    io = BusIo(bus)
    [found] = enumerate_bus(io)
    gpci.program_bar(io, found, BAR_A)
    io.write(BAR_A + REG_DRIVER_FEATURES, 4, 1)  # a buggy driver's leftover
    assert gpci.device_status(io, found) == 0
    io.write(BAR_A + REG_DEVICE_STATUS, 4, STATUS_FEATURES_OK)
    assert gpci.device_status(io, found) == 0
    assert gpci.negotiate(io, found, 0) == 0  # offers nothing: accepted


def test_invalid_queue_size_is_ignored() -> None:
    fn = decoded_fn(queue_size_max=256)
    select(fn, 0)
    assert fn.bar_read(REG_QUEUE_SIZE, 4) == 0  # unset after reset
    fn.bar_write(REG_QUEUE_SIZE, 4, 64)
    for bad in (0, 3, 100, 255, 512, 1 << 16, 0xFFFF_FFFF):
        assert fn.bar_write(REG_QUEUE_SIZE, 4, bad) == [], bad
        assert fn.bar_read(REG_QUEUE_SIZE, 4) == 64, bad
    for good in (1, 2, 256):
        fn.bar_write(REG_QUEUE_SIZE, 4, good)
        assert fn.bar_read(REG_QUEUE_SIZE, 4) == good
    assert fn.status == 0  # ignoring a bad size is not a reason to reset


def test_unaligned_rings_or_size_zero_refuse_enable_and_need_reset() -> None:
    cases: dict[str, dict[str, int]] = {
        "size 0": {"size": 0},
        "desc 8": {"desc": 0x10008},
        "avail 1": {"avail": 0x10401},
        "used 2": {"used": 0x10602},
        "desc wraps 2**64": {"desc": (1 << 64) - 16},
        "used wraps 2**64": {"used": (1 << 64) - 4},
    }
    for name, kw in cases.items():
        bus = PciBus([make_fn(0)])
        io = BusIo(bus)
        [found] = enumerate_bus(io)
        gpci.program_bar(io, found, BAR_A)
        io.take_events()
        args = {"size": 64, "desc": 0x10000, "avail": 0x10400, "used": 0x10600} | kw
        accepted = gpci.setup_queue(
            io, found, 0, args["size"], args["desc"], args["avail"], args["used"], None
        )
        assert not accepted, name
        assert io.take_events() == [StatusChanged(0, 0, STATUS_NEEDS_RESET)], name
        assert io.read(BAR_A + REG_QUEUE_ENABLE, 4) == 0, name
        # NEEDS_RESET is sticky: a valid queue is refused, the guest cannot clear the bit
        assert not gpci.setup_queue(io, found, 1, 64, 0x20000, 0x20400, 0x20600, None), name
        io.write(BAR_A + REG_DEVICE_STATUS, 4, STATUS_ACKNOWLEDGE)
        assert gpci.device_status(io, found) == STATUS_ACKNOWLEDGE | STATUS_NEEDS_RESET, name
        assert not gpci.set_driver_ok(io, found), name
        # only a reset clears it
        gpci.reset_device(io, found)
        assert gpci.device_status(io, found) == 0, name
        io.take_events()
        assert gpci.setup_queue(io, found, 1, 64, 0x20000, 0x20400, 0x20600, None), name
        assert [type(e) for e in io.take_events()] == [QueueEnabled], name


def test_out_of_range_queue_select() -> None:
    fn = decoded_fn(num_queues=2)
    [enabled] = program_queue(fn, 1, vector=1)
    before = fn.queue_config(1)
    queue_regs = [
        REG_QUEUE_SIZE,
        REG_QUEUE_SIZE_MAX,
        REG_QUEUE_VECTOR,
        REG_QUEUE_DESC_LO,
        REG_QUEUE_DESC_HI,
        REG_QUEUE_AVAIL_LO,
        REG_QUEUE_AVAIL_HI,
        REG_QUEUE_USED_LO,
        REG_QUEUE_USED_HI,
        REG_QUEUE_ENABLE,
        REG_QUEUE_BROKEN,
    ]
    for sel in (2, MAX_QUEUES, 0xFFFF_FFFF):
        select(fn, sel)
        assert fn.bar_read(REG_QUEUE_SEL, 4) == sel
        for reg in queue_regs:
            assert fn.bar_read(reg, 4) == 0, (sel, hex(reg))
            assert fn.bar_write(reg, 4, 1) == [], (sel, hex(reg))
            assert fn.bar_write(reg, 4, 0) == [], (sel, hex(reg))
    assert fn.queue_config(1) == before == enabled
    assert fn.queue_config(0) is None and fn.status == 0
    # the guest helper passes an out-of-range queue through; the device refuses quietly
    bus = PciBus([make_fn(0, num_queues=2)])
    io = BusIo(bus)
    [found] = enumerate_bus(io)
    gpci.program_bar(io, found, BAR_A)
    io.take_events()
    assert not gpci.setup_queue(io, found, 5, 64, 0x10000, 0x10400, 0x10600, None)
    assert io.take_events() == []


def test_queue_vector_validation() -> None:
    fn = decoded_fn(num_vectors=2)
    select(fn, 0)
    assert fn.bar_read(REG_QUEUE_VECTOR, 4) == QUEUE_NO_VECTOR
    fn.bar_write(REG_QUEUE_VECTOR, 4, 1)
    for bad in (2, 3, 0xFFFF_FFFE):
        assert fn.bar_write(REG_QUEUE_VECTOR, 4, bad) == []
        assert fn.bar_read(REG_QUEUE_VECTOR, 4) == 1, bad
    fn.bar_write(REG_QUEUE_VECTOR, 4, QUEUE_NO_VECTOR)
    assert fn.bar_read(REG_QUEUE_VECTOR, 4) == QUEUE_NO_VECTOR
    [ev] = program_queue(fn, 0, vector=QUEUE_NO_VECTOR)
    assert isinstance(ev, QueueEnabled) and ev.vector is None
    # a function without vectors accepts only "no vector"
    fn0 = decoded_fn(num_vectors=0)
    [ev0] = program_queue(fn0, 0, vector=0)
    assert isinstance(ev0, QueueEnabled) and ev0.vector is None


def test_enable_disable_and_frozen_parameters() -> None:
    fn = decoded_fn()
    [ev] = program_queue(fn, 0, size=16, vector=0)
    assert ev == QueueEnabled(0, 0, 16, 0x10000, 0x10400, 0x10600, 0, False)
    assert fn.bar_write(REG_QUEUE_ENABLE, 4, 1) == []  # already enabled
    assert fn.bar_write(REG_QUEUE_ENABLE, 4, 2) == []  # not 0 or 1: ignored
    # a running queue's parameters are read-only
    for reg, value in (
        (REG_QUEUE_SIZE, 32),
        (REG_QUEUE_VECTOR, 1),
        (REG_QUEUE_DESC_LO, 0),
        (REG_QUEUE_AVAIL_HI, 1),
        (REG_QUEUE_USED_LO, 0x20000),
    ):
        assert fn.bar_write(reg, 4, value) == []
    assert fn.queue_config(0) == ev
    assert fn.bar_write(REG_QUEUE_ENABLE, 4, 0) == [QueueDisabled(0, 0)]
    assert fn.bar_write(REG_QUEUE_ENABLE, 4, 0) == []
    assert fn.queue_config(0) is None
    # disabled: writable again, and the old values are kept
    assert fn.bar_read(REG_QUEUE_SIZE, 4) == 16
    fn.bar_write(REG_QUEUE_SIZE, 4, 32)
    assert fn.bar_write(REG_QUEUE_ENABLE, 4, 1) == [
        QueueEnabled(0, 0, 32, 0x10000, 0x10400, 0x10600, 0, False)
    ]


def test_reset() -> None:
    fn = decoded_fn(num_queues=3, num_vectors=2)
    fn.config_write(msi_gsi_offset(1), 4, 9)
    fn.bar_write(REG_DRIVER_FEATURES, 4, F_EVENT_IDX)
    live = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    fn.bar_write(REG_DEVICE_STATUS, 4, live)
    program_queue(fn, 0)
    program_queue(fn, 2)
    fn.set_queue_broken(2, "avail index jumped")
    assert fn.bar_write(REG_DEVICE_STATUS, 4, 0) == [
        QueueDisabled(0, 0),
        QueueDisabled(0, 2),
        StatusChanged(0, live | STATUS_NEEDS_RESET, 0),
        DeviceReset(0),
    ]
    # queues, features, selection and broken marks are back to reset values ...
    assert fn.status == 0 and fn.driver_features == 0
    assert fn.bar_read(REG_QUEUE_SEL, 4) == 0
    for q in range(3):
        select(fn, q)
        assert fn.bar_read(REG_QUEUE_SIZE, 4) == 0
        assert fn.bar_read(REG_QUEUE_VECTOR, 4) == QUEUE_NO_VECTOR
        assert fn.bar_read(REG_QUEUE_DESC_LO, 4) == 0
        assert fn.bar_read(REG_QUEUE_ENABLE, 4) == 0
        assert fn.bar_read(REG_QUEUE_BROKEN, 4) == 0
        assert fn.queue_broken(q) is None
    # ... MSI vectors, BAR and command are kept
    assert fn.msi_gsi(1) == 9 and fn.bar_address == BAR_A
    # resetting a reset device is still a reset
    assert fn.bar_write(REG_DEVICE_STATUS, 4, 0) == [DeviceReset(0)]
    # the guest helper
    io = BusIo(PciBus([fn]))
    [found] = enumerate_bus(io)
    assert found.bar_address == BAR_A  # already decoding: recorded, not reprogrammed
    io.take_events()
    gpci.reset_device(io, found)
    assert io.take_events() == [DeviceReset(0)]


def test_status_register_rules() -> None:
    fn = decoded_fn()
    # unknown bits read 0; NEEDS_RESET cannot be set by the guest
    assert fn.bar_write(REG_DEVICE_STATUS, 4, 0xFFFF_FFFF & ~STATUS_FEATURES_OK) == [
        StatusChanged(0, 0, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FAILED)
    ]
    assert fn.bar_write(REG_DEVICE_STATUS, 4, STATUS_NEEDS_RESET | STATUS_ACKNOWLEDGE) == [
        StatusChanged(0, 0x87, STATUS_ACKNOWLEDGE)
    ]
    # the device marks a queue broken: sticky, first reason kept, one status change
    assert fn.set_queue_broken(1, "descriptor loop") == [
        StatusChanged(0, STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_NEEDS_RESET)
    ]
    assert fn.set_queue_broken(1, "later") == []
    assert fn.queue_broken(1) == "descriptor loop" and fn.queue_broken(0) is None
    select(fn, 1)
    assert fn.bar_read(REG_QUEUE_BROKEN, 4) == 1
    assert fn.bar_write(REG_QUEUE_BROKEN, 4, 0) == []
    assert fn.bar_read(REG_QUEUE_BROKEN, 4) == 1
    # the guest cannot clear NEEDS_RESET by writing a status without it
    fn.bar_write(REG_DEVICE_STATUS, 4, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    assert fn.status & STATUS_NEEDS_RESET
    for bad in (-1, 2):
        with pytest.raises(UsageError):
            fn.set_queue_broken(bad, "x")


def test_notify_writes_that_reach_the_bus() -> None:
    bus = PciBus([make_fn(0, num_queues=3)])
    io = BusIo(bus)  # no fast path: every notify exits to the VMM
    [found] = enumerate_bus(io)
    gpci.program_bar(io, found, BAR_B)
    assert gpci.setup_queue(io, found, 2, 64, 0x10000, 0x10400, 0x10600, None)
    io.take_events()
    assert gpci.queue_notify_address(found, 2) == BAR_B + 8
    fn = bus.function(0)
    assert fn is not None and fn.notify_address(2) == BAR_B + 8
    gpci.kick_queue(io, found, 2)
    gpci.kick_queue(io, found, 2)
    assert io.take_events() == [QueueNotifyExit(0, 2), QueueNotifyExit(0, 2)]
    # not a kick: a queue that is not enabled, a queue that does not exist, a wrong value,
    # a wrong width -- exactly what the ioeventfd (length 4, datamatch q) would not catch
    gpci.kick_queue(io, found, 0)
    io.write(BAR_B + notify_offset(5), 4, 5)
    io.write(BAR_B + notify_offset(2), 4, 1)
    io.write(BAR_B + notify_offset(2), 2, 2)
    io.write(BAR_B + notify_offset(2), 8, 2)
    io.write(BAR_B + notify_offset(2) + 1, 1, 2)
    assert io.take_events() == []
    assert io.read(BAR_B + notify_offset(2), 4) == 0  # write-only
    # with the fast path the same kick never reaches the VMM
    fast = BusIo(bus, fast_path=True)
    fast.write(cfg(0, CFG_COMMAND), 4, 0)
    fast.write(cfg(0, CFG_COMMAND), 4, CMD_MEMORY)  # the VMM binds at the BarMoved
    assert fast.take_events() == [BarMoved(0, BAR_B, None), BarMoved(0, None, BAR_B)]
    gpci.kick_queue(fast, found, 2)
    assert fast.take_events() == [] and fast.kicks == {(0, 2): 1}
    fast.write(BAR_B + notify_offset(2), 4, 7)  # datamatch misses: exits, and is ignored
    assert fast.take_events() == [] and fast.kicks == {(0, 2): 1}


def test_misaligned_and_odd_width_accesses() -> None:
    fn = decoded_fn(num_vectors=2)
    bus = PciBus([fn])
    program_queue(fn, 0)
    snapshot = (fn.command, fn.bar, fn.status, fn.msi_gsi(0), fn.queue_config(0))
    offsets_cfg = [CFG_ID, CFG_COMMAND, CFG_BAR0, CFG_MSI_COUNT, msi_gsi_offset(0)]
    offsets_bar = [
        REG_DEVICE_STATUS,
        REG_QUEUE_SEL,
        REG_QUEUE_ENABLE,
        notify_offset(0),
        DEVICE_CONFIG_OFFSET,
    ]
    cases = [(cfg(0, o), "cfg") for o in offsets_cfg] + [(BAR_A + o, "bar") for o in offsets_bar]
    for base, space in cases:
        for delta, size in (
            (0, 1),
            (0, 2),
            (0, 8),
            (1, 4),
            (2, 4),
            (3, 4),
            (1, 1),
            (2, 2),
            (0, 3),
            (0, 0),
            (0, -1),
            (0, 16),
        ):
            addr = base + delta
            got = bus.mmio_read(addr, size)
            assert got == all_ones(size), (space, hex(addr), size)
            for value in (0, 0xFFFF_FFFF, (1 << 64) - 1, -1):
                assert bus.mmio_write(addr, size, value) == [], (space, hex(addr), size, value)
    assert (fn.command, fn.bar, fn.status, fn.msi_gsi(0), fn.queue_config(0)) == snapshot
    # the same directly on the function, with offsets outside its space
    for off in (-4, 0x1000, 0x2000):
        assert fn.config_read(off, 4) == 0xFFFF_FFFF and fn.config_write(off, 4, 1) == []
        assert fn.bar_read(off, 4) == 0xFFFF_FFFF and fn.bar_write(off, 4, 1) == []


def test_unclaimed_addresses() -> None:
    fn = make_fn(0)
    fn.config_write(CFG_BAR0, 4, BAR_A)  # programmed but decode off
    bus = PciBus([fn])
    for addr in (
        0,
        0x1000,
        BAR_A,
        BAR_A + REG_NUM_QUEUES,
        MMIO_WINDOW.start - 4,
        ECAM_WINDOW.end,
        0xFFFF_FFFC,
        (1 << 64) - 4,
        1 << 64,
        -4,
    ):
        for size in (1, 2, 4, 8):
            assert bus.mmio_read(addr, size) == all_ones(size), (hex(addr), size)
            assert bus.mmio_write(addr, size, 0x1234) == [], (hex(addr), size)
    assert fn.bar_address is None and fn.status == 0


def test_writes_are_truncated_to_the_access_width() -> None:
    fn = make_fn(0, num_vectors=1)
    bus = PciBus([fn])
    assert bus.mmio_write(cfg(0, msi_gsi_offset(0)), 4, 0x1_0000_0007) == [
        MsiProgrammed(0, 0, None, 7)
    ]


# ---------------------------------------------------------------------------- enumeration


def test_enumeration_finds_exactly_the_configured_functions() -> None:
    assert enumerate_bus(BusIo(PciBus())) == []
    specs = {0: (DEVICE_ECHO, 1), 3: (DEVICE_NET, 3), 17: (DEVICE_CONSOLE, 0), 31: (DEVICE_BLK, 2)}
    bus = PciBus(
        make_fn(slot, dev, num_vectors=nv, num_queues=1) for slot, (dev, nv) in specs.items()
    )
    io = BusIo(bus)
    found = enumerate_bus(io)
    assert found == [
        FoundFunction(slot, VENDOR_ID, dev, class_revision(dev), nv, BAR0_SIZE)
        for slot, (dev, nv) in specs.items()
    ]
    assert io.events == []
    assert all(fn.bar == 0 and fn.command == 0 for fn in bus.functions)


class ForeignIo:
    """A bus with a foreign vendor at slot 0 and a lying vector count at slot 1."""

    def __init__(self) -> None:
        self.inner = BusIo(PciBus([make_fn(1)]))

    def read(self, addr: int, size: int) -> int:
        hit = ecam_decode(addr)
        if hit == (0, CFG_ID):
            return 0x1234_8086
        if hit == (1, CFG_MSI_COUNT):
            return 0xFFFF_FFFF
        return self.inner.read(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        self.inner.write(addr, size, value)


def test_enumeration_distrusts_the_device() -> None:
    [fn] = enumerate_bus(ForeignIo())
    assert fn.slot == 1 and fn.num_vectors == MAX_MSI_VECTORS


# ---------------------------------------------------------------------------- guest side


def test_read_device_config() -> None:
    blob = bytes(range(200))
    bus = PciBus([make_fn(0, device_config=blob)])
    io = BusIo(bus)
    [found] = enumerate_bus(io)
    gpci.program_bar(io, found, BAR_A)
    padded = blob.ljust(256, b"\0")
    for offset, length in ((0, 0), (0, 1), (1, 6), (3, 9), (8, 4), (198, 5), (250, 6), (0, 256)):
        got = gpci.read_device_config(io, found, offset, length)
        assert got == padded[offset : offset + length], (offset, length)
    # read-only for the guest; the VMM can change it
    io.write(BAR_A + DEVICE_CONFIG_OFFSET, 4, 0)
    assert gpci.read_device_config(io, found, 0, 4) == blob[:4]
    fn = bus.function(0)
    assert fn is not None
    # np.zeros, not np.array(records): the record's padding (bytes 6-7) must be zero, and
    # np.array leaves a structured dtype's padding uninitialized (this test flaked on it)
    cfg = np.zeros(1, NET_CONFIG_DTYPE)
    cfg["mac"], cfg["port_id"] = [2, 0, 0, 0, 0, 7], 9
    fn.set_device_config(cfg.tobytes())
    assert gpci.read_device_config(io, found, 0, 12) == b"\x02\0\0\0\0\x07\0\0\x09\0\0\0"
    with pytest.raises(UsageError):
        fn.set_device_config(bytes(257))


def test_guest_usage_errors_happen_before_any_access() -> None:
    bus = PciBus([make_fn(0, num_vectors=2)])
    io = CountingIo(BusIo(bus))
    [found] = enumerate_bus(io)
    io.accesses = 0
    bad_calls: dict[str, Callable[[], object]] = {
        "notify before BAR": lambda: gpci.queue_notify_address(found, 0),
        "config before BAR": lambda: gpci.read_device_config(io, found, 0, 4),
        "queue before BAR": lambda: gpci.setup_queue(io, found, 0, 8, 0, 0, 0, None),
        "misaligned BAR": lambda: gpci.program_bar(io, found, BAR_A + 0x800),
        "BAR below window": lambda: gpci.program_bar(io, found, 0x1000),
        "BAR on ECAM": lambda: gpci.program_bar(io, found, ECAM_BASE),
        "vector 2 of 2": lambda: gpci.program_msi(io, found, 2, 5),
        "negative gsi": lambda: gpci.program_msi(io, found, 0, -1),
        "features > u32": lambda: gpci.negotiate(io, found, 1 << 32),
    }
    for name, call in bad_calls.items():
        with pytest.raises(UsageError):
            call()
        assert io.accesses == 0, name
    gpci.program_bar(io, found, BAR_A)
    io.accesses = 0
    late_calls: dict[str, Callable[[], object]] = {
        "config past 256": lambda: gpci.read_device_config(io, found, 250, 7),
        "desc > u64": lambda: gpci.setup_queue(io, found, 0, 8, 1 << 64, 0, 0, None),
        "queue < 0": lambda: gpci.setup_queue(io, found, -1, 8, 0, 0, 0, None),
    }
    for name, call in late_calls.items():
        with pytest.raises(UsageError):
            call()
        assert io.accesses == 0, name
    no_bar = FoundFunction(1, VENDOR_ID, 1, 0, 0, 0)
    with pytest.raises(UsageError):
        gpci.program_bar(io, no_bar, BAR_A)


def test_disable_bar_helper() -> None:
    bus = PciBus([make_fn(0)])
    io = BusIo(bus)
    [found] = enumerate_bus(io)
    gpci.program_bar(io, found, BAR_A)
    gpci.program_bar(io, found, BAR_B)
    gpci.disable_bar(io, found)
    assert io.take_events() == [
        BarMoved(0, None, BAR_A),
        BarMoved(0, BAR_A, BAR_B),
        BarMoved(0, BAR_B, None),
    ]
    assert found.bar_address is None


def test_bar_allocator() -> None:
    alloc = BarAllocator()
    assert alloc.allocate(0x1000) == 0xC000_0000
    assert alloc.allocate(0x1000) == 0xC000_1000
    assert alloc.allocate(0x10000) == 0xC001_0000  # aligned up to its size
    assert alloc.allocate(0x1000) == 0xC002_0000
    for bad in (0, 3, -4, 0x1800):
        with pytest.raises(UsageError):
            alloc.allocate(bad)
    small = BarAllocator(Window(0xC000_0000, 0xC000_3000))
    assert [small.allocate(0x1000) for _ in range(3)] == [0xC000_0000, 0xC000_1000, 0xC000_2000]
    with pytest.raises(UsageError):
        small.allocate(0x1000)
    with pytest.raises(UsageError):
        BarAllocator().allocate(1 << 30)  # the window is 512 MiB


# ---------------------------------------------------------------------------- VMM mistakes


def test_vmm_mistakes_are_usage_errors() -> None:
    bad: dict[str, dict[str, Any]] = {
        "slot 32": {"slot": 32},
        "device 0": {"device_id": 0},
        "device 0xFFFF": {"device_id": 0xFFFF},
        "65 queues": {"num_queues": 65},
        "65 vectors": {"num_vectors": 65},
        "qmax 0": {"queue_size_max": 0},
        "qmax 3": {"queue_size_max": 3},
        "qmax 65536": {"queue_size_max": 65536},
        "features > u32": {"features": 1 << 32},
        "config 257 bytes": {"device_config": bytes(257)},
    }
    for name, kw in bad.items():
        try:
            make_fn(**kw)
        except UsageError:
            continue
        pytest.fail(f"{name}: accepted")
    bus = PciBus([make_fn(4)])
    with pytest.raises(UsageError):
        bus.add(make_fn(4))
    fn = make_fn(0, num_queues=2)
    calls: list[Callable[[], object]] = [
        lambda: fn.queue_config(2),
        lambda: fn.notify_address(-1),
        lambda: fn.set_queue_broken(2, "x"),
    ]
    for call in calls:
        with pytest.raises(UsageError):
            call()


# ---------------------------------------------------------------------------- fuzz


_ADDR_BASES = [ECAM_BASE, ECAM_BASE + 0x1000, ECAM_BASE + 0x2000, BAR_A, BAR_B, 0, 1 << 32]
_CFG_REGS = [CFG_ID, CFG_COMMAND, CFG_BAR0, CFG_MSI_COUNT, 0x44, 0x48, 0x4C]
_BAR_REGS = [0x0, 0x4, 0x8, *range(0x100, 0x140, 4), 0x200, 0x204]
_addresses = st.one_of(
    # register-aware: the config space of slots 0..2 and the registers of a BAR
    st.builds(lambda s, o: ecam_address(s, o), st.integers(0, 2), st.sampled_from(_CFG_REGS)),
    st.builds(lambda b, o: b + o, st.sampled_from([BAR_A, BAR_B]), st.sampled_from(_BAR_REGS)),
    # near the interesting places, and anywhere at all
    st.builds(lambda b, o: b + o, st.sampled_from(_ADDR_BASES), st.integers(-8, 0x1008)),
    st.integers(-(1 << 64), 1 << 65),
)
_sizes = st.one_of(st.just(4), st.integers(-2, 12))
_values = st.one_of(
    st.integers(0, 1),
    st.sampled_from([2, 4, 8, 15, 16, 64, 0x10000, 0xFF, CMD_MEMORY, BAR_A, BAR_B, 0xFFFF_FFFF]),
    st.integers(-(1 << 70), 1 << 70),
)
_ops = st.lists(st.tuples(st.booleans(), _addresses, _sizes, _values), min_size=10, max_size=80)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_fuzz_bus_never_raises_and_reads_fit_the_width(
    ops: list[tuple[bool, int, int, int]],
) -> None:
    # slot 0 decoding with queue 0 running and queue 1 programmed but off; slot 1 untouched
    f0 = decoded_fn(0, BAR_A, num_queues=2, num_vectors=2)
    program_queue(f0, 0)
    program_queue(f0, 1, size=16)
    f0.bar_write(REG_QUEUE_ENABLE, 4, 0)
    f1 = make_fn(1, DEVICE_BLK, num_queues=1, num_vectors=1, queue_size_max=8)
    bus = PciBus([f0, f1])
    enabled: set[tuple[int, int]] = {(0, 0)}
    for is_read, addr, size, value in ops:
        if is_read:
            got = bus.mmio_read(addr, size)
            assert isinstance(got, int) and 0 <= got <= all_ones(size), (hex(addr), size, got)
            continue
        for ev in bus.mmio_write(addr, size, value):
            # QueueEnabled / QueueDisabled alternate per queue
            if isinstance(ev, QueueEnabled):
                assert (ev.function, ev.queue) not in enabled
                assert ev.size & (ev.size - 1) == 0 and ev.desc % 16 == 0
                enabled.add((ev.function, ev.queue))
            elif isinstance(ev, QueueDisabled):
                enabled.remove((ev.function, ev.queue))
            elif isinstance(ev, BarMoved):
                assert ev.old != ev.new
                assert ev.new is None or MMIO_WINDOW.contains(ev.new, BAR0_SIZE)
    for fn in bus.functions:
        for q in range(fn.num_queues):
            assert (fn.queue_config(q) is not None) == ((fn.slot, q) in enabled)


_reg_ops = st.lists(
    st.tuples(
        st.sampled_from([*_BAR_REGS, *[REG_QUEUE_ENABLE] * 6, *[REG_QUEUE_SEL] * 2]),
        st.one_of(
            st.integers(0, 1),
            st.integers(0, 2),
            st.sampled_from([4, 16, 64, 0x10000, 0x10600, 0xFFFF_FFFF]),
            st.integers(0, 0xFFFF_FFFF),
        ),
    ),
    min_size=5,
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_reg_ops)
def test_fuzz_register_writes_keep_the_queue_invariants(ops: list[tuple[int, int]]) -> None:
    fn = decoded_fn(0, BAR_A, num_queues=2, num_vectors=2, queue_size_max=64)
    for q in (1, 0):  # both queues programmed validly, then disabled; queue 0 selected
        program_queue(fn, q, size=16, vector=q)
        fn.bar_write(REG_QUEUE_ENABLE, 4, 0)
    running: dict[int, QueueEnabled] = {}
    for offset, value in ops:
        needs_reset = fn.status & STATUS_NEEDS_RESET
        events = fn.bar_write(offset, 4, value)
        for ev in events:
            if isinstance(ev, QueueEnabled):
                assert ev.queue not in running and not needs_reset
                assert ev.size in (1, 2, 4, 8, 16, 32, 64)
                assert (ev.desc % 16, ev.avail % 2, ev.used % 4) == (0, 0, 0)
                assert ev.vector in (None, 0, 1)
                running[ev.queue] = ev
            elif isinstance(ev, QueueDisabled):
                del running[ev.queue]
            elif isinstance(ev, DeviceReset):
                assert running == {} and fn.status == 0
        # only a reset clears NEEDS_RESET
        if needs_reset and not (events and isinstance(events[-1], DeviceReset)):
            assert fn.status & STATUS_NEEDS_RESET
        # an enabled queue's parameters are what its QueueEnabled said
        for q in range(fn.num_queues):
            assert fn.queue_config(q) == running.get(q)
        assert 0 <= fn.bar_read(offset, 4) <= 0xFFFF_FFFF


def test_features_ok_after_enable_does_not_change_an_enabled_queue() -> None:
    """Found by the register fuzzer: EVENT_IDX asked for, queue enabled before FEATURES_OK
    (so without EVENT_IDX), then FEATURES_OK -- the queue's reported config (what a
    restarted device would be replayed) must stay what its device was told at enable."""
    fn = decoded_fn(0, BAR_A, num_queues=2, num_vectors=2, queue_size_max=64)
    program_queue(fn, 0, size=16, vector=0)
    fn.bar_write(REG_QUEUE_ENABLE, 4, 0)
    assert not fn.status & STATUS_FEATURES_OK
    fn.bar_write(REG_DRIVER_FEATURES, 4, 1)
    [enabled] = [e for e in fn.bar_write(REG_QUEUE_ENABLE, 4, 1) if isinstance(e, QueueEnabled)]
    assert not enabled.event_idx
    fn.bar_write(REG_DEVICE_STATUS, 4, 0xFFFF_FFFF)
    assert fn.queue_config(0) == enabled
