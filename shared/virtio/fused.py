"""Fused kernels: one compiled call per wakeup of a packet queue, built from the ring
kernels of :mod:`shared.virtio.kernels`. This module has the guest (driver) side and the
test-frame helpers; :mod:`shared.virtio.fused_device` the device side.

Theory of operation
-------------------
A per-operation kernel saves the numpy calls inside one ring operation, but a step of a
packet workload is several operations plus the payload work between them, and each costs
an interpreter round trip, argument unboxing and result objects. A fused kernel does a whole
step in one call:

* :func:`driver_send_frames` -- the guest's TX step: take back what the device completed
  (their buffers return to the pool), take free buffers, write a test frame
  (:mod:`shared.frames`) into each in place, post them, publish ``avail.idx`` and decide
  whether to kick;
* :func:`driver_receive_frames` -- the guest's RX step: take the used entries, verify each
  frame in its buffer (sequence number, length, checksum, :func:`shared.frames.check`'s
  order), give the buffers back and post every free buffer again, decide whether to kick;
* the device's sink and echo passes (:mod:`shared.virtio.fused_device`).

A fused step is entered through a pointer table (:mod:`shared.virtio.pointers`): the
``*_t`` kernels take the table, a state array and the step's arguments, and rebuild the
arrays as views; the tables' layouts (``DRIVER_TABLE`` here) are the one statement of
which array goes where.

Each returns its results in a small ``out`` array; :mod:`shared.virtio.compiled` commits the
ring's private scalars from it. The composition of reference operations each one replaces
is written next to its caller (:class:`~guestemu.drivers.PacketQueues`,
:class:`~hostemu.devices.echo.EchoModel`) and a differential test holds the two together.

Declining is per stage: a fused kernel validates a stage (reclaim, post, pop) completely
before it writes anything for it; when a stage is not the common case it stops there and
reports how far it got (``out[0]``), everything before committed, nothing of that stage
written, and the caller finishes the step on the reference path -- which reads the ring
again and reaches the same verdict with its exact reason, or raises the exact error.

Trust and ordering are those of :mod:`shared.virtio.kernels` (whose kernels these call):
each guest-written word read once, the peer's index by an acquire load, ours published by a
release store, a sequentially consistent fence at each store->load decision.
"""

from __future__ import annotations

from shared.jit import prepare_numba_cache

prepare_numba_cache()

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from shared.frames import (  # noqa: E402
    FAULT_CHECKSUM,
    FAULT_LENGTH,
    FAULT_NONE,
    FAULT_SEQ,
    HEADER,
    MULTIPLIER,
)
from shared.virtio.args import STAGE_DONE, STAGE_RECLAIMED, STAGE_START  # noqa: E402
from shared.virtio.atomics import (  # noqa: E402
    fence_seq_cst,
    load_acquire_u16_unchecked,
)
from shared.virtio.kernels import (  # noqa: E402
    DECLINE,
    driver_add_simple,
    driver_get_used,
    fill_bytes,
    need_event,
)
from shared.virtio.pointers import (  # noqa: E402
    view_bool,
    view_i64,
    view_u8,
    view_u8_2d,
    view_u16,
    view_u32,
    view_u64,
)

_RUN = 1 << 24  # a payload byte stays constant over runs of 2**24 bytes
_NO_NOTIFY = 1

# ------------------------------------------------------------------------------- frames


@njit(cache=True, nogil=True, inline="always")
def stamp_frame(row: np.ndarray, seq: int, size: int) -> None:
    """Write frame ``seq`` of ``size`` bytes (at least ``HEADER + 1``) into ``row``: the
    bytes :func:`shared.frames.stamp` writes."""
    base = (seq * MULTIPLIER) & 0xFFFFFFFF
    value = base >> 24
    pos = 0
    n = size - HEADER
    step = _RUN - (base & (_RUN - 1))
    total = 0
    while pos < n:
        stop = min(n, pos + step)
        fill_bytes(row, HEADER + pos, stop - pos, value)
        total += value * (stop - pos)
        pos = stop
        value = (value + 1) & 0xFF
        step = _RUN
    s = seq & 0xFFFFFFFF
    c = total & 0xFFFFFFFF
    for b in range(4):
        row[b] = (s >> (8 * b)) & 0xFF
        row[4 + b] = (c >> (8 * b)) & 0xFF


