"""The broker's object table: the emulated host kernel's state, with no I/O.

Theory of operation
-------------------
The server loop feeds this class three kinds of events -- a connection appeared
(:meth:`ObjectTable.connect`), a decoded request arrived (:meth:`ObjectTable.handle`),
a connection ended (:meth:`ObjectTable.disconnect`) -- plus the passing of time
(:meth:`ObjectTable.expire`). Each call returns a list of *actions* for the loop to
perform: :class:`Send` a message (with fds the action owns) to a connection,
:class:`Disconnect` one, or :class:`OpenChannel` (create a scoped socketpair).
Nothing here touches a socket, so every rule is unit-testable without processes.

Ownership and the two reference layers
--------------------------------------------------
* Every kernel object (eventfd, shared memory) is held by the broker as one
  :class:`~shared.fds.OwnedFd` -- its own dup of the real fd.
* *Handles* are the "file" references: per-connection small integers, like a process's
  fd table. ``obj.handles`` counts them across all connections. A connection can only
  name handles it holds; its end (close or crash) drops them all, like process exit.
* *Bindings* (irqfd, ioeventfd, shm-signal, memory slot) are the "context" references
  (``obj.ctx_refs``). A binding keeps its references until it is fully detached.
* The broker closes its fd when both layers reach zero.

Release policies
----------------
``HUP``: when an eventfd's last handle goes, every irqfd and shm-signal bound to it is
detached with reason HUP (the irqfd first, as KVM's POLLHUP path does); ioeventfds and
resamplefd references stay (they register no waiter, so they have no HUP path).
``REFCOUNT``: handles going to zero changes nothing; bindings keep the eventfd alive
until their explicit DEASSIGN (or VM/device teardown).

Synchronous detach
------------------
Consumers and producers run in other processes and hold their own copies of the real
eventfd. Deactivating a binding removes it from every index at once (so the same
eventfd may be bound again immediately), sends :class:`~shared.wire.Detach` to the
process using it and marks it *detaching*; the binding drops its references only when
that process acknowledges (:class:`~shared.wire.DetachAck`) or is gone. The request
that caused the detach (deassign, close, destroy) is answered only after every detach
it started has finished: after the reply, no interrupt from that binding is delivered.
A process that does not acknowledge within ``ack_timeout`` seconds is disconnected
(treated as gone), which also finishes its detaches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias

from hostemu.broker import introspect
from hostemu.broker.idmap import IdMap
from hostemu.broker.limits import Quotas
from hostemu.broker.objects import (
    Binding,
    Conn,
    Detaching,
    Device,
    EventfdObj,
    Forward,
    IoeventfdBinding,
    IrqfdBinding,
    KernelObject,
    KickfdBinding,
    MemoryObj,
    Memslot,
    PendingOp,
    ShmSignalBinding,
    Vm,
)
from hostemu.broker.relay import RelayTable
from shared import wire
from shared.errors import BrokerError
from shared.fds import EVENTFD_MAX, eventfd_info, memory_fd_size, new_eventfd
from shared.wire import DetachReason, PeerKind, Policy, Scope

MAX_GSI = 1024
MAX_MEMSLOTS = 512
MAX_SIGNALS = 64
PAGE_SIZE = 4096
IOEVENTFD_LENGTHS = frozenset({0, 1, 2, 4, 8})
IOEVENTFD_EXTRA_FLAGS = wire.IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY | wire.IOEVENTFD_FLAG_FAST_MMIO
ADDR_LIMIT = 1 << 64
DEFAULT_ACK_TIMEOUT = 2.0
DEFAULT_RELAY_TIMEOUT = 10.0


# ------------------------------------------------------------------------------ actions


@dataclass
class Send:
    """Send ``msg`` to ``conn``; the loop closes ``msg.fds`` (our dups) once sent."""

    conn: int
    msg: wire.Message


@dataclass
class Disconnect:
    """Drop ``conn`` (the table has already forgotten it)."""

    conn: int
    reason: str


@dataclass
class OpenChannel:
    """Make a socketpair scoped to ``scope``/``target``; call :meth:`ObjectTable.channel_opened`
    with the new connection and reply to ``requester`` with the other end."""

    requester: int
    seq: int
    scope: Scope
    target: int


Action: TypeAlias = Send | Disconnect | OpenChannel


def _ioeventfd_bus(flags: int) -> str:
    """KVM's choice of bus for an ioeventfd: PIO if asked, else the virtio-ccw notify bus if
    asked (an x86 guest never reaches it: its writes exit, nothing collides with MMIO),
    else MMIO."""
    if flags & wire.IOEVENTFD_FLAG_PIO:
        return "pio"
    if flags & wire.IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY:
        return "ccw"
    return "mmio"


def _reaches_guest(b: Binding) -> bool:
    """Whether the VM's guest consumes ``b`` (irqfds and ioeventfds on a bus it reaches)."""
    if isinstance(b, IoeventfdBinding):
        return b.bus != "ccw"
    return isinstance(b, IrqfdBinding)


def _fail(name: str, message: str) -> BrokerError:
    return BrokerError.named(name, message)


# ------------------------------------------------------------------------------ the table


Handler = Callable[[Conn, Any, PendingOp], wire.Message | None]


