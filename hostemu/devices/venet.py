"""``venet``: a virtual switch connecting several VMs' network devices.

One switch process serves every port: each port is a vbus device of some VM (its own
scoped channel, its own guest memory, rings, kickfds and vectors), and the process runs
one :class:`~hostemu.devices.runtime.DeviceRuntime` per port on a shared event loop.

Frames
------
A frame is ``dst u32 | src u32 | body`` (little-endian). Queue 0 of a port is its TX
(device-readable buffers), queue 1 its RX (device-writable). Taking a TX batch, the switch
reads the frames (vectorized), completes the TX buffers at once, and delivers each frame to
the RX queue of port ``dst``, copying it across the two VMs' memories, in order.

No silent loss
--------------
A frame whose destination has no RX buffer available (ring full of undelivered frames, or
the queue not set up) is dropped **and counted** in that port's ``rx_dropped``; a frame for
an unknown port or from a port spoofing its source counts in the sender's ``tx_dropped``.
Per-port counters: frames and bytes in each direction, drops, broken queues.
"""

from __future__ import annotations

from collections import Counter
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


class Switch:
    """The ports of one switch and the forwarding between them."""

    def __init__(self) -> None:
        self.ports: dict[int, VenetPort] = {}

    def deliver(self, src: int, frames: np.ndarray[Any, Any],
                lens: np.ndarray[Any, Any]) -> None:
        dst = frames[:, 0:4].copy().view("<u4").reshape(-1) if len(frames) else frames
        sender = self.ports[src]
        for port_id in (np.unique(dst).tolist() if len(frames) else []):
            pick = np.nonzero(dst == port_id)[0]  # keeps the senders' order
            target = self.ports.get(int(port_id))
            if target is None:
                sender.counters["tx_dropped"] += int(pick.size)
                continue
            target.receive(frames[pick], lens[pick])


class VenetPort(DeviceModel):
    name = "venet"

    def __init__(self, switch: Switch, port: int) -> None:
        self.switch = switch
        self.port = port
        self.counters: Counter[str] = Counter()
        switch.ports[port] = self

    def on_queue(self, q: Queue) -> bool:
        if q.index != TX:
            return False  # RX buffers are used as frames arrive
        q.ring.disable_notifications()
        batch = q.ring.pop_batch(max_n=BUDGET)
        if len(batch) == 0:
            return q.ring.enable_notifications()
        width = int(min(MAX_FRAME, max(L2_HEADER, int(batch.readable_lens.max()))))
        frames, lens = q.ring.read_payloads(batch, width)
        self.runtime.complete(q, batch.heads, np.zeros(len(batch), dtype=np.uint32))
        ok = lens >= L2_HEADER
        src = frames[:, 4:8].copy().view("<u4").reshape(-1)
        ok &= src == self.port  # a guest may not speak for another port
        self.counters["tx_dropped"] += int(np.count_nonzero(~ok))
        self.counters["tx_frames"] += int(np.count_nonzero(ok))
        self.counters["tx_bytes"] += int(lens[ok].sum())
        self.switch.deliver(self.port, frames[ok], lens[ok])
        return True

    def receive(self, frames: np.ndarray[Any, Any], lens: np.ndarray[Any, Any]) -> None:
        """Copy frames into this port's RX buffers; drop (and count) what does not fit."""
        rx = self.runtime.queues.get(RX)
        done = 0
        if rx is not None and not rx.ring.broken:
            batch = rx.ring.pop_batch(max_n=len(frames))
            done = len(batch)
            if rx.ring.broken:  # the receiving guest corrupted its RX ring
                self.runtime.report_broken(rx)
            if done:
                # a frame longer than the guest's RX buffer is truncated to it
                fit = np.minimum(lens[:done], batch.writable_lens)
                used = rx.ring.write_payloads(batch, frames[:done], fit)
                self.runtime.complete(rx, batch.heads, used)
                self.counters["rx_frames"] += done
                self.counters["rx_bytes"] += int(np.sum(used))
        self.counters["rx_dropped"] += len(frames) - done

    def stats(self) -> dict[str, Any]:
        return {"port": self.port, **self.counters}


def make_group(params: dict[str, Any], count: int) -> list[DeviceModel]:
    """One model per port channel, all on one switch; ``params.ports`` lists port ids."""
    ports = params.get("ports", list(range(count)))
    if (not isinstance(ports, list) or len(ports) != count
            or len(set(ports)) != count or not all(isinstance(p, int) for p in ports)):
        raise ConfigError(f"venet: params.ports must list {count} distinct port ids")
    switch = Switch()
    return [VenetPort(switch, p) for p in ports]


def make_model(params: dict[str, Any]) -> DeviceModel:
    return make_group({"ports": [params.get("port", 0)]}, 1)[0]