@njit(cache=True, nogil=True, inline="always")
def u32_at(row: np.ndarray, at: int) -> int:
    return (
        int(row[at]) | (int(row[at + 1]) << 8) | (int(row[at + 2]) << 16) | (int(row[at + 3]) << 24)
    )


@njit(cache=True, nogil=True, inline="always")
def _payload_sum(row: np.ndarray, size: int) -> int:
    payload = row[HEADER:size]
    total = 0
    for i in range(payload.shape[0]):  # from 0: vectorized (see kernels.copy_bytes)
        total += payload[i]
    return total & 0xFFFFFFFF


@njit(cache=True, nogil=True)
def check_frames(
    data: np.ndarray, slots: np.ndarray, lens: np.ndarray, k: int, first: int, out: np.ndarray
) -> None:
    """:func:`shared.frames.check` of the ``k`` frames in rows ``slots`` of ``data`` (each
    ``data.shape[1]`` bytes, received ``lens``), expected to carry ``first``, ``first +
    1``...: ``out[0]`` the fault kind (``FAULT_*``, in check's order: every sequence number,
    then every length, then every checksum), ``out[1]`` the frame's index, ``out[2]`` the
    sequence number or length found."""
    size = data.shape[1]
    out[0] = FAULT_NONE
    out[1] = 0
    out[2] = 0
    for i in range(k):
        seq = u32_at(data[slots[i]], 0)
        if seq != (first + i) & 0xFFFFFFFF:
            out[0] = FAULT_SEQ
            out[1] = i
            out[2] = seq
            return
    for i in range(k):
        if lens[i] != size:
            out[0] = FAULT_LENGTH
            out[1] = i
            out[2] = lens[i]
            return
    for i in range(k):
        row = data[slots[i]]
        if u32_at(row, 4) != _payload_sum(row, size):
            out[0] = FAULT_CHECKSUM
            out[1] = i
            return


# ------------------------------------------------------------------------------- driver


@njit(cache=True, nogil=True, inline="always")
def _after_get_used(avail16: np.ndarray, q: int, last_used: int, irq_enabled: bool) -> None:
    """DriverRing._after_get_used's used_event write (EVENT_IDX rings), ``last_used`` the
    new value."""
    if irq_enabled:
        avail16[2 + q] = last_used
        fence_seq_cst()  # store->load: used_event before our next read of used.idx
    else:
        avail16[2 + q] = (last_used - 1) & 0xFFFF


@njit(cache=True, nogil=True, inline="always")
def _reclaim(
    avail16: np.ndarray,
    used16: np.ndarray,
    used32: np.ndarray,
    in_flight: np.ndarray,
    multi: np.ndarray,
    wcap: np.ndarray,
    mark: np.ndarray,
    free: np.ndarray,
    nfree: int,
    num_in_flight: int,
    q: int,
    last_used: int,
    event_idx: bool,
    irq_enabled: bool,
    ids: np.ndarray,
    lens: np.ndarray,
    pool_stack: np.ndarray,
    pool_n: int,
    slot_of: np.ndarray,
) -> int:
    """Take every used entry (``get_used()``) and give their buffers back to the pool, in
    order; how many, or DECLINE (nothing changed)."""
    pending = (int(load_acquire_u16_unchecked(used16, 1)) - last_used) & 0xFFFF
    if pending == 0:
        return 0
    if pending > num_in_flight:
        return DECLINE
    got = driver_get_used(
        used32, in_flight, multi, wcap, mark, free, nfree, q, last_used, pending, ids, lens
    )
    if got < 0:
        return DECLINE
    for m in range(got):
        pool_stack[pool_n + m] = slot_of[ids[m]]
    if event_idx:
        _after_get_used(avail16, q, (last_used + got) & 0xFFFF, irq_enabled)
    return got


