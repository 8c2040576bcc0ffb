"""Tests for hostemu/devices/venet.py: the switch's forwarding and accounting without processes.

Every port is a guest of its own: its own numpy guest memory in a :class:`GuestMemoryMap`, a
TX and an RX :class:`DriverRing` playing the guest driver, and :class:`DeviceRing` s over the
same memory feeding the :class:`VenetPort`. A fake runtime provides what the port uses of
:class:`DeviceRuntime` (``queues``, ``complete``). Frames really cross from one guest's
memory to another's; every frame is accounted for (delivered, or counted as dropped).
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Any, cast

import numpy as np
import pytest

from hostemu.devices import venet
from hostemu.devices.runtime import BUDGET, DeviceRuntime, Queue
from shared import pci_layout as pl
from shared.errors import ConfigError
from shared.memory import GuestMemoryMap
from shared.virtio import DESC_DTYPE, DeviceRing, DriverRing, RingLayout

pytestmark = pytest.mark.timeout(30)

TX, RX = venet.TX, venet.RX
RAM = 1 << 20
TX_RING, RX_RING = 0x0000, 0x4000
TX_BUF, RX_BUF = 0x10000, 0x40000
BUF = 256
"""Size of every TX and RX buffer (bytes)."""


class FakeRuntime:
    """What :class:`VenetPort` uses of a :class:`DeviceRuntime`, counting interrupts and
    broken-queue reports."""

    def __init__(self) -> None:
        self.queues: dict[int, Queue] = {}
        self.interrupts: Counter[int] = Counter()
        self.reported: list[int] = []

    def complete(self, q: Queue, ids: Any, lens: Any) -> None:
        self.used_published(q, q.ring.push_used(ids, lens))

    def used_published(self, q: Queue, interrupt: bool) -> None:
        if interrupt:
            self.interrupts[q.vector] += 1

    def report_broken(self, q: Queue) -> None:
        if q.index not in self.reported:
            self.reported.append(q.index)


def frame(dst: int, src: int, body: bytes = b"") -> bytes:
    return struct.pack("<II", dst, src) + body


def body(tag: int, size: int) -> bytes:
    return bytes((tag * 7 + i) & 0xFF for i in range(size))


class Guest:
    """One VM attached to one switch port: its memory, its driver rings, the port's rings."""

    def __init__(
        self,
        port: venet.VenetPort,
        *,
        qsize: int = 64,
        rx_buffers: int | None = None,
        rx: bool = True,
        rx_size: int = BUF,
        jit: bool | None = None,
    ) -> None:
        self.port = port
        self.qsize = qsize
        self.ram = np.zeros(RAM, dtype=np.uint8)
        self.mem = GuestMemoryMap()
        self.mem.add(0, 0, self.ram)
        layout = RingLayout(qsize)
        assert TX_RING + layout.size <= RX_RING and RX_RING + layout.size <= TX_BUF
        assert TX_BUF + qsize * BUF <= RX_BUF and RX_BUF + qsize * rx_size <= RAM
        self.layout = layout
        self.tx = DriverRing(self.mem.translate(TX_RING, layout.size), layout, event_idx=False)
        self.rx = DriverRing(self.mem.translate(RX_RING, layout.size), layout, event_idx=False)
        self.runtime = FakeRuntime()
        self.runtime.queues[TX] = Queue(
            TX, DeviceRing.from_layout(self.mem, TX_RING, layout, event_idx=False, jit=jit), 0
        )
        if rx:
            self.runtime.queues[RX] = Queue(
                RX,
                DeviceRing.from_layout(self.mem, RX_RING, layout, event_idx=False, jit=jit),
                1,
            )
        port.attach(cast(DeviceRuntime, self.runtime))
        self.rx_size = rx_size
        self.rx_addr: dict[int, int] = {}  # head -> buffer gpa
        self.rx_free = list(range(qsize))
        self.post_rx(qsize if rx_buffers is None else rx_buffers)

    @property
    def tx_queue(self) -> Queue:
        return self.runtime.queues[TX]

    def post_rx(self, n: int) -> None:
        slots = [self.rx_free.pop(0) for _ in range(n)]
        addrs = [RX_BUF + s * self.rx_size for s in slots]
        heads = self.rx.add_batch(np.array(addrs, dtype=np.uint64), np.full(n, self.rx_size), True)
        for h, a in zip(heads.tolist(), addrs, strict=True):
            self.rx_addr[h] = a

    def kick_rx(self) -> None:
        """What the runtime does when the guest kicks its RX queue."""
        self.port.on_queue(self.runtime.queues[RX])

    def refill(self, n: int) -> None:
        """Post ``n`` RX buffers and kick."""
        self.post_rx(n)
        self.kick_rx()

    def send(self, frames: list[bytes]) -> None:
        """Write ``frames`` into TX buffers and post them (each buffer exactly its frame)."""
        addrs = [TX_BUF + i * BUF for i in range(len(frames))]
        for a, f in zip(addrs, frames, strict=True):
            self.mem.write(a, f)
        self.tx.add_batch(
            np.array(addrs, dtype=np.uint64), np.array([len(f) for f in frames]), False
        )

    def pump(self) -> int:
        """Run the port's TX handler until it has nothing left (bounded); return the passes."""
        for passes in range(1, 100):
            if not self.port.on_queue(self.tx_queue):
                return passes
        raise AssertionError("the TX handler never ran out of work")

    def tx_done(self) -> list[int]:
        """Used lengths of the TX buffers the switch gave back (all must be back)."""
        _, lens = self.tx.get_used()
        assert self.tx.broken is None and self.tx.in_flight == 0
        return [int(n) for n in lens]

    def received(self) -> list[bytes]:
        """The frames the switch put into our RX buffers, in ring order."""
        ids, lens = self.rx.get_used()
        assert self.rx.broken is None
        out = []
        for h, n in zip(ids.tolist(), lens.tolist(), strict=True):
            out.append(self.mem.read(self.rx_addr[h], n))
            self.rx_free.append((self.rx_addr.pop(h) - RX_BUF) // self.rx_size)
        return out


COUNTERS = (
    "tx_frames",
    "tx_bytes",
    "rx_frames",
    "rx_bytes",
    "tx_dropped",
    "rx_dropped",
    "rx_staged",
)
PER_SOURCE = ("rx_from", "rx_dropped_from")


def counts(port: venet.VenetPort) -> dict[str, int]:
    """``stats()`` with every counter (a counter never touched is absent there, i.e. 0)."""
    stats = port.stats()
    assert set(stats) <= {"port", *COUNTERS, *PER_SOURCE}, stats
    return {"port": stats["port"], **{k: int(stats.get(k, 0)) for k in COUNTERS}}


def accounted(port: venet.VenetPort) -> int:
    """What the others sent ``port``: delivered, dropped or waiting -- per source too."""
    st = counts(port)
    total = st["rx_frames"] + st["rx_dropped"] + st["rx_staged"]
    stats = port.stats()
    assert sum(stats["rx_from"].values()) == st["rx_frames"]
    assert sum(stats["rx_dropped_from"].values()) == st["rx_dropped"]
    assert sum(port.stage.waiting().values()) == st["rx_staged"]
    return total


def switch_of(n: int, switch_params: dict[str, Any] | None = None, **guest_kw: Any) -> list[Guest]:
    ports = cast(list[venet.VenetPort], venet.make_group(switch_params or {}, n))
    return [Guest(p, **guest_kw) for p in ports]


# ============================================================================ forwarding


def test_frames_reach_their_destination_in_order_and_intact() -> None:
    a, b, c = switch_of(3)
    frames = [frame(1 + i % 2, 0, body(i, 8 + 5 * i)) for i in range(40)]
    a.send(frames)
    a.pump()
    assert b.received() == frames[0::2]  # in the sender's order, byte for byte
    assert c.received() == frames[1::2]
    assert a.tx_done() == [0] * 40  # every TX buffer back, nothing written into it
    assert a.received() == []
    assert b.runtime.interrupts[1] >= 1 and c.runtime.interrupts[1] >= 1


def test_more_frames_than_one_pass_takes_arrive_in_order() -> None:
    qsize = 512
    a, b = switch_of(2, qsize=qsize)
    n = BUDGET + 44
    frames = [frame(1, 0, struct.pack("<I", i) + body(i, i % 50)) for i in range(n)]
    a.send(frames)
    assert a.pump() >= 3  # BUDGET, the rest, then the empty re-check
    assert b.received() == frames
    assert a.tx_done() == [0] * n
    assert b.port.counters["rx_frames"] == n and b.port.counters["rx_dropped"] == 0


def test_a_port_can_reach_itself() -> None:
    (a,) = switch_of(1)
    a.send([frame(0, 0, b"loop")])
    a.pump()
    assert a.received() == [frame(0, 0, b"loop")]


# ============================================================================ no silent loss


def test_frames_without_rx_buffers_wait_and_arrive_once_buffers_are_posted() -> None:
    ports = cast(list[venet.VenetPort], venet.make_group({}, 2))
    a, b = Guest(ports[0]), Guest(ports[1], rx_buffers=3)
    frames = [frame(1, 0, body(i, 20)) for i in range(5)]
    a.send(frames)
    a.pump()
    assert b.received() == frames[:3]  # the first three, in order
    assert counts(b.port)["rx_frames"] == 3 and counts(b.port)["rx_staged"] == 2
    assert b.port.counters["rx_dropped"] == 0
    # every frame the switch took is accounted for
    assert a.port.counters["tx_frames"] == 5 and a.port.counters["tx_dropped"] == 0
    assert accounted(b.port) == a.port.counters["tx_frames"]
    assert a.tx_done() == [0] * 5  # the sender's buffers are back at once
    # the guest posts buffers and kicks its RX queue: the waiting frames arrive, in order
    b.refill(3)
    assert b.received() == frames[3:]
    a.send([frame(1, 0, b"again")])
    a.pump()
    assert b.received() == [frame(1, 0, b"again")]
    assert counts(b.port)["rx_staged"] == 0 and b.port.counters["rx_dropped"] == 0
    assert b.port.counters["rx_frames"] == 6 and b.port.stats()["rx_from"] == {"0": 6}


def test_frames_beyond_a_sources_queue_bound_are_dropped_and_counted_per_source() -> None:
    switch = venet.Switch(stage_frames=4)
    a, b, c = (
        Guest(venet.VenetPort(switch, p), rx_buffers=0 if p == 1 else None) for p in range(3)
    )
    a.send([frame(1, 0, body(i, 20)) for i in range(10)])
    a.pump()
    c.send([frame(1, 2, body(i, 20)) for i in range(3)])
    c.pump()
    st = counts(b.port)
    assert st["rx_staged"] == 4 + 3 and st["rx_dropped"] == 6 and st["rx_frames"] == 0
    assert b.port.stats()["rx_dropped_from"] == {"0": 6}  # only the source over its bound
    b.refill(7)
    got = b.received()
    assert len(got) == 7 and b.port.stats()["rx_from"] == {"0": 4, "2": 3}
    # a's queue kept its oldest frames; each source's frames in the order it sent them
    assert [f for f in got if f[4] == 0] == [frame(1, 0, body(i, 20)) for i in range(4)]
    assert [f for f in got if f[4] == 2] == [frame(1, 2, body(i, 20)) for i in range(3)]


def test_the_byte_bound_counts_what_is_held() -> None:
    switch = venet.Switch(stage_bytes=3 * 100)
    a, b = Guest(venet.VenetPort(switch, 0)), Guest(venet.VenetPort(switch, 1), rx_buffers=0)
    a.send([frame(1, 0, b"x" * 92)] * 5)  # 100 bytes each
    a.pump()
    assert counts(b.port)["rx_staged"] == 3 and b.port.stats()["rx_dropped_from"] == {"0": 2}


def test_rx_queue_not_set_up_drops_are_counted() -> None:
    ports = cast(list[venet.VenetPort], venet.make_group({}, 2))
    a, b = Guest(ports[0]), Guest(ports[1], rx=False)
    a.send([frame(1, 0, b"x" * 10)] * 4)
    a.pump()
    assert b.port.counters["rx_dropped"] == 4 and b.port.counters["rx_frames"] == 0
    assert a.tx_done() == [0] * 4


def test_unknown_destination_spoofed_source_and_runts_count_in_tx_dropped() -> None:
    a, b = switch_of(2)
    good = [frame(1, 0, b"first"), frame(1, 0, b"last")]
    a.send(
        [
            good[0],
            frame(9, 0, b"nobody"),  # no port 9
            frame(1, 1, b"spoof"),  # speaks for port 1
            frame(1, 0)[:5],  # shorter than the L2 header
            good[1],
        ]
    )
    a.pump()
    assert b.received() == good
    assert a.tx_done() == [0] * 5  # dropped frames' buffers come back too
    c = a.port.counters
    assert c["tx_dropped"] == 3
    assert c["tx_frames"] == 3  # accepted from the guest (the one to port 9 then dropped)
    assert c["tx_bytes"] == len(good[0]) + len(good[1]) + len(frame(9, 0, b"nobody"))
    assert b.port.counters["rx_frames"] == 2 and b.port.counters["rx_dropped"] == 0
    assert b.port.counters["tx_dropped"] == 0  # the spoofed port is not blamed


def test_per_port_counters_and_stats() -> None:
    a, b, c = switch_of(3)
    a.send([frame(1, 0, b"a" * 10), frame(2, 0, b"a" * 30)])
    b.send([frame(0, 1, b"b" * 50)])
    a.pump()
    b.pump()
    assert [len(f) for f in b.received()] == [18]
    assert [len(f) for f in c.received()] == [38]
    assert [len(f) for f in a.received()] == [58]
    assert counts(a.port) == {
        "port": 0,
        "tx_frames": 2,
        "tx_bytes": 56,
        "rx_frames": 1,
        "rx_bytes": 58,
        "tx_dropped": 0,
        "rx_dropped": 0,
        "rx_staged": 0,
    }
    assert counts(b.port) == {
        "port": 1,
        "tx_frames": 1,
        "tx_bytes": 58,
        "rx_frames": 1,
        "rx_bytes": 18,
        "tx_dropped": 0,
        "rx_dropped": 0,
        "rx_staged": 0,
    }
    assert counts(c.port) == {
        "port": 2,
        "tx_frames": 0,
        "tx_bytes": 0,
        "rx_frames": 1,
        "rx_bytes": 38,
        "tx_dropped": 0,
        "rx_dropped": 0,
        "rx_staged": 0,
    }


# ============================================================================ fairness


def tagged(dst: int, src: int, seq: int) -> bytes:
    """A frame whose body says who sent it and its sequence number."""
    return frame(dst, src, struct.pack("<II", src, seq) + body(seq, 12))


def origin(f: bytes) -> tuple[int, int]:
    src, seq = struct.unpack_from("<II", f, 8)
    return src, seq


def test_flooding_source_cannot_starve_another_source_to_the_same_port() -> None:
    """VM a floods port b with valid frames, far more than b's RX buffers; VM c sends a
    few frames to b meanwhile. c's frames all arrive, in order, none dropped: b's
    buffers are shared between the two sources; only a's excess is dropped (and counted,
    as a's)."""
    a, b, c = switch_of(3, {"stage_frames": 16}, rx_buffers=8)
    flood_seq = 0

    def flood() -> None:
        nonlocal flood_seq
        a.tx_done()  # take back a's TX buffers (the switch returned them at once)
        a.send([tagged(1, 0, flood_seq + i) for i in range(32)])
        flood_seq += 32
        a.pump()

    flood()  # b's 8 buffers are gone before c says anything
    c.send([tagged(1, 2, i) for i in range(6)])
    c.pump()
    got: list[tuple[int, int]] = []
    for _ in range(6):  # b drains and reposts 8 buffers at a time while a keeps flooding
        got += [origin(f) for f in b.received()]
        flood()
        b.refill(8)
    got += [origin(f) for f in b.received()]
    from_c = [seq for src, seq in got if src == 2]
    assert from_c == list(range(6))  # every frame of c, in order
    from_a = [seq for src, seq in got if src == 0]
    assert from_a == sorted(from_a) and len(set(from_a)) == len(from_a)
    stats = b.port.stats()
    assert stats["rx_dropped_from"].get("2", 0) == 0
    assert stats["rx_dropped_from"]["0"] > 0  # the flood did overflow b's port
    assert stats["rx_from"]["2"] == 6
    assert accounted(b.port) == flood_seq + 6
    # c was not made to wait behind the flood: its frames went out in the first refills,
    # alternating with a's
    first_refill = got[8:16]
    assert [src for src, _ in first_refill[:6]] == [0, 2] * 3 or [
        src for src, _ in first_refill[:6]
    ] == [2, 0] * 3


def test_rx_buffers_go_round_robin_among_waiting_sources() -> None:
    switch = venet.Switch()
    a, b, c, d = (
        Guest(venet.VenetPort(switch, p), rx_buffers=0 if p == 3 else None) for p in range(4)
    )
    for g, n in ((a, 5), (b, 2), (c, 5)):
        g.send([tagged(3, g.port.port, i) for i in range(n)])
        g.pump()
    assert d.port.stage.waiting() == {0: 5, 1: 2, 2: 5}
    d.refill(7)
    assert [origin(f) for f in d.received()] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (0, 1),
        (1, 1),
        (2, 1),
        (0, 2),
    ]
    # the next buffers resume after the source served last
    d.refill(3)
    assert [origin(f) for f in d.received()] == [(2, 2), (0, 3), (2, 3)]
    d.refill(8)
    assert [origin(f) for f in d.received()] == [(0, 4), (2, 4)]
    assert d.port.stats()["rx_from"] == {"0": 5, "1": 2, "2": 5}
    assert accounted(d.port) == 12 and d.port.counters["rx_dropped"] == 0


