"""The echo device's backlog is bounded in bytes, whatever the guest posts: on a real ring
pair in process memory (TX and RX) with a fake runtime recording completions, a guest posting
many big TX buffers and no RX buffers never makes the device hold more staged copies than
``MAX_BACKLOG_BYTES`` (made a few frames small here); the chains that do not fit stay taken
and are copied later. Every frame still arrives once, in TX order, with its bytes; a TX buffer
completes only after the RX buffer holding its copy; a reset drops everything held."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from hostemu.devices import echo as echo_module
from hostemu.devices.echo import RX, TX, EchoModel
from hostemu.devices.runtime import Queue
from shared.virtio import DeviceRing
from tests.unit.test_ring import RING_A, RING_B, Pair, make_memory

TX_BUF = 0x20000  # guest-physical addresses of the TX frames ...
RX_BUF = 0x60000  # ... and of the RX buffers (both below 0x90000 in slot 0)
BIG = 0x1000  # a "big" frame here; the bound is a few of them
BOUND = 4 * BIG
QSIZE = 128


class FakeRuntime:
    """What EchoModel uses of DeviceRuntime: its queues, ``complete`` (recorded, then
    pushed to the ring) and ``schedule`` (recorded; :func:`pump` runs the queue)."""

    def __init__(self, tx: Queue, rx: Queue) -> None:
        self.queues = {TX: tx, RX: rx}
        self.busy_poll: dict[int, int] = {}
        self.completed: list[tuple[int, list[int], list[int]]] = []  # (queue, ids, lens)
        self.scheduled: list[int] = []

    def complete(self, q: Queue, ids: Any, lens: Any) -> None:
        ids_l = [int(i) for i in ids]
        lens_l = [int(n) for n in lens]
        self.completed.append((q.index, ids_l, lens_l))
        q.ring.push_used(ids_l, lens_l)

    def used_published(self, q: Queue, interrupt: bool) -> None:
        """A fused pass (compiled path) published used entries itself: record the ones
        since the last record of this queue, read back from the used ring."""
        ring = q.ring
        seen = sum(len(ids) for index, ids, _ in self.completed if index == q.index)
        new = (ring.next_used - seen) & 0xFFFF
        pos = [(seen + j) % ring.qsize for j in range(new)]
        ids = [int(ring._used_id[p]) for p in pos]
        lens = [int(ring._used_len[p]) for p in pos]
        self.completed.append((q.index, ids, lens))

    def schedule(self, index: int) -> None:
        self.scheduled.append(index)


class Rig:
    def __init__(self) -> None:
        mem, _ = make_memory()
        self.mem = mem
        self.tx_pair = Pair(mem, RING_A, QSIZE)
        self.rx_pair = Pair(mem, RING_B, QSIZE)
        self.tx = Queue(TX, self.tx_pair.device, vector=0)
        self.rx = Queue(RX, self.rx_pair.device, vector=1)
        self.model = EchoModel()
        self.runtime = FakeRuntime(self.tx, self.rx)
        self.model.runtime = self.runtime  # type: ignore[assignment]
        self.sizes: list[int] = []  # every frame posted, in TX order
        self.tx_heads: list[int] = []
        self.rx_addr: dict[int, int] = {}  # RX head -> its buffer's address
        self.received: list[bytes] = []  # RX buffers' contents, in completion order
        self.max_held = 0

    def held(self) -> int:
        """The bytes of the staging arrays the backlog holds, from the backlog itself: each
        entry is charged for the whole array its copies live in (a partly delivered entry
        keeps a view into it)."""
        total = 0
        for heads, data, copied, charge in self.model.backlog:
            assert len(heads) == len(copied) == data.shape[0]
            assert allocation(data) == charge
            total += charge
        assert total == self.model.backlog_bytes
        return total

    def pump(self, kick: int) -> None:
        """Run the kicked queue's handler, then every queue scheduled or asking for another
        pass, until nothing is left to do; check the bound after every pass."""
        todo = [kick]
        for _ in range(10_000):
            if not todo:
                return
            index = todo.pop(0)
            more = self.model.on_queue(self.runtime.queues[index])
            held = self.held()
            self.max_held = max(self.max_held, held)
            assert held <= BOUND, held
            for i in ([index] if more else []) + self.runtime.scheduled:
                if i not in todo:
                    todo.append(i)
            self.runtime.scheduled.clear()
        raise AssertionError("the device never settles")

    def post_tx(self, sizes: list[int], *, same_address: bool = False) -> None:
        """Post one TX buffer per size, frame ``k`` (counting every frame posted) filled
        with its bytes; ``same_address``: every buffer over the same guest memory."""
        addrs = []
        for size in sizes:
            k = len(self.sizes)
            addr = TX_BUF if same_address else TX_BUF + k * BIG
            if not same_address:
                self.mem.write(addr, frame(k, size))
            addrs.append(addr)
            self.sizes.append(size)
        if same_address:
            self.mem.write(TX_BUF, frame(0, max(sizes)))
        self.tx_heads += self.tx_pair.driver.add_batch(addrs, sizes, False).tolist()

    def post_rx(self, n: int, size: int = BIG) -> None:
        base = len(self.rx_addr)
        addrs = [RX_BUF + (base + i) % 40 * BIG for i in range(n)]
        heads = self.rx_pair.driver.add_batch(addrs, [size] * n, True).tolist()
        self.rx_addr.update(zip(heads, addrs, strict=True))

    def kick_rx(self, n: int, size: int = BIG) -> bool:
        """Post ``n`` RX buffers; whether the device wants a kick for them."""
        self.post_rx(n, size)
        return self.rx_pair.driver.kick_needed()

    def reap_rx(self) -> None:
        ids, lens = self.rx_pair.driver.get_used()
        for head, n in zip(ids.tolist(), lens.tolist(), strict=True):
            self.received.append(self.mem.read(self.rx_addr[head], n))

    def completed(self, index: int) -> list[int]:
        return [i for q, ids, _ in self.runtime.completed if q == index for i in ids]


def allocation(a: np.ndarray[Any, Any]) -> int:
    """Bytes of the array whose memory ``a`` (maybe a view) lives in."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return int(a.nbytes)


