"""The ``echo`` workload: send ``count`` frames of ``size`` bytes through the echo device
in batches and check that each comes back exactly once, in order, intact. Every frame carries its
sequence number and a checksum of its payload (:mod:`shared.frames`). The
workload keeps the RX queue full, sends as fast as TX buffers free up, and halts only when
nothing can progress -- re-enabling interrupts first and re-checking the rings, so no
completion is ever slept through.

Two ways to write and verify frames, the same frames either way:

* *vectorized* (many small frames at once): :func:`~shared.frames.stamp` into
  a staging array copied into the TX buffers, and the received frames copied out of the RX
  buffers and verified by :func:`~shared.frames.check` (sequence number,
  length, checksum recomputed over every payload byte);
* *in place* (a few frames, or large ones): :func:`stamp_row` writes each frame straight
  into its TX buffer and :func:`check_row` verifies it straight in its RX buffer, before the
  buffer is reposted: the sequence number, the length, the checksum field, and *every*
  payload byte compared with the bytes :func:`~shared.frames.stamp` derives from
  the sequence number -- stricter than recomputing the checksum, and without the staging
  copies. The payload ``frames.stamp`` derives from a sequence number is the top byte of
  ``seq * 2654435761 + i`` (u32), which is constant over runs of 2**24 bytes, so a frame is
  written with one or two fills and compared as 64-bit words. A few small frames (at most
  ``BYTES_MAX_SIZE``) are built whole as ``bytes`` (:func:`frame_bytes`), stored with one
  slice store each and compared whole with the expected bytes -- numpy's per-call cost
  dominates at that size.

With ``sink`` the frames go one way: the device consumes them (its ``sink`` option) and a
frame is done when its TX buffer comes back; the device checks the sequence numbers.
"""

from __future__ import annotations

import os
import struct
import time
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from guestemu import pci
from guestemu.drivers import GuestRam, PacketQueues, boot, find
from guestemu.workloads import check_choice, check_int
from shared import pci_layout as pl
from shared.errors import VbusError
from shared.frames import HEADER, MULTIPLIER, check, stamp

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

_MULT: Final = MULTIPLIER
_RUN: Final = 1 << 24  # the payload byte is the top byte of a u32: constant over 2**24 steps
_HDR: Final = struct.Struct("<II")  # seq, checksum
IN_PLACE_MAX_FRAMES: Final = 4
"""Batches of at most this many frames are written and verified in place (numpy's per-call
cost makes the vectorized path slower there)."""
IN_PLACE_MIN_SIZE: Final = 4096
"""Frames at least this large are always written and verified in place (the staging copies
and the per-byte checksum would cost more than the frames' own copies)."""
_SMALL_PAYLOAD: Final = 512  # below this, compare payload bytes as a bytes object
MAX_RTT_SAMPLES: Final = 5000
"""Round-trip times reported whole (``rtt_us``, for distributions) up to this many."""
BYTES_MAX_FRAMES: Final = 16
BYTES_MAX_SIZE: Final = 512
"""A few frames at most this large are built as ``bytes`` (:func:`frame_bytes`) and
stored with one slice store each (:meth:`~guestemu.drivers.PacketQueues.send_bytes`)."""


def payload_runs(seq: int, length: int) -> list[tuple[int, int, int]]:
    """The ``length`` payload bytes :func:`~shared.frames.stamp` derives from
    ``seq``, as runs ``(start, stop, byte)``: byte ``i`` is the top byte of the u32
    ``seq * 2654435761 + i``."""
    base = (seq * _MULT) & 0xFFFFFFFF
    runs = []
    pos, value, step = 0, base >> 24, _RUN - (base & (_RUN - 1))
    while pos < length:
        stop = min(length, pos + step)
        runs.append((pos, stop, value))
        pos, value, step = stop, (value + 1) & 0xFF, _RUN
    return runs


def _checksum(runs: list[tuple[int, int, int]]) -> int:
    return sum(value * (stop - start) for start, stop, value in runs) & 0xFFFFFFFF


