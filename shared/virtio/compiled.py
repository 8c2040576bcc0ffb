"""The kernel path of each ring side: what a :class:`~shared.virtio.DeviceRing` or
:class:`~shared.virtio.DriverRing` built with ``jit=True`` hands to
:mod:`shared.virtio.kernels`, and how a kernel's result goes back into the ring's state.

Theory of operation
-------------------
The reference classes keep their private state (indices, counts, the in-flight and
capacity arrays, the free stack) and stay the only statement of the rules. For a batch
larger than their scalar fast path they first offer the work to a kernel through the
objects here; a kernel either does all of it -- and these objects advance the ring's
counters exactly as the reference would have -- or declines having changed nothing, and
the reference does the call from scratch. Small batches stay on the scalar fast path,
whose per-call cost is below a kernel call's (a kernel call with a dozen array arguments
costs ~2 µs to enter).

Importing this module imports numba (through :mod:`shared.virtio.kernels`): only rings
built with ``jit=True`` do, so processes that never run the data path stay small.

The ring classes are this module's only callers and it reads and writes their private
attributes: it is their other half, kept apart so that numba stays optional.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.virtio import fused as f
from shared.virtio import fused_device as fd
from shared.virtio import kernels as k
from shared.virtio.args import STAGE_DONE
from shared.virtio.batch import Batch, empty_batch, simple_batch
from shared.virtio.layout import (
    INDEX_MASK,
    VRING_USED_F_NO_NOTIFY,
    I64Array,
    KernelViews,
    U8Array,
    U16Array,
    U32Array,
    kernel_views,
)
from shared.virtio.pointers import PointerTable
from shared.virtio.slots import SlotTable

if TYPE_CHECKING:
    from shared.memory import GuestMemoryMap
    from shared.virtio.device import DeviceRing
    from shared.virtio.driver import DriverRing
    from shared.virtio.layout import I64Array, U64Array


_loaded = False
SMALL_ROWS = 4096
"""Payload kernels take batches of rows up to this many bytes, where per-row work in Python
and numpy dominates; bigger rows are memcpy-bound, and numpy's copies are already that."""


def _load() -> None:
    """Load (or compile) every kernel now, at the first ring's set-up, rather than at its
    first batch: numba loads a kernel from the cache on its first call (~0.1 s), which
    would otherwise land inside the first measured round trip."""
    global _loaded
    if not _loaded:
        _loaded = True
        from shared.virtio.warm import exercise

        exercise()