def frame(k: int, size: int) -> bytes:
    """Frame ``k``: its number (4 bytes), then a byte pattern of its own."""
    body = ((np.arange(size, dtype=np.int64) * 7 + k * 13) & 0xFF).astype(np.uint8).tobytes()
    return (k.to_bytes(4, "little") + body)[:size]


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Rig:
    monkeypatch.setattr(echo_module, "MAX_BACKLOG_BYTES", BOUND)
    return Rig()


def check_in_order(rig: Rig, same_address: bool = False) -> None:
    """Every frame posted arrived exactly once, in TX order, with its bytes; every TX
    buffer completed, in order, each after the RX completion that delivered it."""
    assert len(rig.received) == len(rig.sizes)
    for k, (got, size) in enumerate(zip(rig.received, rig.sizes, strict=True)):
        want = frame(0, max(rig.sizes))[:size] if same_address else frame(k, size)
        assert got == want, k
    assert rig.completed(TX) == rig.tx_heads
    rx_done = 0
    tx_done = 0
    for q, ids, _ in rig.runtime.completed:
        if q == RX:
            rx_done += len(ids)
        else:
            tx_done += len(ids)
            assert tx_done <= rx_done  # a TX buffer completes only once delivered
    ids, _ = rig.tx_pair.driver.get_used()
    assert sorted(ids.tolist()) == sorted(rig.tx_heads)
    assert rig.tx_pair.device.broken is None and rig.rx_pair.device.broken is None
    assert rig.model.backlog_frames == 0 and rig.held() == 0 and rig.model._deferred is None


def test_big_buffers_without_rx_stay_within_the_bound(rig: Rig) -> None:
    """40 frames of BIG bytes over the same guest memory, no RX: one pass takes them all
    but stages only BOUND bytes' worth; nothing completes, nothing is lost."""
    rig.post_tx([BIG] * 40, same_address=True)
    rig.pump(TX)
    assert rig.held() == BOUND and rig.max_held == BOUND
    assert rig.model.backlog_frames == 40  # 4 staged, 36 taken and deferred
    assert sum(len(e[2]) for e in rig.model.backlog) == 4
    assert rig.model._deferred is not None and len(rig.model._deferred) == 36
    assert rig.tx_pair.device.in_flight == 40 and rig.runtime.completed == []
    rig.post_tx([BIG] * 10, same_address=True)  # back-pressure: these are not taken
    rig.pump(TX)
    assert rig.tx_pair.device.in_flight == 40 and rig.held() == BOUND
    assert rig.model.stats()["backlog"] == 40 and rig.model.stats()["backlog_bytes"] == BOUND
    # RX buffers in several rounds: every frame arrives, in order
    for n in (3, 1, 9, 20, 17):
        rig.post_rx(n)
        rig.pump(RX)
        rig.reap_rx()
        assert rig.held() <= BOUND
    assert len(rig.received) == 50
    check_in_order(rig, same_address=True)
    assert rig.model.stats()["echoed"] == 50 and rig.model.stats()["bytes"] == 50 * BIG


