"""``venet``: a virtual switch connecting several VMs' network devices.

One switch process serves every port: each port is a vbus device of some VM (its own
scoped channel, its own guest memory, rings, kickfds and vectors), and the process runs
one :class:`~hostemu.devices.runtime.DeviceRuntime` per port on a shared event loop.

Frames
------
A frame is ``dst u32 | src u32 | body`` (little-endian). Queue 0 of a port is its TX
(device-readable buffers), queue 1 its RX (device-writable). Taking a TX batch, the switch
reads the frames (vectorized), completes the TX buffers at once, and hands each frame to
port ``dst``, copying it across the two VMs' memories; frames from one source arrive in
the order they were sent.

Fair sharing of a port's RX buffers
-----------------------------------
A port's RX buffers are shared fairly among the sources sending to it: frames that find
no RX buffer wait in the port's :class:`FairStage`, one bounded queue per source port
(at most ``stage_frames`` frames and ``stage_bytes`` bytes each), and whenever buffers
are there -- new frames arrive, or the guest posts buffers and kicks its RX queue -- they
are handed out round-robin, one buffer per source per round, resuming after the source
served last. A source flooding a port therefore fills only its own queue: it cannot take
the buffers another source's frames are waiting for. Memory is bounded by
``ports x sources x stage_bytes``.

No silent loss
--------------
A frame that does not fit in its source's queue, or whose destination's RX queue is not
set up or broken, is dropped **and counted**, in that port's ``rx_dropped`` and per source
in ``rx_dropped_from``; frames waiting count in ``rx_staged``. A frame for an unknown port
or from a port spoofing its source counts in the sender's ``tx_dropped``. So for every
port, what the others sent it = ``rx_frames + rx_dropped + rx_staged`` (per source:
``rx_from + rx_dropped_from`` + what waits). Frames waiting when the switch process dies
are lost with it, as on a real switch.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import numpy as np

from hostemu.devices.runtime import BUDGET, DeviceModel, Queue
from shared import pci_layout as pl
from shared.errors import ConfigError

DEVICE_ID = pl.DEVICE_NET
QUEUES = 2
VECTORS = 2
TX, RX = 0, 1
L2_HEADER = 8
MAX_FRAME = 64 * 1024


def device_config(params: dict[str, Any]) -> bytes:
    """The port's config space: a locally administered MAC and the port id."""
    port = params.get("port")
    if not isinstance(port, int) or not 0 <= port < 1 << 16:
        raise ConfigError(f"venet: params.port must be an integer 0..65535, got {port!r}")
    cfg = np.zeros(1, dtype=pl.NET_CONFIG_DTYPE)
    cfg["mac"][0] = [0x02, 0x56, 0x42, 0x00, port >> 8, port & 0xFF]
    cfg["port_id"][0] = port
    return cfg.tobytes()


STAGE_FRAMES = 256
"""Default bound of one source's queue at one port, in frames (one default ring's worth)."""
STAGE_BYTES = 1 << 20
"""Default bound of one source's queue at one port, in bytes held (rows x row width)."""


def round_robin(counts: list[int], n: int) -> tuple[list[int], int]:
    """Share ``n`` buffers among queues holding ``counts`` frames, visited in list order
    one buffer per queue per round (a queue that runs out drops out of the rounds).

    Returns how many each queue gets and the index of the queue served last (-1 if none):
    the next sharing should start after it. Computed by levels, not buffer by buffer:
    every queue gets ``min(count, level)`` and the first few still holding more get one
    extra, which is exactly where the rounds stop.
    """
    if sum(counts) <= n:
        alloc = list(counts)
    else:
        rest = n
        level = 0
        remaining = len(counts)
        for c in sorted(counts):  # raise the level queue by queue while it fits
            if (c - level) * remaining > rest:
                level += rest // remaining
                break
            rest -= (c - level) * remaining
            level = c
            remaining -= 1
        alloc = [min(c, level) for c in counts]
        extra = n - sum(alloc)
        for i, c in enumerate(counts):
            if extra and c > level:
                alloc[i] += 1
                extra -= 1
    k = len(counts)
    served = [(a - 1) * k + i for i, a in enumerate(alloc) if a > 0]
    return alloc, (max(served) % k if served else -1)


