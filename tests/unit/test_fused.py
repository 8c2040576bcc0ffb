"""The fused per-step kernels (:mod:`shared.virtio.fused`) against the reference
composition they replace, step by step, on the production code that chooses between them:
:meth:`~guestemu.drivers.PacketQueues.send_frames` /
:meth:`~guestemu.drivers.PacketQueues.receive_frames` on the guest side and the echo
device's sink pass on the device side.

Each test runs one random program on two worlds -- rings on the compiled path, rings on the
reference path -- and after every step requires the same results, broken reasons, every
byte of guest memory, the rings' private bookkeeping, the buffer pools and the device's
counters. The peer of the side under test (a reference ring) behaves well or, in hostile
programs, forges used entries and indices, rewrites descriptors and corrupts frames. The
worlds use stubs for the vCPU and the PCI function (pure code: nothing here needs a
process); the rings, pools and kernels are the real ones.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

from guestemu.drivers import Function, GuestRam, PacketQueues
from hostemu.devices import echo as echo_module
from hostemu.devices.echo import EchoModel
from hostemu.devices.runtime import Queue
from shared.frames import HEADER, stamp
from shared.jit import JIT_ENV
from shared.memory import GuestMemoryMap
from shared.virtio import DESC_DTYPE, INDEX_MASK, DeviceRing, DriverRing, RingLayout
from shared.virtio import compiled as compiled_path
from tests.unit.test_ring_scalar import norm

RAM = 1 << 20


class _Driver:
    """The PCI function's driver, as far as PacketQueues uses it: records the queues."""

    def __init__(self) -> None:
        self.queues: dict[int, tuple[int, int, int, int]] = {}

    def reset(self) -> None:
        pass

    def negotiate(self, want: int) -> int:
        return want

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int, _v: int) -> bool:
        self.queues[index] = (size, desc, avail, used)
        return True

    def queue_notify_address(self, index: int) -> int:
        return 0x1000 + index

    def set_driver_ok(self) -> None:
        pass


class _Vcpu:
    def __init__(self) -> None:
        self.doorbells: list[int] = []

    def write(self, addr: int, size: int, value: int) -> None:
        self.doorbells.append(value)


class _Runtime:
    """The device runtime, as far as the echo model's sink pass uses it."""

    def __init__(self, queues: dict[int, Queue]) -> None:
        self.queues = queues
        self.interrupts: list[bool] = []

    def complete(self, q: Queue, ids: Any, lens: Any) -> None:
        self.used_published(q, q.ring.push_used(ids, lens))

    def used_published(self, q: Queue, interrupt: bool) -> None:
        self.interrupts.append(interrupt)

    def schedule(self, queue: int) -> None:
        pass


