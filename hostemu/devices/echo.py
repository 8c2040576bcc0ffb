"""``echo``: a loopback device -- every buffer the guest sends comes back to it.

Queue 0 (TX) carries device-readable buffers from the guest, queue 1 (RX) device-writable
buffers the guest posts for replies. Each TX buffer is copied, in arrival order, into the
next RX buffer, truncated to the RX buffer's size. A TX buffer is completed only once its
copy was delivered into an RX buffer (RX completed first): a completed TX buffer is an
acknowledged frame, and a device process that dies holding copies loses nothing
acknowledged -- its restarted successor resumes TX at the used index and takes those
buffers again (the guest drops a reply it already has). Copies wait in a bounded backlog
until RX buffers are available; when it is full the device stops taking TX buffers --
back-pressure, never loss. A device reset drops the backlog. Batches take the ring's
vectorized path.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from hostemu.devices.runtime import BUDGET, DeviceModel, Queue, no_params
from shared import pci_layout as pl

TX, RX = 0, 1
MAX_FRAME = 16 << 20  # the ring's own per-buffer limit
MAX_PASS_BYTES = 64 << 20  # copy-out memory one pass may use (bounds big-buffer batches)
MAX_BACKLOG = 4096


class EchoModel(DeviceModel):
    name = "echo"

    def __init__(self) -> None:
        # (TX heads, their copies, copied lengths), oldest first; the heads complete on delivery
        self.backlog: deque[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any],
                                  np.ndarray[Any, Any]]] = deque()
        self.backlog_frames = 0
        self._pass_limit = BUDGET
        self.echoed = 0
        self.bytes = 0

    def on_queue(self, q: Queue) -> bool:
        more = False
        if q.index == TX:
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
        room = min(BUDGET, MAX_BACKLOG - self.backlog_frames, self._pass_limit)
        if room <= 0:
            return False
        q.ring.disable_notifications()
        batch = q.ring.pop_batch(max_n=room)
        if len(batch) == 0:
            return q.ring.enable_notifications()  # re-check: no lost kick
        width = int(min(MAX_FRAME, max(1, int(batch.readable_lens.max()))))
        # next pass: as many buffers of this size as fit the per-pass copy budget
        self._pass_limit = max(1, MAX_PASS_BYTES // width)
        data, copied = q.ring.read_payloads(batch, width)
        self.backlog.append((batch.heads, data, copied))
        self.backlog_frames += len(batch)
        return True

    def _fill_rx(self, q: Queue) -> bool:
        if not self.backlog_frames:
            return False
        heads, data, copied = self.backlog[0]
        batch = q.ring.pop_batch(max_n=min(BUDGET, len(copied)))
        if len(batch) == 0:
            q.ring.enable_notifications()
            return False
        n = len(batch)
        # truncated to the RX buffer's size (a guest may post small ones)
        lens = q.ring.write_payloads(batch, data[:n], np.minimum(copied[:n], batch.writable_lens))
        self.runtime.complete(q, batch.heads, lens)
        # Delivered: only now acknowledge the TX buffers (after the RX used entries).
        tx = self.runtime.queues.get(TX)
        if tx is not None and not tx.ring.broken:
            self.runtime.complete(tx, heads[:n], np.zeros(n, dtype=np.uint32))
        self.echoed += n
        self.bytes += int(np.sum(lens))
        if n == len(copied):
            self.backlog.popleft()
        else:
            self.backlog[0] = (heads[n:], data[n:], copied[n:])
        self.backlog_frames -= n
        return bool(self.backlog_frames)

    def on_reset(self) -> None:
        self.backlog.clear()
        self.backlog_frames = 0

    def stats(self) -> dict[str, Any]:
        return {"echoed": self.echoed, "bytes": self.bytes, "backlog": self.backlog_frames}


DEVICE_ID = pl.DEVICE_ECHO
QUEUES = 2
VECTORS = 2


def make_model(params: dict[str, Any]) -> DeviceModel:
    no_params("echo", params)
    return EchoModel()