class _Backlog:
    """One source's frames waiting at one port: chunks in arrival order."""

    __slots__ = ("bytes", "chunks", "frames")

    def __init__(self) -> None:
        self.chunks: deque[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = deque()
        self.frames = 0
        self.bytes = 0

    def pop(self, n: int) -> tuple[list[np.ndarray[Any, Any]], list[np.ndarray[Any, Any]]]:
        """The first ``n`` frames (and lengths), as the chunks they are in."""
        frames, lens = [], []
        while n:
            f, ln = self.chunks[0]
            if len(f) <= n:
                self.chunks.popleft()
            else:  # split; the rest is copied so that no consumed row stays held
                self.chunks[0] = (f[n:].copy(), ln[n:].copy())
                f, ln = f[:n], ln[:n]
            frames.append(f)
            lens.append(ln)
            n -= len(f)
            self.frames -= len(f)
            self.bytes -= f.nbytes
        return frames, lens


class FairStage:
    """The frames waiting for one port's RX buffers: a bounded queue per source, served
    round-robin (pure: no rings, no memory of any guest).

    :meth:`offer` stages what fits of a source's frames in that source's queue and says
    how many did not fit; :meth:`take` hands ``n`` buffers out one per source per round,
    resuming after the source served last, and returns the frames in that order (each
    source's frames in the order they came)."""

    def __init__(self, max_frames: int = STAGE_FRAMES, max_bytes: int = STAGE_BYTES) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._queues: dict[int, _Backlog] = {}  # only non-empty queues, in service order
        self.pending = 0

    def waiting(self) -> dict[int, int]:
        """Frames waiting, per source, in the order the next round serves them."""
        return {src: b.frames for src, b in self._queues.items()}

    def offer(self, src: int, frames: np.ndarray[Any, Any], lens: np.ndarray[Any, Any]) -> int:
        """Stage ``frames`` from ``src`` as far as its queue has room; return how many did
        not fit (the last ones: a queue keeps the oldest frames)."""
        n = len(frames)
        if not n:
            return 0
        b = self._queues.get(src) or _Backlog()
        row = max(1, int(frames.shape[1]))
        k = max(0, min(n, self.max_frames - b.frames, (self.max_bytes - b.bytes) // row))
        if k:
            if k < n:  # copied: the dropped rows must not stay held
                frames, lens = frames[:k].copy(), lens[:k].copy()
            b.chunks.append((frames, lens))
            b.frames += k
            b.bytes += frames.nbytes
            self.pending += k
            self._queues.setdefault(src, b)
        return n - k

    def take(self, n: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], dict[int, int]]:
        """Hand out ``n`` buffers (at most :attr:`pending`): the frames for them in
        delivery order, their lengths, and how many each source got."""
        n = min(n, self.pending)
        if n <= 0:
            return np.zeros((0, L2_HEADER), np.uint8), np.zeros(0, np.uint32), {}
        sources = list(self._queues)
        alloc, last = round_robin([self._queues[s].frames for s in sources], n)
        parts: list[tuple[int, list[np.ndarray[Any, Any]], list[np.ndarray[Any, Any]]]] = []
        served: dict[int, int] = {}
        for pos, (src, a) in enumerate(zip(sources, alloc, strict=True)):
            if a:
                chunks, chunk_lens = self._queues[src].pop(a)
                parts.append((pos, chunks, chunk_lens))
                served[src] = a
        self.pending -= n
        order = sources[last + 1 :] + sources[: last + 1]
        self._queues = {s: self._queues[s] for s in order if self._queues[s].frames}
        if len(parts) == 1 and len(parts[0][1]) == 1:  # one source, one chunk: as it is
            return parts[0][1][0], parts[0][2][0], served
        width = max(f.shape[1] for _, fs, _ in parts for f in fs)
        frames = np.zeros((n, width), np.uint8)
        lens = np.empty(n, np.uint32)
        keys = np.empty(n, np.int64)
        row = 0
        k = len(sources)
        for pos, fs, lns in parts:
            first = row
            for f, ln in zip(fs, lns, strict=True):
                frames[row : row + len(f), : f.shape[1]] = f
                lens[row : row + len(f)] = ln
                row += len(f)
            # the j-th frame of the source at position pos goes out in round j
            keys[first:row] = np.arange(row - first) * k + pos
        if len(parts) == 1:
            return frames, lens, served
        perm = np.argsort(keys, kind="stable")
        return frames[perm], lens[perm], served

    def clear(self) -> dict[int, int]:
        """Drop everything waiting; return how many frames per source."""
        dropped = self.waiting()
        self._queues.clear()
        self.pending = 0
        return dropped


class Switch:
    """The ports of one switch and the forwarding between them."""

    def __init__(self, stage_frames: int = STAGE_FRAMES, stage_bytes: int = STAGE_BYTES) -> None:
        self.ports: dict[int, VenetPort] = {}
        self.stage_frames = stage_frames
        self.stage_bytes = stage_bytes
        self._copy_buffer = np.empty(0, dtype=np.uint8)

    def copy_buffer(self) -> np.ndarray[Any, Any]:
        """Where the compiled TX pass copies a port's frames out, one row each: room for
        ``BUDGET`` frames of ``MAX_FRAME`` bytes, one buffer for every port (the passes
        run one at a time, and each copies its frames out of it before it returns).
        Allocated at the first pass; pages are backed as far as the largest pass wrote."""
        if self._copy_buffer.shape[0] == 0:
            self._copy_buffer = np.empty(BUDGET * MAX_FRAME, dtype=np.uint8)
        return self._copy_buffer

    def deliver(self, src: int, frames: np.ndarray[Any, Any], lens: np.ndarray[Any, Any]) -> None:
        dst = frames[:, 0:4].copy().view("<u4").reshape(-1) if len(frames) else frames
        sender = self.ports[src]
        for port_id in np.unique(dst).tolist() if len(frames) else []:
            pick = np.nonzero(dst == port_id)[0]  # keeps the senders' order
            target = self.ports.get(int(port_id))
            if target is None:
                sender.counters["tx_dropped"] += int(pick.size)
                continue
            width = int(lens[pick].max())  # a copy only as wide as its longest frame
            target.receive(src, frames[pick, :width], lens[pick])


class VenetPort(DeviceModel):
    name = "venet"
    data_path = True

    def __init__(self, switch: Switch, port: int) -> None:
        self.switch = switch
        self.port = port
        self.counters: Counter[str] = Counter()
        self.rx_from: Counter[int] = Counter()
        self.rx_dropped_from: Counter[int] = Counter()
        self.stage = FairStage(switch.stage_frames, switch.stage_bytes)
        switch.ports[port] = self

    def on_queue(self, q: Queue) -> bool:
        if q.index != TX:
            # RX buffers posted (or the queue set up): frames waiting for them go now
            self._flush(q)
            return False
        kernels = q.ring.kernels
        if kernels is not None:
            # The compiled path: pop, validate, copy the frames out as rows of the switch's
            # copy buffer and complete them, in one fused kernel; None if it declined (an
            # unusual ring, a frame over MAX_FRAME) having changed nothing -- then the
            # reference below.
            rows = self.switch.copy_buffer()
            done = kernels.consume(q.ring, rows, 0, BUDGET, MAX_FRAME)
            if done is not None:
                taken, _, _, interrupt, more, stride = done
                if not taken:
                    return more  # nothing there; notifications back on, re-checked
                # (the buffer holds BUDGET frames of MAX_FRAME: every frame has its row)
                assert stride > 0, "frames copied over each other"
                self.runtime.used_published(q, interrupt)
                lens = kernels.taken_lengths(taken)
                taken_rows = rows[: taken * stride].reshape(taken, stride)
                if stride >= L2_HEADER:
                    frames = taken_rows.copy()  # (the buffer is the next pass's)
                else:  # only runts (under a header: dropped), in rows wide enough to parse
                    frames = np.zeros((taken, L2_HEADER), np.uint8)
                    frames[:, :stride] = taken_rows
                self._forward(frames, lens)
                return True
        q.ring.disable_notifications()
        batch = q.ring.pop_batch(max_n=BUDGET)
        if len(batch) == 0:
            return q.ring.enable_notifications()
        width = int(min(MAX_FRAME, max(L2_HEADER, int(batch.readable_lens.max()))))
        frames, lens = q.ring.read_payloads(batch, width)
        self.runtime.complete(q, batch.heads, np.zeros(len(batch), dtype=np.uint32))
        self._forward(frames, lens)
        return True

    def _forward(self, frames: np.ndarray[Any, Any], lens: np.ndarray[Any, Any]) -> None:
        """Frames taken from this port's TX (rows, with their lengths; completed already):
        count them and hand the valid ones to the switch."""
        ok = lens >= L2_HEADER
        src = frames[:, 4:8].copy().view("<u4").reshape(-1)
        ok &= src == self.port  # a guest may not speak for another port
        self.counters["tx_dropped"] += int(np.count_nonzero(~ok))
        self.counters["tx_frames"] += int(np.count_nonzero(ok))
        self.counters["tx_bytes"] += int(lens[ok].sum())
        self.switch.deliver(self.port, frames[ok], lens[ok])

    def receive(self, src: int, frames: np.ndarray[Any, Any], lens: np.ndarray[Any, Any]) -> None:
        """Frames from port ``src``: into this port's RX buffers, sharing them fairly with
        the other sources; what must wait waits in ``src``'s bounded queue; the rest is
        dropped and counted."""
        rx = self.runtime.queues.get(RX)
        if rx is None or rx.ring.broken:
            self._drop(src, len(frames))
            self._drop_waiting()
            return
        self._drop(src, self.stage.offer(src, frames, lens))
        self._flush(rx)

    def _flush(self, rx: Queue) -> None:
        """Fill the RX buffers the guest posted with waiting frames, round-robin by source."""
        want = self.stage.pending
        if not want or rx.ring.broken:
            return
        batch = rx.ring.pop_batch(max_n=want)
        if len(batch):
            frames, lens, served = self.stage.take(len(batch))
            # a frame longer than the guest's RX buffer is truncated to it
            fit = np.minimum(lens, batch.writable_lens)
            used = rx.ring.write_payloads(batch, frames, fit)
            self.runtime.complete(rx, batch.heads, used)
            self.counters["rx_frames"] += len(batch)
            self.counters["rx_bytes"] += int(np.sum(used))
            self.rx_from.update(served)
        if rx.ring.broken:  # the receiving guest corrupted its RX ring
            self.runtime.report_broken(rx)
            self._drop_waiting()

    def _drop(self, src: int, n: int) -> None:
        if n:
            self.counters["rx_dropped"] += n
            self.rx_dropped_from[src] += n

    def _drop_waiting(self) -> None:
        for src, n in self.stage.clear().items():
            self._drop(src, n)

    def on_reset(self) -> None:
        """The guest reset this port: frames waiting for its old RX ring are dropped."""
        self._drop_waiting()

    def stats(self) -> dict[str, Any]:
        return {
            "port": self.port,
            **self.counters,
            "rx_staged": self.stage.pending,
            "rx_from": {str(s): n for s, n in sorted(self.rx_from.items())},
            "rx_dropped_from": {str(s): n for s, n in sorted(self.rx_dropped_from.items())},
        }


def _positive(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"venet: params.{key} must be a positive integer, got {value!r}")
    return value


def make_group(params: dict[str, Any], count: int) -> list[DeviceModel]:
    """One model per port channel, all on one switch; ``params.ports`` lists port ids;
    ``params.stage_frames`` / ``params.stage_bytes`` bound each source's queue at a port."""
    ports = params.get("ports", list(range(count)))
    if (
        not isinstance(ports, list)
        or len(ports) != count
        or len(set(ports)) != count
        or not all(isinstance(p, int) for p in ports)
    ):
        raise ConfigError(f"venet: params.ports must list {count} distinct port ids")
    switch = Switch(
        _positive(params, "stage_frames", STAGE_FRAMES),
        _positive(params, "stage_bytes", STAGE_BYTES),
    )
    return [VenetPort(switch, p) for p in ports]


def make_model(params: dict[str, Any]) -> DeviceModel:
    return make_group({"ports": [params.get("port", 0)]}, 1)[0]
