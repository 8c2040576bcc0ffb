"""The device (host) side of a split ring: :class:`DeviceRing` -- its indices, taking
requests (pop), completing them (push) and notifications.

The device owns (writes) the used ring and only reads the descriptor table and the
available ring, which it does not trust (:mod:`shared.virtio.chains`).

Invariants
----------
* A head is in flight at most once;
  ``(last_avail - next_used) mod 2**16 == in_flight <= Q``.
* Every segment in a :class:`~shared.virtio.Batch` lies inside one guest memory slot and was
  validated; the device reads guest memory only through
  :meth:`~shared.memory.GuestMemoryMap.translate`, which checks bounds.
* ``broken`` is sticky until :meth:`DeviceRing.reset`; while set, no operation touches guest
  memory and every operation is a no-op returning "nothing" (empty batch, ``False``). A
  broken ring never raises into the caller's loop; the caller reports
  :attr:`DeviceRing.broken` to the VMM (virtio's ``NEEDS_RESET``).
* Work per pass is bounded by ``max_n`` chains and about ``max_descriptors`` descriptors, so
  a kick storm cannot monopolise the device.
* Mistakes of *our own* side (completing a buffer that is not in flight or twice, a length
  beyond what the chain can hold) are :class:`~shared.errors.UsageError`, raised before
  anything is written.

Theory of operation
-------------------
Read ``avail.idx`` once, take the heads between the private ``last_avail`` and it, read every
descriptor once into a private copy and validate it (:mod:`shared.virtio.chains`), do the I/O
(:mod:`shared.virtio.payload`), then write ``{id, len}`` into ``used.ring[used.idx % Q]`` and
publish ``used.idx += n``; :meth:`DeviceRing.push_used` returns whether to interrupt the
driver. The ordering points are described in :mod:`shared.virtio.ordering`.

Fast paths: operations on at most :data:`SCALAR_MAX` chains use plain Python ints instead of
numpy calls (``_pop_scalar`` and ``_pop_one`` beside :meth:`DeviceRing.pop_batch`,
``_push_scalar`` beside :meth:`DeviceRing.push_used`); they read the same bytes once, make the
same checks in the same order and leave the same state as the vectorized paths, which remain
the reference (a failed scalar check hands the same data to the vectorized check for the exact
reason). ``fast_path=False`` turns them off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from shared.errors import MemoryAccessError, UsageError
from shared.memory import GuestMemoryMap
from shared.virtio import payload
from shared.virtio.args import (
    I64_MAX,
    KERNEL_OVER,
    check_int,
    index_array,
    private_array,
    small_ints,
    use_jit,
)
from shared.virtio.batch import Batch, empty_batch, make_batch, simple_batch
from shared.virtio.chains import (
    MAX_BUFFER_LEN,
    WRITE_OR_CONTINUE,
    Desc,
    RingBroken,
    buffer_ok,
    buffers_ok,
    check_buffers,
    simple_ok,
    walk_chains,
)
from shared.virtio.layout import (
    DESC_SIZE,
    DESC_STRUCT,
    INDEX_MASK,
    MAX_QUEUE_SIZE,
    NATIVE_LE,
    USED_ELEM_SIZE,
    USED_STRUCT,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    I64Array,
    RingLayout,
    U8Array,
    U32Array,
    need_event,
    placement_problem,
    ring_area_sizes,
    ring_views,
    valid_queue_size,
)
from shared.virtio.ordering import full_barrier
from shared.virtio.slots import SlotCache

if TYPE_CHECKING:
    from shared.virtio.compiled import DeviceKernels

SCALAR_MAX: Final = 32
"""Device-side operations on at most this many chains take the *scalar* paths: plain Python
ints read and written through ``memoryview``/``struct`` instead of numpy calls. A numpy call
costs about a microsecond whatever its size, and the vectorized paths make a dozen or more
per operation, which dominates small batches (round trips, batch-1 traffic); past a few
dozen chains the vectorized paths win. (Per operation in isolation the crossovers are
~12-16 chains, but end to end -- the echo device at 64 B batch 16 -- 32 measured best: the
scalar path's lazily-built :class:`~shared.virtio.Batch` saves its consumers conversions.)
Both paths read the same bytes once, make the same checks in the same order, raise or break
with the same messages and leave the same state (tests/unit/test_ring_scalar.py runs random
programs, hostile ones included, through both and compares)."""


class DeviceRing:
    """The host device's side of one split ring; everything read from the guest is untrusted.

    ``desc_gpa``, ``avail_gpa``, ``used_gpa`` are where the guest put the three areas; they
    must be 16-, 2- and 4-aligned, lie in guest memory and the used ring must be writable.
    Those addresses come from the guest, so a bad one does not raise: the ring starts
    broken. ``qsize``, ``event_idx``, ``start_index`` and ``max_buffer_len`` are the VMM's
    configuration (it validates the guest's queue-size register with
    :func:`valid_queue_size`): bad values are :class:`UsageError`. ``fast_path=False`` makes
    every operation take the vectorized path (the reference the scalar fast paths are tested
    against).

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
        fast_path: bool = True,
        jit: bool | None = None,
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
        self._start = check_int(start_index, "start_index", 0, INDEX_MASK)
        self._max_len = check_int(max_buffer_len, "max_buffer_len", 1, 0xFFFFFFFF)
        self._gpas = (
            check_int(desc_gpa, "desc_gpa", 0, (1 << 64) - 1),
            check_int(avail_gpa, "avail_gpa", 0, (1 << 64) - 1),
            check_int(used_gpa, "used_gpa", 0, (1 << 64) - 1),
        )
        # Private bookkeeping, each as a numpy array and a memoryview over the same bytes.
        self._in_flight, self._in_flight_mv = private_array(qsize, np.bool_, "B")
        self._wcap, self._wcap_mv = private_array(qsize, np.int64, "q")
        self._scalar_max = SCALAR_MAX if fast_path and NATIVE_LE else 0
        self._slots = SlotCache(mem)
        self._num_in_flight = 0
        self._last_avail = 0
        self._next_used = 0
        self._notify_enabled = True
        self._used_flags_shadow = 0
        self._broken: str | None = None
        self._jit = use_jit(jit)
        # With the kernels, batches past a few chains go to them (a kernel call costs about
        # what the scalar path spends on four chains); payload copies keep _scalar_max.
        self._ops_scalar_max = min(self._scalar_max, KERNEL_OVER) if self._jit else self._scalar_max
        self._kernels: DeviceKernels | None = None
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
        fast_path: bool = True,
        jit: bool | None = None,
    ) -> DeviceRing:
        """A device ring over a contiguous :class:`RingLayout` placed at ``ring_gpa``."""
        desc, avail, used = layout.addresses(check_int(ring_gpa, "ring_gpa", 0, (1 << 64) - 1))
        return cls(
            mem,
            desc,
            avail,
            used,
            layout.qsize,
            event_idx=event_idx,
            start_index=start_index,
            max_buffer_len=max_buffer_len,
            fast_path=fast_path,
            jit=jit,
        )

    def _attach(self) -> None:
        """Translate the three areas once; a bad guest address leaves the ring broken."""
        q = self._q
        desc_gpa, avail_gpa, used_gpa = self._gpas
        sizes = ring_area_sizes(q)
        try:
            problem = placement_problem(q, desc_gpa, avail_gpa, used_gpa)
            if problem is not None:
                raise RingBroken(problem)
            try:
                desc = self._mem.translate(desc_gpa, sizes[0])
                avail = self._mem.translate(avail_gpa, sizes[1])
                used = self._mem.translate(used_gpa, sizes[2])
            except (MemoryAccessError, UsageError) as e:
                raise RingBroken(f"ring area outside guest memory: {e}") from None
            if not used.flags.writeable:
                raise RingBroken(f"used ring at {used_gpa:#x} is in read-only memory")
        except RingBroken as e:
            self._broken = str(e)
            # Private zeroed stand-ins keep every view valid; nothing reads them while broken.
            desc = np.zeros(sizes[0], dtype=np.uint8)
            avail = np.zeros(sizes[1], dtype=np.uint8)
            used = np.zeros(sizes[2], dtype=np.uint8)
        v = ring_views(desc, avail, used, q)
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
        # The same areas for the scalar paths (see RingViews).
        self._desc_mv = v.desc_mv
        self._avail_hdr16 = v.avail_hdr16
        self._avail_ring16 = v.avail_ring16
        self._used_event16 = v.used_event16
        self._used_hdr16 = v.used_hdr16
        self._used_ring_mv = v.used_ring_mv
        if self._jit:
            from shared.virtio.compiled import DeviceKernels

            self._kernels = DeviceKernels(desc, avail, used, q)

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
    def kernels(self) -> DeviceKernels | None:
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
        return empty_batch()

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
            return empty_batch()
        limit = self._q if max_n is None else check_int(max_n, "max_n", 0, 1 << 62)
        budget = (
            self._q
            if max_descriptors is None
            else check_int(max_descriptors, "max_descriptors", 1, 1 << 62)
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
            return empty_batch()
        if k <= self._ops_scalar_max:
            return self._pop_scalar(k, budget)
        if self._kernels is not None:
            compiled = self._kernels.pop(self, k)
            if compiled is not None:
                return compiled
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
            if not ored & WRITE_OR_CONTINUE:
                taken = k
                addrs = descs["addr"]
                lens = descs["len"]
                wflags = dflags & VRING_DESC_F_WRITE
                if not simple_ok(
                    self._slots.table(),
                    self._max_len,
                    addrs,
                    lens,
                    bool(ored & VRING_DESC_F_WRITE),
                ):
                    # The full check is the reference: it raises with the exact reason.
                    check_buffers(
                        self._slots.table(),
                        self._max_len,
                        addrs,
                        lens,
                        wflags != 0,
                        np.arange(k + 1),
                    )
                batch = simple_batch(heads, addrs, lens, wflags)
            else:
                taken, st, a, n_, w = walk_chains(
                    self._mem, self._desc_mv, self._q, heads.tolist(), descs.tolist(), budget
                )
                heads = heads[:taken]
                starts = np.asarray(st, dtype=np.int64)
                addrs = np.asarray(a, dtype=np.uint64)
                lens = np.asarray(n_, dtype=np.uint32)
                writable = np.asarray(w, dtype=np.bool_)
                check_buffers(self._slots.table(), self._max_len, addrs, lens, writable, starts)
                batch = make_batch(heads, starts, addrs, lens, writable)
        except RingBroken as e:
            return self._break(str(e))
        self._in_flight[heads] = True
        self._wcap[heads] = batch.writable_lens
        self._took(taken)
        return batch

    def _pop_scalar(self, k: int, budget: int) -> Batch:
        """:meth:`pop_batch` of ``k`` (a few) chains with plain ints: the same single read of
        every entry and descriptor, the same checks in the same order, the same reasons and
        the same :class:`Batch` as the vectorized path, without numpy's per-call cost."""
        q, mask, last = self._q, self._mask, self._last_avail
        ring = self._avail_ring16
        in_flight = self._in_flight_mv
        if k == 1:  # the stop-and-wait case, without the loops
            # load->load: avail.idx was read (by the caller) before the ring entry it
            # publishes; x86 does not reorder loads with loads. Read once.
            h = ring[last & mask]
            if h >= q:
                return self._break(f"head {h} out of range (queue size {q})")
            if in_flight[h]:
                return self._break(f"head {h} made available again while in flight")
            # The head descriptor read exactly once, into a private tuple.
            desc = DESC_STRUCT.unpack_from(self._desc_mv, h * DESC_SIZE)
            if not desc[2] & WRITE_OR_CONTINUE:
                batch = self._pop_one(h, desc)
                if batch is not None:
                    return batch
            heads, descs = [h], [desc]
        else:
            # load->load as above; each entry read once.
            heads = [ring[(last + j) & mask] for j in range(k)]
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
            unpack, dmv = DESC_STRUCT.unpack_from, self._desc_mv
            descs = [unpack(dmv, h * DESC_SIZE) for h in heads]
        try:
            if not any(d[2] & WRITE_OR_CONTINUE for d in descs):
                taken = k
                starts = list(range(k + 1))
                addrs = [d[0] for d in descs]
                lens = [d[1] for d in descs]
                writable = [bool(d[2] & VRING_DESC_F_WRITE) for d in descs]
            else:
                taken, starts, addrs, lens, writable = walk_chains(
                    self._mem, self._desc_mv, q, heads, descs, budget
                )
                heads = heads[:taken]
            if not buffers_ok(self._slots.table(), self._max_len, addrs, lens, writable, starts):
                # The vectorized check is the reference: it raises with the exact reason.
                check_buffers(
                    self._slots.table(),
                    self._max_len,
                    np.array(addrs, dtype=np.uint64),
                    np.array(lens, dtype=np.uint32),
                    np.array(writable, dtype=np.bool_),
                    np.array(starts, dtype=np.int64),
                )
        except RingBroken as e:
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

    def _pop_one(self, head: int, desc: Desc) -> Batch | None:
        """Take one single-descriptor chain whose buffer passes :func:`buffer_ok`; ``None``
        (nothing taken) if it does not -- the caller then goes the general way, which finds
        the reason."""
        addr, length, flags, _ = desc
        w = flags & VRING_DESC_F_WRITE
        if not buffer_ok(self._slots.table(), self._max_len, addr, length, w):
            return None
        cap = length if w else 0
        self._in_flight_mv[head] = 1
        self._wcap_mv[head] = cap
        self._took(1)
        return Batch._of_lists([head], [0, 1], [addr], [length], [w], [length - cap], [cap])

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
        w = check_int(width, "width", 0, 1 << 40)
        if (
            self._kernels is not None
            and self._broken is None
            and len(batch) > KERNEL_OVER
            and batch.simple
            and payload.valid_out(out, len(batch), w)
        ):
            compiled = self._kernels.read(self, batch, w, out)
            if compiled is not None:
                return compiled
        try:
            return payload.read_payloads(
                self._mem,
                self._slots,
                batch,
                w,
                out,
                scalar_max=self._scalar_max,
                usable=self._broken is None,
            )
        except MemoryAccessError as e:
            self._break(f"guest memory changed under in-flight buffers: {e}")
            return np.zeros((0, w), dtype=np.uint8), np.zeros(0, dtype=np.int64)

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
        try:
            return payload.write_payloads(
                self._mem,
                self._slots,
                batch,
                data,
                lens,
                scalar_max=self._scalar_max,
                usable=self._broken is None,
            )
        except MemoryAccessError as e:
            self._break(f"guest memory changed under in-flight buffers: {e}")
            return np.zeros(0, dtype=np.uint32)

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
        w = check_int(width, "width", 0, 1 << 40)
        n = len(dst_batch)
        if n > len(batch):
            raise UsageError(f"{n} destination chains for {len(batch)} source chains")
        if self._broken is not None or dst._broken is not None:
            return np.zeros(0, dtype=np.uint32)
        if self._kernels is not None and n > KERNEL_OVER and batch.simple and dst_batch.simple:
            copied = self._kernels.copy(self, batch, dst, dst_batch, w)
            if copied is not None:
                return copied
        try:
            return payload.copy_payloads(self._mem, batch, dst._mem, dst_batch, w)
        except payload.CopyFault as e:
            (dst if e.to_destination else self)._break(
                f"guest memory changed under in-flight buffers: {e.error}"
            )
            return np.zeros(0, dtype=np.uint32)

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
            i_l = small_ints(ids, "ids", self._scalar_max, I64_MAX)
            n_l = small_ints(lens, "lens", self._scalar_max, I64_MAX) if i_l is not None else None
            if (
                i_l is not None
                and n_l is not None
                and len(i_l) == len(n_l)
                and (len(i_l) <= self._ops_scalar_max or self._broken is not None)
            ):
                return self._push_scalar(i_l, n_l)
        i = index_array(ids, "ids")
        n = index_array(lens, "lens")
        if i.shape != n.shape:
            raise UsageError(f"{i.shape[0]} ids but {n.shape[0]} lengths")
        if self._broken is not None or i.shape[0] == 0:
            return False
        if self._kernels is not None:
            compiled = self._kernels.push(self, i, n)
            if compiled is not None:
                return compiled
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
        pack, mv, mask = USED_STRUCT.pack_into, self._used_ring_mv, self._mask
        for j, (i, n) in enumerate(zip(ids, lens, strict=True)):
            pack(mv, USED_ELEM_SIZE * ((old + j) & mask), i, n)
            in_flight[i] = 0
        # store->store: the used elements above are stored before used.idx; x86 keeps
        # stores in order, so a driver that sees the new index sees the entries.
        self._used_hdr16[1] = new
        self._next_used = new
        self._num_in_flight -= count
        # store->load: used.idx must be globally visible before we read used_event /
        # avail.flags. Otherwise the driver may re-enable interrupts and re-read a stale
        # used.idx while we read its stale "no interrupt": both sleep, a lost wakeup.
        full_barrier()
        if self._event_idx:
            return need_event(self._used_event16[0], new, old)
        return not self._avail_hdr16[0] & VRING_AVAIL_F_NO_INTERRUPT

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
