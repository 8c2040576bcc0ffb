"""A structure-aware fuzzer of the control protocol, against a real
broker process over real sockets with real fds.

What is generated
-----------------
:mod:`tests.fault.fuzzgen` (pure, no I/O) builds each case from valid encodings of every
message type in :mod:`shared.wire` -- field values naming the fuzzer's own objects,
*another connection's* objects and objects that do not exist, plus range edges -- and then
mutates them: truncated, extended and oversize frames, lying length fields, unknown and
confused types, bad versions, the reply bit, reserved bits, header fd counts that disagree
with the fds, bit flips, invalid UTF-8, fds of the wrong type (pipe ends, a socketpair end,
a regular file, a directory, /dev/null, an epoll fd, read-only and O_PATH memfds, a memfd
where an eventfd is expected and the reverse), fds spread over several cmsgs, torn
SCM_RIGHTS payloads, an SCM_CREDENTIALS cmsg, more fds than the broker's buffer holds (up
to SCM_MAX_FD = 253, the most Linux lets one sendmsg carry: MSG_CTRUNC), out-of-range
indices and sizes, overlapping/unaligned/zero/huge memory slots, sequences of frames out
of order over several endpoints (Attach twice or on a host channel, DetachAck and
IoExitDone with nothing pending, Hello twice, requests after the VM is gone), and bursts of
up to 80 frames pipelined on one connection (more than the 64 the broker reads per pass).

Endpoints: the *world* (a host connection that owns a VM with an interrupt controller and
a memory slot, a device, four handles -- two bound eventfds, a free one, the memory -- and
an irqfd, an ioeventfd, a shm-signal and a kickfd binding), a *bare* host connection that
set nothing up, and scoped guest/device channels of the world's VM/device, attached or not.
The harness behaves like well-mannered peers for everything the fuzzer did not send: it
acknowledges every ``Detach``, answers every ``IoExitNotice`` and ``DeviceConfigNotice``,
closes every fd it receives, and shuts a received channel down properly. The *victim* is
another host connection with a VM, a device, memory, irqfd (one with a resamplefd),
ioeventfd, shm-signal and kickfd bindings, and an attached guest and device channel:
nothing the fuzzer sends may touch it.

The oracles (checked after EVERY case)
--------------------------------------
1. The model (:func:`fuzzgen.verdict`, an independent reading of the frame layout): a
   malformed frame gets an ``EPROTO`` error echoing its header's seq (0 when no header was
   readable) and then EOF; an empty datagram is EOF; a well-formed request gets exactly one
   reply with its seq, of a type :data:`REPLIES` allows for it (or an error), within
   :data:`REPLY_DEADLINE`; an acknowledgement gets no reply and the connection stays (a
   ping on the same connection proves the broker read it). A successful import names an
   fd of the right kind (fetched back with HandleGetFd): an eventfd, or memory that maps
   read/write at the claimed size.
2. A ping on a separate control connection answers within :data:`PING_DEADLINE`.
3. The broker's fd count is accounted for: ``open_fds - connections - objects`` never
   changes (every fd it holds is a client socket or an object's fd; a received fd it
   forgot to close breaks this at once, whatever else the case did).
4. The victim's slice of the state (its connections and handles, objects, VMs with their
   memory slots, devices and bindings) is identical to the start, and none of its three
   channels received a single notice.
5. The state is unchanged: if every frame of the case was rejected or refused, the whole
   snapshot (``GetState``, fd count included) equals the one before the case -- "a refused
   request changes nothing". If a frame was accepted and the state did change, the world
   connection is closed (a crash is a leave) and the snapshot must equal the baseline
   taken before the world existed, fd count included. The same holds whenever the world
   connection was dropped by the broker.

The broker process must still be alive at the end and its log must hold no Traceback (the
``broker_factory`` fixture), and this process must leak no fd, /dev/shm entry or child
(the autouse leak guard).

Knobs and reproducing a failure
-------------------------------
``VBUSEMU_FUZZ_CASES`` (default 10000) sets the number of cases under the ``hup`` policy;
the first half of them run again on a ``refcount`` broker. ``VBUSEMU_FUZZ_SEED`` (default
15) sets the seed, ``VBUSEMU_FUZZ_FIRST`` (default 0) the first case index. A failure names
the seed, the case index and the policy, and prints the case's frames. Every case is drawn
from ``random.Random(f"{seed}:{index}")`` alone, names objects by symbol, and starts from
the world as built (it is rebuilt after any change), so ``VBUSEMU_FUZZ_SEED=s
VBUSEMU_FUZZ_FIRST=i VBUSEMU_FUZZ_CASES=1`` replays it by itself (the failure message
prints the whole command).
"""

from __future__ import annotations

import array
import collections
import contextlib
import copy
import dataclasses
import errno
import fcntl
import mmap
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shared import wire
from shared.channel import Channel
from shared.errors import PeerGoneError, VbusError
from shared.fds import (
    OwnedFd,
    close_all,
    eventfd_info,
    memory_fd_size,
    new_eventfd,
    recv_with_fds,
    send_with_fds,
)
from tests import timing
from tests.conftest import BrokerHandle
from tests.fault import fuzzgen
from tests.fault.fuzzgen import (
    BARE,
    DEVICE_ATTACHED,
    GUEST,
    GUEST_ATTACHED,
    HOST,
    Case,
    Expect,
    FdKind,
    FrameSpec,
)

