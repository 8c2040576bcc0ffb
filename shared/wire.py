"""The control protocol: a sans-IO codec (bytes + fds in, typed messages out).

No sockets here. :func:`encode` turns a message into ``(bytes, fds)``; :func:`decode`
turns one received SOCK_SEQPACKET datagram and the fds that came with it into a typed
message, or raises :class:`~shared.errors.ProtocolError` after closing every fd.

Frame layout (all little-endian)::

    offset size field
         0    2 version    PROTOCOL_VERSION; anything else is rejected
         2    2 type       a key of MESSAGE_TYPES
         4    2 flags      FLAG_REPLY; every other bit is reserved and must be 0
         6    1 nfds       number of SCM_RIGHTS fds that travel with the frame
         7    1 reserved   must be 0
         8    4 seq        request sequence number; a reply echoes its request's
        12    4 length     payload bytes that follow the header
        16    .. payload   the type's fixed fields, then (text types only) UTF-8 text

Each message type declares its direction (request, reply or notice), its fixed payload
layout (struct codes on its fields), its exact fd count and whether a text tail
follows. Decoding rejects: short headers, wrong versions, set reserved bits, a reply bit
that does not match the type, unknown types, a length field that disagrees with the
datagram, oversize frames, payload sizes that do not match the layout, invalid UTF-8,
and any fd count other than the type's.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from shared.errors import ProtocolError, UsageError
from shared.fds import MAX_FDS_PER_MESSAGE, OwnedFd, close_all

PROTOCOL_VERSION = 1
FLAG_REPLY = 0x0001
KNOWN_FLAGS = FLAG_REPLY

HEADER_LAYOUT: tuple[tuple[str, str], ...] = (
    ("version", "H"),
    ("type", "H"),
    ("flags", "H"),
    ("nfds", "B"),
    ("reserved", "B"),
    ("seq", "I"),
    ("length", "I"),
)
HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_LAYOUT))
MAX_PAYLOAD = 60 * 1024
MAX_FRAME = HEADER.size + MAX_PAYLOAD
SEQ_MASK = 0xFFFFFFFF


class Kind(enum.Enum):
    REQUEST = "request"
    REPLY = "reply"
    NOTICE = "notice"


# ----------------------------------------------------------------------------- fields


def _wire(code: str, default: Any = MISSING) -> Any:
    """A payload field encoded with struct ``code`` (``B H I Q`` unsigned, little-endian)."""
    if default is MISSING:
        return field(metadata={"code": code})
    return field(default=default, metadata={"code": code})


def u8(default: Any = MISSING) -> Any:
    return _wire("B", default)


def u32(default: Any = MISSING) -> Any:
    return _wire("I", default)


def u64(default: Any = MISSING) -> Any:
    return _wire("Q", default)


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message. ``seq`` pairs replies with requests; ``fds`` are owned."""

    TYPE: ClassVar[int] = -1
    KIND: ClassVar[Kind] = Kind.REQUEST
    NFDS: ClassVar[int] = 0
    TEXT: ClassVar[bool] = False
    NO_REPLY: ClassVar[bool] = False  # a request the broker never answers (acknowledgements)
    _STRUCT: ClassVar[struct.Struct] = struct.Struct("<")
    _NAMES: ClassVar[tuple[str, ...]] = ()

    seq: int = 0
    fds: tuple[OwnedFd, ...] = ()

    def close_fds(self) -> None:
        close_all(self.fds)


MESSAGE_TYPES: dict[int, type[Message]] = {}
M = TypeVar("M", bound=type[Message])


def message(type_code: int, kind: Kind, *, nfds: int = 0, text: bool = False) -> Callable[[M], M]:
    """Register a message class in :data:`MESSAGE_TYPES` and compile its layout."""

    def register(cls: M) -> M:
        if type_code in MESSAGE_TYPES:
            raise UsageError(f"duplicate message type {type_code}")
        if not 0 <= nfds <= MAX_FDS_PER_MESSAGE:
            raise UsageError(f"{cls.__name__}: bad fd count {nfds}")
        if "__dataclass_fields__" not in cls.__dict__:
            raise UsageError(f"{cls.__name__} must be a @dataclass(frozen=True, kw_only=True)")
        wire_fields = [f for f in fields(cls) if "code" in f.metadata]
        cls.TYPE, cls.KIND, cls.NFDS, cls.TEXT = type_code, kind, nfds, text
        cls._STRUCT = struct.Struct("<" + "".join(f.metadata["code"] for f in wire_fields))
        cls._NAMES = tuple(f.name for f in wire_fields)
        MESSAGE_TYPES[type_code] = cls
        return cls

    return register


