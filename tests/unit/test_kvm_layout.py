"""The KVM binding's ioctl numbers and structure layouts, against include/uapi/linux/kvm.h.

The expected sizes and offsets were read off the uapi header (x86-64): every field is
naturally aligned, so they follow from the declarations; the ioctl numbers follow from
``_IOC(dir, 0xAE, nr, sizeof)``. No KVM is needed for these checks.
"""

from __future__ import annotations

import ctypes

import pytest

from hostemu import kvm as K

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
    code, _ = K.program(pio=pio, write=True, addr=0x500, width=width, value=0x1FF)
    assert code.endswith(b"\xba" + K.DONE_PORT.to_bytes(2, "little") + b"\xee\xf4")


def test_program_refuses_what_real_mode_cannot_do() -> None:
    with pytest.raises(ValueError):
        K.program(pio=True, write=True, addr=0x500, width=8)
    with pytest.raises(ValueError):
        K.program(pio=False, write=True, addr=1 << 32, width=4)
