"""Walking and validating the chains a guest made available: the device's trust boundary.

Trust
-----
The device trusts nothing it reads from guest memory. It reads ``avail.idx`` once per pass
and each descriptor once into a private copy, so rewriting a descriptor after posting it
changes nothing the device acts on. Any violation -- index jump, head or next out of range, a
loop or a chain longer than Q, a bad indirect table, a buffer outside guest memory, crossing a
slot boundary or a gap, overflowing ``2**64``, of length 0 or above ``max_buffer_len``, a
device-writable buffer in read-only memory, a readable descriptor after a writable one, a
head posted again while in flight, or more requests than Q -- marks the ring **broken** with a
reason (virtio's ``NEEDS_RESET``). Here such a violation is :class:`RingBroken`, raised with
the reason; the device ring catches it and never lets it escape (a broken ring is a no-op
until reset). The head checks (index jump, range, in flight, repeated) sit with the device's
pop; this module walks the chains behind the heads and checks their buffers.

A single buffer may be at most ``max_buffer_len`` bytes (default :data:`MAX_BUFFER_LEN`,
16 MiB; a guest's "4 GiB" buffer breaks the ring).

Indirect descriptors
--------------------
``VRING_DESC_F_INDIRECT`` is supported as virtio 1.2, 2.7.5.3.2 asks ("The device MUST handle
the case of zero or more normal chained descriptors followed by a single descriptor with
VIRTQ_DESC_F_INDIRECT"): a chain is zero or more normal descriptors, then optionally one
indirect descriptor that ends it. Its table is ``len / 16`` descriptors (``len`` a non-zero
multiple of 16, at most Q entries) in one guest memory slot, copied once, whose entries may
not be indirect themselves. The chain's buffers are the normal descriptors' followed by the
table's, under the same rules as any chain: no device-readable buffer after a device-writable
one across the whole chain, every buffer checked alike, and at most Q buffers in all.
``INDIRECT`` together with ``NEXT`` (so anything after the indirect descriptor) or a nested
indirect descriptor in a table is broken.

Fast paths
----------
:func:`check_buffers` (vectorized, every segment at once) is the reference: it raises with the
exact reason. Beside it are the cheaper checks that must agree with it: :func:`simple_ok` (a
sufficient check of a single-descriptor batch in four reductions), :func:`buffers_ok` (the
scalar paths' segment-by-segment check) and :func:`buffer_ok` (one buffer). Each answers only
"would :func:`check_buffers` accept all of these?"; when it says no, the caller hands the same
data to :func:`check_buffers` for the reason, so every rejection is worded once.
"""

from __future__ import annotations

import bisect
from typing import Final

import numpy as np

from shared.errors import MemoryAccessError
from shared.memory import GuestMemoryMap
from shared.virtio.layout import (
    DESC_DTYPE,
    DESC_SIZE,
    DESC_STRUCT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    BoolArray,
    I64Array,
    U32Array,
    U64Array,
)
from shared.virtio.slots import SlotTable, locate

MAX_BUFFER_LEN: Final = 16 << 20
"""Default largest single buffer the device accepts (16 MiB); a guest's 4 GiB buffer is broken."""

WRITE_OR_CONTINUE: Final = VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT
"""Flags of a head descriptor that make it more than one buffer (a chain to walk)."""

Desc = tuple[int, int, int, int]
"""A private copy of one descriptor: ``(addr, len, flags, next)``."""


class RingBroken(Exception):
    """The guest broke the ring (the message is the reason); caught by the device ring, never
    raised to its caller."""


# ---------------------------------------------------------------------------- walking


def walk_chains(
    mem: GuestMemoryMap,
    desc_mv: memoryview,
    qsize: int,
    heads: list[int],
    descs: list[Desc],
    budget: int,
) -> tuple[int, list[int], list[int], list[int], list[bool]]:
    """Follow each chain (bounded) through the descriptor table ``desc_mv``; stop taking
    chains once ``budget`` descriptors were read (the chain being walked is finished).
    ``descs`` are the private copies of the head descriptors. Returns ``(taken, starts,
    addrs, lens, writable)``: the segments of the first ``taken`` chains, CSR style."""
    a: list[int] = []
    n: list[int] = []
    w: list[bool] = []
    starts = [0]
    spent = 0
    taken = 0
    for head, first in zip(heads, descs, strict=True):
        if taken and spent >= budget:
            break
        spent += _walk_chain(mem, desc_mv, qsize, head, first, a, n, w)
        starts.append(len(a))
        taken += 1
    return taken, starts, a, n, w


def _walk_chain(
    mem: GuestMemoryMap,
    desc_mv: memoryview,
    q: int,
    head: int,
    first: Desc,
    a: list[int],
    n: list[int],
    w: list[bool],
) -> int:
    """Append chain ``head``'s segments; return how many descriptors were read.

    Zero or more normal descriptors, then optionally one indirect descriptor (without
    ``NEXT``) ending the chain, whose table's buffers follow the normal ones."""
    addr, length, flags, nxt = first
    visited = {head}
    idx = head
    while True:
        if flags & VRING_DESC_F_INDIRECT:
            if flags & VRING_DESC_F_NEXT:
                where = "" if idx == head else f" {idx}"
                raise RingBroken(f"chain {head}: indirect descriptor{where} also has NEXT")
            # The normal descriptors before it are buffers of the same chain.
            before = len(visited) - 1
            return len(visited) + _walk_indirect(mem, q, head, addr, length, a, n, w, before)
        a.append(addr)
        n.append(length)
        w.append(bool(flags & VRING_DESC_F_WRITE))
        if not flags & VRING_DESC_F_NEXT:
            return len(visited)
        if nxt >= q:
            raise RingBroken(f"chain {head}: descriptor {idx} has next {nxt} >= queue size {q}")
        if nxt in visited:
            raise RingBroken(f"chain {head}: descriptor loop at {idx} -> {nxt}")
        if len(visited) >= q:  # unreachable without a loop; a bound regardless
            raise RingBroken(f"chain {head}: longer than the queue size {q}")
        visited.add(nxt)
        idx = nxt
        # Read once into a private tuple: unpacking copies every field out of guest memory.
        addr, length, flags, nxt = DESC_STRUCT.unpack_from(desc_mv, idx * DESC_SIZE)


