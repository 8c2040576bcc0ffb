"""The ``net`` workload: frames between VMs through the ``venet`` switch.

A frame is ``dst u32 | src u32 | seq u32 | checksum u32 | payload`` (the last three as in
:mod:`shared.frames`). Three roles:

* ``send``: send ``count`` frames to port ``peer`` and verify that each comes back exactly
  once, in order, intact. At most ``window`` frames are outstanding, which keeps the peer's
  RX ring from overflowing: the switch drops (and counts) frames for a full ring, it never
  blocks, so a sender that ignored this would lose frames by design. With ``stop`` (a list
  of ports) it first makes sure those ports answer, and once done sends each a stop frame:
  that is how a test brackets its traffic by a flood.
* ``reflect``: return every frame from port ``peer`` to it until ``count`` frames went
  back. A frame from any other source is not reflected: it is counted per source
  (``foreign_from``) and fails the run, unless ``others = "count"`` (just count them).
* ``flood``: send frames to port ``peer`` as fast as TX buffers come back, answering
  probes, until a stop frame arrives (or ``count`` frames went, if given).

Round-trip times are taken per batch (send time to echo time) and reported as p50/p99.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from guestemu.drivers import Function, GuestRam, PacketQueues, boot, find
from guestemu.workloads import check_choice, check_int, check_positive
from shared import pci_layout as pl
from shared.errors import ConfigError, VbusError
from shared.frames import HEADER, check, stamp

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

L2 = 8
TX, RX = 0, 1
PROBE = 0xFFFFFFFF
STOP = 0xFFFFFFFE


class NetPort(PacketQueues):
    """The guest's driver for one venet port: a TX/RX pair plus the port id."""

    def __init__(
        self, agent: GuestAgent, ram: GuestRam, fn: Function, size: int, qsize: int = 256
    ) -> None:
        super().__init__(agent.vcpu, ram, fn, size, qsize)
        cfg = np.frombuffer(
            fn.driver.read_device_config(0, pl.NET_CONFIG_DTYPE.itemsize), dtype=pl.NET_CONFIG_DTYPE
        )
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
    seqs: np.ndarray[Any, Any] = frames[:, L2 : L2 + 4].copy().view("<u4").reshape(-1)
    return seqs


