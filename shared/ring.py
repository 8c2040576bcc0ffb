"""The virtio 1.x split virtqueue: layout as data, the driver (guest) side and the device
(host) side, as pure code over numpy views of guest memory.

Nothing here opens a socket, starts a process or signals an eventfd. Ring operations take
memory (a numpy view or a :class:`~shared.memory.GuestMemoryMap`) and *return* whether the
other side needs a notification; the caller owns the eventfds (like rust-vmm virtio-queue).

Layout (virtio 1.x §2.7, "split virtqueues")
---------------------------------------------
Three areas, all little-endian, indices are u16 and wrap at ``2**16``::

    descriptor table  align 16  Q x {addr u64, len u32, flags u16, next u16}     16*Q bytes
    available ring    align 2   flags u16, idx u16, ring[Q] u16, used_event u16  6 + 2*Q
    used ring         align 4   flags u16, idx u16, ring[Q] {id u32, len u32},
                                avail_event u16                                  6 + 8*Q

``Q`` (the queue size) is a power of two in ``1..32768``. :class:`RingLayout` places the three
areas contiguously (descriptors at 0, available ring right after, used ring aligned up to 4).
virtio 1.x also lets a driver place each area on its own, in any order: :class:`DriverRing`
takes three offsets into its view (``areas=``) and :class:`DeviceRing` three guest-physical
addresses; both check them with :func:`placement_problem` (each area aligned, none
overlapping another) and view the fields through the same code.
The driver owns (writes) the descriptor table and the available ring; the device owns the used
ring. Each side only *reads* the other's area.

Invariants
----------
* Ownership: only the driver writes the descriptor table and the available ring, only the
  device writes the used ring (the driver initialises the whole area in
  :meth:`DriverRing.reset`, before the device runs). Neither side keeps state *in* the other's
  area: each keeps private shadows of its indices, flags and bookkeeping.
* Driver: every descriptor is either on the free stack or in exactly one chain in flight;
  ``(avail_idx - last_used) mod 2**16 == in_flight <= Q``.
* Device: a head is in flight at most once;
  ``(last_avail - next_used) mod 2**16 == in_flight <= Q``; every segment in a
  :class:`Batch` lies inside one guest memory slot and was validated; the device reads guest
  memory only through :meth:`~shared.memory.GuestMemoryMap.translate`, which checks bounds.
* ``broken`` is sticky until ``reset()``; while set, no operation touches guest memory.

Theory of operation
-------------------
Driver: take free descriptors, fill them, write their heads into ``avail.ring[avail.idx % Q]``,
then publish ``avail.idx += n``; ask :meth:`DriverRing.kick_needed` whether to notify the
device. Device: read ``avail.idx`` once, take the heads between its private ``last_avail`` and
it, read every descriptor once into a private copy and validate it, do the I/O, then write
``{id, len}`` into ``used.ring[used.idx % Q]`` and publish ``used.idx += n``;
:meth:`DeviceRing.push_used` returns whether to interrupt the driver. The driver reads the used
entries between its ``last_used`` and ``used.idx`` and recycles those chains' descriptors.

Notification suppression (both directions, virtio §2.7.7 and §2.7.10):

* without ``VIRTIO_F_EVENT_IDX``: ``avail.flags`` bit ``NO_INTERRUPT`` (driver: "don't
  interrupt me") and ``used.flags`` bit ``NO_NOTIFY`` (device: "don't kick me");
* with ``EVENT_IDX`` both flags stay 0. The driver writes ``used_event`` (interrupt me once
  ``used.idx`` passes it) and the device writes ``avail_event`` (kick me once ``avail.idx``
  passes it); a side notifies iff :func:`need_event` ``(event, new, old)``, i.e. the event index
  lies in ``[old, new)`` modulo ``2**16``. To *disable* notifications with EVENT_IDX a side
  leaves its event index one behind its own position, so the other side's next batch never
  crosses it; it is refreshed on every pass.

The no-lost-wakeup rule: a side may sleep only after it has (1) re-enabled notifications,
(2) issued a full barrier, (3) re-checked the ring and found nothing. The enable methods
(:meth:`DriverRing.enable_interrupts`, :meth:`DeviceRing.enable_notifications`) do all three
and return ``True`` when work is already there -- the caller must then process it instead of
sleeping. Spurious notifications are always allowed and both sides tolerate them.

Memory-ordering model
---------------------
The two sides run in different processes (or threads) on x86-64, which is TSO: stores become
visible in program order and loads are not reordered with other loads. The one reordering x86
does is a *store followed by a load of another location*: the load may be satisfied before the
store leaves the store buffer. Hence three kinds of ordering points:

* **store -> store** (publishing): descriptor and ring-entry writes happen before the index
  write that publishes them. x86 keeps stores in order, and the compiler cannot move them
  either: each numpy assignment is a separate C call behind the interpreter, an opaque
  boundary no compiler reorders memory accesses across. So no fence is needed.
  (Linux uses ``virtio_wmb``, a compiler barrier on x86, at the same points.)
* **load -> load** (consuming): the other side's index is read before the entries it
  publishes. x86 does not reorder loads with loads (Linux: ``virtio_rmb``). No fence.
* **store -> load** (deciding whether to notify / whether to sleep): publish our index or
  re-enable notifications, *then* read the other side's event index, flags or ring index.
  x86 *may* reorder these, and then both sides can read stale values and both decide not to
  notify: a lost wakeup. numpy and CPython offer no fence, so :func:`full_barrier` executes
  a locked instruction (an uncontended :class:`threading.Lock` acquire/release: ``lock
  cmpxchg`` / ``lock xadd`` in glibc's semaphores or CPython's ``PyMutex``), which is a full
  barrier on x86. Every such point calls it with a comment: the driver's publish-then-
  decide-kick (:meth:`DriverRing.kick_needed`), the device's publish-then-decide-interrupt
  (:meth:`DeviceRing.push_used`), both "re-enable, then re-check" paths, and the
  "advance my event index, then re-read the ring" refresh done while notifications are on.

u16 indices and flags live at naturally aligned addresses (the device treats misaligned ring
areas as broken, the driver requires a 16-byte aligned view and aligned areas in it), so numpy
reads and writes them with single aligned moves: no torn index is ever seen. The scalar paths
(small batches, see :data:`SCALAR_MAX`) reach the same u16s through a native ``memoryview``
cast, whose item access is also one fixed-size copy of the aligned u16 (CPython's
``PACK_SINGLE`` / ``UNPACK_SINGLE``); they pack and unpack descriptors and used elements with
``struct``, which may store them byte by byte -- harmless, as those are always published by a
later index store (store->store above) and read only after the index (load->load), and the
ordering comments sit at the same points in both paths. Descriptors may tear (a guest rewriting
one while it is copied); the copy is validated as a whole, so that only hurts the guest. This
model is x86-specific: a weakly ordered CPU would need real acquire/release fences.

Trust (DESIGN §4)
-----------------
The device trusts nothing it reads from guest memory. It reads ``avail.idx`` once per pass
and each descriptor once into a private copy, so rewriting a descriptor after posting it
changes nothing the device acts on. Any violation -- index jump, head or next out of range, a
loop or a chain longer than Q, a bad indirect table, a buffer outside guest memory, crossing a
slot boundary or a gap, overflowing ``2**64``, of length 0 or above ``max_buffer_len``, a
device-writable buffer in read-only memory, a readable descriptor after a writable one, a
head posted again while in flight, or more requests than Q -- marks the ring **broken** with a
reason (virtio's ``NEEDS_RESET``). A broken ring never raises into the caller's loop: every
operation is a no-op returning "nothing" (empty batch, ``False``) until :meth:`reset`; the
caller reports :attr:`DeviceRing.broken` to the VMM. Work per pass is bounded by ``max_n``
chains and about ``max_descriptors`` descriptors, so a kick storm cannot monopolise the device.

Mistakes of *our own* side (completing a buffer that is not in flight, a length beyond what
the chain can hold, posting more buffers than there are free descriptors) are
:class:`~shared.errors.UsageError`. The driver does not trust the device either: a used id
that is out of range or not in flight, a used length beyond the chain's writable capacity, or
a used index that moves past the buffers in flight marks :class:`DriverRing` broken.

Indirect descriptors (``VRING_DESC_F_INDIRECT``) are supported as virtio 1.2, 2.7.5.3.2 asks
("The device MUST handle the case of zero or more normal chained descriptors followed by a
single descriptor with VIRTQ_DESC_F_INDIRECT"): a chain is zero or more normal descriptors,
then optionally one indirect descriptor that ends it. Its table is ``len / 16`` descriptors
(``len`` a non-zero multiple of 16, at most Q entries) in one guest memory slot, copied once,
whose entries may not be indirect themselves. The chain's buffers are the normal descriptors'
followed by the table's, under the same rules as any chain: no device-readable buffer after a
device-writable one across the whole chain, every buffer checked alike, and at most Q
buffers in all. ``INDIRECT`` together with ``NEXT`` (so anything after the indirect
descriptor) or a nested indirect descriptor in a table is broken.

A single buffer may be at most ``max_buffer_len`` bytes (default :data:`MAX_BUFFER_LEN`,
16 MiB; a guest's "4 GiB" buffer breaks the ring). Payload copies
(:meth:`DeviceRing.read_payloads` / :meth:`DeviceRing.write_payloads`) go between guest
buffers and a caller-sized 2-D numpy array: for single-descriptor batches with one gather or
scatter per (memory slot, length) group through a sliding-window view, for chains and small
batches with one slice per segment; never per byte. :meth:`DeviceRing.copy_payloads` copies
one ring's readable buffers straight into another ring's writable ones (one slice copy per
overlapping pair of segments, no staging array).

Fast paths: operations on a few chains (:data:`SCALAR_MAX`, :data:`DRIVER_SCALAR_MAX`) use
plain Python ints instead of numpy calls; they read the same bytes once, make the same
checks in the same order and leave the same state as the vectorized paths, which remain the
reference (a failed scalar check hands the same data to the vectorized check for the exact
reason).
"""

from __future__ import annotations

import bisect
import itertools
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from shared.errors import MemoryAccessError, UsageError
from shared.memory import GuestMemoryMap

U8Array: TypeAlias = npt.NDArray[np.uint8]
U16Array: TypeAlias = npt.NDArray[np.uint16]
U32Array: TypeAlias = npt.NDArray[np.uint32]
U64Array: TypeAlias = npt.NDArray[np.uint64]
I64Array: TypeAlias = npt.NDArray[np.int64]
BoolArray: TypeAlias = npt.NDArray[np.bool_]

# ---------------------------------------------------------------------------- layout as data

VRING_DESC_F_NEXT: Final = 1
"""The descriptor continues via its ``next`` field."""
VRING_DESC_F_WRITE: Final = 2
"""The buffer is device-writable (otherwise device-readable)."""
VRING_DESC_F_INDIRECT: Final = 4
"""The buffer holds a table of descriptors."""
VRING_AVAIL_F_NO_INTERRUPT: Final = 1
"""Driver to device: do not interrupt me (without EVENT_IDX)."""
VRING_USED_F_NO_NOTIFY: Final = 1
"""Device to driver: do not kick me (without EVENT_IDX)."""

MAX_QUEUE_SIZE: Final = 32768
DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4
MAX_BUFFER_LEN: Final = 16 << 20
"""Default largest single buffer the device accepts (16 MiB); a guest's 4 GiB buffer is broken."""

INDEX_MASK: Final = 0xFFFF
"""Ring indices are u16 and wrap at ``2**16``."""

DESC_DTYPE: Final = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
"""One descriptor (16 bytes)."""
USED_ELEM_DTYPE: Final = np.dtype([("id", "<u4"), ("len", "<u4")])
"""One used-ring element (8 bytes)."""
_LE16: Final = np.dtype("<u2")
_WRITE_OR_CONTINUE: Final = VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT
_I64_MAX: Final = (1 << 63) - 1

SCALAR_MAX: Final = 32
"""Device-side operations on at most this many chains take the *scalar* paths: plain Python
ints read and written through ``memoryview``/``struct`` instead of numpy calls. A numpy call
costs about a microsecond whatever its size, and the vectorized paths make a dozen or more
per operation, which dominates small batches (round trips, batch-1 traffic); past a few
dozen chains the vectorized paths win. (Per operation in isolation the crossovers are
~12-16 chains, but end to end -- the echo device at 64 B batch 16 -- 32 measured best: the
scalar path's lazily-built :class:`Batch` saves its consumers conversions.) Both paths read
the same bytes once, make the same
checks in the same order, raise or break with the same messages and leave the same state
(tests/unit/test_ring_scalar.py runs random programs, hostile ones included, through both
and compares)."""
DRIVER_SCALAR_MAX: Final = 24
"""The same for the driver side (``add_batch``, ``get_used``: crossovers ~32)."""
_NATIVE_LE: Final = sys.byteorder == "little"
"""The scalar paths read and write u16 indices through native ``memoryview`` casts, which
are the ring's little-endian layout only on a little-endian host (x86-64, which the
memory-ordering model below already assumes); elsewhere only the numpy paths run."""
_DESC_STRUCT: Final = struct.Struct("<QIHH")
_USED_STRUCT: Final = struct.Struct("<II")


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def valid_queue_size(qsize: object) -> bool:
    """Whether ``qsize`` is a legal split-ring size: a power of two in ``1..32768``."""
    return (
        isinstance(qsize, int)
        and not isinstance(qsize, bool)
        and 1 <= qsize <= MAX_QUEUE_SIZE
        and qsize & (qsize - 1) == 0
    )