def _walk_indirect(
    mem: GuestMemoryMap,
    q: int,
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
    if length == 0 or length % DESC_SIZE:
        raise RingBroken(
            f"chain {head}: indirect table length {length} is not a non-zero multiple of 16"
        )
    count = length // DESC_SIZE
    if count > q:
        raise RingBroken(
            f"chain {head}: indirect table of {count} descriptors is longer than the queue size {q}"
        )
    try:
        raw = mem.translate(addr, length)
    except MemoryAccessError as e:
        raise RingBroken(f"chain {head}: indirect table outside guest memory: {e}") from None
    # One copy of the whole table, then only the copy is used.
    table = raw.copy().view(DESC_DTYPE).tolist()
    visited = {0}
    i = 0
    while True:
        d_addr, d_len, d_flags, d_next = table[i]
        if d_flags & VRING_DESC_F_INDIRECT:
            raise RingBroken(f"chain {head}: nested indirect descriptor in its table")
        if before + len(visited) > q:
            raise RingBroken(
                f"chain {head}: {before} buffers and an indirect table: longer than the "
                f"queue size {q}"
            )
        a.append(d_addr)
        n.append(d_len)
        w.append(bool(d_flags & VRING_DESC_F_WRITE))
        if not d_flags & VRING_DESC_F_NEXT:
            return len(visited)
        if d_next >= count:
            raise RingBroken(
                f"chain {head}: indirect entry {i} has next {d_next} >= table size {count}"
            )
        if d_next in visited:
            raise RingBroken(f"chain {head}: descriptor loop in its indirect table")
        visited.add(d_next)
        i = d_next


# ---------------------------------------------------------------------------- validating


def check_buffers(
    table: SlotTable,
    max_len: int,
    addrs: U64Array,
    lens: U32Array,
    writable: BoolArray,
    starts: I64Array,
) -> None:
    """Validate every segment at once (vectorized); raise :class:`RingBroken` on the first.

    The reference check: a segment must be non-empty, at most ``max_len`` bytes, not overflow
    ``2**64``, lie inside one memory slot of ``table`` (writable ones in writable memory),
    and no device-readable segment may follow a device-writable one in its chain (``starts``:
    CSR chain boundaries)."""
    if addrs.shape[0] == 0:
        return
    lens64 = lens.astype(np.uint64)
    zero = lens64 == 0
    huge = lens64 > max_len
    # 2**64 - len, computed in wrapping uint64 (only meaningful where len > 0):
    room = ~lens64 + np.uint64(1)
    overflow = ~zero & (addrs > room)
    si = locate(addrs, table)
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
        raise RingBroken(f"zero-length buffer at {int(addrs[j]):#x}")
    if huge[j]:
        raise RingBroken(f"{where} is longer than the {max_len}-byte limit")
    if overflow[j]:
        raise RingBroken(f"{where} overflows the 64-bit address space")
    if order[j]:
        raise RingBroken(f"{where} is device-readable but follows a device-writable buffer")
    if outside[j]:
        raise RingBroken(f"{where} is outside guest memory")
    if straddle[j]:
        raise RingBroken(f"{where} crosses the end of its memory slot (a gap or another slot)")
    raise RingBroken(f"{where} is device-writable but lies in read-only memory")


def simple_ok(
    table: SlotTable, max_len: int, addrs: U64Array, lens: U32Array, any_writable: bool
) -> bool:
    """A sufficient check for single-descriptor batches, in four reductions: True if every
    buffer is non-empty, within ``max_len`` and, together, inside one slot (writable when any
    buffer is), so :func:`check_buffers` would accept them all."""
    nmin, nmax = int(lens.min()), int(lens.max())
    if nmin == 0 or nmax > max_len:
        return False
    lo, hi = int(addrs.min()), int(addrs.max())
    s = bisect.bisect_right(table.gpas, lo) - 1
    # Python ints: hi + nmax cannot wrap. Every buffer lies in [lo, hi + nmax).
    return (
        s >= 0
        and hi + nmax - 1 <= table.last_list[s]
        and (not any_writable or table.writable_list[s])
    )


def buffers_ok(
    table: SlotTable,
    max_len: int,
    addrs: list[int],
    lens: list[int],
    writable: list[bool],
    starts: list[int],
) -> bool:
    """The scalar paths' buffer check: True iff :func:`check_buffers` would accept the same
    segments (non-zero, within ``max_len``, no 2**64 overflow, inside one slot, writable ones
    in writable memory, no readable after a writable in a chain)."""
    gpas, lasts, wr = table.gpas, table.last_list, table.writable_list
    chain_heads = set(starts)
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


def buffer_ok(table: SlotTable, max_len: int, addr: int, length: int, writable: int) -> bool:
    """:func:`buffers_ok` of one single-buffer chain (the stop-and-wait case, unrolled)."""
    if not 0 < length <= max_len or addr + length > 1 << 64:
        return False
    s = bisect.bisect_right(table.gpas, addr) - 1
    return not (
        s < 0 or addr + length - 1 > table.last_list[s] or (writable and not table.writable_list[s])
    )