# ----------------------------------------------------------------------------- codec


def encode(msg: Message) -> tuple[bytes, list[int]]:
    """Serialize ``msg``; the returned fd numbers still belong to ``msg``."""
    cls = type(msg)
    if cls.TYPE not in MESSAGE_TYPES or MESSAGE_TYPES[cls.TYPE] is not cls:
        raise UsageError(f"{cls.__name__} is not a registered message type")
    if len(msg.fds) != cls.NFDS:
        raise UsageError(f"{cls.__name__} carries exactly {cls.NFDS} fds, got {len(msg.fds)}")
    try:
        payload = cls._STRUCT.pack(*(getattr(msg, n) for n in cls._NAMES))
    except struct.error as e:
        raise UsageError(f"{cls.__name__}: field out of range: {e}") from e
    if cls.TEXT:
        try:
            payload += str(getattr(msg, "text")).encode()  # noqa: B009 - text types only
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from os.fsdecode()
            raise UsageError(f"{cls.__name__}: text is not encodable as UTF-8: {e}") from e
    if len(payload) > MAX_PAYLOAD:
        raise UsageError(f"{cls.__name__}: payload {len(payload)} > {MAX_PAYLOAD} bytes")
    if not 0 <= msg.seq <= SEQ_MASK:
        raise UsageError(f"seq {msg.seq} out of range")
    flags = FLAG_REPLY if cls.KIND is Kind.REPLY else 0
    header = HEADER.pack(PROTOCOL_VERSION, cls.TYPE, flags, cls.NFDS, 0, msg.seq, len(payload))
    return header + payload, [f.fileno() for f in msg.fds]


@dataclass(frozen=True)
class FrameHeader:
    version: int
    type: int
    flags: int
    nfds: int
    reserved: int
    seq: int
    length: int


def peek_header(data: bytes) -> FrameHeader | None:
    """The header fields if at least a header's worth of bytes is present (no checks)."""
    if len(data) < HEADER.size:
        return None
    return FrameHeader(*HEADER.unpack_from(data))


def decode(data: bytes, fds: Sequence[OwnedFd] = ()) -> Message:
    """Parse one frame. Takes ownership of ``fds``: on any error they are all closed."""
    try:
        return _decode(data, fds)
    except ProtocolError:
        close_all(fds)
        raise


def _decode(data: bytes, fds: Sequence[OwnedFd]) -> Message:
    h = peek_header(data)
    if h is None:
        raise ProtocolError(f"truncated header: {len(data)} of {HEADER.size} bytes")
    if h.version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {h.version}, expected {PROTOCOL_VERSION}")
    if h.flags & ~KNOWN_FLAGS or h.reserved:
        raise ProtocolError(f"reserved bits set (flags={h.flags:#x}, reserved={h.reserved:#x})")
    if h.length > MAX_PAYLOAD:
        raise ProtocolError(f"oversize payload: {h.length} > {MAX_PAYLOAD} bytes")
    if h.length != len(data) - HEADER.size:
        raise ProtocolError(
            f"length field says {h.length} bytes but {len(data) - HEADER.size} arrived"
        )
    cls = MESSAGE_TYPES.get(h.type)
    if cls is None:
        raise ProtocolError(f"unknown message type {h.type}")
    if bool(h.flags & FLAG_REPLY) != (cls.KIND is Kind.REPLY):
        raise ProtocolError(f"{cls.__name__}: reply bit does not match a {cls.KIND.value}")
    if h.nfds != cls.NFDS or len(fds) != cls.NFDS:
        raise ProtocolError(
            f"{cls.__name__} carries exactly {cls.NFDS} fds; header says {h.nfds}, "
            f"{len(fds)} arrived"
        )
    payload = data[HEADER.size :]
    fixed = cls._STRUCT.size
    if len(payload) < fixed or (not cls.TEXT and len(payload) != fixed):
        raise ProtocolError(f"{cls.__name__}: payload is {len(payload)} bytes, layout is {fixed}")
    kwargs: dict[str, Any] = dict(zip(cls._NAMES, cls._STRUCT.unpack_from(payload), strict=True))
    if cls.TEXT:
        try:
            kwargs["text"] = payload[fixed:].decode()
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{cls.__name__}: text is not UTF-8: {e}") from e
    return cls(seq=h.seq, fds=tuple(fds), **kwargs)


