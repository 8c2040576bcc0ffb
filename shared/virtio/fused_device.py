"""Fused kernels of the device side: one compiled call per pass of the echo device, built
from the ring kernels of :mod:`shared.virtio.kernels` (see :mod:`shared.virtio.fused` for
the guest side and what the two have in common).

* :func:`device_consume` -- the sink pass: take the available chains, copy their bytes into
  device memory, count frames out of sequence (:mod:`shared.frames`), complete them,
  decide whether to interrupt; or, with nothing available, re-enable notifications and
  re-check;
* :func:`device_forward` -- the echo pass with nothing held back: take TX chains and as many
  RX chains, copy each TX buffer into its RX buffer, complete RX then TX, decide both
  interrupts.

Each either does the whole pass or declines having written nothing (``out[0]`` stays
``STAGE_START``); :class:`~shared.virtio.compiled.DeviceKernels` commits the rings' private
scalars, and the echo model's reference pass runs when it declines. Trust and ordering are
those of :mod:`shared.virtio.kernels`.
"""

from __future__ import annotations

from shared.jit import prepare_numba_cache

prepare_numba_cache()

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from shared.virtio.args import STAGE_DONE  # noqa: E402
from shared.virtio.atomics import fence_seq_cst, load_acquire_u16_unchecked  # noqa: E402
from shared.virtio.fused import u32_at  # noqa: E402
from shared.virtio.kernels import (  # noqa: E402
    copy_bytes,
    device_push_used,
    pop_commit,
    pop_validate,
)
from shared.virtio.pointers import (  # noqa: E402
    view_bool,
    view_i64,
    view_u8,
    view_u16,
    view_u32,
    view_u64,
)

_NO_NOTIFY = 1


@njit(cache=True, nogil=True, inline="always")
def _enable_and_recheck(
    avail16: np.ndarray, used16: np.ndarray, q: int, last_avail: int, flags: int, event_idx: bool
) -> int:
    """A pass that found nothing: disable, find nothing, enable and re-check -- the enable
    is what remains (``avail_event`` at ``last_avail``, or ``NO_NOTIFY`` cleared). 1 if
    more is available already."""
    if event_idx:
        used16[2 + 4 * q] = last_avail
    else:
        used16[0] = flags & ~_NO_NOTIFY
    fence_seq_cst()  # store->load: the enable before the re-check
    return 1 if int(load_acquire_u16_unchecked(avail16, 1)) != last_avail else 0


@njit(cache=True, nogil=True, inline="always")
def _notifications_off(
    used16: np.ndarray, q: int, last_avail: int, flags: int, event_idx: bool
) -> None:
    """After taking chains with notifications disabled: ``avail_event`` one behind the new
    ``last_avail``, or ``NO_NOTIFY`` set."""
    if event_idx:
        used16[2 + 4 * q] = (last_avail - 1) & 0xFFFF
    elif not flags & _NO_NOTIFY:
        used16[0] = flags | _NO_NOTIFY


