"""Copying payloads between the guest buffers of a :class:`~shared.virtio.Batch` and the
device's own arrays (or another ring's buffers).

The :class:`~shared.virtio.DeviceRing` payload methods check that the batch is still in
flight, then call these functions with the ring's memory map; a
:class:`~shared.errors.MemoryAccessError` raised here means a buffer is no longer where it was
validated (the memory map changed under in-flight buffers), and the ring that owns the buffer
breaks. Our own mistakes (bad widths, lengths, arrays) are :class:`~shared.errors.UsageError`,
raised before anything is copied.

Theory of operation
-------------------
Copies go between guest buffers and a caller-sized 2-D numpy array, row ``i`` for chain
``i``; never per byte:

* a *simple* batch (single-descriptor chains) of more than a few rows is copied with one
  gather or scatter per (memory slot, length) group (:func:`groups`) through a strided view
  of the slot whose rows are every window of that length (:func:`windows`);
* chains, and the few rows of a small batch, take one slice copy per segment (the scalar
  fast path of the same copy);
* :func:`copy_payloads` copies one ring's readable buffers straight into another ring's
  writable ones: one slice copy per overlapping pair of segments, no staging array.

Invariants: readable bytes come only from device-readable segments, in chain order, and go
only into device-writable segments, in chain order; a length is never more than the
chain's capacity (validated before any byte moves), so a row is never written past what the
guest offered. Reads of a row beyond what was copied are zero.
"""

from __future__ import annotations

import bisect

import numpy as np
import numpy.typing as npt

from shared.errors import MemoryAccessError, UsageError
from shared.memory import GuestMemoryMap
from shared.virtio.args import I64_MAX, index_array, small_ints
from shared.virtio.batch import Batch
from shared.virtio.layout import VRING_DESC_F_WRITE, I64Array, U8Array, U32Array, U64Array
from shared.virtio.slots import SlotCache, locate