# ----------------------------------------------------------------------------- constants


class Scope(enum.IntEnum):
    """What a connection may act on."""

    HOST = 0  # a VMM/tool on the listening socket: may create objects
    VM = 1  # a guest process' channel: only its own VM
    DEVICE = 2  # a device process' channel: only its own device


class Policy(enum.IntEnum):
    """Release policy."""

    HUP = 0  # Linux as merged: last handle closed -> HUP to irqfd/shm-signal bindings
    REFCOUNT = 1  # the 2009 proposal: bindings keep the eventfd alive until DEASSIGN


class DetachReason(enum.IntEnum):
    DEASSIGN = 0  # explicit deassign
    HUP = 1  # last handle closed under the hup policy
    TEARDOWN = 2  # the VM or device was destroyed or its owner left


class StateSection(enum.IntEnum):
    """What :class:`GetState` pages through. Items are listed in cursor order: ids for the
    tables, ``conn << 32 | handle`` for handles; SUMMARY is one item (policy, process,
    counts)."""

    SUMMARY = 0
    CONNECTIONS = 1
    HANDLES = 2
    OBJECTS = 3
    VMS = 4
    DEVICES = 5
    BINDINGS = 6


def assemble_state(items: Callable[[StateSection], list[dict[str, Any]]]) -> dict[str, Any]:
    """One dict of every section: the summary's keys, plus ``connections`` (each with its
    ``handles`` as ``{handle: object id}``), ``objects``, ``vms``, ``devices``, ``bindings``."""
    state: dict[str, Any] = dict(items(StateSection.SUMMARY)[0])
    conns = items(StateSection.CONNECTIONS)
    by_conn = {c["id"]: c for c in conns}
    for c in conns:
        c["handles"] = {}
    for h in items(StateSection.HANDLES):
        if h["conn"] in by_conn:  # a connection that came between two pages
            by_conn[h["conn"]]["handles"][str(h["handle"])] = h["object"]
    state["connections"] = conns
    for section in (
        StateSection.OBJECTS,
        StateSection.VMS,
        StateSection.DEVICES,
        StateSection.BINDINGS,
    ):
        state[section.name.lower()] = items(section)
    return state


class PeerKind(enum.IntEnum):
    HOST = 0
    GUEST = 1
    DEVICE = 2
    VM = 3  # the VM object itself was destroyed


EFD_FLAG_SEMAPHORE = 0x1
IRQFD_FLAG_DEASSIGN = 0x1
IRQFD_FLAG_RESAMPLE = 0x2
IOEVENTFD_FLAG_DATAMATCH = 0x1
IOEVENTFD_FLAG_PIO = 0x2
IOEVENTFD_FLAG_DEASSIGN = 0x4
IOEVENTFD_FLAG_VIRTIO_CCW_NOTIFY = 0x8  # KVM's s390 notify bus: never reached on x86
IOEVENTFD_FLAG_FAST_MMIO = 0x10  # in KVM's valid mask; inert from userspace
SHMSIGNAL_FLAG_DEASSIGN = 0x1
KICKFD_FLAG_DEASSIGN = 0x1
MAX_QUEUES = 64
NO_HANDLE = 0xFFFFFFFF

# ----------------------------------------------------------------------------- requests
R, P, N = Kind.REQUEST, Kind.REPLY, Kind.NOTICE


@message(1, R)
@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """First request on any connection: who am I and what may I do."""


@message(2, R)
@dataclass(frozen=True, kw_only=True)
class Ping(Message):
    token: int = u64(0)


@message(3, R)
@dataclass(frozen=True, kw_only=True)
class GetState(Message):
    """Introspection, one page at a time: up to ``limit`` items (0: the broker's default)
    of one :class:`StateSection` whose cursor is past ``after`` (0: from the start)."""

    section: int = u32(0)
    limit: int = u32(0)
    after: int = u64(0)


@message(4, R)
@dataclass(frozen=True, kw_only=True)
class EventfdCreate(Message):
    flags: int = u32(0)
    initval: int = u64(0)