@njit(cache=True, nogil=True)
def device_consume(
    avail16: np.ndarray,
    desc64: np.ndarray,
    desc32: np.ndarray,
    desc16: np.ndarray,
    used16: np.ndarray,
    used32: np.ndarray,
    in_flight: np.ndarray,
    wcap: np.ndarray,
    mark: np.ndarray,
    slot_gpa: np.ndarray,
    slot_last: np.ndarray,
    slot_w: np.ndarray,
    st: np.ndarray,
    mem: np.ndarray,
    mem_gpa: np.uint64,
    sink: np.ndarray,
    heads: np.ndarray,
    addrs: np.ndarray,
    lens: np.ndarray,
    wflags: np.ndarray,
    zeros: np.ndarray,
    out: np.ndarray,
) -> None:
    """The device's sink step (notifications off; pop; copy into ``sink``; count frames
    out of sequence; complete with length 0; interrupt?), or with nothing available,
    notifications back on and a re-check. Each frame gets its own row of ``sink`` when
    they all fit, else each is copied to its start in turn; a frame longer than
    ``max_width`` or ``sink`` declines the pass.

    ``st``: ``q, last_avail, num_in_flight, next_used, event_idx, used_flags_shadow,
    max_len, limit, first_seq, max_width``. ``out``: ``stage, taken, bytes, seq_errors,
    interrupt, more, stride`` -- stage ``STAGE_START`` declined (nothing written; the
    reference runs the step), ``STAGE_DONE`` done; ``stride``: frame ``i`` is at
    ``sink[i * stride:]`` (a row each, as wide as the widest), or 0 when they did not all
    fit and each was copied to the start in turn."""
    q = st[0]
    last_avail = st[1]
    num_in_flight = st[2]
    next_used = st[3]
    event_idx = st[4] != 0
    flags = st[5]
    for i in range(7):
        out[i] = 0
    avail_idx = int(load_acquire_u16_unchecked(avail16, 1))  # read once
    n = (avail_idx - last_avail) & 0xFFFF
    if n > q or n + num_in_flight > q:
        return  # the reference breaks the ring with its reason
    k = min(n, st[7])
    if k == 0:
        out[0] = STAGE_DONE
        out[5] = _enable_and_recheck(avail16, used16, q, last_avail, flags, event_idx)
        return
    if not pop_validate(
        avail16, desc64, desc32, desc16, in_flight, mark, slot_gpa, slot_last, slot_w,
        q, last_avail, k, st[6], heads, addrs, lens, wflags,
    ):  # fmt: skip
        return
    width = 1
    for i in range(k):
        if wflags[i] == 0:
            width = max(width, int(lens[i]))
    if width > min(st[9], sink.shape[0]):
        return
    # each frame gets a row of the sink; if they do not all fit, each is copied to the
    # start of the (reused, so warm) buffer in turn -- the device still gets every byte
    stride = width if k * width <= sink.shape[0] else 0
    for i in range(k):
        if wflags[i] == 0 and (
            addrs[i] < mem_gpa or np.int64(addrs[i] - mem_gpa) + np.int64(lens[i]) > mem.shape[0]
        ):
            return
    # Validated: from here on the step completes.
    pop_commit(in_flight, wcap, k, heads, lens, wflags)
    last_avail = (last_avail + k) & 0xFFFF
    _notifications_off(used16, q, last_avail, flags, event_idx)
    total = 0
    errors = 0
    first = st[8]
    for i in range(k):
        take = 0 if wflags[i] else int(lens[i])
        if take:
            off = np.int64(addrs[i] - mem_gpa)
            copy_bytes(sink, i * stride, mem, off, take)
        total += take
        if take < 4 or u32_at(sink, i * stride) != (first + i) & 0xFFFFFFFF:
            errors += 1
    r = device_push_used(
        used16,
        used32,
        avail16,
        in_flight,
        wcap,
        mark,
        q,
        next_used,
        event_idx,
        heads[:k],
        zeros[:k],
    )
    out[0] = STAGE_DONE
    out[1] = k
    out[2] = total
    out[3] = errors
    out[4] = r
    out[5] = 1
    out[6] = stride


