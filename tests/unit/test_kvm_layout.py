"""The KVM binding's ioctl numbers and structure layouts, against include/uapi/linux/kvm.h,
and the real-mode programs it builds (decoded here: no KVM needed).

The expected sizes and offsets were read off the uapi header (x86-64): every field is
naturally aligned, so they follow from the declarations; the ioctl numbers follow from
``_IOC(dir, 0xAE, nr, sizeof)``. No KVM is needed for these checks.
"""

from __future__ import annotations

import ctypes
import struct

import pytest

from hostemu import kvm as K
from hostemu import kvm_real as R

LAYOUTS = [
    # struct, size, {field: offset}
    (K.KvmIrqfd, 32, {"fd": 0, "gsi": 4, "flags": 8, "resamplefd": 12, "pad": 16}),
    (K.KvmIoeventfd, 64, {"datamatch": 0, "addr": 8, "len": 16, "fd": 20, "flags": 24, "pad": 28}),
    (
        K.KvmUserspaceMemoryRegion,
        32,
        {"slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16, "userspace_addr": 24},
    ),
    (K.KvmPicState, 16, {"last_irr": 0, "irr": 1, "imr": 2, "isr": 3, "elcr": 14, "elcr_mask": 15}),
    (
        K.KvmIoapicState,
        216,
        {"base_address": 0, "ioregsel": 8, "id": 12, "irr": 16, "pad": 20, "redirtbl": 24},
    ),
    (K.KvmIrqchip, 520, {"chip_id": 0, "pad": 4, "chip": 8}),
    (K.KvmLapicState, 1024, {"regs": 0}),
    (
        K.KvmSegment,
        24,
        {"base": 0, "limit": 8, "selector": 12, "type": 14, "present": 15, "g": 20, "unusable": 22},
    ),
    (K.KvmDtable, 16, {"base": 0, "limit": 8}),
    (
        K.KvmSregs,
        312,
        {
            "cs": 0,
            "ds": 24,
            "tr": 144,
            "ldt": 168,
            "gdt": 192,
            "idt": 208,
            "cr0": 224,
            "cr4": 248,
            "efer": 264,
            "apic_base": 272,
            "interrupt_bitmap": 280,
        },
    ),
    (K.KvmRegs, 144, {"rax": 0, "rbx": 8, "rip": 128, "rflags": 136}),
    (K.KvmRunIo, 16, {"direction": 0, "size": 1, "port": 2, "count": 4, "data_offset": 8}),
    (K.KvmRunMmio, 24, {"phys_addr": 0, "data": 8, "len": 16, "is_write": 20}),
    (
        K.KvmRunHead,
        32 + 256,
        {
            "request_interrupt_window": 0,
            "immediate_exit": 1,
            "exit_reason": 8,
            "if_flag": 13,
            "cr8": 16,
            "apic_base": 24,
            "exit": 32,
        },
    ),
]


@pytest.mark.parametrize(
    ("struct_type", "size", "offsets"), LAYOUTS, ids=[t.__name__ for t, _, _ in LAYOUTS]
)
def test_layout(struct_type: type[ctypes.Structure], size: int, offsets: dict[str, int]) -> None:
    assert ctypes.sizeof(struct_type) == size
    for name, offset in offsets.items():
        assert getattr(struct_type, name).offset == offset, name


def test_ioapic_state_fits_the_union() -> None:
    assert ctypes.sizeof(K.KvmIoapicState) <= 512


@pytest.mark.parametrize(
    ("number", "value"),
    [
        (K.KVM_GET_API_VERSION, 0xAE00),
        (K.KVM_CREATE_VM, 0xAE01),
        (K.KVM_CREATE_VCPU, 0xAE41),
        (K.KVM_CREATE_IRQCHIP, 0xAE60),
        (K.KVM_RUN, 0xAE80),
        (K.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),  # _IOW, 32 bytes
        (K.KVM_GET_IRQCHIP, 0xC208AE62),  # _IOWR, 520 bytes
        (K.KVM_SET_IRQCHIP, 0x8208AE63),  # _IOR (sic: the header says so), 520 bytes
        (K.KVM_IRQFD, 0x4020AE76),  # _IOW, 32 bytes
        (K.KVM_IOEVENTFD, 0x4040AE79),  # _IOW, 64 bytes
        (K.KVM_GET_REGS, 0x8090AE81),  # _IOR, 144 bytes
        (K.KVM_SET_SREGS, 0x4138AE84),  # _IOW, 312 bytes
        (K.KVM_GET_LAPIC, 0x8400AE8E),  # _IOR, 1024 bytes
        (K.KVM_SET_LAPIC, 0x4400AE8F),  # _IOW, 1024 bytes
    ],
)
def test_ioctl_numbers(number: int, value: int) -> None:
    assert number == value


def test_ioapic_entry_decodes_the_bit_fields() -> None:
    bits = 0x31 | 1 << 14 | 1 << 15 | 1 << 16 | 0xAB << 56
    e = K.ioapic_entry(bits)
    assert (e["vector"], e["remote_irr"], e["trig_mode"], e["mask"], e["dest_id"]) == (
        0x31,
        1,
        1,
        1,
        0xAB,
    )


@pytest.mark.parametrize(
    ("pio", "width"),
    [(True, 1), (True, 2), (True, 4), (False, 1), (False, 2), (False, 4), (False, 8)],
)
def test_program_ends_at_the_done_port(pio: bool, width: int) -> None:
    code, _ = R.program(pio=pio, write=True, addr=0x500, width=width, value=0x1FF)
    assert code.endswith(b"\xba" + R.DONE_PORT.to_bytes(2, "little") + b"\xee\xf4")


def test_program_refuses_what_real_mode_cannot_do() -> None:
    with pytest.raises(ValueError):
        R.program(pio=True, write=True, addr=0x500, width=8)
    with pytest.raises(ValueError):
        R.program(pio=False, write=True, addr=1 << 32, width=4)


# ------------------------------------------------------------------ taking interrupts


def effects(code: bytes) -> list[tuple[object, ...]]:
    """Run ``code`` -- the few real-mode instructions the builders emit -- as far as it
    goes: the port writes (``("out", port, value)``), MMIO writes through ebx, and
    ``sti``/``cli``/``iret``/``hlt``, in order. Checks that every push is popped before
    the ``iret`` or ``hlt`` that ends it; any other byte is an error."""
    regs = {"al": 0, "dx": 0, "ebx": 0}
    stack: list[str] = []
    out: list[tuple[object, ...]] = []
    i = 0
    while i < len(code):
        op = code[i]
        if op == 0xB0:  # mov al, imm8
            regs["al"], i = code[i + 1], i + 2
        elif op == 0xBA:  # mov dx, imm16
            regs["dx"], i = int.from_bytes(code[i + 1 : i + 3], "little"), i + 3
        elif code[i : i + 2] == b"\x66\xbb":  # mov ebx, imm32
            regs["ebx"], i = int.from_bytes(code[i + 2 : i + 6], "little"), i + 6
        elif op == 0xE6:  # out imm8, al
            out.append(("out", code[i + 1], regs["al"]))
            i += 2
        elif op == 0xEE:  # out dx, al
            out.append(("out", regs["dx"], regs["al"]))
            i += 1
        elif code[i : i + 4] == b"\x66\x67\x89\x03":  # mov [ebx], eax
            out.append(("mmio", regs["ebx"]))
            i += 4
        elif op in (0x50, 0x52) or code[i : i + 2] == b"\x66\x53":  # push ax / dx / ebx
            stack.append({0x50: "ax", 0x52: "dx"}.get(op, "ebx"))
            i += 2 if op == 0x66 else 1
        elif op in (0x58, 0x5A) or code[i : i + 2] == b"\x66\x5b":  # pop ax / dx / ebx
            assert stack.pop() == {0x58: "ax", 0x5A: "dx"}.get(op, "ebx")
            i += 2 if op == 0x66 else 1
        elif op in (0xFB, 0xFA, 0x90, 0xCF, 0xF4):
            name = {0xFB: "sti", 0xFA: "cli", 0x90: "nop", 0xCF: "iret", 0xF4: "hlt"}[op]
            if name in ("iret", "hlt"):
                assert not stack, f"{name} with {stack} still pushed"
            out.append((name,))
            i += 1
        else:
            raise AssertionError(f"unexpected byte {op:#x} at {i}")
    return out


def test_pic_init_programs_both_8259s_like_a_bios() -> None:
    base = R.PIC_VECTOR_BASE
    assert effects(R.pic_init_program()) == [
        ("out", 0x20, 0x11),  # ICW1: edge, cascade, ICW4 follows
        ("out", 0x21, base),  # ICW2: vector base
        ("out", 0x21, 0x04),  # ICW3: the slave on line 2
        ("out", 0x21, 0x01),  # ICW4: 8086 mode
        ("out", 0xA0, 0x11),
        ("out", 0xA1, base + 8),
        ("out", 0xA1, 0x02),  # ICW3: the slave's cascade identity
        ("out", 0xA1, 0x01),
        ("out", 0x21, 0x00),  # OCW1: nothing masked
        ("out", 0xA1, 0x00),
        ("out", R.DONE_PORT, 0x00),
        ("hlt",),
    ]


@pytest.mark.parametrize("gsi", [0, 5, 7])
def test_a_master_line_handler_eois_then_reports(gsi: int) -> None:
    assert effects(R.pic_handler(gsi)) == [
        ("out", 0x20, 0x20),
        ("out", R.TAKEN_PORT, gsi),
        ("iret",),
    ]


@pytest.mark.parametrize("gsi", [8, 10, 15])
def test_a_slave_line_handler_eois_the_slave_then_the_master(gsi: int) -> None:
    assert effects(R.pic_handler(gsi)) == [
        ("out", 0xA0, 0x20),
        ("out", 0x20, 0x20),
        ("out", R.TAKEN_PORT, gsi),
        ("iret",),
    ]


@pytest.mark.parametrize("gsi", list(R.IOAPIC_ONLY_PINS))
def test_an_ioapic_pin_handler_eois_the_local_apic(gsi: int) -> None:
    assert effects(R.lapic_handler(gsi)) == [
        ("mmio", R.LAPIC_EOI),
        ("out", R.TAKEN_PORT, gsi),
        ("iret",),
    ]


def test_the_vector_table_leads_each_vector_to_its_handler() -> None:
    image = dict(R.interrupt_image())
    ivt = image.pop(R.IVT_ADDR)
    assert len(ivt) == 256 * 4
    by_vector = {R.vector_of(g): g for g in range(24)}
    assert sorted(by_vector) == [*range(0x20, 0x30), *range(0x50, 0x58)]
    for vector in range(256):
        offset, segment = struct.unpack_from("<HH", ivt, 4 * vector)
        assert segment == 0 and offset == R.HANDLERS_ADDR + vector * R.HANDLER_SLOT
        code = image[offset]
        assert len(code) <= R.HANDLER_SLOT
        if vector in by_vector:
            assert ("out", R.TAKEN_PORT, by_vector[vector]) in effects(code)
        else:
            assert effects(code) == [("out", R.STRAY_PORT, vector), ("hlt",)]
    # Nothing the programs use overlaps: table, staged data, code, handlers, stack.
    assert R.IVT_ADDR + len(ivt) <= R.DATA_ADDR < R.DATA_ADDR + 8 <= R.CODE_ADDR
    assert R.CODE_ADDR + len(R.take_program()) <= R.HANDLERS_ADDR
    assert R.HANDLERS_ADDR + 256 * R.HANDLER_SLOT <= R.STACK_TOP - 0x100 < R.RAM_SIZE
    with pytest.raises(ValueError):
        R.vector_of(24)


def test_the_take_program_opens_a_window_of_exits() -> None:
    window = [("out", R.WINDOW_PORT, 0)] * R.TAKE_WINDOWS
    assert effects(R.take_program()) == [
        ("sti",),
        ("nop",),  # the instruction sti still keeps interrupts off for
        *window,
        ("cli",),
        ("out", R.DONE_PORT, 0),
        ("hlt",),
    ]
    assert R.TAKE_WINDOWS > 16 + 8  # one per line that can be pending, and one more
