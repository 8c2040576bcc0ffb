"""``blk``: a block device backed by a real file (a sparse disk image) -- read, write, flush.

Request format (virtio-blk's, on queue 0)
-----------------------------------------
Every chain is one request::

    readable   header  {type <u4, reserved <u4, sector <u8}       16 bytes (REQ_HEADER_DTYPE)
    readable   data    OUT (write): the bytes to store
    writable   data    IN (read): where the bytes go; GET_ID: up to 20 id bytes
    writable   status  the last writable byte: OK 0, IOERR 1, UNSUPP 2

``sector`` counts 512-byte sectors from the start of the image; the capacity (in sectors) is
published in the device-specific config space (:data:`~shared.pci_layout.BLK_CONFIG_DTYPE`).
FLUSH makes every write completed before it durable (``fsync``).

Invariants
----------
* **The guest cannot crash the device or reach outside the disk.** Everything in a chain is
  untrusted. The header is copied once into private memory and decoded from the copy. A
  request whose header is shorter than 16 bytes, whose segments point the wrong way (data
  readable on IN / GET_ID, writable bytes besides the status on OUT / FLUSH), whose data is
  not a whole number of sectors, or whose range ``[sector, sector + len/512)`` is not inside
  ``[0, capacity)`` (checked with Python integers: no overflow) completes with status IOERR;
  an unknown type with UNSUPP. (A zero-length IN or OUT at ``sector <= capacity`` is a
  no-op that succeeds, as virtio does not forbid it.) The file is touched only at offsets inside
  ``[0, capacity*512)``, and only by positional I/O (``preadv``/``pwritev``/``fsync`` on the
  fd: no shared file offset). A chain without a single writable byte has nowhere to put a
  status: it completes with used length 0 and is counted as malformed. A failing system call
  (EIO, ENOSPC on a sparse image ...) is the request's IOERR, never an exception.
* The ring layer has already validated every segment (inside one guest memory slot, readable
  ones first, writable ones in writable memory); a ring the guest corrupted is broken there
  and reported by the runtime, not here.
* Every chain taken in a pass is completed in that pass, in order, with used length = bytes
  written into the chain: the data read (IN, GET_ID) plus the status byte.
* At most :data:`~hostemu.devices.runtime.BUDGET` chains per pass; ``on_queue`` returns True
  when more may remain, so a request storm cannot monopolise the process.
* Requests are served synchronously and in ring order, so a FLUSH covers every write
  completed before it was made available *and* every write earlier in the same batch.

Durability: a write is in the kernel's page cache once ``pwritev`` returns, which already
survives SIGKILL of every process; the ``fsync`` behind FLUSH extends that to a host crash or
power loss (on storage that honours it). The guest must therefore treat a write as durable
only once a FLUSH submitted after its completion has completed.

Data moves between the file and guest memory without a copy: ``preadv``/``pwritev`` take the
guest's buffers (numpy views of the shared memory) as their I/O vector.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from hostemu.devices.runtime import BUDGET, DeviceModel, Queue
from shared import pci_layout as pl
from shared.errors import ConfigError, MemoryAccessError
from shared.fds import OwnedFd
from shared.memory import GuestMemoryMap
from shared.virtio import Batch, Segment

U8Array = npt.NDArray[np.uint8]

SECTOR: Final = pl.SECTOR_SIZE
REQUEST_QUEUE: Final = 0

T_IN: Final = pl.BLK_T_IN
T_OUT: Final = pl.BLK_T_OUT
T_FLUSH: Final = pl.BLK_T_FLUSH
T_GET_ID: Final = pl.BLK_T_GET_ID
S_OK: Final = pl.BLK_S_OK
S_IOERR: Final = pl.BLK_S_IOERR
S_UNSUPP: Final = pl.BLK_S_UNSUPP
REQ_HEADER_DTYPE: Final = pl.BLK_REQ_HEADER_DTYPE
HEADER_SIZE: Final = REQ_HEADER_DTYPE.itemsize
ID_BYTES: Final = 20
"""GET_ID answers at most this many bytes (``VIRTIO_BLK_ID_BYTES``), NUL-padded."""
DEFAULT_SERIAL: Final = "vbusemu-blk"
MAX_CAPACITY: Final = (2**63 - 1) // SECTOR
"""Largest capacity whose byte size still fits ``off_t``."""
IOV_MAX: Final = 1024
"""Linux's limit on one ``preadv``/``pwritev`` vector; longer chains are split."""