@njit(cache=True, nogil=True)
def device_forward(
    tx_avail16: np.ndarray,
    tx_desc64: np.ndarray,
    tx_desc32: np.ndarray,
    tx_desc16: np.ndarray,
    tx_used16: np.ndarray,
    tx_used32: np.ndarray,
    tx_in_flight: np.ndarray,
    tx_wcap: np.ndarray,
    rx_avail16: np.ndarray,
    rx_desc64: np.ndarray,
    rx_desc32: np.ndarray,
    rx_desc16: np.ndarray,
    rx_used16: np.ndarray,
    rx_used32: np.ndarray,
    rx_in_flight: np.ndarray,
    rx_wcap: np.ndarray,
    mark: np.ndarray,
    slot_gpa: np.ndarray,
    slot_last: np.ndarray,
    slot_w: np.ndarray,
    st: np.ndarray,
    mem: np.ndarray,
    mem_gpa: np.uint64,
    tx_heads: np.ndarray,
    tx_addrs: np.ndarray,
    tx_lens: np.ndarray,
    tx_wflags: np.ndarray,
    rx_heads: np.ndarray,
    rx_addrs: np.ndarray,
    rx_lens: np.ndarray,
    rx_wflags: np.ndarray,
    copied: np.ndarray,
    zeros: np.ndarray,
    out: np.ndarray,
) -> None:
    """The echo device's TX pass with nothing held back: TX notifications off; take up to
    ``limit`` TX chains and as many RX chains; copy each TX buffer into its RX buffer
    (truncated to the RX buffer); complete RX (with the lengths), then TX (length 0);
    interrupt? With no TX chain available: notifications back on and a re-check.

    ``st``: TX ``q, last_avail, num_in_flight, next_used, event_idx, used_flags_shadow,
    max_len``, RX ``last_avail, num_in_flight, next_used, notify_enabled, max_len``, then
    ``limit`` and the gpa of ``mem`` (both rings have the same size and notification
    features). ``out``: ``stage, taken, bytes, rx_interrupt, tx_interrupt, more, width``
    (the longest TX buffer taken) -- stage
    ``STAGE_START``: declined, nothing written (no RX chain available, an unusual chain, a
    buffer outside ``mem``, overlapping buffers: the reference runs the pass)."""
    q = st[0]
    tx_last = st[1]
    event_idx = st[4] != 0
    flags = st[5]
    rx_last = st[7]
    for i in range(7):
        out[i] = 0
    tx_idx = int(load_acquire_u16_unchecked(tx_avail16, 1))  # read once
    n = (tx_idx - tx_last) & 0xFFFF
    if n > q or n + st[2] > q:
        return
    if n == 0:
        out[0] = STAGE_DONE
        out[5] = _enable_and_recheck(tx_avail16, tx_used16, q, tx_last, flags, event_idx)
        return
    rx_idx = int(load_acquire_u16_unchecked(rx_avail16, 1))
    m = (rx_idx - rx_last) & 0xFFFF
    if m == 0 or m > q or m + st[8] > q:
        return
    k = min(n, m, st[12])
    if not pop_validate(
        tx_avail16, tx_desc64, tx_desc32, tx_desc16, tx_in_flight, mark, slot_gpa, slot_last,
        slot_w, q, tx_last, k, st[6], tx_heads, tx_addrs, tx_lens, tx_wflags,
    ):  # fmt: skip
        return
    if not pop_validate(
        rx_avail16, rx_desc64, rx_desc32, rx_desc16, rx_in_flight, mark, slot_gpa, slot_last,
        slot_w, q, rx_last, k, st[11], rx_heads, rx_addrs, rx_lens, rx_wflags,
    ):  # fmt: skip
        return
    size = np.int64(mem.shape[0])
    for i in range(k):
        if tx_wflags[i] != 0 or rx_wflags[i] == 0:
            return
        if tx_addrs[i] < mem_gpa or rx_addrs[i] < mem_gpa:
            return
        take = min(int(tx_lens[i]), int(rx_lens[i]))
        so = np.int64(tx_addrs[i] - mem_gpa)
        do = np.int64(rx_addrs[i] - mem_gpa)
        if so + take > size or do + take > size or (so < do + take and do < so + take):
            return
    # Validated: from here on the pass completes.
    pop_commit(tx_in_flight, tx_wcap, k, tx_heads, tx_lens, tx_wflags)
    pop_commit(rx_in_flight, rx_wcap, k, rx_heads, rx_lens, rx_wflags)
    tx_last = (tx_last + k) & 0xFFFF
    rx_last = (rx_last + k) & 0xFFFF
    _notifications_off(tx_used16, q, tx_last, flags, event_idx)
    if event_idx:
        if st[10] != 0:  # RX as its own pop leaves it: refreshed, or one behind
            rx_used16[2 + 4 * q] = rx_last
            fence_seq_cst()  # store->load: avail_event before our next read of avail.idx
        else:
            rx_used16[2 + 4 * q] = (rx_last - 1) & 0xFFFF
    total = 0
    width = 1
    for i in range(k):
        take = min(int(tx_lens[i]), int(rx_lens[i]))
        width = max(width, int(tx_lens[i]))
        copy_bytes(mem, np.int64(rx_addrs[i] - mem_gpa), mem, np.int64(tx_addrs[i] - mem_gpa), take)
        copied[i] = take
        total += take
    rx_irq = device_push_used(
        rx_used16, rx_used32, rx_avail16, rx_in_flight, rx_wcap, mark, q, st[9], event_idx,
        rx_heads[:k], copied[:k],
    )  # fmt: skip
    tx_irq = device_push_used(
        tx_used16, tx_used32, tx_avail16, tx_in_flight, tx_wcap, mark, q, st[3], event_idx,
        tx_heads[:k], zeros[:k],
    )  # fmt: skip
    out[0] = STAGE_DONE
    out[1] = k
    out[2] = total
    out[3] = rx_irq
    out[4] = tx_irq
    out[5] = 1
    out[6] = width


# ------------------------------------------------------------------------ table entry

