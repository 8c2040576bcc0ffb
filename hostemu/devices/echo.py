"""``echo``: a loopback device -- every buffer the guest sends comes back to it.

Queue 0 (TX) carries device-readable buffers from the guest, queue 1 (RX) device-writable
buffers the guest posts for replies. Each TX buffer is copied, in arrival order, into the
next RX buffer, truncated to the RX buffer's size. A TX buffer is completed only once its
copy was delivered into an RX buffer (RX completed first): a completed TX buffer is an
acknowledged frame, and a device process that dies holding copies loses nothing
acknowledged -- its restarted successor resumes TX at the used index and takes those
buffers again (the guest drops a reply it already has). Copies wait in a bounded backlog
until RX buffers are available; when it is full the device stops taking TX buffers --
back-pressure, never loss. A device reset drops the backlog.

The guest chooses the buffer lengths (up to ``MAX_FRAME`` each), so the backlog is bounded in
bytes as well as in frames: the staging arrays it holds never total more than
``MAX_BACKLOG_BYTES`` (or one frame when nothing else is held, should a frame ever be larger
than the bound). A pass stages the TX buffers it took in pieces that fit what the bound leaves
(each piece as wide as its own widest frame); the chains that do not fit stay taken but
uncopied -- *deferred*, in flight, not completed, behind every staged copy -- and no new TX
buffer is taken while any are. They are staged as RX deliveries free room, or copied straight
into RX buffers once no staged copy is ahead of them.

When nothing waits in the backlog and RX buffers are posted, a pass takes at most as many TX
buffers as there are RX buffers and delivers them in the same pass: a few frames, or large
ones, are copied straight from each TX buffer into its RX buffer
(:meth:`~shared.virtio.DeviceRing.copy_payloads`: one copy, no staging array); many small
ones go through one vectorized gather into a staging array and one scatter out of it. With
the ``busy_poll_us`` option the runtime busy-polls the TX ring after each pass (see
:attr:`~hostemu.devices.runtime.DeviceRuntime.busy_poll`).

With the ``sink`` option the device echoes nothing: it is the far end of a one-way
guest -> host stream (the benchmark's small-message workload). Each pass copies the TX
buffers' bytes into device memory (one vectorized gather, as a receiving process gets its
own copy of each message), checks that the frames carry consecutive sequence numbers (the
first four bytes, little-endian, as :mod:`shared.frames` writes them) and
completes them at once. A frame out of sequence is counted (``seq_errors``), not fatal:
payload bytes are the guest's business, not a ring-protocol violation. RX is left alone.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from hostemu.devices.runtime import BUDGET, DeviceModel, DeviceRuntime, Queue, no_params
from shared import pci_layout as pl
from shared.errors import ConfigError
from shared.virtio import Batch, DeviceRing

TX, RX = 0, 1
MAX_FRAME = 16 << 20  # the ring's own per-buffer limit
MAX_PASS_BYTES = 64 << 20  # copy-out memory one pass may use (bounds big-buffer batches)
MAX_BACKLOG = 4096
# Bytes the backlog's staging arrays may hold in all (a frame is always allowed when nothing
# else is held): whatever the guest posts, the device's copies stay within this.
MAX_BACKLOG_BYTES = 64 << 20
SINK_PIECE_BYTES = 512 << 10
"""Sink mode: the device memory one piece of a pass is copied into, reused piece after
piece -- half the L2 cache of this machine kind's cores, so the copies' destination stays
in cache (the device's copy, not the memory, is then the limit)."""
SINK_FUSED_BYTES = 1 << 20
"""Sink mode on the compiled path: device memory for one pass -- a row per frame when they
fit, else each frame in turn at its start (the fused kernel declines frames bigger than
this; the reference reads them in pieces)."""
DIRECT_MAX_FRAMES = 16  # batches this small copy TX -> RX directly, frame by frame
DIRECT_MIN_SIZE = 4096  # and frames this large, whatever the batch


def _pieces(readable: list[int], room: int) -> list[tuple[int, int, int]]:
    """Consecutive pieces ``(lo, hi, width)`` of the chains with ``readable`` bytes, from
    the first: each staged as one ``(hi - lo, width)`` array, ``width`` its widest frame
    (at most ``MAX_FRAME``), all of them within ``room`` bytes. Stops at the first chain
    that fits no more (order: none may be staged after it)."""
    pieces: list[tuple[int, int, int]] = []
    lo = hi = top = 0
    for r in readable:
        r = min(MAX_FRAME, max(1, r))
        if (hi + 1 - lo) * max(top, r) > room:
            if hi == lo:
                break
            # close the piece (one wide frame must not widen the small ones before it);
            # this chain starts the next one if it fits alone
            pieces.append((lo, hi, top))
            room -= (hi - lo) * top
            lo, top = hi, 0
            if r > room:
                break
        top = max(top, r)
        hi += 1
    if hi > lo:
        pieces.append((lo, hi, top))
    return pieces


class EchoModel(DeviceModel):
    name = "echo"
    data_path = True
    kicks_announce_ring_work = True  # (a kick is a ring to look at: served before it is read)

    def __init__(self, busy_poll_ns: int = 0, *, sink: bool = False) -> None:
        self.busy_poll_ns = busy_poll_ns
        self.sink = sink
        self.next_seq = 0  # sink: the sequence number the next frame should carry
        self.seq_errors = 0
        self._sink_mem = np.empty(0, dtype=np.uint8)  # sink: device memory, reused
        # (TX heads, their copies, copied lengths, bytes the copies' array holds), oldest
        # first; the heads complete on delivery. The last field is the whole staging array's
        # size: a partly delivered entry keeps views into it, so it stays charged until popped.
        self.backlog: deque[
            tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any], int]
        ] = deque()
        self.backlog_bytes = 0  # sum of the entries' charges: <= MAX_BACKLOG_BYTES
        # TX chains taken but not copied yet (no room), newer than every staged copy, and the
        # ring they were taken from (a replaced ring can neither read nor complete them)
        self._deferred: Batch | None = None
        self._deferred_ring: DeviceRing | None = None
        self.backlog_frames = 0  # staged and deferred frames
        self._pass_limit = BUDGET
        self.echoed = 0
        self.bytes = 0
        # times frames were held with no RX buffer to deliver them (the device then waits
        # for the guest to post one): never, for a guest that keeps as many RX buffers
        # posted as it has frames in flight
        self.rx_waits = 0

    def attach(self, runtime: DeviceRuntime) -> None:
        super().attach(runtime)
        if self.busy_poll_ns:  # poll the request queue (TX) only: RX waits on us
            runtime.busy_poll = {TX: self.busy_poll_ns}

    def on_queue(self, q: Queue) -> bool:
        more = False
        if q.index == TX and self.sink:
            more = self._sink_tx(q)
        elif q.index == TX:
            more = self._take_tx(q)
            rx = self.runtime.queues.get(RX)
            if rx is not None and self.backlog_frames:
                more = self._fill_rx(rx) or more
        elif q.index == RX:
            more = self._fill_rx(q)
            tx = self.runtime.queues.get(TX)
            if tx is not None and self.backlog_frames < MAX_BACKLOG:
                self.runtime.schedule(TX)  # room again: take what back-pressure left
        return more

    def _take_tx(self, q: Queue) -> bool:
        if self._deferred_tx() is not None:
            # Chains taken earlier wait for room: stage what fits now, take nothing new
            # before they are all copied (order). Once they are, take more next pass.
            self._stage_deferred(q)
            return self._deferred is None
        room = min(BUDGET, MAX_BACKLOG - self.backlog_frames, self._pass_limit)
        if room <= 0 or self.backlog_bytes >= MAX_BACKLOG_BYTES:
            return False  # back-pressure (frames or bytes): RX deliveries reschedule us
        rx = self.runtime.queues.get(RX)
        kernels = q.ring.kernels
        if kernels is not None and rx is not None and not self.backlog_frames:
            # The compiled path: the direct pass below (or the staged one, whose result is
            # the same bytes and completions) in one fused kernel; None if it declined (no
            # RX buffer, an unusual ring) having changed nothing -- then the reference.
            done = kernels.forward(q.ring, rx.ring, room, MAX_FRAME)
            if done is not None:
                taken, nbytes, rx_interrupt, tx_interrupt, more, width = done
                if not taken:
                    return more  # nothing there; notifications back on, re-checked
                self._pass_limit = max(1, MAX_PASS_BYTES // min(MAX_FRAME, width))
                # RX completed first: a completed TX buffer is a delivered frame
                self.runtime.used_published(rx, rx_interrupt)
                self.runtime.used_published(q, tx_interrupt)
                self.echoed += taken
                self.bytes += nbytes
                return True
        q.ring.disable_notifications()
        # Direct path: nothing waits in the backlog (so order holds) and RX buffers are
        # posted: take at most as many TX buffers as there are RX buffers and copy each
        # straight into its RX buffer -- one copy, no staging array.
        direct = 0
        if not self.backlog_frames and rx is not None and not rx.ring.broken:
            direct = min(room, rx.ring.available())
        batch = q.ring.pop_batch(max_n=direct or room)
        if len(batch) == 0:
            return q.ring.enable_notifications()  # re-check: no lost kick
        width = min(MAX_FRAME, max(1, max(batch.readable_list)))
        # next pass: as many buffers of this size as fit the per-pass copy budget
        self._pass_limit = max(1, MAX_PASS_BYTES // width)
        rx_batch = rx.ring.pop_batch(max_n=len(batch)) if direct and rx is not None else None
        if (
            rx is not None
            and rx_batch is not None
            and len(rx_batch) == len(batch)
            and (len(batch) <= DIRECT_MAX_FRAMES or width >= DIRECT_MIN_SIZE)
        ):
            lens = q.ring.copy_payloads(batch, rx.ring, rx_batch, width)
            if len(lens) == len(batch):
                self._delivered(q, batch.head_list, rx, rx_batch.head_list, lens)
            return True
        # Staged: many small frames (one vectorized gather and one scatter beat a slice copy
        # per frame), no RX buffer, or a backlog to keep the order behind. Whatever does not
        # fit the byte bound stays deferred (taken, in flight) behind the staged copies.
        self.backlog_frames += len(batch)
        self._deferred, self._deferred_ring = batch, q.ring
        self._stage_deferred(q, width)
        if rx is not None and rx_batch is not None and len(rx_batch):
            self._deliver(rx, rx_batch)  # these take the copies just made, oldest first
        return True

    def _deferred_tx(self) -> Queue | None:
        """The TX queue the deferred chains can still be read from; ``None`` if there are
        none -- or they are dropped here because their ring was replaced, disabled or broke:
        they can never be copied nor completed there (only a reset restarts the queue)."""
        deferred = self._deferred
        if deferred is None:
            return None
        tx = self.runtime.queues.get(TX)
        if tx is not None and tx.ring is self._deferred_ring and not tx.ring.broken:
            return tx
        self.backlog_frames -= len(deferred)
        self._deferred = self._deferred_ring = None
        return None

    def _stage_deferred(self, q: Queue, width: int = 0) -> None:
        """Copy deferred chains, oldest first, into staging arrays in the backlog: as many
        as ``MAX_BACKLOG_BYTES`` leaves room for (one at the least when nothing is held);
        the rest stay deferred. ``width``: the deferred chains' widest frame, if known."""
        batch = self._deferred
        if batch is None:
            return
        n = len(batch)
        if not width:
            width = min(MAX_FRAME, max(1, max(batch.readable_list)))
        room = MAX_BACKLOG_BYTES - self.backlog_bytes
        if n * width <= room:  # the common case: all of it, one array
            pieces = [(0, n, width)]
        else:
            readable = batch.readable_list
            pieces = _pieces(readable, room)
            if not pieces and not self.backlog:  # nothing held: one frame always goes
                pieces = [(0, 1, min(MAX_FRAME, max(1, readable[0])))]
        done = 0
        for lo, hi, w in pieces:
            piece = batch if hi - lo == n else batch.rows(lo, hi)
            data, copied = q.ring.read_payloads(piece, w)
            if len(copied) != hi - lo:
                # The read broke TX (reported by the runtime): these chains can never be
                # completed; a reset drops the rest.
                self.backlog_frames -= n - lo
                self._deferred = self._deferred_ring = None
                return
            self.backlog.append((piece.heads, data, copied, data.nbytes))
            self.backlog_bytes += data.nbytes
            done = hi
        if done == n:
            self._deferred = self._deferred_ring = None
        elif done:
            self._deferred = batch.rows(done, n)

    def _sink_tx(self, q: Queue) -> bool:
        """Sink mode: copy the TX buffers into device memory, check their sequence numbers,
        complete them. The copies go through one reused buffer of at most
        ``MAX_PASS_BYTES`` (plus one frame): a batch of many big buffers is read in pieces,
        so no guest can make the device hold more."""
        kernels = q.ring.kernels
        if kernels is not None:
            # The compiled path: the whole pass in one fused kernel; None if it declined
            # (an unusual ring or big frames) having changed nothing -- then the reference.
            room = min(SINK_FUSED_BYTES, MAX_PASS_BYTES)  # (it declines what does not fit)
            if self._sink_mem.shape[0] < room:
                self._sink_mem = np.empty(room, dtype=np.uint8)
            done = kernels.consume(q.ring, self._sink_mem, self.next_seq, BUDGET, MAX_FRAME)
            if done is not None:
                taken, nbytes, errors, interrupt, more, _ = done
                if not taken:
                    return more  # nothing there; notifications back on, re-checked
                self.next_seq += taken
                self.seq_errors += errors
                self.echoed += taken
                self.bytes += nbytes
                self.runtime.used_published(q, interrupt)
                return True
        q.ring.disable_notifications()
        batch = q.ring.pop_batch(max_n=BUDGET)
        n = len(batch)
        if n == 0:
            return q.ring.enable_notifications()  # re-check: no lost kick
        width = min(MAX_FRAME, max(1, max(batch.readable_list)))
        # per piece: few enough rows that the reused copy buffer stays cache-sized (big
        # frames are read one at a time into the same warm memory)
        rows = max(1, min(MAX_PASS_BYTES, SINK_PIECE_BYTES) // width)
        if self._sink_mem.shape[0] < min(n, rows) * width:  # grow; then reused, pages warm
            self._sink_mem = np.empty(min(n, rows) * width, dtype=np.uint8)
        total = 0
        for lo in range(0, n, rows):
            piece = batch if n <= rows else batch.rows(lo, lo + rows)
            k = len(piece)
            data, copied = q.ring.read_payloads(
                piece, width, out=self._sink_mem[: k * width].reshape(k, width)
            )
            if len(copied) != k:
                return False  # the read broke the ring (reported by the runtime)
            self._check_seqs(data, copied)
            total += int(copied.sum())
        self.runtime.complete(
            q,
            batch.head_list if n <= 8 else batch.heads,
            [0] * n if n <= 8 else np.zeros(n, np.uint32),
        )
        self.echoed += n
        self.bytes += total
        return True

    def _check_seqs(self, data: np.ndarray[Any, Any], copied: np.ndarray[Any, Any]) -> None:
        """Count the frames of ``data`` not carrying the next sequence numbers (or too
        short to carry one); advance the expected number past them."""
        n, first = data.shape[0], self.next_seq
        if data.shape[1] >= 4 and n > 8:
            seqs = data[:, :4].copy().view("<u4")[:, 0]
            expected = np.arange(first, first + n, dtype=np.uint64) & 0xFFFFFFFF
            self.seq_errors += int(np.count_nonzero((seqs != expected) | (copied < 4)))
        else:
            for i in range(n):
                seq = int.from_bytes(data[i, :4].tobytes(), "little") if copied[i] >= 4 else -1
                self.seq_errors += int(seq != (first + i) & 0xFFFFFFFF)
        self.next_seq = first + n

    def _delivered(
        self,
        tx: Queue,
        tx_heads: np.ndarray[Any, Any] | list[int],
        rx: Queue,
        rx_heads: np.ndarray[Any, Any] | list[int],
        lens: np.ndarray[Any, Any],
    ) -> None:
        """Complete RX buffers ``rx_heads`` with ``lens`` bytes, then -- delivered -- the TX
        buffers whose copies they hold."""
        n = len(rx_heads)
        self.runtime.complete(rx, rx_heads, lens)
        if not tx.ring.broken:
            self.runtime.complete(tx, tx_heads, [0] * n if n <= 8 else np.zeros(n, np.uint32))
        self.echoed += n
        self.bytes += int(lens.sum()) if n > 8 else sum(lens.tolist())

    def _fill_rx(self, q: Queue) -> bool:
        """Deliver held frames into RX buffers. RX kicks are wanted only while frames wait
        for a buffer: otherwise a TX pass looks at RX itself, and a kick per reposted
        buffer would wake this process for nothing."""
        self._deferred_tx()  # (drops deferred chains that can no longer be read)
        if self.backlog_frames:
            deferred = self._deferred
            if self.backlog:  # the staged copies first; the deferred chains on a later pass
                want = self.backlog_frames - (len(deferred) if deferred is not None else 0)
            else:  # only deferred chains: straight TX -> RX, within the per-pass copy budget
                assert deferred is not None
                width = min(MAX_FRAME, max(1, max(deferred.readable_list)))
                want = min(len(deferred), max(1, MAX_PASS_BYTES // width))
            batch = q.ring.pop_batch(max_n=min(BUDGET, want))
            if len(batch) == 0:
                self.rx_waits += 1
                return q.ring.enable_notifications()  # re-check: no lost kick
            self._deliver(q, batch)
            if self.backlog_frames:
                return True
        q.ring.disable_notifications()
        return False

    def _deliver(self, q: Queue, batch: Batch) -> None:
        """Fill RX ``batch`` (at most as many buffers as frames are held) in TX order: from
        the backlog's staged copies, oldest first, then from the deferred chains, copied
        straight from their TX buffers."""
        n, lo = len(batch), 0
        while lo < n:
            if self.backlog:
                k = self._deliver_staged(q, batch, lo)
            elif self._deferred is not None:
                k = self._deliver_deferred(q, batch, lo)
            else:
                break
            if not k:
                return  # a copy broke a ring (reported by the runtime)
            lo += k

    def _deliver_staged(self, q: Queue, batch: Batch, lo: int) -> int:
        """Fill RX chains ``lo:`` of ``batch`` from the backlog's first entry; return how
        many (0 if the write broke RX: the copies stay queued)."""
        heads, data, copied, charge = self.backlog[0]
        k = min(len(batch) - lo, len(copied))
        rx = batch if k == len(batch) else batch.rows(lo, lo + k)
        # truncated to the RX buffer's size (a guest may post small ones)
        lens = q.ring.write_payloads(rx, data[:k], np.minimum(copied[:k], rx.writable_lens))
        if len(lens) != k:
            return 0
        tx = self.runtime.queues.get(TX)
        if tx is not None:
            # Delivered: only now acknowledge the TX buffers (after the RX used entries).
            self._delivered(tx, heads[:k], q, rx.heads, lens)
        else:
            self.runtime.complete(q, rx.heads, lens)
            self.echoed += k
            self.bytes += int(np.sum(lens))
        if k == len(copied):
            self.backlog.popleft()
            self.backlog_bytes -= charge  # the whole staging array is released
        else:
            self.backlog[0] = (heads[k:], data[k:], copied[k:], charge)
        self.backlog_frames -= k
        return k

    def _deliver_deferred(self, q: Queue, batch: Batch, lo: int) -> int:
        """Copy the first deferred chains straight into RX chains ``lo:`` of ``batch`` --
        no staged copy is ahead of them; return how many (0 if they can no longer be read
        or the copy broke a ring)."""
        tx = self._deferred_tx()
        deferred = self._deferred
        if tx is None or deferred is None:
            return 0
        k = min(len(batch) - lo, len(deferred))
        rx = batch if k == len(batch) else batch.rows(lo, lo + k)
        piece = deferred if k == len(deferred) else deferred.rows(0, k)
        width = min(MAX_FRAME, max(1, max(piece.readable_list)))
        lens = tx.ring.copy_payloads(piece, q.ring, rx, width)
        if len(lens) != k:
            return 0
        if k == len(deferred):
            self._deferred = self._deferred_ring = None
        else:
            self._deferred = deferred.rows(k, len(deferred))
        self.backlog_frames -= k
        self._delivered(tx, piece.head_list, q, rx.head_list, lens)
        return k

    def on_reset(self) -> None:
        self.backlog.clear()
        self.backlog_bytes = 0
        self._deferred = self._deferred_ring = None  # still in flight on the reset ring
        self.backlog_frames = 0
        self.next_seq = 0  # a reset guest starts its frames again at 0

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "echoed": self.echoed,
            "bytes": self.bytes,
            "backlog": self.backlog_frames,
            "backlog_bytes": self.backlog_bytes,
            "rx_waits": self.rx_waits,
        }
        if self.sink:
            out.update(sunk=self.echoed, seq_errors=self.seq_errors)
        return out


DEVICE_ID = pl.DEVICE_ECHO
QUEUES = 2
VECTORS = 2


MAX_BUSY_POLL_US = 1_000_000


def make_model(params: dict[str, Any]) -> DeviceModel:
    """Options: ``busy_poll_us`` (default 0): the TX queue's busy-polling window
    (:attr:`~hostemu.devices.runtime.DeviceRuntime.busy_poll`); ``sink`` (default false):
    consume TX frames instead of echoing them (see the module docstring); nothing else."""
    options = dict(params)
    busy = options.pop("busy_poll_us", 0)
    sink = options.pop("sink", False)
    no_params("echo", options)
    if not isinstance(sink, bool):
        raise ConfigError(f"echo: sink must be true or false, got {sink!r}")
    if isinstance(busy, bool) or not isinstance(busy, int) or not 0 <= busy <= MAX_BUSY_POLL_US:
        raise ConfigError(
            f"echo: busy_poll_us must be an integer in 0..{MAX_BUSY_POLL_US}, got {busy!r}"
        )
    return EchoModel(busy_poll_ns=busy * 1000, sink=sink)