class ObjectTable:
    """Every object the emulated host kernel owns, and the rules that change them."""

    def __init__(
        self,
        policy: Policy = Policy.HUP,
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        quotas: Quotas | None = None,
        relay_timeout: float = DEFAULT_RELAY_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        process_info: Callable[[], dict[str, Any]] = dict,
        fd_room: Callable[[int], bool] = lambda n: True,
    ) -> None:
        self.policy = policy
        self.ack_timeout = ack_timeout
        self.quotas = quotas if quotas is not None else Quotas()
        # Whether the broker can hold ``n`` more fds and keep its reserve (the server's
        # FdBudget); asked before every new fd-holding object.
        self._fd_room = fd_room
        self.relay_timeout = relay_timeout
        self._clock = clock
        self.process_info = process_info
        self._ids = itertools.count(1)
        # IdMaps: introspection pages through them from a cursor in O(log n + page).
        self.conns: IdMap[Conn] = IdMap()
        self.objects: IdMap[KernelObject] = IdMap()
        self._by_kernel_id: dict[int, EventfdObj] = {}
        self.vms: IdMap[Vm] = IdMap()
        self.devices: IdMap[Device] = IdMap()
        self.bindings: IdMap[Binding] = IdMap()  # every binding until it is released
        self._detaching: dict[int, Detaching] = {}
        self._out: list[Action] = []
        self._handlers: dict[type[wire.Message], Handler] = {
            wire.Hello: self._hello,
            wire.Ping: self._ping,
            wire.GetState: self._get_state,
            wire.EventfdCreate: self._eventfd_create,
            wire.EventfdImport: self._eventfd_import,
            wire.MemoryImport: self._memory_import,
            wire.HandleDup: self._handle_dup,
            wire.HandleClose: self._handle_close,
            wire.HandleGetFd: self._handle_get_fd,
            wire.VmCreate: self._vm_create,
            wire.VmDestroy: self._vm_destroy,
            wire.IrqchipCreate: self._irqchip_create,
            wire.MemslotSet: self._memslot_set,
            wire.DeviceCreate: self._device_create,
            wire.DeviceDestroy: self._device_destroy,
            wire.Irqfd: self._irqfd,
            wire.Ioeventfd: self._ioeventfd,
            wire.ShmSignal: self._shmsignal,
            wire.ChannelOpen: self._channel_open,
            wire.Attach: self._attach,
            wire.DeviceKickfd: self._device_kickfd,
            wire.IoExit: self._io_exit,
            wire.IoExitDone: self._io_exit_done,
            wire.DeviceConfig: self._device_config,
            wire.DeviceConfigDone: self._device_config_done,
            wire.DeviceReport: self._device_report,
        }
        # Requests a scoped (guest or device) channel may make; everything else is EPERM.
        self._scoped_allowed: frozenset[type[wire.Message]] = frozenset(
            {
                wire.Hello,
                wire.Ping,
                wire.Attach,
                wire.EventfdCreate,
                wire.EventfdImport,
                wire.HandleDup,
                wire.HandleClose,
                wire.HandleGetFd,
                wire.IoExit,  # VM channels only (checked by the handler)
                wire.DeviceConfigDone,  # device channels only
                wire.DeviceReport,  # device channels only
            }
        )
        self.relay = RelayTable()

    # ----------------------------------------------------------------- entry points

    def connect(
        self, conn_id: int, *, pid: int, uid: int, scope: Scope = Scope.HOST, target: int = 0
    ) -> list[Action]:
        self.conns[conn_id] = Conn(conn_id, pid, uid, scope, target)
        return self._flush()

    def handle(self, conn_id: int, msg: wire.Message) -> list[Action]:
        """Apply one request. Fds the table keeps are *taken* from ``msg``; the caller
        closes whatever is left in ``msg.fds`` afterwards."""
        conn = self.conns.get(conn_id)
        if conn is None:
            return []
        if isinstance(msg, wire.DetachAck):
            self._ack(conn, msg.binding)
            return self._flush()
        if msg.NO_REPLY:  # an answer to something we relayed: a stale one is ignored
            handler = self._handlers.get(type(msg))
            if handler is not None and (
                conn.scope is Scope.HOST or type(msg) in self._scoped_allowed
            ):
                with contextlib.suppress(BrokerError):
                    handler(conn, msg, PendingOp(None, None))
            return self._flush()
        op = PendingOp(conn_id, None)
        try:
            handler = self._handlers.get(type(msg))
            if handler is None:
                raise _fail("EINVAL", f"{type(msg).__name__} is not a request")
            if conn.scope is not Scope.HOST and type(msg) not in self._scoped_allowed:
                raise _fail("EPERM", f"a {conn.scope.name} channel may not {type(msg).__name__}")
            reply = handler(conn, msg, op)
            reply = reply if reply is not None else wire.Ok()
        except BrokerError as e:
            reply = wire.Error(errno=e.errno, text=e.message)
        except OSError as e:
            # A syscall made on the requester's behalf failed (EMFILE, ENFILE, ENOMEM, ...).
            # Handlers make their syscalls before they change anything, so the request
            # changed nothing: the requester gets the errno, everyone else carries on.
            reply = wire.Error(
                errno=e.errno or errno.EIO, text=f"{type(msg).__name__}: {e.strerror or e}"
            )
        op.reply = _with_seq(reply, msg.seq)
        if not op.waiting:
            self._complete(op)
        return self._flush()

    def disconnect(self, conn_id: int) -> list[Action]:
        """A connection ended (close or crash): exactly like process exit."""
        self._drop_conn(conn_id)
        return self._flush()

    def channel_opened(
        self, requester: int, seq: int, conn_id: int, pid: int, uid: int, scope: Scope, target: int
    ) -> list[Action]:
        """The loop created a scoped channel for an :class:`OpenChannel` action."""
        self.conns[conn_id] = Conn(conn_id, pid, uid, scope, target)
        return self._flush()

    def expire(self) -> list[Action]:
        """Disconnect every consumer that missed its acknowledgement deadline; fail every
        relayed request whose responder missed its deadline (ETIMEDOUT)."""
        now = self._clock()
        late = {d.consumer for d in self._detaching.values() if d.deadline <= now}
        for conn_id in sorted(late):
            self._out.append(Disconnect(conn_id, "did not acknowledge a detach in time"))
            self._drop_conn(conn_id)
        for fwd in self.relay.expired(now):
            self._relay_failed(fwd, "ETIMEDOUT", "no answer in time")
        return self._flush()

    def next_deadline(self) -> float | None:
        deadlines = [d.deadline for d in self._detaching.values()]
        relay = self.relay.next_deadline()
        if relay is not None:
            deadlines.append(relay)
        return min(deadlines, default=None)

    # ----------------------------------------------------------------- plumbing

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _send(self, conn_id: int | None, msg: wire.Message) -> None:
        if conn_id is not None and conn_id in self.conns:
            self._out.append(Send(conn_id, msg))
        else:
            msg.close_fds()

    def _complete(self, op: PendingOp) -> None:
        if op.reply is not None:
            self._send(op.requester, op.reply)
            op.reply = None

    def _new_handle(self, conn: Conn, obj: KernelObject) -> int:
        self._check_handle_room(conn)
        while conn.next_handle in conn.handles or conn.next_handle == wire.NO_HANDLE:
            conn.next_handle = (conn.next_handle + 1) & 0xFFFFFFFF
        h = conn.next_handle
        conn.next_handle = (conn.next_handle + 1) & 0xFFFFFFFF
        conn.handles[h] = obj
        obj.handles += 1
        return h

    def _lookup(self, conn: Conn, handle: int) -> KernelObject:
        obj = conn.handles.get(handle)
        if obj is None:
            raise _fail("EBADF", f"handle {handle} is not open on this connection")
        return obj

    def _eventfd(self, conn: Conn, handle: int) -> EventfdObj:
        obj = self._lookup(conn, handle)
        if not isinstance(obj, EventfdObj):
            raise _fail("EINVAL", f"handle {handle} is a {obj.kind}, not an eventfd")
        return obj

    def _own_vm(self, conn: Conn, vm_id: int) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise _fail("ENOENT", f"no VM {vm_id}")
        if vm.owner != conn.id:
            raise _fail("EPERM", f"VM {vm_id} belongs to another connection")
        return vm

    def _own_device(self, conn: Conn, dev_id: int) -> Device:
        dev = self.devices.get(dev_id)
        if dev is None:
            raise _fail("ENOENT", f"no device {dev_id}")
        if dev.owner != conn.id:
            raise _fail("EPERM", f"device {dev_id} belongs to another connection")
        return dev

    def _add_object(self, obj: KernelObject) -> None:
        self.objects[obj.id] = obj
        if isinstance(obj, EventfdObj) and obj.kernel_id >= 0:
            self._by_kernel_id[obj.kernel_id] = obj

    def _maybe_free(self, obj: KernelObject) -> None:
        """Close the broker's fd once both reference layers are empty."""
        if obj.handles == 0 and obj.ctx_refs == 0 and obj.id in self.objects:
            del self.objects[obj.id]
            if isinstance(obj, EventfdObj) and self._by_kernel_id.get(obj.kernel_id) is obj:
                del self._by_kernel_id[obj.kernel_id]
            obj.fd.close()

    # ----------------------------------------------------------------- handles

    def _drop_handle(self, conn: Conn, handle: int, op: PendingOp) -> None:
        obj = conn.handles.pop(handle)
        obj.handles -= 1
        if obj.handles == 0 and isinstance(obj, EventfdObj) and self.policy is Policy.HUP:
            # The file is released: like eventfd_release()'s POLLHUP, every waiter
            # (irqfd first, then shm-signal producers) detaches. ioeventfd and resample
            # references register no waiter and stay.
            hup = [
                b
                for b in obj.bindings.values()
                if b.state == "active"
                and b.eventfd is obj
                and isinstance(b, IrqfdBinding | ShmSignalBinding)
            ]
            hup.sort(key=lambda b: (not isinstance(b, IrqfdBinding), b.id))
            for b in hup:
                self._deactivate(b, DetachReason.HUP, op)
        self._maybe_free(obj)

    # ----------------------------------------------------------------- bindings

    def _bind(self, b: Binding) -> wire.Message:
        """Make ``b`` live and answer its assign. The quota check and the consumer's notice
        (its dups: the only syscalls) come before anything changes."""
        owner = self.conns.get(self._owner_of(b))
        if owner is not None:
            self._check_quota("bindings", owner.nbindings)
        consumer = self._consumer_of(b)
        notice = self._notice(b) if consumer is not None else None
        self._index(b)
        if owner is not None:
            owner.nbindings += 1
        self.bindings[b.id] = b
        for obj in b.refs():
            obj.ctx_refs += 1
            obj.bindings[b.id] = b
        if notice is not None:
            b.consumer = consumer
            self._send(consumer, notice)
        return wire.IdReply(id=b.id)

    @staticmethod
    def _owner_of(b: Binding) -> int:
        """The connection whose quota the binding counts against."""
        if isinstance(b, ShmSignalBinding | KickfdBinding):
            return b.device.owner
        assert isinstance(b, IrqfdBinding | IoeventfdBinding)
        return b.vm.owner

    @staticmethod
    def _index(b: Binding) -> None:
        if isinstance(b, IrqfdBinding):
            b.vm.irqfds[b.id] = b
            b.eventfd.irqfd = b
        elif isinstance(b, IoeventfdBinding):
            b.vm.ioeventfds.setdefault((b.bus, b.addr), []).append(b)
        elif isinstance(b, ShmSignalBinding):
            b.device.signals[b.sigid] = b
        elif isinstance(b, KickfdBinding):
            b.device.kicks[b.queue] = b

    @staticmethod
    def _unindex(b: Binding) -> None:
        if isinstance(b, IrqfdBinding):
            del b.vm.irqfds[b.id]
            if b.eventfd.irqfd is b:
                b.eventfd.irqfd = None
        elif isinstance(b, IoeventfdBinding):
            bucket = b.vm.ioeventfds[(b.bus, b.addr)]
            bucket.remove(b)
            if not bucket:
                del b.vm.ioeventfds[(b.bus, b.addr)]
        elif isinstance(b, ShmSignalBinding):
            del b.device.signals[b.sigid]
        elif isinstance(b, KickfdBinding):
            del b.device.kicks[b.queue]

    def _consumer_of(self, b: Binding) -> int | None:
        if isinstance(b, ShmSignalBinding | KickfdBinding):
            return b.device.process
        if _reaches_guest(b):
            assert isinstance(b, IrqfdBinding | IoeventfdBinding)
            return b.vm.guest
        return None

    def _notice(self, b: Binding) -> wire.Message:
        """The attach notice for ``b``'s consumer, carrying dups of its eventfds."""
        msg: wire.Message
        if isinstance(b, IrqfdBinding) and b.resample is not None:
            msg = wire.IrqfdAttachResample(
                binding=b.id, gsi=b.gsi, fds=(b.eventfd.fd.dup(), b.resample.fd.dup())
            )
        elif isinstance(b, IrqfdBinding):
            msg = wire.IrqfdAttach(binding=b.id, gsi=b.gsi, fds=(b.eventfd.fd.dup(),))
        elif isinstance(b, IoeventfdBinding):
            flags = (wire.IOEVENTFD_FLAG_PIO if b.pio else 0) | (
                wire.IOEVENTFD_FLAG_DATAMATCH if b.datamatch is not None else 0
            )
            msg = wire.IoeventfdAttach(
                binding=b.id,
                addr=b.addr,
                len=b.length,
                flags=flags,
                datamatch=b.datamatch or 0,
                fds=(b.eventfd.fd.dup(),),
            )
        elif isinstance(b, ShmSignalBinding):
            msg = wire.ShmSignalAttach(binding=b.id, sigid=b.sigid, fds=(b.eventfd.fd.dup(),))
        elif isinstance(b, KickfdBinding):
            msg = wire.KickfdAttach(binding=b.id, queue=b.queue, fds=(b.eventfd.fd.dup(),))
        else:  # pragma: no cover - exhaustive
            raise AssertionError(b)
        return msg

    def _deactivate(self, b: Binding, reason: DetachReason, op: PendingOp | None) -> None:
        """Unhook ``b`` from every index now; release its references after the ack."""
        if b.state != "active":
            return
        b.state = "detaching"
        self._unindex(b)
        if b.consumer is not None and b.consumer in self.conns:
            d = Detaching(b, b.consumer, self._clock() + self.ack_timeout)
            if op is not None:
                d.ops.append(op)
                op.waiting.add(b.id)
            self._detaching[b.id] = d
            self._send(b.consumer, wire.Detach(binding=b.id, reason=reason))
        else:
            self._release(b)

    def _wait_for_detaches(self, op: PendingOp, match: Callable[[Binding], bool]) -> None:
        """Answer ``op`` only once every detach in progress of a binding ``match`` accepts
        has finished, whichever request, HUP or exit started it."""
        for d in self._detaching.values():
            if match(d.binding) and d.binding.id not in op.waiting:
                d.ops.append(op)
                op.waiting.add(d.binding.id)

    def _release(self, b: Binding) -> None:
        b.state = "released"
        b.consumer = None
        self.bindings.pop(b.id, None)
        owner = self.conns.get(self._owner_of(b))
        if owner is not None:
            owner.nbindings -= 1
        for obj in b.refs():
            obj.ctx_refs -= 1
            obj.bindings.pop(b.id, None)
            self._maybe_free(obj)

    def _finish_detach(self, binding_id: int) -> None:
        d = self._detaching.pop(binding_id)
        self._release(d.binding)
        for op in d.ops:
            op.waiting.discard(binding_id)
            if not op.waiting:
                self._complete(op)

    def _ack(self, conn: Conn, binding_id: int) -> None:
        d = self._detaching.get(binding_id)
        if d is not None and d.consumer == conn.id:
            self._finish_detach(binding_id)
        # A stale ack (after a timeout) or a guess at someone else's binding is ignored.

    # ----------------------------------------------------------------- teardown

    def _drop_conn(self, conn_id: int) -> None:
        conn = self.conns.get(conn_id)
        if conn is None:
            return
        # 1. It will never acknowledge: finish its detaches.
        for bid in [bid for bid, d in self._detaching.items() if d.consumer == conn_id]:
            self._finish_detach(bid)
        # 2. A guest or device process leaving: its bindings lose their consumer; what
        #    was relayed to it fails, what it asked for is answered to no one.
        self._unattach(conn)
        for fwd in self.relay.responder_gone(conn_id):
            self._relay_failed(fwd, "EPIPE", "the process that had to answer is gone")
        self.relay.requester_gone(conn_id)
        # 3. Its handles go, as at process exit (may HUP bindings elsewhere).
        del self.conns[conn_id]
        op = PendingOp(None, None)
        for h in list(conn.handles):
            self._drop_handle(conn, h, op)
        # 4. Objects it owns are destroyed (VM teardown deactivates every binding).
        for dev in list(conn.devices.values()):
            self._destroy_device(dev, op)
        for vm in list(conn.vms.values()):
            self._destroy_vm(vm, op)

    def _unattach(self, conn: Conn) -> None:
        if conn.scope is Scope.VM:
            vm = self.vms.get(conn.target)
            if vm is not None and vm.guest == conn.id:
                vm.guest = None
                for b in vm.bindings():
                    b.consumer = None
                self._send(vm.owner, wire.PeerGone(kind=PeerKind.GUEST, id=vm.id))
                for dev in vm.devices.values():
                    self._send(dev.process, wire.PeerGone(kind=PeerKind.GUEST, id=vm.id))
        elif conn.scope is Scope.DEVICE:
            device = self.devices.get(conn.target)
            if device is not None and device.process == conn.id:
                device.process = None
                for sig in device.bindings():
                    sig.consumer = None
                self._send(device.owner, wire.PeerGone(kind=PeerKind.DEVICE, id=device.id))
                self._send(device.vm.guest, wire.PeerGone(kind=PeerKind.DEVICE, id=device.id))

    def _destroy_device(self, dev: Device, op: PendingOp) -> None:
        for b in list(dev.bindings()):
            self._deactivate(b, DetachReason.TEARDOWN, op)
        self._send(dev.process, wire.PeerGone(kind=PeerKind.DEVICE, id=dev.id))
        dev.vm.devices.pop(dev.id, None)
        self.devices.pop(dev.id, None)
        owner = self.conns.get(dev.owner)
        if owner is not None:
            owner.devices.pop(dev.id, None)

    def _destroy_vm(self, vm: Vm, op: PendingOp) -> None:
        for dev in list(vm.devices.values()):
            self._destroy_device(dev, op)
        # KVM order: irqfds first (kvm_irqfd_release), then the io buses.
        for irqfd in list(vm.irqfds.values()):
            self._deactivate(irqfd, DetachReason.TEARDOWN, op)
        for b in list(vm.bindings()):
            self._deactivate(b, DetachReason.TEARDOWN, op)
        for slot in list(vm.memslots.values()):
            self._drop_memslot(vm, slot)
        self._send(vm.guest, wire.PeerGone(kind=PeerKind.VM, id=vm.id))
        self.vms.pop(vm.id, None)
        owner = self.conns.get(vm.owner)
        if owner is not None:
            owner.vms.pop(vm.id, None)

    def _memory_holders(self, vm: Vm) -> list[int]:
        """The processes that map a VM's memory: its guest and its device processes."""
        holders = [vm.guest] + [d.process for d in vm.devices.values()]
        return [h for h in holders if h is not None]

    @staticmethod
    def _memslot_notice(slot: Memslot) -> wire.Message:
        return wire.MemslotAttach(
            slot=slot.slot,
            gpa=slot.gpa,
            size=slot.size,
            offset=slot.offset,
            fds=(slot.memory.fd.dup(),),
        )

    @staticmethod
    def _notices_or_nothing(make: Iterable[Callable[[], wire.Message]]) -> list[wire.Message]:
        """Build every notice (each dups fds) or, if one dup fails, none: the dups already
        made are closed and the OSError propagates before the caller changes anything."""
        made: list[wire.Message] = []
        try:
            for build in make:
                made.append(build())
        except OSError:
            for msg in made:
                msg.close_fds()
            raise
        return made

    def _drop_memslot(self, vm: Vm, slot: Memslot) -> None:
        # Peers unmap when they read the notice. Nothing waits for them: unlike a kernel
        # page, a shared-memory mapping that outlives the slot cannot be a use-after-free.
        for holder in self._memory_holders(vm):
            self._send(holder, wire.MemslotDetach(slot=slot.slot))
        del vm.memslots[slot.slot]
        owner = self.conns.get(vm.owner)
        if owner is not None:
            owner.nmemslots -= 1
        slot.memory.ctx_refs -= 1
        self._maybe_free(slot.memory)

    # ----------------------------------------------------------------- request handlers

    def _hello(self, conn: Conn, msg: wire.Hello, op: PendingOp) -> wire.Message:
        return wire.HelloReply(
            client=conn.id,
            policy=self.policy,
            scope=conn.scope,
            target=conn.target,
            broker_pid=os.getpid(),
        )

    def _ping(self, conn: Conn, msg: wire.Ping, op: PendingOp) -> wire.Message:
        return wire.Pong(token=msg.token)

    def _get_state(self, conn: Conn, msg: wire.GetState, op: PendingOp) -> wire.Message:
        try:
            section = wire.StateSection(msg.section)
        except ValueError:
            raise _fail("EINVAL", f"no state section {msg.section}") from None
        limit = introspect.DEFAULT_PAGE if msg.limit == 0 else min(msg.limit, introspect.MAX_PAGE)
        text, cursor = introspect.page(self, section, msg.after, limit)
        return wire.StateReply(section=section, next=cursor, text=text)

    def _eventfd_create(self, conn: Conn, msg: wire.EventfdCreate, op: PendingOp) -> wire.Message:
        if msg.flags & ~wire.EFD_FLAG_SEMAPHORE:
            raise _fail("EINVAL", f"unknown eventfd flags {msg.flags:#x}")
        if msg.initval > EVENTFD_MAX:
            raise _fail("EINVAL", f"initval {msg.initval:#x} exceeds {EVENTFD_MAX:#x}")
        self._check_handle_room(conn)
        self._check_fd_room("EventfdCreate")
        fd = new_eventfd(msg.initval, semaphore=bool(msg.flags & wire.EFD_FLAG_SEMAPHORE))
        try:
            info = eventfd_info(fd.fd)
        except OSError:
            fd.close()
            raise
        obj = EventfdObj(
            next(self._ids),
            fd,
            kernel_id=info.eventfd_id if info else -1,
            semaphore=bool(msg.flags & wire.EFD_FLAG_SEMAPHORE),
        )
        self._add_object(obj)
        return wire.HandleReply(handle=self._new_handle(conn, obj))

    def _check_handle_room(self, conn: Conn) -> None:
        if len(conn.handles) >= self.quotas.handles:
            raise _fail(
                "EMFILE",
                f"connection holds {self.quotas.handles} handles already (its handle quota)",
            )

    def _check_fd_room(self, what: str) -> None:
        """Refuse a new long-lived broker fd while the broker's reserve would be touched."""
        if not self._fd_room(1):
            raise _fail(
                "ENFILE",
                f"{what}: the broker is short of fds (it keeps a reserve "
                "for replies and introspection); close something first",
            )

    def _check_quota(self, name: str, used: int) -> None:
        limit = getattr(self.quotas, name)
        if used >= limit:
            raise _fail("ENOSPC", f"connection has {limit} {name} already (its {name} quota)")

    def _eventfd_import(self, conn: Conn, msg: wire.EventfdImport, op: PendingOp) -> wire.Message:
        info = eventfd_info(msg.fds[0].fd)
        if info is None:
            raise _fail("EINVAL", "the fd is not an eventfd")
        self._check_handle_room(conn)
        known = self._by_kernel_id.get(info.eventfd_id) if info.eventfd_id >= 0 else None
        if known is not None:  # the same kernel object: one broker object, one more handle
            return wire.HandleReply(handle=self._new_handle(conn, known))
        self._check_fd_room("EventfdImport")
        obj = EventfdObj(
            next(self._ids), msg.fds[0].move(), kernel_id=info.eventfd_id, semaphore=info.semaphore
        )
        self._add_object(obj)
        return wire.HandleReply(handle=self._new_handle(conn, obj))

    def _memory_import(self, conn: Conn, msg: wire.MemoryImport, op: PendingOp) -> wire.Message:
        size = memory_fd_size(msg.fds[0].fd)
        if size is None:
            raise _fail("EINVAL", "the fd is not a shared-memory object")
        if msg.size == 0 or msg.size > size:
            raise _fail("EINVAL", f"claimed size {msg.size} but the object holds {size} bytes")
        self._check_handle_room(conn)
        self._check_fd_room("MemoryImport")
        obj = MemoryObj(next(self._ids), msg.fds[0].move(), size=msg.size)
        self._add_object(obj)
        return wire.HandleReply(handle=self._new_handle(conn, obj))

    def _handle_dup(self, conn: Conn, msg: wire.HandleDup, op: PendingOp) -> wire.Message:
        return wire.HandleReply(handle=self._new_handle(conn, self._lookup(conn, msg.handle)))

    def _handle_close(self, conn: Conn, msg: wire.HandleClose, op: PendingOp) -> None:
        self._lookup(conn, msg.handle)
        self._drop_handle(conn, msg.handle, op)

    def _handle_get_fd(self, conn: Conn, msg: wire.HandleGetFd, op: PendingOp) -> wire.Message:
        return wire.FdReply(fds=(self._lookup(conn, msg.handle).fd.dup(),))

    def _vm_create(self, conn: Conn, msg: wire.VmCreate, op: PendingOp) -> wire.Message:
        if not 0 < msg.ngsi <= MAX_GSI:
            raise _fail("EINVAL", f"ngsi must be 1..{MAX_GSI}, got {msg.ngsi}")
        self._check_quota("vms", len(conn.vms))
        vm = Vm(next(self._ids), conn.id, msg.ngsi)
        self.vms[vm.id] = conn.vms[vm.id] = vm
        return wire.IdReply(id=vm.id)

    def _vm_destroy(self, conn: Conn, msg: wire.VmDestroy, op: PendingOp) -> None:
        self._destroy_vm(self._own_vm(conn, msg.vm), op)

    def _irqchip_create(self, conn: Conn, msg: wire.IrqchipCreate, op: PendingOp) -> None:
        vm = self._own_vm(conn, msg.vm)
        if vm.irqchip:
            raise _fail("EEXIST", f"VM {vm.id} already has an interrupt controller")
        vm.irqchip = True

    def _memslot_set(self, conn: Conn, msg: wire.MemslotSet, op: PendingOp) -> None:
        vm = self._own_vm(conn, msg.vm)
        if msg.slot >= MAX_MEMSLOTS:
            raise _fail("EINVAL", f"slot {msg.slot} out of range (< {MAX_MEMSLOTS})")
        old = vm.memslots.get(msg.slot)
        if msg.size == 0:
            if old is None:
                raise _fail("EINVAL", f"slot {msg.slot} does not exist")
            self._drop_memslot(vm, old)
            return
        if old is not None:
            raise _fail("EEXIST", f"slot {msg.slot} exists; delete it first")
        for name, value in (("gpa", msg.gpa), ("size", msg.size), ("offset", msg.offset)):
            if value % PAGE_SIZE:
                raise _fail("EINVAL", f"{name} {value:#x} is not {PAGE_SIZE}-byte aligned")
        if msg.gpa + msg.size > ADDR_LIMIT:
            raise _fail("EINVAL", f"gpa {msg.gpa:#x} + size {msg.size:#x} overflows")
        mem = self._lookup(conn, msg.handle)
        if not isinstance(mem, MemoryObj):
            raise _fail("EINVAL", f"handle {msg.handle} is a {mem.kind}, not memory")
        if msg.offset + msg.size > mem.size:
            raise _fail(
                "EINVAL",
                f"offset+size {msg.offset + msg.size:#x} exceeds the {mem.size:#x}-byte object",
            )
        for s in vm.memslots.values():
            if msg.gpa < s.gpa + s.size and s.gpa < msg.gpa + msg.size:
                raise _fail("EEXIST", f"[{msg.gpa:#x}, +{msg.size:#x}) overlaps slot {s.slot}")
        self._check_quota("memslots", conn.nmemslots)
        slot = Memslot(msg.slot, msg.gpa, msg.size, msg.offset, mem)
        holders = self._memory_holders(vm)
        notices = self._notices_or_nothing(partial(self._memslot_notice, slot) for _ in holders)
        vm.memslots[msg.slot] = slot
        conn.nmemslots += 1
        mem.ctx_refs += 1
        for holder, notice in zip(holders, notices, strict=True):
            self._send(holder, notice)

    def _device_create(self, conn: Conn, msg: wire.DeviceCreate, op: PendingOp) -> wire.Message:
        vm = self._own_vm(conn, msg.vm)
        if not 0 < msg.nsignals <= MAX_SIGNALS:
            raise _fail("EINVAL", f"nsignals must be 1..{MAX_SIGNALS}, got {msg.nsignals}")
        self._check_quota("devices", len(conn.devices))
        dev = Device(next(self._ids), conn.id, vm, msg.nsignals)
        self.devices[dev.id] = conn.devices[dev.id] = vm.devices[dev.id] = dev
        return wire.IdReply(id=dev.id)

    def _device_destroy(self, conn: Conn, msg: wire.DeviceDestroy, op: PendingOp) -> None:
        self._destroy_device(self._own_device(conn, msg.device), op)

    def _irqfd(self, conn: Conn, msg: wire.Irqfd, op: PendingOp) -> wire.Message | None:
        if msg.flags & ~(wire.IRQFD_FLAG_DEASSIGN | wire.IRQFD_FLAG_RESAMPLE):
            raise _fail("EINVAL", f"unknown irqfd flags {msg.flags:#x}")
        vm = self._own_vm(conn, msg.vm)
        if msg.flags & wire.IRQFD_FLAG_DEASSIGN:
            if msg.handle == wire.NO_HANDLE:
                # vbusemu extension for the refcount policy: after close(fd) the VMM can
                # no longer name the eventfd, so it deassigns every irqfd on the gsi.
                found = [b for b in vm.irqfds.values() if b.gsi == msg.gsi]
            else:
                efd = self._eventfd(conn, msg.handle)
                b = efd.irqfd
                found = [b] if b is not None and b.vm is vm and b.gsi == msg.gsi else []
            for b in found:
                self._deactivate(b, DetachReason.DEASSIGN, op)
            # Like KVM's flush of its irqfd cleanup queue: a detach of this gsi already in
            # progress (a HUP, another deassign) finishes before this deassign returns.
            self._wait_for_detaches(
                op, lambda b: isinstance(b, IrqfdBinding) and b.vm is vm and b.gsi == msg.gsi
            )
            return None  # deassigning a pair never assigned succeeds (KVM)
        if not vm.irqchip:
            # KVM: an irqfd needs the in-kernel interrupt controller; EINVAL, checked
            # before the fd is looked at.
            raise _fail("EINVAL", f"VM {vm.id} has no interrupt controller")
        efd = self._eventfd(conn, msg.handle)
        # The gsi is not range-checked (KVM accepts any u32): an irqfd on a gsi the VM
        # does not route drains its signals and injects nothing.
        resample = None
        if msg.flags & wire.IRQFD_FLAG_RESAMPLE:
            resample = self._eventfd(conn, msg.resample_handle)
            if resample is efd:
                # KVM accepts this, and the line then re-fires on every EOI: an interrupt
                # storm. Refused here, like the EBUSY rule (a deliberate deviation).
                raise _fail(
                    "EINVAL",
                    "resamplefd is the irqfd's own eventfd (every EOI would re-raise the line)",
                )
        if efd.irqfd is not None:
            raise _fail(
                "EBUSY",
                f"eventfd already bound as irqfd (VM {efd.irqfd.vm.id}, gsi {efd.irqfd.gsi})",
            )
        b = IrqfdBinding(id=next(self._ids), eventfd=efd, vm=vm, gsi=msg.gsi, resample=resample)
        return self._bind(b)

    def _ioeventfd(self, conn: Conn, msg: wire.Ioeventfd, op: PendingOp) -> wire.Message | None:
        # KVM's order: a deassign validates nothing -- it only searches (so a deassign of
        # length 3 is ENOENT, and unknown flag bits are ignored); an assign checks length,
        # overflow, flags, length 0 with DATAMATCH, the fd, then collisions.
        bus = _ioeventfd_bus(msg.flags)
        wildcard = not msg.flags & wire.IOEVENTFD_FLAG_DATAMATCH
        datamatch = None if wildcard else msg.datamatch
        if msg.flags & wire.IOEVENTFD_FLAG_DEASSIGN:
            vm = self._own_vm(conn, msg.vm)
            efd = self._eventfd(conn, msg.handle)
            for b in vm.ioeventfds.get((bus, msg.addr), []):
                if b.eventfd is efd and b.length == msg.len and b.datamatch == datamatch:
                    self._deactivate(b, DetachReason.DEASSIGN, op)
                    return None
            raise _fail("ENOENT", "no such ioeventfd")
        # KVM's valid-flag mask also holds VIRTIO_CCW_NOTIFY (0x8: its own bus, see
        # _ioeventfd_bus) and FAST_MMIO (0x10: inert from userspace).
        known = (
            wire.IOEVENTFD_FLAG_DATAMATCH
            | wire.IOEVENTFD_FLAG_PIO
            | wire.IOEVENTFD_FLAG_DEASSIGN
            | IOEVENTFD_EXTRA_FLAGS
        )
        if msg.len not in IOEVENTFD_LENGTHS:
            raise _fail("EINVAL", f"length {msg.len} not in {{0,1,2,4,8}}")
        if msg.addr + msg.len >= ADDR_LIMIT:  # KVM: u64 addr + len < addr (wraps, even to 0)
            raise _fail("EINVAL", f"addr {msg.addr:#x} + len {msg.len} overflows")
        if msg.flags & ~known:
            raise _fail("EINVAL", f"unknown ioeventfd flags {msg.flags:#x}")
        if msg.len == 0 and not wildcard:
            raise _fail("EINVAL", "length 0 matches any width: it cannot have a datamatch")
        vm = self._own_vm(conn, msg.vm)
        efd = self._eventfd(conn, msg.handle)
        for b in vm.ioeventfds.get((bus, msg.addr), []):
            if (
                b.length == 0
                or msg.len == 0
                or (
                    b.length == msg.len
                    and (b.datamatch is None or datamatch is None or b.datamatch == datamatch)
                )
            ):
                raise _fail("EEXIST", f"collides with ioeventfd at {msg.addr:#x}")
        b = IoeventfdBinding(
            id=next(self._ids),
            eventfd=efd,
            vm=vm,
            bus=bus,
            addr=msg.addr,
            length=msg.len,
            datamatch=datamatch,
        )
        return self._bind(b)

    def _shmsignal(self, conn: Conn, msg: wire.ShmSignal, op: PendingOp) -> wire.Message | None:
        if msg.flags & ~wire.SHMSIGNAL_FLAG_DEASSIGN:
            raise _fail("EINVAL", f"unknown shm-signal flags {msg.flags:#x}")
        dev = self._own_device(conn, msg.device)
        deassign = bool(msg.flags & wire.SHMSIGNAL_FLAG_DEASSIGN)
        # Deassign may name the signal by sigid alone (VBUS_SHMSIGNAL_DEASSIGN {sigid}):
        # under the refcount policy the VMM has closed its handle by then.
        efd = None if deassign and msg.handle == wire.NO_HANDLE else self._eventfd(conn, msg.handle)
        if msg.sigid >= dev.nsignals:
            raise _fail("EINVAL", f"sigid {msg.sigid} out of range (device has {dev.nsignals})")
        current = dev.signals.get(msg.sigid)
        if deassign:
            if current is None or (efd is not None and current.eventfd is not efd):
                raise _fail("ENOENT", f"sigid {msg.sigid} is not bound to that eventfd")
            self._deactivate(current, DetachReason.DEASSIGN, op)
            return None
        assert efd is not None
        if current is not None:
            raise _fail("EEXIST", f"sigid {msg.sigid} is already bound")
        b = ShmSignalBinding(id=next(self._ids), eventfd=efd, device=dev, sigid=msg.sigid)
        return self._bind(b)

    def _channel_open(self, conn: Conn, msg: wire.ChannelOpen, op: PendingOp) -> None:
        if msg.scope == Scope.VM:
            self._own_vm(conn, msg.target)
        elif msg.scope == Scope.DEVICE:
            self._own_device(conn, msg.target)
        else:
            raise _fail("EINVAL", f"channels are scoped to a VM or a device, not {msg.scope}")
        self._out.append(OpenChannel(conn.id, msg.seq, Scope(msg.scope), msg.target))
        op.requester = None  # the loop replies with the channel's fd
        return None

    def _attach(self, conn: Conn, msg: wire.Attach, op: PendingOp) -> None:
        """Become the VM's guest / the device's process: receive its memory, then every
        binding it consumes or produces (a restarted process gets them all again)."""
        bindings: list[Binding]
        dev = None
        if conn.scope is Scope.VM:
            vm = self.vms.get(conn.target)
            if vm is None:
                raise _fail("ENOENT", f"VM {conn.target} is gone")
            if vm.guest is not None:
                raise _fail("EBUSY", f"VM {vm.id} already has a guest process")
            bindings = [b for b in vm.bindings() if _reaches_guest(b)]
            owner, kind = vm.owner, PeerKind.GUEST
        elif conn.scope is Scope.DEVICE:
            dev = self.devices.get(conn.target)
            if dev is None:
                raise _fail("ENOENT", f"device {conn.target} is gone")
            if dev.process is not None:
                raise _fail("EBUSY", f"device {dev.id} already has a process")
            vm = dev.vm
            bindings, owner, kind = list(dev.bindings()), dev.owner, PeerKind.DEVICE
        else:
            raise _fail("EINVAL", "only a VM or device channel can attach")
        # Every notice (with its dups) first: at the fd limit the attach fails whole.
        slots = sorted(vm.memslots.values(), key=lambda s: s.gpa)
        notices = self._notices_or_nothing(
            [
                *(partial(self._memslot_notice, s) for s in slots),
                *(partial(self._notice, b) for b in bindings),
            ]
        )
        restarted = False
        if dev is None:
            vm.guest = conn.id
        else:
            dev.process = conn.id
            dev.attaches += 1
            restarted = dev.attaches > 1
        for b in bindings:
            b.consumer = conn.id
        for notice in notices:
            self._send(conn.id, notice)
        self._send(owner, wire.PeerAttached(kind=kind, id=conn.target))
        if restarted:
            # The guest was told when the device went away; tell it it is back (a
            # restarted device process), so its halted vCPU stops counting the grace.
            self._send(vm.guest, wire.PeerAttached(kind=kind, id=conn.target))

    # ----------------------------------------------------------------- data plane

    def _device_kickfd(
        self, conn: Conn, msg: wire.DeviceKickfd, op: PendingOp
    ) -> wire.Message | None:
        if msg.flags & ~wire.KICKFD_FLAG_DEASSIGN:
            raise _fail("EINVAL", f"unknown kickfd flags {msg.flags:#x}")
        dev = self._own_device(conn, msg.device)
        if msg.queue >= wire.MAX_QUEUES:
            raise _fail("EINVAL", f"queue {msg.queue} out of range (< {wire.MAX_QUEUES})")
        current = dev.kicks.get(msg.queue)
        if msg.flags & wire.KICKFD_FLAG_DEASSIGN:
            efd = None if msg.handle == wire.NO_HANDLE else self._eventfd(conn, msg.handle)
            if current is None or (efd is not None and current.eventfd is not efd):
                raise _fail("ENOENT", f"queue {msg.queue} has no such kickfd")
            self._deactivate(current, DetachReason.DEASSIGN, op)
            return None
        efd = self._eventfd(conn, msg.handle)
        if current is not None:
            raise _fail("EEXIST", f"queue {msg.queue} already has a kickfd")
        b = KickfdBinding(id=next(self._ids), eventfd=efd, device=dev, queue=msg.queue)
        return self._bind(b)

    def _relay_failed(self, fwd: Forward, name: str, why: str) -> None:
        err = BrokerError.named(name, why)
        self._send(fwd.requester, wire.Error(seq=fwd.seq, errno=err.errno, text=err.message))

    def _io_exit(self, conn: Conn, msg: wire.IoExit, op: PendingOp) -> None:
        vm = self.vms.get(conn.target) if conn.scope is Scope.VM else None
        if vm is None or vm.guest != conn.id:
            raise _fail("EPERM", "only an attached guest makes I/O exits")
        why = wire.access_error(msg.len, msg.addr, msg.value if msg.write else 0)
        if why is not None:
            raise _fail("EINVAL", f"bad access: {why}")
        if self.relay.in_flight(conn.id, "ioexit") is not None:
            # A vCPU is blocked in KVM_RUN until its exit is answered: it cannot make a
            # second one. Refusing it bounds what one guest can queue at the VMM.
            raise _fail("EBUSY", "this vCPU already has an I/O exit in flight")
        fwd = self.relay.open(
            "ioexit", conn.id, msg.seq, vm.owner, self._clock() + self.relay_timeout
        )
        self._send(
            vm.owner,
            wire.IoExitNotice(
                token=fwd.token,
                vm=vm.id,
                pio=msg.pio,
                write=msg.write,
                len=msg.len,
                addr=msg.addr,
                value=msg.value,
            ),
        )
        op.requester = None  # answered when the VMM is done

    def _io_exit_done(self, conn: Conn, msg: wire.IoExitDone, op: PendingOp) -> None:
        fwd = self.relay.answer(msg.token, conn.id, "ioexit")
        if fwd is None:
            raise _fail("ENOENT", f"no I/O exit {msg.token} is waiting for this connection")
        if msg.errno:
            self._send(
                fwd.requester,
                wire.Error(seq=fwd.seq, errno=msg.errno, text="the VMM refused the access"),
            )
        else:
            self._send(fwd.requester, wire.IoExitReply(seq=fwd.seq, value=msg.value))

    def _device_config(self, conn: Conn, msg: wire.DeviceConfig, op: PendingOp) -> None:
        dev = self._own_device(conn, msg.device)
        if dev.process is None:
            raise _fail("ENOTCONN", f"device {dev.id} has no process attached")
        fwd = self.relay.open(
            "config", conn.id, msg.seq, dev.process, self._clock() + self.relay_timeout
        )
        self._send(dev.process, wire.DeviceConfigNotice(token=fwd.token, text=msg.text))
        op.requester = None  # answered when the device process is done

    def _device_config_done(self, conn: Conn, msg: wire.DeviceConfigDone, op: PendingOp) -> None:
        fwd = self.relay.answer(msg.token, conn.id, "config")
        if fwd is None:
            raise _fail("ENOENT", f"no configuration {msg.token} is waiting for this connection")
        reply: wire.Message = (
            wire.Ok(seq=fwd.seq)
            if not msg.errno
            else wire.Error(seq=fwd.seq, errno=msg.errno, text=msg.text or "the device refused")
        )
        self._send(fwd.requester, reply)

    def _device_report(self, conn: Conn, msg: wire.DeviceReport, op: PendingOp) -> None:
        dev = self.devices.get(conn.target) if conn.scope is Scope.DEVICE else None
        if dev is None or dev.process != conn.id:
            raise _fail("EPERM", "only an attached device process reports")
        self._send(dev.owner, wire.DeviceReportNotice(device=dev.id, text=msg.text))

    # ----------------------------------------------------------------- introspection

    def snapshot(self) -> dict[str, Any]:
        """Everything the broker owns, as plain JSON-able data (for tests and in-process
        use; clients page through it with ``GetState``)."""
        return introspect.snapshot(self)

    def is_empty(self) -> bool:
        """No objects, VMs, devices or pending detaches (connections may remain)."""
        return not (self.objects or self.vms or self.devices or self._detaching)


def _with_seq(msg: wire.Message, seq: int) -> wire.Message:
    """Replies echo the request's sequence number."""
    return dataclasses.replace(msg, seq=seq)
