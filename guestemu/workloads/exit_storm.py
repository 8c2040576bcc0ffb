"""The ``exit_storm`` workload: a hostile guest that makes I/O exits as fast as it can.

Every access to an address no ioeventfd catches is an exit the VMM must serve. This guest
reads a config-space register (function 0's vendor/device id; nothing needs to be
there) in a tight loop, back to back, each one a synchronous exit like a real vCPU's --
and between bursts of ``batch`` of them it tries what a real vCPU cannot: it sends
``pipeline`` exits at once on its VM channel without waiting (bypassing
:class:`~shared.channel.Channel`'s one-request-at-a-time), then collects every reply. The
broker lets a vCPU have only one exit in flight: the first is served, the others are
refused with EBUSY (unless the first was already answered when they arrived) and reach
nobody.

The storm goes on until the guest is asked to stop (SIGTERM/SIGINT: the loop's stop
eventfd, polled between bursts) or ``seconds`` pass (a safety bound, default 300).

Result: ``ok`` (no exit failed, and at least one pipelined exit saw EBUSY), ``exits``
(synchronous exits), ``pipelined`` (exits sent without waiting), ``pipelined_served``,
``busy`` (refused with EBUSY), ``served`` (every exit the VMM answered: ``exits`` +
``pipelined_served``), ``exits_per_s``, ``stopped`` (by a signal rather than the time
bound), ``error``.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import TYPE_CHECKING, Any, Final

from shared import pci_layout as pl
from shared import wire
from shared.errors import BrokerError, PeerGoneError, ProtocolError, VbusError
from shared.fds import recv_with_fds

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

TARGET: Final = pl.ecam_address(0, 0)
"""Function 0's vendor/device id: decoded by the VMM's bus model, absent or not."""
PIPELINE_SEQ: Final = 0xE000_0000
"""Sequence numbers of pipelined exits (all answered before the channel sends again)."""
REPLY_TIMEOUT: Final = 30.0


def pipeline(agent: GuestAgent, addr: int, count: int) -> tuple[int, int]:
    """Send ``count`` read exits without waiting, then collect every reply. Returns
    ``(served, busy)``; any other answer raises. Notices read meanwhile go to the agent,
    as the channel would hand them."""
    ch = agent.channel
    waiting = {PIPELINE_SEQ + i for i in range(count)}
    for seq in sorted(waiting):
        ch.send(wire.IoExit(seq=seq, write=0, len=4, addr=addr))
    served = busy = 0
    deadline = time.monotonic() + REPLY_TIMEOUT
    # Our own view of the channel's socket (a dup; the channel keeps its own).
    with socket.fromfd(ch.fileno(), socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.setblocking(False)
        while waiting:
            try:
                got = recv_with_fds(sock, wire.MAX_FRAME)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerGoneError(f"{len(waiting)} pipelined exits unanswered") from None
                select.select([sock], [], [], left)
                continue
            if got is None:
                raise PeerGoneError("the broker closed the connection")
            msg = wire.decode(*got)
            if msg.KIND is not wire.Kind.REPLY:
                if ch.on_notice is not None:
                    ch.on_notice(msg)
                else:
                    ch.notices.append(msg)
                continue
            if msg.seq not in waiting:
                msg.close_fds()
                raise ProtocolError(f"reply to seq {msg.seq}, which was not sent")
            waiting.discard(msg.seq)
            if isinstance(msg, wire.IoExitReply):
                served += 1
            elif isinstance(msg, wire.Error) and msg.errno == errno.EBUSY:
                busy += 1
            elif isinstance(msg, wire.Error):
                raise BrokerError(msg.errno, msg.text)
            else:
                raise ProtocolError(f"unexpected reply {wire.describe(msg)}")
    return served, busy


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    batch = max(1, int(params.get("batch", 64)))
    count = max(2, int(params.get("pipeline", 32)))
    seconds = float(params.get("seconds", 300.0))
    result: dict[str, Any] = {
        "workload": "exit_storm",
        "ok": False,
        "exits": 0,
        "pipelined": 0,
        "pipelined_served": 0,
        "busy": 0,
        "served": 0,
        "exits_per_s": 0.0,
        "stopped": False,
        "error": None,
    }
    vcpu, loop = agent.vcpu, agent.loop
    before = vcpu.counters["exits"]
    pipelined = pipelined_served = busy = 0
    start = time.monotonic()
    end = start + seconds
    agent.emit("exit_storm_started")
    try:
        while not loop.stopping and time.monotonic() < end:
            for _ in range(batch):
                vcpu.read(TARGET, 4)  # synchronous: the next exit as soon as this returns
            served, refused = pipeline(agent, TARGET, count)
            pipelined += count
            pipelined_served += served
            busy += refused
            loop.poll_once(0)  # the stop eventfd, the control pipe, notices
    except VbusError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    elapsed = max(time.monotonic() - start, 1e-9)
    exits = vcpu.counters["exits"] - before
    result.update(
        exits=exits,
        pipelined=pipelined,
        pipelined_served=pipelined_served,
        busy=busy,
        served=exits + pipelined_served,
        exits_per_s=(exits + pipelined) / elapsed,
        stopped=loop.stopping,
    )
    if result["error"] is None and busy == 0:
        result["error"] = "no pipelined exit was refused with EBUSY"
    result["ok"] = result["error"] is None
    return result