def test_a_new_frame_waits_its_turn_behind_other_sources() -> None:
    """Frames arriving while others wait go through the same rounds: a source that
    sends just as buffers appear does not take them all."""
    a, b, c = switch_of(3, rx_buffers=0)
    c.send([tagged(1, 2, i) for i in range(3)])
    c.pump()
    b.post_rx(4)  # posted, but the kick has not been handled yet
    a.send([tagged(1, 0, i) for i in range(10)])
    a.pump()  # a's frames arrive first: they share with c's
    assert sorted(origin(f) for f in b.received()) == [(0, 0), (0, 1), (2, 0), (2, 1)]


@pytest.mark.parametrize(
    "counts_, n, alloc, last",
    [
        ([5, 1, 3], 6, [3, 1, 2], 0),
        ([5, 1, 3], 9, [5, 1, 3], 0),
        ([5, 1, 3], 100, [5, 1, 3], 0),
        ([10, 10], 5, [3, 2], 0),
        ([4, 4, 4], 7, [3, 2, 2], 0),
        ([4, 4, 4], 6, [2, 2, 2], 2),
        ([1, 9, 9], 5, [1, 2, 2], 2),
        ([2, 3], 0, [0, 0], -1),
        ([7], 3, [3], 0),
    ],
)
def test_round_robin_shares_by_rounds(
    counts_: list[int], n: int, alloc: list[int], last: int
) -> None:
    assert venet.round_robin(counts_, n) == (alloc, last)


