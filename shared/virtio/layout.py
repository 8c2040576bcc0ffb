"""The split ring's memory layout as data: the one place where ring offsets, sizes and
alignment are computed, plus :func:`need_event`.

Layout (virtio 1.x §2.7, "split virtqueues")
---------------------------------------------
Three areas, all little-endian, indices are u16 and wrap at ``2**16``::

    descriptor table  align 16  Q x {addr u64, len u32, flags u16, next u16}     16*Q bytes
    available ring    align 2   flags u16, idx u16, ring[Q] u16, used_event u16  6 + 2*Q
    used ring         align 4   flags u16, idx u16, ring[Q] {id u32, len u32},
                                avail_event u16                                  6 + 8*Q

``Q`` (the queue size) is a power of two in ``1..32768`` (:func:`valid_queue_size`).
:class:`RingLayout` places the three areas contiguously (descriptors at 0, available ring right
after, used ring aligned up to 4). virtio 1.x also lets a driver place each area on its own, in
any order: the driver ring takes three offsets into its view and the device ring three
guest-physical addresses, and the PCI model checks the queue registers before enabling a
queue; all of them ask :func:`placement_problem` (each area aligned, none overlapping another,
none running past a limit) and view the fields through :func:`ring_views`.

Invariants
----------
* Sizes come from :func:`ring_area_sizes` and offsets inside an area from the ``*_AT``
  constants and :func:`ring_views`; nothing else in the package does ring arithmetic beyond
  "entry ``i`` of a view".
* Each area starts aligned (16, 2, 4), so every u16 index and flag is 2-aligned and every
  access to it through :func:`ring_views` -- numpy or native ``memoryview`` -- is one untorn
  aligned move (see :mod:`shared.virtio.ordering`).
* The native ``memoryview`` casts are the ring's little-endian layout only on a little-endian
  host (:data:`NATIVE_LE`); elsewhere only numpy views may be used.
"""

from __future__ import annotations

import itertools
import struct
import sys
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from shared.errors import UsageError

U8Array: TypeAlias = npt.NDArray[np.uint8]
U16Array: TypeAlias = npt.NDArray[np.uint16]
U32Array: TypeAlias = npt.NDArray[np.uint32]
U64Array: TypeAlias = npt.NDArray[np.uint64]
I64Array: TypeAlias = npt.NDArray[np.int64]
BoolArray: TypeAlias = npt.NDArray[np.bool_]

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

INDEX_MASK: Final = 0xFFFF
"""Ring indices are u16 and wrap at ``2**16``."""

DESC_DTYPE: Final = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
"""One descriptor (16 bytes)."""
USED_ELEM_DTYPE: Final = np.dtype([("id", "<u4"), ("len", "<u4")])
"""One used-ring element (8 bytes)."""
DESC_STRUCT: Final = struct.Struct("<QIHH")
"""One descriptor for the scalar paths: ``(addr, len, flags, next)``."""
USED_STRUCT: Final = struct.Struct("<II")
"""One used-ring element for the scalar paths: ``(id, len)``."""
DESC_SIZE: Final = DESC_DTYPE.itemsize
USED_ELEM_SIZE: Final = USED_ELEM_DTYPE.itemsize
_LE16: Final = np.dtype("<u2")

# Both rings start with the same header; the byte offsets of their fields in their area:
FLAGS_AT: Final = 0
IDX_AT: Final = 2
RING_AT: Final = 4

NATIVE_LE: Final = sys.byteorder == "little"
"""The scalar paths read and write u16 indices through native ``memoryview`` casts, which
are the ring's little-endian layout only on a little-endian host (x86-64, which the
memory-ordering model already assumes); elsewhere only the numpy paths run."""


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


def _used_event_at(qsize: int) -> int:
    """Byte offset of ``used_event`` in the available ring (after ``ring[Q]``)."""
    return RING_AT + _LE16.itemsize * qsize