class World:
    """Guest packet queues and the device's two rings over one guest memory; ``guest_jit`` /
    ``device_jit`` put that side's rings on the compiled path."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        *,
        qsize: int,
        size: int,
        event_idx: bool,
        guest_jit: bool,
        device_jit: bool,
        echo: bool = False,
    ) -> None:
        self.mem = GuestMemoryMap()
        self.mem.add(0, 0, np.zeros(RAM, dtype=np.uint8))
        self.vcpu = _Vcpu()
        driver = _Driver()
        fn = Function(found=None, driver=driver, gsis={0: 1, 1: 2})  # type: ignore[arg-type]
        with monkeypatch.context() as m:
            m.setenv(JIT_ENV, "1" if guest_jit else "0")
            self.queues = PacketQueues(
                self.vcpu,  # type: ignore[arg-type]
                GuestRam(self.mem),
                fn,
                size,
                qsize,
                event_idx=event_idx,
            )
        self.rings: list[DeviceRing] = []
        for index in (0, 1):
            q, desc, avail, used = driver.queues[index]
            self.rings.append(
                DeviceRing(self.mem, desc, avail, used, q, event_idx=event_idx, jit=device_jit)
            )
        self.model = EchoModel(sink=not echo)
        queues = {0: Queue(0, self.rings[0], 0)}
        if echo:
            queues[1] = Queue(1, self.rings[1], 1)
        self.runtime = _Runtime(queues)
        self.model.runtime = self.runtime  # type: ignore[assignment]

    def state(self) -> tuple[Any, ...]:
        q = self.queues
        out: list[Any] = [bytes(self.mem.read(0, RAM)), self.vcpu.doorbells]
        for ring in (q.tx.ring, q.rx.ring):
            out += _driver_state(ring)
        for dev in self.rings:
            out += _device_state(dev)
        for pool, slot_of in ((q.tx_pool, q.tx_slot), (q.rx_pool, q.rx_slot)):
            out += [pool.stack[: pool.free].tolist(), slot_of.tolist()]
        out += [q.tx_completed, dict(q.tx.counters), dict(q.rx.counters)]
        out += [self.model.stats(), self.model.next_seq, self.runtime.interrupts]
        return tuple(out)


def _driver_state(d: DriverRing) -> list[Any]:
    return [
        d.broken,
        d.in_flight,
        d._nfree,
        d._free[: d._nfree].tolist(),
        d._in_flight.tolist(),
        d._wcap.tolist(),
        d._avail_shadow,
        d._last_used,
        d._kick_old,
        d._unkicked,
        d.interrupts_enabled,
    ]


def _device_state(v: DeviceRing) -> list[Any]:
    return [
        v.broken,
        v.in_flight,
        v.last_avail,
        v.next_used,
        v.notifications_enabled,
        v._used_flags_shadow,
        v._in_flight.tolist(),
        v._wcap.tolist(),
    ]


class Program:
    """One random program on a compiled world and a reference world, compared after each
    step."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, seed: int, side: str, echo: bool = False
    ) -> None:
        self.rng = r = random.Random(seed)
        # the echo device's copy budgets: sometimes small, so the sink kernel reuses the
        # start of its buffer for every frame and the reference reads in pieces
        monkeypatch.setattr(echo_module, "SINK_FUSED_BYTES", r.choice([1 << 20, 4096]))
        monkeypatch.setattr(echo_module, "MAX_PASS_BYTES", r.choice([64 << 20, 2048]))
        self.qsize = r.choice([8, 16, 64, 256])
        self.size = r.choice([HEADER + 1, 16, 64, 200, 1500])
        kw = dict(qsize=self.qsize, size=self.size, event_idx=r.random() < 0.7, echo=echo)
        self.fast = World(monkeypatch, guest_jit=side == "guest", device_jit=side == "device", **kw)
        self.slow = World(monkeypatch, guest_jit=False, device_jit=False, **kw)
        self.worlds = (self.fast, self.slow)
        self.sent = 0  # frames posted by the guest (the next sequence number)
        self.received = 0  # frames the guest took back on RX
        assert self.fast.state() == self.slow.state()

    def run(self, ops: list[Callable[[], None]], hostile: bool, steps: int = 150) -> None:
        """``steps`` random choices among ``ops`` (and, in hostile programs, corruption)."""
        ops = [*ops, self.corrupt] if hostile else ops
        for _ in range(steps):
            self.rng.choice(ops)()

    def both(self, op: Callable[[World], Any]) -> Any:
        results = [norm(op(w)) for w in self.worlds]
        assert results[0] == results[1]
        assert self.fast.state() == self.slow.state()
        return results[0]

    # ----------------------------------------------------------------- guest steps

    def send(self) -> None:
        r = self.rng
        want = r.choice([0, 1, 3, 5, 16, self.qsize, self.qsize + 7])
        # several batches per call, each published and decided on alone, sometimes
        limit = r.choice([0, 0, want, 2 * want + 1, 5, 4 * self.qsize])
        n = self.both(lambda w: w.queues.send_frames(self.sent, want, limit))
        self.sent += n

    def receive(self) -> None:
        got, _ = self.both(lambda w: w.queues.receive_frames(self.received))
        self.received += got

    def interrupts(self) -> None:
        on = self.rng.random() < 0.5
        for ring in ("tx", "rx"):
            self.both(
                lambda w, ring=ring: (
                    getattr(w.queues, ring).ring.enable_interrupts()
                    if on
                    else getattr(w.queues, ring).ring.disable_interrupts()
                )
            )

    # ----------------------------------------------------------------- device steps

    def device_notifications(self) -> None:
        """The device turns kicks off or on (NO_NOTIFY or avail_event, as negotiated)."""
        on = self.rng.random() < 0.5
        index = self.rng.choice([0, 1])
        self.both(
            lambda w: (
                w.rings[index].enable_notifications()
                if on
                else w.rings[index].disable_notifications()
            )
        )

    def sink(self) -> None:
        self.both(lambda w: w.model.on_queue(w.runtime.queues[0]))

    def echo_pass(self) -> None:
        """The echo device's TX pass, or (less often) its RX pass."""
        index = 0 if self.rng.random() < 0.8 else 1
        self.both(lambda w: w.model.on_queue(w.runtime.queues[index]))

    def guest_receive(self) -> None:
        """A reference guest takes the echoed frames and reposts RX buffers (some)."""
        if self.rng.random() < 0.3:
            return
        got, _ = self.both(lambda w: w.queues.receive_frames(self.received))
        self.received += got

    def complete_tx(self) -> None:
        """The device completes some TX chains (without the model)."""
        k = self.rng.choice([1, 2, 5, 40, self.qsize])

        def op(w: World) -> Any:
            ring = w.rings[0]
            batch = ring.pop_batch(max_n=k)
            return ring.push_used(batch.heads, np.zeros(len(batch), dtype=np.int64))

        self.both(op)

    def echo_rx(self) -> None:
        """The device fills some RX buffers with frames: mostly the next ones in order;
        sometimes short, out of order or corrupted."""
        r = self.rng
        k = r.choice([1, 3, 16, self.qsize])
        first = self.received + r.choice([0, 0, 0, 0, 1])
        fault = r.choice(["none"] * 6 + ["short", "byte", "header"])
        at = r.randrange(k)

        def op(w: World) -> Any:
            ring = w.rings[1]
            batch = ring.pop_batch(max_n=k)
            n = len(batch)
            if not n:
                return 0
            frames = np.zeros((n, self.size), dtype=np.uint8)
            stamp(frames, np.arange(first, first + n))
            lens = np.minimum(batch.writable_lens, self.size).astype(np.int64)
            if fault == "byte" and at < n:
                frames[at, -1] ^= 0x40
            elif fault == "header" and at < n:
                frames[at, 4] ^= 1
            elif fault == "short" and at < n:
                lens[at] = max(0, lens[at] - 1)
            ring.write_payloads(batch, frames, lens)
            return ring.push_used(batch.heads, lens)

        self.both(op)

    def post_frames(self) -> None:
        """A reference guest posts frames the device side consumes (device tests)."""
        want = self.rng.choice([1, 4, 5, 17, self.qsize])

        def op(w: World) -> Any:
            q = w.queues
            n = min(want, q.tx_room())
            if not n or q.broken():
                return 0
            frames = np.zeros((n, self.size), dtype=np.uint8)
            stamp(frames, np.arange(self.sent, self.sent + n))
            if self.rng_frame_fault:
                frames[0, 0] ^= 1  # out of sequence: counted, not fatal
            q.send(frames)
            return n

        self.rng_frame_fault = self.rng.random() < 0.1
        self.sent += self.both(op)

    # ----------------------------------------------------------------- hostility

    def corrupt(self) -> None:
        bad = Corruption.draw(self.rng, self.qsize, RAM, Corruption.KINDS)
        queue = self.rng.choice([0, 1])

        def op(w: World) -> None:
            size, d, a, u = w.queues.fn.driver.queues[queue]
            bad.apply(w.mem, size, d, a, u)

        self.both(op)