class DeviceKernels:
    """Views of a device ring's areas and the scratch arrays its kernels write into."""

    def __init__(self, desc: U8Array, avail: U8Array, used: U8Array, qsize: int) -> None:
        _load()
        self.v = kernel_views(desc, avail, used, qsize)
        self.mark = np.zeros(qsize, dtype=np.uint8)
        self.heads = np.empty(qsize, dtype=np.int64)
        self.addrs = np.empty(qsize, dtype=np.uint64)
        self.lens = np.empty(qsize, dtype=np.uint32)
        self.wflags = np.empty(qsize, dtype=np.uint16)
        self.copied = np.empty(qsize, dtype=np.int64)
        self.zeros = np.zeros(qsize, dtype=np.int64)
        self.st = np.zeros(fd.DEVICE_ST, dtype=np.int64)
        self.st_forward = np.zeros(fd.FORWARD_ST, dtype=np.int64)
        # (item stores through a memoryview: ~half the cost of numpy's, per pass)
        self._st_mv, self._st_forward_mv = self.st.data, self.st_forward.data
        self.out = np.zeros(7, dtype=np.int64)
        self._forward: tuple[SlotTable, DeviceKernels, PointerTable | None] | None = None
        self._ram: tuple[SlotTable, U8Array, int] | None = None
        # the sink step's pointer table, for this slot table and sink array
        self._bound: tuple[SlotTable, U8Array, PointerTable] | None = None

    def _ram_slot(self, ring: DeviceRing) -> tuple[SlotTable, U8Array, int] | None:
        """The slot table and its largest slot (guest RAM): its view and gpa."""
        table = ring._slots.table()
        if self._ram is None or self._ram[0] is not table:
            if not table.sizes:
                return None
            s = max(range(len(table.sizes)), key=table.sizes.__getitem__)
            self._ram = (table, ring._mem.translate(table.gpas[s], table.sizes[s]), table.gpas[s])
        return self._ram

    def _finish_pass(self, ring: DeviceRing) -> list[int] | None:
        """A fused device pass's ``out`` as a list, its effect committed to ``ring``
        (``out[1]`` chains taken); ``None`` if it declined (nothing changed)."""
        out: list[int] = self.out.tolist()
        if out[0] != STAGE_DONE:
            return None
        _commit_pass(ring, out[1])
        return out

    def consume(
        self, ring: DeviceRing, sink: U8Array, first_seq: int, limit: int, max_width: int
    ) -> tuple[int, int, int, bool, bool, int] | None:
        """:func:`~shared.virtio.fused_device.device_consume` into ``sink``, for frames up
        to ``max_width`` bytes: ``(taken, bytes, seq_errors, interrupt, more, stride)`` with
        the ring's state committed, or ``None``: declined, nothing changed (the caller runs
        its reference step). With ``stride`` > 0 the frames are rows of ``sink`` (their
        lengths in :meth:`taken_lengths`)."""
        ram = self._ram_slot(ring)
        if ram is None or ring._broken is not None:
            return None
        table, mem, gpa = ram
        bound = self._bound
        if bound is None or bound[0] is not table or bound[1] is not sink:
            arrays = {
                "in_flight": ring._in_flight,
                "wcap": ring._wcap,
                "mark": self.mark,
                "slot_gpa": table.starts,
                "slot_last": table.lasts,
                "slot_w": table.writable,
                "mem": mem,
                "sink": sink,
                "heads": self.heads,
                "addrs": self.addrs,
                "lens": self.lens,
                "wflags": self.wflags,
                "zeros": self.zeros,
            }
            self._bound = bound = (table, sink, _table(fd.DEVICE_TABLE, arrays, self.v))
        st = self._st_mv
        _device_state(st, ring, ring._max_len)
        st[7] = limit
        st[8] = first_seq
        st[9] = max_width
        st[10] = gpa
        fd.device_consume_t(bound[2].table, self.st, self.out)
        out = self._finish_pass(ring)
        if out is None:
            return None
        return out[1], out[2], out[3], bool(out[4]), bool(out[5]), out[6]

    def taken_lengths(self, k: int) -> I64Array:
        """The bytes each of the ``k`` chains the last :meth:`consume` took carried (0 for
        a device-writable buffer, which has nothing to read), as a new array -- what
        :meth:`~shared.virtio.DeviceRing.read_payloads` returns as the lengths copied."""
        lens: I64Array = np.where(self.wflags[:k] != 0, 0, self.lens[:k]).astype(np.int64)
        return lens

    def forward(
        self, ring: DeviceRing, rx: DeviceRing, limit: int, width_cap: int
    ) -> tuple[int, int, bool, bool, bool, int] | None:
        """:func:`~shared.virtio.fused_device.device_forward` from this (TX) ring into ``rx``:
        ``(taken, bytes, rx_interrupt, tx_interrupt, more, width)`` with both rings' state
        committed, or ``None``: declined, nothing changed. TX buffers longer than
        ``width_cap`` are declined (the reference truncates them)."""
        rk = rx._kernels
        ram = self._ram_slot(ring)
        if ram is None or rk is None or ring._broken is not None or rx._broken is not None:
            return None
        table, mem, gpa = ram
        bound = self._forward
        if bound is None or bound[0] is not table or bound[1] is not rk:
            # (what cannot change while the table and both rings stay: checked once here)
            usable = (
                rx._mem is ring._mem
                and rx._q == ring._q
                and rx._event_idx == ring._event_idx
                and bool(mem.flags.writeable)
            )
            t, r = self.v, rk.v
            arrays = {
                "tx_avail16": t.avail16,
                "tx_desc64": t.desc64,
                "tx_desc32": t.desc32,
                "tx_desc16": t.desc16,
                "tx_used16": t.used16,
                "tx_used32": t.used32,
                "tx_in_flight": ring._in_flight,
                "tx_wcap": ring._wcap,
                "rx_avail16": r.avail16,
                "rx_desc64": r.desc64,
                "rx_desc32": r.desc32,
                "rx_desc16": r.desc16,
                "rx_used16": r.used16,
                "rx_used32": r.used32,
                "rx_in_flight": rx._in_flight,
                "rx_wcap": rx._wcap,
                "mark": self.mark,
                "slot_gpa": table.starts,
                "slot_last": table.lasts,
                "slot_w": table.writable,
                "mem": mem,
                "tx_heads": self.heads,
                "tx_addrs": self.addrs,
                "tx_lens": self.lens,
                "tx_wflags": self.wflags,
                "rx_heads": rk.heads,
                "rx_addrs": rk.addrs,
                "rx_lens": rk.lens,
                "rx_wflags": rk.wflags,
                "copied": self.copied,
                "zeros": self.zeros,
            }
            table_of = _table(fd.FORWARD_TABLE, arrays, self.v) if usable else None
            self._forward = bound = (table, rk, table_of)
        if bound[2] is None:
            return None  # rings of different shapes or memories, or read-only RAM
        st = self._st_forward_mv
        _device_state(st, ring, min(ring._max_len, width_cap))
        st[7] = rx._last_avail
        st[8] = rx._num_in_flight
        st[9] = rx._next_used
        st[10] = rx._notify_enabled
        st[11] = rx._max_len
        st[12] = limit
        st[13] = gpa
        fd.device_forward_t(bound[2].table, self.st_forward, self.out)
        out = self._finish_pass(ring)
        if out is None:
            return None
        taken = out[1]
        if taken:
            rx._last_avail = (rx._last_avail + taken) & INDEX_MASK
            rx._next_used = (rx._next_used + taken) & INDEX_MASK
        return taken, out[2], bool(out[3]), bool(out[4]), bool(out[5]), out[6]

    def pop(self, ring: DeviceRing, count: int) -> Batch | None:
        """Take the next ``count`` chains (the caller read ``avail.idx`` and checked it) if
        they are all single valid descriptors; ``None``: declined, nothing changed."""
        table = ring._slots.table()
        v = self.v
        got = k.device_pop_simple(
            v.avail16,
            v.desc64,
            v.desc32,
            v.desc16,
            ring._in_flight,
            ring._wcap,
            self.mark,
            table.starts,
            table.lasts,
            table.writable,
            ring._q,
            ring._last_avail,
            count,
            ring._max_len,
            self.heads,
            self.addrs,
            self.lens,
            self.wflags,
        )
        if got < 0:
            return None
        if got == 0:
            return empty_batch()
        batch = simple_batch(self.heads[:got], self.addrs[:got], self.lens[:got], self.wflags[:got])
        ring._took(got)
        return batch

    def push(self, ring: DeviceRing, ids: I64Array, lens: I64Array) -> bool | None:
        """Complete ``ids``; whether to interrupt, or ``None``: declined (an id not in flight
        or repeated, a length too long: the reference raises the error)."""
        v = self.v
        r = k.device_push_used(
            v.used16,
            v.used32,
            v.avail16,
            ring._in_flight,
            ring._wcap,
            self.mark,
            ring._q,
            ring._next_used,
            ring._event_idx,
            ids,
            lens,
        )
        if r < 0:
            return None
        count = int(ids.shape[0])
        ring._next_used = (ring._next_used + count) & INDEX_MASK
        ring._num_in_flight -= count
        return bool(r)

    def copy(
        self, src_ring: DeviceRing, batch: Batch, dst_ring: DeviceRing, dst_batch: Batch, width: int
    ) -> U32Array | None:
        """:meth:`~shared.virtio.DeviceRing.copy_payloads` for single-descriptor batches
        whose buffers each lie in the slot of their side's first buffer; ``None``:
        declined."""
        n = len(dst_batch)
        if width > SMALL_ROWS:
            return None
        s_addrs, d_addrs = batch.addrs, dst_batch.addrs
        src = _slot_of(src_ring._mem, src_ring._slots.table(), int(s_addrs[0]))
        dst = _slot_of(dst_ring._mem, dst_ring._slots.table(), int(d_addrs[0]))
        if src is None or dst is None or not dst[0].flags.writeable:
            return None
        same = src_ring._mem is dst_ring._mem and src[1] == dst[1]
        got = k.copy_simple(
            src[0],
            np.uint64(src[1]),
            dst[0],
            np.uint64(dst[1]),
            same,
            s_addrs,
            batch.lens,
            batch.flags,
            d_addrs,
            dst_batch.lens,
            dst_batch.flags,
            n,
            width,
            self.copied,
        )
        if got < 0:
            return None
        return self.copied[:n].astype(np.uint32)

    def read(
        self, ring: DeviceRing, batch: Batch, width: int, out: U8Array | None
    ) -> tuple[U8Array, I64Array] | None:
        """:meth:`~shared.virtio.DeviceRing.read_payloads` for a single-descriptor batch
        whose buffers lie in the slot of its first one; ``None``: declined."""
        n = len(batch)
        if width > SMALL_ROWS:
            return None
        addrs = batch.addrs
        slot = _slot_of(ring._mem, ring._slots.table(), int(addrs[0]))
        if slot is None:
            return None
        data = np.empty((n, width), dtype=np.uint8) if out is None else out[:n, :width]
        copied = np.empty(n, dtype=np.int64)
        got = k.read_simple(
            slot[0], np.uint64(slot[1]), addrs, batch.lens, batch.flags, n, width, data, copied
        )
        if got < 0:
            return None
        return data, copied


