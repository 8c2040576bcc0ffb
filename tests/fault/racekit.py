"""Helpers for the race tests (:mod:`tests.fault.test_races`).

* :class:`Peer` -- one broker connection driven frame by frame. Its :attr:`Peer.channel`
  is an ordinary :class:`~shared.channel.Channel` for setup steps; :meth:`Peer.post` sends
  a request *without waiting*, so a test can make something else happen while the broker
  is handling it, and :meth:`Peer.reply` / :meth:`Peer.next` read what came back in
  arrival order (notices the channel read meanwhile land in the same queue).
* :class:`Straddle` -- two actions fired back to back in a random order, the gap between
  them adapting so that the broker keeps seeing them both ways round.
* :class:`GuestSide` -- the test playing a VM's guest process on a scoped channel: it
  records attaches, detaches (with their reasons) and peer-gone notices, closes every fd
  it is handed, and acknowledges detaches (or leaves that to the test).
* The oracles every scenario ends with: the broker's open-fd count is back to
  its baseline, /dev/shm gained nothing, the broker has no child process, its table is
  empty (or holds exactly what the survivors own), no reference count is negative, it
  answers a ping within :data:`PING_BOUND` seconds (scaled, like every bound here, by
  ``VBUSEMU_TEST_TIME_SCALE``: :mod:`tests.timing`), and its log has no traceback.

Rounds scale with ``VBUSEMU_ROUNDS`` (a multiplier, default 1): CI runs the small
default; ``VBUSEMU_ROUNDS=20`` runs twenty times as many rounds of every scenario.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared import wire
from shared.channel import Channel
from shared.errors import PeerGoneError
from shared.fds import OwnedFd, recv_with_fds
from tests import timing
from tests.conftest import BrokerHandle, shm_entries

T = TypeVar("T")

PING_BOUND = timing.scaled(1.0)
"""Seconds within which the broker must answer a ping, whatever else it is doing."""

WAIT = timing.scaled(10.0)
"""How long a helper waits for a frame or a state the broker owes us (a liveness bound)."""

RAW_SEQ_BASE = 0x4000_0000
"""Sequence numbers :meth:`Peer.post` uses: far from the ones :class:`Channel` counts up."""


def scale() -> int:
    """The ``VBUSEMU_ROUNDS`` multiplier (at least 1)."""
    return max(1, int(os.environ.get("VBUSEMU_ROUNDS", "1")))


def scaled(n: int) -> int:
    return n * scale()


def spin(seconds: float) -> None:
    """Busy-wait: a randomized delay finer than any sleep's granularity."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Straddle:
    """Fire two actions back to back, in a random order, a random gap apart -- and keep
    the rounds straddling the point where the broker sees them either way round.

    The broker thread wakes within tens of microseconds, so which frame it handles first
    depends on the order and the gap. Per order, the gap's upper bound shrinks after a
    round the first action won (closer to a true tie) and doubles after one the second
    action won (so the first gets its chance): over the rounds both outcomes keep
    happening, whatever the scheduler favours on this machine today.
    """

    MIN_GAP, MAX_GAP = 1e-6, 2e-3

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.gap = {True: 50e-6, False: 50e-6}
        self._last = True

    def fire(self, a: Callable[[], T], b: Callable[[], object]) -> T:
        """Run ``a`` and ``b`` in a random order, a random gap apart; ``a``'s result."""
        self._last = a_first = self.rng.random() < 0.5
        gap = self.rng.uniform(0, self.gap[a_first])
        if a_first:
            got = a()
            spin(gap)
            b()
        else:
            b()
            spin(gap)
            got = a()
        return got

    def result(self, a_won: bool) -> None:
        """Tell which action the broker handled first in the last round."""
        a_first = self._last
        if a_won == a_first:
            self.gap[a_first] = max(self.MIN_GAP, self.gap[a_first] / 1.2)
        else:
            self.gap[a_first] = min(self.MAX_GAP, self.gap[a_first] * 2)