def frame_bytes(seq: int, size: int) -> bytes:
    """Frame ``seq`` of ``size`` bytes (at most ``HEADER + 2**24``) as a ``bytes`` object,
    byte for byte what :func:`~shared.frames.stamp` writes: the small-frame
    path, where building bytes and one slice store beat numpy's per-call cost. The payload
    is at most two constant runs (it is shorter than a run)."""
    n = size - HEADER
    base = (seq * _MULT) & 0xFFFFFFFF
    value = base >> 24
    first = _RUN - (base & (_RUN - 1))  # bytes before the top byte steps
    if first >= n:
        payload = bytes((value,)) * n
        total = value * n
    else:
        nxt = (value + 1) & 0xFF
        payload = bytes((value,)) * first + bytes((nxt,)) * (n - first)
        total = value * first + nxt * (n - first)
    return _HDR.pack(seq & 0xFFFFFFFF, total & 0xFFFFFFFF) + payload


def stamp_row(row: np.ndarray[Any, Any], seq: int) -> None:
    """Write frame ``seq`` into ``row`` (a 1-D uint8 buffer of the frame size), byte for byte
    what :func:`~shared.frames.stamp` writes."""
    runs = payload_runs(seq, row.shape[0] - HEADER)
    for start, stop, value in runs:
        row[HEADER + start : HEADER + stop] = value
    row[:HEADER] = np.frombuffer(_HDR.pack(seq & 0xFFFFFFFF, _checksum(runs)), np.uint8)


def _run_matches(seg: np.ndarray[Any, Any], value: int) -> bool:
    """Whether every byte of ``seg`` is ``value`` (compared as 64-bit words, then the tail)."""
    n = seg.shape[0]
    words = n // 8
    if words and not bool(
        (seg[: words * 8].view(np.uint64) == np.uint64(value * 0x0101010101010101)).all()
    ):
        return False
    return bool((seg[words * 8 :] == value).all())


def check_row(row: np.ndarray[Any, Any], length: int, seq: int) -> str | None:
    """Verify frame ``seq`` in ``row`` (``length`` bytes received): the first discrepancy, in
    :func:`~shared.frames.check`'s words, or None."""
    size = row.shape[0]
    if length == size <= BYTES_MAX_SIZE and row.tobytes() == frame_bytes(seq, size):
        return None  # every byte as expected (what the checks below add up to), quickly
    got_seq, got_sum = _HDR.unpack(row[:HEADER].tobytes())
    if got_seq != seq & 0xFFFFFFFF:
        return f"frame {seq}: got sequence number {got_seq}"
    if length != size:
        return f"frame {seq}: {length} bytes, expected {size}"
    runs = payload_runs(seq, size - HEADER)
    ok = got_sum == _checksum(runs)
    if ok and size - HEADER < _SMALL_PAYLOAD:
        ok = row[HEADER:].tobytes() == b"".join(bytes((v,)) * (b - a) for a, b, v in runs)
    elif ok:
        ok = all(_run_matches(row[HEADER + a : HEADER + b], v) for a, b, v in runs)
    if not ok:
        return f"frame {seq}: checksum mismatch (payload corrupted)"
    return None