def _sources(frames: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    srcs: np.ndarray[Any, Any] = frames[:, 4:8].copy().view("<u4").reshape(-1)
    return srcs


def _swapped(frames: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``frames`` addressed back to where they came from."""
    back: np.ndarray[Any, Any] = frames.copy()
    back[:, 0:4], back[:, 4:8] = frames[:, 4:8], frames[:, 0:4]
    return back


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
            if len(frames) and bool(((_seqs(frames) == PROBE) & (_sources(frames) == peer)).any()):
                port.probes += probes
                return None
            port.wait(retry)
    return f"port {peer} never answered ({probes} probes)"


def send_stop(port: NetPort, ports: list[int], deadline: float) -> str | None:
    """Send each of ``ports`` a stop frame (a flooder ends on it)."""
    for dst in ports:
        while not port.tx_room():
            if port.broken() or not port.wait(deadline, need_tx=True):
                return f"no TX buffer to tell port {dst} to stop"
        port.send(_frames(dst, port.port, np.array([STOP]), port.size))
    return None


def send(
    port: NetPort,
    peer: int,
    count: int,
    batch: int,
    window: int,
    timeout: float,
    stop: list[int] | None = None,
) -> dict[str, Any]:
    sent = received = 0
    start = time.monotonic()
    deadline = start + timeout
    error = None
    for other in stop or []:  # they are there before our traffic starts
        error = error or handshake(port, other, deadline)
    error = error or handshake(port, peer, deadline)
    rtts: list[float] = []
    sent_at: dict[int, float] = {}
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
        strangers = _sources(frames) != peer
        if strangers.any():
            error = f"a frame from port {int(_sources(frames)[strangers][0])}, not from {peer}"
        elif len(frames):
            error = check(frames[:, L2:], lens - L2, received)
            now = time.monotonic()
            for last in [k for k in sent_at if k < received + len(frames)]:
                rtts.append(now - sent_at.pop(last))
            received += len(frames)
            progressed = True
        error = error or port.broken()
        if not progressed and error is None and not port.wait(deadline):
            error = f"timed out: sent {sent}, received {received} of {count}"
    if stop and not port.broken():  # even after an error: a flooder must not run on
        error = error or send_stop(port, stop, deadline)
    elapsed = max(time.monotonic() - start, 1e-9)
    rtt = np.array(rtts or [0.0]) * 1e6
    return {
        "role": "send",
        "ok": error is None,
        "error": error,
        "frames": received,
        "bytes": received * port.size,
        "elapsed": elapsed,
        "frames_per_s": received / elapsed,
        "mb_per_s": received * port.size / elapsed / 1e6,
        "rtt_p50_us": float(np.percentile(rtt, 50)),
        "rtt_p99_us": float(np.percentile(rtt, 99)),
        "probes": port.probes,
        **port.counters(),
    }


def _drain_tx(port: NetPort, deadline: float) -> str | None:
    """Let the last frames leave before the guest exits."""
    while port.tx_room() < len(port.tx_pool.data):
        if not port.wait(deadline, need_tx=True):
            return "timed out waiting for the last frames to leave"
    return None


def reflect(
    port: NetPort, peer: int, count: int, timeout: float, others: str = "fail"
) -> dict[str, Any]:
    """Send every frame from port ``peer`` back to it (swap dst and src); count frames
    from anyone else per source, without reflecting them."""
    done = 0
    probes = 0
    error: str | None = None
    foreign: Counter[int] = Counter()
    backlog: list[np.ndarray[Any, Any]] = []
    deadline = time.monotonic() + timeout
    while done < count and error is None:
        progressed = False
        frames, _ = port.receive()
        if len(frames):
            srcs = _sources(frames)
            mine = srcs == peer
            if not mine.all():
                foreign.update(srcs[~mine].tolist())
                frames = frames[mine]
            progressed = True
        if len(frames):
            backlog.append(_swapped(frames))
            extra = int(np.count_nonzero(_seqs(frames) == PROBE))  # probes are not data
            count += extra
            probes += extra
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
    error = error or _drain_tx(port, deadline)
    if error is None and foreign and others != "count":
        error = (
            f"{sum(foreign.values())} frames from unexpected sources "
            f"(ports {sorted(foreign)}), expected only port {peer}"
        )
    return {
        "role": "reflect",
        "ok": error is None,
        "error": error,
        "frames": done - probes,
        "probes": probes,
        "foreign": sum(foreign.values()),
        "foreign_from": {str(s): n for s, n in sorted(foreign.items())},
        **port.counters(),
    }


def flood(port: NetPort, peer: int, count: int, batch: int, timeout: float) -> dict[str, Any]:
    """Send frames to ``peer`` as fast as TX buffers come back, never waiting for an
    answer, until a stop frame arrives (or ``count`` frames went, if ``count``). Probes
    are answered -- but only once the flood is under way, so an answer means it is."""
    sent = answered = 0
    stopped_by: int | None = None
    error: str | None = None
    answers: list[np.ndarray[Any, Any]] = []
    start = time.monotonic()
    deadline = start + timeout
    while error is None and stopped_by is None and not (count and sent >= count):
        progressed = False
        frames, _ = port.receive()
        if len(frames):
            seqs = _seqs(frames)
            stops = seqs == STOP
            if stops.any():
                stopped_by = int(_sources(frames)[stops][0])
            if (seqs == PROBE).any():
                answers.append(_swapped(frames[seqs == PROBE]))
            progressed = True
        while sent and answers and port.tx_room() >= len(answers[0]):
            answered += len(answers[0])
            port.send(answers.pop(0))
            progressed = True
        n = min(batch, port.tx_room(), count - sent if count else batch)
        if n > 0 and stopped_by is None:
            port.send(_frames(peer, port.port, np.arange(sent, sent + n), port.size))
            sent += n
            progressed = True
        error = port.broken()
        if not progressed and error is None and not port.wait(deadline, need_tx=True):
            error = f"timed out: sent {sent} frames and was never told to stop"
    error = error or _drain_tx(port, deadline)
    elapsed = max(time.monotonic() - start, 1e-9)
    return {
        "role": "flood",
        "ok": error is None,
        "error": error,
        "frames": sent,
        "frames_per_s": sent / elapsed,
        "stopped_by": stopped_by,
        "probes_answered": answered,
        **port.counters(),
    }


ROLES = ("send", "reflect", "flood")


def check_params(params: dict[str, Any]) -> None:
    """The port's parameters, checked before anything starts (see the package)."""
    check_choice(params, "role", ROLES)
    if "peer" not in params:
        raise ConfigError(f"peer is missing (role {params.get('role', 'send')!r} needs a port id)")
    check_int(params, "peer", 0)
    check_int(params, "count", 0)
    for key in ("size", "batch", "window"):
        check_int(params, key, 1)
    check_positive(params, "timeout")
    check_choice(params, "others", ("fail", "count"))


def run_port(
    agent: GuestAgent, ram: GuestRam, fn: Function, params: dict[str, Any]
) -> dict[str, Any]:
    check_params(params)
    size = max(int(params.get("size", 256)), L2 + HEADER + 1)
    port = NetPort(agent, ram, fn, size)
    role = params.get("role", "send")
    peer = int(params["peer"])
    count = int(params.get("count", 0 if role == "flood" else 1000))
    timeout = float(params.get("timeout", 60.0))
    batch = int(params.get("batch", 32))
    agent.emit("net_ready", port=port.port)
    if role == "reflect":
        return reflect(port, peer, count, timeout, str(params.get("others", "fail")))
    if role == "flood":
        return flood(port, peer, count, batch, timeout)
    stop = [int(p) for p in params.get("stop", [])]
    return send(port, peer, count, batch, int(params.get("window", 64)), timeout, stop)


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    ram = GuestRam(agent.memory.map)
    nets = find(boot(agent.vcpu), pl.DEVICE_NET)
    if not nets:
        raise VbusError("no venet port on the bus")
    return run_port(agent, ram, nets[0], params)
