"""Unit tests for shared.wire: the sans-IO control-protocol codec.

Frames are built with :func:`encode` and then corrupted field by field; every rejection
must be a :class:`ProtocolError` that closed every fd handed to :func:`decode`. Fds are
real eventfds. Cases that differ only in data loop inside one test (and name the case in
the failure message) rather than becoming hundreds of test items.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import inspect
import os
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import wire
from shared.errors import ProtocolError, UsageError
from shared.fds import MAX_FDS_PER_MESSAGE, OwnedFd, close_all, eventfd_info, new_eventfd
from shared.wire import (
    FLAG_REPLY,
    HEADER,
    HEADER_LAYOUT,
    KNOWN_FLAGS,
    MAX_FRAME,
    MAX_PAYLOAD,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    SEQ_MASK,
    FrameHeader,
    Kind,
    Message,
    decode,
    describe,
    encode,
    message,
    peek_header,
)

TEXT_SAMPLE = "Grüße, 世界! ✓ 🚀 \u0000 tab\t \u200b end"
VARIANTS = ("distinct", "max", "zero")

# ---------------------------------------------------------------------------- helpers


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = fd_count()
    yield
    if fd_count() != before:
        gc.collect()  # only pay for a full collection when something looks leaked
    assert fd_count() == before, "the test leaked file descriptors"


def wire_fields(cls: type[Message]) -> list[tuple[str, str]]:
    """(name, struct code) of the fixed payload fields, in wire order."""
    return [(f.name, f.metadata["code"]) for f in dataclasses.fields(cls) if "code" in f.metadata]


def max_of(code: str) -> int:
    return (1 << (8 * struct.calcsize("<" + code))) - 1


def fixed_size(cls: type[Message]) -> int:
    return struct.calcsize("<" + "".join(code for _, code in wire_fields(cls)))


def field_values(cls: type[Message], variant: str = "distinct") -> dict[str, Any]:
    values: dict[str, Any] = {}
    for i, (name, code) in enumerate(wire_fields(cls)):
        if variant == "max":
            values[name] = max_of(code)
        elif variant == "zero":
            values[name] = 0
        else:  # distinct, non-trivial bit patterns per field
            values[name] = ((0x9E3779B97F4A7C15 * (i + 1)) >> (3 * i)) & max_of(code) or 1
    return values


def text_for(cls: type[Message], variant: str) -> str:
    if variant == "max":  # fill the payload to exactly MAX_PAYLOAD with multi-byte text
        room = MAX_PAYLOAD - fixed_size(cls)
        return "🚀" * (room // 4) + "é" * ((room % 4) // 2) + "x" * (room % 2)
    if variant == "zero":
        return ""
    return TEXT_SAMPLE


SEQ_FOR = {"max": SEQ_MASK, "zero": 0, "distinct": 0x12345678}


def fresh_fds(n: int) -> list[OwnedFd]:
    return [new_eventfd() for _ in range(n)]


def build(cls: type[Message], variant: str = "distinct", nfds: int | None = None) -> Message:
    """A message carrying real eventfds (the caller closes them via msg.close_fds())."""
    kwargs: dict[str, Any] = dict(field_values(cls, variant))
    if cls.TEXT:
        kwargs["text"] = text_for(cls, variant)
    fds = fresh_fds(cls.NFDS if nfds is None else nfds)
    return cls(seq=SEQ_FOR[variant], fds=tuple(fds), **kwargs)


def frame_of(cls: type[Message], variant: str = "distinct") -> bytes:
    """The encoded bytes of a valid frame (its fds already closed again)."""
    msg = build(cls, variant)
    try:
        return encode(msg)[0]
    finally:
        msg.close_fds()


def header_of(data: bytes) -> FrameHeader:
    h = peek_header(data)
    assert h is not None
    return h


def patch_header(data: bytes, **changes: int) -> bytes:
    values = dataclasses.replace(header_of(data), **changes)
    return HEADER.pack(*dataclasses.astuple(values)) + data[HEADER.size :]


def with_payload(data: bytes, payload: bytes) -> bytes:
    """Replace the payload and keep the length field consistent with it."""
    return patch_header(data[: HEADER.size] + payload, length=len(payload))


def assert_rejected(
    data: bytes, fds: list[OwnedFd] | None = None, match: str | None = None, case: str = ""
) -> None:
    """decode must raise ProtocolError (nothing else) and close every fd it was given."""
    fds = [] if fds is None else fds
    h = peek_header(data)
    if h is not None:  # name the frame's type in any failure message
        case = f"{getattr(MESSAGE_TYPES.get(h.type), '__name__', h.type)} {case}"
    numbers = [f.fd for f in fds]
    try:
        got = decode(data, fds)
    except ProtocolError as e:
        if match is not None:
            assert re.search(match, str(e), re.IGNORECASE), f"{case}: wrong reason: {e}"
    else:
        got.close_fds()
        pytest.fail(f"{case}: accepted a bad frame as {describe(got)}: {data[:40].hex()}")
    assert all(f.closed for f in fds), f"{case}: a rejected frame must close every fd"
    assert not any(is_open(n) for n in numbers), f"{case}: fd still open"


def assert_usage_error(msg: Message, case: str) -> None:
    """encode must refuse with UsageError and leave the message's fds alone."""
    try:
        encode(msg)
    except UsageError:
        pass
    else:
        pytest.fail(f"{type(msg).__name__} {case}: encoded")
    assert not any(f.closed for f in msg.fds), f"{type(msg).__name__} {case}: fds closed"