_OPTIONS: Final = frozenset({"image", "capacity", "serial"})


# ---------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class BlkParams:
    image: str
    capacity: int
    serial: bytes


def parse_params(params: object) -> BlkParams:
    """Validate the model's JSON options; :class:`ConfigError` names the offending field."""
    if not isinstance(params, dict):
        raise ConfigError(f"blk: params must be a JSON object, got {type(params).__name__}")
    unknown = sorted(set(params) - _OPTIONS)
    if unknown:
        raise ConfigError(f"blk: unknown option(s) {unknown}; known: {sorted(_OPTIONS)}")
    image = params.get("image")
    if not isinstance(image, str) or not image or "\0" in image:
        raise ConfigError(f"blk: 'image' must be a non-empty file path, got {image!r}")
    capacity = params.get("capacity")
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise ConfigError(f"blk: 'capacity' must be an integer (sectors), got {capacity!r}")
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ConfigError(f"blk: 'capacity' must be in 1..{MAX_CAPACITY} sectors, got {capacity}")
    serial = params.get("serial", DEFAULT_SERIAL)
    if not isinstance(serial, str) or not serial.isascii() or len(serial) > ID_BYTES:
        raise ConfigError(
            f"blk: 'serial' must be ASCII of at most {ID_BYTES} bytes, got {serial!r}"
        )
    return BlkParams(image, capacity, serial.encode("ascii"))