@njit(cache=True, nogil=True, inline="always")
def _kick_needed(
    avail16: np.ndarray,
    used16: np.ndarray,
    q: int,
    old: int,
    new: int,
    unkicked: int,
    event_idx: bool,
) -> int:
    """DriverRing.kick_needed after publishing ``unkicked`` (> 0) buffers, ``old..new``."""
    fence_seq_cst()  # store->load: avail.idx visible before we read avail_event / flags
    if unkicked >= 0xFFFF:
        return 1
    if event_idx:
        return 1 if need_event(load_acquire_u16_unchecked(used16, 2 + 4 * q), new, old) else 0
    return 0 if load_acquire_u16_unchecked(used16, 0) & _NO_NOTIFY else 1


@njit(cache=True, nogil=True, inline="always")
def _post_pool(
    desc64: np.ndarray,
    desc32: np.ndarray,
    desc16: np.ndarray,
    avail16: np.ndarray,
    free: np.ndarray,
    nfree: int,
    in_flight: np.ndarray,
    multi: np.ndarray,
    wcap: np.ndarray,
    q: int,
    avail_shadow: int,
    pool_stack: np.ndarray,
    pool_n: int,
    slot_of: np.ndarray,
    base: np.uint64,
    size: int,
    n: int,
    writable: bool,
    slots: np.ndarray,
    addrs: np.ndarray,
    lens: np.ndarray,
    wflags: np.ndarray,
    heads: np.ndarray,
) -> int:
    """Post the top ``n`` pool buffers (``slots`` already holds them, in pool order) as
    whole single-descriptor buffers, publish; ``n`` or DECLINE (nothing posted)."""
    for j in range(n):
        addrs[j] = base + np.uint64(slots[j]) * np.uint64(size)
        lens[j] = size
        wflags[j] = writable
    got = driver_add_simple(
        desc64, desc32, desc16, avail16, free, nfree, in_flight, multi, wcap, q,
        avail_shadow, addrs[:n], lens[:n], wflags[:n], heads,
    )  # fmt: skip
    if got < 0:
        return DECLINE
    for j in range(n):
        slot_of[heads[j]] = slots[j]
    return n


@njit(cache=True, nogil=True)
def driver_send_frames(
    desc64: np.ndarray,
    desc32: np.ndarray,
    desc16: np.ndarray,
    avail16: np.ndarray,
    used16: np.ndarray,
    used32: np.ndarray,
    free: np.ndarray,
    in_flight: np.ndarray,
    multi: np.ndarray,
    wcap: np.ndarray,
    mark: np.ndarray,
    st: np.ndarray,
    data: np.ndarray,
    pool_stack: np.ndarray,
    slot_of: np.ndarray,
    base: np.uint64,
    first_seq: int,
    want: int,
    limit: int,
    scratch_i: np.ndarray,
    scratch_l: np.ndarray,
    scratch_a: np.ndarray,
    scratch_u: np.ndarray,
    scratch_w: np.ndarray,
    out: np.ndarray,
) -> None:
    """The guest's TX steps: reclaim, then post up to ``want`` frames ``first_seq...`` as
    one batch (one publish, one kick decision); again, while the batch posted and needs no
    kick, until ``limit`` frames in all. A kick ends the call (the caller rings it); so do
    an empty pool and a step that is not the common case (it declines, see below).

    ``st`` holds the ring's and pool's scalars (see :class:`~shared.virtio.compiled.
    DriverKernels`): ``q, nfree, num_in_flight, avail_shadow, last_used, kick_old,
    unkicked, event_idx, irq_enabled, pool_n``. ``out``: ``stage`` (of the last step),
    ``reclaimed, posted`` (in all), ``kick`` (the last batch's decision), ``batches``;
    each batch before the last needed no kick. The first step with nothing to post stops
    at ``STAGE_RECLAIMED`` (the caller's reference finds the same); a later one ends the
    call at ``STAGE_DONE``."""
    q = st[0]
    nfree = st[1]
    num_in_flight = st[2]
    avail_shadow = st[3]
    last_used = st[4]
    kick_old = st[5]
    unkicked = st[6]
    event_idx = st[7] != 0
    irq_enabled = st[8] != 0
    pool_n = st[9]
    size = data.shape[1]
    out[0] = STAGE_START
    for i in range(1, 5):
        out[i] = 0
    posted = 0
    while True:
        got = _reclaim(
            avail16, used16, used32, in_flight, multi, wcap, mark, free, nfree, num_in_flight,
            q, last_used, event_idx, irq_enabled, scratch_i, scratch_l, pool_stack, pool_n,
            slot_of,
        )  # fmt: skip
        if got < 0:
            out[0] = STAGE_START
            return
        out[0] = STAGE_RECLAIMED
        out[1] += got
        nfree += got
        num_in_flight -= got
        pool_n += got
        last_used = (last_used + got) & 0xFFFF
        n = min(want, limit - posted, pool_n)
        if n <= 0 or n > nfree:
            if n <= 0 and posted:
                out[0] = STAGE_DONE  # nothing more to post: the steps are over
            return
        slots = scratch_i  # (the reclaimed ids are no longer needed)
        for j in range(n):
            slots[j] = pool_stack[pool_n - 1 - j]  # the pool's take order: top first
        for j in range(n):
            stamp_frame(data[slots[j]], first_seq + posted + j, size)
        # store->store: the frames are written before the descriptors that publish them
        # (the release store of avail.idx in driver_add_simple orders them).
        got = _post_pool(
            desc64, desc32, desc16, avail16, free, nfree, in_flight, multi, wcap, q,
            avail_shadow, pool_stack, pool_n, slot_of, base, size, n, False,
            slots, scratch_a, scratch_u, scratch_w, scratch_l,
        )  # fmt: skip
        if got < 0:
            return
        out[0] = STAGE_DONE
        posted += n
        out[2] = posted
        out[4] += 1
        nfree -= n
        num_in_flight += n
        pool_n -= n
        new = (avail_shadow + n) & 0xFFFF
        out[3] = _kick_needed(avail16, used16, q, kick_old, new, unkicked + n, event_idx)
        avail_shadow = kick_old = new
        unkicked = 0
        if out[3] or posted >= limit:
            return