@message(5, R, nfds=1)
@dataclass(frozen=True, kw_only=True)
class EventfdImport(Message):
    """Hand the broker a real eventfd; it keeps a dup and returns a handle."""


@message(6, R, nfds=1)
@dataclass(frozen=True, kw_only=True)
class MemoryImport(Message):
    """Hand the broker a shared-memory fd of at least ``size`` bytes."""

    size: int = u64()


@message(7, R)
@dataclass(frozen=True, kw_only=True)
class HandleDup(Message):
    handle: int = u32()


@message(8, R)
@dataclass(frozen=True, kw_only=True)
class HandleClose(Message):
    handle: int = u32()


@message(9, R)
@dataclass(frozen=True, kw_only=True)
class HandleGetFd(Message):
    """A dup of the real fd behind a handle (an extra file reference the broker can't see)."""

    handle: int = u32()


@message(10, R)
@dataclass(frozen=True, kw_only=True)
class VmCreate(Message):
    ngsi: int = u32()


@message(11, R)
@dataclass(frozen=True, kw_only=True)
class VmDestroy(Message):
    vm: int = u32()


@message(12, R)
@dataclass(frozen=True, kw_only=True)
class IrqchipCreate(Message):
    vm: int = u32()


@message(13, R)
@dataclass(frozen=True, kw_only=True)
class MemslotSet(Message):
    """KVM_SET_USER_MEMORY_REGION: ``size == 0`` deletes the slot."""

    vm: int = u32()
    slot: int = u32()
    gpa: int = u64()
    size: int = u64()
    offset: int = u64(0)
    handle: int = u32(NO_HANDLE)


@message(14, R)
@dataclass(frozen=True, kw_only=True)
class DeviceCreate(Message):
    vm: int = u32()
    nsignals: int = u32()


@message(15, R)
@dataclass(frozen=True, kw_only=True)
class DeviceDestroy(Message):
    device: int = u32()


@message(16, R)
@dataclass(frozen=True, kw_only=True)
class Irqfd(Message):
    vm: int = u32()
    handle: int = u32()
    gsi: int = u32()
    flags: int = u32(0)
    resample_handle: int = u32(NO_HANDLE)


@message(17, R)
@dataclass(frozen=True, kw_only=True)
class Ioeventfd(Message):
    vm: int = u32()
    handle: int = u32()
    flags: int = u32(0)
    len: int = u32()
    addr: int = u64()
    datamatch: int = u64(0)


@message(18, R)
@dataclass(frozen=True, kw_only=True)
class ShmSignal(Message):
    device: int = u32()
    sigid: int = u32()
    handle: int = u32()
    flags: int = u32(0)


@message(19, R)
@dataclass(frozen=True, kw_only=True)
class ChannelOpen(Message):
    """Ask for a pre-connected socket scoped to one VM or device (returned as an fd)."""

    scope: int = u32()
    target: int = u32()


@message(20, R)
@dataclass(frozen=True, kw_only=True)
class Attach(Message):
    """On a scoped channel: become the VM's guest / the device's process."""


@message(21, R)
@dataclass(frozen=True, kw_only=True)
class DetachAck(Message):
    """Sent (no reply) once a binding is fully detached in this process."""

    NO_REPLY = True

    binding: int = u64()


@message(22, R)
@dataclass(frozen=True, kw_only=True)
class DeviceKickfd(Message):
    """Like vhost-user SET_VRING_KICK: the device process consumes this eventfd as the
    doorbell of ``queue`` (the same eventfd the VMM binds as the queue's ioeventfd)."""

    device: int = u32()
    queue: int = u32()
    handle: int = u32()
    flags: int = u32(0)


@message(23, R)
@dataclass(frozen=True, kw_only=True)
class IoExit(Message):
    """A guest MMIO/PIO access no ioeventfd caught: an exit to the VMM, answered
    synchronously with :class:`IoExitReply` (the value read, or 0 for a write)."""

    pio: int = u32(0)
    write: int = u32(0)
    len: int = u32()
    addr: int = u64()
    value: int = u64(0)


ACCESS_WIDTHS = (1, 2, 4, 8)
ADDRESS_SPACE = 1 << 64