def names(classes: list[type[Message]]) -> list[str]:
    return [c.__name__ for c in classes]


ALL_TYPES = sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE)
TEXT_TYPES = [c for c in ALL_TYPES if c.TEXT]
TYPES_WITH_FIELDS = [c for c in ALL_TYPES if wire_fields(c)]

by_type = pytest.mark.parametrize("cls", ALL_TYPES, ids=names(ALL_TYPES))
by_text_type = pytest.mark.parametrize("cls", TEXT_TYPES, ids=names(TEXT_TYPES))


def test_the_registry_covers_every_kind() -> None:
    kinds = {c.KIND for c in ALL_TYPES}
    assert kinds == set(Kind)  # so "reply bit mismatch" is exercised both ways
    assert TEXT_TYPES, "text types exist"
    assert any(c.NFDS == 0 for c in ALL_TYPES)
    assert any(c.NFDS > 1 for c in ALL_TYPES)


# ---------------------------------------------------------------------------- header layout


class TestHeaderLayout:
    def test_header_is_16_bytes(self) -> None:
        assert HEADER.size == 16
        assert HEADER.format == "<" + "".join(code for _, code in HEADER_LAYOUT)
        assert HEADER.size + MAX_PAYLOAD == MAX_FRAME

    def test_offsets_match_docstring_table(self) -> None:
        assert wire.__doc__ is not None
        rows = re.findall(r"^\s+(\d+)\s+(\d+|\.\.)\s+(\w+)\b", wire.__doc__, re.MULTILINE)
        table = [(int(off), size, name) for off, size, name in rows]
        expected = []
        for i, (name, code) in enumerate(HEADER_LAYOUT):
            offset = struct.calcsize("<" + "".join(c for _, c in HEADER_LAYOUT[:i]))
            expected.append((offset, str(struct.calcsize("<" + code)), name))
        expected.append((HEADER.size, "..", "payload"))
        assert table == expected

    def test_pack_places_fields_at_their_offsets(self) -> None:
        values = {
            "version": 0x0102,
            "type": 0x0304,
            "flags": 0x0506,
            "nfds": 0x07,
            "reserved": 0x08,
            "seq": 0x090A0B0C,
            "length": 0x0D0E0F10,
        }
        packed = HEADER.pack(*(values[name] for name, _ in HEADER_LAYOUT))
        offset = 0
        for name, code in HEADER_LAYOUT:
            size = struct.calcsize("<" + code)
            assert int.from_bytes(packed[offset : offset + size], "little") == values[name]
            offset += size
        assert offset == HEADER.size

    def test_frame_header_fields_follow_layout(self) -> None:
        assert [f.name for f in dataclasses.fields(FrameHeader)] == [n for n, _ in HEADER_LAYOUT]

    def test_peek_header(self) -> None:
        assert peek_header(b"") is None
        assert peek_header(b"\x00" * 15) is None
        assert peek_header(HEADER.pack(1, 2, 3, 4, 5, 6, 7) + b"tail") == FrameHeader(
            1, 2, 3, 4, 5, 6, 7
        )

    def test_registry_is_consistent(self) -> None:
        for code, cls in MESSAGE_TYPES.items():
            assert code == cls.TYPE
            assert 0 <= code <= 0xFFFF
            assert 0 <= cls.NFDS <= MAX_FDS_PER_MESSAGE
            assert isinstance(cls.KIND, Kind)
            assert fixed_size(cls) <= MAX_PAYLOAD
            # every field the class declares is a wire field (or its text tail): a
            # class that missed its @dataclass would silently have none
            own = set(inspect.get_annotations(cls))
            assert own <= {n for n, _ in wire_fields(cls)} | {"text"}, cls.__name__
            assert ("text" in own) == cls.TEXT, cls.__name__