@dataclass(frozen=True)
class Corruption:
    """One hostile rewrite of a split ring in guest memory, drawn at random once and
    applied the same to both worlds: an index jump, a forged used or avail entry, or a
    rewritten descriptor (address, length and flags)."""

    KINDS: ClassVar[tuple[str, ...]] = (
        "used_idx",
        "used_entry",
        "avail_idx",
        "desc",
        "avail_entry",
    )
    what: str
    i: int
    bump: int
    entry: int
    used: tuple[int, int]
    desc: tuple[int, int]
    flags: int

    @classmethod
    def draw(cls, r: random.Random, q: int, ram: int, kinds: Sequence[str]) -> Corruption:
        i = r.randrange(q)
        return cls(
            what=r.choice(kinds),
            i=i,
            bump=r.choice([1, 2, q, q + 1, 0x8000]),
            entry=r.choice([0, i, q, 0xFFFF]),
            used=(r.choice([0, i, q, 0xFFFF]), r.choice([0, 1, 0xFFFFFFFF])),
            desc=(r.choice([0, 0x10, ram - 4, ram + 64, 1 << 63]), r.choice([0, 8, 64, 1 << 20])),
            flags=r.choice([0, 1, 2, 4]),
        )

    def apply(self, mem: GuestMemoryMap, qsize: int, desc: int, avail: int, used: int) -> None:
        """Rewrite the ring of ``qsize`` entries whose areas start at these addresses."""
        i = self.i
        if self.what == "used_idx":
            view = mem.translate(used + 2, 2).view("<u2")
            view[0] = (int(view[0]) + self.bump) & INDEX_MASK
        elif self.what == "used_entry":
            mem.translate(used + 4 + 8 * i, 8).view("<u4")[:] = self.used
        elif self.what == "avail_idx":
            view = mem.translate(avail + 2, 2).view("<u2")
            view[0] = (int(view[0]) + self.bump) & INDEX_MASK
        elif self.what == "avail_entry":
            mem.translate(avail + 4 + 2 * i, 2).view("<u2")[0] = self.entry
        else:
            table = mem.translate(desc, RingLayout(qsize).desc_size).view(DESC_DTYPE)
            table[i] = (self.desc[0], self.desc[1], self.flags, 0)


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count each fused kernel's calls and the ones that did the whole step."""
    calls: Counter[str] = Counter()
    for name in ("driver_send_frames", "driver_receive_frames", "device_consume", "device_forward"):
        module = compiled_path.f if name.startswith("driver") else compiled_path.fd
        real = getattr(module, f"{name}_t")

        def counted(*args: Any, _real: Callable[..., None] = real, _name: str = name) -> None:
            _real(*args)
            calls[_name] += 1
            calls[f"{_name} done"] += int(args[-1][0]) == 2
            if _name == "driver_send_frames":  # several batches in one call
                calls[f"{_name} steps"] += int(args[-1][4]) > 1

        monkeypatch.setattr(module, f"{name}_t", counted)
    return calls