CASES = int(os.environ.get("VBUSEMU_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("VBUSEMU_FUZZ_SEED", "15"), 0)
FIRST = int(os.environ.get("VBUSEMU_FUZZ_FIRST", "0"))
PING_DEADLINE = timing.scaled(1.0)
# a held reply waits for our own prompt ack or relay answer
REPLY_DEADLINE = timing.scaled(3.0)
MEM_SIZE = 64 * 1024
COVERAGE_MIN_CASES = 2000  # below this, a run is too short to insist on full coverage
R = TypeVar("R", bound=wire.Message)

# ~550 cases/s here; the budget leaves room for a machine five times slower.
pytestmark = pytest.mark.timeout(120 + CASES // 50)

# What each request may be answered with (an Error is always possible).
REPLIES: dict[type[wire.Message], tuple[type[wire.Message], ...]] = {
    wire.Hello: (wire.HelloReply,),
    wire.Ping: (wire.Pong,),
    wire.GetState: (wire.StateReply,),
    wire.EventfdCreate: (wire.HandleReply,),
    wire.EventfdImport: (wire.HandleReply,),
    wire.MemoryImport: (wire.HandleReply,),
    wire.HandleDup: (wire.HandleReply,),
    wire.HandleClose: (wire.Ok,),
    wire.HandleGetFd: (wire.FdReply,),
    wire.VmCreate: (wire.IdReply,),
    wire.VmDestroy: (wire.Ok,),
    wire.IrqchipCreate: (wire.Ok,),
    wire.MemslotSet: (wire.Ok,),
    wire.DeviceCreate: (wire.IdReply,),
    wire.DeviceDestroy: (wire.Ok,),
    wire.Irqfd: (wire.IdReply, wire.Ok),
    wire.Ioeventfd: (wire.IdReply, wire.Ok),
    wire.ShmSignal: (wire.IdReply, wire.Ok),
    wire.ChannelOpen: (wire.FdReply,),
    wire.Attach: (wire.Ok,),
    wire.DeviceKickfd: (wire.IdReply, wire.Ok),
    wire.IoExit: (wire.IoExitReply,),
    wire.IoExitDone: (wire.Ok,),
    wire.DeviceConfig: (wire.Ok,),
    wire.DeviceReport: (wire.Ok,),
}


class FuzzFailure(AssertionError):
    """An oracle failed; the message says which."""


def require(ok: bool, what: str) -> None:
    if not ok:
        raise FuzzFailure(what)


# ------------------------------------------------------------------------------ oracles
# Pure functions of GetState snapshots, so that test_oracles_can_fail can feed them
# doctored snapshots.


def fd_spare(state: dict[str, Any]) -> int:
    """Broker fds that are neither a client socket nor an object's fd (listener, epoll,
    stop eventfd, stdio ...): constant while nothing leaks."""
    return int(state["process"]["open_fds"]) - len(state["connections"]) - len(state["objects"])


@dataclass(frozen=True)
class VictimIds:
    conns: frozenset[int]
    objects: frozenset[int]
    vms: frozenset[int]
    devices: frozenset[int]

    @classmethod
    def of(cls, state: dict[str, Any]) -> VictimIds:
        """Everything in a snapshot taken before the fuzzer connected is the victim's."""
        return cls(
            frozenset(c["id"] for c in state["connections"]),
            frozenset(o["id"] for o in state["objects"]),
            frozenset(v["id"] for v in state["vms"]),
            frozenset(d["id"] for d in state["devices"]),
        )


def victim_view(state: dict[str, Any], ids: VictimIds) -> dict[str, list[Any]]:
    """The part of a snapshot that belongs to, or points at, the victim."""

    def mine(b: dict[str, Any]) -> bool:
        return (
            b.get("vm") in ids.vms
            or b.get("device") in ids.devices
            or b["eventfd"] in ids.objects
            or b.get("resamplefd") in ids.objects
        )

    return {
        "connections": [c for c in state["connections"] if c["id"] in ids.conns],
        "objects": [o for o in state["objects"] if o["id"] in ids.objects],
        "vms": [v for v in state["vms"] if v["id"] in ids.vms or v["owner"] in ids.conns],
        "devices": [
            d for d in state["devices"] if d["id"] in ids.devices or d["owner"] in ids.conns
        ],
        "bindings": [b for b in state["bindings"] if mine(b)],
    }


def check_state(
    state: dict[str, Any],
    *,
    base: dict[str, Any],
    before: dict[str, Any],
    ids: VictimIds,
    world_alive: bool,
    accepted: bool,
) -> bool:
    """Oracles 3-5 on one snapshot. Returns True if the world must be reset (a frame was
    accepted and changed the state); raises :class:`FuzzFailure` otherwise."""
    spare, spare0 = fd_spare(state), fd_spare(base)
    require(
        spare == spare0,
        f"the broker holds {spare - spare0:+d} fd(s) that are neither a "
        f"connection nor an object (open_fds "
        f"{state['process']['open_fds']})",
    )
    view, view0 = victim_view(state, ids), victim_view(base, ids)
    require(view == view0, f"the victim's state changed:\n  before {view0}\n  after  {view}")
    if not world_alive:
        require(
            state == base,
            "with the fuzzer's connections gone the state differs from "
            f"the baseline:\n  baseline {base}\n  now      {state}",
        )
        return False
    if not accepted:
        require(
            state == before,
            "a rejected or refused request changed the state:\n"
            f"  before {before}\n  after  {state}",
        )
        return False
    return state != before


# ------------------------------------------------------------------------------ fds


class FdMaker:
    """Makes the real fds a frame carries (closed by the caller right after sending)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.file = tmp / "regular-file"
        self.file.write_bytes(bytes(MEM_SIZE))
        self.made = 0
        self.known: OwnedFd | None = None  # the world's eventfd, when there is a world
        self.recipes: dict[FdKind, Callable[[], OwnedFd]] = {
            FdKind.EVENTFD: new_eventfd,
            FdKind.EVENTFD_SEMAPHORE: lambda: new_eventfd(3, semaphore=True),
            FdKind.KNOWN_EVENTFD: lambda: self.known.dup() if self.known else new_eventfd(),
            FdKind.MEMFD: lambda: _memfd(MEM_SIZE),
            FdKind.MEMFD_SMALL: lambda: _memfd(4096),
            FdKind.MEMFD_EMPTY: lambda: _memfd(0),
            FdKind.MEMFD_SEALED: _sealed_memfd,
            FdKind.SHM: self._shm,
            FdKind.MEMFD_READONLY: lambda: _reopened_memfd(os.O_RDONLY),
            FdKind.MEMFD_PATH: lambda: _reopened_memfd(os.O_PATH),
            FdKind.PIPE_READ: lambda: _pipe_end(0),
            FdKind.PIPE_WRITE: lambda: _pipe_end(1),
            FdKind.SOCKET: _socketpair_end,
            FdKind.FILE: lambda: OwnedFd(os.open(self.file, os.O_RDWR | os.O_CLOEXEC)),
            FdKind.DIRECTORY: lambda: OwnedFd(
                os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            ),
            FdKind.DEVNULL: lambda: OwnedFd(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)),
            FdKind.EPOLL: _epoll_fd,
        }
        assert set(self.recipes) == set(FdKind)

    def make(self, kind: FdKind) -> OwnedFd:
        self.made += 1
        return self.recipes[kind]()

    def _shm(self) -> OwnedFd:
        """A POSIX shm object, unlinked at once (nothing is left in /dev/shm)."""
        name = f"/dev/shm/vbusemu-fuzz-{os.getpid()}-{self.made}"
        fd = OwnedFd(os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        os.unlink(name)
        return _sized(fd, MEM_SIZE)


def _sized(fd: OwnedFd, size: int) -> OwnedFd:
    try:
        os.ftruncate(fd.fd, size)
    except BaseException:
        fd.close()
        raise
    return fd


def _memfd(size: int, flags: int = 0) -> OwnedFd:
    return _sized(OwnedFd(os.memfd_create("vbusemu-fuzz", os.MFD_CLOEXEC | flags)), size)


def _sealed_memfd() -> OwnedFd:
    fd = _memfd(MEM_SIZE, os.MFD_ALLOW_SEALING)
    with contextlib.ExitStack() as on_error:
        on_error.callback(fd.close)
        fcntl.fcntl(
            fd.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
        on_error.pop_all()
    return fd


def _reopened_memfd(mode: int) -> OwnedFd:
    """A second open file on a memfd: read-only, or O_PATH (not even readable)."""
    with _memfd(MEM_SIZE) as rw:
        return OwnedFd(os.open(f"/proc/self/fd/{rw.fd}", mode | os.O_CLOEXEC))


def _pipe_end(end: int) -> OwnedFd:
    ends = os.pipe()
    os.close(ends[1 - end])
    return OwnedFd(ends[end])


def _socketpair_end() -> OwnedFd:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.close()
    return OwnedFd(a.detach())


def _epoll_fd() -> OwnedFd:
    with select.epoll() as ep:
        return OwnedFd(os.dup(ep.fileno()))


def _sendmsg(sock: socket.socket, data: bytes, anc: list[tuple[int, int, bytes]]) -> None:
    """One datagram; waits (bounded) while the socket buffer is full."""
    deadline = time.monotonic() + REPLY_DEADLINE
    while True:
        try:
            sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            require(left > 0, "the broker stopped reading (our send buffer stayed full)")
            select.select([], [sock], [], left)


# ------------------------------------------------------------------------------ endpoints


@dataclass(eq=False)
class Endpoint:
    """One of our raw connections to the broker."""

    name: str
    sock: socket.socket
    eof: bool = False
    due: set[int] = field(default_factory=set)  # seqs of fuzzed frames not answered yet
    replies: list[wire.Message] = field(default_factory=list)  # ... their replies, in order
    pending: dict[int, wire.Message | None] = field(default_factory=dict)  # our requests
    discard: set[int] = field(default_factory=set)  # our requests whose reply we ignore
    next_seq: int = 0x10000  # clear of the small seqs the generator likes

    def __post_init__(self) -> None:
        self.sock.setblocking(False)

    def send(self, msg: wire.Message, *, wait: bool = True) -> int:
        """Send one of our own (valid) frames; returns its seq."""
        self.next_seq = (self.next_seq + 1) & fuzzgen.U32
        while self.next_seq in self.due or self.next_seq in self.pending:
            self.next_seq = (self.next_seq + 1) & fuzzgen.U32
        seq = self.next_seq
        data, fds = wire.encode(dataclasses.replace(msg, seq=seq))
        _sendmsg(
            self.sock,
            data,
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            if fds
            else [],
        )
        if not msg.NO_REPLY:
            if wait:
                self.pending[seq] = None
            else:
                self.discard.add(seq)
        return seq

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@dataclass
class World:
    host: Endpoint
    known: OwnedFd | None = None  # a dup of world.efd: importing it again names an object
    # the broker already has


@dataclass
class Victim:
    host: Channel
    guest: Channel
    device: Channel
    names: dict[str, int]

    @classmethod
    def build(cls, broker: BrokerHandle) -> Victim:
        host = broker.connect()
        host.hello()
        vm = host.vm_create(8)
        dev = host.device_create(vm, 4)
        efds = [host.eventfd_create() for _ in range(7)]
        with _memfd(MEM_SIZE) as mem:
            mem_handle = host.memory_import(mem, MEM_SIZE)
        spare = host.eventfd_create()  # a handle number the world's connection lacks
        host.memslot_set(vm, 0, 0, MEM_SIZE, mem_handle)
        names = {
            "victim.vm": vm,
            "victim.device": dev,
            "victim.handle": spare,
            "victim.irqfd": host.irqfd_assign(vm, efds[0], 1),
            "victim.ioeventfd": host.call(
                wire.Ioeventfd(
                    vm=vm,
                    handle=efds[2],
                    flags=wire.IOEVENTFD_FLAG_DATAMATCH,
                    len=4,
                    addr=0x1000,
                    datamatch=1,
                ),
                wire.IdReply,
            ).id,
            "victim.shmsignal": host.shmsignal_assign(dev, 0, efds[3]),
            "victim.kickfd": host.call(
                wire.DeviceKickfd(device=dev, queue=0, handle=efds[4]), wire.IdReply
            ).id,
        }
        host.irqfd_assign(vm, efds[1], 2, resample_handle=efds[5])
        guest = Channel.adopt(host.channel_open(wire.Scope.VM, vm))
        device = Channel.adopt(host.channel_open(wire.Scope.DEVICE, dev))
        broker.channels += [guest, device]  # the fixture closes them
        guest.attach()
        device.attach()
        victim = cls(host, guest, device, names)
        victim.drain()
        return victim

    def channels(self) -> tuple[Channel, ...]:
        return (self.host, self.guest, self.device)

    def drain(self) -> list[str]:
        """Read every notice that arrived; returns their descriptions (fds closed)."""
        got: list[str] = []
        for ch in self.channels():
            ch.pump()
            while ch.notices:
                msg = ch.notices.popleft()
                got.append(wire.describe(msg))
                msg.close_fds()
        return got


# ------------------------------------------------------------------------------ the harness


@dataclass
class Stats:
    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    errnos: collections.Counter[str] = field(default_factory=collections.Counter)
    mutations: collections.Counter[str] = field(default_factory=collections.Counter)
    fd_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    endpoints: collections.Counter[str] = field(default_factory=collections.Counter)
    expects: collections.Counter[str] = field(default_factory=collections.Counter)
    notices: collections.Counter[str] = field(default_factory=collections.Counter)
    worlds: int = 0
    resets: int = 0
    worst_ping: float = 0.0


class Fuzzer:
    """Sends cases to the broker and checks every oracle after each one."""

    def __init__(
        self, broker: BrokerHandle, tmp: Path, policy: wire.Policy = wire.Policy.HUP
    ) -> None:
        self.broker = broker
        self.policy = policy
        self.fdmaker = FdMaker(tmp)
        self.control = broker.connect()
        self.victim = Victim.build(broker)
        self.names: dict[str, int] = {"absent": fuzzgen.ABSENT_ID, **self.victim.names}
        self.world: World | None = None
        self.case_eps: dict[str, Endpoint | None] = {}
        self.stats = Stats()
        self.base = self.control.state()
        self.before = self.base
        self.ids = VictimIds.of(self.base)

    # ----------------------------------------------------------------- plumbing

    def endpoints(self) -> list[Endpoint]:
        eps = [ep for ep in self.case_eps.values() if ep is not None and not ep.eof]
        if self.world is not None and not self.world.host.eof:
            eps.append(self.world.host)
        return eps

    def wait(self, done: Callable[[], bool], what: str, deadline: float = REPLY_DEADLINE) -> None:
        """Read from every live endpoint (serving notices) until ``done()``."""
        end = time.monotonic() + deadline
        while not done():
            eps = self.endpoints()
            require(bool(eps), f"no {what}: no connection left to read from")
            left = end - time.monotonic()
            require(left > 0, f"no {what} within {deadline} s")
            ready, _, _ = select.select(eps, [], [], left)
            for ep in ready:
                self.read(ep)

    def read(self, ep: Endpoint) -> None:
        """Every frame ``ep`` has now; EOF marks it."""
        while not ep.eof:
            try:
                got = recv_with_fds(ep.sock, wire.MAX_FRAME)
            except BlockingIOError:
                return
            except PeerGoneError:
                # ECONNRESET: the broker closed this connection while frames we sent (an
                # ack racing a rejection) were still unread. Linux reports that first,
                # once; what the broker sent before closing (its EPROTO reply) follows.
                continue
            if got is None:
                ep.eof = True
                return
            msg = wire.decode(*got)  # the broker must never send a malformed frame
            if msg.KIND is wire.Kind.REPLY:
                self.route_reply(ep, msg)
            else:
                self.serve_notice(ep, msg)

    def route_reply(self, ep: Endpoint, msg: wire.Message) -> None:
        if msg.seq in ep.pending and ep.pending[msg.seq] is None:
            ep.pending[msg.seq] = msg
        elif msg.seq in ep.discard:
            ep.discard.discard(msg.seq)
            msg.close_fds()
        elif ep.due:
            ep.replies.append(msg)
        else:
            msg.close_fds()
            raise FuzzFailure(f"{ep.name}: unexpected reply {wire.describe(msg)}")

    def serve_notice(self, ep: Endpoint, msg: wire.Message) -> None:
        """What a well-behaved guest, device process or VMM does with a notice."""
        msg.close_fds()
        self.stats.notices[type(msg).__name__] += 1
        answer: wire.Message | None = None
        if isinstance(msg, wire.Detach):
            answer = wire.DetachAck(binding=msg.binding)
        elif isinstance(msg, wire.IoExitNotice):
            answer = wire.IoExitDone(token=msg.token)
        elif isinstance(msg, wire.DeviceConfigNotice):
            answer = wire.DeviceConfigDone(token=msg.token)
        if answer is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it is leaving
                ep.send(answer, wait=False)

    def request(self, ep: Endpoint, msg: wire.Message) -> wire.Message:
        """One of our own requests; returns the reply (an Error included)."""
        seq = ep.send(msg)
        self.wait(
            lambda: ep.pending[seq] is not None or ep.eof,
            f"reply to our {type(msg).__name__} on {ep.name}",
        )
        reply = ep.pending.pop(seq)
        require(reply is not None, f"{ep.name} was dropped after our {type(msg).__name__}")
        assert reply is not None
        return reply

    def call(self, ep: Endpoint, msg: wire.Message, reply_type: type[R]) -> R:
        reply = self.request(ep, msg)
        require(
            isinstance(reply, reply_type),
            f"our {wire.describe(msg)} on {ep.name} got {wire.describe(reply)}",
        )
        assert isinstance(reply, reply_type)
        return reply

    def hang_up(self, ep: Endpoint) -> None:
        """Close ``ep`` so that the broker has finished with it when this returns: shut
        our sending side, wait for the broker's EOF (it drops the client first)."""
        try:
            if not ep.eof:
                ep.sock.shutdown(socket.SHUT_WR)
                self.wait(lambda: ep.eof, f"EOF on {ep.name} after we hung up")
        finally:
            ep.close()

    def connect(self, name: str) -> Endpoint:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(self.broker.path)
        return Endpoint(name, sock)

    # ----------------------------------------------------------------- the world

    def build_world(self) -> None:
        ep = self.connect(HOST)
        self.world = World(ep)
        try:
            self.call(ep, wire.Hello(), wire.HelloReply)
            efd = self.call(ep, wire.EventfdCreate(), wire.HandleReply).handle
            efd2 = self.call(ep, wire.EventfdCreate(), wire.HandleReply).handle
            efd3 = self.call(ep, wire.EventfdCreate(), wire.HandleReply).handle
            with _memfd(MEM_SIZE) as memfd:
                mem = self.call(
                    ep, wire.MemoryImport(size=MEM_SIZE, fds=(memfd,)), wire.HandleReply
                ).handle
            vm = self.call(ep, wire.VmCreate(ngsi=8), wire.IdReply).id
            self.call(ep, wire.IrqchipCreate(vm=vm), wire.Ok)
            dev = self.call(ep, wire.DeviceCreate(vm=vm, nsignals=4), wire.IdReply).id
            self.call(
                ep,
                wire.MemslotSet(vm=vm, slot=0, gpa=0, size=4 * fuzzgen.PAGE, handle=mem),
                wire.Ok,
            )
            self.names.update(
                {
                    "world.vm": vm,
                    "world.device": dev,
                    "world.efd": efd,
                    "world.efd2": efd2,
                    "world.efd3": efd3,
                    "world.mem": mem,
                    "world.free_handle": mem + 1,
                    "world.irqfd": self.call(
                        ep, wire.Irqfd(vm=vm, handle=efd, gsi=1), wire.IdReply
                    ).id,
                    "world.ioeventfd": self.call(
                        ep,
                        wire.Ioeventfd(
                            vm=vm,
                            handle=efd2,
                            flags=wire.IOEVENTFD_FLAG_DATAMATCH,
                            len=4,
                            addr=0x2000,
                            datamatch=1,
                        ),
                        wire.IdReply,
                    ).id,
                    "world.shmsignal": self.call(
                        ep, wire.ShmSignal(device=dev, sigid=0, handle=efd), wire.IdReply
                    ).id,
                    "world.kickfd": self.call(
                        ep, wire.DeviceKickfd(device=dev, queue=0, handle=efd2), wire.IdReply
                    ).id,
                }
            )
            self.world.known = self.call(ep, wire.HandleGetFd(handle=efd), wire.FdReply).fds[0]
        except BaseException:
            self.forget_world()
            raise
        missing = set(fuzzgen.SYMBOLS) - set(self.names)
        require(not missing, f"symbols the generator uses but the harness never set: {missing}")
        self.stats.worlds += 1
        self.before = self.control.state()

    def forget_world(self) -> None:
        if self.world is not None:
            if self.world.known is not None:
                self.world.known.close()
            self.world.host.close()
            self.world = None

    def reset_world(self) -> None:
        """Close the world's connection (a crash is a leave) and wait until it is gone."""
        assert self.world is not None
        self.hang_up(self.world.host)
        self.forget_world()
        self.stats.resets += 1

    def open_endpoint(self, name: str) -> Endpoint | None:
        """The case's endpoint ``name``, opened on first use; None if it cannot be."""
        if name == HOST:  # the world: not a case endpoint, it outlives the case
            alive = self.world is not None and not self.world.host.eof
            return self.world.host if self.world is not None and alive else None
        if name in self.case_eps:
            return self.case_eps[name]
        ep: Endpoint | None = None
        if name == BARE:
            ep = self.connect(name)
        elif self.world is not None and not self.world.host.eof:
            vm_side = name in (GUEST, GUEST_ATTACHED)
            scope = wire.Scope.VM if vm_side else wire.Scope.DEVICE
            target = self.names["world.vm" if vm_side else "world.device"]
            reply = self.request(self.world.host, wire.ChannelOpen(scope=scope, target=target))
            if isinstance(reply, wire.FdReply):
                ep = Endpoint(name, socket.socket(fileno=reply.fds[0].take()))
                if name in (GUEST_ATTACHED, DEVICE_ATTACHED):
                    self.case_eps[name] = ep
                    self.request(ep, wire.Attach())  # EBUSY if another one attached first
            else:
                require(isinstance(reply, wire.Error), f"ChannelOpen got {reply}")
        self.case_eps[name] = ep
        return ep

    # ----------------------------------------------------------------- one case

    def run(self, case: Case) -> None:
        self.case_eps = {}
        if self.world is None and any(e != BARE for e in case.endpoints()):
            self.build_world()
        accepted = False
        try:
            for name in case.prelude:
                self.open_endpoint(name)
            for step in case.steps:
                ep = self.open_endpoint(step.endpoint)
                self.stats.endpoints[step.endpoint] += 1
                if ep is None or ep.eof:
                    self.stats.outcomes.update((f.cls.__name__, "skipped") for f in step.frames)
                    continue
                accepted |= self.exchange(ep, step.frames)
            for ep in list(self.case_eps.values()):
                if ep is not None:
                    self.hang_up(ep)
        finally:
            for ep in self.case_eps.values():
                if ep is not None:
                    ep.close()
            self.case_eps = {}
        if self.world is not None and self.world.host.eof:
            self.forget_world()  # the broker dropped it: everything it owned must be gone
        self.check(accepted)

    def transmit(self, ep: Endpoint, frame: FrameSpec, data: bytes) -> None:
        owned: dict[FdKind, OwnedFd] = {}
        self.fdmaker.known = self.world.known if self.world is not None else None
        try:
            for kind in frame.fds:  # one fd per kind (a flood repeats one fd number)
                if kind not in owned:
                    owned[kind] = self.fdmaker.make(kind)
                    self.stats.fd_kinds[kind.value] += 1
            numbers = [owned[k].fd for k in frame.fds]
            anc: list[tuple[int, int, bytes]] = []
            groups = frame.cmsg_groups()
            start = 0
            for i, n in enumerate(groups):
                payload = array.array("i", numbers[start : start + n]).tobytes()
                if i == len(groups) - 1:
                    payload += bytes(frame.torn)
                anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, payload))
                start += n
            if frame.creds:
                anc.append(
                    (
                        socket.SOL_SOCKET,
                        socket.SCM_CREDENTIALS,
                        struct.pack("3i", os.getpid(), os.getuid(), os.getgid()),
                    )
                )
            _sendmsg(ep.sock, data, anc)
        finally:
            close_all(owned.values())

    def exchange(self, ep: Endpoint, frames: Sequence[FrameSpec]) -> bool:
        """Send fuzzed frames back to back, then check the model's verdict on each, in
        order: the broker answers what it reads in order and reads nothing after a frame
        it rejects. True if a frame was accepted."""
        plan = []
        for frame in frames:
            data = frame.render(self.names)
            plan.append((frame, data, fuzzgen.verdict(data, sum(frame.cmsg_groups()))))
            self.stats.mutations.update(frame.mutations)
        last = next(
            (i for i, (_, _, v) in enumerate(plan) if v.expect in (Expect.REJECT, Expect.EOF)),
            len(plan) - 1,
        )
        read = plan[: last + 1]  # what the broker reads; the rest dies with the connection
        terminal = read[-1][2].expect in (Expect.REJECT, Expect.EOF)
        due = sum(v.expect in (Expect.REPLY, Expect.REJECT) for _, _, v in read)
        ep.due, ep.replies = {v.seq for _, _, v in read}, []
        try:
            for i, (frame, data, _) in enumerate(plan):
                try:
                    self.transmit(ep, frame, data)
                except (BrokenPipeError, ConnectionResetError):
                    require(i > last, f"{ep.name} was dropped before frame {i} was sent")
                    break
            if terminal:
                self.wait(lambda: ep.eof, f"EOF on {ep.name} ({read[-1][2].why})")
            else:
                self.wait(lambda: len(ep.replies) >= due or ep.eof, f"{due} replies on {ep.name}")
                require(not ep.eof, f"the broker dropped {ep.name} after well-formed frames")
                token = time.monotonic_ns() & fuzzgen.U64  # proves the no-reply ones were read
                require(
                    self.call(ep, wire.Ping(token=token), wire.Pong).token == token,
                    "our ping got another token back",
                )
            got = [wire.describe(r) for r in ep.replies]
            require(len(ep.replies) == due, f"{due} replies due on {ep.name}, got {got}")
            accepted = False
            replies = iter(ep.replies)
            for frame, data, v in read:
                self.stats.expects[v.expect.value] += 1
                accepted |= self.judge_one(ep, frame, data, v, replies, len(plan) == 1)
            return accepted
        finally:
            ep.due = set()
            for reply in ep.replies:
                reply.close_fds()
            ep.replies = []

    def judge_one(
        self,
        ep: Endpoint,
        frame: FrameSpec,
        data: bytes,
        v: fuzzgen.Verdict,
        replies: Iterator[wire.Message],
        alone: bool,
    ) -> bool:
        """One frame's outcome; ``alone``: nothing was sent after it (so what an import
        returned can be looked at: in a burst, a later frame may have closed it)."""
        name = (v.cls or frame.cls).__name__
        if v.expect is Expect.EOF:
            self.stats.outcomes[(name, "eof")] += 1
            return False
        if v.expect is Expect.NO_REPLY:
            self.stats.outcomes[(name, "no-reply")] += 1
            return False
        reply = next(replies)
        if v.expect is Expect.REJECT:
            require(
                isinstance(reply, wire.Error)
                and reply.errno == errno.EPROTO
                and reply.seq == v.seq,
                f"a malformed frame ({v.why}) got {wire.describe(reply)}, not EPROTO seq {v.seq}",
            )
            self.stats.outcomes[(name, "rejected")] += 1
            return False
        assert v.cls is not None
        require(reply.seq == v.seq, f"{name} seq {v.seq} answered by {wire.describe(reply)}")
        return self.judge(ep, fuzzgen.sent_fields(v.cls, data), v.cls, reply, alone)

    def judge(
        self,
        ep: Endpoint,
        values: dict[str, int],
        cls: type[wire.Message],
        reply: wire.Message,
        alone: bool,
    ) -> bool:
        """A well-formed request's reply: of an allowed type, and what it names is real."""
        if isinstance(reply, wire.Error):
            require(
                reply.errno not in (0, errno.EPROTO),
                f"a well-formed {cls.__name__} was refused with {wire.describe(reply)}",
            )
            self.stats.outcomes[(cls.__name__, "refused")] += 1
            self.stats.errnos[errno.errorcode.get(reply.errno, str(reply.errno))] += 1
            return False
        require(
            isinstance(reply, REPLIES[cls]), f"{cls.__name__} answered with {wire.describe(reply)}"
        )
        self.stats.outcomes[(cls.__name__, "ok")] += 1
        if isinstance(reply, wire.Pong):
            require(reply.token == values["token"], f"{wire.describe(reply)} for {values}")
        if isinstance(reply, wire.FdReply):
            for fd in reply.fds:
                self.release_received(fd.move())
        if (
            alone
            and isinstance(reply, wire.HandleReply)
            and cls in (wire.EventfdImport, wire.MemoryImport)
        ):
            self.check_import(ep, cls, reply.handle, values.get("size", 0))
        return True

    def release_received(self, fd: OwnedFd) -> None:
        """A received channel becomes one of the case's endpoints (hung up properly when the
        case ends, so the broker is done with it); any other fd is just closed."""
        if not stat.S_ISSOCK(os.fstat(fd.fd).st_mode):
            fd.close()
            return
        name = f"received channel {len(self.case_eps)}"
        self.case_eps[name] = Endpoint(name, socket.socket(fileno=fd.take()))

    def check_import(self, ep: Endpoint, cls: type[wire.Message], handle: int, size: int) -> None:
        """An accepted import names what it claims: an eventfd, or memory that maps."""
        reply = self.call(ep, wire.HandleGetFd(handle=handle), wire.FdReply)
        with reply.fds[0] as fd:
            if cls is wire.EventfdImport:
                require(
                    eventfd_info(fd.fd) is not None,
                    f"EventfdImport accepted {os.readlink(f'/proc/self/fd/{fd.fd}')}",
                )
                return
            actual = memory_fd_size(fd.fd)
            require(
                actual is not None and actual >= size,
                f"MemoryImport of {size} bytes accepted an fd of {actual} bytes",
            )
            try:
                mmap.mmap(fd.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
            except (OSError, ValueError) as e:
                raise FuzzFailure(
                    f"MemoryImport accepted memory that does not map "
                    f"read/write ({os.readlink(f'/proc/self/fd/{fd.fd}')}, "
                    f"O_ACCMODE {fcntl.fcntl(fd.fd, fcntl.F_GETFL):#o}): {e}"
                ) from e

    # ----------------------------------------------------------------- oracles

    def check(self, accepted: bool) -> None:
        token = time.monotonic_ns() & fuzzgen.U64
        t0 = time.monotonic()
        try:
            pong = self.control.ping(token, timeout=PING_DEADLINE)
        except VbusError as e:
            raise FuzzFailure(
                f"the broker did not answer a ping within {PING_DEADLINE} s "
                f"(process alive: {self.broker.proc.alive}): {e}"
            ) from e
        self.stats.worst_ping = max(self.stats.worst_ping, time.monotonic() - t0)
        require(pong == token, f"ping answered {pong}, not {token}")
        stray = self.victim.drain()
        require(not stray, f"the victim received notices: {stray}")
        state = self.control.state()
        if check_state(
            state,
            base=self.base,
            before=self.before,
            ids=self.ids,
            world_alive=self.world is not None,
            accepted=accepted,
        ):
            self.reset_world()
            state = self.control.state()
            check_state(
                state,
                base=self.base,
                before=self.base,
                ids=self.ids,
                world_alive=False,
                accepted=False,
            )
        self.before = state

    def close(self) -> None:
        require(self.broker.proc.alive, "the broker process died")
        if self.world is not None:
            self.reset_world()
            state = self.control.state()
            check_state(
                state,
                base=self.base,
                before=self.base,
                ids=self.ids,
                world_alive=False,
                accepted=False,
            )

    def summary(self, cases: int, seconds: float) -> str:
        s = self.stats
        per_type: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for (name, outcome), n in s.outcomes.items():
            per_type[name][outcome] += n
        lines = [
            f"{cases} cases (seed {SEED}, first {FIRST}, policy "
            f"{self.policy.name.lower()}) in {seconds:.1f} s, "
            f"{cases / max(seconds, 1e-9):.0f}/s; worlds built {s.worlds}, "
            f"reset after a change {s.resets}; worst control ping "
            f"{s.worst_ping * 1000:.1f} ms",
            f"verdicts {dict(s.expects)}",
            f"errnos {dict(s.errnos)}",
            f"notices served {dict(s.notices)}",
            f"endpoints {dict(s.endpoints)}",
        ]
        lines += [f"  {name:20} {dict(sorted(c.items()))}" for name, c in sorted(per_type.items())]
        return "\n".join(lines)

    def log_tail(self) -> str:
        return "\n".join(self.broker.log_text().splitlines()[-15:])


def run_cases(fuzzer: Fuzzer, first: int, count: int) -> Iterator[int]:
    """Run cases, each wrapped so a failure says how to replay it."""
    for index in range(first, first + count):
        case = fuzzgen.generate(SEED, index)
        try:
            fuzzer.run(case)
        except (AssertionError, VbusError, OSError) as e:
            pytest.fail(
                f"{type(e).__name__}: {e}\n(broker process alive: {fuzzer.broker.proc.alive})\n"
                f"{case.describe(fuzzer.names)}\n"
                f"replay: VBUSEMU_FUZZ_SEED={SEED} VBUSEMU_FUZZ_FIRST={index} "
                f"VBUSEMU_FUZZ_CASES=1 pytest {__file__} -k 'protocol_fuzz and "
                f"{fuzzer.policy.name.lower()}'\nbroker log (tail):\n{fuzzer.log_tail()}"
            )
        yield index


# ------------------------------------------------------------------------------ tests


@pytest.fixture
def fuzzer(
    broker_factory: Callable[..., BrokerHandle], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Fuzzer]:
    """A fuzzer on a fresh broker (release policy: the indirect parameter, default hup)."""
    policy = getattr(request, "param", wire.Policy.HUP)
    f = Fuzzer(broker_factory(policy), tmp_path, policy)
    try:
        yield f
    finally:
        f.forget_world()


@pytest.mark.parametrize(
    "fuzzer", [wire.Policy.HUP, wire.Policy.REFCOUNT], indirect=True, ids=["hup", "refcount"]
)
def test_control_protocol_fuzz(fuzzer: Fuzzer) -> None:
    """CASES structure-aware cases under the hup policy, and the first half of
    them again under refcount (the policies differ in what closing a handle does); every
    oracle after every case."""
    t0 = time.monotonic()
    count = CASES if fuzzer.policy is wire.Policy.HUP else CASES // 2
    done = sum(1 for _ in run_cases(fuzzer, FIRST, count))
    fuzzer.close()
    report = fuzzer.summary(done, time.monotonic() - t0)
    print(report)
    if count < COVERAGE_MIN_CASES:
        return
    s = fuzzer.stats
    for cls in fuzzgen.REQUESTS:
        got = {o for (n, o), k in s.outcomes.items() if n == cls.__name__ and k}
        require(
            bool(got & {"ok", "refused", "no-reply"}) and "rejected" in got,
            f"{cls.__name__} was not both handled and rejected: {got}\n{report}",
        )
    require(set(s.mutations) == set(fuzzgen.MUTATIONS), f"mutations unused\n{report}")
    require(set(s.fd_kinds) == {k.value for k in FdKind}, f"fd kinds unused\n{report}")
    require(set(s.expects) == {e.value for e in Expect}, f"verdicts not seen\n{report}")
    require(set(s.endpoints) == set(fuzzgen.ENDPOINTS), f"endpoints unused\n{report}")
    require(s.resets > 0 and s.notices["Detach"] > 0, f"nothing went deep\n{report}")


def test_every_request_type_has_an_expected_reply() -> None:
    """The reply table covers every request the wire module registers (a new type must be
    added here, or the fuzzer could not judge its replies)."""
    answered = {c for c in fuzzgen.REQUESTS if not c.NO_REPLY}
    assert set(REPLIES) == answered


def test_oracles_can_fail(fuzzer: Fuzzer) -> None:
    """The state oracles catch what they are for (fed doctored snapshots): a leaked fd, a
    change to the victim, a refused request that changed something, leftovers after the
    fuzzer left."""
    base = fuzzer.base
    kw: dict[str, Any] = {"base": base, "before": base, "ids": fuzzer.ids}
    assert not check_state(base, world_alive=False, accepted=False, **kw)

    def doctored(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        state = copy.deepcopy(base)
        change(state)
        return state

    leak = doctored(lambda s: s["process"].update(open_fds=s["process"]["open_fds"] + 1))
    victim = doctored(lambda s: s["objects"][0].update(handles=s["objects"][0]["handles"] + 1))
    extra_vm = doctored(
        lambda s: s["vms"].append(
            {
                "id": 999,
                "owner": 999,
                "ngsi": 1,
                "irqchip": False,
                "guest": None,
                "devices": [],
                "memslots": [],
            }
        )
    )
    for state, alive, accepted, what in (
        (leak, True, True, "neither a connection nor an object"),
        (victim, True, True, "victim's state changed"),
        (extra_vm, True, False, "refused request changed the state"),
        (extra_vm, False, True, "differs from the baseline"),
    ):
        with pytest.raises(FuzzFailure, match=what):
            check_state(state, world_alive=alive, accepted=accepted, **kw)
    assert check_state(extra_vm, world_alive=True, accepted=True, **kw)  # reset, then base


def test_more_fds_than_scm_max_fd_cannot_even_be_sent() -> None:
    """Why the generator stops at 253 fds: Linux refuses more in one sendmsg."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b, new_eventfd() as efd:
        anc = [
            (
                socket.SOL_SOCKET,
                socket.SCM_RIGHTS,
                array.array("i", [efd.fd] * (fuzzgen.SCM_MAX_FD + 1)).tobytes(),
            )
        ]
        with pytest.raises(OSError) as e:
            a.sendmsg([b"x"], anc)
        assert e.value.errno == errno.EINVAL
        send_with_fds(a, b"y", [])
        assert b.recv(16) == b"y"


# ------------------------------------------------------------------------------ regressions
# Bugs the fuzzer found, each pinned by name.


def test_relayed_text_too_long_for_its_notice_is_emsgsize_not_a_broker_crash(
    broker: BrokerHandle,
) -> None:
    """DeviceReport and DeviceConfig texts are forwarded in notices whose fixed part is
    4 bytes larger; a text filling the request used to make the broker build a frame it
    could not encode and exit. Now: EMSGSIZE, nothing relayed, the connection stays; a
    text that just fits is relayed intact."""
    vmm = broker.connect()
    dev = vmm.device_create(vmm.vm_create(2), 1)
    device = Channel.adopt(vmm.channel_open(wire.Scope.DEVICE, dev))
    broker.channels.append(device)
    device.attach()
    assert isinstance(vmm.next_notice(timing.scaled(5)), wire.PeerAttached)
    report_fits = "f" * wire.text_room(wire.DeviceReportNotice)
    config_fits = "g" * wire.text_room(wire.DeviceConfigNotice)
    for sender, msg in (
        (device, wire.DeviceReport(text=report_fits + "x")),
        (vmm, wire.DeviceConfig(device=dev, text=config_fits + "x")),
    ):
        with pytest.raises(VbusError, match="EMSGSIZE"):
            sender.request(msg)
    assert vmm.ping(1) == 1 and device.ping(2) == 2 and not vmm.notices  # nothing relayed

    assert isinstance(device.request(wire.DeviceReport(text=report_fits)), wire.Ok)
    report = vmm.next_notice(timing.scaled(5))
    assert isinstance(report, wire.DeviceReportNotice) and report.text == report_fits

    relayed: list[str] = []

    def device_process() -> None:  # answers the one configuration it is sent
        notice = device.next_notice(timing.scaled(5))
        assert isinstance(notice, wire.DeviceConfigNotice)
        relayed.append(notice.text)
        device.send(wire.DeviceConfigDone(token=notice.token))

    answering = threading.Thread(target=device_process)
    answering.start()
    try:
        assert isinstance(vmm.request(wire.DeviceConfig(device=dev, text=config_fits)), wire.Ok)
    finally:
        answering.join(timing.scaled(10))
    assert relayed == [config_fits] and broker.proc.alive


def test_eventfd_create_with_an_initval_above_32_bits_does_not_kill_the_broker(
    broker: BrokerHandle,
) -> None:
    """eventfd(2) takes a 32-bit initval; the protocol's is 64 bits (up to EVENTFD_MAX).
    A larger value used to raise OverflowError inside the broker and kill it."""
    from shared.fds import EVENTFD_MAX

    ch = broker.connect()
    for initval in (0xFFFF_FFFF, 1 << 32, EVENTFD_MAX):
        handle = ch.eventfd_create(initval=initval)
        with ch.handle_fd(handle) as fd:
            info = eventfd_info(fd.fd)
            assert info is not None and info.count == initval
        ch.handle_close(handle)
    with pytest.raises(VbusError, match="EINVAL"):
        ch.eventfd_create(initval=EVENTFD_MAX + 1)
    assert ch.ping(1) == 1 and broker.proc.alive


def test_memory_import_of_a_read_only_or_o_path_memfd_is_einval(broker: BrokerHandle) -> None:
    """A read-only or O_PATH fd of a memfd used to be accepted as guest memory that no
    guest or device can map read/write; now it is refused like any other non-memory fd."""
    ch = broker.connect()
    with _memfd(MEM_SIZE) as rw:
        for mode in (os.O_RDONLY, os.O_PATH):
            with (
                OwnedFd(os.open(f"/proc/self/fd/{rw.fd}", mode | os.O_CLOEXEC)) as fd,
                pytest.raises(VbusError, match="EINVAL"),
            ):
                ch.memory_import(fd, MEM_SIZE)
        handle = ch.memory_import(rw, MEM_SIZE)
    state = ch.state()
    assert [o["kind"] for o in state["objects"]] == ["memory"]
    ch.handle_close(handle)