class Peer:
    """A broker connection: a :class:`Channel` plus frame-level posting and reading."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.channel = Channel(sock)
        self.inbox: deque[wire.Message] = deque()
        self.channel.on_notice = self.inbox.append  # one queue, in arrival order
        self._seq = itertools.count(RAW_SEQ_BASE)
        self.eof = False

    @classmethod
    def connect(cls, path: str) -> Peer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def adopt(cls, fd: OwnedFd) -> Peer:
        """A scoped channel the broker handed over (``ChannelOpen``'s reply)."""
        return cls(socket.socket(fileno=fd.take()))

    # ------------------------------------------------------------------ sending

    def post(self, msg: wire.Message) -> int:
        """Send a request without waiting; returns its sequence number."""
        seq = next(self._seq) & wire.SEQ_MASK
        self.channel.send(dataclasses.replace(msg, seq=seq))
        return seq

    def hangup(self) -> None:
        """Half-close: the broker sees EOF (a process exit) while we can still read
        whatever it sent before it noticed."""
        self.sock.shutdown(socket.SHUT_WR)

    # ------------------------------------------------------------------ reading

    def _recv(self, deadline: float | None) -> wire.Message | None:
        """One frame; None at EOF, or if ``deadline`` is None and nothing is there."""
        while True:
            try:
                got = recv_with_fds(self.sock, wire.MAX_FRAME)
            except BlockingIOError:
                if deadline is None:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no frame from the broker in time") from None
                select.select([self.sock], [], [], left)
                continue
            if got is None:
                self.eof = True
                return None
            data, fds = got
            return wire.decode(data, fds)

    def next(self, timeout: float = WAIT) -> wire.Message | None:
        """The next frame (reply or notice) in arrival order; None at EOF."""
        if self.inbox:
            return self.inbox.popleft()
        if self.eof:
            return None
        return self._recv(time.monotonic() + timeout)

    def poll(self) -> list[wire.Message]:
        """Every frame available now, without waiting."""
        out = list(self.inbox)
        self.inbox.clear()
        while not self.eof and (msg := self._recv(None)) is not None:
            out.append(msg)
        return out

    def reply(self, seq: int, timeout: float = WAIT) -> wire.Message:
        """Read until the reply to ``seq``; what came before it stays queued, in order."""
        for queued in self.inbox:
            if queued.KIND is wire.Kind.REPLY and queued.seq == seq:
                self.inbox.remove(queued)
                return queued
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                raise PeerGoneError(f"EOF before the reply to seq {seq:#x}")
            if msg.KIND is wire.Kind.REPLY and msg.seq == seq:
                return msg
            self.inbox.append(msg)

    def replied(self, seq: int) -> bool:
        """Whether the reply to ``seq`` was already read into the queue."""
        return any(m.KIND is wire.Kind.REPLY and m.seq == seq for m in self.inbox)

    def drain(self, timeout: float = WAIT) -> list[wire.Message]:
        """Everything until EOF (after :meth:`hangup`: until the broker let go)."""
        out = list(self.inbox)
        self.inbox.clear()
        deadline = time.monotonic() + timeout
        while not self.eof and (msg := self._recv(deadline)) is not None:
            out.append(msg)
        return out

    def take(self, kind: type[wire.Message]) -> list[wire.Message]:
        """Remove and return the queued frames of type ``kind`` (their fds closed)."""
        got = [m for m in self.inbox if isinstance(m, kind)]
        keep = [m for m in self.inbox if not isinstance(m, kind)]
        self.inbox.clear()  # in place: the channel appends to this very deque
        self.inbox.extend(keep)
        for m in got:
            m.close_fds()
        return got

    def close(self) -> None:
        for msg in self.inbox:
            msg.close_fds()
        self.inbox.clear()
        self.channel.close()


def close_all_fds(msgs: Iterable[wire.Message]) -> None:
    for m in msgs:
        m.close_fds()


@dataclass
class GuestSide:
    """The test as a VM's guest process (attached on a scoped channel)."""

    peer: Peer
    attached: dict[int, int] = field(default_factory=dict)  # binding -> gsi
    detached: list[tuple[int, wire.DetachReason]] = field(default_factory=list)
    vm_gone: bool = False

    @classmethod
    def attach(cls, owner: Channel, vm: int) -> GuestSide:
        guest = cls(Peer.adopt(owner.channel_open(wire.Scope.VM, vm)))
        guest.peer.channel.attach()
        guest.absorb(guest.peer.poll())
        return guest

    def absorb(self, msgs: Iterable[wire.Message], *, ack: bool = True) -> None:
        for msg in msgs:
            if isinstance(msg, wire.IrqfdAttach | wire.IrqfdAttachResample):
                assert msg.binding not in self.attached, f"binding {msg.binding} attached twice"
                self.attached[msg.binding] = msg.gsi
            elif isinstance(msg, wire.Detach):
                self.detached.append((msg.binding, wire.DetachReason(msg.reason)))
                if ack:
                    self.peer.channel.ack_detach(msg.binding)
            elif isinstance(msg, wire.PeerGone) and msg.kind == wire.PeerKind.VM:
                self.vm_gone = True
            msg.close_fds()

    def serve(self) -> None:
        """Handle every notice available now, acknowledging detaches."""
        self.absorb(self.peer.poll())

    def serve_until(self, done: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the broker did not send what the guest waits for")
            msg = self.peer.next(left)
            if msg is None:
                raise PeerGoneError("the broker closed the guest's channel")
            self.absorb([msg])

    def wait_attached(self, binding: int, timeout: float = WAIT) -> None:
        self.serve_until(lambda: binding in self.attached, timeout)

    def wait_vm_gone(self, timeout: float = WAIT) -> None:
        self.serve_until(lambda: self.vm_gone, timeout)

    def close(self) -> None:
        self.peer.close()


# ---------------------------------------------------------------------------- oracles


def ping(ch: Channel, token: int = 0) -> float:
    """Ping the broker; it must answer within :data:`PING_BOUND` seconds. Returns how
    long it took (for the report; only the bound is checked)."""
    t0 = time.monotonic()
    try:
        assert ch.ping(token, timeout=PING_BOUND) == token
    except PeerGoneError as e:
        raise AssertionError(
            f"the broker did not answer a ping within {PING_BOUND:g} s: {e}"
        ) from e
    return time.monotonic() - t0


def assert_counts_sane(state: dict[str, Any]) -> None:
    """No reference count of any object is negative, and no binding names a freed object.

    The state is read section by section (objects before bindings), each page consistent
    on its own: while other clients work, a binding read later may name an object created
    after the objects were read. Ids come from one counter, so such an object is newer
    than every object read; any other missing object was freed under a live binding."""
    bad = [o for o in state["objects"] if o["handles"] < 0 or o["bindings"] < 0]
    assert not bad, f"negative reference counts: {bad}"
    live = {o["id"] for o in state["objects"]}
    newest = max(live, default=0)
    for b in state["bindings"]:
        assert b["eventfd"] in live or b["eventfd"] > newest, f"binding {b} names a freed object"


def broker_children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == str(pid):
            kids.append(int(name))
    return kids


@dataclass(frozen=True)
class Baseline:
    """What the broker looked like before the scenario (with only the checker attached)."""

    fds: int
    shm: frozenset[str]


def baseline(ctl: Channel) -> Baseline:
    state = ctl.state()
    assert len(state["connections"]) == 1, "take the baseline with only the checker connected"
    return Baseline(int(state["process"]["open_fds"]), frozenset(shm_entries()))


def settle(ctl: Channel, connections: int = 1, timeout: float = WAIT) -> dict[str, Any]:
    """The broker's state once it has handled every hang-up (``connections`` remain),
    judged by the summary's count: the state is read section by section, and the summary
    -- with the process's open fds -- comes before the connection list, so a list that
    shows the last hang-up handled may come with open fds from before it."""
    deadline = time.monotonic() + timeout
    while True:
        state = ctl.state()
        if state["counts"]["connections"] <= connections or time.monotonic() > deadline:
            return state


def assert_clean(
    broker: BrokerHandle, ctl: Channel, base: Baseline, *, connections: int = 1
) -> dict[str, Any]:
    """Every fault-suite oracle after a scenario whose survivors own nothing."""
    state = settle(ctl, connections)
    assert len(state["connections"]) == connections, state["connections"]
    assert_counts_sane(state)
    leftovers = {k: state[k] for k in ("objects", "vms", "devices", "bindings") if state[k]}
    assert not leftovers, f"the broker's table is not empty: {leftovers}"
    assert state["process"]["open_fds"] == base.fds, (
        f"broker fds {state['process']['open_fds']} != baseline {base.fds}"
    )
    assert not set(shm_entries()) - base.shm, "/dev/shm gained an entry"
    assert broker_children(broker.proc.pid) == [], "the broker has a child process"
    ping(ctl)
    assert "Traceback" not in broker.log_text(), broker.log_text()
    return state
