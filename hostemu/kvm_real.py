"""The oracle's real-mode guest: its memory layout and the tiny programs it runs.

What :mod:`hostemu.kvm` loads into a VM's RAM and runs on its vCPU (that module's
docstring tells how the guest reaches any 32-bit address from real mode, why a program
ends with an ``out``, and how the guest takes interrupts): :func:`program` (one access),
:func:`pic_init_program` (the 8259 pair as a BIOS leaves it), :func:`interrupt_image`
(the vector table and a handler per line) and :func:`take_program` (``sti``, a window of
exits, ``cli``). Pure code: bytes in, bytes out; ``tests/unit/test_kvm_layout.py``
decodes them.
"""

from __future__ import annotations

import struct

# ------------------------------------------------------------------ guest layout

IOAPIC_ONLY_PINS = range(16, 24)  # of the IOAPIC's 24 pins
"""The gsis routed to the IOAPIC alone (0-15 also reach the PIC)."""
IOAPIC_VECTOR_BASE = 0x40
"""Pin ``p`` of :data:`IOAPIC_ONLY_PINS` is programmed to deliver vector ``base + p``."""

# ------------------------------------------------------------------ guest layout

RAM_SIZE = 0x10000
"""Guest RAM: one slot at guest-physical 0."""
CODE_ADDR = 0x1000
DATA_ADDR = 0x0800
"""Where an 8-byte MMIO write's value is staged for ``movq mm0, [DATA_ADDR]``."""
TSS_ADDR = 0x7FFF_D000
"""Three pages Intel's VMX may use for its real-mode TSS; no scenario goes near it (it
must fit the C int that ``fcntl.ioctl`` passes)."""
DONE_PORT = 0x7FF0
"""The port the program writes when it is done (see the module docstring)."""
TAKEN_PORT = 0x7FE0
"""An interrupt handler writes its gsi here after its EOI."""
STRAY_PORT = 0x7FE8
"""A vector nobody expects writes its number here."""
WINDOW_PORT = 0x7FD0
""":func:`take_program` writes here while interrupts are enabled (see the docstring)."""
IVT_ADDR = 0x0000
"""The real-mode interrupt vector table: 256 entries of (offset, segment)."""
HANDLERS_ADDR = 0x2000
HANDLER_SLOT = 0x20
"""Vector ``v``'s handler (or stray stub) is at ``HANDLERS_ADDR + v * HANDLER_SLOT``."""
STACK_TOP = 0xF000
PIC_VECTOR_BASE = 0x20
"""The master PIC's vector base (ICW2); the slave's is 8 more. Clear of the CPU's
exception vectors 0-31, which the BIOS's layout (base 8) would share."""
PIC_LINES = 16
TAKE_WINDOWS = PIC_LINES + len(IOAPIC_ONLY_PINS) + 1
"""One exit per interrupt the guest can have pending (16 PIC lines, the IOAPIC-only
pins), and one more."""
LAPIC_EOI = 0xFEE0_00B0
"""The local APIC's EOI register (the APIC's default base)."""


# ------------------------------------------------------------------ the guest program

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


def _mov_dx(port: int) -> bytes:
    return b"\xba" + struct.pack("<H", port)  # mov dx, imm16


def _mov_acc(width: int, value: int) -> bytes:
    if width == 1:
        return b"\xb0" + struct.pack("<B", value)  # mov al, imm8
    if width == 2:
        return b"\xb8" + struct.pack("<H", value)  # mov ax, imm16
    return b"\x66\xb8" + struct.pack("<I", value)  # mov eax, imm32


_DONE = _mov_dx(DONE_PORT) + b"\xee" + b"\xf4"  # out dx, al ; hlt


def program(
    *, pio: bool, write: bool, addr: int, width: int, value: int = 0
) -> tuple[bytes, bytes]:
    """Real-mode code (and staged data) for one access; ``value`` is cut to ``width``
    bytes, as a CPU can only carry that many."""
    if width not in _MASK:
        raise ValueError(f"an access is 1, 2, 4 or 8 bytes wide, not {width}")
    value &= _MASK[width]
    code, data = b"", b""
    if pio:
        if width == 8 or not 0 <= addr <= 0xFFFF:
            raise ValueError("port I/O is 1, 2 or 4 bytes wide at a 16-bit port")
        size = b"" if width < 4 else b"\x66"
        code += _mov_dx(addr)
        if write:
            code += _mov_acc(width, value) + size + (b"\xee" if width == 1 else b"\xef")
        else:
            code += size + (b"\xec" if width == 1 else b"\xed")  # in al/ax/eax, dx
    else:
        if not 0 <= addr <= 0xFFFFFFFF - width + 1:
            raise ValueError("MMIO from the oracle's real-mode guest reaches 32-bit addresses only")
        code += b"\x66\xbb" + struct.pack("<I", addr)  # mov ebx, imm32
        if width == 8:
            data = struct.pack("<Q", value)
            code += b"\x0f\x6f\x06" + struct.pack("<H", DATA_ADDR)  # movq mm0, [DATA]
            code += b"\x67\x0f\x7f\x03" if write else b"\x67\x0f\x6f\x03"  # movq [ebx]
        elif write:
            size = b"\x66" if width == 4 else b""
            code += _mov_acc(width, value)
            code += size + (b"\x67\x88\x03" if width == 1 else b"\x67\x89\x03")
        else:
            size = b"\x66" if width == 4 else b""
            code += size + (b"\x67\x8a\x03" if width == 1 else b"\x67\x8b\x03")
    return code + _DONE, data


