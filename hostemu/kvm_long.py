"""Long mode (64-bit) for the kernel oracle's vCPU: MMIO at any guest-physical address.

The real-mode guest of :mod:`hostemu.kvm` reaches 32-bit addresses only. To write above
4 GiB, vCPU 0 is put straight into 64-bit mode through ``KVM_SET_SREGS`` -- no mode
switch is executed by the guest:

* CR0 = PE | ET | NE | PG, CR4 = PAE, EFER = LME | LMA, CR3 = :data:`PML4_ADDR`;
* a GDT at :data:`GDT_ADDR` (null, a 64-bit code segment, a flat data segment, a 64-bit
  TSS), and the segment registers loaded with exactly what those descriptors say (CS:
  L=1, D=0; the data segments flat; TR the busy 64-bit TSS the VMX entry checks want);
* 4-level page tables from :data:`PML4_ADDR` mapping 2 MiB pages *identically on the 48
  bits a page walk uses*: the guest-physical page ``p`` is at the canonical virtual
  address :func:`virtual` ``(p)`` (``p`` itself below 2**47, ``p`` sign-extended above).
  Only the pages a program needs are mapped: the first 2 MiB (code, data, tables, stack)
  and the ones the access touches.

The kernel accepts this state without any ``KVM_SET_CPUID2`` (it checks the consistency
of CR0/CR4/EFER, not the guest's CPUID, when they come through ``KVM_SET_SREGS``), and
this machine's ``kvm_pvm`` runs it. A guest-physical address has at most the guest's
MAXPHYADDR bits (:func:`phys_bits`, from ``KVM_GET_SUPPORTED_CPUID`` leaf 0x80000008; 48
here): beyond that a page-table entry has reserved bits set, the access faults, and with
no IDT the vCPU shuts down (``KVM_EXIT_SHUTDOWN``). 4-level paging maps 48 bits at most,
so :func:`program` refuses anything at or above 2**48.

:func:`program` builds the access: ``mov rbx, imm64`` (the virtual address), the value
into ``al``/``ax``/``eax``/``rax``, one ``mov [rbx], ...`` (or a load from it), then the
same ``out`` to :data:`~hostemu.kvm.DONE_PORT` and ``hlt`` as the real-mode programs.
:func:`run` loads it and runs it on a :class:`~hostemu.kvm.Vcpu`; the vCPU's next
real-mode program starts from its reset state again.
"""

from __future__ import annotations

import ctypes
import fcntl
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from hostemu import kvm as K
from hostemu import kvm_real as R

GDT_ADDR = 0x0500
"""Between the real-mode vector table (0x000-0x3ff) and :data:`~hostemu.kvm.DATA_ADDR`."""
PML4_ADDR = 0x4000
"""The page tables start here (after the interrupt handlers), one 4 KiB page each."""
TABLES_END = 0xC000
"""Room for the seven tables the worst case needs: the PML4, and a PDPT and a page
directory for each of the first 2 MiB, an access's first byte and its last byte."""
PAGE_2M = 1 << 21
MAPPABLE = 1 << 48
"""4-level paging translates 48 bits of address."""
CANONICAL_HIGH = 0xFFFF_0000_0000_0000

CODE_SEL, DATA_SEL, TSS_SEL = 0x08, 0x10, 0x18
CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_P, PTE_W, PTE_PS = 1 << 0, 1 << 1, 1 << 7

SEG_CODE = 0xB  # execute/read, accessed
SEG_DATA = 0x3  # read/write, accessed
SEG_TSS64_BUSY = 0xB


@dataclass(frozen=True)
class Segment:
    """One GDT descriptor, and what ``KVM_SET_SREGS`` loads for it."""

    selector: int
    type: int
    s: int  # 1: code/data, 0: system
    l: int  # noqa: E741 -- the uapi's name for the 64-bit code bit
    db: int
    g: int
    limit: int  # the 20-bit limit field (in pages when g)
    base: int = 0

    def descriptor(self) -> bytes:
        """The 8-byte descriptor (16 bytes for a system descriptor: its base's upper half
        follows)."""
        access = 0x80 | self.s << 4 | self.type  # present, DPL 0
        flags = self.g << 3 | self.db << 2 | self.l << 1
        low = (
            (self.limit & 0xFFFF)
            | (self.base & 0xFFFFFF) << 16
            | access << 40
            | (self.limit >> 16 & 0xF) << 48
            | flags << 52
            | (self.base >> 24 & 0xFF) << 56
        )
        out = struct.pack("<Q", low)
        if not self.s:
            out += struct.pack("<Q", self.base >> 32)
        return out

    def load(self, seg: K.KvmSegment) -> None:
        seg.base, seg.selector, seg.type = self.base, self.selector, self.type
        seg.limit = (self.limit << 12 | 0xFFF) if self.g else self.limit
        seg.present, seg.dpl, seg.s, seg.l, seg.db, seg.g = 1, 0, self.s, self.l, self.db, self.g
        seg.avl, seg.unusable = 0, 0


