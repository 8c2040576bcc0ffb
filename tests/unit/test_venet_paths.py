"""venet's TX pass on the compiled path (one fused kernel: pop, validate, copy the frames
out, complete) against the reference pass (the ring's per-operation steps), on the
production code that chooses between them.

Each test runs one random program on two switches of three ports -- every port's device
rings on the compiled path, or on the reference path -- and after every step requires the
same results, every byte of every guest's memory, the device rings' private bookkeeping,
the ports' counters and waiting frames, and the interrupts and broken-ring reports. The
guests send frames to known and unknown ports, with their own and spoofed sources, runts
and frames of every size up to their buffers; in hostile programs they also rewrite
descriptors and indices under the switch.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, cast

import numpy as np
import pytest

from hostemu.devices import venet
from shared.virtio import compiled as compiled_path
from tests.unit.test_fused import Corruption, _device_state
from tests.unit.test_ring_scalar import norm
from tests.unit.test_venet import BUF, RAM, RX_BUF, TX_RING, Guest, frame

pytestmark = pytest.mark.timeout(60)

PORTS = 3


class World:
    def __init__(self, qsize: int, jit: bool) -> None:
        ports = cast(list[venet.VenetPort], venet.make_group({}, PORTS))
        self.guests = [Guest(p, qsize=qsize, rx_buffers=qsize // 2, jit=jit) for p in ports]

    def state(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for g in self.guests:
            out += [bytes(g.ram), g.port.stats(), g.port.stage.waiting()]
            out += [dict(g.runtime.interrupts), list(g.runtime.reported)]
            for q in g.runtime.queues.values():
                out += _device_state(q.ring)
        return tuple(out)


class Program:
    def __init__(self, seed: int) -> None:
        self.rng = r = random.Random(seed)
        self.qsize = r.choice([8, 16, 64])
        self.fast = World(self.qsize, jit=True)
        self.slow = World(self.qsize, jit=False)
        assert self.fast.state() == self.slow.state()

    def both(self, op: Any) -> Any:
        results = [norm(op(w)) for w in (self.fast, self.slow)]
        assert results[0] == results[1]
        assert self.fast.state() == self.slow.state()
        return results[0]

    def send(self) -> None:
        r = self.rng
        g = r.randrange(PORTS)
        frames = []
        for _ in range(r.choice([1, 2, 5, self.qsize])):
            dst = r.choice([0, 1, 2, 2, 7])  # 7: no such port
            src = g if r.random() < 0.9 else (g + 1) % PORTS  # sometimes spoofed
            size = r.choice([0, 3, 7, 8, 9, 64, BUF])
            frames.append((frame(dst, src) + bytes(r.randrange(256) for _ in range(size)))[:BUF])
        if r.random() < 0.1:
            frames[0] = frames[0][: r.randrange(1, 8)]  # a runt

        def op(w: World) -> int:
            guest = w.guests[g]
            if guest.tx.broken is not None or guest.tx.free_descriptors < len(frames):
                return 0
            guest.send(frames)
            return len(frames)

        self.both(op)

    def pump(self) -> None:
        g = self.rng.randrange(PORTS)
        self.both(lambda w: w.guests[g].port.on_queue(w.guests[g].tx_queue))

    def refill(self) -> None:
        g, n = self.rng.randrange(PORTS), self.rng.choice([1, 3, self.qsize])

        def op(w: World) -> int:
            guest = w.guests[g]
            k = min(n, len(guest.rx_free), guest.rx.free_descriptors)
            if guest.rx.broken is not None or not k:
                return 0
            guest.refill(k)
            return k

        self.both(op)

    def reap(self) -> None:
        """The guests take back what the switch completed (TX) and delivered (RX)."""
        g = self.rng.randrange(PORTS)

        def op(w: World) -> Any:
            guest = w.guests[g]
            ids, lens = guest.tx.get_used()
            got = [ids.tolist(), lens.tolist()]
            if guest.rx.broken is None:
                rx_ids, rx_lens = guest.rx.get_used()
                for h in rx_ids.tolist():
                    guest.rx_free.append((guest.rx_addr.pop(h) - RX_BUF) // guest.rx_size)
                got += [rx_ids.tolist(), rx_lens.tolist()]
            return got

        self.both(op)

    def corrupt(self) -> None:
        g = self.rng.randrange(PORTS)
        # (what the guest writes: the switch only reads TX)
        bad = Corruption.draw(self.rng, self.qsize, RAM, ("avail_idx", "avail_entry", "desc"))

        def op(w: World) -> None:
            layout = w.guests[g].layout
            avail, used = TX_RING + layout.avail_offset, TX_RING + layout.used_offset
            bad.apply(w.guests[g].mem, self.qsize, TX_RING, avail, used)

        self.both(op)


@pytest.fixture
def fused_passes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the fused TX passes, and the ones that took frames."""
    calls: Counter[str] = Counter()
    real = compiled_path.fd.device_consume_t

    def counted(*args: Any) -> None:
        real(*args)
        calls["passes"] += 1
        calls["took"] += int(args[-1][0]) == 2 and int(args[-1][1]) > 0

    monkeypatch.setattr(compiled_path.fd, "device_consume_t", counted)
    return calls


@pytest.mark.parametrize("hostile", [False, True], ids=["well-behaved", "hostile"])
@pytest.mark.parametrize("seed", range(10))
def test_venet_tx_pass_agrees_with_the_reference(
    fused_passes: Counter[str], seed: int, hostile: bool
) -> None:
    p = Program(seed * 2 + hostile)
    ops = [p.send, p.send, p.pump, p.pump, p.pump, p.refill, p.reap]
    if hostile:
        ops.append(p.corrupt)
    for _ in range(150):
        p.rng.choice(ops)()
    # the kernel really ran and took frames (a program where every pass declined would
    # prove nothing; a hostile one may break every TX ring early)
    assert fused_passes["passes"] > 0
    if not hostile:
        assert fused_passes["took"] > 0


def test_frames_of_every_width_come_out_of_the_compiled_pass_intact(
    fused_passes: Counter[str],
) -> None:
    """Runts, a header alone, and frames up to the buffer size in one pass: the rows the
    kernel copied out, as the switch forwards them, are the reference's (a port sending to
    itself). A device-writable buffer on TX has nothing to read: a runt, dropped."""
    worlds = [World(64, jit) for jit in (True, False)]
    sizes = [0, 1, 7, 8, 9, 63, 64, 65, BUF - 8]
    frames = [
        frame(0, 0) + bytes((k * 5 + j) & 0xFF for j in range(n)) for k, n in enumerate(sizes)
    ]
    frames[0], frames[1] = b"\x00", b"\x00\x01\x02"
    for w in worlds:
        g = w.guests[0]
        g.send(frames)
        g.tx.add_batch(np.array([RX_BUF - BUF], np.uint64), np.array([64]), True)
        assert g.pump() >= 1
    got = [w.guests[0].received() for w in worlds]
    assert got[0] == got[1] == frames[2:]  # the runts (under a header) are dropped
    assert worlds[0].state() == worlds[1].state()
    assert worlds[0].guests[0].port.counters["tx_dropped"] == 3
    assert fused_passes["took"] == 1  # the compiled world's pass was the kernel's