def _avail_event_at(qsize: int) -> int:
    """Byte offset of ``avail_event`` in the used ring (after ``ring[Q]``)."""
    return RING_AT + USED_ELEM_SIZE * qsize


def ring_area_sizes(qsize: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, the available ring and the used ring of a split ring of
    ``qsize`` entries (virtio 1.x 2.7: ``16*Q``, ``6 + 2*Q``, ``6 + 8*Q``)."""
    return (
        DESC_SIZE * qsize,
        _used_event_at(qsize) + _LE16.itemsize,
        _avail_event_at(qsize) + _LE16.itemsize,
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
        return ring_area_sizes(self.qsize)[0]

    # -- available ring: flags, idx, ring[Q], used_event
    @property
    def avail_offset(self) -> int:
        return self.desc_offset + self.desc_size

    @property
    def avail_size(self) -> int:
        return ring_area_sizes(self.qsize)[1]

    @property
    def avail_flags_offset(self) -> int:
        return self.avail_offset + FLAGS_AT

    @property
    def avail_idx_offset(self) -> int:
        return self.avail_offset + IDX_AT

    @property
    def avail_ring_offset(self) -> int:
        return self.avail_offset + RING_AT

    @property
    def used_event_offset(self) -> int:
        return self.avail_offset + _used_event_at(self.qsize)

    # -- used ring: flags, idx, ring[Q], avail_event
    @property
    def used_offset(self) -> int:
        return _align_up(self.avail_offset + self.avail_size, USED_ALIGN)

    @property
    def used_size(self) -> int:
        return ring_area_sizes(self.qsize)[2]

    @property
    def used_flags_offset(self) -> int:
        return self.used_offset + FLAGS_AT

    @property
    def used_idx_offset(self) -> int:
        return self.used_offset + IDX_AT

    @property
    def used_ring_offset(self) -> int:
        return self.used_offset + RING_AT

    @property
    def avail_event_offset(self) -> int:
        return self.used_offset + _avail_event_at(self.qsize)

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


def placement_problem(
    qsize: int,
    desc: int,
    avail: int,
    used: int,
    limit: int | None = None,
    *,
    allow_overlap: bool = False,
) -> str | None:
    """Why a split ring of ``qsize`` entries cannot have its descriptor table, available ring
    and used ring at ``desc``, ``avail`` and ``used``, or ``None`` if it can.

    virtio 1.x places the three areas independently, in any order, each aligned on its own
    (16, 2 and 4 bytes); they must not overlap (unless ``allow_overlap``: the PCI model leaves
    that to the device), and with ``limit`` each must end at or before it. The one place this
    is worked out: the driver's separately placed areas (byte offsets in its view), the
    device's attach (guest-physical addresses) and the PCI model's queue enable all ask here.
    """
    if desc % DESC_ALIGN or avail % AVAIL_ALIGN or used % USED_ALIGN:
        return (
            f"ring areas misaligned (desc {desc:#x} needs {DESC_ALIGN}, avail {avail:#x} needs "
            f"{AVAIL_ALIGN}, used {used:#x} needs {USED_ALIGN})"
        )
    spans = sorted(
        zip((desc, avail, used), ring_area_sizes(qsize), ("desc", "avail", "used"), strict=True)
    )
    if not allow_overlap:
        for (a, a_size, a_name), (b, _, b_name) in itertools.pairwise(spans):
            if a + a_size > b:
                return (
                    f"ring areas overlap ({a_name} [{a:#x}, {a + a_size:#x}) and {b_name} at "
                    f"{b:#x})"
                )
    if limit is not None:
        for start, size, name in spans:
            if start + size > limit:
                return f"{name} ring area [{start:#x}, {start + size:#x}) runs past {limit:#x}"
    return None


class RingViews(NamedTuple):
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
    desc_mv: memoryview  # bytes: descriptor i at DESC_SIZE * i, through DESC_STRUCT
    avail_hdr16: memoryview  # u16: avail.flags, avail.idx
    avail_ring16: memoryview  # u16: avail.ring[i]
    used_event16: memoryview  # u16: used_event
    used_hdr16: memoryview  # u16: used.flags, used.idx
    used_ring_mv: memoryview  # bytes: used.ring[i] at USED_ELEM_SIZE * i, through USED_STRUCT


def _field(area: U8Array, offset: int, count: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """``count`` items of ``dtype`` at byte ``offset`` of ``area`` (a view, never a copy)."""
    return area[offset : offset + count * dtype.itemsize].view(dtype)


def ring_views(desc: U8Array, avail: U8Array, used: U8Array, qsize: int) -> RingViews:
    """The fields of a split ring of ``qsize`` entries over its three areas (each exactly
    :func:`ring_area_sizes` bytes, wherever it lies). Each area starts aligned, so every u16
    is 2-aligned and every index access one untorn move."""
    q = qsize
    ue, ae = _used_event_at(q), _avail_event_at(q)
    a_mv, u_mv = avail.data, used.data
    return RingViews(
        desc=desc.view(DESC_DTYPE),
        avail_flags=_field(avail, FLAGS_AT, 1, _LE16),
        avail_idx=_field(avail, IDX_AT, 1, _LE16),
        avail_ring=_field(avail, RING_AT, q, _LE16),
        used_event=_field(avail, ue, 1, _LE16),
        used_flags=_field(used, FLAGS_AT, 1, _LE16),
        used_idx=_field(used, IDX_AT, 1, _LE16),
        used_ring=_field(used, RING_AT, q, USED_ELEM_DTYPE),
        avail_event=_field(used, ae, 1, _LE16),
        desc_mv=desc.data,
        avail_hdr16=a_mv[FLAGS_AT:RING_AT].cast("H"),
        avail_ring16=a_mv[RING_AT:ue].cast("H"),
        used_event16=a_mv[ue : ue + _LE16.itemsize].cast("H"),
        used_hdr16=u_mv[FLAGS_AT:RING_AT].cast("H"),
        used_ring_mv=u_mv[RING_AT:ae],
    )


class KernelViews(NamedTuple):
    """The three areas as the flat native-endian arrays the compiled kernels index: the
    descriptor table as u64/u32/u16 (descriptor ``i``: ``desc64[2i]`` addr,
    ``desc32[4i+2]`` len, ``desc16[8i+6]`` flags, ``desc16[8i+7]`` next), the available
    ring as u16 (``[0]`` flags, ``[1]`` idx, ``[2+i]`` ring, ``[2+Q]`` used_event), the used
    ring as u16 (``[0]`` flags, ``[1]`` idx, ``[2+4Q]`` avail_event) and its elements as u32
    pairs (``used32[2i]`` id, ``used32[2i+1]`` len)."""

    desc64: npt.NDArray[np.uint64]
    desc32: npt.NDArray[np.uint32]
    desc16: U16Array
    avail16: U16Array
    used16: U16Array
    used32: npt.NDArray[np.uint32]


def kernel_views(desc: U8Array, avail: U8Array, used: U8Array, qsize: int) -> KernelViews:
    """:class:`KernelViews` over the three areas of a ring of ``qsize`` entries (native
    byte order: the kernels run only where that is little-endian)."""
    ae = _avail_event_at(qsize)
    return KernelViews(
        desc64=desc.view(np.uint64),
        desc32=desc.view(np.uint32),
        desc16=desc.view(np.uint16),
        avail16=avail.view(np.uint16),
        used16=used.view(np.uint16),
        used32=used[RING_AT:ae].view(np.uint32),
    )


def need_event(event: int, new: int, old: int) -> bool:
    """Virtio's ``vring_need_event``: did moving an index from ``old`` to ``new`` pass ``event``?

    ``(u16)(new - event - 1) < (u16)(new - old)``: true iff ``event`` lies in ``[old, new)``
    modulo ``2**16``. ``new == old`` never notifies.
    """
    return ((new - event - 1) & INDEX_MASK) < ((new - old) & INDEX_MASK)