@njit(cache=True, nogil=True)
def driver_receive_frames(
    desc64: np.ndarray,
    desc32: np.ndarray,
    desc16: np.ndarray,
    avail16: np.ndarray,
    used16: np.ndarray,
    used32: np.ndarray,
    free: np.ndarray,
    in_flight: np.ndarray,
    multi: np.ndarray,
    wcap: np.ndarray,
    mark: np.ndarray,
    st: np.ndarray,
    data: np.ndarray,
    pool_stack: np.ndarray,
    slot_of: np.ndarray,
    base: np.uint64,
    first_seq: int,
    scratch_i: np.ndarray,
    scratch_l: np.ndarray,
    scratch_a: np.ndarray,
    scratch_u: np.ndarray,
    scratch_w: np.ndarray,
    scratch_s: np.ndarray,
    out: np.ndarray,
) -> None:
    """The guest's RX step: take the used entries, verify their frames in place (expected
    ``first_seq...``), give the buffers back and post every free buffer, writable.

    ``st`` as for :func:`driver_send_frames`. ``out``: ``stage, received, posted, kick,
    fault, fault_index, fault_value``."""
    q = st[0]
    nfree = st[1]
    num_in_flight = st[2]
    avail_shadow = st[3]
    last_used = st[4]
    event_idx = st[7] != 0
    pool_n = st[9]
    size = data.shape[1]
    for i in range(7):
        out[i] = 0
    got = _reclaim(
        avail16, used16, used32, in_flight, multi, wcap, mark, free, nfree, num_in_flight,
        q, last_used, event_idx, st[8] != 0, scratch_i, scratch_l, pool_stack, pool_n, slot_of,
    )  # fmt: skip
    if got < 0:
        return
    out[0] = STAGE_RECLAIMED
    out[1] = got
    if got:
        for m in range(got):
            scratch_s[m] = pool_stack[pool_n + m]
        check_frames(data, scratch_s, scratch_l, got, first_seq, out[4:7])
    nfree += got
    num_in_flight -= got
    pool_n += got
    n = pool_n
    if n == 0 or got == 0 or n > nfree:
        # (the reference reposts only after taking something: receive() then post_rx())
        if got == 0:
            out[0] = STAGE_DONE
        return
    slots = scratch_s
    for j in range(n):
        slots[j] = pool_stack[pool_n - 1 - j]
    got = _post_pool(
        desc64, desc32, desc16, avail16, free, nfree, in_flight, multi, wcap, q, avail_shadow,
        pool_stack, pool_n, slot_of, base, size, n, True,
        slots, scratch_a, scratch_u, scratch_w, scratch_i,
    )  # fmt: skip
    if got < 0:
        return
    out[0] = STAGE_DONE
    out[2] = n
    new = (avail_shadow + n) & 0xFFFF
    out[3] = _kick_needed(avail16, used16, q, st[5], new, st[6] + n, event_idx)