class EchoSession:
    """An echo device brought up by the driver, and frames pushed through it."""

    def __init__(
        self,
        agent: GuestAgent,
        size: int,
        batch: int,
        qsize: int = 256,
        *,
        event_idx: bool = True,
        always_kick: bool = False,
        sink: bool = False,
        indirect_tail: bool = False,
    ) -> None:
        self.agent = agent
        # one way: the device (its ``sink`` option) consumes the frames; a frame is done
        # when its TX buffer comes back, and nothing comes back on RX
        self.sink = sink
        self.vcpu = vcpu = agent.vcpu
        self.ram = ram = GuestRam(agent.memory.map)
        self.functions = boot(vcpu)
        echo = find(self.functions, pl.DEVICE_ECHO)
        if not echo:
            raise VbusError("no echo device on the bus")
        self.fn = fn = echo[0]
        self.size = max(size, HEADER + 1)
        self.batch = batch
        self.queues = q = PacketQueues(
            vcpu,
            ram,
            fn,
            self.size,
            qsize,
            event_idx=event_idx,
            always_kick=always_kick,
            indirect_tail=indirect_tail,
        )
        self.window = qsize  # frames outstanding at most; 1 = stop-and-wait (round trips)
        # On the compiled path each step (send, receive) is one fused kernel: ~3 µs, less
        # than the scalar path's ~10 µs for even one frame (measured in-process).
        self._fused = q.fused
        self.rtts: list[float] = []  # per frame, when window == 1
        # the rings and pools, for callers (and hostile tests) that need them
        self.tx, self.rx, self.tx_pool, self.rx_pool = q.tx, q.rx, q.tx_pool, q.rx_pool
        self.sent = self.received = 0
        self.elapsed = 0.0
        # CLOCK_MONOTONIC (one clock for every process of the machine) at the start of the
        # first transfer and the end of the last: VMs measured together are aggregated
        # over the window they share
        self.started = self.ended = 0.0
        self._error: str | None = None

    def transfer(self, count: int, timeout: float = 60.0) -> str | None:
        """Send ``count`` more frames and receive them back; the first discrepancy or None."""
        q = self.queues
        goal = self.received + count
        error: str | None = None
        start = time.monotonic()
        self.started = self.started or start
        deadline = start + timeout
        sent_at = time.perf_counter()
        big = self.size >= IN_PLACE_MIN_SIZE
        if self._fused:
            error = self._transfer_fused(goal, deadline)
        while self.received < goal and error is None:
            progressed = False
            n = min(
                self.batch,
                goal - self.sent,
                q.tx_room(),
                self.window - (self.sent - self.received),
            )
            if n > 0:
                first = self.sent
                if n <= BYTES_MAX_FRAMES and self.size <= BYTES_MAX_SIZE:
                    built = [frame_bytes(seq, self.size) for seq in range(first, first + n)]
                    sent_at = time.perf_counter()  # built: the store into RAM is timed
                    q.send_bytes(built)
                elif big or n <= IN_PLACE_MAX_FRAMES:
                    clock = [0.0]

                    def fill(
                        row: np.ndarray[Any, Any],
                        i: int,
                        first: int = first,
                        last: int = n - 1,
                        clock: list[float] = clock,
                    ) -> None:
                        stamp_row(row, first + i)
                        if i == last:  # the frames are written: the round trip starts
                            clock[0] = time.perf_counter()

                    q.send_rows(n, fill)
                    sent_at = clock[0]
                else:
                    frames = np.zeros((n, self.size), dtype=np.uint8)
                    stamp(frames, np.arange(first, first + n))
                    sent_at = time.perf_counter()
                    q.send(frames)
                self.sent += n
                progressed = True
            got = self._reclaim_sunk() if self.sink else self._receive()
            if got:
                if self.window == 1:
                    self.rtts.append(time.perf_counter() - sent_at)
                error = self._error
                self.received += got
                progressed = True
            if q.broken():
                error = f"ring broken: {q.broken()}"
            if (
                not progressed
                and error is None
                and not q.wait(deadline, need_tx=tx_wakeup(self.sink, self.sent - self.received))
            ):
                error = f"timed out: sent {self.sent}, received {self.received} of {goal}"
        self.ended = time.monotonic()
        self.elapsed += self.ended - start
        return error

    def _transfer_fused(self, goal: int, deadline: float) -> str | None:
        """:meth:`transfer`'s loop on the compiled path: each send and each receive is one fused
        kernel (:meth:`~guestemu.drivers.PacketQueues.send_frames`,
        :meth:`~guestemu.drivers.PacketQueues.receive_frames`), and the loop keeps its counters
        in locals -- at a few microseconds per step, attribute lookups count. A send call posts
        batch after batch -- each published and decided on alone -- until the device wants a
        kick or the window is full, so the interpreter is not entered per batch (one batch per
        call when stop-and-wait, ``window`` 1). The same frames, checks, waits and results as
        the reference loop, with one change of order: frames the device has returned (its used
        entries, seen but not taken yet) count as back for the window -- as far as RX has
        buffers beyond the window, since each still holds its RX buffer -- so the next frames
        are sent -- and the device kicked -- *before* the returned ones are verified. A
        stop-and-wait exchange then verifies each reply while the device works on the next
        request, instead of before sending it; a verification failure still ends the transfer at
        once. A round trip ends when its reply is seen (its used entry), before it is verified.
        (A window of the whole RX ring has no such room: it takes its replies first.)"""
        q = self.queues
        send, receive, wait = q.send_frames, q.receive_frames, q.wait
        tx_ring, rx_ring = q.tx.ring, q.rx.ring
        returned = rx_ring.used_pending
        batch, window, sink = self.batch, self.window, self.sink
        # A reply seen but not taken still holds its RX buffer: it counts as back only while
        # RX has buffers beyond the window -- the device then finds a buffer for the reply to
        # every request in flight, never a request it must set aside until the guest reposts
        # (a pipelined window of a whole ring takes its replies before it sends more).
        slack = max(0, len(q.rx_pool.data) - window)
        clock = time.perf_counter
        rtts = self.rtts if window == 1 else None
        sent, received = self.sent, self.received
        sent_at = clock()
        error: str | None = None
        try:
            while received < goal:
                progressed = False
                # replies published, not taken yet (a hostile count is capped: taking
                # them validates the entries)
                back = 0 if sink else min(returned(), sent - received, slack)
                if back and rtts is not None:
                    rtts.append(clock() - sent_at)
                room = min(goal - sent, window - (sent - received - back))
                want = min(batch, room)
                if want > 0:
                    started = clock()  # the round trip starts before the frames are written
                    # (takes back completed TX buffers first; then batch after batch while
                    # the device wants no kick)
                    n = send(sent, want, room)
                    if n:
                        sent_at = started
                        sent += n
                        progressed = True
                if sink:  # a frame is done when its TX buffer comes back
                    got = q.tx_completed - received  # (the send step took them back)
                    if not got and want <= 0 and tx_ring.has_used():
                        send(sent, 0)  # nothing to send: take back completions only
                        got = q.tx_completed - received
                elif back or rx_ring.has_used():
                    got, error = receive(received)
                    if rtts is not None and got > back:
                        rtts.append(clock() - sent_at)  # the frame just sent is back too
                else:
                    got = 0
                if sink and got and rtts is not None:
                    rtts.append(clock() - sent_at)
                if got:
                    received += got
                    progressed = True
                    if error is not None:
                        break
                broken = tx_ring.broken or rx_ring.broken
                if broken is not None:
                    error = f"ring broken: {broken}"
                    break
                if not progressed and not wait(deadline, need_tx=tx_wakeup(sink, sent - received)):
                    error = f"timed out: sent {sent}, received {received} of {goal}"
                    break
        finally:
            self.sent, self.received = sent, received
        return error

    def _reclaim_sunk(self) -> int:
        """Sink mode: how many more frames the device has completed (consumed). The loop's
        ``tx_room()`` just reclaimed them; only when nothing was there look once more."""
        got = self.queues.tx_completed - self.received
        if not got and self.queues.tx.ring.has_used():
            self.queues.tx_room()
            got = self.queues.tx_completed - self.received
        return got

    def _receive(self) -> int:
        """Take and verify what came back; returns how many frames (the first discrepancy,
        if any, is left in ``self._error``)."""
        q = self.queues
        self._error = None
        if not q.rx.ring.has_used():
            return 0
        if self.size >= IN_PLACE_MIN_SIZE:
            rows, lens, slots = q.receive_rows()
            for i, row in enumerate(rows):
                self._error = self._error or check_row(row, lens[i], self.received + i)
            q.release_rx(slots)  # verified in place: only now may the device reuse them
            return len(rows)
        frames, lens_arr = q.receive()
        if len(frames) <= IN_PLACE_MAX_FRAMES:
            for i in range(len(frames)):
                self._error = self._error or check_row(
                    frames[i], int(lens_arr[i]), self.received + i
                )
        elif len(frames):
            self._error = check(frames, lens_arr, self.received)
        return len(frames)

    def move_bar(self) -> int:
        """Reprogram BAR0 to a fresh address; the doorbells follow (ioeventfds rebound)."""
        fn = self.fn
        new = pci.BarAllocator(
            pl.Window(pl.MMIO_WINDOW.start + 0x100000, pl.MMIO_WINDOW.end)
        ).allocate(fn.found.bar_size)
        fn.driver.program_bar(new)
        for q in (self.tx, self.rx):
            q.notify_addr = fn.driver.queue_notify_address(q.index)
        return new

    def move_vectors(self, first_gsi: int) -> list[int]:
        """Reprogram every MSI vector to new gsis (irqfds and shm-signals rebound)."""
        moved = []
        for vector in sorted(self.fn.gsis):
            gsi = first_gsi + vector
            self.fn.driver.program_msi(vector, gsi)
            self.fn.gsis[vector] = gsi
            moved.append(gsi)
        self.tx.gsi, self.rx.gsi = self.fn.gsis[0], self.fn.gsis[1]
        return moved

    def result(self, error: str | None, **extra: Any) -> dict[str, Any]:
        tx, rx = self.tx, self.rx
        elapsed = max(self.elapsed, 1e-9)
        return {
            "workload": "echo",
            "sink": self.sink,
            "ok": error is None and self.received == self.sent,
            "error": error,
            "frames": self.received,
            "bytes": self.received * self.size,
            "elapsed": elapsed,
            "started": self.started,
            "ended": self.ended,
            "frames_per_s": self.received / elapsed,
            "mb_per_s": self.received * self.size / elapsed / 1e6,
            "doorbells": tx.counters["doorbells"] + rx.counters["doorbells"],
            "doorbells_suppressed": (
                tx.counters["doorbells_suppressed"] + rx.counters["doorbells_suppressed"]
            ),
            "interrupts": {str(k): v for k, v in self.agent.irq.wakeups.items()},
            "vcpu": dict(self.vcpu.counters),
            "cpus": sorted(os.sched_getaffinity(0)),
            **extra,
        }