def test_round_robin_matches_one_buffer_at_a_time() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        counts_ = rng.integers(0, 12, rng.integers(1, 6)).tolist()
        n = int(rng.integers(0, sum(counts_) + 3))
        left, given, last, i = list(counts_), [0] * len(counts_), -1, 0
        while n > sum(given) and any(left):
            if left[i]:
                left[i] -= 1
                given[i] += 1
                last = i
            i = (i + 1) % len(left)
        assert venet.round_robin(counts_, n) == (given, last), (counts_, n)


def test_waiting_frames_are_dropped_and_counted_when_the_port_resets() -> None:
    a, b = switch_of(2, rx_buffers=0)
    a.send([tagged(1, 0, i) for i in range(5)])
    a.pump()
    assert counts(b.port)["rx_staged"] == 5
    b.port.on_reset()
    assert counts(b.port)["rx_staged"] == 0
    assert b.port.stats()["rx_dropped_from"] == {"0": 5} and accounted(b.port) == 5


def test_waiting_frames_are_dropped_and_counted_when_the_rx_queue_goes_away() -> None:
    a, b = switch_of(2, rx_buffers=0)
    a.send([tagged(1, 0, i) for i in range(5)])
    a.pump()
    del b.runtime.queues[RX]  # the driver disabled its RX queue
    a.send([tagged(1, 0, 5)])
    a.pump()
    assert counts(b.port)["rx_staged"] == 0 and counts(b.port)["rx_dropped"] == 6
    assert accounted(b.port) == 6