@pytest.mark.parametrize("hostile", [False, True], ids=["well-behaved", "hostile"])
@pytest.mark.parametrize("seed", range(12))
def test_fused_guest_steps_agree_with_the_reference(
    monkeypatch: pytest.MonkeyPatch, fused_calls: Counter[str], seed: int, hostile: bool
) -> None:
    p = Program(monkeypatch, seed * 2 + hostile, "guest")
    p.run(
        [
            p.send,
            p.send,
            p.receive,
            p.receive,
            p.complete_tx,
            p.echo_rx,
            p.interrupts,
            p.device_notifications,
        ],
        hostile,
    )
    # the kernels really ran (a test where every call declined would prove nothing; a
    # hostile program may break both rings before a step completes)
    assert fused_calls["driver_send_frames"] > 0
    if not hostile:
        assert fused_calls["driver_send_frames done"] > 0
        assert fused_calls["driver_receive_frames done"] > 0


@pytest.mark.parametrize("hostile", [False, True], ids=["well-behaved", "hostile"])
@pytest.mark.parametrize("seed", range(12))
def test_fused_sink_pass_agrees_with_the_reference(
    monkeypatch: pytest.MonkeyPatch, fused_calls: Counter[str], seed: int, hostile: bool
) -> None:
    p = Program(monkeypatch, 1000 + seed * 2 + hostile, "device")
    p.run([p.post_frames, p.post_frames, p.sink, p.sink, p.sink, p.device_notifications], hostile)
    assert fused_calls["device_consume"] > 0
    if not hostile:
        assert fused_calls["device_consume done"] > 0


@pytest.mark.parametrize("hostile", [False, True], ids=["well-behaved", "hostile"])
@pytest.mark.parametrize("seed", range(12))
def test_fused_echo_pass_agrees_with_the_reference(
    monkeypatch: pytest.MonkeyPatch, fused_calls: Counter[str], seed: int, hostile: bool
) -> None:
    p = Program(monkeypatch, 2000 + seed * 2 + hostile, "device", echo=True)
    p.run(
        [
            p.post_frames,
            p.post_frames,
            p.echo_pass,
            p.echo_pass,
            p.guest_receive,
            p.device_notifications,
        ],
        hostile,
    )
    assert fused_calls["device_forward"] > 0
    if not hostile:
        assert fused_calls["device_forward done"] > 0