# ---------------------------------------------------------------------------- round trips


class TestRoundTrip:
    @by_type
    def test_round_trip(self, cls: type[Message]) -> None:
        for variant in VARIANTS:
            msg = build(cls, variant)
            try:
                data, numbers = encode(msg)
                assert numbers == [f.fd for f in msg.fds]
                assert len(data) <= MAX_FRAME
                assert header_of(data) == FrameHeader(
                    version=PROTOCOL_VERSION,
                    type=cls.TYPE,
                    flags=FLAG_REPLY if cls.KIND is Kind.REPLY else 0,
                    nfds=cls.NFDS,
                    reserved=0,
                    seq=SEQ_FOR[variant],
                    length=len(data) - HEADER.size,
                ), variant
                got = decode(data, list(msg.fds))
                assert type(got) is cls
                assert got == msg, variant
                assert got.seq == msg.seq == SEQ_FOR[variant]
                for name, code in wire_fields(cls):
                    want = field_values(cls, variant)[name]
                    assert getattr(got, name) == want, f"{variant} {name}"
                    if variant == "max":
                        assert want == max_of(code)
                if cls.TEXT:
                    assert got.text == text_for(cls, variant)  # type: ignore[attr-defined]
                assert len(got.fds) == cls.NFDS
                assert all(a is b for a, b in zip(got.fds, msg.fds, strict=True))
                assert not any(f.closed for f in got.fds)
                assert encode(got)[0] == data  # canonical: re-encoding gives the same bytes
            finally:
                msg.close_fds()

    def test_payload_is_little_endian_at_layout_offsets(self) -> None:
        for cls in ALL_TYPES:
            msg = build(cls, "distinct")
            try:
                data, _ = encode(msg)
            finally:
                msg.close_fds()
            offset = HEADER.size
            for name, code in wire_fields(cls):
                size = struct.calcsize("<" + code)
                assert data[offset : offset + size] == getattr(msg, name).to_bytes(size, "little")
                offset += size
            assert offset == HEADER.size + fixed_size(cls)
            tail = data[offset:]
            assert tail == (msg.text.encode() if cls.TEXT else b"")  # type: ignore[attr-defined]

    @by_text_type
    def test_text_round_trip(self, cls: type[Message]) -> None:
        for text in ("", "ascii", TEXT_SAMPLE, "\U0010ffff", "é" * 1000, "\x00\x00", "a\r\nb"):
            msg = cls(seq=1, text=text, **field_values(cls))  # type: ignore[call-arg]
            got = decode(encode(msg)[0])
            assert got == msg
            assert got.text == text  # type: ignore[attr-defined]

    @by_text_type
    def test_exactly_max_payload_is_accepted(self, cls: type[Message]) -> None:
        data = frame_of(cls, "max")
        assert len(data) == MAX_FRAME
        got = decode(data)
        assert len(got.text.encode()) == MAX_PAYLOAD - fixed_size(cls)  # type: ignore[attr-defined]

    def test_fds_keep_their_order_and_identity(self) -> None:
        cls = wire.IrqfdAttachResample  # two fds: (eventfd, resamplefd)
        msg = build(cls)
        try:
            ids = [eventfd_info(f.fd).eventfd_id for f in msg.fds]  # type: ignore[union-attr]
            assert len(set(ids)) == 2
            got = decode(encode(msg)[0], list(msg.fds))
            assert [eventfd_info(f.fd).eventfd_id for f in got.fds] == ids  # type: ignore[union-attr]
        finally:
            msg.close_fds()

    def test_close_fds(self) -> None:
        msg = build(wire.IrqfdAttachResample)
        numbers = [f.fd for f in msg.fds]
        msg.close_fds()
        assert all(f.closed for f in msg.fds)
        assert not any(is_open(n) for n in numbers)
        msg.close_fds()  # harmless twice

    def test_defaults_and_keyword_only(self) -> None:
        assert wire.MemslotSet(vm=1, slot=2, gpa=3, size=4).handle == wire.NO_HANDLE
        assert wire.Ping().token == 0
        with pytest.raises(TypeError):
            wire.MemslotSet(1, 2, 3, 4)  # type: ignore[call-arg, arg-type]
        with pytest.raises(dataclasses.FrozenInstanceError):
            wire.Ping().token = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------- rejections