# ============================================================================ hostile guests


def test_a_broken_tx_ring_stops_only_that_port() -> None:
    a, b, c = switch_of(3)
    a.send([frame(1, 0, b"ok")])
    # guest a moves its avail.idx far beyond anything it posted
    idx = a.mem.translate(TX_RING + a.layout.avail_idx_offset, 2).view("<u2")
    idx[0] = (int(idx[0]) + a.qsize + 5) & 0xFFFF
    assert a.pump() == 1
    assert a.tx_queue.ring.broken is not None and "avail index jumped" in a.tx_queue.ring.broken
    assert b.received() == [] and a.port.counters["tx_frames"] == 0
    # the other ports, and a's own RX queue, keep working
    c.send([frame(1, 2, b"to b"), frame(0, 2, b"to a")])
    c.pump()
    assert b.received() == [frame(1, 2, b"to b")]
    assert a.received() == [frame(0, 2, b"to a")]


def test_a_broken_rx_ring_drops_and_counts_and_hurts_nobody_else() -> None:
    a, b, c = switch_of(3)
    # guest b rewrites the descriptor of its next RX buffer: length 0
    lay = b.layout
    ring = b.mem.translate(RX_RING + lay.avail_ring_offset, 2 * b.qsize).view("<u2")
    head = int(ring[b.rx.last_used % b.qsize])
    desc = b.mem.translate(RX_RING, lay.desc_size).view(DESC_DTYPE)
    desc["len"][head] = 0
    a.send([frame(1, 0, b"lost 1"), frame(1, 0, b"lost 2"), frame(2, 0, b"fine")])
    a.pump()
    rx = b.runtime.queues[RX].ring
    assert rx.broken is not None and "zero-length" in rx.broken
    assert b.port.counters["rx_dropped"] == 2 and b.port.counters["rx_frames"] == 0
    assert c.received() == [frame(2, 0, b"fine")]
    assert a.tx_done() == [0] * 3 and a.tx_queue.ring.broken is None
    # later frames for b are dropped and counted too, without touching its memory
    a.send([frame(1, 0, b"lost 3")])
    a.pump()
    assert b.port.counters["rx_dropped"] == 3
    assert b.runtime.reported == [RX] and a.runtime.reported == []


