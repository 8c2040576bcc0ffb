"""The long-mode part of the KVM binding: the CPUID structures and ioctls against the uapi
header, the GDT and the segments loaded for it, the page tables (walked here as the MMU
would), and the 64-bit programs (decoded here). No KVM is needed."""

from __future__ import annotations

import ctypes
import struct

import pytest

from hostemu import kvm as K
from hostemu import kvm_long as L
from hostemu import kvm_real as R


def test_cpuid_layouts_and_ioctls() -> None:
    assert ctypes.sizeof(L.KvmCpuidEntry2) == 40
    assert L.KvmCpuidEntry2.edx.offset == 24 and L.KvmCpuidEntry2.padding.offset == 28
    assert ctypes.sizeof(L.KvmCpuid2) == 8
    assert L.KVM_GET_SUPPORTED_CPUID == 0xC008AE05  # _IOWR, 8 bytes
    assert L.KVM_SET_CPUID2 == 0x4008AE90  # _IOW, 8 bytes


def _decode(desc: int) -> dict[str, int]:
    access, flags = desc >> 40 & 0xFF, desc >> 52 & 0xF
    return {
        "limit": (desc & 0xFFFF) | (desc >> 48 & 0xF) << 16,
        "base": (desc >> 16 & 0xFFFFFF) | (desc >> 56 & 0xFF) << 24,
        "type": access & 0xF,
        "s": access >> 4 & 1,
        "dpl": access >> 5 & 3,
        "present": access >> 7,
        "l": flags >> 1 & 1,
        "db": flags >> 2 & 1,
        "g": flags >> 3 & 1,
    }


def test_the_sregs_load_what_the_gdt_says() -> None:
    table = L.gdt()
    sregs = K.KvmSregs()
    L.long_mode_sregs(sregs)
    assert (sregs.gdt.base, sregs.gdt.limit) == (L.GDT_ADDR, len(table) - 1)
    assert sregs.cr0 == 0x8000_0031 and sregs.cr4 == 0x20 and sregs.efer == 0x500
    assert sregs.cr3 == L.PML4_ADDR
    for name, sel in (("cs", 8), ("ds", 0x10), ("ss", 0x10), ("es", 0x10), ("tr", 0x18)):
        seg = getattr(sregs, name)
        assert seg.selector == sel
        d = _decode(struct.unpack_from("<Q", table, sel)[0])
        assert (d["type"], d["s"], d["present"], d["dpl"], d["l"], d["db"], d["g"]) == (
            seg.type,
            seg.s,
            seg.present,
            seg.dpl,
            seg.l,
            seg.db,
            seg.g,
        ), name
        assert seg.limit == ((d["limit"] << 12 | 0xFFF) if d["g"] else d["limit"])
        assert seg.base == d["base"] == 0
    assert (sregs.cs.l, sregs.cs.db) == (1, 0)  # 64-bit code
    assert (sregs.tr.type, sregs.tr.s) == (0xB, 0)  # a busy 64-bit TSS
    assert len(table) == 8 * 5  # null, code, data, and the TSS's 16 bytes