def _device_state(st: memoryview, ring: DeviceRing, max_len: int) -> None:
    """A device pass's ``st[0:7]``: the ring's scalars (see the fused device kernels)."""
    st[0] = ring._q
    st[1] = ring._last_avail
    st[2] = ring._num_in_flight
    st[3] = ring._next_used
    st[4] = ring._event_idx
    st[5] = ring._used_flags_shadow
    st[6] = max_len


def _commit_pass(ring: DeviceRing, taken: int) -> None:
    """A device pass's effect on ``ring``'s scalars: ``taken`` chains taken and completed
    with kicks left off, or (none) kicks back on."""
    if taken:
        ring._last_avail = (ring._last_avail + taken) & INDEX_MASK
        ring._next_used = (ring._next_used + taken) & INDEX_MASK
        ring._notify_enabled = False
        if not ring._event_idx:
            ring._used_flags_shadow |= VRING_USED_F_NO_NOTIFY
    else:
        ring._notify_enabled = True
        if not ring._event_idx:
            ring._used_flags_shadow &= ~VRING_USED_F_NO_NOTIFY


def _table(
    layout: tuple[tuple[str, Any, bool], ...], arrays: dict[str, Any], views: KernelViews
) -> PointerTable:
    """A fused step's pointer table: ``layout``'s arrays, from ``arrays`` or the ring's
    ``views``, in order."""
    chosen = [arrays[name] if name in arrays else getattr(views, name) for name, _, _ in layout]
    return PointerTable(chosen, [dt for _, dt, _ in layout], [w for _, _, w in layout])


