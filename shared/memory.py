"""Shared-memory regions and the guest-physical address map.

Two layers, in the spirit of rust-vmm vm-memory:

* :class:`SharedRegion` -- one shared-memory object (POSIX shm, or a size-sealed memfd)
  mapped ``MAP_SHARED`` read/write
  into this process and seen as numpy ``uint8`` views. Its fd is what travels between
  processes (over SCM_RIGHTS); the receiver maps it with :meth:`SharedRegion.from_fd`.
* :class:`GuestMemoryMap` -- the guest-physical address (GPA) map: numbered slots, each a
  GPA range backed by a 1-D ``uint8`` numpy array (typically a view into a region), like
  KVM memory slots. :meth:`GuestMemoryMap.translate` turns a guest range into a view.

Invariants
----------
Regions:

* A region made by :meth:`SharedRegion.create` never keeps a name in ``/dev/shm``: it is
  created ``O_CREX``, mode 0600, under an unguessable name, and unlinked before any later
  step can fail. Nothing survives a crash. (posix_ipc is asked for size 0 and we
  ``ftruncate`` ourselves: then its constructor either fails having created nothing, or
  returns an object we unlink at once -- never "created, then raised".)
* A region owns exactly one close-on-exec :class:`~shared.fds.OwnedFd`. CPython's
  ``mmap`` keeps a private duplicate of it for as long as the mapping lives (there is no
  ``trackfd=False`` before 3.13); that duplicate goes away with the mapping.
* :meth:`SharedRegion.from_fd` takes ownership of the fd it is given: on success the fd
  moves into the region (the caller's ``OwnedFd`` then reads ``-1``); on any failure it
  is closed. Anything but a POSIX shm object or memfd of at least ``size`` bytes that can
  be mapped read/write is refused with :class:`~shared.errors.MemoryAccessError`.
* The mapping is never unmapped under a live numpy view, so every view handed out stays
  valid. :meth:`SharedRegion.close` drops the region's own references and tries to unmap;
  if a caller still holds a view (CPython refuses with ``BufferError``), the mapping is
  left for the garbage collector to unmap when the last view dies. The fd is closed
  either way: a mapping does not need its fd.
* Truncation: whoever else holds the object could shrink it
  (``ftruncate``) after we checked its size; touching pages past the new end then raises
  SIGBUS in *every* process that maps it, and a Python process cannot survive a SIGBUS
  on a numpy access. The defense is a seal: ``create(size, sealed=True)`` makes a memfd
  (``MFD_ALLOW_SEALING``) and adds ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`` before
  the fd leaves this process, so any later ``ftruncate`` -- by anyone, the creator too --
  fails with EPERM and the mapping stays whole. POSIX shm objects cannot be sealed (the
  kernel creates them with ``F_SEAL_SEAL`` already set), so the ``sealed=False`` default,
  a posix_ipc object, is only for peers trusted not to truncate; guest RAM, which every
  untrusted guest and device maps, is created sealed by the VMM. :func:`is_shrink_sealed`
  tells a receiver which kind it got.

Guest-physical map:

* Slots are kept sorted by GPA and never overlap; each has ``size > 0`` and
  ``gpa + size <= 2**64``. Adjacent slots are fine. Lookups bisect the sorted starts:
  O(log n), no linear scan.
* Configuring the map wrongly (bad or duplicate slot id, size 0, overlap, overflow past
  ``2**64``, a backing that is not a 1-D C-contiguous ``uint8`` array, removing an
  unknown slot) is the VMM's own mistake and raises :class:`~shared.errors.UsageError`;
  the map is unchanged.
* Every guest access (:meth:`~GuestMemoryMap.translate`, ``read``, ``write``, ``view``) is
  checked explicitly before any view is built -- numpy slicing would clamp or wrap
  silently -- and raises :class:`~shared.errors.MemoryAccessError` (nothing accessed)
  when: the address or length is negative; the address is ``>= 2**64`` or the range ends
  past ``2**64``; any byte is not backed (a gap); the range spans two slots, even
  adjacent ones (a guest buffer must lie in one slot, like vm-memory's region access);
  or a write targets a read-only backing.
* Length 0 is allowed: it returns an empty view when the address lies inside a slot or
  exactly at a slot's end (and is below ``2**64``); anywhere else it raises, so even an
  empty access proves its address sane.
* Addresses and lengths may be Python or numpy integers (descriptor fields read from
  guest memory are numpy integers); anything else, including ``bool``, is a
  :class:`~shared.errors.UsageError`.
* Views alias guest memory. The map keeps references to its backings, and every view
  keeps its backing -- and so a region's mapping -- alive.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import mmap
import operator
import os
import secrets
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, SupportsIndex, TypeAlias

import numpy as np
import numpy.typing as npt
import posix_ipc

from shared.errors import MemoryAccessError, UsageError
from shared.fds import OwnedFd, memory_fd_size

U8Array: TypeAlias = npt.NDArray[np.uint8]

ADDRESS_LIMIT: Final = 1 << 64
"""Guest-physical addresses are u64: every range must end at or below ``2**64``."""

MAX_SLOT_ID: Final = (1 << 32) - 1
"""Slot ids are u32, as in ``KVM_SET_USER_MEMORY_REGION``."""

SHM_NAME_PREFIX: Final = "/vbusemu-"
"""Prefix of the (immediately unlinked) POSIX shm names; 128 random bits follow it."""


def _index(value: SupportsIndex, what: str) -> int:
    """``value`` as a Python int; :class:`UsageError` for bools and non-integers."""
    if isinstance(value, (bool, np.bool_)):
        raise UsageError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise UsageError(f"{what} must be an integer, got {value!r}") from None


def _region_size(size: SupportsIndex) -> int:
    n = _index(size, "region size")
    if not 0 < n <= sys.maxsize:
        raise UsageError(f"region size must be in 1..{sys.maxsize}, got {n}")
    return n


SIZE_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""Seals on a ``sealed`` region: its size is fixed for good, and so are its seals."""