class CopyFault(Exception):
    """A buffer of :func:`copy_payloads` left guest memory: ``error`` says why and
    ``to_destination`` whose buffer it was (the ring to break)."""

    def __init__(self, error: MemoryAccessError, *, to_destination: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.to_destination = to_destination


def windows(slot: U8Array, take: int) -> U8Array:
    """Every ``take``-byte window of ``slot`` as the rows of one strided view -- what
    ``sliding_window_view`` makes, without its per-call cost; writable iff ``slot`` is."""
    view: U8Array = np.ndarray(
        (slot.shape[0] - take + 1, take), dtype=np.uint8, buffer=slot, strides=(1, 1)
    )
    return view


def groups(
    mem: GuestMemoryMap,
    slots: SlotCache,
    addrs: U64Array,
    take: I64Array,
    rows: npt.NDArray[np.intp],
) -> list[tuple[U8Array, I64Array, I64Array, int]]:
    """Split ``rows`` (single-segment chains) by memory slot and copy length.

    Yields ``(slot_view, rows, offsets_in_slot, length)``: every row of a group can be
    copied with one fancy-indexed assignment through a sliding-window view of the slot.
    Raises :class:`MemoryAccessError` if a buffer is no longer in one slot.
    """
    if rows.shape[0] == 0:
        return []
    table = slots.table()
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
            slot = mem.translate(gpa, size)
            return [(slot, rows.astype(np.int64), offs, length)]
    si = locate(a, table)
    out: list[tuple[U8Array, I64Array, I64Array, int]] = []
    if bool((si < 0).any()):
        raise MemoryAccessError("a buffer is no longer in guest memory")
    if int(si.min()) == int(si.max()) and int(t.min()) == int(t.max()):
        keys = [(int(si[0]), int(t[0]))]  # the common case: one slot, one length
    else:  # np.unique(axis=0) sorts rows: correct for any mix, but costly per call
        keys = [
            (int(k[0]), int(k[1])) for k in np.unique(np.stack([si, t], axis=1), axis=0).tolist()
        ]
    for s, length in keys:
        sel = (si == s) & (t == length)
        gpa, size = table.gpas[s], table.sizes[s]
        offs = (a[sel] - np.uint64(gpa)).astype(np.int64)
        if bool((offs + length > size).any()):
            raise MemoryAccessError("a buffer no longer fits in its memory slot")
        slot = mem.translate(gpa, size)
        out.append((slot, rows[sel].astype(np.int64), offs, length))
    return out


# ---------------------------------------------------------------------------- reading


def valid_out(out: object, nrows: int, width: int) -> bool:
    """Whether ``out`` is None or a buffer :func:`read_payloads` may copy ``nrows`` rows of
    ``width`` bytes into (writable, C-contiguous, 2-D uint8, big enough)."""
    return out is None or (
        isinstance(out, np.ndarray)
        and out.dtype == np.uint8
        and out.ndim == 2
        and out.shape[0] >= nrows
        and out.shape[1] >= width
        and out.flags.c_contiguous
        and out.flags.writeable
    )


def read_payloads(
    mem: GuestMemoryMap,
    slots: SlotCache,
    batch: Batch,
    width: int,
    out: U8Array | None,
    *,
    scalar_max: int,
    usable: bool,
) -> tuple[U8Array, I64Array]:
    """:meth:`~shared.virtio.DeviceRing.read_payloads` once the batch is known to be in
    flight (``width`` already checked); two empty arrays when not ``usable``."""
    w = width
    nrows = len(batch)
    if not valid_out(out, nrows, w):
        raise UsageError(
            f"out must be a writable C-contiguous uint8 array of at least ({nrows}, {w})"
        )
    if not usable:
        return np.zeros((0, w), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    if not batch.simple or nrows <= scalar_max:
        # Chains, and the few rows of a small batch: one slice copy per segment
        # straight into the row (np.empty: only what is not copied gets zeroed).
        rows_out = np.empty((nrows, w), dtype=np.uint8) if out is None else out
        return _read_rows(mem, batch, w, rows_out[:nrows, :w])
    copied = np.minimum(batch.readable_lens, w).astype(np.int64)
    rows = np.nonzero(copied > 0)[0]  # a writable buffer has 0 readable bytes
    grouped = groups(mem, slots, batch.addrs, copied, rows)
    if len(grouped) == 1 and grouped[0][3] == w and rows.shape[0] == nrows:
        # Every row full width from one slot: the gather is the result.
        slot, _, offs, _ = grouped[0]
        data = windows(slot, w)[offs]
    else:
        data = np.zeros((nrows, w), dtype=np.uint8)
        for slot, group, offs, take in grouped:
            data[group, :take] = windows(slot, take)[offs]
    if out is not None:  # many small rows: the gather above, then into the caller's
        out[:nrows, :w] = data
        data = out[:nrows, :w]
    return data, copied


def _read_rows(
    mem: GuestMemoryMap, batch: Batch, w: int, data: U8Array
) -> tuple[U8Array, I64Array]:
    """:func:`read_payloads` row by row, one slice copy per segment into ``data``
    (``(N, w)``)."""
    addrs, lens = batch._list(2), batch._list(3)
    flags, starts = batch._list(4), batch._list(1)
    got: list[int] = []
    for i in range(len(batch)):
        dst = 0
        for j in range(starts[i], starts[i + 1]):
            if flags[j] & VRING_DESC_F_WRITE or dst >= w:
                break
            take = min(lens[j], w - dst)
            data[i, dst : dst + take] = mem.translate(addrs[j], take)
            dst += take
        if dst < w:
            data[i, dst:] = 0
        got.append(dst)
    return data, np.array(got, dtype=np.int64)


# ---------------------------------------------------------------------------- writing


def write_payloads(
    mem: GuestMemoryMap,
    slots: SlotCache,
    batch: Batch,
    data: U8Array,
    lens: npt.ArrayLike,
    *,
    scalar_max: int,
    usable: bool,
) -> U32Array:
    """:meth:`~shared.virtio.DeviceRing.write_payloads` once the batch is known to be in
    flight; nothing written and an empty array when not ``usable``."""
    nrows = len(batch)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[0] != nrows
    ):
        raise UsageError(f"data must be a ({nrows}, W) uint8 array")
    n_l = small_ints(lens, "lens", scalar_max, I64_MAX) if scalar_max else None
    if n_l is not None and len(n_l) == nrows:
        return _write_rows(mem, batch, data, n_l, usable)
    n = index_array(lens, "lens")
    if n.shape[0] != nrows:
        raise UsageError(f"{nrows} chains but {n.shape[0]} lengths")
    if bool((n > data.shape[1]).any()):
        raise UsageError(f"a length exceeds the data width {data.shape[1]}")
    if bool((n > batch.writable_lens).any()):
        raise UsageError("a length exceeds its chain's device-writable capacity")
    if not usable:
        return np.zeros(0, dtype=np.uint32)
    if batch.simple:
        rows = np.nonzero(n > 0)[0]
        plan = groups(mem, slots, batch.addrs, n, rows)
        if len(plan) > 1 and _overlapping(batch.addrs[rows], n[rows]):
            # Groups are written one after another, not in chain order. Only a guest that
            # posts overlapping writable buffers can tell: write those in chain order, so
            # the last chain wins, as the scalar path and a real device's in-order DMA do.
            plan = [
                (slot, grp[k : k + 1], off[k : k + 1], take)
                for slot, grp, off, take in plan
                for k in range(grp.shape[0])
            ]
            plan.sort(key=lambda p: int(p[1][0]))
        for slot, group, offs, take in plan:
            if not slot.flags.writeable:
                raise MemoryAccessError("a device-writable buffer is in read-only memory")
            # every row in order: a basic slice of data, no fancy-indexed copy
            rows_data = data[:, :take] if group.shape[0] == nrows else data[group, :take]
            windows(slot, take)[offs] = rows_data
    else:
        for i in range(nrows):
            src, left = 0, int(n[i])
            for seg in batch.chain(i):
                if left == 0:
                    break
                if not seg.writable:
                    continue
                take = min(seg.len, left)
                dst = mem.translate(seg.gpa, take)
                if not dst.flags.writeable:
                    raise MemoryAccessError(f"{seg.gpa:#x} is read-only")
                dst[...] = data[i, src : src + take]
                src += take
                left -= take
    return n.astype(np.uint32)


def _overlapping(addrs: U64Array, lens: I64Array) -> bool:
    """Whether any two of the buffers ``[addr, addr + len)`` share a byte."""
    order = np.argsort(addrs, kind="stable")
    gaps = np.diff(addrs[order])  # sorted: no u64 wrap; a buffer overlaps the next one
    return bool((lens[order][:-1].astype(np.uint64) > gaps).any())  # iff it is longer


def _write_rows(
    mem: GuestMemoryMap, batch: Batch, data: U8Array, n: list[int], usable: bool
) -> U32Array:
    """:func:`write_payloads` for a few rows with plain ints: the same checks in the same
    order, one slice copy per segment."""
    width = data.shape[1]
    if any(x > width for x in n):
        raise UsageError(f"a length exceeds the data width {width}")
    if any(x > c for x, c in zip(n, batch.writable_list, strict=True)):
        raise UsageError("a length exceeds its chain's device-writable capacity")
    if not usable:
        return np.zeros(0, dtype=np.uint32)
    addrs, lens = batch._list(2), batch._list(3)
    flags, starts = batch._list(4), batch._list(1)
    for i, left in enumerate(n):
        src = 0
        for j in range(starts[i], starts[i + 1]):
            if left == 0:
                break
            if not flags[j] & VRING_DESC_F_WRITE:
                continue
            take = min(lens[j], left)
            dst = mem.translate(addrs[j], take)
            if not dst.flags.writeable:
                raise MemoryAccessError(f"{addrs[j]:#x} is read-only")
            dst[...] = data[i, src : src + take]
            src += take
            left -= take
    return np.array(n, dtype=np.uint32)


# ---------------------------------------------------------------------------- ring to ring


def copy_payloads(
    src_mem: GuestMemoryMap,
    batch: Batch,
    dst_mem: GuestMemoryMap,
    dst_batch: Batch,
    width: int,
) -> U32Array:
    """:meth:`~shared.virtio.DeviceRing.copy_payloads` once both batches are known to be in
    flight on usable rings (``width`` already checked, ``dst_batch`` no longer than
    ``batch``). Raises :class:`CopyFault` naming the side whose buffer left guest memory."""
    n = len(dst_batch)
    s_addr, s_len = batch._list(2), batch._list(3)
    s_flag, s_start = batch._list(4), batch._list(1)
    d_addr, d_len = dst_batch._list(2), dst_batch._list(3)
    d_flag, d_start = dst_batch._list(4), dst_batch._list(1)
    written: list[int] = []
    for i in range(n):
        si, s_end, s_off = s_start[i], s_start[i + 1], 0
        di, d_end, d_off = d_start[i], d_start[i + 1], 0
        left, total = width, 0
        while left and si < s_end and di < d_end and not s_flag[si] & VRING_DESC_F_WRITE:
            if not d_flag[di] & VRING_DESC_F_WRITE:
                di += 1  # a readable buffer at the start of the destination chain
                continue
            take = min(s_len[si] - s_off, d_len[di] - d_off, left)
            try:
                src = src_mem.translate(s_addr[si] + s_off, take)
            except MemoryAccessError as e:
                raise CopyFault(e, to_destination=False) from None
            try:
                out = dst_mem.translate(d_addr[di] + d_off, take)
                if not out.flags.writeable:
                    raise MemoryAccessError(f"{d_addr[di] + d_off:#x} is read-only")
            except MemoryAccessError as e:
                raise CopyFault(e, to_destination=True) from None
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
