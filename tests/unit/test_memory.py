"""Tests for shared/memory.py: real POSIX shm, real fds, no mocks."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import MemoryAccessError, UsageError
from shared.fds import OwnedFd
from shared.memory import (
    ADDRESS_LIMIT,
    MAX_SLOT_ID,
    GuestMemoryMap,
    MemorySlot,
    SharedRegion,
)

PAGE = 4096
TOP = 2**64


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.fixture
def region() -> Iterator[SharedRegion]:
    r = SharedRegion.create(PAGE)
    yield r
    r.close()


# ============================================================================ SharedRegion


class TestCreate:
    def test_name_is_unlinked_immediately(self) -> None:
        before = shm_names()
        with SharedRegion.create(PAGE) as r:
            target = os.readlink(f"/proc/self/fd/{r.fd.fd}")
            after = shm_names()
        assert target.startswith("/dev/shm/vbusemu-")
        assert target.endswith(" (deleted)")
        name = target.removeprefix("/dev/shm/").removesuffix(" (deleted)")
        assert len(name) == len("vbusemu-") + 32  # 128 random bits
        # Only our own name is checked: other processes may use /dev/shm meanwhile.
        assert name not in before
        assert name not in after

    def test_names_are_unique(self) -> None:
        with SharedRegion.create(PAGE) as a, SharedRegion.create(PAGE) as b:
            assert os.readlink(f"/proc/self/fd/{a.fd.fd}") != os.readlink(
                f"/proc/self/fd/{b.fd.fd}"
            )

    def test_mode_is_0600(self, region: SharedRegion) -> None:
        assert os.fstat(region.fd.fd).st_mode & 0o777 == 0o600

    def test_fd_is_not_inheritable(self, region: SharedRegion) -> None:
        assert not os.get_inheritable(region.fd.fd)

    def test_array_covers_whole_zeroed_mapping(self, region: SharedRegion) -> None:
        a = region.array
        assert region.size == PAGE
        assert a.shape == (PAGE,)
        assert a.dtype == np.uint8
        assert a.flags.writeable
        assert not a.any()
        assert os.fstat(region.fd.fd).st_size == PAGE

    def test_odd_size(self) -> None:
        with SharedRegion.create(10) as r:
            assert r.array.shape == (10,)
            r.array[9] = 1

    @pytest.mark.parametrize("size", [0, -1, -PAGE, 1.5, "4096", True, None, 2**63])
    def test_bad_size_is_usage_error(self, size: Any) -> None:
        n = open_fd_count()
        before = shm_names()
        with pytest.raises(UsageError):
            SharedRegion.create(size)
        assert open_fd_count() == n
        assert not {n for n in shm_names() - before if n.startswith("vbusemu-")}

    def test_numpy_integer_size(self) -> None:
        with SharedRegion.create(np.uint32(PAGE)) as r:
            assert r.size == PAGE

    def test_repr(self, region: SharedRegion) -> None:
        assert "0x1000" in repr(region)
        region.close()
        assert "closed" in repr(region)


class TestFromFd:
    def test_data_visible_both_ways(self, region: SharedRegion) -> None:
        with SharedRegion.from_fd(region.fd.dup(), PAGE) as other:
            region.array[100:104] = [1, 2, 3, 4]
            assert other.array[100:104].tolist() == [1, 2, 3, 4]
            other.view(PAGE - 8, 8, "<u8")[0] = 0x1122334455667788
            assert region.array[PAGE - 8 :].tobytes() == (0x1122334455667788).to_bytes(8, "little")

    def test_takes_ownership_on_success(self, region: SharedRegion) -> None:
        given = region.fd.dup()
        number = given.fd
        with SharedRegion.from_fd(given, PAGE) as other:
            assert given.fd == -1
            assert other.fd.fd == number
        assert other.fd.fd == -1

    def test_maps_exactly_size_of_bigger_object(self) -> None:
        with SharedRegion.create(2 * PAGE) as big, SharedRegion.from_fd(big.fd.dup(), 100) as r:
            assert r.size == 100
            assert r.array.shape == (100,)
            r.array[99] = 7
            assert big.array[99] == 7

    def test_accepts_memfd(self) -> None:
        fd = OwnedFd(os.memfd_create("vbusemu-test", os.MFD_CLOEXEC))
        os.ftruncate(fd.fd, PAGE)
        os.pwrite(fd.fd, b"hello", 10)
        with SharedRegion.from_fd(fd, PAGE) as r:
            assert r.array[10:15].tobytes() == b"hello"

    def test_makes_received_fd_non_inheritable(self, region: SharedRegion) -> None:
        given = region.fd.dup()
        os.set_inheritable(given.fd, True)
        with SharedRegion.from_fd(given, PAGE) as r:
            assert not os.get_inheritable(r.fd.fd)

    def _assert_rejected(self, fd: OwnedFd, size: Any, exc: type[Exception]) -> None:
        with pytest.raises(exc):
            SharedRegion.from_fd(fd, size)
        assert fd.fd == -1  # ownership was taken and the fd closed

    def test_rejects_pipe(self) -> None:
        r, w = os.pipe()
        try:
            self._assert_rejected(OwnedFd(r), PAGE, MemoryAccessError)
        finally:
            os.close(w)

    def test_rejects_eventfd(self) -> None:
        self._assert_rejected(OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)), 8, MemoryAccessError)

    def test_rejects_socket(self) -> None:
        a, b = socket.socketpair()
        with b:
            self._assert_rejected(OwnedFd(a.detach()), PAGE, MemoryAccessError)

    def test_rejects_regular_file(self, tmp_path: Path) -> None:
        path = tmp_path / "guest.ram"
        path.write_bytes(bytes(2 * PAGE))  # big enough: the type is what is wrong
        fd = OwnedFd(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        self._assert_rejected(fd, PAGE, MemoryAccessError)

    def test_rejects_directory(self, tmp_path: Path) -> None:
        fd = OwnedFd(os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC))
        self._assert_rejected(fd, PAGE, MemoryAccessError)

    def test_rejects_too_small_region(self, region: SharedRegion) -> None:
        self._assert_rejected(region.fd.dup(), PAGE + 1, MemoryAccessError)

    def test_rejects_read_only_fd(self, region: SharedRegion) -> None:
        ro = OwnedFd(os.open(f"/proc/self/fd/{region.fd.fd}", os.O_RDONLY | os.O_CLOEXEC))
        assert os.fstat(ro.fd).st_ino == os.fstat(region.fd.fd).st_ino
        self._assert_rejected(ro, PAGE, MemoryAccessError)

    @pytest.mark.parametrize("size", [0, -1, 1.0, None, True])
    def test_rejects_bad_size(self, region: SharedRegion, size: Any) -> None:
        self._assert_rejected(region.fd.dup(), size, UsageError)

    def test_closed_fd_is_usage_error(self, region: SharedRegion) -> None:
        fd = region.fd.dup()
        fd.close()
        with pytest.raises(UsageError):
            SharedRegion.from_fd(fd, PAGE)

    def test_failures_leak_no_fd(self, region: SharedRegion, tmp_path: Path) -> None:
        (tmp_path / "f").write_bytes(bytes(PAGE))
        n = open_fd_count()
        for size in (PAGE + 1, 0):
            with pytest.raises((MemoryAccessError, UsageError)):
                SharedRegion.from_fd(region.fd.dup(), size)
        with pytest.raises(MemoryAccessError):
            SharedRegion.from_fd(OwnedFd(os.open(tmp_path / "f", os.O_RDWR)), PAGE)
        with pytest.raises(MemoryAccessError):
            SharedRegion.from_fd(OwnedFd(os.eventfd(0)), PAGE)
        assert open_fd_count() == n


class TestClose:
    def test_close_is_idempotent(self) -> None:
        r = SharedRegion.create(PAGE)
        r.close()
        r.close()
        assert r.closed
        assert r.fd.fd == -1
        assert r.size == PAGE

    def test_closed_region_refuses_access(self, region: SharedRegion) -> None:
        region.close()
        with pytest.raises(UsageError):
            _ = region.array
        with pytest.raises(UsageError):
            region.view(0, 1)

    def test_context_manager_closes(self) -> None:
        with SharedRegion.create(PAGE) as r:
            assert not r.closed
        assert r.closed
        assert r.fd.fd == -1

    def test_close_without_views_releases_everything(self) -> None:
        n = open_fd_count()
        r = SharedRegion.create(PAGE)
        assert open_fd_count() == n + 2  # our fd + mmap's private duplicate
        r.close()
        assert open_fd_count() == n

    def test_close_with_live_view_keeps_view_valid(self) -> None:
        n = open_fd_count()
        r = SharedRegion.create(PAGE)
        peer = SharedRegion.from_fd(r.fd.dup(), PAGE)
        v = r.view(16, 8, "<u4")
        whole = r.array
        r.close()  # must not raise BufferError, must not unmap under v
        assert r.closed
        assert r.fd.fd == -1
        v[1] = 0xDEADBEEF
        assert peer.array[20:24].tobytes() == (0xDEADBEEF).to_bytes(4, "little")
        assert whole[20] == 0xEF
        peer.close()
        del v, whole
        gc.collect()
        assert open_fd_count() == n  # the mapping (and mmap's dup) went with the views

    def test_no_fd_leak(self) -> None:
        gc.collect()
        n = open_fd_count()
        for _ in range(20):
            with SharedRegion.create(PAGE) as a, SharedRegion.from_fd(a.fd.dup(), PAGE) as b:
                a.view(0, 8, np.uint64)[0] = 1
                assert b.view(0, 8, np.uint64)[0] == 1
        gc.collect()
        assert open_fd_count() == n


class TestRegionView:
    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            (-1, 1),
            (0, -1),
            (-PAGE, PAGE),
            (0, PAGE + 1),
            (PAGE, 1),
            (PAGE + 1, 0),
            (1, PAGE),
            (PAGE - 1, 2),
            (2**64, 1),
            (2**63, 2**63),
            (1, 2**64 - 1),
            (2**64 - 1, 2**64 - 1),
            (-(2**64), 2**64 + 1),
        ],
    )
    def test_out_of_bounds(self, region: SharedRegion, offset: int, length: int) -> None:
        with pytest.raises(MemoryAccessError):
            region.view(offset, length)

    @pytest.mark.parametrize(
        ("offset", "length"), [(0, PAGE), (0, 0), (PAGE, 0), (PAGE - 1, 1), (123, 456)]
    )
    def test_in_bounds(self, region: SharedRegion, offset: int, length: int) -> None:
        v = region.view(offset, length)
        assert v.shape == (length,)
        assert v.dtype == np.uint8
        if length:
            v[-1] = 0xAB
            assert region.array[offset + length - 1] == 0xAB

    def test_misaligned_length(self, region: SharedRegion) -> None:
        with pytest.raises(MemoryAccessError):
            region.view(0, 6, np.uint32)
        with pytest.raises(MemoryAccessError):
            region.view(0, 1, np.uint16)

    def test_unaligned_offset_allowed(self, region: SharedRegion) -> None:
        v = region.view(1, 8, "<u4")
        assert v.shape == (2,)
        v[0] = 0x04030201
        assert region.array[1:5].tolist() == [1, 2, 3, 4]

    def test_numpy_integers_accepted(self, region: SharedRegion) -> None:
        v = region.view(np.uint64(8), np.int32(8), np.uint64)
        assert v.shape == (1,)

    @pytest.mark.parametrize(("offset", "length"), [(1.0, 1), (0, 1.5), (True, 1), ("0", 1)])
    def test_non_integers_are_usage_errors(
        self, region: SharedRegion, offset: Any, length: Any
    ) -> None:
        with pytest.raises(UsageError):
            region.view(offset, length)

    @pytest.mark.parametrize("dtype", [object, "V0", np.dtype((np.uint8, 4)), "not-a-dtype"])
    def test_bad_dtype(self, region: SharedRegion, dtype: Any) -> None:
        with pytest.raises(UsageError):
            region.view(0, 8, dtype)


# ============================================================================ GuestMemoryMap


def ram(size: int, fill: int = 0) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.full(size, fill, dtype=np.uint8)


def addr_of(a: np.ndarray[Any, Any]) -> int:
    return int(a.__array_interface__["data"][0])


class TestMapConfig:
    def test_sorted_insertion(self) -> None:
        m = GuestMemoryMap()
        m.add(3, 0x3000, ram(0x100))
        m.add(1, 0x1000, ram(0x100))
        m.add(7, 0x0, ram(0x100))
        m.add(2, 0x2000, ram(0x100))
        assert len(m) == 4
        assert [s.gpa for s in m.slots()] == [0x0, 0x1000, 0x2000, 0x3000]
        assert [s.slot for s in m.slots()] == [7, 1, 2, 3]
        assert m.slots()[1] == MemorySlot(1, 0x1000, 0x100)
        assert m.slots()[1].end == 0x1100

    @pytest.mark.parametrize(
        ("gpa", "size"),
        [
            (0x1000, 0x1000),  # identical
            (0x1400, 0x100),  # inside
            (0x0800, 0x2000),  # contains
            (0x0800, 0x1000),  # overlaps the start
            (0x1800, 0x1000),  # overlaps the end
            (0x1000, 0x10),  # same start, smaller
            (0x1FFF, 0x1),  # last byte
            (0x0FFF, 0x2),  # first byte from below
            (0x0800, 0x3000),  # contains, extending past the right neighbour too
        ],
    )
    def test_overlap_rejected(self, gpa: int, size: int) -> None:
        m = GuestMemoryMap()
        m.add(0, 0x1000, ram(0x1000))
        m.add(1, 0x3000, ram(0x1000))
        before = m.slots()
        with pytest.raises(UsageError, match="overlaps"):
            m.add(9, gpa, ram(size))
        assert m.slots() == before

    def test_adjacent_slots_accepted(self) -> None:
        m = GuestMemoryMap()
        m.add(0, 0x0, ram(0x1000))
        m.add(2, 0x2000, ram(0x1000))
        m.add(1, 0x1000, ram(0x1000))  # fills the gap exactly
        assert [(s.gpa, s.end) for s in m.slots()] == [
            (0, 0x1000),
            (0x1000, 0x2000),
            (0x2000, 0x3000),
        ]

    def test_slot_at_top_of_address_space(self) -> None:
        m = GuestMemoryMap()
        s = m.add(0, TOP - 16, ram(16))
        assert s.end == ADDRESS_LIMIT == TOP

    @pytest.mark.parametrize(
        ("slot", "gpa", "backing"),
        [
            (0, 0, ram(0)),  # size 0
            (0, -1, ram(1)),
            (0, TOP, ram(1)),
            (0, TOP - 1, ram(2)),  # overflows 2**64
            (0, 2**65, ram(1)),
            (-1, 0, ram(1)),
            (MAX_SLOT_ID + 1, 0, ram(1)),
            (0, 0, np.zeros(4, dtype=np.uint16)),
            (0, 0, np.zeros((2, 2), dtype=np.uint8)),
            (0, 0, np.zeros(8, dtype=np.uint8)[::2]),
            (0, 0, b"abcd"),
            (0, 0, [1, 2, 3]),
            (0, 1.0, ram(1)),
            (True, 0, ram(1)),
        ],
    )
    def test_misuse_rejected(self, slot: Any, gpa: Any, backing: Any) -> None:
        m = GuestMemoryMap()
        with pytest.raises(UsageError):
            m.add(slot, gpa, backing)
        assert len(m) == 0

    def test_duplicate_slot_id(self) -> None:
        m = GuestMemoryMap()
        m.add(5, 0, ram(16))
        with pytest.raises(UsageError, match="already exists"):
            m.add(5, 0x1000, ram(16))
        assert len(m) == 1

    def test_remove(self) -> None:
        m = GuestMemoryMap()
        m.add(0, 0x0, ram(0x100))
        m.add(1, 0x1000, ram(0x100))
        assert m.translate(0x1000, 1).shape == (1,)
        assert m.remove(1) == MemorySlot(1, 0x1000, 0x100)
        assert len(m) == 1
        with pytest.raises(MemoryAccessError):
            m.translate(0x1000, 1)
        with pytest.raises(MemoryAccessError):
            m.translate(0x1000, 0)
        with pytest.raises(UsageError):
            m.remove(1)
        m.add(1, 0x1000, ram(0x100))  # the id and the range are free again
        assert len(m) == 2

    def test_remove_unknown(self) -> None:
        with pytest.raises(UsageError):
            GuestMemoryMap().remove(0)


@pytest.fixture
def gmap() -> GuestMemoryMap:
    """Slots: A [0x1000, 0x2000) B [0x2000, 0x2100) adjacent; gap; C [0x8000, 0x9000)."""
    m = GuestMemoryMap()
    m.add(0, 0x1000, ram(0x1000, 0xA))
    m.add(1, 0x2000, ram(0x100, 0xB))
    m.add(2, 0x8000, ram(0x1000, 0xC))
    return m


class TestTranslate:
    @pytest.mark.parametrize(
        ("gpa", "length", "fill"),
        [
            (0x1000, 1, 0xA),  # first byte
            (0x1FFF, 1, 0xA),  # last byte
            (0x1000, 0x1000, 0xA),  # whole slot
            (0x1800, 0x10, 0xA),  # middle
            (0x2000, 0x100, 0xB),
            (0x20FF, 1, 0xB),
            (0x8FF0, 0x10, 0xC),
        ],
    )
    def test_inside_one_slot(self, gmap: GuestMemoryMap, gpa: int, length: int, fill: int) -> None:
        v = gmap.translate(gpa, length)
        assert v.shape == (length,)
        assert v.dtype == np.uint8
        assert (v == fill).all()

    def test_view_aliases_backing(self) -> None:
        backing = ram(0x100)
        m = GuestMemoryMap()
        m.add(0, 0x4000, backing)
        m.translate(0x4010, 4)[:] = [1, 2, 3, 4]
        assert backing[0x10:0x14].tolist() == [1, 2, 3, 4]
        assert addr_of(m.translate(0x4010, 4)) == addr_of(backing) + 0x10

    @pytest.mark.parametrize("gpa", [0x1000, 0x1800, 0x2000, 0x2100, 0x8000, 0x9000])
    def test_length_zero_inside_or_at_end(self, gmap: GuestMemoryMap, gpa: int) -> None:
        assert gmap.translate(gpa, 0).shape == (0,)

    @pytest.mark.parametrize("gpa", [0x0, 0xFFF, 0x2101, 0x7FFF, 0x9001, TOP - 1])
    def test_length_zero_in_gap(self, gmap: GuestMemoryMap, gpa: int) -> None:
        with pytest.raises(MemoryAccessError):
            gmap.translate(gpa, 0)

    @pytest.mark.parametrize(
        ("gpa", "length"),
        [
            (0x1FFF, 2),  # straddles A|B, adjacent
            (0x1000, 0x1001),
            (0x1F00, 0x200),
            (0x1000, 0x1100),  # exactly A+B
        ],
    )
    def test_straddling_adjacent_slots(self, gmap: GuestMemoryMap, gpa: int, length: int) -> None:
        with pytest.raises(MemoryAccessError, match="one slot"):
            gmap.translate(gpa, length)

    @pytest.mark.parametrize(
        ("gpa", "length"),
        [
            (0x0, 1),  # below everything
            (0xFFF, 1),
            (0xFFF, 2),  # starts in the gap, ends in a slot
            (0x20FF, 2),  # starts in B, ends in the gap
            (0x2100, 1),  # in the gap
            (0x2000, 0x7000),  # across the gap into C
            (0x9000, 1),  # above everything
            (0x8FFF, 2),
            (0x1000, 0x10000),
        ],
    )
    def test_gaps(self, gmap: GuestMemoryMap, gpa: int, length: int) -> None:
        with pytest.raises(MemoryAccessError):
            gmap.translate(gpa, length)

    @pytest.mark.parametrize(
        ("gpa", "length"),
        [
            (-1, 1),
            (0x1000, -1),
            (-(2**64), 2**64 + 0x1001),
            (TOP, 0),
            (TOP, 1),
            (TOP + 0x1000, 1),
            (2**128, 2**128),
            (TOP - 1, 1),
            (TOP - 1, 2),
            (0x1000, TOP),
            (0x1000, TOP - 0x1000),
            (0x1000, 2**200),
            (2**63, 2**63),
            (2**63, 2**63 + 1),
        ],
    )
    def test_huge_and_negative(self, gmap: GuestMemoryMap, gpa: int, length: int) -> None:
        with pytest.raises(MemoryAccessError):
            gmap.translate(gpa, length)

    def test_top_slot_edges(self) -> None:
        m = GuestMemoryMap()
        m.add(0, TOP - 16, ram(16, 5))
        assert m.translate(TOP - 1, 1).tolist() == [5]
        assert m.translate(TOP - 16, 16).shape == (16,)
        for gpa, length in [(TOP - 1, 2), (TOP, 0), (TOP - 17, 1), (TOP - 16, 17)]:
            with pytest.raises(MemoryAccessError):
                m.translate(gpa, length)

    def test_empty_map(self) -> None:
        with pytest.raises(MemoryAccessError):
            GuestMemoryMap().translate(0, 0)

    def test_numpy_integer_addresses(self, gmap: GuestMemoryMap) -> None:
        assert gmap.translate(np.uint64(0x1000), np.uint32(4)).shape == (4,)
        with pytest.raises(MemoryAccessError):
            gmap.translate(np.uint64(2**64 - 1), np.uint64(2**64 - 1))

    @pytest.mark.parametrize(("gpa", "length"), [(4096.0, 1), (0x1000, "1"), (False, 0)])
    def test_non_integers_are_usage_errors(
        self, gmap: GuestMemoryMap, gpa: Any, length: Any
    ) -> None:
        with pytest.raises(UsageError):
            gmap.translate(gpa, length)


class TestReadWriteView:
    def test_round_trip(self, gmap: GuestMemoryMap) -> None:
        gmap.write(0x8010, b"hello")
        assert gmap.read(0x8010, 5) == b"hello"
        gmap.write(0x8020, bytearray(b"\x01\x02"))
        gmap.write(0x8022, memoryview(b"\x03"))
        assert gmap.read(0x8020, 3) == b"\x01\x02\x03"
        gmap.write(0x8030, b"")
        assert gmap.read(0x8030, 0) == b""

    def test_write_array_raw_bytes(self, gmap: GuestMemoryMap) -> None:
        gmap.write(0x1000, np.array([0x04030201, 0x08070605], dtype="<u4"))
        assert gmap.read(0x1000, 8) == bytes(range(1, 9))
        gmap.write(0x1000, np.array([[9, 9], [9, 9]], dtype=np.uint8))
        assert gmap.read(0x1000, 5) == b"\x09\x09\x09\x09\x05"

    def test_write_rejected_writes_nothing(self, gmap: GuestMemoryMap) -> None:
        before = gmap.read(0x1FF0, 0x10) + gmap.read(0x2000, 0x10)
        for gpa in (0x1FF0, 0x20F0, 0x2100, TOP - 1, -1):
            with pytest.raises(MemoryAccessError):
                gmap.write(gpa, bytes(0x20))
        assert gmap.read(0x1FF0, 0x10) + gmap.read(0x2000, 0x10) == before

    def test_write_bad_data(self, gmap: GuestMemoryMap) -> None:
        with pytest.raises(UsageError):
            gmap.write(0x1000, np.array([object()]))
        with pytest.raises(UsageError):
            gmap.write(0x1000, "text")  # type: ignore[arg-type]

    def test_write_copes_with_overlapping_source(self, gmap: GuestMemoryMap) -> None:
        gmap.write(0x1000, bytes(range(8)))
        gmap.write(0x1002, gmap.translate(0x1000, 6))
        assert gmap.read(0x1000, 8) == bytes([0, 1, 0, 1, 2, 3, 4, 5])

    def test_read_only_slot(self) -> None:
        rom = ram(0x100, 0x55)
        rom.flags.writeable = False
        m = GuestMemoryMap()
        m.add(0, 0xF000, rom)
        assert m.read(0xF000, 2) == b"\x55\x55"
        with pytest.raises(MemoryAccessError, match="read-only"):
            m.write(0xF000, b"\x00")
        assert (rom == 0x55).all()

    def test_typed_view(self, gmap: GuestMemoryMap) -> None:
        v = gmap.view(0x1001, 3, "<u2")  # unaligned is fine
        assert v.shape == (3,)
        v[:] = [0x0201, 0x0403, 0x0605]
        assert gmap.read(0x1001, 6) == bytes(range(1, 7))
        assert gmap.view(0x2000, 0x20, np.uint64).shape == (0x20,)
        assert gmap.view(0x2100, 0, np.uint64).shape == (0,)

    @pytest.mark.parametrize(
        ("gpa", "count"),
        [(0x20F9, 1), (0x2000, 0x21), (0x1FFC, 1), (0x2000, -1), (0x2000, 2**61), (TOP - 4, 1)],
    )
    def test_typed_view_must_fit(self, gmap: GuestMemoryMap, gpa: int, count: int) -> None:
        with pytest.raises(MemoryAccessError):
            gmap.view(gpa, count, np.uint64)

    def test_typed_view_bad_dtype(self, gmap: GuestMemoryMap) -> None:
        with pytest.raises(UsageError):
            gmap.view(0x1000, 1, object)


def test_map_over_shared_region() -> None:
    """Slots backed by one region: guest writes are visible to a second mapping."""
    with SharedRegion.create(2 * PAGE) as r, SharedRegion.from_fd(r.fd.dup(), 2 * PAGE) as peer:
        m = GuestMemoryMap()
        m.add(0, 0x0, r.view(0, PAGE))
        m.add(1, 0x100000, r.view(PAGE, PAGE))
        m.write(0x100000 + 8, b"\xaa\xbb")
        assert peer.array[PAGE + 8 : PAGE + 10].tobytes() == b"\xaa\xbb"
        peer.array[4] = 0x42
        assert m.read(4, 1) == b"\x42"
        with pytest.raises(MemoryAccessError):
            m.translate(PAGE - 1, 2)  # contiguous in the region, not in guest space
        del m
    gc.collect()


# ============================================================================ property test

_addresses = st.one_of(
    st.integers(0, 96),
    st.integers(TOP - 96, TOP + 8),
    st.integers(-8, -1),
    st.sampled_from([TOP - 1, TOP, 2**63]),
)
_lengths = st.one_of(st.integers(-2, 100), st.sampled_from([TOP - 1, TOP, 2**63, 2**70]))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 5), _addresses, st.integers(0, 40)),
        st.tuples(st.just("remove"), st.integers(0, 5), st.just(0), st.just(0)),
        st.tuples(st.just("translate"), st.just(0), _addresses, _lengths),
        st.tuples(st.just("translate"), st.just(0), _addresses, _lengths),
    ),
    max_size=40,
)

Model = dict[int, tuple[int, int, np.ndarray[Any, np.dtype[np.uint8]]]]


def _model_add_ok(model: Model, slot: int, gpa: int, size: int) -> bool:
    if slot in model or size == 0 or not 0 <= gpa < TOP or gpa + size > TOP:
        return False
    return all(gpa + size <= s or e <= gpa for s, e in ((g, g + n) for g, n, _ in model.values()))


def _model_translate(model: Model, gpa: int, length: int) -> tuple[int, int] | None:
    """(address of the first byte, slot gpa) or None, by linear search over intervals."""
    if gpa < 0 or length < 0 or gpa >= TOP or gpa + length > TOP:
        return None
    hits = [(g, backing) for g, n, backing in model.values() if g <= gpa <= gpa + length <= g + n]
    if not hits:
        return None
    # length 0 exactly between two adjacent slots matches both: the later one wins
    g, backing = max(hits, key=lambda h: h[0])
    return addr_of(backing) + (gpa - g), g


@settings(database=None, deadline=None, max_examples=300)
@given(_ops)
def test_translate_matches_reference_model(ops: list[tuple[str, int, int, int]]) -> None:
    m = GuestMemoryMap()
    model: Model = {}
    for op, slot, a, b in ops:
        if op == "add":
            backing = ram(b)
            if _model_add_ok(model, slot, a, b):
                m.add(slot, a, backing)
                model[slot] = (a, b, backing)
            else:
                with pytest.raises(UsageError):
                    m.add(slot, a, backing)
        elif op == "remove":
            if slot in model:
                m.remove(slot)
                del model[slot]
            else:
                with pytest.raises(UsageError):
                    m.remove(slot)
        else:
            expected = _model_translate(model, a, b)
            if expected is None:
                with pytest.raises(MemoryAccessError):
                    m.translate(a, b)
            else:
                v = m.translate(a, b)
                assert v.shape == (b,)
                if b:  # an empty view has no meaningful address (numpy may reset it)
                    assert addr_of(v) == expected[0]
        assert [(s.slot, s.gpa, s.size) for s in m.slots()] == sorted(
            ((k, g, n) for k, (g, n, _) in model.items()), key=lambda t: t[1]
        )
        assert len(m) == len(model)