def test_virtual_addresses_are_canonical() -> None:
    assert L.virtual(0x40_D000_0000) == 0x40_D000_0000
    assert L.virtual(0x8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert L.virtual(0xFFFF_FFFF_FFF8) == 0xFFFF_FFFF_FFFF_FFF8
    with pytest.raises(ValueError):
        L.virtual(1 << 48)


def _walk(image: dict[int, bytes], va: int) -> int | None:
    """Translate ``va`` with the tables in ``image`` (4-level, 2 MiB leaves)."""
    table = L.PML4_ADDR
    for shift in (39, 30):
        (entry,) = struct.unpack_from("<Q", image[table], (va >> shift & 511) * 8)
        if not entry & L.PTE_P:
            return None
        assert not entry & L.PTE_PS and entry & L.PTE_W
        table = entry & ~0xFFF & ((1 << 52) - 1)
    (entry,) = struct.unpack_from("<Q", image[table], (va >> 21 & 511) * 8)
    if not entry & L.PTE_P:
        return None
    assert entry & L.PTE_PS  # a 2 MiB page
    return int(entry & ~(L.PAGE_2M - 1) & ((1 << 52) - 1)) | va & (L.PAGE_2M - 1)


@pytest.mark.parametrize(
    "addrs",
    [
        (0x40_D000_0000,),
        ((1 << 32) - 4, (1 << 32) + 3),
        (0xFFFF_FFFF_FFF8, 0xFFFF_FFFF_FFFF),
        (0x7FFF_FFFF_FFFC, 0x8000_0000_0003),  # the worst case: seven tables
    ],
)
def test_page_tables_map_each_page_at_its_canonical_address(addrs: tuple[int, ...]) -> None:
    tables = L.page_tables(addrs)
    assert tables[0][0] == L.PML4_ADDR
    image = dict(tables)
    for at, blob in tables:
        assert len(blob) == 4096 and at % 4096 == 0
        assert L.PML4_ADDR <= at < L.TABLES_END
    for phys in (0, R.CODE_ADDR, R.DATA_ADDR, L.GDT_ADDR, R.STACK_TOP - 8, *addrs):
        assert _walk(image, L.virtual(phys)) == phys
    assert _walk(image, L.virtual(0x7_0000_0000)) is None  # nothing else is mapped


def test_the_tables_fit_between_the_handlers_and_the_stack() -> None:
    handlers_end = R.HANDLERS_ADDR + 256 * R.HANDLER_SLOT
    assert handlers_end <= L.PML4_ADDR and L.TABLES_END <= R.STACK_TOP - 0x1000
    assert L.GDT_ADDR >= R.IVT_ADDR + 256 * 4 and L.GDT_ADDR + len(L.gdt()) <= R.DATA_ADDR


def _run64(code: bytes) -> list[tuple[object, ...]]:
    """Decode the few 64-bit instructions :func:`L.program` emits, as effects."""
    regs = {"rbx": 0, "acc": 0, "dx": 0}
    out: list[tuple[object, ...]] = []
    store = {v: w for w, v in L._STORE.items()}
    load = {v: w for w, v in L._LOAD.items()}
    i = 0
    while i < len(code):
        if code[i : i + 2] == b"\x48\xbb":  # mov rbx, imm64
            regs["rbx"], i = int.from_bytes(code[i + 2 : i + 10], "little"), i + 10
        elif code[i : i + 2] == b"\x48\xb8":  # mov rax, imm64
            regs["acc"], i = int.from_bytes(code[i + 2 : i + 10], "little"), i + 10
        elif code[i] == 0xB8:  # mov eax, imm32
            regs["acc"], i = int.from_bytes(code[i + 1 : i + 5], "little"), i + 5
        elif code[i : i + 2] == b"\x66\xb8":  # mov ax, imm16
            regs["acc"], i = int.from_bytes(code[i + 2 : i + 4], "little"), i + 4
        elif code[i] == 0xB0:  # mov al, imm8
            regs["acc"], i = code[i + 1], i + 2
        elif code[i : i + 2] == b"\x66\xba":  # mov dx, imm16
            regs["dx"], i = int.from_bytes(code[i + 2 : i + 4], "little"), i + 4
        elif code[i] == 0xEE:  # out dx, al
            out.append(("out", regs["dx"]))
            i += 1
        elif code[i] == 0xF4:
            out.append(("hlt",))
            i += 1
        else:
            for table, kind in ((store, "store"), (load, "load")):
                hit = next((op for op in table if code[i : i + len(op)] == op), None)
                if hit is not None:
                    out.append((kind, regs["rbx"], table[hit], regs["acc"]))
                    i += len(hit)
                    break
            else:
                raise AssertionError(f"unexpected byte {code[i]:#x} at {i}")
    return out


@pytest.mark.parametrize("width", [1, 2, 4, 8])
@pytest.mark.parametrize("addr", [0x40_D000_0000, 0xFFFF_FFFF_FFF8])
def test_program_stores_the_value_at_the_address(width: int, addr: int) -> None:
    prog = L.program(write=True, addr=addr, width=width, value=0x1122_3344_5566_7788)
    value = 0x1122_3344_5566_7788 & ((1 << 8 * width) - 1)
    assert _run64(prog.code) == [
        ("store", L.virtual(addr), width, value),
        ("out", R.DONE_PORT),
        ("hlt",),
    ]
    image = dict(prog.image)
    assert image[L.GDT_ADDR] == L.gdt()
    assert _walk(image, L.virtual(addr)) == addr


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_program_loads(width: int) -> None:
    prog = L.program(write=False, addr=1 << 40, width=width)
    assert _run64(prog.code)[0] == ("load", 1 << 40, width, 0)


def test_program_refuses_what_4_level_paging_cannot_reach() -> None:
    with pytest.raises(ValueError):
        L.program(write=True, addr=0xFFFF_FFFF_FFF9, width=8)
    with pytest.raises(ValueError):
        L.program(write=True, addr=1 << 40, width=3)
    with pytest.raises(ValueError, match="2\\*\\*47"):
        L.program(write=True, addr=(1 << 47) - 4, width=8)