def tx_wakeup(sink: bool, outstanding: int) -> bool | None:
    """Whether a wait should be woken by TX completions (``need_tx`` of
    :meth:`~guestemu.drivers.PacketQueues.wait`) with ``outstanding`` frames not back yet.
    A sink's frames are done when their TX buffers come back: always. The echo device
    completes a TX buffer in the pass that delivers its reply, so while replies are on their
    way the RX interrupt wakes us and the TX completions are taken then -- being woken for
    both would be two interrupts per device pass; with none on its way, the queues' default
    (woken by TX when no TX buffer is free)."""
    if sink:
        return True
    return None if outstanding == 0 else False


def check_params(params: dict[str, Any]) -> None:
    """The echo workload's parameters, checked before anything starts (see the package)."""
    check_int(params, "count", 0)
    for key in ("size", "batch", "qsize", "window"):
        check_int(params, key, 1)
    check_choice(params, "notify", ("always", "event_idx"))
    check_choice(params, "chains", ("single", "indirect_tail"))


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    """The echo workload: ``count`` frames of ``size`` bytes in batches of ``batch``. With
    ``rebind`` the BAR and then the MSI vectors move between three equal thirds of the
    transfer, and every frame must still arrive. ``chains``: ``"single"`` (default, one
    descriptor per buffer) or ``"indirect_tail"`` (each TX and RX buffer a normal descriptor
    followed by an indirect one, see :class:`~guestemu.drivers.PacketQueues`)."""
    check_params(params)
    count = int(params.get("count", 1000))
    rebind = bool(params.get("rebind", False))
    notify = str(params.get("notify", "event_idx"))
    chains = str(params.get("chains", "single"))
    session = EchoSession(
        agent,
        int(params.get("size", 64)),
        int(params.get("batch", 32)),
        int(params.get("qsize", 256)),
        event_idx=notify == "event_idx",
        always_kick=notify == "always",
        sink=bool(params.get("sink", False)),
        indirect_tail=chains == "indirect_tail",
    )
    session.window = max(1, int(params.get("window", session.window)))
    agent.emit("echo_ready")
    ready = time.monotonic()
    agent.wait_start()  # booted and set up: with --start-gate, wait for the other VMs
    if not rebind:
        error = session.transfer(count)
        extra: dict[str, Any] = {"ready": ready}
        if session.rtts:
            rtt = np.array(session.rtts) * 1e6
            step = max(1, len(rtt) // MAX_RTT_SAMPLES)  # an even subsample of long runs
            extra = {
                "rtt_p50_us": float(np.percentile(rtt, 50)),
                "rtt_p99_us": float(np.percentile(rtt, 99)),
                "rtt_samples": len(rtt),
                "rtt_us": [round(float(x), 2) for x in rtt[::step]],
            }
        return session.result(error, **extra)
    third = max(1, count // 3)
    error = session.transfer(third)
    bar = session.move_bar() if error is None else None
    error = error or session.transfer(third)
    gsis = session.move_vectors(first_gsi=16) if error is None else []
    error = error or session.transfer(count - 2 * third)
    return session.result(error, moved_bar=bar, moved_gsis=gsis, ready=ready)