def test_frames_arrive_in_order_with_their_bytes(rig: Rig) -> None:
    rig.post_tx([BIG - k for k in range(30)])
    rig.pump(TX)
    assert rig.max_held == BOUND and rig.runtime.completed == []
    delivered = []
    for n in (1, 2, 5, 8, 14):
        rig.post_rx(n)
        rig.pump(RX)
        rig.reap_rx()
        delivered.append(len(rig.received))
        # exactly as many TX buffers completed as frames delivered, the oldest ones
        assert rig.completed(TX) == rig.tx_heads[: len(rig.received)]
    assert delivered == [1, 3, 8, 16, 30]
    check_in_order(rig)


def test_mixed_sizes_keep_order_and_the_bound(rig: Rig) -> None:
    """Small frames, then big ones, then small ones, then big: a small frame is not staged
    as wide as the big ones (pieces of their own width), and none overtakes another."""
    sizes = [64] * 20 + [BIG] * 9 + [100] * 15 + [BIG] * 3 + [32] * 5
    rig.post_tx(sizes)
    rig.pump(TX)
    # the 20 small frames (20 x 64 bytes) and the 3 big ones that still fit are staged
    assert [len(e[2]) for e in rig.model.backlog] == [20, 3]
    assert [e[1].shape[1] for e in rig.model.backlog] == [64, BIG]
    assert rig.held() == 20 * 64 + 3 * BIG
    assert rig.model._deferred is not None and len(rig.model._deferred) == len(sizes) - 23
    for n in (7, 20, 4, 30):
        rig.post_rx(n)
        rig.pump(RX)
        rig.reap_rx()
    check_in_order(rig)
    assert rig.max_held <= BOUND