@dataclass(frozen=True)
class RingLayout:
    """Offsets of one contiguous split ring of ``qsize`` entries (all in bytes from its start).

    Descriptors at 0 (16-aligned as long as the ring is), the available ring right after
    (``16*Q`` is even), the used ring aligned up to 4.
    """

    qsize: int

    def __post_init__(self) -> None:
        if not valid_queue_size(self.qsize):
            raise UsageError(
                f"queue size must be a power of two in 1..{MAX_QUEUE_SIZE}, got {self.qsize!r}"
            )

    # -- descriptor table
    @property
    def desc_offset(self) -> int:
        return 0

    @property
    def desc_size(self) -> int:
        return DESC_DTYPE.itemsize * self.qsize

    # -- available ring: flags, idx, ring[Q], used_event
    @property
    def avail_offset(self) -> int:
        return self.desc_offset + self.desc_size

    @property
    def avail_size(self) -> int:
        return 6 + 2 * self.qsize

    @property
    def avail_flags_offset(self) -> int:
        return self.avail_offset

    @property
    def avail_idx_offset(self) -> int:
        return self.avail_offset + 2

    @property
    def avail_ring_offset(self) -> int:
        return self.avail_offset + 4

    @property
    def used_event_offset(self) -> int:
        return self.avail_offset + 4 + 2 * self.qsize

    # -- used ring: flags, idx, ring[Q], avail_event
    @property
    def used_offset(self) -> int:
        return _align_up(self.avail_offset + self.avail_size, USED_ALIGN)

    @property
    def used_size(self) -> int:
        return 6 + USED_ELEM_DTYPE.itemsize * self.qsize

    @property
    def used_flags_offset(self) -> int:
        return self.used_offset

    @property
    def used_idx_offset(self) -> int:
        return self.used_offset + 2

    @property
    def used_ring_offset(self) -> int:
        return self.used_offset + 4

    @property
    def avail_event_offset(self) -> int:
        return self.used_offset + 4 + USED_ELEM_DTYPE.itemsize * self.qsize

    @property
    def size(self) -> int:
        """Total bytes of the contiguous ring."""
        return self.used_offset + self.used_size

    def addresses(self, ring_gpa: int) -> tuple[int, int, int]:
        """``(desc_gpa, avail_gpa, used_gpa)`` of this ring placed at ``ring_gpa``."""
        return (
            ring_gpa + self.desc_offset,
            ring_gpa + self.avail_offset,
            ring_gpa + self.used_offset,
        )