def test_an_rx_buffer_smaller_than_the_frame_does_not_crash_the_switch() -> None:
    ports = cast(list[venet.VenetPort], venet.make_group({}, 2))
    a, b = Guest(ports[0]), Guest(ports[1], rx_size=16)
    a.send([frame(1, 0, b"x" * 100)])
    a.pump()
    got = b.received()
    dropped = b.port.counters["rx_dropped"]
    assert (got == [frame(1, 0, b"x" * 100)[:16]] and dropped == 0) or (got == [] and dropped == 1)


# ============================================================================ configuration


@pytest.mark.parametrize("port", [0, 1, 0x1234, 0xFFFF])
def test_device_config_bytes_match_the_net_config_layout(port: int) -> None:
    raw = venet.device_config({"port": port})
    assert len(raw) == pl.NET_CONFIG_DTYPE.itemsize == 12
    cfg = np.frombuffer(raw, dtype=pl.NET_CONFIG_DTYPE)[0]
    assert cfg["mac"].tolist() == [0x02, 0x56, 0x42, 0x00, port >> 8, port & 0xFF]
    assert cfg["mac"][0] & 0x02 and not cfg["mac"][0] & 0x01  # locally administered unicast
    assert int(cfg["port_id"]) == port
    assert raw[6:8] == b"\0\0" and raw[8:12] == struct.pack("<I", port)