def access_error(length: int, addr: int, value: int = 0) -> str | None:
    """Why an MMIO/PIO access is not one a CPU can make, or None. Its width is 1, 2, 4 or
    8 bytes, it does not run past the end of the address space, and the value written
    fits the width (a 1-byte write carries one byte: ``0x1ff`` is not a 1-byte value)."""
    if length not in ACCESS_WIDTHS:
        return f"an access is 1, 2, 4 or 8 bytes wide, not {length}"
    if addr + length > ADDRESS_SPACE:
        return f"{length} bytes at {addr:#x} run past the end of the address space"
    if value >> (8 * length):
        return f"value {value:#x} does not fit a {length}-byte access"
    return None


@message(24, R)
@dataclass(frozen=True, kw_only=True)
class IoExitDone(Message):
    """The VMM's answer to :class:`IoExitNotice` ``token`` (errno 0 = success)."""

    token: int = u64()
    value: int = u64(0)
    errno: int = u32(0)


@message(25, R, text=True)
@dataclass(frozen=True, kw_only=True)
class DeviceConfig(Message):
    """VMM -> device process (through the broker), like vhost-user SET_VRING_ADDR: a JSON
    document; the reply waits for the device's :class:`DeviceConfigDone`."""

    device: int = u32()
    text: str = ""


@message(26, R, text=True)
@dataclass(frozen=True, kw_only=True)
class DeviceConfigDone(Message):
    """The device's answer to :class:`DeviceConfigNotice` ``token`` (no reply)."""

    NO_REPLY = True
    token: int = u64()
    errno: int = u32(0)
    text: str = ""


@message(27, R, text=True)
@dataclass(frozen=True, kw_only=True)
class DeviceReport(Message):
    """Device process -> its VMM: a JSON event (queue broken, counters ...)."""

    text: str = ""


# ----------------------------------------------------------------------------- replies


@message(64, P)
@dataclass(frozen=True, kw_only=True)
class Ok(Message):
    pass


@message(65, P, text=True)
@dataclass(frozen=True, kw_only=True)
class Error(Message):
    errno: int = u32()
    text: str = ""


@message(66, P)
@dataclass(frozen=True, kw_only=True)
class HandleReply(Message):
    handle: int = u32()


@message(67, P)
@dataclass(frozen=True, kw_only=True)
class IdReply(Message):
    """The id of a created VM, device or binding."""

    id: int = u64()


@message(68, P)
@dataclass(frozen=True, kw_only=True)
class Pong(Message):
    token: int = u64()


@message(69, P, text=True)
@dataclass(frozen=True, kw_only=True)
class StateReply(Message):
    """A page of a :class:`StateSection`: ``text`` is a JSON list of items; ``next`` is the
    cursor to ask ``after`` for the next page, 0 when the section is complete."""

    section: int = u32()
    next: int = u64()
    text: str = ""


@message(70, P, nfds=1)
@dataclass(frozen=True, kw_only=True)
class FdReply(Message):
    pass


@message(71, P)
@dataclass(frozen=True, kw_only=True)
class HelloReply(Message):
    client: int = u32()
    policy: int = u32()
    scope: int = u32()
    target: int = u32()
    broker_pid: int = u32()


@message(72, P)
@dataclass(frozen=True, kw_only=True)
class IoExitReply(Message):
    value: int = u64(0)


# ----------------------------------------------------------------------------- notices


@message(128, N, nfds=1)
@dataclass(frozen=True, kw_only=True)
class IrqfdAttach(Message):
    """To a VM's guest: deliver ``gsi`` when this eventfd fires (edge)."""

    binding: int = u64()
    gsi: int = u32()


@message(129, N, nfds=2)
@dataclass(frozen=True, kw_only=True)
class IrqfdAttachResample(Message):
    """To a VM's guest: level-triggered ``gsi``; fds are (eventfd, resamplefd)."""

    binding: int = u64()
    gsi: int = u32()


@message(130, N, nfds=1)
@dataclass(frozen=True, kw_only=True)
class IoeventfdAttach(Message):
    """To a VM's guest: a matching MMIO/PIO write signals this eventfd directly."""

    binding: int = u64()
    addr: int = u64()
    datamatch: int = u64()
    len: int = u32()
    flags: int = u32()


@message(131, N, nfds=1)
@dataclass(frozen=True, kw_only=True)
class ShmSignalAttach(Message):
    """To a device process: signal this eventfd for shm-signal ``sigid``."""

    binding: int = u64()
    sigid: int = u32()