def test_direct_copies_from_deferred_chains(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once no staged copy is ahead of the deferred chains, RX buffers take them straight
    from TX (no staging): posting all the RX buffers at once delivers everything."""
    copies: list[int] = []
    real = DeviceRing.copy_payloads

    def spy(self: DeviceRing, batch: Any, *args: Any) -> Any:
        copies.append(len(batch))
        return real(self, batch, *args)

    monkeypatch.setattr(DeviceRing, "copy_payloads", spy)
    rig.post_tx([BIG] * 12)
    rig.pump(TX)
    rig.post_rx(13)  # one more than there are frames: it stays posted
    rig.pump(RX)
    rig.reap_rx()
    assert copies == [8]  # the 4 staged copies, then the 8 deferred chains in one copy
    assert rig.rx_pair.device.in_flight == 0 and rig.rx_pair.device.has_available()
    check_in_order(rig)


def test_new_tx_waits_behind_deferred_chains(rig: Rig) -> None:
    """TX posted while chains are deferred is taken only after them, whatever its size,
    even with bytes to spare."""
    rig.post_tx([3000] * 7)
    rig.pump(TX)
    assert rig.held() == 5 * 3000  # < BOUND, but the 6th frame does not fit
    assert rig.model._deferred is not None and len(rig.model._deferred) == 2
    rig.post_tx([16] * 3)  # would fit; must not overtake the 2 deferred frames
    rig.pump(TX)
    assert rig.tx_pair.device.in_flight == 7 and rig.held() == 5 * 3000
    rig.post_rx(2)
    rig.pump(RX)
    rig.reap_rx()
    assert len(rig.received) == 2 and rig.held() == 5 * 3000  # the array is still held
    rig.post_rx(8)
    rig.pump(RX)
    rig.reap_rx()
    check_in_order(rig)


def test_a_frame_larger_than_the_bound_still_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """At least one frame is always allowed (when nothing else is held)."""
    monkeypatch.setattr(echo_module, "MAX_BACKLOG_BYTES", 100)
    rig = Rig()
    rig.post_tx([BIG, BIG, 50])
    rig.model.on_queue(rig.tx)
    assert rig.model.backlog_bytes == BIG  # one frame of slack, no more
    assert rig.model._deferred is not None and len(rig.model._deferred) == 2
    for _ in range(3):
        rig.post_rx(1)
        rig.model.on_queue(rig.rx)
        rig.model.on_queue(rig.tx)
        assert rig.model.backlog_bytes <= BIG
        rig.reap_rx()
    check_in_order(rig)


def test_reset_drops_staged_and_deferred_frames(rig: Rig) -> None:
    rig.post_tx([BIG] * 20)
    rig.pump(TX)
    assert rig.held() == BOUND and rig.model._deferred is not None
    rig.runtime.queues.clear()  # what the runtime does on a reset, then on_reset
    rig.model.on_reset()
    assert rig.held() == 0 and rig.model.backlog_frames == 0 and rig.model._deferred is None
    assert rig.model.stats()["backlog"] == 0 and rig.model.stats()["backlog_bytes"] == 0
    assert rig.runtime.completed == []
    # the guest sets the queues up again: fresh rings, and the device echoes from scratch
    fresh = Rig()
    fresh.model = rig.model
    fresh.model.runtime = fresh.runtime  # type: ignore[assignment]
    fresh.post_tx([BIG] * 6)
    fresh.pump(TX)
    fresh.post_rx(6)
    fresh.pump(RX)
    fresh.reap_rx()
    check_in_order(fresh)


def test_deferred_chains_of_a_replaced_ring_are_dropped(rig: Rig) -> None:
    """A TX queue disabled and enabled again (a new ring) cannot read nor complete the
    chains taken from the old one: they are dropped, not copied from the new ring."""
    rig.post_tx([BIG] * 10)
    rig.pump(TX)
    assert rig.model._deferred is not None and len(rig.model._deferred) == 6
    rig.tx_pair = Pair(rig.mem, RING_A, QSIZE)
    rig.tx = rig.runtime.queues[TX] = Queue(TX, rig.tx_pair.device, vector=0)
    rig.pump(TX)
    assert rig.model._deferred is None and rig.model.backlog_frames == 4


def test_rx_kicks_are_wanted_only_while_frames_wait_for_rx(rig: Rig) -> None:
    """Reposted RX buffers need no kick while no frame waits for one (a TX pass looks at RX
    itself): an RX pass with nothing held turns RX kicks off. Frames staged with no RX buffer
    turn them back on, and the next buffer posted asks for a kick that delivers them."""
    rig.kick_rx(4)
    assert rig.rx_pair.device.notifications_enabled  # (a new ring starts with kicks on)
    rig.pump(RX)
    assert not rig.rx_pair.device.notifications_enabled
    assert not rig.kick_rx(4)  # nothing waits for RX: no kick wanted
    rig.post_tx([BIG] * 10)
    rig.pump(TX)  # 8 delivered straight, 2 staged: they wait for RX buffers
    assert rig.model.backlog_frames == 2
    assert rig.rx_pair.device.notifications_enabled
    assert rig.kick_rx(2)  # the buffers the staged frames wait for ask for a kick
    rig.pump(RX)
    rig.reap_rx()
    check_in_order(rig)
    assert not rig.kick_rx(1)  # and once none waits, kicks are off again


def test_an_rx_buffer_posted_while_kicks_come_back_on_is_not_missed(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The RX pass that finds no buffer for a staged frame turns RX kicks on and re-checks:
    a buffer the driver posted before it could see them on (so it sent no kick) asks for
    another pass, which delivers."""
    rig.post_tx([BIG] * 3)
    rig.pump(TX)  # no RX buffers: all three staged, RX kicks on
    assert rig.model.backlog_frames == 3
    rig.rx_pair.device.disable_notifications()  # the driver posts while kicks are off:
    assert not rig.kick_rx(3)
    ring = rig.rx_pair.device
    real_pop = ring.pop_batch
    raced = [True]

    def pop_batch(*args: Any, **kw: Any) -> Any:  # the pass looked just before the post
        if raced[0]:
            raced[0] = False
            return real_pop(max_n=0)
        return real_pop(*args, **kw)

    monkeypatch.setattr(ring, "pop_batch", pop_batch)
    assert rig.model.on_queue(rig.rx) is True  # re-check found them: another pass
    assert ring.notifications_enabled
    rig.pump(RX)
    rig.reap_rx()
    check_in_order(rig)