DEVICE_TABLE = (
    ("avail16", np.uint16, False),
    ("desc64", np.uint64, False),
    ("desc32", np.uint32, False),
    ("desc16", np.uint16, False),
    ("used16", np.uint16, True),
    ("used32", np.uint32, True),
    ("in_flight", np.bool_, True),
    ("wcap", np.int64, True),
    ("mark", np.uint8, True),
    ("slot_gpa", np.uint64, False),
    ("slot_last", np.uint64, False),
    ("slot_w", np.bool_, False),
    ("mem", np.uint8, False),
    ("sink", np.uint8, True),
    ("heads", np.int64, True),
    ("addrs", np.uint64, True),
    ("lens", np.uint32, True),
    ("wflags", np.uint16, True),
    ("zeros", np.int64, False),
)
DEVICE_ST = 11
"""The sink step's ``st``: the ten scalars of :func:`device_consume`, then the gpa of the
memory slot given as ``mem``."""


@njit(cache=True, nogil=True)
def device_consume_t(tbl: np.ndarray, st: np.ndarray, out: np.ndarray) -> None:
    """:func:`device_consume` with its arrays from a pointer table (``DEVICE_TABLE``)."""
    device_consume(
        view_u16(tbl, 0), view_u64(tbl, 1), view_u32(tbl, 2), view_u16(tbl, 3),
        view_u16(tbl, 4), view_u32(tbl, 5), view_bool(tbl, 6), view_i64(tbl, 7),
        view_u8(tbl, 8), view_u64(tbl, 9), view_u64(tbl, 10), view_bool(tbl, 11), st,
        view_u8(tbl, 12), np.uint64(st[10]), view_u8(tbl, 13), view_i64(tbl, 14),
        view_u64(tbl, 15), view_u32(tbl, 16), view_u16(tbl, 17), view_i64(tbl, 18), out,
    )  # fmt: skip


FORWARD_TABLE = (
    ("tx_avail16", np.uint16, False),
    ("tx_desc64", np.uint64, False),
    ("tx_desc32", np.uint32, False),
    ("tx_desc16", np.uint16, False),
    ("tx_used16", np.uint16, True),
    ("tx_used32", np.uint32, True),
    ("tx_in_flight", np.bool_, True),
    ("tx_wcap", np.int64, True),
    ("rx_avail16", np.uint16, False),
    ("rx_desc64", np.uint64, False),
    ("rx_desc32", np.uint32, False),
    ("rx_desc16", np.uint16, False),
    ("rx_used16", np.uint16, True),
    ("rx_used32", np.uint32, True),
    ("rx_in_flight", np.bool_, True),
    ("rx_wcap", np.int64, True),
    ("mark", np.uint8, True),
    ("slot_gpa", np.uint64, False),
    ("slot_last", np.uint64, False),
    ("slot_w", np.bool_, False),
    ("mem", np.uint8, True),
    ("tx_heads", np.int64, True),
    ("tx_addrs", np.uint64, True),
    ("tx_lens", np.uint32, True),
    ("tx_wflags", np.uint16, True),
    ("rx_heads", np.int64, True),
    ("rx_addrs", np.uint64, True),
    ("rx_lens", np.uint32, True),
    ("rx_wflags", np.uint16, True),
    ("copied", np.int64, True),
    ("zeros", np.int64, False),
)
FORWARD_ST = 14
"""The forward step's ``st``: the twelve scalars of :func:`device_forward`, the limit and
the gpa of ``mem``."""


@njit(cache=True, nogil=True)
def device_forward_t(tbl: np.ndarray, st: np.ndarray, out: np.ndarray) -> None:
    """:func:`device_forward` with its arrays from a pointer table (``FORWARD_TABLE``)."""
    device_forward(
        view_u16(tbl, 0), view_u64(tbl, 1), view_u32(tbl, 2), view_u16(tbl, 3),
        view_u16(tbl, 4), view_u32(tbl, 5), view_bool(tbl, 6), view_i64(tbl, 7),
        view_u16(tbl, 8), view_u64(tbl, 9), view_u32(tbl, 10), view_u16(tbl, 11),
        view_u16(tbl, 12), view_u32(tbl, 13), view_bool(tbl, 14), view_i64(tbl, 15),
        view_u8(tbl, 16), view_u64(tbl, 17), view_u64(tbl, 18), view_bool(tbl, 19), st,
        view_u8(tbl, 20), np.uint64(st[13]), view_i64(tbl, 21), view_u64(tbl, 22),
        view_u32(tbl, 23), view_u16(tbl, 24), view_i64(tbl, 25), view_u64(tbl, 26),
        view_u32(tbl, 27), view_u16(tbl, 28), view_i64(tbl, 29), view_i64(tbl, 30), out,
    )  # fmt: skip