# ------------------------------------------------------------------ taking interrupts

_OUT_IMM8 = b"\xe6"  # out imm8, al
_IRET = b"\xcf"
_PIC_MASTER, _PIC_SLAVE = 0x20, 0xA0
_PIC_EOI = 0x20  # OCW2: non-specific EOI


def _out8(port: int, value: int) -> bytes:
    return _mov_acc(1, value) + _OUT_IMM8 + struct.pack("<B", port)  # mov al, v ; out p, al


def pic_init_program() -> bytes:
    """Initialise both 8259s the way a BIOS does, with vector bases
    :data:`PIC_VECTOR_BASE` and +8, every line unmasked, edge-triggered (the ELCR is left
    at 0): ICW1 (edge, cascade, ICW4 needed), ICW2 (vector base), ICW3 (the slave on the
    master's line 2), ICW4 (8086 mode), then OCW1 (mask nothing)."""
    code = b""
    for base, icw3, vector in (
        (_PIC_MASTER, 1 << 2, PIC_VECTOR_BASE),
        (_PIC_SLAVE, 2, PIC_VECTOR_BASE + 8),
    ):
        code += _out8(base, 0x11) + _out8(base + 1, vector) + _out8(base + 1, icw3)
        code += _out8(base + 1, 0x01)
    code += _out8(_PIC_MASTER + 1, 0) + _out8(_PIC_SLAVE + 1, 0)
    return code + _DONE


def _report(gsi: int) -> bytes:
    # push dx ; mov dx, TAKEN_PORT ; mov al, gsi ; out dx, al ; pop dx
    return b"\x52" + _mov_dx(TAKEN_PORT) + _mov_acc(1, gsi) + b"\xee" + b"\x5a"


def pic_handler(gsi: int) -> bytes:
    """The handler of PIC line ``gsi`` (0-15): non-specific EOI (slave, then master for
    a slave line), report ``gsi`` at :data:`TAKEN_PORT`, return."""
    if not 0 <= gsi < PIC_LINES:
        raise ValueError(f"the PIC pair has lines 0-15, not {gsi}")
    code = b"\x50" + _mov_acc(1, _PIC_EOI)  # push ax ; mov al, 0x20
    if gsi >= 8:
        code += _OUT_IMM8 + struct.pack("<B", _PIC_SLAVE)
    code += _OUT_IMM8 + struct.pack("<B", _PIC_MASTER)
    return code + _report(gsi) + b"\x58" + _IRET  # pop ax ; iret


def lapic_handler(gsi: int) -> bytes:
    """The handler of an IOAPIC-only pin's vector: write the local APIC's EOI register
    (through "unreal mode" DS), report ``gsi`` at :data:`TAKEN_PORT`, return."""
    code = b"\x50\x66\x53"  # push ax ; push ebx
    code += b"\x66\xbb" + struct.pack("<I", LAPIC_EOI)  # mov ebx, LAPIC_EOI
    code += b"\x66\x67\x89\x03"  # mov [ebx], eax
    return code + _report(gsi) + b"\x66\x5b\x58" + _IRET  # pop ebx ; pop ax ; iret


def stray_stub(vector: int) -> bytes:
    """Where any other vector leads: report it at :data:`STRAY_PORT` and stop."""
    return _mov_dx(STRAY_PORT) + _mov_acc(1, vector) + b"\xee" + b"\xf4"  # ... out ; hlt


def vector_of(gsi: int) -> int:
    """The vector gsi ``gsi`` (0-23) is taken at."""
    if 0 <= gsi < PIC_LINES:
        return PIC_VECTOR_BASE + gsi  # the slave's base is the master's + 8
    if gsi in IOAPIC_ONLY_PINS:
        return IOAPIC_VECTOR_BASE + gsi
    raise ValueError(f"gsi {gsi} is not routed to the guest")


def interrupt_image() -> list[tuple[int, bytes]]:
    """What :meth:`Vm.init_interrupts` loads, as (guest-physical address, bytes): the
    vector table and, for each of the 256 vectors, its handler or stray stub."""
    handlers = {vector_of(g): pic_handler(g) for g in range(PIC_LINES)}
    handlers |= {vector_of(g): lapic_handler(g) for g in IOAPIC_ONLY_PINS}
    ivt = b""
    image: list[tuple[int, bytes]] = []
    for vector in range(256):
        at = HANDLERS_ADDR + vector * HANDLER_SLOT
        code = handlers.get(vector) or stray_stub(vector)
        if len(code) > HANDLER_SLOT:
            raise AssertionError(f"vector {vector:#x}'s handler outgrew its slot")
        ivt += struct.pack("<HH", at, 0)  # offset, segment 0
        image.append((at, code))
    return [(IVT_ADDR, ivt), *image]


def take_program() -> bytes:
    """``sti``; ``nop`` (the one instruction ``sti`` keeps interrupts off for); a window
    of :data:`TAKE_WINDOWS` writes to :data:`WINDOW_PORT`; ``cli``; done."""
    window = (_mov_dx(WINDOW_PORT) + b"\xee") * TAKE_WINDOWS  # mov dx, port ; out dx, al
    return b"\xfb\x90" + window + b"\xfa" + _DONE