def ring_area_sizes(qsize: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, the available ring and the used ring of a split ring of
    ``qsize`` entries (virtio 1.x 2.7: ``16*Q``, ``6 + 2*Q``, ``6 + 8*Q``)."""
    return (
        DESC_DTYPE.itemsize * qsize,
        6 + 2 * qsize,
        6 + USED_ELEM_DTYPE.itemsize * qsize,
    )


def placement_problem(
    qsize: int, desc: int, avail: int, used: int, limit: int | None = None
) -> str | None:
    """Why a split ring of ``qsize`` entries cannot have its descriptor table, available ring
    and used ring at ``desc``, ``avail`` and ``used``, or ``None`` if it can.

    virtio 1.x places the three areas independently, in any order, each aligned on its own
    (16, 2 and 4 bytes); they must not overlap, and with ``limit`` each must end at or before
    it. The one place this is worked out: the driver's separately placed areas (byte offsets
    in its view) and the device's attach (guest-physical addresses) both ask here.
    """
    if desc % DESC_ALIGN or avail % AVAIL_ALIGN or used % USED_ALIGN:
        return (
            f"ring areas misaligned (desc {desc:#x} needs {DESC_ALIGN}, avail {avail:#x} needs "
            f"{AVAIL_ALIGN}, used {used:#x} needs {USED_ALIGN})"
        )
    spans = sorted(zip((desc, avail, used), ring_area_sizes(qsize), ("desc", "avail", "used"),
                       strict=True))
    for (a, a_size, a_name), (b, _, b_name) in itertools.pairwise(spans):
        if a + a_size > b:
            return (
                f"ring areas overlap ({a_name} [{a:#x}, {a + a_size:#x}) and {b_name} at {b:#x})"
            )
    if limit is not None:
        for start, size, name in spans:
            if start + size > limit:
                return f"{name} ring area [{start:#x}, {start + size:#x}) runs past {limit:#x}"
    return None


class _RingViews(NamedTuple):
    """Every field of one split ring as views of its three areas (numpy for the vectorized
    paths; bytes and native u16 ``memoryview`` casts for the scalar ones)."""

    desc: npt.NDArray[Any]
    avail_flags: U16Array
    avail_idx: U16Array
    avail_ring: U16Array
    used_event: U16Array
    used_flags: U16Array
    used_idx: U16Array
    used_ring: npt.NDArray[Any]
    avail_event: U16Array
    desc_mv: memoryview  # bytes: descriptors through struct
    avail16: memoryview  # u16: flags 0, idx 1, ring 2.., used_event 2+Q
    used_mv: memoryview  # bytes: used elements at 4 + 8*i
    used16: memoryview  # u16: flags 0, idx 1, avail_event 2+4Q


def _ring_views(desc: U8Array, avail: U8Array, used: U8Array, qsize: int) -> _RingViews:
    """The fields of a split ring of ``qsize`` entries over its three areas (each exactly
    :func:`ring_area_sizes` bytes, wherever it lies). Each area starts aligned, so every u16
    is 2-aligned and every index access one untorn move."""
    q = qsize
    return _RingViews(
        desc=desc.view(DESC_DTYPE),
        avail_flags=_field(avail, 0, 1, _LE16),
        avail_idx=_field(avail, 2, 1, _LE16),
        avail_ring=_field(avail, 4, q, _LE16),
        used_event=_field(avail, 4 + 2 * q, 1, _LE16),
        used_flags=_field(used, 0, 1, _LE16),
        used_idx=_field(used, 2, 1, _LE16),
        used_ring=_field(used, 4, q, USED_ELEM_DTYPE),
        avail_event=_field(used, 4 + USED_ELEM_DTYPE.itemsize * q, 1, _LE16),
        desc_mv=desc.data,
        avail16=avail.data.cast("H"),
        used_mv=used.data,
        used16=used.data.cast("H"),
    )


def need_event(event: int, new: int, old: int) -> bool:
    """Virtio's ``vring_need_event``: did moving an index from ``old`` to ``new`` pass ``event``?

    ``(u16)(new - event - 1) < (u16)(new - old)``: true iff ``event`` lies in ``[old, new)``
    modulo ``2**16``. ``new == old`` never notifies.
    """
    return ((new - event - 1) & INDEX_MASK) < ((new - old) & INDEX_MASK)


_FENCE_LOCK: Final = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (store->load ordering), which numpy and CPython do not offer.

    An uncontended lock acquire/release executes locked read-modify-write instructions
    (glibc semaphores under CPython <= 3.12's ``Lock``, atomics in 3.13's ``PyMutex``); on x86
    a locked instruction drains the store buffer before any later load. Contention on the lock
    only makes it slower, never weaker.
    """
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def _field(area: U8Array, offset: int, count: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """``count`` items of ``dtype`` at byte ``offset`` of ``area`` (a view, never a copy)."""
    return area[offset : offset + count * dtype.itemsize].view(dtype)


def _index_array(values: npt.ArrayLike, what: str) -> I64Array:
    """A 1-D int64 copy of ``values``; :class:`UsageError` for non-integers or negatives."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UsageError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise UsageError(f"{what} must hold integers, got {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise UsageError(f"{what} must not be negative")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise UsageError(f"{what} out of range")
    return arr.astype(np.int64)


def _u64_array(values: npt.ArrayLike, what: str) -> U64Array:
    """A 1-D uint64 copy of ``values`` (guest addresses); :class:`UsageError` if impossible."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UsageError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise UsageError(f"{what} must hold integers, got {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise UsageError(f"{what} must not be negative")
    return arr.astype(np.uint64)


def _check_int(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{what} must be an integer, got {value!r}")
    n = int(value)
    if not lo <= n <= hi:
        raise UsageError(f"{what} must be in {lo}..{hi}, got {n}")
    return n


def _small_ints(values: object, what: str, limit: int, top: int) -> list[int] | None:
    """``values`` as a list of Python ints for the scalar paths, or ``None`` (take the
    vectorized path, which validates everything itself).

    Only a 1-D integer ndarray or a list of plain ints (bools excluded) of at most ``limit``
    items qualifies; anything else -- other types, empty float arrays, huge ints -- is left to
    the vectorized path so the error it raises stays the reference. Raises the same
    :class:`UsageError` as :func:`_index_array` (``top`` = 2**63-1) or :func:`_u64_array`
    (``top`` = 2**64-1) for negative or too large values.
    """
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.shape[0] > limit or values.dtype.kind not in "iu":
            return None
        out: list[int] = values.tolist()
    elif isinstance(values, list) and len(values) <= limit:
        for v in values:
            # Past 2**63-1 numpy would not make an int64 array of the list (it picks another
            # dtype, or fails): leave such lists to the vectorized path too.
            if type(v) is not int or not 0 <= v <= _I64_MAX:
                return None  # the vectorized path says what is wrong
        return values
    else:
        return None
    for v in out:
        if v < 0:
            raise UsageError(f"{what} must not be negative")
        if v > top:
            raise UsageError(f"{what} out of range")
    return out


def _small_bools(values: object, n: int) -> list[bool] | None:
    """``device_writable`` as ``n`` Python bools (one bool for all, or one per buffer), or
    ``None`` for anything else (the vectorized path broadcasts and validates it)."""
    if isinstance(values, (bool, np.bool_)):
        return [bool(values)] * n
    if isinstance(values, np.ndarray):
        if values.dtype == np.bool_ and values.shape == (n,):
            out: list[bool] = values.tolist()
            return out
        return None
    if isinstance(values, list) and len(values) == n and all(type(v) is bool for v in values):
        return values
    return None


def _read_only(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    arr.flags.writeable = False
    return arr


_NO_IDS: Final = _read_only(np.zeros(0, dtype=np.uint16))
_NO_LENS: Final = _read_only(np.zeros(0, dtype=np.uint32))
"""What :meth:`DriverRing.get_used` returns when there is nothing (shared, read-only: an
empty poll is the common case and should not cost two allocations)."""


def _private_array(
    count: int, dtype: npt.DTypeLike, fmt: Literal["B", "H", "q"]
) -> tuple[npt.NDArray[Any], memoryview]:
    """Private (never shared) bookkeeping as two views of one buffer: a numpy array for the
    vectorized paths and a ``memoryview`` of format ``fmt`` for the scalar ones."""
    dt = np.dtype(dtype)
    buf = bytearray(count * dt.itemsize)
    return np.frombuffer(buf, dtype=dt), memoryview(buf).cast(fmt)


class Segment(NamedTuple):
    """One buffer of a chain as the device saw it (from its private copy)."""

    gpa: int
    len: int
    writable: bool


# ============================================================================ driver side


class DriverRing:
    """The guest's side of one split ring, over a ``uint8`` view of the contiguous ring area
    -- or, with ``areas=(desc, avail, used)``, of memory holding the three areas at those byte
    offsets, each placed on its own (aligned 16, 2 and 4, not overlapping, inside the view;
    :class:`UsageError` otherwise). Only the three areas are ever written.

    Keeps a stack of free descriptors, the shadow ``avail.idx`` and ``last_used``, and its own
    record of every chain in flight (it never trusts the descriptor table or the used ring for
    that). :meth:`reset` (also run by the constructor) zero-fills the area and sets every index
    to ``start_index``; the device must not be running then.

    Interrupts start enabled. Typical loop::

        heads = ring.add_batch(addrs, lens, device_writable=True)
        if ring.kick_needed():
            kick()                                  # the caller's eventfd write
        ...
        while True:
            ring.disable_interrupts()
            ids, lens = ring.get_used()             # process them
            if not ring.enable_interrupts():        # barrier + re-check inside
                wait_for_interrupt()
    """

    def __init__(
        self,
        area: U8Array,
        layout: RingLayout,
        *,
        event_idx: bool,
        start_index: int = 0,
        areas: tuple[int, int, int] | None = None,
    ) -> None:
        if not isinstance(layout, RingLayout):
            raise UsageError(f"layout must be a RingLayout, got {layout!r}")
        if (
            not isinstance(area, np.ndarray)
            or area.dtype != np.uint8
            or area.ndim != 1
            or not area.flags.c_contiguous
        ):
            raise UsageError("the ring area must be a 1-D C-contiguous uint8 numpy array")
        q = layout.qsize
        if areas is None:
            if area.shape[0] < layout.size:
                raise UsageError(
                    f"ring area has {area.shape[0]} bytes, the layout needs {layout.size}"
                )
            offsets = (layout.desc_offset, layout.avail_offset, layout.used_offset)
        else:
            if not isinstance(areas, tuple) or len(areas) != 3:
                raise UsageError(f"areas must be (desc, avail, used) offsets, got {areas!r}")
            offsets = (
                _check_int(areas[0], "desc offset", 0, 1 << 62),
                _check_int(areas[1], "avail offset", 0, 1 << 62),
                _check_int(areas[2], "used offset", 0, 1 << 62),
            )
            problem = placement_problem(q, *offsets, limit=area.shape[0])
            if problem is not None:
                raise UsageError(problem)
        if not area.flags.writeable:
            raise UsageError("the ring area must be writable")
        if area.ctypes.data % DESC_ALIGN:
            # virtio requires it, and aligned u16/u32 fields are what makes every index
            # store and load a single untorn access (the module docstring's ordering model).
            raise UsageError("the ring area must be 16-byte aligned")
        self._layout = layout
        self._offsets = offsets
        self._event_idx = bool(event_idx)
        self._q = q
        self._mask = q - 1
        d_size, a_size, u_size = ring_area_sizes(q)
        d_off, a_off, u_off = offsets
        self._parts = (
            area[d_off : d_off + d_size],
            area[a_off : a_off + a_size],
            area[u_off : u_off + u_size],
        )
        v = _ring_views(*self._parts, q)
        self._desc = v.desc
        self._d_addr = self._desc["addr"]
        self._d_len = self._desc["len"]
        self._d_flags = self._desc["flags"]
        self._d_next = self._desc["next"]
        self._avail_flags = v.avail_flags
        self._avail_idx = v.avail_idx
        self._avail_ring = v.avail_ring
        self._used_event = v.used_event
        self._used_flags = v.used_flags
        self._used_idx = v.used_idx
        self._used_ring = v.used_ring
        self._avail_event = v.avail_event
        # The same areas for the scalar paths: bytes (descriptors and used elements through
        # struct) and native u16 (avail.ring entries). Every u16 is 2-aligned (each area is
        # aligned), so each is one untorn access.
        self._desc_mv = v.desc_mv
        self._avail16 = v.avail16
        self._used_mv = v.used_mv
        self._scalar_max = DRIVER_SCALAR_MAX if _NATIVE_LE else 0
        # Private bookkeeping (never read back from shared memory), each as a numpy array
        # and a memoryview over the same bytes.
        self._free, self._free_mv = _private_array(q, np.uint16, "H")
        self._nfree = 0
        self._in_flight, self._in_flight_mv = _private_array(q, np.bool_, "B")
        self._num_in_flight = 0
        self._multi, self._multi_mv = _private_array(q, np.bool_, "B")
        self._chains: dict[int, list[int]] = {}
        self._wcap, self._wcap_mv = _private_array(q, np.int64, "q")
        self._avail_shadow = 0
        self._last_used = 0
        self._kick_old = 0
        self._unkicked = 0
        self._avail_flags_shadow = 0
        self._irq_enabled = True
        self._broken: str | None = None
        self.reset(start_index)

    # ------------------------------------------------------------------ state

    def reset(self, start_index: int = 0) -> None:
        """Zero the ring area, free every descriptor, set all indices to ``start_index``.

        A non-zero ``start_index`` restores a ring mid-stream (like a migrated queue) and lets
        tests exercise the ``2**16`` wrap quickly; the device must be given the same value.
        """
        start = _check_int(start_index, "start_index", 0, INDEX_MASK)
        q = self._q
        for part in self._parts:
            part[...] = 0
        self._avail_idx[0] = start
        self._used_event[0] = start
        # The used-ring header belongs to the device, but the driver initialises the whole
        # area before the device is started, as a real driver allocates it zeroed.
        self._used_idx[0] = start
        self._avail_event[0] = start
        self._free[...] = np.arange(q - 1, -1, -1, dtype=np.uint16)  # top of stack = 0
        self._nfree = q
        self._in_flight[...] = False
        self._num_in_flight = 0
        self._multi[...] = False
        self._chains.clear()
        self._wcap[...] = 0
        self._avail_shadow = start
        self._last_used = start
        self._kick_old = start
        self._unkicked = 0
        self._avail_flags_shadow = 0
        self._irq_enabled = True
        self._broken = None

    @property
    def layout(self) -> RingLayout:
        return self._layout

    @property
    def areas(self) -> tuple[int, int, int]:
        """Byte offsets of the descriptor table, available ring and used ring in the area
        given to the constructor (the layout's own for a contiguous ring)."""
        return self._offsets

    @property
    def qsize(self) -> int:
        return self._q

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @property
    def broken(self) -> str | None:
        """Why the device was found misbehaving, or ``None``. Sticky until :meth:`reset`."""
        return self._broken

    @property
    def in_flight(self) -> int:
        """Chains posted and not yet returned by :meth:`get_used`."""
        return self._num_in_flight

    @property
    def free_descriptors(self) -> int:
        return self._nfree

    @property
    def avail_idx(self) -> int:
        """The driver's published ``avail.idx``."""
        return self._avail_shadow

    @property
    def last_used(self) -> int:
        return self._last_used

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise UsageError(f"the ring is broken ({self._broken}): reset the device first")

    # ------------------------------------------------------------------ posting buffers

    def add_batch(
        self,
        addrs: npt.ArrayLike,
        lens: npt.ArrayLike,
        device_writable: bool | npt.ArrayLike = False,
    ) -> U16Array:
        """Post ``len(addrs)`` single-descriptor buffers at once; return their heads.

        Vectorized: the descriptor and available-ring writes are array assignments, and
        ``avail.idx`` is published once, after them. ``device_writable`` is one bool for all
        buffers or one per buffer. Raises :class:`UsageError` (nothing posted) for fewer free
        descriptors than buffers, a length outside ``1..2**32-1`` or ``addr + len > 2**64``.
        Call :meth:`kick_needed` afterwards.
        """
        self._check_usable()
        if self._scalar_max:
            a_l = _small_ints(addrs, "addrs", self._scalar_max, (1 << 64) - 1)
            n_l = _small_ints(lens, "lens", self._scalar_max, (1 << 64) - 1)
            if a_l is not None and n_l is not None and len(a_l) == len(n_l) and a_l:
                w_l = _small_bools(device_writable, len(a_l))
                if w_l is not None:
                    return np.array(self._add_scalar(a_l, n_l, w_l), dtype=np.uint16)
        a = _u64_array(addrs, "addrs")
        n_arr = _u64_array(lens, "lens")
        n = int(a.shape[0])
        if n_arr.shape[0] != n:
            raise UsageError(f"{n} addresses but {n_arr.shape[0]} lengths")
        same: bool | None = None  # one flag for every buffer (the common case), else None
        if isinstance(device_writable, (bool, np.bool_)):
            same = bool(device_writable)
        else:
            try:
                wr = np.broadcast_to(np.asarray(device_writable, dtype=np.bool_), (n,))
            except ValueError as e:
                raise UsageError(f"device_writable does not match {n} buffers: {e}") from None
        if n == 0:
            return np.zeros(0, dtype=np.uint16)
        if n > self._nfree:
            raise UsageError(f"{n} buffers but only {self._nfree} free descriptors")
        if int(n_arr.min()) == 0 or int(n_arr.max()) > 0xFFFFFFFF:
            raise UsageError("buffer lengths must be in 1..2**32-1")
        # addr + len > 2**64? Python ints on the extremes first; the exact test only if needed.
        if int(a.max()) + int(n_arr.max()) > 1 << 64 and bool((a > (~n_arr + np.uint64(1))).any()):
            raise UsageError("a buffer runs past the end of the 64-bit address space")
        # Same order as n single add_chain calls: pop from the top of the free stack.
        heads: U16Array = self._free[self._nfree - n : self._nfree][::-1].astype(np.uint16)
        self._nfree -= n
        self._d_addr[heads] = a
        self._d_len[heads] = n_arr
        if same is None:
            self._d_flags[heads] = np.where(wr, VRING_DESC_F_WRITE, 0)
            self._wcap[heads] = np.where(wr, n_arr, 0).astype(np.int64)
        else:
            self._d_flags[heads] = VRING_DESC_F_WRITE if same else 0
            self._wcap[heads] = n_arr if same else 0
        self._d_next[heads] = 0
        first = self._avail_shadow & self._mask
        if first + n <= self._q:  # no wrap: a slice instead of an index array
            self._avail_ring[first : first + n] = heads
        else:
            self._avail_ring[(first + np.arange(n)) & self._mask] = heads
        self._in_flight[heads] = True
        self._multi[heads] = False
        self._num_in_flight += n
        self._publish(n)
        return heads

    def add_one(self, addr: int, length: int, device_writable: bool = False) -> int:
        """:meth:`add_batch` of a single buffer -- the hot path of one frame per kick --
        with the same checks, head, bytes and order; returns the head as an int."""
        self._check_usable()
        if (isinstance(addr, bool) or not isinstance(addr, int) or isinstance(length, bool)
                or not isinstance(length, int) or not 0 <= addr < 1 << 64 or length < 0):
            raise UsageError(f"addr and length must be non-negative ints below 2**64, got "
                             f"{addr!r}, {length!r}")
        # _add_scalar for n == 1, unrolled (its loops and lists cost as much as the work);
        # tests/unit/test_ring.py checks both post the same bytes, heads and state.
        if self._nfree < 1:
            raise UsageError("1 buffers but only 0 free descriptors")
        if length == 0 or length > 0xFFFFFFFF:
            raise UsageError("buffer lengths must be in 1..2**32-1")
        if addr + length > 1 << 64:
            raise UsageError("a buffer runs past the end of the 64-bit address space")
        top = self._nfree - 1
        head: int = self._free_mv[top]  # the top of the free stack, as add_batch pops it
        self._nfree = top
        wcap = length if device_writable else 0
        _DESC_STRUCT.pack_into(self._desc_mv, head << 4, addr, length,
                               VRING_DESC_F_WRITE if device_writable else 0, 0)
        self._avail16[2 + (self._avail_shadow & self._mask)] = head
        self._in_flight_mv[head] = 1
        self._multi_mv[head] = 0
        self._wcap_mv[head] = wcap
        self._num_in_flight += 1
        self._publish(1)  # store->store: the entry above, then avail.idx (see _publish)
        return head

    def _add_scalar(self, a: list[int], lens: list[int], wr: list[bool]) -> list[int]:
        """:meth:`add_batch` for a few buffers with plain ints: the same checks, heads,
        bytes and order as the vectorized path."""
        n = len(a)
        if n > self._nfree:
            raise UsageError(f"{n} buffers but only {self._nfree} free descriptors")
        for length in lens:
            if length == 0 or length > 0xFFFFFFFF:
                raise UsageError("buffer lengths must be in 1..2**32-1")
        for addr, length in zip(a, lens, strict=True):
            if addr + length > 1 << 64:
                raise UsageError("a buffer runs past the end of the 64-bit address space")
        # Same order as n single add_chain calls: pop from the top of the free stack.
        free = self._free_mv
        top = self._nfree - 1
        heads = [free[top - j] for j in range(n)]
        self._nfree -= n
        pack = _DESC_STRUCT.pack_into
        mv, mv16, mask = self._desc_mv, self._avail16, self._mask
        ring, shadow = 2, self._avail_shadow  # avail.ring[0] is u16 number 2 of the area
        in_flight, multi, wcap = self._in_flight_mv, self._multi_mv, self._wcap_mv
        for j in range(n):
            h, length, w = heads[j], lens[j], wr[j]
            pack(mv, h << 4, a[j], length, VRING_DESC_F_WRITE if w else 0, 0)
            mv16[ring + ((shadow + j) & mask)] = h
            in_flight[h] = 1
            multi[h] = 0
            wcap[h] = length if w else 0
        self._num_in_flight += n
        self._publish(n)  # store->store: entries above, then avail.idx (see _publish)
        return heads

    def add_chain(self, segments: Sequence[tuple[int, int, bool]]) -> int:
        """Post one chain of ``(addr, len, device_writable)`` buffers; return its head.

        Device-readable buffers must come before device-writable ones (virtio's rule).
        """
        self._check_usable()
        segs = self._check_segments(segments)
        n = len(segs)
        if n > self._q:
            raise UsageError(f"a chain of {n} descriptors is longer than the queue ({self._q})")
        if n > self._nfree:
            raise UsageError(f"{n} descriptors needed but only {self._nfree} free")
        idx = [int(self._free[self._nfree - 1 - i]) for i in range(n)]
        self._nfree -= n
        for i, (addr, length, writable) in enumerate(segs):
            last = i == n - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self._desc[idx[i]] = (addr, length, flags, 0 if last else idx[i + 1])
        head = idx[0]
        self._avail_ring[self._avail_shadow & self._mask] = head
        self._in_flight[head] = True
        self._multi[head] = n > 1
        if n > 1:
            self._chains[head] = idx
        self._wcap[head] = sum(length for _, length, w in segs if w)
        self._num_in_flight += 1
        self._publish(1)
        return head

    def add_indirect(
        self,
        table: U8Array,
        table_gpa: int,
        segments: Sequence[tuple[int, int, bool]],
        *,
        leading: Sequence[tuple[int, int, bool]] = (),
    ) -> int:
        """Post one chain through an indirect table; return its head.

        ``table`` is the guest's own ``uint8`` view of at least ``16 * len(segments)`` bytes at
        guest-physical ``table_gpa``; it must stay untouched until the chain comes back.
        ``leading`` buffers, if any, go in normal chained descriptors *before* the indirect
        one (virtio 1.2, 2.7.5.3.2: "zero or more normal chained descriptors followed by a
        single descriptor with VIRTQ_DESC_F_INDIRECT"); the chain's buffers are ``leading``
        then ``segments``, device-readable ones first across both.
        """
        self._check_usable()
        lead = self._check_segments(leading, allow_empty=True)
        segs = self._check_segments([*lead, *segments])[len(lead) :]
        n = len(segs)
        if n == 0:
            raise UsageError("an indirect table needs at least one buffer")
        if n > self._q:
            raise UsageError(f"an indirect table of {n} entries is longer than the queue")
        if len(lead) + n > self._q:
            raise UsageError(
                f"a chain of {len(lead) + n} buffers is longer than the queue ({self._q})"
            )
        if self._nfree < len(lead) + 1:
            raise UsageError(f"{len(lead) + 1} descriptors needed but only {self._nfree} free")
        if (
            not isinstance(table, np.ndarray)
            or table.dtype != np.uint8
            or table.ndim != 1
            or table.shape[0] < DESC_DTYPE.itemsize * n
        ):
            raise UsageError(f"the indirect table must be a uint8 array of >= {16 * n} bytes")
        tgpa = _check_int(table_gpa, "table_gpa", 0, (1 << 64) - 16 * n)
        entries = np.zeros(n, dtype=DESC_DTYPE)
        for i, (addr, length, writable) in enumerate(segs):
            last = i == n - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            entries[i] = (addr, length, flags, 0 if last else i + 1)
        # The table is written before the descriptors pointing at it, and those before
        # avail.idx (store->store: in order on x86, see the module docstring).
        table[: 16 * n] = entries.view(np.uint8)
        idx = [int(self._free[self._nfree - 1 - i]) for i in range(len(lead) + 1)]
        self._nfree -= len(idx)
        for i, (addr, length, writable) in enumerate(lead):
            flags = (VRING_DESC_F_WRITE if writable else 0) | VRING_DESC_F_NEXT
            self._desc[idx[i]] = (addr, length, flags, idx[i + 1])
        self._desc[idx[-1]] = (tgpa, 16 * n, VRING_DESC_F_INDIRECT, 0)
        head = idx[0]
        self._avail_ring[self._avail_shadow & self._mask] = head
        self._in_flight[head] = True
        self._multi[head] = len(idx) > 1
        if len(idx) > 1:
            self._chains[head] = idx
        self._wcap[head] = sum(length for _, length, w in (*lead, *segs) if w)
        self._num_in_flight += 1
        self._publish(1)
        return head

    @staticmethod
    def _check_segments(
        segments: Sequence[tuple[int, int, bool]], *, allow_empty: bool = False
    ) -> list[tuple[int, int, bool]]:
        segs: list[tuple[int, int, bool]] = []
        seen_writable = False
        for seg in segments:
            try:
                addr, length, writable = seg
            except (TypeError, ValueError):
                raise UsageError(f"a segment is (addr, len, writable), got {seg!r}") from None
            a = _check_int(addr, "buffer address", 0, (1 << 64) - 1)
            n = _check_int(length, "buffer length", 1, 0xFFFFFFFF)
            if a + n > 1 << 64:
                raise UsageError(f"buffer [{a:#x}, +{n:#x}) runs past 2**64")
            w = bool(writable)
            if seen_writable and not w:
                raise UsageError("device-readable buffers must come before device-writable ones")
            seen_writable |= w
            segs.append((a, n, w))
        if not segs and not allow_empty:
            raise UsageError("a chain needs at least one buffer")
        return segs

    def _publish(self, n: int) -> None:
        # store->store: every descriptor and avail.ring write above is issued before this
        # avail.idx store, and x86 makes stores visible in program order, so a device that
        # sees the new index also sees the entries (virtio_wmb is a compiler barrier on x86).
        self._avail_shadow = (self._avail_shadow + n) & INDEX_MASK
        self._avail_idx[0] = self._avail_shadow
        self._unkicked += n

    # ------------------------------------------------------------------ notifications

    def kick_needed(self) -> bool:
        """After publishing: must the caller notify (kick) the device?

        Covers everything published since the previous call. With EVENT_IDX:
        ``need_event(avail_event, new, old)``; otherwise ``not (used.flags & NO_NOTIFY)``.
        ``False`` when nothing was published since the last call or the ring is broken.
        """
        if self._broken is not None or self._unkicked == 0:
            return False
        # store->load: our avail.idx store must be globally visible before we read the
        # device's avail_event / used.flags. Otherwise the device may read the old index,
        # find nothing, re-enable notifications and sleep while we read its stale "don't
        # kick me" and skip the kick: a lost wakeup.
        full_barrier()
        old, new = self._kick_old, self._avail_shadow
        unkicked = self._unkicked
        self._kick_old = new
        self._unkicked = 0
        if unkicked >= INDEX_MASK:
            return True  # old..new is ambiguous modulo 2**16: a spurious kick is harmless
        if self._event_idx:
            return need_event(int(self._avail_event[0]), new, old)
        return not int(self._used_flags[0]) & VRING_USED_F_NO_NOTIFY

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (advisory: spurious interrupts stay possible).

        Without EVENT_IDX sets ``NO_INTERRUPT``; with it leaves ``used_event`` one behind
        ``last_used`` (refreshed by :meth:`get_used`), which the device cannot cross again.
        No barrier: a late-visible disable only lets a spurious interrupt through.
        """
        if self._broken is not None:
            return
        self._irq_enabled = False
        if self._event_idx:
            self._used_event[0] = (self._last_used - 1) & INDEX_MASK
        else:
            self._avail_flags_shadow |= VRING_AVAIL_F_NO_INTERRUPT
            self._avail_flags[0] = self._avail_flags_shadow

    def enable_interrupts(self) -> bool:
        """Re-enable interrupts; return ``True`` if used entries are already pending.

        If it returns ``True`` the caller must call :meth:`get_used` now instead of sleeping:
        the device may have published them before it could see the enable.
        """
        if self._broken is not None:
            return False
        self._irq_enabled = True
        if self._event_idx:
            self._used_event[0] = self._last_used
        else:
            self._avail_flags_shadow &= ~VRING_AVAIL_F_NO_INTERRUPT
            self._avail_flags[0] = self._avail_flags_shadow
        # store->load: the enable must be visible before we re-read used.idx. Otherwise the
        # device may publish, read our stale "no interrupt", skip it, while we read its stale
        # used.idx and go to sleep: a lost wakeup.
        full_barrier()
        return int(self._used_idx[0]) != self._last_used

    @property
    def interrupts_enabled(self) -> bool:
        return self._irq_enabled

    def has_used(self) -> bool:
        """Whether the device published used entries not yet taken (a cheap poll)."""
        return self._broken is None and int(self._used_idx[0]) != self._last_used

    # ------------------------------------------------------------------ completions

    def get_used(self, max_n: int | None = None) -> tuple[U16Array, U32Array]:
        """Take up to ``max_n`` used entries: ``(ids, lens)``; their chains are freed.

        Validates what the device wrote: a used index moved past the buffers in flight, an
        id out of range, not in flight or repeated, or a length beyond the chain's writable
        capacity marks the ring broken; the valid entries before the bad one are returned.
        """
        empty = _NO_IDS, _NO_LENS
        if self._broken is not None:
            return empty
        limit = self._q if max_n is None else _check_int(max_n, "max_n", 0, 1 << 62)
        used_idx = int(self._used_idx[0])  # read once
        pending = (used_idx - self._last_used) & INDEX_MASK
        if pending > self._num_in_flight:
            self._break(
                f"used index moved by {pending} with only {self._num_in_flight} buffers in flight"
            )
            return empty
        k = min(pending, limit)
        if k == 0:
            return empty
        if k <= self._scalar_max:
            ids_l, lens_l = self._get_used_scalar(k)
            self._after_get_used(len(ids_l))
            return np.array(ids_l, dtype=np.uint16), np.array(lens_l, dtype=np.uint32)
        # load->load: used.idx was read before the entries it publishes; x86 keeps loads in
        # order (virtio_rmb is a compiler barrier there). Fancy indexing copies: every entry
        # is read exactly once, into private memory.
        start = self._last_used & self._mask
        if start + k <= self._q:
            entries = self._used_ring[start : start + k].copy()
        else:
            entries = self._used_ring[(start + np.arange(k)) & self._mask]
        ids = entries["id"].astype(np.int64)
        lens = entries["len"].astype(np.int64)
        in_range = ids < self._q
        safe = np.where(in_range, ids, 0)
        valid = in_range & self._in_flight[safe]
        if int(np.bincount(safe, minlength=1).max()) > 1:  # a repeat: mark first occurrences
            first = np.zeros(k, dtype=np.bool_)
            first[np.unique(safe, return_index=True)[1]] = True
            valid &= first
        over = valid & (lens > self._wcap[safe])
        valid &= ~over
        if not bool(valid.all()):
            j = int(np.argmin(valid))
            bad = int(ids[j])
            if bad >= self._q:
                why = f"used id {bad} is out of range (queue size {self._q})"
            elif bool(over[j]):
                why = f"used len {int(lens[j])} for id {bad} exceeds its writable capacity"
            else:
                why = f"used id {bad} is not in flight"
            self._break(why)
            k = j
        ids_k = ids[:k]
        self._free_chains(ids_k)
        self._after_get_used(k)
        return ids_k.astype(np.uint16), lens[:k].astype(np.uint32)

    def _get_used_scalar(self, k: int) -> tuple[list[int], list[int]]:
        """The first ``k`` used entries with plain ints: the same single read of each entry,
        the same checks in the same order and the same reasons as the vectorized path; the
        valid entries before a bad one are taken (and their chains freed)."""
        # load->load: used.idx was read (by the caller) before the entries it publishes; x86
        # keeps loads in order. Each entry is unpacked exactly once into private ints.
        unpack = _USED_STRUCT.unpack_from
        mv, mask, last = self._used_mv, self._mask, self._last_used
        base = 4  # used.ring[0] after flags and idx
        entries = [unpack(mv, base + 8 * ((last + j) & mask)) for j in range(k)]
        q, in_flight, wcap = self._q, self._in_flight_mv, self._wcap_mv
        seen: set[int] = set()
        ids: list[int] = []
        lens: list[int] = []
        for i, length in entries:
            if i >= q:
                self._break(f"used id {i} is out of range (queue size {q})")
                break
            if not in_flight[i] or i in seen:
                self._break(f"used id {i} is not in flight")
                break
            if length > wcap[i]:
                self._break(f"used len {length} for id {i} exceeds its writable capacity")
                break
            seen.add(i)
            ids.append(i)
            lens.append(length)
        # Free the chains as _free_chains does: singles first, in order, then each chain.
        free, multi = self._free_mv, self._multi_mv
        for i in ids:
            in_flight[i] = 0
        self._num_in_flight -= len(ids)
        for i in ids:
            if not multi[i]:
                free[self._nfree] = i
                self._nfree += 1
        for i in ids:
            if multi[i]:
                for d in self._chains.pop(i):
                    free[self._nfree] = d
                    self._nfree += 1
                multi[i] = 0
        return ids, lens

    def _after_get_used(self, k: int) -> None:
        """Advance ``last_used`` past ``k`` taken entries and refresh ``used_event``."""
        self._last_used = (self._last_used + k) & INDEX_MASK
        if self._broken is None and self._event_idx:
            if self._irq_enabled:
                self._used_event[0] = self._last_used
                # store->load: this used_event must be visible before our next read of
                # used.idx (next get_used, or the caller deciding to sleep on an empty ring),
                # so the device either sees it and interrupts or we see its new entries.
                full_barrier()
            else:
                # Keep used_event one behind so a disabled ring is never interrupted; a
                # stale value here only risks a spurious interrupt, so no barrier.
                self._used_event[0] = (self._last_used - 1) & INDEX_MASK

    def _free_chains(self, ids: I64Array) -> None:
        if ids.shape[0] == 0:
            return
        self._in_flight[ids] = False
        self._num_in_flight -= int(ids.shape[0])
        multi = self._multi[ids]
        singles = ids[~multi]
        ns = int(singles.shape[0])
        self._free[self._nfree : self._nfree + ns] = singles
        self._nfree += ns
        if bool(multi.any()):
            for head in ids[multi].tolist():
                chain = self._chains.pop(head)
                self._free[self._nfree : self._nfree + len(chain)] = chain
                self._nfree += len(chain)
            self._multi[ids] = False


# ============================================================================ device side


class _Broken(Exception):
    """Internal: the guest broke the ring; caught inside this module, never escapes."""


_BATCH_DTYPES: Final = (np.uint16, np.int64, np.uint64, np.uint32, np.uint16, np.int64, np.int64)


class Batch:
    """Chains taken by one :meth:`DeviceRing.pop_batch`, from the device's private copies.

    Segments of all chains are stored flat, CSR style: chain ``i`` is segments
    ``starts[i]:starts[i+1]`` of ``addrs``/``lens``/``flags``. When every chain is a single
    descriptor (:attr:`simple`), ``starts`` is ``arange(N+1)`` and ``addrs[i]``, ``lens[i]``,
    ``flags[i]`` describe chain ``heads[i]`` directly, ready for vectorized payload copies.
    ``flags`` keeps only ``VRING_DESC_F_WRITE``. Every address range was validated.

    The fields are numpy arrays. A batch from the scalar path holds Python lists and makes
    each array on first access (most small-batch consumers never touch most of them); once
    made, an array is what every method reads.
    """

    __slots__ = ("_arrays", "_lists")

    def __init__(
        self,
        heads: U16Array,
        starts: I64Array,
        addrs: U64Array,
        lens: U32Array,
        flags: U16Array,
        readable_lens: I64Array,
        writable_lens: I64Array,
    ) -> None:
        self._arrays: list[npt.NDArray[Any] | None] = [
            heads, starts, addrs, lens, flags, readable_lens, writable_lens
        ]
        self._lists: list[list[int]] | None = None

    @classmethod
    def _of_lists(cls, *lists: list[int]) -> Batch:
        """A batch over Python lists, in field order (the scalar path's result)."""
        batch = cls.__new__(cls)
        batch._arrays = [None] * 7
        batch._lists = list(lists)
        return batch

    def _array(self, i: int) -> npt.NDArray[Any]:
        a = self._arrays[i]
        if a is None:
            assert self._lists is not None
            a = self._arrays[i] = np.array(self._lists[i], dtype=_BATCH_DTYPES[i])
        return a

    def _list(self, i: int) -> list[int]:
        """Field ``i`` as Python ints (the array once made: a caller may have changed it)."""
        if self._lists is not None and self._arrays[i] is None:
            return self._lists[i]
        out: list[int] = self._array(i).tolist()
        return out

    @property
    def heads(self) -> U16Array:
        return self._array(0)

    @property
    def starts(self) -> I64Array:
        return self._array(1)

    @property
    def addrs(self) -> U64Array:
        return self._array(2)

    @property
    def lens(self) -> U32Array:
        return self._array(3)

    @property
    def flags(self) -> U16Array:
        return self._array(4)

    @property
    def readable_lens(self) -> I64Array:
        """Bytes the device may read, per chain."""
        return self._array(5)

    @property
    def writable_lens(self) -> I64Array:
        """Bytes the device may write, per chain (the most it may report as used len)."""
        return self._array(6)

    @property
    def head_list(self) -> list[int]:
        """:attr:`heads` as Python ints (cheap for a batch from the scalar path)."""
        return self._list(0)

    @property
    def readable_list(self) -> list[int]:
        """:attr:`readable_lens` as Python ints."""
        return self._list(5)

    @property
    def writable_list(self) -> list[int]:
        """:attr:`writable_lens` as Python ints."""
        return self._list(6)

    def __len__(self) -> int:
        if self._lists is not None:
            return len(self._lists[0])
        return int(self._array(0).shape[0])

    @property
    def simple(self) -> bool:
        """Whether every chain is one descriptor (the vectorized fast path)."""
        if self._lists is not None:
            return len(self._lists[2]) == len(self._lists[0])
        return bool(self.addrs.shape[0] == self.heads.shape[0])

    @property
    def writable(self) -> BoolArray:
        """Per segment: device-writable."""
        flagged: BoolArray = (self.flags & VRING_DESC_F_WRITE) != 0
        return flagged

    def _slice(self, i: int, lo: int, hi: int) -> list[int]:
        """Items ``lo:hi`` of field ``i`` as Python ints, converting only those."""
        a = self._arrays[i]
        if a is None:
            assert self._lists is not None
            return self._lists[i][lo:hi]
        out: list[int] = a[lo:hi].tolist()
        return out

    def chain(self, i: int) -> tuple[Segment, ...]:
        """Segments of chain ``i`` (readable ones first; negative ``i`` counts from the
        end). Converts only that chain's entries, so walking a batch chain by chain is
        linear in its size."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"chain {i} of a batch of {n}")
        i %= n
        lo, hi = self._slice(1, i, i + 2)
        return tuple(
            Segment(a, ln, bool(f & VRING_DESC_F_WRITE))
            for a, ln, f in zip(
                self._slice(2, lo, hi), self._slice(3, lo, hi), self._slice(4, lo, hi), strict=True
            )
        )

    def chains(self) -> list[tuple[Segment, ...]]:
        """Every chain's segments (each field converted once)."""
        starts, addrs, lens, flags = self._list(1), self._list(2), self._list(3), self._list(4)
        segs = [
            Segment(a, ln, bool(f & VRING_DESC_F_WRITE))
            for a, ln, f in zip(addrs, lens, flags, strict=True)
        ]
        return [tuple(segs[lo:hi]) for lo, hi in itertools.pairwise(starts)]

    def rows(self, lo: int, hi: int) -> Batch:
        """Chains ``lo:hi`` (clamped to the batch) as a batch of their own -- for handling a
        big batch in pieces of bounded size; the chains stay in flight as one."""
        n = len(self)
        lo = min(max(lo, 0), n)
        hi = min(max(hi, lo), n)
        starts = self._list(1)
        s0, s1 = starts[lo], starts[hi]
        return Batch._of_lists(
            self._list(0)[lo:hi], [s - s0 for s in starts[lo : hi + 1]],
            self._list(2)[s0:s1], self._list(3)[s0:s1], self._list(4)[s0:s1],
            self._list(5)[lo:hi], self._list(6)[lo:hi],
        )

    def __repr__(self) -> str:
        return f"Batch(heads={self.head_list}, starts={self._list(1)})"


def _batch(
    heads: npt.NDArray[Any],
    starts: npt.NDArray[Any],
    addrs: npt.NDArray[Any],
    lens: npt.NDArray[Any],
    writable: BoolArray,
) -> Batch:
    lens64 = lens.astype(np.int64)
    if heads.shape[0]:
        first = starts[:-1]
        readable_lens = np.add.reduceat(np.where(writable, 0, lens64), first)
        writable_lens = np.add.reduceat(np.where(writable, lens64, 0), first)
    else:
        readable_lens = writable_lens = np.zeros(0, dtype=np.int64)
    return Batch(
        heads=heads.astype(np.uint16),
        starts=starts.astype(np.int64),
        addrs=addrs.astype(np.uint64),
        lens=lens.astype(np.uint32),
        flags=np.where(writable, VRING_DESC_F_WRITE, 0).astype(np.uint16),
        readable_lens=readable_lens.astype(np.int64),
        writable_lens=writable_lens.astype(np.int64),
    )


def _windows(slot: U8Array, take: int) -> U8Array:
    """Every ``take``-byte window of ``slot`` as the rows of one strided view -- what
    ``sliding_window_view`` makes, without its per-call cost; writable iff ``slot`` is."""
    view: U8Array = np.ndarray(
        (slot.shape[0] - take + 1, take), dtype=np.uint8, buffer=slot, strides=(1, 1)
    )
    return view


def _simple_batch(
    heads: I64Array, addrs: npt.NDArray[Any], lens: npt.NDArray[Any], wflags: npt.NDArray[Any]
) -> Batch:
    """:func:`_batch` for single-descriptor chains (``wflags``: each one's WRITE bit)."""
    lens64 = lens.astype(np.int64)
    wcap = lens64 * (wflags != 0)
    return Batch(
        heads=heads.astype(np.uint16),
        starts=np.arange(heads.shape[0] + 1, dtype=np.int64),
        addrs=addrs.astype(np.uint64),
        lens=lens.astype(np.uint32),
        flags=wflags.astype(np.uint16),
        readable_lens=lens64 - wcap,
        writable_lens=wcap,
    )


def _make_empty_batch() -> Batch:
    z = np.zeros(0, dtype=np.int64)
    batch = _batch(z, np.zeros(1, dtype=np.int64), z, z, np.zeros(0, dtype=np.bool_))
    for arr in (batch.heads, batch.starts, batch.addrs, batch.lens, batch.flags,
                batch.readable_lens, batch.writable_lens):
        arr.flags.writeable = False
    return batch


_EMPTY_BATCH: Final = _make_empty_batch()


def _empty_batch() -> Batch:
    """The empty batch: one shared read-only instance (an empty pass is the common case of
    every poll and building one costs a dozen numpy calls)."""
    return _EMPTY_BATCH


class _SlotTable(NamedTuple):
    starts: U64Array
    lasts: U64Array  # last byte (end - 1): end itself may be 2**64
    writable: BoolArray
    gpas: list[int]
    sizes: list[int]
    last_list: list[int]  # ``lasts`` and ``writable`` as Python values, for the scalar paths
    writable_list: list[bool]


class DeviceRing:
    """The host device's side of one split ring; everything read from the guest is untrusted.

    ``desc_gpa``, ``avail_gpa``, ``used_gpa`` are where the guest put the three areas; they
    must be 16-, 2- and 4-aligned, lie in guest memory and the used ring must be writable.
    Those addresses come from the guest, so a bad one does not raise: the ring starts
    broken. ``qsize``, ``event_idx``, ``start_index`` and ``max_buffer_len`` are the VMM's
    configuration (it validates the guest's queue-size register with
    :func:`valid_queue_size`): bad values are :class:`UsageError`.

    The three areas are translated once, here and in :meth:`reset`: if the VMM changes the
    memory map under a live ring it must reset the ring. The constructor (and :meth:`reset`)
    writes the used-ring header to match its state: flags 0 (kicks wanted), ``used.idx`` and
    ``avail_event`` = ``start_index``. Typical loop::

        while True:
            ring.disable_notifications()
            while batch := ring.pop_batch(max_n=64):
                ...                                  # I/O, then:
                if ring.push_used(batch.heads, written):
                    interrupt()                      # the caller's eventfd write
            if ring.broken:
                report_needs_reset(ring.broken); break
            if not ring.enable_notifications():      # barrier + re-check inside
                wait_for_kick()
    """

    def __init__(
        self,
        mem: GuestMemoryMap,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        qsize: int,
        *,
        event_idx: bool,
        start_index: int = 0,
        max_buffer_len: int = MAX_BUFFER_LEN,
    ) -> None:
        if not isinstance(mem, GuestMemoryMap):
            raise UsageError(f"mem must be a GuestMemoryMap, got {mem!r}")
        if not valid_queue_size(qsize):
            raise UsageError(
                f"queue size must be a power of two in 1..{MAX_QUEUE_SIZE}, got {qsize!r}"
            )
        self._mem = mem
        self._q = qsize
        self._mask = qsize - 1
        self._event_idx = bool(event_idx)
        self._start = _check_int(start_index, "start_index", 0, INDEX_MASK)
        self._max_len = _check_int(max_buffer_len, "max_buffer_len", 1, 0xFFFFFFFF)
        self._gpas = (
            _check_int(desc_gpa, "desc_gpa", 0, (1 << 64) - 1),
            _check_int(avail_gpa, "avail_gpa", 0, (1 << 64) - 1),
            _check_int(used_gpa, "used_gpa", 0, (1 << 64) - 1),
        )
        # Private bookkeeping, each as a numpy array and a memoryview over the same bytes.
        self._in_flight, self._in_flight_mv = _private_array(qsize, np.bool_, "B")
        self._wcap, self._wcap_mv = _private_array(qsize, np.int64, "q")
        self._scalar_max = SCALAR_MAX if _NATIVE_LE else 0
        self._slots_seen: list[Any] = []  # the memory map's slots _slot_table was built for
        self._slots_table: _SlotTable | None = None
        self._num_in_flight = 0
        self._last_avail = 0
        self._next_used = 0
        self._notify_enabled = True
        self._used_flags_shadow = 0
        self._broken: str | None = None
        self._attach()
        self._reset_state()

    @classmethod
    def from_layout(
        cls,
        mem: GuestMemoryMap,
        ring_gpa: int,
        layout: RingLayout,
        *,
        event_idx: bool,
        start_index: int = 0,
        max_buffer_len: int = MAX_BUFFER_LEN,
    ) -> DeviceRing:
        """A device ring over a contiguous :class:`RingLayout` placed at ``ring_gpa``."""
        desc, avail, used = layout.addresses(_check_int(ring_gpa, "ring_gpa", 0, (1 << 64) - 1))
        return cls(
            mem,
            desc,
            avail,
            used,
            layout.qsize,
            event_idx=event_idx,
            start_index=start_index,
            max_buffer_len=max_buffer_len,
        )

    def _attach(self) -> None:
        """Translate the three areas once; a bad guest address leaves the ring broken."""
        q = self._q
        desc_gpa, avail_gpa, used_gpa = self._gpas
        sizes = ring_area_sizes(q)
        try:
            problem = placement_problem(q, desc_gpa, avail_gpa, used_gpa)
            if problem is not None:
                raise _Broken(problem)
            try:
                desc = self._mem.translate(desc_gpa, sizes[0])
                avail = self._mem.translate(avail_gpa, sizes[1])
                used = self._mem.translate(used_gpa, sizes[2])
            except (MemoryAccessError, UsageError) as e:
                raise _Broken(f"ring area outside guest memory: {e}") from None
            if not used.flags.writeable:
                raise _Broken(f"used ring at {used_gpa:#x} is in read-only memory")
        except _Broken as e:
            self._broken = str(e)
            # Private zeroed stand-ins keep every view valid; nothing reads them while broken.
            desc = np.zeros(sizes[0], dtype=np.uint8)
            avail = np.zeros(sizes[1], dtype=np.uint8)
            used = np.zeros(sizes[2], dtype=np.uint8)
        v = _ring_views(desc, avail, used, q)
        self._desc = v.desc
        self._avail_flags = v.avail_flags
        self._avail_idx = v.avail_idx
        self._avail_ring = v.avail_ring
        self._used_event = v.used_event
        self._used_flags = v.used_flags
        self._used_idx = v.used_idx
        self._used_id = v.used_ring["id"]
        self._used_len = v.used_ring["len"]
        self._avail_event = v.avail_event
        # The same areas for the scalar paths (see _RingViews).
        self._desc_mv = v.desc_mv
        self._avail16 = v.avail16
        self._used_mv = v.used_mv
        self._used16 = v.used16

    def _reset_state(self) -> None:
        start = self._start
        self._in_flight[...] = False
        self._wcap[...] = 0
        self._num_in_flight = 0
        self._last_avail = start
        self._next_used = start
        self._notify_enabled = True
        self._used_flags_shadow = 0
        if self._broken is None:
            # The device owns the used-ring header: make it agree with our state.
            self._used_flags[0] = 0
            self._avail_event[0] = start
            self._used_idx[0] = start

    def reset(self) -> None:
        """Forget everything in flight, clear :attr:`broken`, re-translate the areas, set
        the indices back to ``start_index`` and rewrite the used-ring header (a virtio reset;
        the driver re-initialises its side)."""
        self._broken = None
        self._attach()
        self._reset_state()

    # ------------------------------------------------------------------ state

    @property
    def broken(self) -> str | None:
        """Why the guest broke this ring (report it to the VMM as NEEDS_RESET), or ``None``."""
        return self._broken

    @property
    def qsize(self) -> int:
        return self._q

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @property
    def in_flight(self) -> int:
        """Chains taken by :meth:`pop_batch` and not yet given back by :meth:`push_used`."""
        return self._num_in_flight

    @property
    def last_avail(self) -> int:
        return self._last_avail

    @property
    def next_used(self) -> int:
        return self._next_used

    @property
    def notifications_enabled(self) -> bool:
        return self._notify_enabled

    def _break(self, reason: str) -> Batch:
        if self._broken is None:
            self._broken = reason
        return _empty_batch()

    def has_available(self) -> bool:
        """Whether ``avail.idx`` moved past ``last_avail`` (a cheap poll, validates nothing)."""
        return self._broken is None and int(self._avail_idx[0]) != self._last_avail

    def available(self) -> int:
        """How many chains ``avail.idx`` is past ``last_avail`` (a cheap poll that validates
        nothing: a hostile index may say anything, :meth:`pop_batch` checks it); 0 when
        broken."""
        if self._broken is not None:
            return 0
        return (int(self._avail_idx[0]) - self._last_avail) & INDEX_MASK

    # ------------------------------------------------------------------ taking requests

    def pop_batch(self, max_n: int | None = None, max_descriptors: int | None = None) -> Batch:
        """Take the chains the guest made available since the last call (at most ``max_n``).

        Reads ``avail.idx`` once, the heads vectorized, and every descriptor once into a
        private copy. When no head has ``NEXT`` or ``INDIRECT`` the whole batch is taken and
        validated with array operations; otherwise chains are walked one by one and the pass
        stops taking chains once ``max_descriptors`` (default Q) descriptors were read (the
        chain being walked is finished, so at most ``max_descriptors + Q - 1``). Returns an
        empty :class:`Batch` when nothing is available or the ring is (or becomes) broken;
        check :attr:`broken` after an empty batch. Never raises for anything the guest did.
        """
        if self._broken is not None:
            return _empty_batch()
        limit = self._q if max_n is None else _check_int(max_n, "max_n", 0, 1 << 62)
        budget = (
            self._q
            if max_descriptors is None
            else _check_int(max_descriptors, "max_descriptors", 1, 1 << 62)
        )
        avail_idx = int(self._avail_idx[0])  # read once: the guest may move it at any time
        n = (avail_idx - self._last_avail) & INDEX_MASK
        if n > self._q:
            return self._break(
                f"avail index jumped from {self._last_avail} to {avail_idx} "
                f"(more than the queue size {self._q})"
            )
        if n + self._num_in_flight > self._q:
            return self._break(
                f"{n} new requests with {self._num_in_flight} in flight exceed the queue size "
                f"{self._q}"
            )
        k = min(n, limit)
        if k == 0:
            return _empty_batch()
        if k <= self._scalar_max:
            return self._pop_scalar(k, budget)
        # load->load: avail.idx was read before the ring entries it publishes; x86 does not
        # reorder loads with loads. astype / fancy indexing copy each entry once.
        first = self._last_avail & self._mask
        if first + k <= self._q:
            heads = self._avail_ring[first : first + k].astype(np.int64)
        else:
            heads = self._avail_ring[(first + np.arange(k)) & self._mask].astype(np.int64)
        if int(heads.max()) >= self._q:
            bad = int(heads[int(np.argmax(heads >= self._q))])
            return self._break(f"head {bad} out of range (queue size {self._q})")
        # In flight already, or repeated: each head counted once more on top of what is in
        # flight, nothing may reach 2 (one pass instead of a sort); the reasons in order.
        seen = np.bincount(heads, minlength=self._q)
        seen += self._in_flight
        if int(seen.max()) > 1:
            if bool(self._in_flight[heads].any()):
                bad = int(heads[int(np.argmax(self._in_flight[heads]))])
                return self._break(f"head {bad} made available again while in flight")
            return self._break("the same head was made available twice")
        # Each head descriptor read exactly once, into a private copy (fancy indexing copies):
        # rewriting it later cannot change what we validate and act on.
        descs = self._desc[heads]
        dflags = descs["flags"]
        ored = int(np.bitwise_or.reduce(dflags))
        try:
            if not ored & _WRITE_OR_CONTINUE:
                taken = k
                addrs = descs["addr"]
                lens = descs["len"]
                wflags = dflags & VRING_DESC_F_WRITE
                if not self._simple_ok(addrs, lens, bool(ored & VRING_DESC_F_WRITE)):
                    # The full check is the reference: it raises with the exact reason.
                    self._check_buffers(addrs, lens, wflags != 0, np.arange(k + 1))
                batch = _simple_batch(heads, addrs, lens, wflags)
            else:
                taken, st, a, n_, w = self._walk_chains(heads.tolist(), descs.tolist(), budget)
                heads = heads[:taken]
                starts = np.asarray(st, dtype=np.int64)
                addrs = np.asarray(a, dtype=np.uint64)
                lens = np.asarray(n_, dtype=np.uint32)
                writable = np.asarray(w, dtype=np.bool_)
                self._check_buffers(addrs, lens, writable, starts)
                batch = _batch(heads, starts, addrs, lens, writable)
        except _Broken as e:
            return self._break(str(e))
        self._in_flight[heads] = True
        self._wcap[heads] = batch.writable_lens
        self._took(taken)
        return batch

    def _simple_ok(self, addrs: U64Array, lens: U32Array, any_writable: bool) -> bool:
        """A sufficient check for single-descriptor batches, in four reductions: True if
        every buffer is non-empty, within ``max_buffer_len`` and, together, inside one slot
        (writable when any buffer is), so :meth:`_check_buffers` would accept them all."""
        nmin, nmax = int(lens.min()), int(lens.max())
        if nmin == 0 or nmax > self._max_len:
            return False
        lo, hi = int(addrs.min()), int(addrs.max())
        table = self._slot_table()
        s = bisect.bisect_right(table.gpas, lo) - 1
        # Python ints: hi + nmax cannot wrap. Every buffer lies in [lo, hi + nmax).
        return (
            s >= 0
            and hi + nmax - 1 <= table.last_list[s]
            and (not any_writable or table.writable_list[s])
        )

    def _pop_scalar(self, k: int, budget: int) -> Batch:
        """:meth:`pop_batch` of ``k`` (a few) chains with plain ints: the same single read of
        every entry and descriptor, the same checks in the same order, the same reasons and
        the same :class:`Batch` as the vectorized path, without numpy's per-call cost."""
        q, mask, last = self._q, self._mask, self._last_avail
        ring = self._avail16
        in_flight = self._in_flight_mv
        if k == 1:  # the stop-and-wait case, without the loops
            # load->load: avail.idx was read (by the caller) before the ring entry it
            # publishes; x86 does not reorder loads with loads. Read once.
            h = ring[2 + (last & mask)]
            if h >= q:
                return self._break(f"head {h} out of range (queue size {q})")
            if in_flight[h]:
                return self._break(f"head {h} made available again while in flight")
            # The head descriptor read exactly once, into a private tuple.
            desc = _DESC_STRUCT.unpack_from(self._desc_mv, h << 4)
            if not desc[2] & _WRITE_OR_CONTINUE:
                batch = self._pop_one(h, desc)
                if batch is not None:
                    return batch
            heads, descs = [h], [desc]
        else:
            # load->load as above; each entry read once.
            heads = [ring[2 + ((last + j) & mask)] for j in range(k)]
            for h in heads:
                if h >= q:
                    return self._break(f"head {h} out of range (queue size {q})")
            for h in heads:
                if in_flight[h]:
                    return self._break(f"head {h} made available again while in flight")
            if len(set(heads)) != k:
                return self._break("the same head was made available twice")
            # Each head descriptor read exactly once, into a private tuple: rewriting it
            # later cannot change what we validate and act on.
            unpack, dmv = _DESC_STRUCT.unpack_from, self._desc_mv
            descs = [unpack(dmv, h << 4) for h in heads]
        try:
            if not any(d[2] & _WRITE_OR_CONTINUE for d in descs):
                taken = k
                starts = list(range(k + 1))
                addrs = [d[0] for d in descs]
                lens = [d[1] for d in descs]
                writable = [bool(d[2] & VRING_DESC_F_WRITE) for d in descs]
            else:
                taken, starts, addrs, lens, writable = self._walk_chains(heads, descs, budget)
                heads = heads[:taken]
            if not self._buffers_ok(addrs, lens, writable, starts):
                # The vectorized check is the reference: it raises with the exact reason.
                self._check_buffers(
                    np.array(addrs, dtype=np.uint64),
                    np.array(lens, dtype=np.uint32),
                    np.array(writable, dtype=np.bool_),
                    np.array(starts, dtype=np.int64),
                )
        except _Broken as e:
            return self._break(str(e))
        readable_lens: list[int] = []
        writable_lens: list[int] = []
        for c in range(taken):
            r = wl = 0
            for j in range(starts[c], starts[c + 1]):
                if writable[j]:
                    wl += lens[j]
                else:
                    r += lens[j]
            readable_lens.append(r)
            writable_lens.append(wl)
        batch = Batch._of_lists(
            heads,
            starts,
            addrs,
            lens,
            [VRING_DESC_F_WRITE if w else 0 for w in writable],
            readable_lens,
            writable_lens,
        )
        wcap = self._wcap_mv
        for h, wl in zip(heads, writable_lens, strict=True):
            in_flight[h] = 1
            wcap[h] = wl
        self._took(taken)
        return batch

    def _pop_one(self, head: int, desc: tuple[int, int, int, int]) -> Batch | None:
        """Take one single-descriptor chain whose buffer passes :meth:`_buffers_ok`'s
        checks; ``None`` (nothing taken) if it does not -- the caller then goes the general
        way, which finds the reason."""
        addr, length, flags, _ = desc
        w = flags & VRING_DESC_F_WRITE
        if not 0 < length <= self._max_len or addr + length > 1 << 64:
            return None
        table = self._slot_table()
        s = bisect.bisect_right(table.gpas, addr) - 1
        if s < 0 or addr + length - 1 > table.last_list[s] or (w and not table.writable_list[s]):
            return None
        cap = length if w else 0
        self._in_flight_mv[head] = 1
        self._wcap_mv[head] = cap
        self._took(1)
        return Batch._of_lists([head], [0, 1], [addr], [length], [w], [length - cap], [cap])

    def _buffers_ok(
        self, addrs: list[int], lens: list[int], writable: list[bool], starts: list[int]
    ) -> bool:
        """The scalar paths' buffer check: True iff :meth:`_check_buffers` would accept the
        same segments (non-zero, within ``max_buffer_len``, no 2**64 overflow, inside one
        slot, writable ones in writable memory, no readable after a writable in a chain)."""
        table = self._slot_table()
        gpas, lasts, wr = table.gpas, table.last_list, table.writable_list
        max_len, chain_heads = self._max_len, set(starts)
        prev_w = False
        for j, (addr, length, w) in enumerate(zip(addrs, lens, writable, strict=True)):
            if j in chain_heads:
                prev_w = False
            if not 0 < length <= max_len or addr + length > 1 << 64 or (prev_w and not w):
                return False
            s = bisect.bisect_right(gpas, addr) - 1
            if s < 0 or addr + length - 1 > lasts[s] or (w and not wr[s]):
                return False
            prev_w = w
        return True

    def _took(self, taken: int) -> None:
        """Count ``taken`` chains as in flight, advance ``last_avail``, refresh
        ``avail_event``."""
        self._num_in_flight += taken
        self._last_avail = (self._last_avail + taken) & INDEX_MASK
        if self._event_idx:
            if self._notify_enabled:
                self._avail_event[0] = self._last_avail
                # store->load: the new avail_event must be visible before our next read of
                # avail.idx (next pop, or the caller deciding to sleep on an empty ring), so
                # the driver either sees it and kicks or we see its new entries.
                full_barrier()
            else:
                # One behind: notifications stay off. Staleness only risks a spurious kick.
                self._avail_event[0] = (self._last_avail - 1) & INDEX_MASK

    def _walk_chains(
        self, heads: list[int], descs: list[tuple[int, int, int, int]], budget: int
    ) -> tuple[int, list[int], list[int], list[int], list[bool]]:
        """Follow each chain (bounded); stop taking chains once ``budget`` is spent.
        ``descs`` are the private copies of the head descriptors."""
        a: list[int] = []
        n: list[int] = []
        w: list[bool] = []
        starts = [0]
        spent = 0
        taken = 0
        for head, first in zip(heads, descs, strict=True):
            if taken and spent >= budget:
                break
            spent += self._walk_chain(head, first, a, n, w)
            starts.append(len(a))
            taken += 1
        return taken, starts, a, n, w

    def _walk_chain(
        self,
        head: int,
        first: tuple[int, int, int, int],
        a: list[int],
        n: list[int],
        w: list[bool],
    ) -> int:
        """Append chain ``head``'s segments; return how many descriptors were read.

        Zero or more normal descriptors, then optionally one indirect descriptor (without
        ``NEXT``) ending the chain, whose table's buffers follow the normal ones."""
        q = self._q
        addr, length, flags, nxt = first
        visited = {head}
        idx = head
        while True:
            if flags & VRING_DESC_F_INDIRECT:
                if flags & VRING_DESC_F_NEXT:
                    where = "" if idx == head else f" {idx}"
                    raise _Broken(f"chain {head}: indirect descriptor{where} also has NEXT")
                # The normal descriptors before it are buffers of the same chain.
                before = len(visited) - 1
                return len(visited) + self._walk_indirect(head, addr, length, a, n, w, before)
            a.append(addr)
            n.append(length)
            w.append(bool(flags & VRING_DESC_F_WRITE))
            if not flags & VRING_DESC_F_NEXT:
                return len(visited)
            if nxt >= q:
                raise _Broken(f"chain {head}: descriptor {idx} has next {nxt} >= queue size {q}")
            if nxt in visited:
                raise _Broken(f"chain {head}: descriptor loop at {idx} -> {nxt}")
            if len(visited) >= q:  # unreachable without a loop; a bound regardless
                raise _Broken(f"chain {head}: longer than the queue size {q}")
            visited.add(nxt)
            idx = nxt
            # Read once into a private tuple: unpacking copies every field out of guest memory.
            addr, length, flags, nxt = _DESC_STRUCT.unpack_from(self._desc_mv, idx << 4)

    def _walk_indirect(
        self,
        head: int,
        addr: int,
        length: int,
        a: list[int],
        n: list[int],
        w: list[bool],
        before: int = 0,
    ) -> int:
        """Append the buffers of chain ``head``'s indirect table (``before`` buffers of the
        chain precede them); return how many table entries were read."""
        q = self._q
        if length == 0 or length % DESC_DTYPE.itemsize:
            raise _Broken(
                f"chain {head}: indirect table length {length} is not a non-zero multiple of 16"
            )
        count = length // DESC_DTYPE.itemsize
        if count > q:
            raise _Broken(
                f"chain {head}: indirect table of {count} descriptors is longer than the "
                f"queue size {q}"
            )
        try:
            raw = self._mem.translate(addr, length)
        except MemoryAccessError as e:
            raise _Broken(f"chain {head}: indirect table outside guest memory: {e}") from None
        # One copy of the whole table, then only the copy is used.
        table = raw.copy().view(DESC_DTYPE).tolist()
        visited = {0}
        i = 0
        while True:
            d_addr, d_len, d_flags, d_next = table[i]
            if d_flags & VRING_DESC_F_INDIRECT:
                raise _Broken(f"chain {head}: nested indirect descriptor in its table")
            if before + len(visited) > q:
                raise _Broken(
                    f"chain {head}: {before} buffers and an indirect table: longer than the "
                    f"queue size {q}"
                )
            a.append(d_addr)
            n.append(d_len)
            w.append(bool(d_flags & VRING_DESC_F_WRITE))
            if not d_flags & VRING_DESC_F_NEXT:
                return len(visited)
            if d_next >= count:
                raise _Broken(
                    f"chain {head}: indirect entry {i} has next {d_next} >= table size {count}"
                )
            if d_next in visited:
                raise _Broken(f"chain {head}: descriptor loop in its indirect table")
            visited.add(d_next)
            i = d_next

    def _slot_table(self) -> _SlotTable:
        """The memory map's slots as arrays and lists, rebuilt only when the map changed.

        A map change (add or remove) makes new :class:`~shared.memory.MemorySlot` objects, so
        comparing the slots by identity detects it; building the table costs a dozen numpy
        calls and a translate per slot, too much to repeat on every pass.
        """
        slots = self._mem.slots()
        seen = self._slots_seen
        if (
            self._slots_table is not None
            and len(slots) == len(seen)
            and all(a is b for a, b in zip(slots, seen, strict=True))
        ):
            return self._slots_table
        writable = [bool(self._mem.translate(s.gpa, 0).flags.writeable) for s in slots]
        table = _SlotTable(
            starts=np.array([s.gpa for s in slots], dtype=np.uint64),
            lasts=np.array([s.end - 1 for s in slots], dtype=np.uint64),
            writable=np.array(writable, dtype=np.bool_),
            gpas=[s.gpa for s in slots],
            sizes=[s.size for s in slots],
            last_list=[s.end - 1 for s in slots],
            writable_list=writable,
        )
        self._slots_seen, self._slots_table = slots, table
        return table

    def _locate(self, addrs: U64Array, table: _SlotTable) -> I64Array:
        """Slot index (into ``table``) holding each address, -1 if none."""
        if not table.gpas:
            return np.full(addrs.shape[0], -1, dtype=np.int64)
        si = np.searchsorted(table.starts, addrs, side="right").astype(np.int64) - 1
        safe = np.maximum(si, 0)
        return np.where((si >= 0) & (addrs <= table.lasts[safe]), si, -1).astype(np.int64)

    def _check_buffers(
        self, addrs: U64Array, lens: U32Array, writable: BoolArray, starts: I64Array
    ) -> None:
        """Validate every segment at once (vectorized); raise :class:`_Broken` on the first."""
        if addrs.shape[0] == 0:
            return
        lens64 = lens.astype(np.uint64)
        zero = lens64 == 0
        huge = lens64 > self._max_len
        # 2**64 - len, computed in wrapping uint64 (only meaningful where len > 0):
        room = ~lens64 + np.uint64(1)
        overflow = ~zero & (addrs > room)
        table = self._slot_table()
        si = self._locate(addrs, table)
        outside = si < 0
        straddle = np.zeros(addrs.shape[0], dtype=np.bool_)
        rom = np.zeros(addrs.shape[0], dtype=np.bool_)
        if table.gpas:
            safe = np.maximum(si, 0)
            # Last byte of each buffer; wraps only where overflow or zero is already flagged.
            last = addrs + (lens64 - np.uint64(1))
            straddle = ~outside & ~overflow & ~zero & (last > table.lasts[safe])
            rom = ~outside & writable & ~table.writable[safe]
        # A readable segment after a writable one in the same chain (virtio forbids it).
        order = np.zeros(addrs.shape[0], dtype=np.bool_)
        if addrs.shape[0] > 1:
            chain_start = np.zeros(addrs.shape[0], dtype=np.bool_)
            chain_start[starts[:-1]] = True
            order[1:] = writable[:-1] & ~writable[1:] & ~chain_start[1:]
        bad = zero | huge | overflow | outside | straddle | rom | order
        if not bool(bad.any()):
            return
        j = int(np.argmax(bad))
        where = f"buffer [{int(addrs[j]):#x}, +{int(lens64[j]):#x})"
        if zero[j]:
            raise _Broken(f"zero-length buffer at {int(addrs[j]):#x}")
        if huge[j]:
            raise _Broken(f"{where} is longer than the {self._max_len}-byte limit")
        if overflow[j]:
            raise _Broken(f"{where} overflows the 64-bit address space")
        if order[j]:
            raise _Broken(f"{where} is device-readable but follows a device-writable buffer")
        if outside[j]:
            raise _Broken(f"{where} is outside guest memory")
        if straddle[j]:
            raise _Broken(f"{where} crosses the end of its memory slot (a gap or another slot)")
        raise _Broken(f"{where} is device-writable but lies in read-only memory")

    # ------------------------------------------------------------------ payloads

    def _check_batch(self, batch: Batch) -> None:
        if not isinstance(batch, Batch):
            raise UsageError(f"expected a Batch, got {batch!r}")
        nrows = len(batch)
        if nrows <= self._scalar_max:
            in_flight = self._in_flight_mv
            ok = all(in_flight[h] for h in batch.head_list)
        else:
            ok = bool(self._in_flight[batch.heads.astype(np.int64)].all())
        if not ok:
            raise UsageError("batch contains chains that are no longer in flight")

    def read_payloads(
        self, batch: Batch, width: int, out: U8Array | None = None
    ) -> tuple[U8Array, I64Array]:
        """Copy each chain's device-readable bytes into row ``i`` of an ``(N, width)`` array.

        Returns ``(data, copied)``: row ``i`` holds the first ``copied[i] = min(readable,
        width)`` bytes of chain ``i``'s readable segments, concatenated; the rest is zero.
        ``width`` is the caller's bound (the guest chooses the lengths; see
        :attr:`Batch.readable_lens` to detect truncation). Simple batches are gathered
        without a per-buffer loop (one array gather per memory slot and distinct length);
        chained batches loop once per segment (a slice of guest memory each, no per-byte
        work). ``out``, a C-contiguous 2-D uint8 array of at least ``(N, width)``, is the
        device's own buffer to copy into (``data`` is then its top-left ``(N, width)``
        view): a device reading big buffers pass after pass reuses warm memory instead of
        faulting in fresh pages each time. On a broken ring returns two empty arrays.
        """
        self._check_batch(batch)
        w = _check_int(width, "width", 0, 1 << 40)
        nrows = len(batch)
        if out is not None and (
            not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 2
            or out.shape[0] < nrows or out.shape[1] < w or not out.flags.c_contiguous
            or not out.flags.writeable
        ):
            raise UsageError(f"out must be a writable C-contiguous uint8 array of at least "
                             f"({nrows}, {w})")
        if self._broken is not None:
            return np.zeros((0, w), dtype=np.uint8), np.zeros(0, dtype=np.int64)
        try:
            if not batch.simple or nrows <= self._scalar_max:
                # Chains, and the few rows of a small batch: one slice copy per segment
                # straight into the row (np.empty: only what is not copied gets zeroed).
                rows_out = np.empty((nrows, w), dtype=np.uint8) if out is None else out
                return self._read_rows(batch, w, rows_out[:nrows, :w])
            copied = np.minimum(batch.readable_lens, w).astype(np.int64)
            rows = np.nonzero(copied > 0)[0]  # a writable buffer has 0 readable bytes
            groups = self._groups(batch.addrs, copied, rows)
            if len(groups) == 1 and groups[0][3] == w and rows.shape[0] == nrows:
                # Every row full width from one slot: the gather is the result.
                slot, _, offs, _ = groups[0]
                data = _windows(slot, w)[offs]
            else:
                data = np.zeros((nrows, w), dtype=np.uint8)
                for slot, group, offs, take in groups:
                    data[group, :take] = _windows(slot, take)[offs]
        except MemoryAccessError as e:
            self._break(f"guest memory changed under in-flight buffers: {e}")
            return np.zeros((0, w), dtype=np.uint8), np.zeros(0, dtype=np.int64)
        if out is not None:  # many small rows: the gather above, then into the caller's
            out[:nrows, :w] = data
            data = out[:nrows, :w]
        return data, copied

    def _read_rows(self, batch: Batch, w: int, data: U8Array) -> tuple[U8Array, I64Array]:
        """:meth:`read_payloads` row by row, one slice copy per segment into ``data``
        (``(N, w)``); raises :class:`MemoryAccessError` for the caller to handle."""
        addrs, lens = batch._list(2), batch._list(3)
        flags, starts = batch._list(4), batch._list(1)
        got: list[int] = []
        for i in range(len(batch)):
            dst = 0
            for j in range(starts[i], starts[i + 1]):
                if flags[j] & VRING_DESC_F_WRITE or dst >= w:
                    break
                take = min(lens[j], w - dst)
                data[i, dst : dst + take] = self._mem.translate(addrs[j], take)
                dst += take
            if dst < w:
                data[i, dst:] = 0
            got.append(dst)
        return data, np.array(got, dtype=np.int64)

    def write_payloads(self, batch: Batch, data: U8Array, lens: npt.ArrayLike) -> U32Array:
        """Write row ``i`` of ``data`` (its first ``lens[i]`` bytes) into chain ``i``'s
        device-writable segments, in order; return ``lens`` as the used lengths for
        :meth:`push_used`.

        :class:`UsageError` (nothing written) if ``data`` is not an ``(N, W)`` uint8 array,
        a length exceeds ``W`` or the chain's writable capacity, or the batch is no longer in
        flight. Simple batches are scattered without a per-buffer loop (one array assignment
        per memory slot and distinct length); chained batches loop once per segment. On a
        broken ring nothing is written and an empty array is returned.
        """
        self._check_batch(batch)
        nrows = len(batch)
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[0] != nrows
        ):
            raise UsageError(f"data must be a ({nrows}, W) uint8 array")
        n_l = _small_ints(lens, "lens", self._scalar_max, _I64_MAX) if self._scalar_max else None
        if n_l is not None and len(n_l) == nrows:
            return self._write_scalar(batch, data, n_l)
        n = _index_array(lens, "lens")
        if n.shape[0] != nrows:
            raise UsageError(f"{nrows} chains but {n.shape[0]} lengths")
        if bool((n > data.shape[1]).any()):
            raise UsageError(f"a length exceeds the data width {data.shape[1]}")
        if bool((n > batch.writable_lens).any()):
            raise UsageError("a length exceeds its chain's device-writable capacity")
        if self._broken is not None:
            return np.zeros(0, dtype=np.uint32)
        try:
            if batch.simple:
                rows = np.nonzero(n > 0)[0]
                for slot, group, offs, take in self._groups(batch.addrs, n, rows):
                    if not slot.flags.writeable:
                        raise MemoryAccessError("a device-writable buffer is in read-only memory")
                    # every row in order: a basic slice of data, no fancy-indexed copy
                    rows_data = data[:, :take] if group.shape[0] == nrows else data[group, :take]
                    _windows(slot, take)[offs] = rows_data
            else:
                for i in range(nrows):
                    src, left = 0, int(n[i])
                    for seg in batch.chain(i):
                        if left == 0:
                            break
                        if not seg.writable:
                            continue
                        take = min(seg.len, left)
                        dst = self._mem.translate(seg.gpa, take)
                        if not dst.flags.writeable:
                            raise MemoryAccessError(f"{seg.gpa:#x} is read-only")
                        dst[...] = data[i, src : src + take]
                        src += take
                        left -= take
        except MemoryAccessError as e:
            self._break(f"guest memory changed under in-flight buffers: {e}")
            return np.zeros(0, dtype=np.uint32)
        return n.astype(np.uint32)

    def _write_scalar(self, batch: Batch, data: U8Array, n: list[int]) -> U32Array:
        """:meth:`write_payloads` for a few rows with plain ints: the same checks in the same
        order, one slice copy per segment."""
        width = data.shape[1]
        if any(x > width for x in n):
            raise UsageError(f"a length exceeds the data width {width}")
        if any(x > c for x, c in zip(n, batch.writable_list, strict=True)):
            raise UsageError("a length exceeds its chain's device-writable capacity")
        if self._broken is not None:
            return np.zeros(0, dtype=np.uint32)
        addrs, lens = batch._list(2), batch._list(3)
        flags, starts = batch._list(4), batch._list(1)
        try:
            for i, left in enumerate(n):
                src = 0
                for j in range(starts[i], starts[i + 1]):
                    if left == 0:
                        break
                    if not flags[j] & VRING_DESC_F_WRITE:
                        continue
                    take = min(lens[j], left)
                    dst = self._mem.translate(addrs[j], take)
                    if not dst.flags.writeable:
                        raise MemoryAccessError(f"{addrs[j]:#x} is read-only")
                    dst[...] = data[i, src : src + take]
                    src += take
                    left -= take
        except MemoryAccessError as e:
            self._break(f"guest memory changed under in-flight buffers: {e}")
            return np.zeros(0, dtype=np.uint32)
        return np.array(n, dtype=np.uint32)

    def copy_payloads(
        self, batch: Batch, dst: DeviceRing, dst_batch: Batch, width: int
    ) -> U32Array:
        """Copy chain ``i``'s device-readable bytes (of ``batch``, taken from this ring)
        straight into chain ``i``'s device-writable buffers (of ``dst_batch``, taken from
        ``dst``), for every chain of ``dst_batch``; return the bytes written per chain, the
        used lengths for ``dst.push_used``.

        What :meth:`read_payloads` then ``dst.write_payloads`` would do with the bytes
        truncated to ``min(width, destination capacity)``, but with one slice copy per
        overlapping pair of segments and no staging array. :class:`UsageError` if a batch is
        not in flight on its ring or ``dst_batch`` has more chains than ``batch``. A buffer
        no longer in guest memory (the map changed) breaks the ring it belongs to, and an
        empty array is returned; so does a broken ring.
        """
        if not isinstance(dst, DeviceRing):
            raise UsageError(f"dst must be a DeviceRing, got {dst!r}")
        self._check_batch(batch)
        dst._check_batch(dst_batch)
        w = _check_int(width, "width", 0, 1 << 40)
        n = len(dst_batch)
        if n > len(batch):
            raise UsageError(f"{n} destination chains for {len(batch)} source chains")
        if self._broken is not None or dst._broken is not None:
            return np.zeros(0, dtype=np.uint32)
        s_addr, s_len = batch._list(2), batch._list(3)
        s_flag, s_start = batch._list(4), batch._list(1)
        d_addr, d_len = dst_batch._list(2), dst_batch._list(3)
        d_flag, d_start = dst_batch._list(4), dst_batch._list(1)
        written: list[int] = []
        for i in range(n):
            si, s_end, s_off = s_start[i], s_start[i + 1], 0
            di, d_end, d_off = d_start[i], d_start[i + 1], 0
            left, total = w, 0
            while left and si < s_end and di < d_end and not s_flag[si] & VRING_DESC_F_WRITE:
                if not d_flag[di] & VRING_DESC_F_WRITE:
                    di += 1  # a readable buffer at the start of the destination chain
                    continue
                take = min(s_len[si] - s_off, d_len[di] - d_off, left)
                try:
                    src = self._mem.translate(s_addr[si] + s_off, take)
                except MemoryAccessError as e:
                    self._break(f"guest memory changed under in-flight buffers: {e}")
                    return np.zeros(0, dtype=np.uint32)
                try:
                    out = dst._mem.translate(d_addr[di] + d_off, take)
                    if not out.flags.writeable:
                        raise MemoryAccessError(f"{d_addr[di] + d_off:#x} is read-only")
                except MemoryAccessError as e:
                    dst._break(f"guest memory changed under in-flight buffers: {e}")
                    return np.zeros(0, dtype=np.uint32)
                out[...] = src
                total += take
                left -= take
                s_off += take
                d_off += take
                if s_off == s_len[si]:
                    si, s_off = si + 1, 0
                if d_off == d_len[di]:
                    di, d_off = di + 1, 0
            written.append(total)
        return np.array(written, dtype=np.uint32)

    def _groups(
        self, addrs: U64Array, take: I64Array, rows: npt.NDArray[np.intp]
    ) -> list[tuple[U8Array, I64Array, I64Array, int]]:
        """Split ``rows`` (single-segment chains) by memory slot and copy length.

        Yields ``(slot_view, rows, offsets_in_slot, length)``: every row of a group can be
        copied with one fancy-indexed assignment through a sliding-window view of the slot.
        Raises :class:`MemoryAccessError` if a buffer is no longer in one slot.
        """
        if rows.shape[0] == 0:
            return []
        table = self._slot_table()
        a = addrs[rows]
        t = take[rows]
        length = int(t.max())
        if int(t.min()) == length:
            # The common case -- one length, every buffer in one slot -- in four reductions.
            lo, hi = int(a.min()), int(a.max())
            s = bisect.bisect_right(table.gpas, lo) - 1
            if s >= 0 and hi + length - 1 <= table.last_list[s]:
                gpa, size = table.gpas[s], table.sizes[s]
                offs = (a - np.uint64(gpa)).astype(np.int64)
                slot = self._mem.translate(gpa, size)
                return [(slot, rows.astype(np.int64), offs, length)]
        si = self._locate(a, table)
        groups: list[tuple[U8Array, I64Array, I64Array, int]] = []
        if bool((si < 0).any()):
            raise MemoryAccessError("a buffer is no longer in guest memory")
        if int(si.min()) == int(si.max()) and int(t.min()) == int(t.max()):
            keys = [(int(si[0]), int(t[0]))]  # the common case: one slot, one length
        else:  # np.unique(axis=0) sorts rows: correct for any mix, but costly per call
            keys = [(int(k[0]), int(k[1]))
                    for k in np.unique(np.stack([si, t], axis=1), axis=0).tolist()]
        for s, length in keys:
            sel = (si == s) & (t == length)
            gpa, size = table.gpas[s], table.sizes[s]
            offs = (a[sel] - np.uint64(gpa)).astype(np.int64)
            if bool((offs + length > size).any()):
                raise MemoryAccessError("a buffer no longer fits in its memory slot")
            slot = self._mem.translate(gpa, size)
            groups.append((slot, rows[sel].astype(np.int64), offs, length))
        return groups

    # ------------------------------------------------------------------ completions

    def push_used(self, ids: npt.ArrayLike, lens: npt.ArrayLike) -> bool:
        """Complete chains ``ids`` with used lengths ``lens`` (bytes written into each chain's
        device-writable buffers); return ``True`` if the caller must interrupt the driver.

        Vectorized used-ring writes, then ``used.idx`` once, then a full barrier, then the
        decision: with EVENT_IDX ``need_event(used_event, new, old)``, otherwise ``not
        (avail.flags & NO_INTERRUPT)``. :class:`UsageError` (nothing written) if an id is not
        in flight or repeated, or a length exceeds what the chain can hold -- our own bug.
        A broken ring writes nothing and returns ``False``.
        """
        if self._scalar_max:
            i_l = _small_ints(ids, "ids", self._scalar_max, _I64_MAX)
            n_l = _small_ints(lens, "lens", self._scalar_max, _I64_MAX) if i_l is not None else None
            if i_l is not None and n_l is not None and len(i_l) == len(n_l):
                return self._push_scalar(i_l, n_l)
        i = _index_array(ids, "ids")
        n = _index_array(lens, "lens")
        if i.shape != n.shape:
            raise UsageError(f"{i.shape[0]} ids but {n.shape[0]} lengths")
        if self._broken is not None or i.shape[0] == 0:
            return False
        q = self._q
        if int(i.max()) >= q:
            raise UsageError(f"an id is out of range (queue size {q})")
        if not bool(self._in_flight[i].all()):
            raise UsageError("completing a chain that is not in flight")
        # Duplicates: every id is in flight (checked above), so clearing them all removes
        # exactly len(ids) unless one repeats (cheaper than sorting them); then restore.
        self._in_flight[i] = False
        distinct = self._num_in_flight - int(np.count_nonzero(self._in_flight))
        self._in_flight[i] = True
        if distinct != i.shape[0]:
            raise UsageError("the same id is completed twice")
        if bool((n > self._wcap[i]).any()):
            raise UsageError("a used length exceeds the chain's device-writable capacity")
        if int(n.max()) > 0xFFFFFFFF:
            raise UsageError("a used length does not fit the ring's u32 len field")
        count = int(i.shape[0])
        old = self._next_used
        new = (old + count) & INDEX_MASK
        first = old & self._mask
        if first + count <= q:  # no wrap: slices instead of an index array
            self._used_id[first : first + count] = i
            self._used_len[first : first + count] = n
        else:
            pos = (first + np.arange(count)) & self._mask
            self._used_id[pos] = i
            self._used_len[pos] = n
        # store->store: the used elements above are stored before used.idx; x86 keeps
        # stores in order, so a driver that sees the new index sees the entries.
        self._used_idx[0] = new
        self._next_used = new
        self._in_flight[i] = False
        self._num_in_flight -= count
        # store->load: used.idx must be globally visible before we read used_event /
        # avail.flags. Otherwise the driver may re-enable interrupts and re-read a stale
        # used.idx while we read its stale "no interrupt": both sleep, a lost wakeup.
        full_barrier()
        if self._event_idx:
            return need_event(int(self._used_event[0]), new, old)
        return not int(self._avail_flags[0]) & VRING_AVAIL_F_NO_INTERRUPT

    def _push_scalar(self, ids: list[int], lens: list[int]) -> bool:
        """:meth:`push_used` for a few chains with plain ints: the same checks in the same
        order, the same writes, the same ordering points."""
        if self._broken is not None or not ids:
            return False
        q = self._q
        if any(i >= q for i in ids):
            raise UsageError(f"an id is out of range (queue size {q})")
        in_flight, wcap = self._in_flight_mv, self._wcap_mv
        if not all(in_flight[i] for i in ids):
            raise UsageError("completing a chain that is not in flight")
        if len(set(ids)) != len(ids):
            raise UsageError("the same id is completed twice")
        if any(n > wcap[i] for i, n in zip(ids, lens, strict=True)):
            raise UsageError("a used length exceeds the chain's device-writable capacity")
        if any(n > 0xFFFFFFFF for n in lens):
            raise UsageError("a used length does not fit the ring's u32 len field")
        count = len(ids)
        old = self._next_used
        new = (old + count) & INDEX_MASK
        pack, mv, mask = _USED_STRUCT.pack_into, self._used_mv, self._mask
        for j, (i, n) in enumerate(zip(ids, lens, strict=True)):
            pack(mv, 4 + 8 * ((old + j) & mask), i, n)
            in_flight[i] = 0
        # store->store: the used elements above are stored before used.idx; x86 keeps
        # stores in order, so a driver that sees the new index sees the entries.
        self._used16[1] = new
        self._next_used = new
        self._num_in_flight -= count
        # store->load: used.idx must be globally visible before we read used_event /
        # avail.flags. Otherwise the driver may re-enable interrupts and re-read a stale
        # used.idx while we read its stale "no interrupt": both sleep, a lost wakeup.
        full_barrier()
        if self._event_idx:
            return need_event(self._avail16[2 + q], new, old)
        return not self._avail16[0] & VRING_AVAIL_F_NO_INTERRUPT

    # ------------------------------------------------------------------ notifications

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (advisory: spurious kicks stay possible).

        Without EVENT_IDX sets ``NO_NOTIFY``; with it leaves ``avail_event`` one behind
        ``last_avail`` (refreshed by :meth:`pop_batch`). No barrier: a late-visible disable
        only lets a spurious kick through.
        """
        if self._broken is not None:
            return
        self._notify_enabled = False
        if self._event_idx:
            self._avail_event[0] = (self._last_avail - 1) & INDEX_MASK
        else:
            self._used_flags_shadow |= VRING_USED_F_NO_NOTIFY
            self._used_flags[0] = self._used_flags_shadow

    def enable_notifications(self) -> bool:
        """Re-enable kicks; return ``True`` if more is already available.

        If it returns ``True`` the caller must call :meth:`pop_batch` now instead of sleeping.
        A broken ring returns ``False``.
        """
        if self._broken is not None:
            return False
        self._notify_enabled = True
        if self._event_idx:
            self._avail_event[0] = self._last_avail
        else:
            self._used_flags_shadow &= ~VRING_USED_F_NO_NOTIFY
            self._used_flags[0] = self._used_flags_shadow
        # store->load: the enable must be visible before we re-read avail.idx. Otherwise
        # the driver may publish, read our stale "don't kick", skip the kick, while we read
        # its stale avail.idx and sleep: a lost wakeup.
        full_barrier()
        return int(self._avail_idx[0]) != self._last_avail
