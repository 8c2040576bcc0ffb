"""The broker's objects: kernel objects with their two reference counts, bindings, VMs,
devices, connections and in-flight operations. Plain data; the rules live in
:mod:`hostemu.broker.table`.

Invariants (kept by the table)
------------------------------
* ``KernelObject.handles`` equals the number of connection handles naming the object and
  ``ctx_refs`` the number of non-released bindings (and memory slots) referencing it.
* A binding is ``active`` while it is in its VM's / device's indexes, ``detaching`` from
  the moment it is unhooked until its consumer acknowledges, then ``released``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from hostemu.broker.idmap import IdMap
from shared import wire
from shared.fds import OwnedFd
from shared.wire import Scope


@dataclass(eq=False)
class KernelObject:
    """A real fd the broker owns, with its two reference counts."""

    id: int
    fd: OwnedFd
    handles: int = 0
    ctx_refs: int = 0

    @property
    def kind(self) -> str:
        raise NotImplementedError


@dataclass(eq=False)
class EventfdObj(KernelObject):
    kernel_id: int = -1
    semaphore: bool = False
    irqfd: IrqfdBinding | None = None  # the one irqfd (as trigger) allowed per eventfd
    bindings: dict[int, Binding] = field(default_factory=dict)  # active and detaching

    @property
    def kind(self) -> str:
        return "eventfd"


@dataclass(eq=False)
class MemoryObj(KernelObject):
    size: int = 0

    @property
    def kind(self) -> str:
        return "memory"


@dataclass(eq=False, kw_only=True)
class Binding:
    id: int
    eventfd: EventfdObj
    consumer: int | None = None  # connection that holds a copy and must ack a detach
    state: str = "active"  # active -> detaching -> released

    kind = "binding"

    def refs(self) -> list[EventfdObj]:
        return [self.eventfd]


@dataclass(eq=False, kw_only=True)
class IrqfdBinding(Binding):
    vm: Vm
    gsi: int
    resample: EventfdObj | None = None
    kind = "irqfd"

    def refs(self) -> list[EventfdObj]:
        return [self.eventfd] + ([self.resample] if self.resample else [])


@dataclass(eq=False, kw_only=True)
class IoeventfdBinding(Binding):
    vm: Vm
    bus: str  # "mmio", "pio" or "ccw" (virtio-ccw notify: an x86 guest never reaches it)
    addr: int
    length: int
    datamatch: int | None  # None: wildcard
    kind = "ioeventfd"

    @property
    def pio(self) -> bool:
        return self.bus == "pio"


@dataclass(eq=False, kw_only=True)
class ShmSignalBinding(Binding):
    device: Device
    sigid: int
    kind = "shmsignal"


@dataclass(eq=False, kw_only=True)
class KickfdBinding(Binding):
    """A queue doorbell consumed by the device process. Like vhost's kick it holds the
    file (``eventfd_fget``), so it has no HUP path."""

    device: Device
    queue: int
    kind = "kickfd"


@dataclass(eq=False)
class Memslot:
    slot: int
    gpa: int
    size: int
    offset: int
    memory: MemoryObj


@dataclass(eq=False)
class Vm:
    id: int
    owner: int
    ngsi: int
    irqchip: bool = False
    guest: int | None = None
    irqfds: dict[int, IrqfdBinding] = field(default_factory=dict)
    ioeventfds: dict[tuple[str, int], list[IoeventfdBinding]] = field(default_factory=dict)
    memslots: dict[int, Memslot] = field(default_factory=dict)
    devices: dict[int, Device] = field(default_factory=dict)

    def bindings(self) -> Iterator[Binding]:
        yield from self.irqfds.values()
        for bucket in self.ioeventfds.values():
            yield from bucket


@dataclass(eq=False)
class Device:
    id: int
    owner: int
    vm: Vm
    nsignals: int
    process: int | None = None
    attaches: int = 0  # processes that attached so far (> 1: it was restarted)
    signals: dict[int, ShmSignalBinding] = field(default_factory=dict)
    kicks: dict[int, KickfdBinding] = field(default_factory=dict)

    def bindings(self) -> Iterator[Binding]:
        yield from self.signals.values()
        yield from self.kicks.values()


@dataclass(eq=False)
class Conn:
    id: int
    pid: int
    uid: int
    scope: Scope
    target: int
    handles: IdMap[KernelObject] = field(default_factory=IdMap)
    next_handle: int = 0
    vms: dict[int, Vm] = field(default_factory=dict)
    devices: dict[int, Device] = field(default_factory=dict)
    nbindings: int = 0  # bindings in its VMs and devices, counted against its quota
    nmemslots: int = 0  # memory slots in its VMs, counted against its quota


@dataclass(eq=False)
class PendingOp:
    """A request whose reply waits for detach acknowledgements."""

    requester: int | None
    reply: wire.Message | None
    waiting: set[int] = field(default_factory=set)


@dataclass(eq=False)
class Detaching:
    binding: Binding
    consumer: int
    deadline: float
    ops: list[PendingOp] = field(default_factory=list)


@dataclass(eq=False)
class Forward:
    """A request relayed to another process (an I/O exit to the VMM, a configuration to a
    device process) whose reply waits for that process's answer."""

    token: int
    kind: str  # "ioexit" | "config"
    requester: int | None  # None once the requester is gone
    seq: int
    responder: int
    deadline: float