def _slot_of(mem: GuestMemoryMap, table: SlotTable, addr: int) -> tuple[U8Array, int] | None:
    """The whole memory slot holding ``addr`` (a view) and its gpa, or None."""
    s = bisect.bisect_right(table.gpas, addr) - 1
    if s < 0 or addr > table.last_list[s]:
        return None
    return mem.translate(table.gpas[s], table.sizes[s]), table.gpas[s]


class DriverKernels:
    """Views of a driver ring's areas and the scratch arrays its kernels write into."""

    def __init__(self, desc: U8Array, avail: U8Array, used: U8Array, qsize: int) -> None:
        _load()
        self.v = kernel_views(desc, avail, used, qsize)
        self.mark = np.zeros(qsize, dtype=np.uint8)
        self.heads = np.empty(qsize, dtype=np.int64)
        self.ids = np.empty(qsize, dtype=np.int64)
        self.lens = np.empty(qsize, dtype=np.int64)
        self.all_writable = np.ones(qsize, dtype=np.bool_)
        self.none_writable = np.zeros(qsize, dtype=np.bool_)
        self.addrs = np.empty(qsize, dtype=np.uint64)
        self.ulens = np.empty(qsize, dtype=np.uint64)
        self.wflags = np.empty(qsize, dtype=np.bool_)
        self.slots = np.empty(qsize, dtype=np.int64)
        self.st = np.zeros(f.DRIVER_ST, dtype=np.int64)
        self._st_mv = self.st.data
        self.out = np.zeros(7, dtype=np.int64)
        # the fused steps' pointer table, for one pool (its data, free stack, slot map)
        self._bound: tuple[U8Array, I64Array, I64Array, PointerTable] | None = None

    def _table(
        self, ring: DriverRing, data: U8Array, stack: I64Array, slot_of: I64Array
    ) -> I64Array:
        bound = self._bound
        if (
            bound is None
            or bound[0] is not data
            or bound[1] is not stack
            or bound[2] is not slot_of
        ):
            arrays = {
                "free": ring._free,
                "in_flight": ring._in_flight,
                "multi": ring._multi,
                "wcap": ring._wcap,
                "mark": self.mark,
                "data": data,
                "pool_stack": stack,
                "slot_of": slot_of,
                "scratch_i": self.ids,
                "scratch_l": self.heads,
                "scratch_a": self.addrs,
                "scratch_u": self.ulens,
                "scratch_w": self.wflags,
                "scratch_s": self.slots,
            }
            self._bound = bound = (data, stack, slot_of, _table(f.DRIVER_TABLE, arrays, self.v))
        return bound[3].table

    def _state(self, ring: DriverRing, pool_n: int, size: int, base: int) -> I64Array:
        # (item stores through a memoryview: ~half the cost of numpy's, per step)
        st = self._st_mv
        st[0] = ring._q
        st[1] = ring._nfree
        st[2] = ring._num_in_flight
        st[3] = ring._avail_shadow
        st[4] = ring._last_used
        st[5] = ring._kick_old
        st[6] = ring._unkicked
        st[7] = ring._event_idx
        st[8] = ring._irq_enabled
        st[9] = pool_n
        st[10] = size
        st[11] = base
        return self.st

    def _commit(self, ring: DriverRing) -> list[int]:
        """Commit a fused driver step's ``out`` (stage, taken, posted, kick, ...) to
        ``ring``; ``out`` as a list. ``taken`` and ``posted`` count only what the kernel
        completed, whatever stage it stopped at; every batch it published had its kick
        decision made."""
        out: list[int] = self.out.tolist()
        taken, posted = out[1], out[2]
        if taken:
            ring._nfree += taken
            ring._num_in_flight -= taken
            ring._last_used = (ring._last_used + taken) & INDEX_MASK
        if posted:
            ring._nfree -= posted
            ring._num_in_flight += posted
            new = (ring._avail_shadow + posted) & INDEX_MASK
            ring._avail_shadow = ring._kick_old = new
            ring._unkicked = 0
        return out

    def send_frames(
        self,
        ring: DriverRing,
        data: U8Array,
        stack: I64Array,
        pool_n: int,
        slot_of: I64Array,
        base: int,
        first_seq: int,
        want: int,
        limit: int,
    ) -> tuple[int, int, int, bool, int]:
        """:func:`~shared.virtio.fused.driver_send_frames`, the ring's state committed:
        ``(stage, reclaimed, posted, kick, batches)``; the caller finishes a step that
        stopped before ``STAGE_DONE`` on the reference path."""
        f.driver_send_frames_t(
            self._table(ring, data, stack, slot_of),
            self._state(ring, pool_n, data.shape[1], base),
            first_seq,
            want,
            limit,
            self.out,
        )
        stage, taken, posted, kick, batches = self._commit(ring)[:5]
        return stage, taken, posted, bool(kick), batches

    def receive_frames(
        self,
        ring: DriverRing,
        data: U8Array,
        stack: I64Array,
        pool_n: int,
        slot_of: I64Array,
        base: int,
        first_seq: int,
    ) -> tuple[int, int, int, bool, int, int, int]:
        """:func:`~shared.virtio.fused.driver_receive_frames`, the ring's state committed:
        ``(stage, received, posted, kick, fault, fault_index, fault_value)``."""
        f.driver_receive_frames_t(
            self._table(ring, data, stack, slot_of),
            self._state(ring, pool_n, data.shape[1], base),
            first_seq,
            self.out,
        )
        stage, taken, posted, kick, fault, index, value = self._commit(ring)
        return stage, taken, posted, bool(kick), fault, index, value

    def add(
        self, ring: DriverRing, addrs: U64Array, lens: U64Array, writable: bool | np.ndarray
    ) -> U16Array | None:
        """Post one single-descriptor chain per buffer and publish; the heads, or ``None``:
        declined (the reference raises the error)."""
        n = int(addrs.shape[0])
        if isinstance(writable, bool):
            writable = (self.all_writable if writable else self.none_writable)[:n]
        v = self.v
        got = k.driver_add_simple(
            v.desc64,
            v.desc32,
            v.desc16,
            v.avail16,
            ring._free,
            ring._nfree,
            ring._in_flight,
            ring._multi,
            ring._wcap,
            ring._q,
            ring._avail_shadow,
            addrs,
            lens,
            writable,
            self.heads,
        )
        if got < 0:
            return None
        ring._nfree -= n
        ring._num_in_flight += n
        # What _publish does, but the kernel already stored avail.idx (release).
        ring._avail_shadow = (ring._avail_shadow + n) & INDEX_MASK
        ring._unkicked += n
        heads: U16Array = self.heads[:n].astype(np.uint16)
        return heads

    def get_used(self, ring: DriverRing, count: int) -> tuple[U16Array, U32Array] | None:
        """Take the next ``count`` used entries (the caller read ``used.idx`` and checked
        it) if each is a valid single-descriptor chain; ``None``: declined."""
        got = k.driver_get_used(
            self.v.used32,
            ring._in_flight,
            ring._multi,
            ring._wcap,
            self.mark,
            ring._free,
            ring._nfree,
            ring._q,
            ring._last_used,
            count,
            self.ids,
            self.lens,
        )
        if got < 0:
            return None
        ring._nfree += got
        ring._num_in_flight -= got
        ring._after_get_used(got)
        return self.ids[:got].astype(np.uint16), self.lens[:got].astype(np.uint32)
