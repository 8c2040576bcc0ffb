"""The ``evil`` workload: a hostile driver for the echo device.

The guest owns its rings, so it can write anything into them. This workload brings the echo
device up like :class:`~guestemu.workloads.echo.EchoSession` does, proves the path with a few
good frames, and then performs ONE attack (``params["attack"]``, see :data:`ATTACKS`) by
writing guest memory of one ring directly -- bypassing :class:`~shared.virtio.DriverRing`,
whose checks a real malicious guest does not have -- and kicks the queue.

The device must mark that queue broken and report it; the VMM then shows it in the queue's
``QUEUE_BROKEN`` register (and sets ``NEEDS_RESET``). The workload waits, with a bounded
timeout, until ``QUEUE_BROKEN`` of the attacked queue reads non-zero -- every read is an I/O
exit served by the VMM -- and checks that the device's other queue is not marked broken.

Where the hostile entry goes
----------------------------
The ring area's address is read back from the device's own ``QUEUE_DESC`` / ``QUEUE_AVAIL``
registers and viewed through guest RAM; offsets come from :class:`~shared.virtio.RingLayout`.
After a completed transfer the echo device has taken every TX buffer (it completes a TX
buffer as soon as it copies it out), so on queue 0 the hostile entries are *new* ones posted
at ``avail.idx``. RX buffers stay posted until a frame comes back, so on queue 1 the attack
rewrites the next ones the device will take (at the driver's ``last_used``) and then sends
:data:`RX_TRIGGER_FRAMES` good frames so that the device takes them.

Params: ``attack`` (required), ``queue`` (0 = TX, default; 1 = RX), ``frames`` (good frames
before the attack, default 8), ``wait`` (seconds to wait for QUEUE_BROKEN, default 20).
Result: ``ok`` (the attacked queue reads broken and the other does not), ``attack``,
``queue``, ``broken_reason`` (the VMM exposes only the register, so its value),
``queue_broken`` (both registers), ``needs_reset``, ``frames``, ``error``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from guestemu.drivers import Virtqueue
from guestemu.workloads.echo import EchoSession
from shared import pci_layout as pl
from shared.errors import VbusError
from shared.virtio import (
    DESC_DTYPE,
    INDEX_MASK,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    RingLayout,
)

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

TX, RX = 0, 1
ATTACKS: Final = (
    "index_jump",  # avail.idx += Q + 5
    "head_out_of_range",  # a head >= Q in the available ring
    "next_out_of_range",  # a NEXT descriptor whose next >= Q
    "loop",  # two descriptors chained to each other
    "addr_outside",  # a buffer beyond the end of guest RAM
    "addr_overflow",  # addr + len wraps past 2**64
    "zero_len",  # a buffer of length 0
    "huge_len",  # a buffer of length 0xFFFFFFFF
    "too_many",  # the same head made available twice while in flight
    "bad_indirect",  # an INDIRECT descriptor whose len % 16 != 0
)
RX_TRIGGER_FRAMES: Final = 2
"""Good frames sent after an RX attack: the echo device takes RX buffers only for replies."""
FRAME_SIZE: Final = 64
BUFFER_LEN: Final = 64
"""Length of the otherwise valid buffers the hostile descriptors point at."""


class RawRing:
    """Unchecked views of one split ring in guest RAM, as a malicious driver has it."""

    def __init__(self, area: npt.NDArray[np.uint8], layout: RingLayout) -> None:
        q = layout.qsize
        self.qsize = q
        self.desc = area[layout.desc_offset : layout.desc_offset + layout.desc_size].view(
            DESC_DTYPE
        )
        self.avail_idx = area[layout.avail_idx_offset : layout.avail_idx_offset + 2].view("<u2")
        self.avail_ring = area[layout.avail_ring_offset : layout.avail_ring_offset + 2 * q].view(
            "<u2"
        )

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.desc[i] = (addr, length, flags, nxt)

    def head_at(self, pos: int) -> int:
        return int(self.avail_ring[pos % self.qsize])

    def set_head(self, pos: int, head: int) -> None:
        self.avail_ring[pos % self.qsize] = head

    def publish(self, idx: int) -> None:
        # store->store: entries and descriptors above were written first (x86 keeps order).
        self.avail_idx[0] = idx & INDEX_MASK


class EvilDriver:
    """An echo session plus the register and ring access an attack needs."""

    def __init__(self, agent: GuestAgent, session: EchoSession) -> None:
        self.agent = agent
        self.session = session
        self.vcpu = session.vcpu
        bar = session.fn.found.bar_address
        if bar is None:
            raise VbusError("BAR0 of the echo device is not programmed")
        self.bar = bar

    # ------------------------------------------------------------------ registers (exits)

    def queue_reg(self, queue: int, offset: int) -> int:
        """Select ``queue`` and read one of its QUEUE_* registers (two exits)."""
        self.vcpu.write(self.bar + pl.REG_QUEUE_SEL, pl.REG_SIZE, queue)
        return self.vcpu.read(self.bar + offset, pl.REG_SIZE) & pl.U32_MASK

    def queue_addr(self, queue: int, lo: int) -> int:
        return self.queue_reg(queue, lo) | self.queue_reg(queue, lo + 4) << 32

    def needs_reset(self) -> bool:
        status = self.vcpu.read(self.bar + pl.REG_DEVICE_STATUS, pl.REG_SIZE)
        return bool(status & pl.STATUS_NEEDS_RESET)

    # ------------------------------------------------------------------ the ring area

    def raw_ring(self, vq: Virtqueue) -> RawRing:
        """The ring of ``vq`` where the device was told it is (read back from QUEUE_DESC)."""
        layout = vq.layout
        desc = self.queue_addr(vq.index, pl.REG_QUEUE_DESC_LO)
        avail = self.queue_addr(vq.index, pl.REG_QUEUE_AVAIL_LO)
        if avail != desc + layout.avail_offset:
            raise VbusError(
                f"queue {vq.index}: avail ring at {avail:#x}, expected "
                f"{desc + layout.avail_offset:#x} (not a RingLayout ring)"
            )
        raw = RawRing(self.session.ram.view(desc, layout.size), layout)
        if int(raw.avail_idx[0]) != vq.ring.avail_idx:
            raise VbusError(f"queue {vq.index}: the ring at {desc:#x} is not the driver's")
        return raw

    def ram_end(self) -> int:
        return max(slot.end for slot in self.agent.memory.map.slots())

    # ------------------------------------------------------------------ attacks

    def attack(self, name: str, queue: int) -> None:
        """Corrupt ``queue``'s ring as ``name`` says, then kick it."""
        s = self.session
        vq = s.tx if queue == TX else s.rx
        raw = self.raw_ring(vq)
        q = raw.qsize
        if queue == TX:
            # Every TX buffer was taken by the device: post new entries at avail.idx.
            pos, new = vq.ring.avail_idx, True
            h0, h1 = 0, 1
            buf, base = s.tx_pool.base, 0
        else:
            # RX buffers wait posted: rewrite the next ones the device will take.
            pos, new = vq.ring.last_used, False
            h0, h1 = raw.head_at(pos), raw.head_at(pos + 1)
            buf, base = s.rx_pool.base, VRING_DESC_F_WRITE
        idx = int(raw.avail_idx[0])
        posted = 1
        if name == "index_jump":
            posted = q + 5
        elif name == "head_out_of_range":
            raw.set_head(pos, q + 3)
        elif name == "too_many":
            raw.set_head(pos, h0)
            raw.set_head(pos + 1, h0)  # a head that is already in flight, again
            posted = 2
        else:
            if name == "next_out_of_range":
                raw.set_desc(h0, buf, BUFFER_LEN, base | VRING_DESC_F_NEXT, q + 3)
            elif name == "loop":
                raw.set_desc(h1, buf, BUFFER_LEN, base | VRING_DESC_F_NEXT, h0)
                raw.set_desc(h0, buf, BUFFER_LEN, base | VRING_DESC_F_NEXT, h1)
            elif name == "addr_outside":
                raw.set_desc(h0, self.ram_end() + 0x10000, BUFFER_LEN, base)
            elif name == "addr_overflow":
                raw.set_desc(h0, (1 << 64) - BUFFER_LEN // 2, BUFFER_LEN, base)
            elif name == "zero_len":
                raw.set_desc(h0, buf, 0, base)
            elif name == "huge_len":
                raw.set_desc(h0, buf, 0xFFFF_FFFF, base)
            elif name == "bad_indirect":
                raw.set_desc(h0, buf, 24, VRING_DESC_F_INDIRECT)
            else:
                raise VbusError(f"unknown attack {name!r}")
            raw.set_head(pos, h0)
        if new or name == "index_jump":
            raw.publish(idx + posted)
        self.vcpu.write(vq.notify_addr, pl.NOTIFY_SIZE, vq.index)  # always kick
        if queue == RX:
            self.trigger_rx()

    def trigger_rx(self) -> None:
        """Send a few good frames: echoing them makes the device take RX buffers."""
        q = self.session.queues
        n = min(RX_TRIGGER_FRAMES, q.tx_room())
        if n:
            q.send(np.zeros((n, self.session.size), dtype=np.uint8))

    def wait_broken(self, queue: int, deadline: float) -> int:
        """Poll ``queue``'s QUEUE_BROKEN until non-zero or ``deadline``; halt in between."""
        delay = 0.001
        while True:
            value = self.queue_reg(queue, pl.REG_QUEUE_BROKEN)
            left = deadline - time.monotonic()
            if value or left <= 0 or self.agent.loop.stopping:
                return value
            # Nothing interrupts us for this: halt with a short, growing timeout (bounded),
            # which still serves irqfds and notices (a dead device raises PeerGoneError).
            self.vcpu.halt(lambda: False, min(delay, left))
            delay = min(2 * delay, 0.05)


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    """Boot, send ``frames`` good frames, perform ``attack`` on ``queue``, wait for the
    device's report to show in QUEUE_BROKEN."""
    attack = str(params.get("attack"))
    queue = int(params.get("queue", TX))
    frames = int(params.get("frames", 8))
    wait = float(params.get("wait", 20.0))
    result: dict[str, Any] = {
        "workload": "evil",
        "ok": False,
        "attack": attack,
        "queue": queue,
        "broken_reason": None,
        "queue_broken": {},
        "needs_reset": None,
        "frames": 0,
        "error": None,
    }
    if attack not in ATTACKS or queue not in (TX, RX):
        result["error"] = f"unknown attack {attack!r} on queue {queue} (attacks: {ATTACKS})"
        return result
    other = RX if queue == TX else TX
    try:
        session = EchoSession(agent, FRAME_SIZE, batch=8)
        driver = EvilDriver(agent, session)
        error = session.transfer(frames, timeout=max(1.0, wait))
        result["frames"] = session.received
        if error is not None:
            result["error"] = f"before the attack: {error}"
            return result
        agent.emit("evil_attack", attack=attack, queue=queue)
        driver.attack(attack, queue)
        broken = driver.wait_broken(queue, time.monotonic() + wait)
        other_broken = driver.queue_reg(other, pl.REG_QUEUE_BROKEN)
        result.update(
            broken_reason=broken,
            needs_reset=driver.needs_reset(),
            queue_broken={str(queue): broken, str(other): other_broken},
        )
        if not broken:
            result["error"] = f"QUEUE_BROKEN of queue {queue} still 0 after {wait}s"
        elif other_broken:
            result["error"] = f"queue {other} was marked broken too"
        else:
            result["ok"] = True
    except VbusError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result