@pytest.mark.parametrize(
    "params", [{}, {"port": -1}, {"port": 1 << 16}, {"port": "1"}, {"port": 1.0}, {"port": None}]
)
def test_device_config_rejects_bad_ports(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        venet.device_config(params)


def test_make_group_puts_every_port_on_one_switch() -> None:
    ports = cast(list[venet.VenetPort], venet.make_group({}, 3))
    assert [p.port for p in ports] == [0, 1, 2]
    switch = ports[0].switch
    assert all(p.switch is switch for p in ports)
    assert switch.ports == {0: ports[0], 1: ports[1], 2: ports[2]}
    named = cast(list[venet.VenetPort], venet.make_group({"ports": [5, 3]}, 2))
    assert [p.port for p in named] == [5, 3] and set(named[0].switch.ports) == {3, 5}
    assert named[0].switch is not switch
    single = cast(venet.VenetPort, venet.make_model({"port": 4}))
    assert single.port == 4 and set(single.switch.ports) == {4}
    assert cast(venet.VenetPort, venet.make_model({})).port == 0


@pytest.mark.parametrize(
    "params, count",
    [
        ({"ports": [0, 1]}, 3),  # too few
        ({"ports": [0, 1, 2]}, 2),  # too many
        ({"ports": [1, 1]}, 2),  # duplicates
        ({"ports": [0, "1"]}, 2),  # not integers
        ({"ports": (0, 1)}, 2),  # not a list
        ({"ports": 2}, 2),
        ({"stage_frames": 0}, 2),  # queue bounds: positive integers
        ({"stage_bytes": "1"}, 2),
        ({"stage_frames": True}, 2),
    ],
)
def test_make_group_rejects_bad_port_lists(params: dict[str, Any], count: int) -> None:
    with pytest.raises(ConfigError):
        venet.make_group(params, count)