CODE64 = Segment(CODE_SEL, SEG_CODE, s=1, l=1, db=0, g=1, limit=0xFFFFF)
DATA = Segment(DATA_SEL, SEG_DATA, s=1, l=0, db=1, g=1, limit=0xFFFFF)
TSS64 = Segment(TSS_SEL, SEG_TSS64_BUSY, s=0, l=0, db=0, g=0, limit=0x67)


def gdt() -> bytes:
    """Null, :data:`CODE64`, :data:`DATA`, :data:`TSS64` (at their selectors)."""
    return bytes(8) + CODE64.descriptor() + DATA.descriptor() + TSS64.descriptor()


def virtual(phys: int) -> int:
    """The canonical virtual address whose low 48 bits are ``phys``: where the page
    tables of :func:`page_tables` put guest-physical ``phys``."""
    if not 0 <= phys < MAPPABLE:
        raise ValueError(f"{phys:#x} is beyond the 48 bits 4-level paging maps")
    return phys | CANONICAL_HIGH if phys >> 47 else phys


def page_tables(addrs: Iterable[int]) -> list[tuple[int, bytes]]:
    """4-level tables from :data:`PML4_ADDR` mapping the first 2 MiB and the 2 MiB page of
    each of ``addrs``, each at :func:`virtual` of its guest-physical address; as
    (guest-physical address, 4 KiB table) pairs, the PML4 first."""
    tables: dict[int, bytearray] = {PML4_ADDR: bytearray(4096)}

    def child(table: int, index: int) -> int:
        (entry,) = struct.unpack_from("<Q", tables[table], index * 8)
        if entry & PTE_P:
            return int(entry & ~0xFFF)
        at = PML4_ADDR + 4096 * len(tables)
        if at >= TABLES_END:
            raise ValueError("the page tables outgrew their space")
        tables[at] = bytearray(4096)
        struct.pack_into("<Q", tables[table], index * 8, at | PTE_P | PTE_W)
        return at

    for phys in (0, *addrs):
        page = virtual(phys) & ~(PAGE_2M - 1)
        pdpt = child(PML4_ADDR, page >> 39 & 511)
        pd = child(pdpt, page >> 30 & 511)
        entry = (phys & ~(PAGE_2M - 1)) | PTE_P | PTE_W | PTE_PS
        struct.pack_into("<Q", tables[pd], (page >> 21 & 511) * 8, entry)
    return [(at, bytes(t)) for at, t in tables.items()]


def long_mode_sregs(sregs: K.KvmSregs) -> None:
    """Turn ``sregs`` into 64-bit mode with :func:`gdt` and the tables at
    :data:`PML4_ADDR` (see the module docstring)."""
    CODE64.load(sregs.cs)
    for name in ("ds", "es", "fs", "gs", "ss"):
        DATA.load(getattr(sregs, name))
    TSS64.load(sregs.tr)
    sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, len(gdt()) - 1
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


@dataclass(frozen=True)
class Program:
    """A 64-bit program and the memory it needs besides its code."""

    code: bytes
    image: tuple[tuple[int, bytes], ...]


_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
_DONE = b"\x66\xba" + struct.pack("<H", R.DONE_PORT) + b"\xee\xf4"  # mov dx ; out dx, al ; hlt


def _mov_acc(width: int, value: int) -> bytes:
    if width == 1:
        return b"\xb0" + struct.pack("<B", value)  # mov al, imm8
    if width == 2:
        return b"\x66\xb8" + struct.pack("<H", value)  # mov ax, imm16
    if width == 4:
        return b"\xb8" + struct.pack("<I", value)  # mov eax, imm32
    return b"\x48\xb8" + struct.pack("<Q", value)  # mov rax, imm64


