"""The ``net`` workload: frames between VMs through the ``venet`` switch.

A frame is ``dst u32 | src u32 | seq u32 | checksum u32 | payload`` (the last three as in
:mod:`guestemu.workloads.frames`). Two roles:

* ``send``: send ``count`` frames to port ``peer`` and verify that each comes back exactly
  once, in order, intact. At most ``window`` frames are outstanding, which keeps the peer's
  RX ring from overflowing: the switch drops (and counts) frames for a full ring, it never
  blocks, so a sender that ignored this would lose frames by design.
* ``reflect``: return every frame to its source until ``count`` frames went back.

Round-trip times are taken per batch (send time to echo time) and reported as p50/p99.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from guestemu.drivers import Function, GuestRam, PacketQueues, boot, find
from guestemu.workloads.frames import HEADER, check, stamp
from shared import pci_layout as pl
from shared.errors import VbusError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

L2 = 8
TX, RX = 0, 1
PROBE = 0xFFFFFFFF


class NetPort(PacketQueues):
    """The guest's driver for one venet port: a TX/RX pair plus the port id."""

    def __init__(self, agent: GuestAgent, ram: GuestRam, fn: Function, size: int,
                 qsize: int = 256) -> None:
        super().__init__(agent.vcpu, ram, fn, size, qsize)
        cfg = np.frombuffer(fn.driver.read_device_config(0, pl.NET_CONFIG_DTYPE.itemsize),
                            dtype=pl.NET_CONFIG_DTYPE)
        self.port = int(cfg["port_id"][0])
        self.probes = 0


def _frames(dst: int, src: int, seqs: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    frames = np.zeros((len(seqs), size), dtype=np.uint8)
    frames[:, 0:4] = np.array([dst], "<u4").view(np.uint8)
    frames[:, 4:8] = np.array([src], "<u4").view(np.uint8)
    body = frames[:, L2:]
    stamp(body, seqs)
    return frames


def _seqs(frames: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    seqs: np.ndarray[Any, Any] = frames[:, L2:L2 + 4].copy().view("<u4").reshape(-1)
    return seqs


def handshake(port: NetPort, peer: int, deadline: float) -> str | None:
    """Probe the peer until it answers: its RX ring may not be set up yet, and the switch
    drops (and counts) frames for a port that has no buffers -- like ARP, retry."""
    probes = 0
    while time.monotonic() < deadline:
        if port.tx_room():
            port.send(_frames(peer, port.port, np.array([PROBE]), port.size))
            probes += 1
        retry = min(deadline, time.monotonic() + 0.05)
        while time.monotonic() < retry:
            frames, _ = port.receive()
            if len(frames) and bool((_seqs(frames) == PROBE).any()):
                port.probes = probes
                return None
            port.wait(retry)
    return f"port {peer} never answered ({probes} probes)"


def send(port: NetPort, peer: int, count: int, batch: int, window: int,
         timeout: float) -> dict[str, Any]:
    sent = received = 0
    start = time.monotonic()
    error = handshake(port, peer, start + timeout)
    rtts: list[float] = []
    sent_at: dict[int, float] = {}
    deadline = start + timeout
    while received < count and error is None:
        progressed = False
        n = min(batch, count - sent, window - (sent - received), port.tx_room())
        if n > 0:
            sent_at[sent + n - 1] = time.monotonic()
            port.send(_frames(peer, port.port, np.arange(sent, sent + n), port.size))
            sent += n
            progressed = True
        frames, lens = port.receive()
        data = _seqs(frames) != PROBE  # late answers to extra probes are not data
        frames, lens = frames[data], lens[data]
        if len(frames):
            error = check(frames[:, L2:], lens - L2, received)
            now = time.monotonic()
            for last in [k for k in sent_at if k < received + len(frames)]:
                rtts.append(now - sent_at.pop(last))
            received += len(frames)
            progressed = True
        error = error or port.broken()
        if not progressed and error is None and not port.wait(deadline):
            error = f"timed out: sent {sent}, received {received} of {count}"
    elapsed = max(time.monotonic() - start, 1e-9)
    rtt = np.array(rtts or [0.0]) * 1e6
    return {"role": "send", "ok": error is None, "error": error, "frames": received,
            "bytes": received * port.size, "elapsed": elapsed,
            "frames_per_s": received / elapsed, "mb_per_s": received * port.size / elapsed / 1e6,
            "rtt_p50_us": float(np.percentile(rtt, 50)),
            "rtt_p99_us": float(np.percentile(rtt, 99)), "probes": port.probes,
            **port.counters()}


def reflect(port: NetPort, count: int, timeout: float) -> dict[str, Any]:
    """Send every received frame back to its source (swap dst and src)."""
    done = 0
    probes = 0
    error: str | None = None
    backlog: list[np.ndarray[Any, Any]] = []
    deadline = time.monotonic() + timeout
    while done < count and error is None:
        progressed = False
        frames, _ = port.receive()
        if len(frames):
            back = frames.copy()
            back[:, 0:4], back[:, 4:8] = frames[:, 4:8], frames[:, 0:4]
            backlog.append(back)
            extra = int(np.count_nonzero(_seqs(frames) == PROBE))  # probes are not data
            count += extra
            probes += extra
            progressed = True
        while backlog and port.tx_room():
            head = backlog[0]
            n = min(len(head), port.tx_room())
            port.send(head[:n])
            done += n
            if n == len(head):
                backlog.pop(0)
            else:
                backlog[0] = head[n:]
            progressed = True
        error = port.broken()
        if not progressed and error is None and not port.wait(deadline):
            error = f"timed out after reflecting {done} of {count}"
    # let the last frames leave before the guest exits
    while error is None and port.tx_room() < len(port.tx_pool.data):
        if not port.wait(deadline, need_tx=True):
            error = "timed out waiting for the last frames to leave"
    return {"role": "reflect", "ok": error is None, "error": error, "frames": done - probes,
            "probes": probes, **port.counters()}


def run_port(agent: GuestAgent, ram: GuestRam, fn: Function,
             params: dict[str, Any]) -> dict[str, Any]:
    size = max(int(params.get("size", 256)), L2 + HEADER + 1)
    port = NetPort(agent, ram, fn, size)
    count = int(params.get("count", 1000))
    timeout = float(params.get("timeout", 60.0))
    agent.emit("net_ready", port=port.port)
    if params.get("role", "send") == "reflect":
        return reflect(port, count, timeout)
    return send(port, int(params["peer"]), count, int(params.get("batch", 32)),
                int(params.get("window", 64)), timeout)


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    ram = GuestRam(agent.memory.map)
    nets = find(boot(agent.vcpu), pl.DEVICE_NET)
    if not nets:
        raise VbusError("no venet port on the bus")
    return run_port(agent, ram, nets[0], params)