@message(132, N)
@dataclass(frozen=True, kw_only=True)
class Detach(Message):
    """Stop using ``binding`` now, then send :class:`DetachAck` (reason: DetachReason)."""

    binding: int = u64()
    reason: int = u32()


@message(133, N)
@dataclass(frozen=True, kw_only=True)
class PeerGone(Message):
    """A peer or object this connection depends on went away (kind: PeerKind)."""

    kind: int = u32()
    id: int = u32()


@message(134, N, nfds=1)
@dataclass(frozen=True, kw_only=True)
class KickfdAttach(Message):
    """To a device process: this eventfd is the doorbell of ``queue``."""

    binding: int = u64()
    queue: int = u32()


@message(135, N, nfds=1)
@dataclass(frozen=True, kw_only=True)
class MemslotAttach(Message):
    """To a VM's guest and device processes: guest memory ``[gpa, gpa+size)`` is the
    shared-memory object in the fd, from byte ``offset`` (like vhost-user SET_MEM_TABLE)."""

    slot: int = u32()
    gpa: int = u64()
    size: int = u64()
    offset: int = u64()


@message(136, N)
@dataclass(frozen=True, kw_only=True)
class MemslotDetach(Message):
    slot: int = u32()


@message(137, N)
@dataclass(frozen=True, kw_only=True)
class IoExitNotice(Message):
    """To a VM's owner (the VMM): handle this access, then send :class:`IoExitDone`."""

    token: int = u64()
    vm: int = u32()
    pio: int = u32()
    write: int = u32()
    len: int = u32()
    addr: int = u64()
    value: int = u64()


@message(138, N, text=True)
@dataclass(frozen=True, kw_only=True)
class DeviceConfigNotice(Message):
    """To a device process: apply this JSON configuration, then send DeviceConfigDone."""

    token: int = u64()
    text: str = ""


@message(139, N, text=True)
@dataclass(frozen=True, kw_only=True)
class DeviceReportNotice(Message):
    device: int = u32()
    text: str = ""


@message(140, N)
@dataclass(frozen=True, kw_only=True)
class PeerAttached(Message):
    """To an owner: a guest (kind GUEST, id = VM) or device process (DEVICE) attached."""

    kind: int = u32()
    id: int = u32()


# ----------------------------------------------------------------------------- relays

RELAYED_TEXT: dict[type[Message], type[Message]] = {
    DeviceConfig: DeviceConfigNotice,  # VMM -> broker -> device process
    DeviceReport: DeviceReportNotice,  # device process -> broker -> VMM
}
"""Requests whose text the broker forwards inside another message type. A text that fills
the request's payload can be too long for the forwarded message (its fixed part may be
larger), so the broker refuses such a request (``EMSGSIZE``) instead of building a frame
it cannot encode: see :func:`relay_overflow`. (A DeviceConfigDone's text is forwarded in
an :class:`Error`, whose fixed part is smaller: it always fits.)"""


def text_room(cls: type[Message]) -> int:
    """How many bytes of UTF-8 text fit in a frame of text type ``cls``."""
    if not cls.TEXT:
        raise UsageError(f"{cls.__name__} carries no text")
    return MAX_PAYLOAD - cls._STRUCT.size


def relay_overflow(msg: Message) -> str | None:
    """Why ``msg``'s text cannot be forwarded in its :data:`RELAYED_TEXT` message, or
    ``None`` if it can (or ``msg`` is not relayed)."""
    relayed_as = RELAYED_TEXT.get(type(msg))
    if relayed_as is None:
        return None
    size = len(str(getattr(msg, "text")).encode())  # noqa: B009 - text types only
    room = text_room(relayed_as)
    if size <= room:
        return None
    return (
        f"{type(msg).__name__}: {size} bytes of text do not fit the {room} a "
        f"{relayed_as.__name__} carries"
    )


def describe(msg: Message) -> str:
    """One-line human form for logs: ``IrqfdAttach(seq=3, binding=1, gsi=5, fds=1)``."""
    cls = type(msg)
    parts = [f"seq={msg.seq}"] + [f"{n}={getattr(msg, n)}" for n in cls._NAMES]
    if cls.TEXT:
        parts.append(f"text={getattr(msg, 'text')!r}")  # noqa: B009 - text types only
    if cls.NFDS:
        parts.append(f"fds={len(msg.fds)}")
    return f"{cls.__name__}({', '.join(parts)})"
