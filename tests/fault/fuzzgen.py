"""The pure half of the control-protocol fuzzer: cases and a model.

Nothing here opens a socket or an fd. :func:`generate` turns ``(seed, index)`` into a
:class:`Case` -- a short list of frames, each aimed at one endpoint -- and :func:`verdict`
says, from the bytes and the number of fds alone, what the broker must do with a frame.
The harness in ``test_control_fuzz.py`` sends the cases to a real broker and checks it.

Structure-aware generation
--------------------------
Every frame starts as a *valid* message of a registered type (:data:`shared.wire.MESSAGE_TYPES`
is enumerated, so a new type is fuzzed without touching this file): each wire field gets a
plausible value from a pool keyed by the field's name (ids and handles of the fuzzer's
own objects, of *another* connection's objects and of objects that do not exist; ranges'
edges; unaligned, overlapping, zero and huge sizes), the fds the type expects, and a text
tail for text types. Ids are *symbols* (``"world.vm"``, ``"victim.handle"`` ...) that the
harness resolves when it sends, so a case does not depend on the ids the broker happened
to hand out. Then 0-3 :data:`MUTATIONS` are applied: truncation, extension, oversize
frames, a lying length field, wrong versions, unknown and confused types, the reply bit,
reserved flag bits and bytes, a header fd count that disagrees with the real fds, bit
flips, invalid UTF-8, fds of the wrong type, missing or extra fds, more fds than the
receiver's buffer holds (up to ``SCM_MAX_FD``), fds spread over several cmsgs, torn
SCM_RIGHTS payloads, an SCM_CREDENTIALS cmsg, and a field redrawn over its whole width.
A quarter of the cases are *sequences* of 2-5 mostly valid frames over several endpoints
(host, a fresh bare connection, a scoped guest or device channel, attached or not), which
is how messages out of order happen: Attach twice, Attach on a host channel, DetachAck
or IoExitDone with nothing pending, requests on a channel whose VM was just destroyed.
One case in twenty is a *burst*: up to :data:`MAX_BURST` frames pipelined on a bare
connection without waiting for replies.

Reproducing
-----------
``random.Random(f"{seed}:{index}")`` drives one case, so case *i* of seed *s* is the same
on every machine and does not depend on the cases before it.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import random
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shared import wire
from shared.fds import EVENTFD_MAX, MAX_FDS_PER_MESSAGE

SCM_MAX_FD = 253
"""Linux refuses (EINVAL) a sendmsg carrying more fds than this, over all its cmsgs."""

Value = int | str
"""A field value: a number, or a symbol from :data:`SYMBOLS` resolved at send time."""

ABSENT_ID = 0x7FFF_FFF0
"""An id no broker object has (the broker counts up from 1)."""

SYMBOLS = (
    # the fuzzer's own host connection ("the world") and what it set up
    "world.vm",
    "world.device",
    "world.efd",
    "world.efd2",
    "world.efd3",
    "world.mem",
    "world.free_handle",
    "world.irqfd",
    "world.ioeventfd",
    "world.shmsignal",
    "world.kickfd",
    # another connection's objects ("the victim"): they must stay untouchable
    "victim.vm",
    "victim.device",
    "victim.handle",
    "victim.irqfd",
    "victim.ioeventfd",
    "victim.shmsignal",
    "victim.kickfd",
    "absent",
)

# Endpoints a frame can be sent on (the harness opens them on first use in a case).
HOST = "host"  # the world's host connection: owns a VM, a device, handles, bindings
BARE = "bare"  # a fresh host connection that set nothing up
GUEST = "guest"  # a scoped channel to the world's VM, not attached
GUEST_ATTACHED = "guest+attached"  # ... attached (it consumes the VM's bindings)
DEVICE = "device"  # a scoped channel to the world's device, not attached
DEVICE_ATTACHED = "device+attached"
ENDPOINTS = (HOST, BARE, GUEST, GUEST_ATTACHED, DEVICE, DEVICE_ATTACHED)
SCOPED = frozenset({GUEST, GUEST_ATTACHED, DEVICE, DEVICE_ATTACHED})

U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF
TOP = 1 << 64
PAGE = 0x1000

# Per field name: the value most likely to be accepted first (so that frames get past the
# first checks and reach deep states), then the interesting wrong ones.
POOLS: dict[str, tuple[Value, ...]] = {
    "vm": ("world.vm", "victim.vm", "world.device", "absent", 0),
    "device": ("world.device", "victim.device", "world.vm", "absent", 0),
    "target": ("world.vm", "world.device", "victim.vm", "victim.device", "absent", 0),
    # world.efd is bound (irqfd gsi 1, shm-signal 0), world.efd2 too (ioeventfd 0x2000,
    # kickfd queue 0), world.efd3 is free; victim.handle is open only on the victim
    "handle": (
        "world.efd3",
        "world.efd",
        "world.efd2",
        "world.mem",
        "victim.handle",
        "world.free_handle",
        wire.NO_HANDLE,
        0,
    ),
    "resample_handle": ("world.efd2", "world.efd3", "world.mem", "victim.handle", wire.NO_HANDLE),
    "binding": (
        "world.irqfd",
        "world.ioeventfd",
        "world.shmsignal",
        "world.kickfd",
        "victim.irqfd",
        "victim.ioeventfd",
        "victim.shmsignal",
        "victim.kickfd",
        "absent",
        0,
        U64,
    ),
    "gsi": (2, 1, 0, 7, 8, 1023, 1024, U32),
    "ngsi": (8, 0, 1, 1024, 1025, U32),
    "nsignals": (4, 0, 1, 64, 65, U32),
    "sigid": (1, 0, 3, 4, 63, 64, U32),
    "queue": (1, 0, 63, 64, U32),
    "slot": (1, 0, 2, 511, 512, U32),
    # guest memory: the world's slot 0 is [0, 16 KiB) of a 64 KiB object
    "gpa": (4 * PAGE, 0, PAGE, 2 * PAGE, 16 * PAGE, PAGE - 1, 1 << 63, TOP - PAGE, U64),
    "size": (4 * PAGE, 0, PAGE, 2 * PAGE, 16 * PAGE, 17 * PAGE, PAGE + 1, 1 << 63, TOP - PAGE, U64),
    "offset": (0, PAGE, 12 * PAGE, 15 * PAGE, 16 * PAGE, PAGE + 1, TOP - PAGE, U32),
    "addr": (0x3000, 0x1000, 0x2000, 0x2004, 0, TOP - 1, TOP - 4, TOP - 8),
    "len": (4, 0, 1, 2, 3, 8, 16, U32),
    "datamatch": (0, 1, 2, U64),
    "flags": (0, 1, 2, 3, 4, 5, 6, 7, 8, 0x8000_0000, U32),
    "initval": (0, 1, U32, U32 + 1, EVENTFD_MAX, EVENTFD_MAX + 1),
    "token": (0, 1, "absent", U64),
    "errno": (0, 5, 22, U32),
    "scope": (1, 2, 0, 3, U32),
    "pio": (0, 1, 2),
    "write": (0, 1, 2),
    "value": (0, 1, U64),
}

# Where one type needs a different likely-valid value than the field name suggests.
TYPE_POOLS: dict[tuple[type[wire.Message], str], tuple[Value, ...]] = {
    (wire.MemslotSet, "handle"): ("world.mem", "world.efd3", "victim.handle", wire.NO_HANDLE),
    (wire.ShmSignal, "handle"): (
        "world.efd3",
        "world.efd",
        wire.NO_HANDLE,
        "world.mem",
        "victim.handle",
    ),
    (wire.DeviceKickfd, "handle"): (
        "world.efd3",
        "world.efd2",
        wire.NO_HANDLE,
        "world.mem",
        "victim.handle",
    ),
    (wire.ChannelOpen, "target"): (
        "world.vm",
        "world.device",
        "victim.vm",
        "victim.device",
        "absent",
    ),
}

# Valid text tails, from empty to exactly filling the payload ("room" is computed per type).
TEXTS: tuple[bytes, ...] = (
    b"",
    b"{}",
    b'{"queue": 0, "size": 8}',
    "h\u00e9 \u2603 \U0001f680".encode(),
    b"x" * 1000,
)
BAD_UTF8: tuple[bytes, ...] = (b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82")

UNKNOWN_TYPES = tuple(
    t for t in (0, 28, 63, 73, 127, 141, 255, 256, 0x7FFF, 0xFFFF) if t not in wire.MESSAGE_TYPES
)


class FdKind(enum.Enum):
    """What kind of real fd the harness makes for a frame."""

    EVENTFD = "eventfd"
    EVENTFD_SEMAPHORE = "eventfd-semaphore"
    KNOWN_EVENTFD = "known-eventfd"  # a dup of an eventfd the broker already owns
    MEMFD = "memfd-64k"
    MEMFD_SMALL = "memfd-4k"
    MEMFD_EMPTY = "memfd-0"
    MEMFD_SEALED = "memfd-64k-sealed"
    SHM = "posix-shm-64k"  # a /dev/shm object, unlinked at once
    MEMFD_READONLY = "memfd-64k-read-only"
    MEMFD_PATH = "memfd-64k-o-path"
    PIPE_READ = "pipe-read-end"
    PIPE_WRITE = "pipe-write-end"
    SOCKET = "socketpair-end"
    FILE = "regular-file"
    DIRECTORY = "directory"
    DEVNULL = "dev-null"
    EPOLL = "epoll"


EVENTFD_KINDS = (FdKind.EVENTFD, FdKind.EVENTFD_SEMAPHORE, FdKind.KNOWN_EVENTFD)
MEMORY_KINDS = (FdKind.MEMFD, FdKind.MEMFD_SMALL, FdKind.MEMFD_SEALED, FdKind.SHM)
RIGHT_FDS: dict[type[wire.Message], tuple[FdKind, ...]] = {
    wire.EventfdImport: EVENTFD_KINDS,
    wire.MemoryImport: MEMORY_KINDS,
}


def wrong_fds(cls: type[wire.Message]) -> tuple[FdKind, ...]:
    """Every fd kind that is not what ``cls`` expects (the memory kinds for an eventfd
    and the reverse included)."""
    right = RIGHT_FDS.get(cls, ())
    return tuple(k for k in FdKind if k not in right)


def wire_fields(cls: type[wire.Message]) -> tuple[tuple[str, str], ...]:
    """``(name, struct code)`` of every payload field of ``cls``, in wire order."""
    return tuple(
        (f.name, f.metadata["code"]) for f in dataclasses.fields(cls) if "code" in f.metadata
    )


def fixed_size(cls: type[wire.Message]) -> int:
    return struct.calcsize("<" + "".join(code for _, code in wire_fields(cls)))


def _mask(code: str) -> int:
    return (1 << (8 * struct.calcsize("<" + code))) - 1


# ------------------------------------------------------------------------------ frames


@dataclass(frozen=True)
class FrameSpec:
    """One datagram before symbols are resolved: a message plus what was done to it."""

    cls: type[wire.Message]
    values: tuple[tuple[str, Value], ...]
    text: bytes
    seq: int
    fds: tuple[FdKind, ...]
    version: int = wire.PROTOCOL_VERSION
    type: int | None = None  # None: cls.TYPE
    flags: int | None = None  # None: the reply bit iff cls is a reply
    nfds: int | None = None  # None: cls.NFDS (what a correct sender puts in the header)
    reserved: int = 0
    length: int | None = None  # None: the true payload length
    junk: bytes = b""  # appended after the payload
    junk_counted: bool = True  # whether the (true) length field includes the junk
    flips: tuple[int, ...] = ()  # bit numbers flipped in the rendered datagram
    cut: int | None = None  # the datagram is truncated to this many bytes
    groups: tuple[int, ...] | None = None  # fds per SCM_RIGHTS cmsg (None: one cmsg)
    torn: int = 0  # stray bytes appended to the last SCM_RIGHTS cmsg (not a whole int)
    creds: bool = False  # also send an SCM_CREDENTIALS cmsg
    mutations: tuple[str, ...] = ()

    def cmsg_groups(self) -> tuple[int, ...]:
        return self.groups if self.groups is not None else ((len(self.fds),) if self.fds else ())

    def header_flags(self) -> int:
        if self.flags is not None:
            return self.flags
        return wire.FLAG_REPLY if self.cls.KIND is wire.Kind.REPLY else 0

    def resolve(self, names: Mapping[str, int]) -> dict[str, int]:
        """The field values with symbols replaced (unknown symbols: :data:`ABSENT_ID`)."""
        codes = dict(wire_fields(self.cls))
        out: dict[str, int] = {}
        for name, value in self.values:
            number = names.get(value, ABSENT_ID) if isinstance(value, str) else value
            out[name] = number & _mask(codes[name])
        return out

    def render(self, names: Mapping[str, int]) -> bytes:
        """The bytes on the wire."""
        values = self.resolve(names)
        fmt = "<" + "".join(code for _, code in wire_fields(self.cls))
        payload = struct.pack(fmt, *(values[n] for n, _ in wire_fields(self.cls))) + self.text
        length = len(payload) + (len(self.junk) if self.junk_counted else 0)
        if self.length is not None:
            length = self.length
        header = wire.HEADER.pack(
            self.version,
            self.cls.TYPE if self.type is None else self.type,
            self.header_flags(),
            self.cls.NFDS if self.nfds is None else self.nfds,
            self.reserved,
            self.seq,
            length & U32,
        )
        data = bytearray(header + payload + self.junk)
        for bit in self.flips:
            if bit < 8 * len(data):
                data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data if self.cut is None else data[: self.cut])

    def describe(self, names: Mapping[str, int]) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.resolve(names).items())
        parts = [f"{self.cls.__name__}(seq={self.seq}{', ' if values else ''}{values})"]
        if self.text:
            parts.append(f"text={len(self.text)}B")
        if self.fds:
            kinds = sorted({k.value for k in self.fds})
            parts.append(f"fds={len(self.fds)}x{kinds} cmsgs={self.cmsg_groups()}")
        if self.mutations:
            parts.append(f"mutations={list(self.mutations)}")
        data = self.render(names)
        shown = data[:64].hex()
        parts.append(f"bytes[{len(data)}]={shown}{'...' if len(data) > 64 else ''}")
        return " ".join(parts)


@dataclass(frozen=True)
class Step:
    """Frames sent back to back on one endpoint (usually one; a burst pipelines many)."""

    endpoint: str
    frames: tuple[FrameSpec, ...]


@dataclass(frozen=True)
class Case:
    seed: int
    index: int
    steps: tuple[Step, ...]
    prelude: tuple[str, ...] = ()  # endpoints opened (and attached) before the steps

    def endpoints(self) -> tuple[str, ...]:
        used = [*self.prelude, *(s.endpoint for s in self.steps)]
        return tuple(dict.fromkeys(used))

    def describe(self, names: Mapping[str, int]) -> str:
        lines = [
            f"case {self.index} of seed {self.seed}"
            + (f" (prelude: {', '.join(self.prelude)})" if self.prelude else "")
        ]
        for i, step in enumerate(self.steps):
            burst = f" (burst of {len(step.frames)})" if len(step.frames) > 1 else ""
            lines.append(f"  {i}: on {step.endpoint}{burst}:")
            lines += [f"      {frame.describe(names)}" for frame in step.frames]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ the model


class Expect(enum.Enum):
    REJECT = "rejected"  # an EPROTO error reply echoing `seq`, then EOF
    EOF = "eof"  # an empty datagram without fds reads as EOF: dropped, no reply
    REPLY = "reply"  # a well-formed request: a reply echoing `seq`, the connection stays
    NO_REPLY = "no-reply"  # a well-formed acknowledgement: no reply, the connection stays


@dataclass(frozen=True)
class Verdict:
    expect: Expect
    seq: int = 0
    cls: type[wire.Message] | None = None
    why: str = ""


def verdict(data: bytes, nfds: int) -> Verdict:
    """What the broker must do with one datagram carrying ``nfds`` fds.

    An independent reading of the frame layout in :mod:`shared.wire` (not a call to its
    decoder), so the fuzzer checks the decoder instead of trusting it.
    """
    if nfds > MAX_FDS_PER_MESSAGE:
        return Verdict(Expect.REJECT, 0, why="more fds than the receiver holds (MSG_CTRUNC)")
    if len(data) > wire.MAX_FRAME:
        return Verdict(Expect.REJECT, 0, why="datagram longer than a frame (MSG_TRUNC)")
    if not data and not nfds:
        return Verdict(Expect.EOF, why="an empty datagram is EOF")
    if len(data) < wire.HEADER.size:
        return Verdict(Expect.REJECT, 0, why="shorter than a header")
    version, type_code, flags, hdr_nfds, reserved, seq, length = wire.HEADER.unpack_from(data)
    payload = data[wire.HEADER.size :]
    cls = wire.MESSAGE_TYPES.get(type_code)
    problems = [
        (version != wire.PROTOCOL_VERSION, "version"),
        (bool(flags & ~wire.KNOWN_FLAGS) or reserved != 0, "reserved bits"),
        (length != len(payload), "length field"),
        (cls is None, "unknown type"),
    ]
    if cls is not None:
        size = fixed_size(cls)
        problems += [
            ((flags & wire.FLAG_REPLY != 0) != (cls.KIND is wire.Kind.REPLY), "reply bit"),
            (hdr_nfds != cls.NFDS or nfds != cls.NFDS, "fd count"),
            (len(payload) < size or (not cls.TEXT and len(payload) != size), "payload size"),
            (cls.TEXT and not _utf8(payload[size:]), "text is not UTF-8"),
            (cls.KIND is not wire.Kind.REQUEST, "not a request"),
        ]
    for bad, why in problems:
        if bad:
            return Verdict(Expect.REJECT, seq, cls, why)
    assert cls is not None
    return Verdict(Expect.NO_REPLY if cls.NO_REPLY else Expect.REPLY, seq, cls)


def sent_fields(cls: type[wire.Message], data: bytes) -> dict[str, int]:
    """The field values a well-formed frame of type ``cls`` carries (after mutations)."""
    fmt = "<" + "".join(code for _, code in wire_fields(cls))
    values = struct.unpack_from(fmt, data, wire.HEADER.size)
    return dict(zip((n for n, _ in wire_fields(cls)), values, strict=True))


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


# ------------------------------------------------------------------------------ generation

REQUESTS = tuple(c for c in wire.MESSAGE_TYPES.values() if c.KIND is wire.Kind.REQUEST)
NON_REQUESTS = tuple(c for c in wire.MESSAGE_TYPES.values() if c.KIND is not wire.Kind.REQUEST)
# What scoped channels are for (drawn more often there; everything else is still drawn).
SCOPED_FAVOURITES = (
    wire.Attach,
    wire.Attach,
    wire.DetachAck,
    wire.IoExit,
    wire.DeviceReport,
    wire.DeviceConfigDone,
    wire.Hello,
    wire.HandleGetFd,
)


def _value(rng: random.Random, cls: type[wire.Message], name: str, code: str) -> Value:
    pool = TYPE_POOLS.get((cls, name), POOLS.get(name))
    pick = rng.random()
    if pool is not None and pick < 0.45:
        return pool[0]
    if pool is not None and pick < 0.9:
        return rng.choice(pool)
    return rng.getrandbits(8 * struct.calcsize("<" + code))


def _text(rng: random.Random, cls: type[wire.Message]) -> bytes:
    room = wire.MAX_PAYLOAD - fixed_size(cls)
    pick = rng.random()
    if pick < 0.15:  # exactly full, or a few bytes short: the limits of relayed texts
        return b"r" * (room - rng.choice((0, 0, 1, 4, 8, 12, 64)))
    if pick < 0.25:
        return bytes(rng.choice(b'{}[]":, azAZ09') for _ in range(rng.randrange(1, 200)))
    return rng.choice(TEXTS)


def base_frame(rng: random.Random, cls: type[wire.Message]) -> FrameSpec:
    """A valid frame of type ``cls`` with plausible field values."""
    values = tuple((name, _value(rng, cls, name, code)) for name, code in wire_fields(cls))
    fds = tuple(rng.choice(RIGHT_FDS.get(cls, tuple(FdKind))) for _ in range(cls.NFDS))
    seq = rng.choice((rng.getrandbits(32), rng.getrandbits(32), 0, 1, U32))
    return FrameSpec(cls, values, _text(rng, cls) if cls.TEXT else b"", seq, fds)


def _frame_len(s: FrameSpec) -> int:
    return wire.HEADER.size + fixed_size(s.cls) + len(s.text) + len(s.junk)


def _truncate(rng: random.Random, s: FrameSpec) -> FrameSpec:
    n = _frame_len(s)
    return dataclasses.replace(
        s,
        cut=rng.choice(
            (0, rng.randrange(1, wire.HEADER.size), wire.HEADER.size, rng.randrange(0, n))
        ),
    )


def _extend(rng: random.Random, s: FrameSpec) -> FrameSpec:
    junk = rng.randbytes(rng.randrange(1, 33))
    return dataclasses.replace(s, junk=s.junk + junk, junk_counted=rng.random() < 0.5)


def _oversize(rng: random.Random, s: FrameSpec) -> FrameSpec:
    variant = rng.randrange(3)
    if variant == 0:  # an honest length field just past MAX_PAYLOAD
        room = wire.MAX_PAYLOAD - fixed_size(s.cls) - len(s.text)
        return dataclasses.replace(s, junk=b"o" * (room + rng.randrange(1, 64)))
    if variant == 1:  # a datagram longer than the receive buffer (MSG_TRUNC)
        return dataclasses.replace(s, junk=b"o" * (wire.MAX_FRAME + rng.randrange(1, 4096)))
    return dataclasses.replace(s, length=rng.choice((wire.MAX_PAYLOAD + 1, 1 << 31, U32)))


def _version(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(
        s, version=rng.choice((0, 2, 0x100, 0xFFFF, rng.randrange(2, 1 << 16)))
    )


def _unknown_type(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(s, type=rng.choice(UNKNOWN_TYPES))


def _type_confusion(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(s, type=rng.choice(list(wire.MESSAGE_TYPES)))


def _reply_bit(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(s, flags=s.header_flags() ^ wire.FLAG_REPLY)


def _reserved_flag(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(s, flags=s.header_flags() | 1 << rng.randrange(1, 16))


def _reserved_byte(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(s, reserved=rng.randrange(1, 256))


def _nfds_field(rng: random.Random, s: FrameSpec) -> FrameSpec:
    wrong = [n for n in (0, 1, 2, 3, 8, 9, 255) if n != s.cls.NFDS]
    return dataclasses.replace(s, nfds=rng.choice(wrong))


def _length_field(rng: random.Random, s: FrameSpec) -> FrameSpec:
    n = _frame_len(s) - wire.HEADER.size
    return dataclasses.replace(
        s,
        length=rng.choice(
            [v for v in (0, n - 1, n + 1, n + 4096, wire.MAX_PAYLOAD, U32) if v >= 0]
        ),
    )


def _bitflip(rng: random.Random, s: FrameSpec) -> FrameSpec:
    bits = 8 * _frame_len(s)
    return dataclasses.replace(
        s, flips=tuple(rng.randrange(bits) for _ in range(rng.randrange(1, 5)))
    )


def _bad_utf8(rng: random.Random, s: FrameSpec) -> FrameSpec:
    text = bytearray(s.text[:1000])
    at = rng.randrange(len(text) + 1)
    text[at:at] = rng.choice(BAD_UTF8)
    return dataclasses.replace(s, text=bytes(text))


def _fd_wrong_kind(rng: random.Random, s: FrameSpec) -> FrameSpec:
    kinds = wrong_fds(s.cls)
    fds = tuple(rng.choice(kinds) for _ in range(max(1, len(s.fds))))
    return dataclasses.replace(s, fds=fds, groups=None)


def _fd_extra(rng: random.Random, s: FrameSpec) -> FrameSpec:
    extra = tuple(rng.choice(list(FdKind)) for _ in range(rng.randrange(1, 4)))
    return dataclasses.replace(s, fds=(s.fds + extra)[:SCM_MAX_FD], groups=None)


def _fd_missing(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(
        s, fds=s.fds[: rng.randrange(len(s.fds))] if s.fds else (), groups=None
    )


def _fd_flood(rng: random.Random, s: FrameSpec) -> FrameSpec:
    n = rng.choice((MAX_FDS_PER_MESSAGE + 1, 16, 64, SCM_MAX_FD))
    return dataclasses.replace(s, fds=(rng.choice(list(FdKind)),) * n, groups=None)


def _cmsg_split(rng: random.Random, s: FrameSpec) -> FrameSpec:
    fds = s.fds or (rng.choice(list(FdKind)),)
    cuts = sorted(rng.randrange(len(fds) + 1) for _ in range(rng.randrange(1, 4)))
    groups = tuple(b - a for a, b in itertools.pairwise([0, *cuts, len(fds)]))
    return dataclasses.replace(s, fds=fds, groups=groups)


def _cmsg_torn(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(s, torn=rng.randrange(1, 4)) if s.fds else s


def _creds(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(s, creds=True)


def _field_random(rng: random.Random, s: FrameSpec) -> FrameSpec:
    if not s.values:
        return _seq_edge(rng, s)
    i = rng.randrange(len(s.values))
    name = s.values[i][0]
    code = dict(wire_fields(s.cls))[name]
    values = list(s.values)
    values[i] = (name, rng.getrandbits(8 * struct.calcsize("<" + code)))
    return dataclasses.replace(s, values=tuple(values))


def _seq_edge(rng: random.Random, s: FrameSpec) -> FrameSpec:
    return dataclasses.replace(s, seq=rng.choice((0, U32, 0x8000_0000)))


Mutation = Callable[[random.Random, FrameSpec], FrameSpec]
MUTATIONS: dict[str, tuple[Mutation, int]] = {  # name: (mutation, weight)
    "truncate": (_truncate, 4),
    "extend": (_extend, 3),
    "oversize": (_oversize, 2),
    "version": (_version, 2),
    "unknown-type": (_unknown_type, 2),
    "type-confusion": (_type_confusion, 3),
    "reply-bit": (_reply_bit, 2),
    "reserved-flag": (_reserved_flag, 2),
    "reserved-byte": (_reserved_byte, 2),
    "nfds-field": (_nfds_field, 2),
    "length-field": (_length_field, 2),
    "bitflip": (_bitflip, 3),
    "bad-utf8": (_bad_utf8, 1),
    "fd-wrong-kind": (_fd_wrong_kind, 6),
    "fd-extra": (_fd_extra, 2),
    "fd-missing": (_fd_missing, 2),
    "fd-flood": (_fd_flood, 2),
    "cmsg-split": (_cmsg_split, 4),
    "cmsg-torn": (_cmsg_torn, 2),
    "creds": (_creds, 2),
    "field-random": (_field_random, 10),
    "seq-edge": (_seq_edge, 1),
}
_NAMES = tuple(MUTATIONS)
_WEIGHTS = tuple(w for _, w in MUTATIONS.values())


def mutate(rng: random.Random, s: FrameSpec, count: int) -> FrameSpec:
    for name in rng.choices(_NAMES, _WEIGHTS, k=count):
        s = MUTATIONS[name][0](rng, s)
        s = dataclasses.replace(s, mutations=(*s.mutations, name))
    return s


def _message_type(rng: random.Random, endpoint: str) -> type[wire.Message]:
    if rng.random() < 0.06:
        return rng.choice(NON_REQUESTS)  # a reply or notice sent the wrong way
    if endpoint in SCOPED and rng.random() < 0.4:
        return rng.choice(SCOPED_FAVOURITES)
    return rng.choice(REQUESTS)


# Where frames go: single-frame cases favour the two host kinds, sequences the channels.
SINGLE_WEIGHTS = {HOST: 40, BARE: 30, GUEST: 5, GUEST_ATTACHED: 9, DEVICE: 5, DEVICE_ATTACHED: 11}
SEQUENCE_WEIGHTS = {
    HOST: 40,
    BARE: 10,
    GUEST: 10,
    GUEST_ATTACHED: 15,
    DEVICE: 10,
    DEVICE_ATTACHED: 15,
}


def _endpoint(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


MAX_BURST = 80  # more than the broker reads from one client per pass (64)


def generate(seed: int, index: int) -> Case:
    """Case ``index`` of ``seed``: one frame (70% of the cases), a sequence of 2-5 frames
    over several endpoints (25%), or a burst of up to :data:`MAX_BURST` frames pipelined
    on a bare connection (5%)."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.random()
    if kind < 0.05:  # bare: nothing there can hold a reply back, so replies come in order
        burst = tuple(
            mutate(rng, base_frame(rng, _message_type(rng, BARE)), 1 if rng.random() < 0.03 else 0)
            for _ in range(rng.randrange(2, MAX_BURST + 1))
        )
        return Case(seed, index, (Step(BARE, burst),))
    prelude: tuple[str, ...] = ()
    if rng.random() < 0.2:  # attached consumers, so deassigns and relays go all the way
        prelude = rng.choice(
            ((GUEST_ATTACHED,), (DEVICE_ATTACHED,), (GUEST_ATTACHED, DEVICE_ATTACHED))
        )
    if kind < 0.75:
        endpoint = _endpoint(rng, SINGLE_WEIGHTS)
        frame = base_frame(rng, _message_type(rng, endpoint))
        count = rng.choices((0, 1, 2, 3), (25, 45, 20, 10))[0]
        steps: tuple[Step, ...] = (Step(endpoint, (mutate(rng, frame, count),)),)
    else:
        built = []
        for _ in range(rng.randrange(2, 6)):
            endpoint = _endpoint(rng, SEQUENCE_WEIGHTS)
            frame = base_frame(rng, _message_type(rng, endpoint))
            mutated = mutate(rng, frame, 1 if rng.random() < 0.2 else 0)
            built.append(Step(endpoint, (mutated,)))
        steps = tuple(built)
    return Case(seed, index, steps, prelude)