_STORE = {1: b"\x88\x03", 2: b"\x66\x89\x03", 4: b"\x89\x03", 8: b"\x48\x89\x03"}
"""``mov [rbx], al/ax/eax/rax``."""
_LOAD = {1: b"\x8a\x03", 2: b"\x66\x8b\x03", 4: b"\x8b\x03", 8: b"\x48\x8b\x03"}
"""``mov al/ax/eax/rax, [rbx]``."""


def program(*, write: bool, addr: int, width: int, value: int = 0) -> Program:
    """One MMIO access of ``width`` bytes at guest-physical ``addr`` (``value`` cut to
    ``width`` bytes), then done."""
    if width not in _MASK:
        raise ValueError(f"an access is 1, 2, 4 or 8 bytes wide, not {width}")
    if not 0 <= addr <= MAPPABLE - width:
        raise ValueError(f"{addr:#x}/{width} is beyond the 48 bits 4-level paging maps")
    if addr < 1 << 47 < addr + width:
        raise ValueError(f"{addr:#x}/{width} crosses 2**47, where virtual addresses jump")
    code = b"\x48\xbb" + struct.pack("<Q", virtual(addr))  # mov rbx, imm64
    if write:
        code += _mov_acc(width, value & _MASK[width]) + _STORE[width]
    else:
        code += _LOAD[width]
    image = ((GDT_ADDR, gdt()), *page_tables((addr, addr + width - 1)))
    return Program(code + _DONE, image)


def run(vcpu: K.Vcpu, prog: Program, max_exits: int = 16) -> list[K.Exit]:
    """Run ``prog`` on ``vcpu`` in 64-bit mode; return the exits it caused."""
    ram = vcpu.vm.ram
    for at, blob in prog.image:
        ram[at : at + len(blob)] = blob
    ram[R.CODE_ADDR : R.CODE_ADDR + len(prog.code)] = prog.code
    sregs = vcpu.reset_sregs()
    long_mode_sregs(sregs)
    K._ioctl(vcpu.fd, K.KVM_SET_SREGS, sregs)
    K._ioctl(vcpu.fd, K.KVM_SET_REGS, K.KvmRegs(rip=R.CODE_ADDR, rflags=0x2, rsp=R.STACK_TOP))
    return vcpu.run_loop(max_exits)


# ------------------------------------------------------------------ the guest's CPUID


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = (
        *((name, K.u32) for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")),
        ("padding", K.u32 * 3),
    )


class KvmCpuid2(ctypes.Structure):
    """The header of ``struct kvm_cpuid2`` (its entries follow it)."""

    _fields_ = (("nent", K.u32), ("padding", K.u32))


KVM_GET_SUPPORTED_CPUID = K._IOWR(K.KVMIO, 0x05, KvmCpuid2)
KVM_SET_CPUID2 = K._IOW(K.KVMIO, 0x90, KvmCpuid2)
_MAX_ENTRIES = 256


class _CpuidBuffer(ctypes.Structure):
    _fields_ = (("head", KvmCpuid2), ("entries", KvmCpuidEntry2 * _MAX_ENTRIES))


def _supported(kvm: K.Kvm) -> _CpuidBuffer:
    buf = _CpuidBuffer()
    buf.head.nent = _MAX_ENTRIES
    fcntl.ioctl(kvm.fd, KVM_GET_SUPPORTED_CPUID, buf, True)
    return buf


def supported_cpuid(kvm: K.Kvm) -> list[KvmCpuidEntry2]:
    """``KVM_GET_SUPPORTED_CPUID``: what a guest's CPUID may say on this host."""
    buf = _supported(kvm)
    return list(buf.entries[: buf.head.nent])


def set_supported_cpuid(kvm: K.Kvm, vcpu_fd: int) -> None:
    """Give a new vCPU every CPUID leaf the host supports (``KVM_SET_CPUID2``, before its
    first ``KVM_RUN``). Without it the guest's MAXPHYADDR is 36 bits: an identity-mapped
    page at or above 2**36 has reserved bits set, the access faults and the vCPU shuts
    down (asked of this machine's kernel: a write at 2**47 - 8 did)."""
    fcntl.ioctl(vcpu_fd, KVM_SET_CPUID2, _supported(kvm), True)


def phys_bits(kvm: K.Kvm) -> int:
    """The guest's MAXPHYADDR: leaf 0x80000008's EAX bits 7:0 (36 if the leaf is absent,
    the architectural default)."""
    for e in supported_cpuid(kvm):
        if e.function == 0x8000_0008:
            return int(e.eax & 0xFF)
    return 36