class TestRejections:
    """Each corruption of a valid frame, for every message type, with its real fds."""

    @pytest.mark.parametrize("length", range(HEADER.size))
    def test_truncated_header(self, length: int) -> None:
        good = frame_of(wire.IrqfdAttachResample)
        assert_rejected(good[:length], fresh_fds(2), match="truncated header")
        assert_rejected(b"\x01" * length, match="truncated header")

    def test_wrong_version(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            for version in (0, PROTOCOL_VERSION + 1, 0x0100, 0x8001, 0xFFFF):
                data = patch_header(good, version=version)
                assert_rejected(data, fresh_fds(cls.NFDS), "version", f"version {version}")

    def test_each_reserved_flag_bit(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            bits = [1 << b for b in range(16) if not (1 << b) & KNOWN_FLAGS]
            assert len(bits) == 15
            for bit in bits:
                data = patch_header(good, flags=header_of(good).flags | bit)
                assert_rejected(data, fresh_fds(cls.NFDS), "reserved", f"flag {bit:#x}")
            data = patch_header(good, flags=header_of(good).flags | (0xFFFF & ~KNOWN_FLAGS))
            assert_rejected(data, fresh_fds(cls.NFDS), "reserved", "all reserved flags")

    def test_nonzero_reserved_byte(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            for reserved in (1, 2, 0x80, 0xFF):
                data = patch_header(good, reserved=reserved)
                assert_rejected(data, fresh_fds(cls.NFDS), "reserved", f"reserved {reserved}")

    def test_reply_bit_mismatch(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            flipped = header_of(good).flags ^ FLAG_REPLY
            # replies lose the bit; requests and notices gain it
            assert bool(flipped & FLAG_REPLY) != (cls.KIND is Kind.REPLY)
            assert_rejected(patch_header(good, flags=flipped), fresh_fds(cls.NFDS), "reply")

    def test_every_unknown_type(self) -> None:
        unknown = [t for t in range(0x10000) if t not in MESSAGE_TYPES]
        assert len(unknown) == 0x10000 - len(MESSAGE_TYPES)
        for t in unknown:
            for flags in (0, FLAG_REPLY):
                try:
                    decode(HEADER.pack(PROTOCOL_VERSION, t, flags, 0, 0, 0, 0))
                except ProtocolError as e:
                    assert "unknown" in str(e)
                else:
                    pytest.fail(f"unknown type {t} accepted")

    def test_unknown_type_closes_fds(self) -> None:
        unused = [
            t for t in (0, 22, 50, 63, 72, 90, 127, 134, 200, 0xFFFF) if t not in MESSAGE_TYPES
        ]
        assert len(unused) >= 5
        for t in unused:
            for nfds in (1, 2):
                data = HEADER.pack(PROTOCOL_VERSION, t, 0, nfds, 0, 0, 4) + b"\x00" * 4
                assert_rejected(data, fresh_fds(nfds), "unknown", f"type {t}")

    def test_length_field_disagrees_with_data(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            length = header_of(good).length
            for claimed in {length + 1, length + 2, length + 100, MAX_PAYLOAD, length - 1, 0}:
                if claimed == length or claimed < 0:
                    continue
                data = patch_header(good, length=claimed)
                assert_rejected(data, fresh_fds(cls.NFDS), "length", f"claims {claimed}")
            # bytes beyond what the length field announces
            for extra in (b"\x00", b"junk" * 10):
                assert_rejected(good + extra, fresh_fds(cls.NFDS), "length", f"+{len(extra)}")

    def test_oversize(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            # the length field agrees with the data, but the payload is too big
            for size in (MAX_PAYLOAD + 1, MAX_PAYLOAD + 4096):
                data = with_payload(good, good[HEADER.size :].ljust(size, b"a"))
                assert_rejected(data, fresh_fds(cls.NFDS), "oversize", f"payload {size}")
            # the length field alone is huge
            for length in (MAX_PAYLOAD + 1, 0x7FFFFFFF, 0xFFFFFFFF):
                data = patch_header(good, length=length)
                assert_rejected(data, fresh_fds(cls.NFDS), "oversize", f"length {length}")

    def test_payload_shorter_than_layout(self) -> None:
        for cls in TYPES_WITH_FIELDS:
            good = frame_of(cls)
            fixed = good[HEADER.size : HEADER.size + fixed_size(cls)]
            for cut in range(len(fixed)):
                data = with_payload(good, fixed[:cut])
                assert_rejected(data, fresh_fds(cls.NFDS), "payload", f"{cut} bytes")

    def test_payload_longer_than_layout(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            for extra in (b"\x00", b"\x00" * 8, b"text", b"\xff" * 100):
                data = with_payload(good, good[HEADER.size :] + extra)
                if cls.TEXT:  # the tail is text: longer is fine as long as it is UTF-8
                    if extra.isascii():
                        got = decode(data)
                        assert got.text.endswith(extra.decode())  # type: ignore[attr-defined]
                        continue
                    assert_rejected(data, fresh_fds(cls.NFDS), "UTF-8", f"+{extra!r}")
                else:
                    assert_rejected(data, fresh_fds(cls.NFDS), "payload", f"+{extra!r}")

    @by_text_type
    def test_invalid_utf8_text(self, cls: type[Message]) -> None:
        good = frame_of(cls, "zero")
        for bad in (
            b"\xff",
            b"\xfe\xff",
            b"caf\xc3",  # truncated sequence
            b"\xc0\xaf",  # overlong '/'
            b"\xe0\x80\xaf",  # overlong
            b"\xed\xa0\x80",  # UTF-8-encoded surrogate
            b"\xf4\x90\x80\x80",  # beyond U+10FFFF
            b"ok\x80ok",  # lone continuation byte
        ):
            data = with_payload(good, good[HEADER.size :] + bad)
            assert_rejected(data, fresh_fds(cls.NFDS), "UTF-8", repr(bad))

    def test_nfds_header_mismatch(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            for nfds in {cls.NFDS + 1, cls.NFDS + 2, (cls.NFDS - 1) % 256, 255, 0} - {cls.NFDS}:
                data = patch_header(good, nfds=nfds)
                # the right number of fds arrives; only the header lies
                assert_rejected(data, fresh_fds(cls.NFDS), "fds", f"header nfds {nfds}")

    def test_too_many_fds(self) -> None:
        for cls in ALL_TYPES:
            good = frame_of(cls)
            for extra in (1, 2, MAX_FDS_PER_MESSAGE):
                assert_rejected(good, fresh_fds(cls.NFDS + extra), "fds", f"+{extra} fds")

    def test_too_few_fds(self) -> None:
        for cls in [c for c in ALL_TYPES if c.NFDS]:
            good = frame_of(cls)
            for n in range(cls.NFDS):
                assert_rejected(good, fresh_fds(n), "fds", f"{n} fds")
                # header and fds agree with each other, but not with the type
                data = patch_header(good, nfds=n)
                assert_rejected(data, fresh_fds(n), "fds", f"{n} fds, header agrees")

    def test_empty_datagram(self) -> None:
        assert_rejected(b"", fresh_fds(3), "truncated")


class TestTruncationTable:
    """Every strict prefix of a valid frame is a ProtocolError that closes the fds."""

    def test_every_prefix(self) -> None:
        for cls in ALL_TYPES:
            for variant in ("distinct", "zero"):
                data = frame_of(cls, variant)
                for cut in range(len(data)):
                    assert_rejected(data[:cut], fresh_fds(cls.NFDS), case=f"{variant}[:{cut}]")
                fds = fresh_fds(cls.NFDS)  # while the whole frame is fine
                try:
                    assert type(decode(data, fds)) is cls
                finally:
                    close_all(fds)

    @by_text_type
    def test_cut_text_with_consistent_length(self, cls: type[Message]) -> None:
        # with the length field rewritten, a shorter text is valid unless the cut lands
        # inside a multi-byte character
        good = frame_of(cls, "distinct")
        payload = good[HEADER.size :]
        fixed = fixed_size(cls)
        bad_cuts = 0
        for cut in range(fixed, len(payload) + 1):
            data = with_payload(good, payload[:cut])
            try:
                text = payload[fixed:cut].decode()
            except UnicodeDecodeError:
                bad_cuts += 1
                assert_rejected(data, fresh_fds(cls.NFDS), "UTF-8", f"cut {cut}")
            else:
                assert decode(data).text == text  # type: ignore[attr-defined]
        assert bad_cuts > 0


# ---------------------------------------------------------------------------- encode errors


class TestEncodeErrors:
    def test_field_out_of_range(self) -> None:
        for cls in TYPES_WITH_FIELDS:
            msg = build(cls)
            try:
                for name, code in wire_fields(cls):
                    for value in (max_of(code) + 1, -1, 1 << 80):
                        bad = dataclasses.replace(msg, **{name: value})  # type: ignore[arg-type]
                        assert_usage_error(bad, f"{name}={value}")
                    ok = dataclasses.replace(msg, **{name: max_of(code)})  # type: ignore[arg-type]
                    assert decode(encode(ok)[0], list(ok.fds)) == ok
                assert not any(f.closed for f in msg.fds)  # encode never takes the fds
            finally:
                msg.close_fds()

    def test_u32_two_to_the_32(self) -> None:
        with pytest.raises(UsageError):
            encode(wire.HandleClose(handle=2**32))
        assert encode(wire.HandleClose(handle=2**32 - 1))[0][HEADER.size :] == b"\xff" * 4

    @pytest.mark.parametrize("value", ["1", 1.0, None, b"\x01"])
    def test_field_of_wrong_type(self, value: object) -> None:
        with pytest.raises(UsageError):
            encode(wire.HandleClose(handle=value))  # type: ignore[arg-type]

    def test_wrong_fd_count(self) -> None:
        for cls in ALL_TYPES:
            for n in {cls.NFDS + 1, cls.NFDS - 1, 0, MAX_FDS_PER_MESSAGE + 1} - {cls.NFDS}:
                if n < 0:
                    continue
                msg = build(cls, nfds=n)
                try:
                    assert_usage_error(msg, f"with {n} fds")
                finally:
                    msg.close_fds()

    def test_closed_fd_in_message(self) -> None:
        msg = build(wire.IrqfdAttachResample)
        msg.fds[1].close()
        try:
            with pytest.raises(UsageError):
                encode(msg)
        finally:
            msg.close_fds()

    @by_text_type
    def test_oversize_text(self, cls: type[Message]) -> None:
        room = MAX_PAYLOAD - fixed_size(cls)
        ok = cls(text="a" * room, **field_values(cls))  # type: ignore[call-arg]
        assert len(encode(ok)[0]) == MAX_FRAME
        for text in ("a" * (room + 1), "é" * (room // 2 + 1), "🚀" * MAX_PAYLOAD):
            with pytest.raises(UsageError):
                encode(dataclasses.replace(ok, text=text))  # type: ignore[call-arg]

    @by_text_type
    def test_unencodable_text_is_usage_error(self, cls: type[Message]) -> None:
        # e.g. an os.fsdecode()d file name with undecodable bytes (surrogateescape)
        for text in ("\ud800", "bad path \udcff.txt", "\udfff\ud800"):
            msg = cls(text=text, **field_values(cls))  # type: ignore[call-arg]
            with pytest.raises(UsageError):
                encode(msg)

    def test_seq_out_of_range(self) -> None:
        for seq in (-1, -(2**31), SEQ_MASK + 1, 2**64):
            with pytest.raises(UsageError):
                encode(wire.Ping(seq=seq, token=1))

    def test_seq_bounds_accepted(self) -> None:
        for seq in (0, 1, SEQ_MASK):
            assert decode(encode(wire.Ping(seq=seq))[0]).seq == seq

    def test_unregistered_class(self) -> None:
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Stray(wire.Ping):
            pass

        with pytest.raises(UsageError):
            encode(Message())
        with pytest.raises(UsageError):
            encode(Stray(token=1))


class TestRegistration:
    def test_duplicate_type_is_rejected(self) -> None:
        before = dict(MESSAGE_TYPES)

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Dup(Message):
            pass

        with pytest.raises(UsageError):
            message(1, Kind.REQUEST)(Dup)
        assert before == MESSAGE_TYPES

    @pytest.mark.parametrize("nfds", [-1, MAX_FDS_PER_MESSAGE + 1])
    def test_bad_fd_count_is_rejected(self, nfds: int) -> None:
        before = dict(MESSAGE_TYPES)

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class TooMany(Message):
            pass

        free = next(t for t in range(1000, 0x10000) if t not in MESSAGE_TYPES)
        with pytest.raises(UsageError):
            message(free, Kind.NOTICE, nfds=nfds)(TooMany)
        assert before == MESSAGE_TYPES

    def test_plain_subclass_never_loses_its_wire_fields(self) -> None:
        # Registering a subclass without its own @dataclass must either be refused or
        # give a class whose declared fields really travel on the wire.
        free = next(t for t in range(1000, 0x10000) if t not in MESSAGE_TYPES)

        class Plain(Message):
            value: int = wire.u32(0)

        try:
            cls = message(free, Kind.NOTICE)(Plain)
        except UsageError:
            assert free not in MESSAGE_TYPES
            return
        try:
            assert [n for n, _ in wire_fields(cls)] == ["value"]
            msg = cls(value=7)  # type: ignore[call-arg]
            assert decode(encode(msg)[0]).value == 7  # type: ignore[attr-defined]
        finally:
            del MESSAGE_TYPES[free]


# ---------------------------------------------------------------------------- describe


class TestDescribe:
    def test_contains_name_and_values(self) -> None:
        for cls in ALL_TYPES:
            msg = build(cls)
            try:
                text = describe(msg)
            finally:
                msg.close_fds()
            assert text.startswith(cls.__name__ + "(")
            assert text.endswith(")")
            assert "\n" not in text
            assert f"seq={msg.seq}" in text
            for name, _ in wire_fields(cls):
                assert f"{name}={getattr(msg, name)}" in text
            if cls.TEXT:
                assert repr(msg.text) in text  # type: ignore[attr-defined]
            if cls.NFDS:
                assert f"fds={cls.NFDS}" in text

    def test_examples(self) -> None:
        assert describe(wire.Detach(seq=3, binding=1, reason=2)) == (
            "Detach(seq=3, binding=1, reason=2)"
        )
        assert describe(wire.Error(seq=4, errno=16, text="busy\n✓")) == (
            "Error(seq=4, errno=16, text='busy\\n✓')"
        )
        assert describe(wire.Hello(seq=0)) == "Hello(seq=0)"


# ---------------------------------------------------------------------------- properties

PROPERTY_SETTINGS = settings(
    database=None,  # keep the source tree free of .hypothesis/
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)


def check_decode_outcome(data: bytes, fds: list[OwnedFd]) -> None:
    """decode either rejects (closing every fd) or yields a canonical message."""
    numbers = [f.fd for f in fds]
    try:
        msg = decode(data, fds)
    except ProtocolError:
        assert all(f.closed for f in fds)
        assert not any(is_open(n) for n in numbers)
        return
    try:
        assert isinstance(msg, Message)
        assert type(msg) is MESSAGE_TYPES[header_of(data).type]
        assert len(msg.fds) == len(fds)
        assert all(a is b for a, b in zip(msg.fds, fds, strict=True))
        assert encode(msg)[0] == data  # whatever is accepted re-encodes to the same bytes
    finally:
        close_all(fds)


@st.composite
def messages(draw: Callable[..., Any]) -> Message:
    cls: type[Message] = draw(st.sampled_from(ALL_TYPES))
    kwargs: dict[str, Any] = {
        name: draw(st.integers(0, max_of(code))) for name, code in wire_fields(cls)
    }
    if cls.TEXT:
        kwargs["text"] = draw(st.text(max_size=200))
    return cls(seq=draw(st.integers(0, SEQ_MASK)), fds=tuple(fresh_fds(cls.NFDS)), **kwargs)


@st.composite
def plausible_frames(draw: Callable[..., Any]) -> bytes:
    """Frames whose header is plausible enough to reach the later checks."""
    payload: bytes = draw(st.binary(max_size=64))
    header = HEADER.pack(
        draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, 0xFFFF])),
        draw(st.sampled_from([*MESSAGE_TYPES, 0, 22, 1000, 0xFFFF])),
        draw(st.sampled_from([0, FLAG_REPLY, 2, 0x8000, 0xFFFF])),
        draw(st.integers(0, 3) | st.integers(0, 255)),
        draw(st.sampled_from([0, 0, 1, 255])),
        draw(st.integers(0, SEQ_MASK)),
        draw(st.just(len(payload)) | st.integers(0, 0xFFFFFFFF)),
    )
    return bytes(header + payload)


class TestProperties:
    @PROPERTY_SETTINGS
    @given(st.binary(max_size=256))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        check_decode_outcome(data, [])

    @PROPERTY_SETTINGS
    @given(plausible_frames(), st.integers(0, 3))
    def test_plausible_headers(self, data: bytes, nfds: int) -> None:
        check_decode_outcome(data, fresh_fds(nfds))

    @PROPERTY_SETTINGS
    @given(messages())
    def test_round_trip_any_values(self, msg: Message) -> None:
        try:
            data, numbers = encode(msg)
            assert numbers == [f.fd for f in msg.fds]
            assert decode(data, list(msg.fds)) == msg
        finally:
            msg.close_fds()

    @PROPERTY_SETTINGS
    @given(messages(), st.data())
    def test_single_byte_mutation(self, msg: Message, data: st.DataObject) -> None:
        try:
            frame = encode(msg)[0]
        finally:
            msg.close_fds()
        index = data.draw(st.integers(0, len(frame) - 1), label="index")
        old = frame[index]
        new = data.draw(st.integers(0, 255).filter(lambda b: b != old), label="byte")
        mutated = frame[:index] + bytes([new]) + frame[index + 1 :]
        check_decode_outcome(mutated, fresh_fds(type(msg).NFDS))

    @PROPERTY_SETTINGS
    @given(messages(), st.data())
    def test_truncate_or_extend(self, msg: Message, data: st.DataObject) -> None:
        try:
            frame = encode(msg)[0]
        finally:
            msg.close_fds()
        cut = data.draw(st.integers(0, len(frame) - 1), label="cut")
        check_decode_outcome(frame[:cut], fresh_fds(type(msg).NFDS))
        extra = data.draw(st.binary(min_size=1, max_size=16), label="extra")
        check_decode_outcome(frame + extra, fresh_fds(type(msg).NFDS))
