"""Tests for hostemu/devices/blk.py (and the pure helpers of guestemu/workloads/blk.py): the
model's request handling without processes.

Guest memory is a numpy array in a :class:`GuestMemoryMap`; a :class:`DriverRing` plays the
guest, a :class:`DeviceRing` on the same memory feeds the model, and a fake runtime provides
what the model uses of :class:`DeviceRuntime` (guest memory, ``complete``, ``queues``,
``schedule``). The image is a real file in ``tmp_path``: every bad request is checked to
leave it byte for byte unchanged and never to raise.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from guestemu.workloads import blk as guest_blk
from hostemu.devices import blk
from hostemu.devices.runtime import Queue
from shared import pci_layout as pl
from shared.errors import ConfigError
from shared.memory import GuestMemoryMap
from shared.virtio import DeviceRing, DriverRing, RingLayout

CAPACITY = 64  # sectors: a 32 KiB disk
QSIZE = 256
RING = 0x0000
BUFS = 0x10000
RAM = 0x100000
S = blk.SECTOR


class FakeRuntime:
    """What :class:`BlkModel` uses of a :class:`DeviceRuntime`, recording completions."""

    def __init__(self, mem: GuestMemoryMap) -> None:
        self.memory = SimpleNamespace(map=mem)
        self.queues: dict[int, Queue] = {}
        self.scheduled: list[int] = []
        self.interrupts = 0

    def complete(self, q: Queue, ids: Any, lens: Any) -> None:
        if q.ring.push_used(ids, lens):
            self.interrupts += 1

    def schedule(self, queue: int) -> None:
        self.scheduled.append(queue)


class Disk:
    """A blk model over an image file, with a driver ring to post requests by hand."""

    def __init__(
        self, path: Path, capacity: int = CAPACITY, qsize: int = QSIZE, **params: Any
    ) -> None:
        self.path = path
        self.mem = GuestMemoryMap()
        self.ram = np.zeros(RAM, dtype=np.uint8)
        self.mem.add(0, 0, self.ram)
        layout = RingLayout(qsize)
        self.driver = DriverRing(self.mem.translate(RING, layout.size), layout, event_idx=True)
        self.queue = Queue(0, DeviceRing.from_layout(self.mem, RING, layout, event_idx=True), 0)
        self.runtime = FakeRuntime(self.mem)
        self.runtime.queues[0] = self.queue
        model = blk.make_model({"image": str(path), "capacity": capacity, **params})
        assert isinstance(model, blk.BlkModel)
        self.model = model
        self.model.attach(self.runtime)  # type: ignore[arg-type]
        self.next = BUFS

    def close(self) -> None:
        self.model.close()

    # -- guest side helpers

    def alloc(self, size: int, data: bytes | None = None) -> int:
        gpa = self.next
        self.next = (gpa + size + 63) // 64 * 64
        assert self.next <= RAM, "test RAM exhausted"
        if data is not None:
            self.mem.write(gpa, data)
        return gpa

    @staticmethod
    def header(rtype: int, sector: int, reserved: int = 0) -> bytes:
        h = np.zeros(1, dtype=blk.REQ_HEADER_DTYPE)
        h["type"], h["reserved"], h["sector"] = rtype, reserved, sector
        return h.tobytes()

    def post(self, segments: list[tuple[int, int, bool]]) -> int:
        return self.driver.add_chain(segments)

    def serve(self) -> dict[int, int]:
        """Run the model until it has nothing left; return ``{head: used len}``."""
        for _ in range(100):
            if not self.model.on_queue(self.queue):
                break
        else:
            pytest.fail("the model never ran out of work")
        assert self.queue.ring.broken is None
        ids, lens = self.driver.get_used()
        assert self.driver.broken is None
        return dict(zip(ids.tolist(), lens.tolist(), strict=True))

    def request(
        self, rtype: int, sector: int, *, data: bytes | None = None, nread: int = 0
    ) -> tuple[int, int, bytes]:
        """A well-formed 3-segment request; returns ``(status, used len, bytes read)``."""
        segs = [(self.alloc(16, self.header(rtype, sector)), 16, False)]
        if data is not None:
            segs.append((self.alloc(len(data), data), len(data), False))
        rbuf = self.alloc(nread, b"\xee" * nread) if nread else None
        if rbuf is not None:
            segs.append((rbuf, nread, True))
        status = self.alloc(1, b"\xff")
        segs.append((status, 1, True))
        head = self.post(segs)
        used = self.serve()[head]
        got = self.mem.read(rbuf, nread) if rbuf is not None else b""
        return self.mem.read(status, 1)[0], used, got

    def file(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path / "disk.img")
    yield d
    d.close()


def sectors(seed: int, first: int, n: int) -> bytes:
    return guest_blk.pattern(seed, first, n).tobytes()


# ============================================================================ round trips


def test_write_then_read_round_trip(disk: Disk) -> None:
    data = sectors(7, 3, 4)
    assert disk.request(blk.T_OUT, 3, data=data) == (blk.S_OK, 1, b"")
    content = disk.file()
    assert content[3 * S : 7 * S] == data
    assert content[: 3 * S] == bytes(3 * S) and content[7 * S :] == bytes((CAPACITY - 7) * S)
    status, used, got = disk.request(blk.T_IN, 3, nread=4 * S)
    assert (status, used, got) == (blk.S_OK, 4 * S + 1, data)
    # a read of never-written sectors sees zeros (the image's holes)
    assert disk.request(blk.T_IN, 40, nread=S) == (blk.S_OK, S + 1, bytes(S))
    st = disk.model.stats()
    assert (st["reads"], st["writes"], st["bytes_read"], st["bytes_written"], st["errors"]) == (
        2,
        1,
        5 * S,
        4 * S,
        0,
    )


def test_first_and_last_sector_are_reachable(disk: Disk) -> None:
    first, last = sectors(1, 0, 1), sectors(1, CAPACITY - 1, 1)
    assert disk.request(blk.T_OUT, 0, data=first)[0] == blk.S_OK
    assert disk.request(blk.T_OUT, CAPACITY - 1, data=last)[0] == blk.S_OK
    assert disk.request(blk.T_IN, CAPACITY - 1, nread=S)[2] == last
    content = disk.file()
    assert len(content) == CAPACITY * S
    assert content[:S] == first and content[-S:] == last


def test_flush_fsyncs_the_image_and_counts(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    disk.request(blk.T_OUT, 0, data=sectors(1, 0, 1))
    assert disk.request(blk.T_FLUSH, 0) == (blk.S_OK, 1, b"")
    assert synced == [disk.model.fd.fd]
    assert disk.model.stats()["flushes"] == 1


def test_segments_may_be_split_anywhere(disk: Disk) -> None:
    """The header split over two descriptors, data over three, status after the data in
    the same writable descriptor: the device reads and writes the byte streams."""
    data = sectors(2, 5, 2)
    hdr = disk.header(blk.T_OUT, 5)
    segs = [(disk.alloc(10, hdr[:10]), 10, False), (disk.alloc(6, hdr[10:]), 6, False)]
    for lo, hi in ((0, 100), (100, 612), (612, 2 * S)):
        segs.append((disk.alloc(hi - lo, data[lo:hi]), hi - lo, False))
    status = disk.alloc(1, b"\xff")
    head = disk.post([*segs, (status, 1, True)])
    assert disk.serve() == {head: 1} and disk.mem.read(status, 1) == b"\x00"
    assert disk.file()[5 * S : 7 * S] == data
    # read back into one 2*S+1 writable buffer: data then status in the same descriptor
    hbuf = disk.alloc(16, disk.header(blk.T_IN, 5))
    out = disk.alloc(2 * S + 1, b"\xee" * (2 * S + 1))
    head = disk.post([(hbuf, 16, False), (out, 2 * S + 1, True)])
    assert disk.serve() == {head: 2 * S + 1}
    assert disk.mem.read(out, 2 * S + 1) == data + b"\x00"


def test_get_id_returns_the_serial(tmp_path: Path) -> None:
    d = Disk(tmp_path / "disk.img", serial="disk-7")
    try:
        status, used, got = d.request(blk.T_GET_ID, 0, nread=blk.ID_BYTES)
        assert (status, used, got) == (
            blk.S_OK,
            blk.ID_BYTES + 1,
            b"disk-7" + bytes(blk.ID_BYTES - 6),
        )
        status, used, got = d.request(blk.T_GET_ID, 0, nread=4)  # a short buffer: truncated
        assert (status, used, got) == (blk.S_OK, 5, b"disk")
    finally:
        d.close()


def test_batch_is_served_in_order_and_flush_covers_it(disk: Disk) -> None:
    """Writes, a flush and reads in one batch: served in ring order, completed together."""
    heads, statuses = [], []
    for i in range(4):
        st = disk.alloc(1, b"\xff")
        statuses.append(st)
        d = sectors(9, i * 2, 2)
        heads.append(
            disk.post(
                [
                    (disk.alloc(16, disk.header(blk.T_OUT, i * 2)), 16, False),
                    (disk.alloc(len(d), d), len(d), False),
                    (st, 1, True),
                ]
            )
        )
    st = disk.alloc(1, b"\xff")
    statuses.append(st)
    heads.append(
        disk.post([(disk.alloc(16, disk.header(blk.T_FLUSH, 0)), 16, False), (st, 1, True)])
    )
    rd = disk.alloc(8 * S)
    st = disk.alloc(1, b"\xff")
    statuses.append(st)
    heads.append(
        disk.post(
            [
                (disk.alloc(16, disk.header(blk.T_IN, 0)), 16, False),
                (rd, 8 * S, True),
                (st, 1, True),
            ]
        )
    )
    used = disk.serve()
    assert used == {**{h: 1 for h in heads[:5]}, heads[5]: 8 * S + 1}
    assert all(disk.mem.read(s, 1) == b"\x00" for s in statuses)
    assert disk.mem.read(rd, 8 * S) == sectors(9, 0, 8)
    assert disk.model.stats()["flushes"] == 1


def test_empty_ring_returns_false_with_notifications_on(disk: Disk) -> None:
    assert disk.model.on_queue(disk.queue) is False
    assert disk.queue.ring.notifications_enabled
    assert disk.runtime.interrupts == 0


def test_other_queues_are_ignored(disk: Disk) -> None:
    other = Queue(1, disk.queue.ring, 0)
    disk.post([(disk.alloc(16, disk.header(blk.T_FLUSH, 0)), 16, False), (disk.alloc(1), 1, True)])
    assert disk.model.on_queue(other) is False
    assert disk.queue.ring.in_flight == 0


def test_work_per_pass_is_bounded(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blk, "BUDGET", 3)
    for _ in range(7):
        disk.post(
            [(disk.alloc(16, disk.header(blk.T_FLUSH, 0)), 16, False), (disk.alloc(1), 1, True)]
        )
    passes = [disk.model.on_queue(disk.queue) for _ in range(4)]
    # 3 + 3 + 1 chains, then an empty pass that re-enables kicks
    assert passes == [True, True, True, False]
    assert disk.model.stats()["flushes"] == 7
    assert len(disk.serve()) == 7


# ============================================================================ hostile requests


def _bad_requests(d: Disk) -> dict[str, tuple[list[tuple[int, int, bool]], int, int | None]]:
    """name -> (segments, expected used len, expected status at the last writable byte, or
    None when there is no writable byte at all)."""
    data = sectors(3, 0, 2)

    def hdr(rtype: int, sector: int) -> tuple[int, int, bool]:
        return (d.alloc(16, d.header(rtype, sector)), 16, False)

    def out(payload: bytes) -> tuple[int, int, bool]:
        return (d.alloc(len(payload), payload), len(payload), False)

    def w(n: int) -> tuple[int, int, bool]:
        return (d.alloc(n, b"\xee" * n), n, True)

    return {
        "header of 8 bytes": (
            [(d.alloc(8, d.header(blk.T_OUT, 0)[:8]), 8, False), w(1)],
            1,
            blk.S_IOERR,
        ),
        "status byte only": ([w(1)], 1, blk.S_IOERR),
        "no status byte": ([hdr(blk.T_OUT, 0), out(data)], 0, None),
        "no writable byte, header only": ([hdr(blk.T_FLUSH, 0)], 0, None),
        "write with writable data": ([hdr(blk.T_OUT, 0), w(S), w(1)], 1, blk.S_IOERR),
        "write with data and a 2-byte status": (
            [hdr(blk.T_OUT, 0), out(data), w(2)],
            1,
            blk.S_IOERR,
        ),
        "read with readable data": ([hdr(blk.T_IN, 0), out(data), w(1)], 1, blk.S_IOERR),
        "flush with data": ([hdr(blk.T_FLUSH, 0), out(data), w(1)], 1, blk.S_IOERR),
        "flush with writable data": ([hdr(blk.T_FLUSH, 0), w(S), w(1)], 1, blk.S_IOERR),
        "get_id with readable data": ([hdr(blk.T_GET_ID, 0), out(data), w(21)], 1, blk.S_IOERR),
        "write of 100 bytes": ([hdr(blk.T_OUT, 0), out(data[:100]), w(1)], 1, blk.S_IOERR),
        "write of 513 bytes": ([hdr(blk.T_OUT, 0), out(data[: S + 1]), w(1)], 1, blk.S_IOERR),
        "read of 511 bytes": ([hdr(blk.T_IN, 0), w(511), w(1)], 1, blk.S_IOERR),
        "write at capacity": ([hdr(blk.T_OUT, CAPACITY), out(data[:S]), w(1)], 1, blk.S_IOERR),
        "write straddling the end": (
            [hdr(blk.T_OUT, CAPACITY - 1), out(data), w(1)],
            1,
            blk.S_IOERR,
        ),
        "read at capacity": ([hdr(blk.T_IN, CAPACITY), w(S), w(1)], 1, blk.S_IOERR),
        "read straddling the end": ([hdr(blk.T_IN, CAPACITY - 1), w(2 * S), w(1)], 1, blk.S_IOERR),
        "write at sector 2**64-1 (overflow)": (
            [hdr(blk.T_OUT, 2**64 - 1), out(data), w(1)],
            1,
            blk.S_IOERR,
        ),
        "read at 2**55 (offset wraps 2**64)": ([hdr(blk.T_IN, 2**55), w(S), w(1)], 1, blk.S_IOERR),
        "unknown type 2": ([hdr(2, 0), out(data), w(1)], 1, blk.S_UNSUPP),
        "unknown type 0xFFFFFFFF": ([hdr(0xFFFFFFFF, 0), w(1)], 1, blk.S_UNSUPP),
    }


BAD = [
    "header of 8 bytes",
    "status byte only",
    "no status byte",
    "no writable byte, header only",
    "write with writable data",
    "write with data and a 2-byte status",
    "read with readable data",
    "flush with data",
    "flush with writable data",
    "get_id with readable data",
    "write of 100 bytes",
    "write of 513 bytes",
    "read of 511 bytes",
    "write at capacity",
    "write straddling the end",
    "read at capacity",
    "read straddling the end",
    "write at sector 2**64-1 (overflow)",
    "read at 2**55 (offset wraps 2**64)",
    "unknown type 2",
    "unknown type 0xFFFFFFFF",
]


@pytest.mark.parametrize("name", BAD)
def test_bad_request_gets_an_error_status_and_leaves_the_file_alone(disk: Disk, name: str) -> None:
    disk.request(blk.T_OUT, 0, data=sectors(5, 0, CAPACITY))  # a known, non-zero disk
    before = disk.file()
    errors_before = disk.model.stats()["errors"]
    segs, want_used, want_status = _bad_requests(disk)[name]
    head = disk.post(segs)
    assert disk.serve() == {head: want_used}
    if want_status is not None:
        gpa, length, _ = segs[-1]
        assert disk.mem.read(gpa + length - 1, 1)[0] == want_status
    # no data was written back into the guest's buffers either
    for gpa, length, writable in segs[:-1]:
        if writable:
            assert disk.mem.read(gpa, length) == b"\xee" * length
    assert disk.file() == before
    st = disk.model.stats()
    assert st["errors"] == errors_before + 1
    assert st["writes"] == 1 and st["reads"] == 0 and st["flushes"] == 0
    # and the device keeps serving good requests afterwards
    assert disk.request(blk.T_IN, 0, nread=S)[:2] == (blk.S_OK, S + 1)


def test_bad_request_list_is_complete(disk: Disk) -> None:
    assert sorted(_bad_requests(disk)) == sorted(BAD)


def test_bad_requests_in_one_batch_with_good_ones(disk: Disk) -> None:
    """A batch mixing every bad request with good writes: each gets its own status."""
    good = sectors(4, 10, 1)
    bad = _bad_requests(disk)
    heads = {}
    for name, (segs, want_used, _) in bad.items():
        heads[disk.post(segs)] = want_used
        st = disk.alloc(1, b"\xff")
        heads[
            disk.post(
                [
                    (disk.alloc(16, disk.header(blk.T_OUT, 10)), 16, False),
                    (disk.alloc(S, good), S, False),
                    (st, 1, True),
                ]
            )
        ] = 1
        assert name
    assert disk.serve() == heads
    assert disk.file()[10 * S : 11 * S] == good
    assert disk.model.stats()["errors"] == len(bad)


def test_out_of_range_never_grows_the_file(disk: Disk) -> None:
    for sector in (CAPACITY, CAPACITY + 1, 2**40, 2**64 - 1):
        assert disk.request(blk.T_OUT, sector, data=sectors(1, 0, 1))[0] == blk.S_IOERR
    assert disk.path.stat().st_size == CAPACITY * S
    assert disk.file() == bytes(CAPACITY * S)
    assert disk.model.stats()["out_of_range"] == 4


def test_io_errors_become_ioerr(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", fail)
    monkeypatch.setattr(os, "fsync", fail)
    monkeypatch.setattr(os, "preadv", fail)
    assert disk.request(blk.T_OUT, 0, data=sectors(1, 0, 1)) == (blk.S_IOERR, 1, b"")
    assert disk.request(blk.T_FLUSH, 0) == (blk.S_IOERR, 1, b"")
    assert disk.request(blk.T_IN, 0, nread=S)[:2] == (blk.S_IOERR, 1)
    st = disk.model.stats()
    assert (st["io_failures"], st["errors"], st["writes"], st["flushes"]) == (3, 3, 0, 0)


def test_image_shrunk_under_the_device_reads_short(disk: Disk) -> None:
    os.truncate(disk.path, S)
    status, used, _ = disk.request(blk.T_IN, 0, nread=2 * S)
    assert (status, used) == (blk.S_IOERR, S + 1)  # one sector did arrive


# ============================================================================ I/O vectors


def test_vectored_io_splits_long_vectors_and_retries_short_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = blk.IOV_MAX + 500  # more buffers than one preadv/pwritev takes
    src = np.arange(n * 3, dtype=np.uint32).astype(np.uint8)
    views = [src[i * 3 : i * 3 + 3] for i in range(n)]
    real = os.pwritev
    calls: list[int] = []

    def short_pwritev(fd: int, bufs: list[Any], offset: int) -> int:
        calls.append(len(bufs))
        assert len(bufs) <= blk.IOV_MAX
        return real(fd, bufs[:7], offset)  # a short write every time

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    with open(tmp_path / "f", "w+b") as f:
        assert blk.pwritev_all(f.fileno(), views, 100) == n * 3
        monkeypatch.undo()
        f.seek(100)
        assert f.read() == src.tobytes()
        dst = np.zeros(n * 3, dtype=np.uint8)
        got = blk.preadv_all(f.fileno(), [dst[i * 3 : i * 3 + 3] for i in range(n)], 100)
        assert got == n * 3 and dst.tobytes() == src.tobytes()
        # past the end of file: what is there, then a short count
        dst[...] = 0
        assert blk.preadv_all(f.fileno(), [dst[:10], dst[10:20]], 100 + n * 3 - 4) == 4
    assert len(calls) > 2


def test_advance_drops_whole_and_partial_buffers() -> None:
    bufs = [memoryview(b"abc"), memoryview(b"de"), memoryview(b"fghi")]
    assert [bytes(b) for b in blk._advance(bufs, 4)] == [b"e", b"fghi"]
    assert [bytes(b) for b in blk._advance(bufs, 5)] == [b"fghi"]
    assert blk._advance(bufs, 9) == []


# ============================================================================ image and params


def test_image_is_created_sparse_and_close_on_exec(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    capacity = 1 << 21  # 1 GiB
    model = blk.make_model({"image": str(path), "capacity": capacity})
    try:
        assert isinstance(model, blk.BlkModel)
        st = path.stat()
        assert st.st_size == capacity * S
        assert st.st_blocks * 512 < 1 << 20  # a hole, not a gigabyte of zeros
        assert st.st_mode & 0o777 == 0o600
        assert fcntl.fcntl(model.fd.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        model.close()
    assert model.fd.closed
    model.close()  # harmless twice


def test_existing_image_keeps_its_data_and_is_grown_or_left(tmp_path: Path) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(b"boot" + bytes(S - 4))
    blk.make_model({"image": str(small), "capacity": 4}).close()
    assert small.stat().st_size == 4 * S and small.read_bytes()[:4] == b"boot"
    big = tmp_path / "bigger.img"
    big.write_bytes(b"x" * (10 * S))
    blk.make_model({"image": str(big), "capacity": 4}).close()
    assert big.read_bytes() == b"x" * (10 * S)  # never shrunk: the device just ignores the rest


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"capacity": 8}, "image"),
        ({"image": "", "capacity": 8}, "image"),
        ({"image": 5, "capacity": 8}, "image"),
        ({"image": "x\0y", "capacity": 8}, "image"),
        ({"image": "IMG"}, "capacity"),
        ({"image": "IMG", "capacity": 0}, "capacity"),
        ({"image": "IMG", "capacity": -1}, "capacity"),
        ({"image": "IMG", "capacity": True}, "capacity"),
        ({"image": "IMG", "capacity": "8"}, "capacity"),
        ({"image": "IMG", "capacity": 8.0}, "capacity"),
        ({"image": "IMG", "capacity": 2**63}, "capacity"),
        ({"image": "IMG", "capacity": 8, "serial": "x" * 21}, "serial"),
        ({"image": "IMG", "capacity": 8, "serial": "é"}, "serial"),
        ({"image": "IMG", "capacity": 8, "size": 1}, "size"),
    ],
)
def test_bad_params_are_config_errors_naming_the_field(
    tmp_path: Path, params: dict[str, Any], field: str
) -> None:
    params = {k: (str(tmp_path / "d.img") if v == "IMG" else v) for k, v in params.items()}
    with pytest.raises(ConfigError, match=field):
        blk.make_model(params)
    with pytest.raises(ConfigError, match=field):
        blk.device_config(params)
    assert not (tmp_path / "d.img").exists()  # nothing was created


def test_params_must_be_an_object() -> None:
    with pytest.raises(ConfigError, match="object"):
        blk.parse_params(["image", "capacity"])


def test_image_that_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'image'.*regular file"):
        blk.make_model({"image": "/dev/null", "capacity": 8})
    with pytest.raises(ConfigError, match="'image'"):
        blk.make_model({"image": str(tmp_path), "capacity": 8})  # a directory
    with pytest.raises(ConfigError, match="'image'"):
        blk.make_model({"image": str(tmp_path / "no" / "such" / "dir"), "capacity": 8})


def test_device_config_publishes_the_capacity() -> None:
    raw = blk.device_config({"image": "unused.img", "capacity": 123456789})
    assert len(raw) == pl.BLK_CONFIG_DTYPE.itemsize
    assert int(np.frombuffer(raw, dtype=pl.BLK_CONFIG_DTYPE)["capacity"][0]) == 123456789
    assert not Path("unused.img").exists()  # the VMM side never opens the image
    assert (blk.DEVICE_ID, blk.QUEUES, blk.VECTORS) == (pl.DEVICE_BLK, 1, 1)


# ============================================================================ guest helpers


def test_guest_and_device_agree_on_the_request_abi() -> None:
    assert guest_blk.REQ_HEADER_DTYPE == blk.REQ_HEADER_DTYPE
    assert blk.REQ_HEADER_DTYPE.itemsize == blk.HEADER_SIZE == 16
    assert (guest_blk.T_IN, guest_blk.T_OUT, guest_blk.T_FLUSH) == (
        blk.T_IN,
        blk.T_OUT,
        blk.T_FLUSH,
    )
    assert (guest_blk.S_OK, guest_blk.S_IOERR, guest_blk.S_UNSUPP) == (
        blk.S_OK,
        blk.S_IOERR,
        blk.S_UNSUPP,
    )
    assert guest_blk.STATUS_UNSET not in (blk.S_OK, blk.S_IOERR, blk.S_UNSUPP)


def test_pattern_is_a_function_of_seed_and_sector() -> None:
    whole = guest_blk.pattern(5, 100, 8)
    assert whole.dtype == np.uint8 and whole.shape == (8 * S,)
    # any sub-range gives the same bytes for the same sectors
    assert whole[3 * S : 5 * S].tobytes() == guest_blk.pattern(5, 103, 2).tobytes()
    # word 0 of each sector is its sector number
    words: npt.NDArray[np.uint64] = whole.view("<u8").reshape(8, S // 8)
    assert words[:, 0].tolist() == list(range(100, 108))
    assert guest_blk.pattern(6, 100, 8).tobytes() != whole.tobytes()
    # the rest looks random: no two sectors share their payload
    assert len({row[8:].tobytes() for row in whole.reshape(8, S)}) == 8


def test_first_mismatch_names_the_sector() -> None:
    data = guest_blk.pattern(9, 50, 4).copy()
    assert guest_blk.first_mismatch(data, 9, 50) is None
    data[2 * S + 100] ^= 1
    assert guest_blk.first_mismatch(data, 9, 50) == 52
    assert guest_blk.first_mismatch(data, 8, 50) == 50