# ------------------------------------------------------------------------ table entry

# The arrays of a driver step's pointer table, in order (see shared.virtio.pointers), and of
# the device's sink step. DriverKernels / DeviceKernels build the tables from these.
DRIVER_TABLE = (
    ("desc64", np.uint64, True),
    ("desc32", np.uint32, True),
    ("desc16", np.uint16, True),
    ("avail16", np.uint16, True),
    ("used16", np.uint16, False),
    ("used32", np.uint32, False),
    ("free", np.uint16, True),
    ("in_flight", np.bool_, True),
    ("multi", np.bool_, True),
    ("wcap", np.int64, True),
    ("mark", np.uint8, True),
    ("data", np.uint8, True),
    ("pool_stack", np.int64, True),
    ("slot_of", np.int64, True),
    ("scratch_i", np.int64, True),
    ("scratch_l", np.int64, True),
    ("scratch_a", np.uint64, True),
    ("scratch_u", np.uint64, True),
    ("scratch_w", np.bool_, True),
    ("scratch_s", np.int64, True),
)
DRIVER_ST = 12
"""A driver step's ``st``: the ten scalars of :func:`driver_send_frames`, then the pool's
buffer size and its guest-physical base."""


@njit(cache=True, nogil=True)
def driver_send_frames_t(
    tbl: np.ndarray, st: np.ndarray, first_seq: int, want: int, limit: int, out: np.ndarray
) -> None:
    """:func:`driver_send_frames` with its arrays from a pointer table (``DRIVER_TABLE``)."""
    driver_send_frames(
        view_u64(tbl, 0), view_u32(tbl, 1), view_u16(tbl, 2), view_u16(tbl, 3),
        view_u16(tbl, 4), view_u32(tbl, 5), view_u16(tbl, 6), view_bool(tbl, 7),
        view_bool(tbl, 8), view_i64(tbl, 9), view_u8(tbl, 10), st,
        view_u8_2d(tbl, 11, st[10]), view_i64(tbl, 12), view_i64(tbl, 13), np.uint64(st[11]),
        first_seq, want, limit, view_i64(tbl, 14), view_i64(tbl, 15), view_u64(tbl, 16),
        view_u64(tbl, 17), view_bool(tbl, 18), out,
    )  # fmt: skip


@njit(cache=True, nogil=True)
def driver_receive_frames_t(
    tbl: np.ndarray, st: np.ndarray, first_seq: int, out: np.ndarray
) -> None:
    """:func:`driver_receive_frames` with its arrays from a pointer table
    (``DRIVER_TABLE``)."""
    driver_receive_frames(
        view_u64(tbl, 0), view_u32(tbl, 1), view_u16(tbl, 2), view_u16(tbl, 3),
        view_u16(tbl, 4), view_u32(tbl, 5), view_u16(tbl, 6), view_bool(tbl, 7),
        view_bool(tbl, 8), view_i64(tbl, 9), view_u8(tbl, 10), st,
        view_u8_2d(tbl, 11, st[10]), view_i64(tbl, 12), view_i64(tbl, 13), np.uint64(st[11]),
        first_seq, view_i64(tbl, 14), view_i64(tbl, 15), view_u64(tbl, 16),
        view_u64(tbl, 17), view_bool(tbl, 18), view_i64(tbl, 19), out,
    )  # fmt: skip