def open_image(path: str, capacity: int) -> OwnedFd:
    """Open (creating it if needed, mode 0600) the regular file ``path``, close-on-exec, and
    grow it sparsely (``ftruncate``) to ``capacity`` sectors if it is smaller. A larger file
    is left alone: the device never addresses past ``capacity``."""
    try:
        fd = OwnedFd(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise ConfigError(f"blk: 'image' {path!r}: {e.strerror}") from None
    try:
        st = os.fstat(fd.fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"blk: 'image' {path!r} is not a regular file")
        if st.st_size < capacity * SECTOR:
            try:
                os.ftruncate(fd.fd, capacity * SECTOR)  # a hole: no blocks allocated
            except OSError as e:
                raise ConfigError(
                    f"blk: 'capacity' {capacity} sectors: cannot size {path!r}: {e.strerror}"
                ) from None
    except BaseException:
        fd.close()
        raise
    return fd


# ---------------------------------------------------------------------------- I/O vectors


def _split(views: Sequence[U8Array], n: int) -> tuple[list[U8Array], list[U8Array]]:
    """The first ``n`` bytes of the concatenation of ``views`` and the rest, as views."""
    head: list[U8Array] = []
    tail: list[U8Array] = []
    left = n
    for v in views:
        size = int(v.shape[0])
        if left >= size:
            head.append(v)
            left -= size
        elif left > 0:
            head.append(v[:left])
            tail.append(v[left:])
            left = 0
        else:
            tail.append(v)
    return head, tail


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """``bufs`` without their first ``n`` bytes (after a short transfer)."""
    while n and bufs:
        first = len(bufs[0])
        if n >= first:
            n -= first
            bufs = bufs[1:]
        else:
            bufs = [bufs[0][n:], *bufs[1:]]
            n = 0
    return bufs


def preadv_all(fd: int, views: Sequence[U8Array], offset: int) -> int:
    """Fill ``views`` from ``offset``; return the bytes read (less only at end of file).
    Short reads are retried and vectors longer than :data:`IOV_MAX` split."""
    bufs = [v.data for v in views if v.shape[0]]  # zero-copy views of guest memory
    total = 0
    while bufs:
        got = os.preadv(fd, bufs[:IOV_MAX], offset + total)
        if got == 0:
            break  # end of file: someone shrank the image under us
        total += got
        bufs = _advance(bufs, got)
    return total


def pwritev_all(fd: int, views: Sequence[U8Array], offset: int) -> int:
    """Write all of ``views`` at ``offset`` (retrying short writes); return the byte count."""
    bufs = [v.data for v in views if v.shape[0]]  # zero-copy views of guest memory
    total = 0
    while bufs:
        put = os.pwritev(fd, bufs[:IOV_MAX], offset + total)
        if put == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        total += put
        bufs = _advance(bufs, put)
    return total


# ---------------------------------------------------------------------------- the model


class BlkModel(DeviceModel):
    """Serves queue 0 against an image file; see the module docstring for the rules."""

    name = "blk"

    def __init__(self, fd: OwnedFd, capacity: int, serial: bytes = DEFAULT_SERIAL.encode()) -> None:
        self.fd = fd
        self.capacity = capacity
        self.serial = serial[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------ queue

    def on_queue(self, q: Queue) -> bool:
        if q.index != REQUEST_QUEUE:
            return False
        ring = q.ring
        # Kicks are pointless while we are draining the ring anyway.
        ring.disable_notifications()
        batch = ring.pop_batch(max_n=BUDGET)
        if len(batch) == 0:
            return ring.enable_notifications()  # re-check after enabling: no lost kick
        mem = self.runtime.memory.map
        lens = np.zeros(len(batch), dtype=np.uint32)
        for i in range(len(batch)):
            lens[i] = self._serve(mem, batch, i)
        self.runtime.complete(q, batch.heads, lens)
        return True

    def _serve(self, mem: GuestMemoryMap, batch: Batch, i: int) -> int:
        """Serve chain ``i`` of ``batch``; return its used length."""
        segs = batch.chain(i)
        readable = [s for s in segs if not s.writable]
        writable = [s for s in segs if s.writable]  # the ring put them all after the readable
        if not writable:
            self.counters["malformed"] += 1
            self.counters["errors"] += 1
            return 0  # nowhere to put a status
        try:
            # The status is the last writable byte; the writable bytes before it are data.
            data_in, (status,) = _split(_views(mem, writable), int(batch.writable_lens[i]) - 1)
            code, written = self._request(_views(mem, readable), data_in)
        except MemoryAccessError:
            # Unreachable while the memory map cannot change within a pass; if it ever
            # does, the chain's buffers are gone and so is the status byte.
            self.counters["malformed"] += 1
            self.counters["errors"] += 1
            return 0
        status[0] = code
        if code != S_OK:
            self.counters["errors"] += 1
        return written + 1

    def _request(self, rviews: list[U8Array], data_in: list[U8Array]) -> tuple[int, int]:
        """Decode and execute one request; return ``(status, data bytes written to guest)``."""
        header_views, data_out = _split(rviews, HEADER_SIZE)
        header = np.concatenate(header_views) if header_views else np.zeros(0, np.uint8)
        if header.shape[0] < HEADER_SIZE:
            self.counters["short_header"] += 1
            return S_IOERR, 0
        # One private copy (concatenate copies); only the copy is decoded.
        rtype, _reserved, sector = header.view(REQ_HEADER_DTYPE)[0].item()
        n_out = sum(int(v.shape[0]) for v in data_out)  # readable bytes after the header
        n_in = sum(int(v.shape[0]) for v in data_in)  # writable bytes before the status
        if rtype not in (T_IN, T_OUT, T_FLUSH, T_GET_ID):
            self.counters["unsupported"] += 1
            return S_UNSUPP, 0
        # Data may only flow the way the type says: into the guest for IN and GET_ID, out
        # of it for OUT, neither way for FLUSH.
        if (n_out if rtype in (T_IN, T_GET_ID) else n_in) or (rtype == T_FLUSH and n_out):
            self.counters["bad_direction"] += 1
            return S_IOERR, 0
        if rtype == T_IN:
            if not self._in_range(sector, n_in):
                return S_IOERR, 0
            return self._read(sector, data_in, n_in)
        if rtype == T_OUT:
            if not self._in_range(sector, n_out):
                return S_IOERR, 0
            return self._write(sector, data_out, n_out), 0
        if rtype == T_FLUSH:
            return self._flush(), 0
        return self._get_id(data_in, n_in)

    def _in_range(self, sector: int, nbytes: int) -> bool:
        """Whether ``nbytes`` at ``sector`` is whole sectors inside the disk (Python ints:
        ``sector`` up to 2**64 - 1 cannot overflow)."""
        if nbytes % SECTOR:
            self.counters["unaligned"] += 1
            return False
        if sector > self.capacity or nbytes // SECTOR > self.capacity - sector:
            self.counters["out_of_range"] += 1
            return False
        return True

    def _read(self, sector: int, views: list[U8Array], nbytes: int) -> tuple[int, int]:
        try:
            got = preadv_all(self.fd.fileno(), views, sector * SECTOR)
        except OSError:
            self.counters["io_failures"] += 1
            return S_IOERR, 0
        if got < nbytes:
            self.counters["io_failures"] += 1  # the image shrank under us
            return S_IOERR, got
        self.counters["reads"] += 1
        self.counters["bytes_read"] += nbytes
        return S_OK, nbytes

    def _write(self, sector: int, views: list[U8Array], nbytes: int) -> int:
        try:
            pwritev_all(self.fd.fileno(), views, sector * SECTOR)
        except OSError:
            self.counters["io_failures"] += 1  # ENOSPC on a sparse image, EIO, ...
            return S_IOERR
        self.counters["writes"] += 1
        self.counters["bytes_written"] += nbytes
        return S_OK

    def _flush(self) -> int:
        try:
            os.fsync(self.fd.fileno())
        except OSError:
            self.counters["io_failures"] += 1
            return S_IOERR
        self.counters["flushes"] += 1
        return S_OK

    def _get_id(self, views: list[U8Array], nbytes: int) -> tuple[int, int]:
        take = min(nbytes, ID_BYTES)
        src = np.frombuffer(self.serial, dtype=np.uint8)
        pos = 0
        for v in _split(views, take)[0]:
            v[...] = src[pos : pos + v.shape[0]]
            pos += int(v.shape[0])
        self.counters["get_id"] += 1
        return S_OK, take

    # ------------------------------------------------------------------ lifecycle

    def stats(self) -> dict[str, Any]:
        c = self.counters
        keys = (
            "reads",
            "writes",
            "flushes",
            "get_id",
            "bytes_read",
            "bytes_written",
            "errors",
            "unsupported",
            "malformed",
            "short_header",
            "bad_direction",
            "unaligned",
            "out_of_range",
            "io_failures",
        )
        return {"capacity": self.capacity, **{k: c[k] for k in keys}}

    def close(self) -> None:
        self.fd.close()


def _views(mem: GuestMemoryMap, segs: Sequence[Segment]) -> list[U8Array]:
    """Guest views of ``segs`` (validated by the ring; translate checks bounds again)."""
    return [mem.translate(s.gpa, s.len) for s in segs]


# ---------------------------------------------------------------------------- model module API

DEVICE_ID = pl.DEVICE_BLK
QUEUES = 1
VECTORS = 1
IMAGE_PARAMS: Final = ("image",)
"""Params naming a disk image: ``vbusemu run`` locks it for the whole run."""


def device_config(params: dict[str, Any]) -> bytes:
    """The device-specific config bytes: the capacity in 512-byte sectors."""
    p = parse_params(params)
    cfg = np.zeros(1, dtype=pl.BLK_CONFIG_DTYPE)
    cfg["capacity"] = p.capacity
    return cfg.tobytes()


def make_model(params: dict[str, Any]) -> DeviceModel:
    p = parse_params(params)
    return BlkModel(open_image(p.image, p.capacity), p.capacity, p.serial)
