"""The driver (guest) side of a split ring: :class:`DriverRing`.

The driver owns (writes) the descriptor table and the available ring and only reads the used
ring; it keeps every index, flag and bookkeeping entry as a private shadow, never in shared
memory.

Invariants
----------
* Every descriptor is either on the free stack or in exactly one chain in flight;
  ``(avail_idx - last_used) mod 2**16 == in_flight <= Q``.
* The driver trusts the device no more than the device trusts it: a used id that is out of
  range, not in flight or repeated, a used length beyond the chain's writable capacity, or a
  used index that moves past the buffers in flight marks the ring broken (sticky until
  :meth:`DriverRing.reset`; the valid entries before the bad one are still returned).
* Our own mistakes (posting more buffers than there are free descriptors, bad lengths or
  addresses, posting on a broken ring) are :class:`~shared.errors.UsageError`, raised before
  anything is written.

Theory of operation
-------------------
Take free descriptors, fill them, write their heads into ``avail.ring[avail.idx % Q]``, then
publish ``avail.idx += n`` (store->store, :mod:`shared.virtio.ordering`) and ask
:meth:`DriverRing.kick_needed` whether to notify the device. Completions: read the used
entries between ``last_used`` and ``used.idx`` (load->load), validate them and push their
chains' descriptors back on the free stack.

Fast paths: posting or taking at most :data:`DRIVER_SCALAR_MAX` buffers uses plain Python ints
through ``memoryview``/``struct`` (``_add_scalar``, ``add_one``, ``_get_used_scalar``, each
next to the vectorized method it must agree with); they make the same checks in the same order
and leave the same bytes and state. ``fast_path=False`` turns them off (the vectorized paths
are the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from shared.errors import UsageError
from shared.virtio.args import (
    KERNEL_OVER,
    check_int,
    private_array,
    small_bools,
    small_ints,
    u64_array,
    use_jit,
)
from shared.virtio.layout import (
    DESC_ALIGN,
    DESC_DTYPE,
    DESC_SIZE,
    DESC_STRUCT,
    INDEX_MASK,
    NATIVE_LE,
    USED_ELEM_SIZE,
    USED_STRUCT,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    I64Array,
    RingLayout,
    U8Array,
    U16Array,
    U32Array,
    need_event,
    placement_problem,
    ring_area_sizes,
    ring_views,
)
from shared.virtio.ordering import full_barrier

if TYPE_CHECKING:
    from shared.virtio.compiled import DriverKernels

DRIVER_SCALAR_MAX: Final = 24
"""Driver-side operations (``add_batch``, ``get_used``) on at most this many buffers take the
scalar paths (crossovers ~32; see :data:`shared.virtio.device.SCALAR_MAX`)."""


def _read_only(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    arr.flags.writeable = False
    return arr


_NO_IDS: Final = _read_only(np.zeros(0, dtype=np.uint16))
_NO_LENS: Final = _read_only(np.zeros(0, dtype=np.uint32))
"""What :meth:`DriverRing.get_used` returns when there is nothing (shared, read-only: an
empty poll is the common case and should not cost two allocations)."""


class DriverRing:
    """The guest's side of one split ring, over a ``uint8`` view of the contiguous ring area
    -- or, with ``areas=(desc, avail, used)``, of memory holding the three areas at those byte
    offsets, each placed on its own (aligned 16, 2 and 4, not overlapping, inside the view;
    :class:`UsageError` otherwise). Only the three areas are ever written.

    Keeps a stack of free descriptors, the shadow ``avail.idx`` and ``last_used``, and its own
    record of every chain in flight (it never trusts the descriptor table or the used ring for
    that). :meth:`reset` (also run by the constructor) zero-fills the area and sets every index
    to ``start_index``; the device must not be running then. ``fast_path=False`` makes every
    operation take the vectorized path (the reference the scalar fast paths are tested
    against).

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
        fast_path: bool = True,
        jit: bool | None = None,
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
                check_int(areas[0], "desc offset", 0, 1 << 62),
                check_int(areas[1], "avail offset", 0, 1 << 62),
                check_int(areas[2], "used offset", 0, 1 << 62),
            )
            problem = placement_problem(q, *offsets, limit=area.shape[0])
            if problem is not None:
                raise UsageError(problem)
        if not area.flags.writeable:
            raise UsageError("the ring area must be writable")
        if area.ctypes.data % DESC_ALIGN:
            # virtio requires it, and aligned u16/u32 fields are what makes every index
            # store and load a single untorn access (:mod:`shared.virtio.ordering`).
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
        v = ring_views(*self._parts, q)
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
        self._avail_ring16 = v.avail_ring16
        self._used_ring_mv = v.used_ring_mv
        self._scalar_max = DRIVER_SCALAR_MAX if fast_path and NATIVE_LE else 0
        self._kernels: DriverKernels | None = None
        if use_jit(jit):
            from shared.virtio.compiled import DriverKernels

            self._kernels = DriverKernels(*self._parts, q)
        # Batches past a few buffers go to the kernels (see KERNEL_OVER).
        self._ops_scalar_max = (
            min(self._scalar_max, KERNEL_OVER) if self._kernels is not None else self._scalar_max
        )
        # Private bookkeeping (never read back from shared memory), each as a numpy array
        # and a memoryview over the same bytes.
        self._free, self._free_mv = private_array(q, np.uint16, "H")
        self._nfree = 0
        self._in_flight, self._in_flight_mv = private_array(q, np.bool_, "B")
        self._num_in_flight = 0
        self._multi, self._multi_mv = private_array(q, np.bool_, "B")
        self._chains: dict[int, list[int]] = {}
        self._wcap, self._wcap_mv = private_array(q, np.int64, "q")
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
        start = check_int(start_index, "start_index", 0, INDEX_MASK)
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
    def kernels(self) -> DriverKernels | None:
        """The compiled path's fused steps (:mod:`shared.virtio.fused`), or ``None`` when
        this ring runs the reference path."""
        return self._kernels

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
            a_l = small_ints(addrs, "addrs", self._ops_scalar_max, (1 << 64) - 1)
            n_l = small_ints(lens, "lens", self._ops_scalar_max, (1 << 64) - 1)
            if a_l is not None and n_l is not None and len(a_l) == len(n_l) and a_l:
                w_l = small_bools(device_writable, len(a_l))
                if w_l is not None:
                    return np.array(self._add_scalar(a_l, n_l, w_l), dtype=np.uint16)
        a = u64_array(addrs, "addrs")
        n_arr = u64_array(lens, "lens")
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
        if self._kernels is not None:
            posted = self._kernels.add(self, a, n_arr, same if same is not None else wr)
            if posted is not None:
                return posted
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
        if (
            isinstance(addr, bool)
            or not isinstance(addr, int)
            or isinstance(length, bool)
            or not isinstance(length, int)
            or not 0 <= addr < 1 << 64
            or length < 0
        ):
            raise UsageError(
                f"addr and length must be non-negative ints below 2**64, got {addr!r}, {length!r}"
            )
        # _add_scalar for n == 1, unrolled (its loops and lists cost as much as the work);
        # the ring tests check both post the same bytes, heads and state.
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
        DESC_STRUCT.pack_into(
            self._desc_mv,
            head * DESC_SIZE,
            addr,
            length,
            VRING_DESC_F_WRITE if device_writable else 0,
            0,
        )
        self._avail_ring16[self._avail_shadow & self._mask] = head
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
        pack = DESC_STRUCT.pack_into
        mv, ring, mask = self._desc_mv, self._avail_ring16, self._mask
        shadow = self._avail_shadow
        in_flight, multi, wcap = self._in_flight_mv, self._multi_mv, self._wcap_mv
        for j in range(n):
            h, length, w = heads[j], lens[j], wr[j]
            pack(mv, h * DESC_SIZE, a[j], length, VRING_DESC_F_WRITE if w else 0, 0)
            ring[(shadow + j) & mask] = h
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
            or table.shape[0] < DESC_SIZE * n
        ):
            raise UsageError(
                f"the indirect table must be a uint8 array of >= {DESC_SIZE * n} bytes"
            )
        tgpa = check_int(table_gpa, "table_gpa", 0, (1 << 64) - DESC_SIZE * n)
        entries = np.zeros(n, dtype=DESC_DTYPE)
        for i, (addr, length, writable) in enumerate(segs):
            last = i == n - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            entries[i] = (addr, length, flags, 0 if last else i + 1)
        # The table is written before the descriptors pointing at it, and those before
        # avail.idx (store->store: in order on x86, see :mod:`shared.virtio.ordering`).
        table[: DESC_SIZE * n] = entries.view(np.uint8)
        idx = [int(self._free[self._nfree - 1 - i]) for i in range(len(lead) + 1)]
        self._nfree -= len(idx)
        for i, (addr, length, writable) in enumerate(lead):
            flags = (VRING_DESC_F_WRITE if writable else 0) | VRING_DESC_F_NEXT
            self._desc[idx[i]] = (addr, length, flags, idx[i + 1])
        self._desc[idx[-1]] = (tgpa, DESC_SIZE * n, VRING_DESC_F_INDIRECT, 0)
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
            a = check_int(addr, "buffer address", 0, (1 << 64) - 1)
            n = check_int(length, "buffer length", 1, 0xFFFFFFFF)
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

    def used_pending(self) -> int:
        """How many used entries the device published that were not taken yet, as its
        ``used.idx`` says (0 once broken): a cheap poll like :meth:`has_used`. The count is
        the device's word, unchecked -- :meth:`get_used` validates the entries when it
        takes them -- so a caller bounds it by what it has in flight."""
        if self._broken is not None:
            return 0
        return (int(self._used_idx[0]) - self._last_used) & INDEX_MASK

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
        limit = self._q if max_n is None else check_int(max_n, "max_n", 0, 1 << 62)
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
        if k > self._ops_scalar_max and self._kernels is not None:
            compiled = self._kernels.get_used(self, k)
            if compiled is not None:
                return compiled
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
        unpack = USED_STRUCT.unpack_from
        mv, mask, last = self._used_ring_mv, self._mask, self._last_used
        entries = [unpack(mv, USED_ELEM_SIZE * ((last + j) & mask)) for j in range(k)]
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