def _sealed_memfd(size: int) -> OwnedFd:
    """A memfd of ``size`` zero bytes whose size nobody can change any more."""
    fd = OwnedFd(os.memfd_create("vbusemu-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
    try:
        os.ftruncate(fd.fd, size)
        fcntl.fcntl(fd.fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
    except BaseException:
        fd.close()
        raise
    return fd


def is_shrink_sealed(fd: int) -> bool:
    """Whether the object behind ``fd`` carries ``F_SEAL_SHRINK`` (False if it cannot
    carry seals at all: POSIX shm, pipes, ...)."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:
        return False


def _checked_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    """A plain fixed-size dtype that may be laid over raw memory."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise UsageError(f"invalid dtype {dtype!r}: {e}") from None
    if dt.hasobject or dt.itemsize == 0 or dt.subdtype is not None:
        raise UsageError(f"dtype {dt} cannot be laid over raw memory")
    return dt


class SharedRegion:
    """A shared-memory object mapped read/write; see the module invariants.

    Build one with :meth:`create` or :meth:`from_fd`, not with the constructor.
    """

    __slots__ = ("_array", "_fd", "_mmap", "_size")

    def __init__(self, fd: OwnedFd, mm: mmap.mmap, size: int) -> None:
        self._fd = fd
        self._mmap: mmap.mmap | None = mm
        self._size = size
        self._array: U8Array | None = np.frombuffer(mm, dtype=np.uint8)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, size: int, *, sealed: bool = False) -> SharedRegion:
        """Allocate a new zero-filled region of ``size`` bytes (already unlinked).

        ``sealed=False``: a POSIX shm object (posix_ipc). ``sealed=True``: a memfd whose
        size is sealed (see the module invariants): nobody can truncate it afterwards.
        """
        size = _region_size(size)
        if sealed:
            return cls._map(_sealed_memfd(size), size)
        name = SHM_NAME_PREFIX + secrets.token_hex(16)
        shm = posix_ipc.SharedMemory(name, flags=posix_ipc.O_CREX, mode=0o600, size=0)
        try:
            shm.unlink()  # first: from here on nothing can leave a name in /dev/shm
            fd = OwnedFd(os.dup(shm.fd))  # os.dup makes the copy close-on-exec
        finally:
            shm.close_fd()  # posix_ipc's own fd; we keep only our dup
        try:
            os.ftruncate(fd.fd, size)
        except BaseException:
            fd.close()
            raise
        return cls._map(fd, size)

    @classmethod
    def from_fd(cls, fd: OwnedFd, size: int) -> SharedRegion:
        """Map the first ``size`` bytes of a received shared-memory fd.

        Takes ownership of ``fd`` (it reads ``-1`` afterwards, whatever happens). Raises
        :class:`MemoryAccessError` if the fd is not a POSIX shm object or memfd, is
        smaller than ``size`` or cannot be mapped read/write; :class:`UsageError` if
        ``fd`` is already closed or ``size`` is not a positive integer.
        """
        owned = fd.move()  # UsageError if fd is closed; nothing to close then
        try:
            size = _region_size(size)
            actual = memory_fd_size(owned.fd)
            if actual is None:
                raise MemoryAccessError(
                    f"fd {owned.fd} is not a shared-memory object (POSIX shm or memfd)"
                )
            if actual < size:
                raise MemoryAccessError(
                    f"shared-memory object has {actual} bytes, {size} were announced"
                )
            os.set_inheritable(owned.fd, False)
        except BaseException:
            owned.close()
            raise
        try:
            return cls._map(owned, size)
        except (OSError, ValueError) as e:
            raise MemoryAccessError(f"cannot map {size} bytes read/write: {e}") from e

    @classmethod
    def _map(cls, fd: OwnedFd, size: int) -> SharedRegion:
        """Map ``fd``; closes it if that fails."""
        try:
            mm = mmap.mmap(
                fd.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            fd.close()
            raise
        try:
            return cls(fd, mm, size)
        except BaseException:
            mm.close()
            fd.close()
            raise

    # ------------------------------------------------------------------ access

    @property
    def sealed(self) -> bool:
        """True if nobody can shrink the object behind this region (``F_SEAL_SHRINK``)."""
        return self._fd.fd >= 0 and is_shrink_sealed(self._fd.fd)

    @property
    def size(self) -> int:
        """Mapped size in bytes (still answered after :meth:`close`)."""
        return self._size

    @property
    def fd(self) -> OwnedFd:
        """The region's fd, still owned by the region (``fd.fd == -1`` once closed).

        Send it as is; to hand a copy to someone who will own it, use ``region.fd.dup()``.
        """
        return self._fd

    @property
    def closed(self) -> bool:
        return self._array is None

    @property
    def array(self) -> U8Array:
        """A 1-D ``uint8`` view over the whole mapping."""
        return self._live_array()

    def view(
        self, offset: SupportsIndex, length: SupportsIndex, dtype: npt.DTypeLike = np.uint8
    ) -> npt.NDArray[Any]:
        """A view of ``length`` bytes at ``offset`` as ``dtype`` (``length // itemsize`` items).

        Raises :class:`MemoryAccessError` unless ``0 <= offset``, ``0 <= length``,
        ``offset + length <= size`` and ``length`` is a multiple of the item size. The
        offset need not be aligned.
        """
        arr = self._live_array()
        dt = _checked_dtype(dtype)
        off = _index(offset, "offset")
        n = _index(length, "length")
        if off < 0 or n < 0:
            raise MemoryAccessError(f"negative offset {off} or length {n}")
        if off > self._size or n > self._size - off:
            raise MemoryAccessError(
                f"[{off:#x}, +{n:#x}) lies outside the {self._size:#x}-byte region"
            )
        if n % dt.itemsize:
            raise MemoryAccessError(f"length {n} is not a multiple of {dt}'s {dt.itemsize} bytes")
        return arr[off : off + n].view(dt)

    def _live_array(self) -> U8Array:
        if self._array is None:
            raise UsageError("shared region is closed")
        return self._array

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Unmap (or leave the unmap to GC if views are alive) and close the fd. Idempotent."""
        mm, self._mmap = self._mmap, None
        self._array = None
        try:
            if mm is not None:
                # BufferError: a caller still holds a view; the mapping stays valid and
                # is unmapped when the last view is garbage-collected.
                with contextlib.suppress(BufferError):
                    mm.close()
        finally:
            self._fd.close()

    def __enter__(self) -> SharedRegion:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd.fd}"
        return f"SharedRegion(size={self._size:#x}, {state})"


# ---------------------------------------------------------------------------- GPA map


@dataclass(frozen=True)
class MemorySlot:
    """One guest-physical slot: ``[gpa, gpa + size)``."""

    slot: int
    gpa: int
    size: int

    @property
    def end(self) -> int:
        """First address past the slot (may equal ``2**64``)."""
        return self.gpa + self.size


class GuestMemoryMap:
    """Sorted, non-overlapping guest-physical slots; see the module invariants."""

    __slots__ = ("_backings", "_by_id", "_slots", "_starts", "generation")

    def __init__(self) -> None:
        # Three parallel lists sorted by gpa, plus an index by slot id.
        self._starts: list[int] = []
        self._slots: list[MemorySlot] = []
        self._backings: list[U8Array] = []
        self._by_id: dict[int, MemorySlot] = {}
        self.generation = 0
        """Counts changes to the map (every add and remove): tables built from the map
        compare it to know they are current."""

    # ------------------------------------------------------------------ configuration

    def add(self, slot: SupportsIndex, gpa: SupportsIndex, backing: U8Array) -> MemorySlot:
        """Map ``backing`` (1-D C-contiguous ``uint8``) at ``gpa`` as slot ``slot``.

        The slot's size is ``len(backing)``. A read-only backing makes a ROM slot:
        reads work, writes raise :class:`MemoryAccessError`. Raises :class:`UsageError`
        for a bad or duplicate slot id, a bad backing, size 0, ``gpa`` outside
        ``0..2**64-1``, ``gpa + size > 2**64`` or an overlap with an existing slot.
        """
        sid = _index(slot, "slot id")
        start = _index(gpa, "gpa")
        if not 0 <= sid <= MAX_SLOT_ID:
            raise UsageError(f"slot id must be in 0..{MAX_SLOT_ID}, got {sid}")
        if sid in self._by_id:
            raise UsageError(f"slot {sid} already exists")
        if (
            not isinstance(backing, np.ndarray)
            or backing.dtype != np.uint8
            or backing.ndim != 1
            or not backing.flags.c_contiguous
        ):
            raise UsageError("a slot's backing must be a 1-D C-contiguous uint8 numpy array")
        size = int(backing.shape[0])
        if size == 0:
            raise UsageError(f"slot {sid} has size 0")
        if not 0 <= start < ADDRESS_LIMIT:
            raise UsageError(f"slot {sid}: gpa {start:#x} is not a u64 address")
        if size > ADDRESS_LIMIT - start:
            raise UsageError(f"slot {sid}: [{start:#x}, +{size:#x}) overflows 2**64")
        end = start + size
        # Slots are sorted and disjoint, so only the two neighbours can overlap.
        i = bisect.bisect_left(self._starts, start)
        for j in (i - 1, i):
            if 0 <= j < len(self._slots):
                other = self._slots[j]
                if other.gpa < end and start < other.end:
                    raise UsageError(
                        f"slot {sid} [{start:#x}, {end:#x}) overlaps slot {other.slot} "
                        f"[{other.gpa:#x}, {other.end:#x})"
                    )
        entry = MemorySlot(sid, start, size)
        self._starts.insert(i, start)
        self._slots.insert(i, entry)
        self._backings.insert(i, backing)
        self._by_id[sid] = entry
        self.generation += 1
        return entry

    def remove(self, slot: SupportsIndex) -> MemorySlot:
        """Unmap slot ``slot`` and return it; :class:`UsageError` if there is none."""
        sid = _index(slot, "slot id")
        entry = self._by_id.pop(sid, None)
        if entry is None:
            raise UsageError(f"no slot {sid}")
        i = bisect.bisect_left(self._starts, entry.gpa)
        del self._starts[i], self._slots[i], self._backings[i]
        self.generation += 1
        return entry

    def slots(self) -> list[MemorySlot]:
        """Every slot, sorted by gpa."""
        return list(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.slot}:[{s.gpa:#x},{s.end:#x})" for s in self._slots)
        return f"GuestMemoryMap({inner})"

    # ------------------------------------------------------------------ guest access

    def translate(self, gpa: SupportsIndex, length: SupportsIndex) -> U8Array:
        """A ``uint8`` view of exactly ``length`` bytes at ``gpa``, all in one slot."""
        addr = _index(gpa, "gpa")
        n = _index(length, "length")
        if addr < 0 or n < 0:
            raise MemoryAccessError(f"negative gpa {addr} or length {n}")
        if addr >= ADDRESS_LIMIT or n > ADDRESS_LIMIT - addr:
            raise MemoryAccessError(f"[{addr:#x}, +{n:#x}) overflows the 64-bit address space")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            raise MemoryAccessError(f"[{addr:#x}, +{n:#x}) is not backed by guest memory")
        entry = self._slots[i]
        offset = addr - entry.gpa
        if n > entry.size - offset:
            if offset > entry.size or (offset == entry.size and n > 0):
                raise MemoryAccessError(f"[{addr:#x}, +{n:#x}) is not backed by guest memory")
            raise MemoryAccessError(
                f"[{addr:#x}, +{n:#x}) runs past the end of slot {entry.slot} at "
                f"{entry.end:#x}; an access must lie within one slot"
            )
        return self._backings[i][offset : offset + n]

    def read(self, gpa: SupportsIndex, length: SupportsIndex) -> bytes:
        """A copy of ``length`` bytes at ``gpa``."""
        return self.translate(gpa, length).tobytes()

    def write(
        self, gpa: SupportsIndex, data: bytes | bytearray | memoryview | npt.NDArray[Any]
    ) -> None:
        """Copy ``data`` (its raw bytes; arrays in C order) into guest memory at ``gpa``.

        Nothing is written unless the whole range lies in one writable slot.
        """
        try:
            if isinstance(data, np.ndarray):
                src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            else:
                src = np.frombuffer(data, dtype=np.uint8)
        except (TypeError, ValueError) as e:
            raise UsageError(f"cannot write {type(data).__name__} as raw bytes: {e}") from None
        dst = self.translate(gpa, src.shape[0])
        if not dst.flags.writeable:
            raise MemoryAccessError(f"guest memory at {operator.index(gpa):#x} is read-only")
        dst[...] = src

    def view(
        self, gpa: SupportsIndex, count: SupportsIndex, dtype: npt.DTypeLike = np.uint8
    ) -> npt.NDArray[Any]:
        """``count`` items of ``dtype`` at ``gpa`` (alignment not required), in one slot."""
        dt = _checked_dtype(dtype)
        n = _index(count, "count")
        if n < 0:
            raise MemoryAccessError(f"negative count {n}")
        return self.translate(gpa, n * dt.itemsize).view(dt)


class SlotMapper:
    """Guest memory as one process sees it: the slots the broker announced, mapped.

    The broker sends ``MemslotAttach{slot, gpa, size, offset}`` with the memory fd to a
    VM's guest and device processes; :meth:`attach` maps ``[offset, offset + size)`` of
    that object at ``gpa`` in :attr:`map`. Re-announcing a slot replaces it. Sizes are
    checked again here (the broker is trusted, but a mapping must never exceed the object).
    """

    def __init__(self) -> None:
        self.map = GuestMemoryMap()
        self._regions: dict[int, SharedRegion] = {}

    def attach(self, slot: int, gpa: int, size: int, offset: int, fd: OwnedFd) -> MemorySlot:
        """Map a slot; takes ownership of ``fd`` (closed on failure)."""
        if slot in self._regions:
            self.detach(slot)
        region = SharedRegion.from_fd(fd, offset + size)
        try:
            added = self.map.add(slot, gpa, region.view(offset, size))
        except Exception:
            region.close()
            raise
        self._regions[slot] = region
        return added

    def regions(self) -> dict[int, SharedRegion]:
        """The mapped regions by slot (a copy of the table; the regions stay owned here)."""
        return dict(self._regions)

    def detach(self, slot: int) -> bool:
        region = self._regions.pop(slot, None)
        if region is None:
            return False
        self.map.remove(slot)
        region.close()
        return True

    def close(self) -> None:
        for slot in list(self._regions):
            self.detach(slot)