def test_frames_the_kernel_writes_are_the_reference_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes across the payload's byte steps (every 2**24 values of ``seq * M + i``):
    the fused writer's bytes are :func:`shared.frames.stamp`'s."""
    for size in (HEADER + 1, 9, 63, 64, 65, 4096):
        worlds = [
            World(monkeypatch, qsize=16, size=size, event_idx=True, guest_jit=j, device_jit=False)
            for j in (True, False)
        ]
        for first in (0, 1, 6, 0xFFFFFFF0, (1 << 32) + 3):
            results = [w.queues.send_frames(first, 16) for w in worlds]
            assert results == [16, 16]
            assert worlds[0].state() == worlds[1].state()
            for w in worlds:
                ring = w.rings[0]
                batch = ring.pop_batch()
                ring.push_used(batch.heads, np.zeros(len(batch), dtype=np.int64))


@pytest.mark.parametrize("event_idx", [False, True])
def test_send_steps_publish_batch_by_batch_and_stop_at_a_kick(
    monkeypatch: pytest.MonkeyPatch, fused_calls: Counter[str], event_idx: bool
) -> None:
    """Several steps in one call: each batch its own publish and kick decision; the call
    ends at the first batch that needs a kick -- the same as single steps one by one."""
    worlds = [
        World(monkeypatch, qsize=64, size=64, event_idx=event_idx, guest_jit=j, device_jit=False)
        for j in (True, False)
    ]
    for w in worlds:
        w.rings[0].disable_notifications()  # no kicks wanted: every batch goes
    assert [w.queues.send_frames(0, 3, 30) for w in worlds] == [30, 30]
    assert worlds[0].state() == worlds[1].state()
    assert fused_calls["driver_send_frames steps"] == 1
    assert worlds[0].queues.tx.counters["doorbells_suppressed"] == 10
    rung = len(worlds[0].vcpu.doorbells)
    for w in worlds:  # the device takes them all and wants kicks again: the next batch rings
        ring = w.rings[0]
        batch = ring.pop_batch()
        ring.push_used(batch.heads, np.zeros(len(batch), dtype=np.int64))
        ring.enable_notifications()
    assert [w.queues.send_frames(30, 2, 30) for w in worlds] == [2, 2]
    assert worlds[0].state() == worlds[1].state()
    assert worlds[0].queues.tx.counters["doorbells"] == 1
    assert worlds[0].vcpu.doorbells[rung:] == [0]  # TX's doorbell, once


def test_fused_kernels_publish_with_release_and_fence_before_deciding() -> None:
    """Each fused step publishes its index with a release store and has a fence before it
    reads the peer's event index or flags (the compiled code, not the source)."""
    from shared.virtio import fused, fused_device
    from tests.unit.test_ring_kernels import _llvm

    # the store->load points each step has: driver -- used_event refreshed then used.idx
    # read again, avail.idx published then avail_event read; sink -- re-enable then
    # re-check, used.idx published then used_event read; forward -- those two plus RX's
    # avail_event refreshed then avail.idx read again
    for kernel, fences in (
        (fused.driver_send_frames_t, 2),
        (fused.driver_receive_frames_t, 2),
        (fused_device.device_consume_t, 2),
        (fused_device.device_forward_t, 3),
    ):
        ir = _llvm(kernel)
        name = kernel.py_func.__name__
        assert "store atomic i16" in ir and " release" in ir, name
        assert "load atomic i16" in ir and " acquire" in ir, name
        assert ir.count("fence seq_cst") >= fences, name


def test_pointer_tables_take_only_what_the_kernel_may_use() -> None:
    from shared.errors import UsageError
    from shared.virtio.pointers import PointerTable

    a = np.zeros(8, dtype=np.uint16)
    t = PointerTable([a, np.zeros((2, 4), np.uint8)], [np.uint16, np.uint8], [True, False])
    assert t.table.tolist() == [a.ctypes.data, 8, t.table[2], 8]
    with pytest.raises(UsageError, match="entry 0"):
        PointerTable([a], [np.uint32], [False])  # another dtype
    with pytest.raises(UsageError, match="entry 0"):
        PointerTable([np.zeros(8, np.uint16)[::2]], [np.uint16], [False])  # not contiguous
    ro = np.zeros(4, dtype=np.int64)
    ro.flags.writeable = False
    with pytest.raises(UsageError, match="read-only"):
        PointerTable([ro], [np.int64], [True])
    PointerTable([ro], [np.int64], [False])  # read-only is fine where it is only read
