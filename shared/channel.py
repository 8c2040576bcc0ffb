"""The client side of the control protocol: one of vbusemu's few socket-owning files.

A :class:`Channel` wraps one SOCK_SEQPACKET connection to the broker -- either dialled
(:meth:`Channel.connect`) or adopted from an fd a VMM handed over (:meth:`Channel.adopt`,
a *scoped* channel bound to one VM or device). It pairs requests and replies by
sequence number and keeps asynchronous notices (attach, detach, peer gone) in arrival
order for the caller's loop.

Invariants
----------
* One request in flight per channel: :meth:`request` sends, then reads until the reply
  with the same ``seq``. Notices read meanwhile are queued in order, or handed to
  ``on_notice`` if set -- a process that is also a consumer sets it so that a detach
  it must acknowledge cannot deadlock against its own request.
* Every error reply becomes :class:`~shared.errors.BrokerError` (errno + message).
  EOF or a timeout is :class:`~shared.errors.PeerGoneError`; a malformed frame is
  :class:`~shared.errors.ProtocolError` (its fds are closed).
* The socket is close-on-exec; :meth:`close` is idempotent.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from shared import wire
from shared.errors import BrokerError, PeerGoneError, ProtocolError, UsageError
from shared.fds import OwnedFd, recv_with_fds, send_with_fds

DEFAULT_TIMEOUT = 10.0
R = TypeVar("R", bound=wire.Message)


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """``SO_SNDTIMEO`` (which also bounds a blocking AF_UNIX connect); 0 means none.

    A positive ``seconds`` is rounded up to at least one microsecond: a zero
    ``struct timeval`` would mean "wait forever"."""
    if seconds <= 0 or math.isinf(seconds):
        sec, usec = 0, 0
    else:
        sec, usec = divmod(max(1, math.ceil(min(seconds, 1e9) * 1e6)), 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", sec, usec))


class Channel:
    """A typed request/reply connection to the broker."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._seq = 0
        self.notices: deque[wire.Message] = deque()
        self.on_notice: Callable[[wire.Message], None] | None = None

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_TIMEOUT) -> Channel:
        """Dial the broker at ``path``, waiting up to ``timeout`` seconds for a free slot
        in its listen backlog.

        On AF_UNIX a connect to a listener whose backlog is full fails at once with
        EAGAIN on a non-blocking socket (which is what a socket timeout makes it), but
        *waits* on a blocking one, for at most ``SO_SNDTIMEO``, until the listener
        accepts a connection. So the socket stays blocking while it dials, with
        ``SO_SNDTIMEO`` set to what is left of the deadline, and an EAGAIN (the wait ran
        out, or a spurious wake-up) or EINTR is retried until the deadline. Any other
        error (no such socket, refused: nobody listens) fails at once."""
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            while True:
                _set_send_timeout(sock, max(deadline - time.monotonic(), 1e-6))
                try:
                    sock.connect(path)
                    sock.getpeername()  # an interrupted connect may look done but is not
                    break
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    if e.errno != errno.ENOTCONN:
                        raise PeerGoneError(f"cannot reach the broker at {path}: {e}") from e
                if time.monotonic() >= deadline:
                    raise PeerGoneError(
                        f"cannot reach the broker at {path}: its listen backlog stayed "
                        f"full for {timeout:g} s (connect kept failing with EAGAIN)"
                    )
            _set_send_timeout(sock, 0.0)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    def adopt(cls, fd: OwnedFd | int) -> Channel:
        """Take over a pre-connected socket (a scoped channel passed by the VMM)."""
        raw = fd.take() if isinstance(fd, OwnedFd) else fd
        sock = socket.socket(fileno=raw)
        if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
            sock.close()
            raise UsageError(f"fd {raw} is not an AF_UNIX SOCK_SEQPACKET socket")
        sock.set_inheritable(False)
        return cls(sock)

    def fileno(self) -> int:
        return self._socket().fileno()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        while self.notices:
            self.notices.popleft().close_fds()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise UsageError("channel is closed")
        return self._sock

    # ------------------------------------------------------------------ raw I/O

    def send(self, msg: wire.Message) -> None:
        """Send without waiting for anything (acknowledgements)."""
        data, fds = wire.encode(msg)
        sock = self._socket()
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while True:
            try:
                send_with_fds(sock, data, fds, nonblocking=True)
                return
            except BlockingIOError:
                self._wait(deadline, write=True)

    def _wait(self, deadline: float, *, write: bool = False) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerGoneError("the broker did not answer in time")
        fd = self._socket().fileno()
        wait = None if math.isinf(left) else left
        select.select([] if write else [fd], [fd] if write else [], [], wait)

    def _read(self, deadline: float | None) -> wire.Message | None:
        """One frame, or None if ``deadline`` (None: don't wait) passed first."""
        sock = self._socket()
        while True:
            try:
                got = recv_with_fds(sock, wire.MAX_FRAME)
            except BlockingIOError:
                if deadline is None or deadline <= time.monotonic():
                    return None
                self._wait(deadline)
                continue
            if got is None:
                raise PeerGoneError("the broker closed the connection")
            data, fds = got
            return wire.decode(data, fds)

    def _dispatch_notice(self, msg: wire.Message) -> None:
        if msg.KIND is wire.Kind.REPLY:
            msg.close_fds()
            raise ProtocolError(f"unexpected reply {wire.describe(msg)}")
        if self.on_notice is not None:
            self.on_notice(msg)
        else:
            self.notices.append(msg)

    # ------------------------------------------------------------------ requests

    def request(self, msg: wire.Message, timeout: float = DEFAULT_TIMEOUT) -> wire.Message:
        """Send a request and return its reply; error replies raise :class:`BrokerError`."""
        if msg.KIND is not wire.Kind.REQUEST:
            raise UsageError(f"{type(msg).__name__} is not a request")
        self._seq = (self._seq % wire.SEQ_MASK) + 1
        seq = self._seq
        self.send(dataclasses.replace(msg, seq=seq))
        deadline = time.monotonic() + timeout
        while True:
            got = self._read(deadline)
            if got is None:
                raise PeerGoneError(f"no reply to {type(msg).__name__} within {timeout}s")
            if got.KIND is not wire.Kind.REPLY:
                self._dispatch_notice(got)
                continue
            if got.seq != seq:
                got.close_fds()
                raise ProtocolError(f"reply seq {got.seq} does not match request seq {seq}")
            if isinstance(got, wire.Error):
                raise BrokerError(got.errno, got.text)
            return got

    def call(self, msg: wire.Message, reply_type: type[R], timeout: float = DEFAULT_TIMEOUT) -> R:
        """:meth:`request`, checking the reply's type."""
        reply = self.request(msg, timeout)
        if not isinstance(reply, reply_type):
            reply.close_fds()
            raise ProtocolError(f"expected {reply_type.__name__}, got {type(reply).__name__}")
        return reply

    def next_notice(self, timeout: float | None = 0.0) -> wire.Message | None:
        """The next queued or arriving notice; ``None`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.notices:
            got = self._read(deadline if deadline is not None else float("inf"))
            if got is None:
                return None
            if got.KIND is wire.Kind.REPLY:
                got.close_fds()
                raise ProtocolError(f"unexpected reply {wire.describe(got)}")
            self.notices.append(got)
        return self.notices.popleft()

    def pump(self) -> None:
        """Read every frame available now (non-blocking) into the notice queue / hook."""
        while (got := self._read(None)) is not None:
            self._dispatch_notice(got)

    # ------------------------------------------------------------------ typed helpers

    def hello(self) -> wire.HelloReply:
        return self.call(wire.Hello(), wire.HelloReply)

    def ping(self, token: int = 0, timeout: float = DEFAULT_TIMEOUT) -> int:
        return self.call(wire.Ping(token=token), wire.Pong, timeout).token

    def eventfd_create(self, *, semaphore: bool = False, initval: int = 0) -> int:
        flags = wire.EFD_FLAG_SEMAPHORE if semaphore else 0
        return self.call(wire.EventfdCreate(flags=flags, initval=initval), wire.HandleReply).handle

    def eventfd_import(self, fd: OwnedFd) -> int:
        """Give the broker a copy of ``fd``; ``fd`` stays ours (close it to 'close(fd)')."""
        return self.call(wire.EventfdImport(fds=(fd,)), wire.HandleReply).handle

    def memory_import(self, fd: OwnedFd, size: int) -> int:
        return self.call(wire.MemoryImport(size=size, fds=(fd,)), wire.HandleReply).handle

    def handle_dup(self, handle: int) -> int:
        return self.call(wire.HandleDup(handle=handle), wire.HandleReply).handle

    def handle_close(self, handle: int) -> None:
        self.call(wire.HandleClose(handle=handle), wire.Ok)

    def handle_fd(self, handle: int) -> OwnedFd:
        return self.call(wire.HandleGetFd(handle=handle), wire.FdReply).fds[0]

    def vm_create(self, ngsi: int, *, irqchip: bool = True) -> int:
        vm = self.call(wire.VmCreate(ngsi=ngsi), wire.IdReply).id
        if irqchip:
            self.call(wire.IrqchipCreate(vm=vm), wire.Ok)
        return vm

    def vm_destroy(self, vm: int) -> None:
        self.call(wire.VmDestroy(vm=vm), wire.Ok)

    def memslot_set(
        self, vm: int, slot: int, gpa: int, size: int, handle: int, offset: int = 0
    ) -> None:
        self.call(
            wire.MemslotSet(vm=vm, slot=slot, gpa=gpa, size=size, offset=offset, handle=handle),
            wire.Ok,
        )

    def device_create(self, vm: int, nsignals: int) -> int:
        return self.call(wire.DeviceCreate(vm=vm, nsignals=nsignals), wire.IdReply).id

    def device_destroy(self, device: int) -> None:
        self.call(wire.DeviceDestroy(device=device), wire.Ok)

    def irqfd_assign(
        self, vm: int, handle: int, gsi: int, *, resample_handle: int | None = None
    ) -> int:
        flags = wire.IRQFD_FLAG_RESAMPLE if resample_handle is not None else 0
        msg = wire.Irqfd(
            vm=vm,
            handle=handle,
            gsi=gsi,
            flags=flags,
            resample_handle=wire.NO_HANDLE if resample_handle is None else resample_handle,
        )
        return self.call(msg, wire.IdReply).id

    def irqfd_deassign(self, vm: int, handle: int | None, gsi: int) -> None:
        h = wire.NO_HANDLE if handle is None else handle
        self.call(wire.Irqfd(vm=vm, handle=h, gsi=gsi, flags=wire.IRQFD_FLAG_DEASSIGN), wire.Ok)

    def ioeventfd(
        self,
        vm: int,
        handle: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> int | None:
        flags = (
            (wire.IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
            | (wire.IOEVENTFD_FLAG_PIO if pio else 0)
            | (wire.IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        )
        reply = self.request(
            wire.Ioeventfd(
                vm=vm, handle=handle, flags=flags, len=length, addr=addr, datamatch=datamatch or 0
            )
        )
        return reply.id if isinstance(reply, wire.IdReply) else None

    def shmsignal_assign(self, device: int, sigid: int, handle: int) -> int:
        return self.call(wire.ShmSignal(device=device, sigid=sigid, handle=handle), wire.IdReply).id

    def shmsignal_deassign(self, device: int, sigid: int, handle: int | None = None) -> None:
        h = wire.NO_HANDLE if handle is None else handle
        self.call(
            wire.ShmSignal(
                device=device, sigid=sigid, handle=h, flags=wire.SHMSIGNAL_FLAG_DEASSIGN
            ),
            wire.Ok,
        )

    def channel_open(self, scope: wire.Scope, target: int) -> OwnedFd:
        """A socket scoped to one VM or device, to hand to a guest or device process."""
        return self.call(wire.ChannelOpen(scope=scope, target=target), wire.FdReply).fds[0]

    def attach(self) -> None:
        self.call(wire.Attach(), wire.Ok)

    def ack_detach(self, binding: int) -> None:
        self.send(wire.DetachAck(binding=binding))

    def state_pages(
        self, section: wire.StateSection, limit: int = 0
    ) -> Iterator[list[dict[str, Any]]]:
        """The items of one section, a page per request (each costs the broker one page)."""
        after = 0
        while True:
            reply = self.call(
                wire.GetState(section=section, limit=limit, after=after), wire.StateReply
            )
            yield json.loads(reply.text)
            if not reply.next:
                return
            after = reply.next

    def state(self) -> dict[str, Any]:
        """The broker's whole state (``vbusemu ps``), every section paged through. Pages are
        consistent one by one; an object created or destroyed meanwhile may be missed."""
        return wire.assemble_state(
            lambda section: [item for page in self.state_pages(section) for item in page]
        )
