"""A thin, typed binding to the real KVM: the kernel oracle vbusemu checks itself against.

Only ``fcntl.ioctl``, ``os``, ``mmap`` and ``ctypes``: ioctl numbers are computed from the
``_IO``/``_IOW``/``_IOR``/``_IOWR`` encoding of ``include/uapi/linux/ioctl.h``, structure
layouts are ctypes declarations (``tests/unit/test_kvm_layout.py`` checks their sizes and
offsets against the uapi header). It does just enough for the conformance scenarios:

* :class:`Kvm` (``/dev/kvm``) -> :class:`Vm` (``KVM_CREATE_VM``; optionally
  ``KVM_CREATE_IRQCHIP``; one page-aligned RAM slot) -> :class:`Vcpu` (``KVM_CREATE_VCPU``,
  the ``kvm_run`` mmap, a real-mode start).
* ``KVM_IRQFD`` / ``KVM_IOEVENTFD`` as plain calls that raise ``OSError`` with the
  kernel's errno.
* :func:`program` builds a tiny real-mode program: one ``out``/``in`` of width 1, 2 or 4
  at a port, or one MMIO ``mov`` of width 1, 2, 4 or 8 to a 32-bit address, then a write
  to :data:`DONE_PORT` and ``hlt``. :meth:`Vcpu.run_program` runs it and returns every
  exit to userspace it caused (an access an ioeventfd absorbed causes none).
* :meth:`Vm.pic_irr` (``KVM_GET_IRQCHIP``) shows which legacy lines were raised, and
  :meth:`Vm.ioapic_requests` (``KVM_GET_LAPIC``, after :meth:`Vm.route_ioapic_pins`)
  which of the IOAPIC-only gsis 16-23; :meth:`Vm.pic_levels` which legacy lines are held
  high (a resampling irqfd's level).
* :meth:`Vm.init_interrupts` gives the guest an interrupt vector table, one handler per
  line, and an initialised 8259 pair; :meth:`Vcpu.take_interrupts` runs
  :func:`take_program` (``sti``, a window, ``cli``): the vCPU takes every pending
  interrupt, each handler EOIs it (which is what makes KVM de-assert a resampling
  irqfd's line and signal its resamplefd) and reports its gsi at :data:`TAKEN_PORT`.

How the guest reaches any address from real mode: the vCPU starts in "unreal mode" -- DS
has base 0 and a 4 GiB limit (set with ``KVM_SET_SREGS``) -- so an address-size prefix
(``0x67``) makes ``mov [ebx], ...`` reach any 32-bit physical address. An 8-byte MMIO
write uses the MMX ``movq [ebx], mm0`` (loaded from RAM first): MMX needs no CR4 bits and
no guest CPUID setup, and KVM's instruction emulator completes it as one 8-byte MMIO
access. (SSE would need CR4.OSFXSR, which KVM refuses unless CPUID advertises FXSR.) MMIO
above 4 GiB is made from 64-bit mode instead: :mod:`hostemu.kvm_long`, which also gives
every vCPU the host's supported CPUID when it is created.

Why the program ends with an ``out`` rather than ``hlt`` alone: with an in-kernel irqchip
``hlt`` is handled inside the kernel (the vCPU sleeps there until an interrupt), so it
never returns to userspace. The final ``out`` to :data:`DONE_PORT` does, in both cases.

How the guest takes interrupts: the programs above run with interrupts disabled (IF=0),
so a raised line only stays requested. :func:`take_program` enables them for a window of
:data:`TAKE_WINDOWS` writes to :data:`WINDOW_PORT`, each an exit to userspace. The x86
rule is that an interrupt is taken after the instruction that follows ``sti``, but a KVM
that emulates a real-mode guest instruction by instruction (the ``kvm_pvm`` module does)
looks for pending interrupts only when it enters the guest again: each exit is a chance
for one more interrupt, and where the first is taken at once the rest cost nothing.

The handlers' table (:func:`interrupt_image`): the PIC pair is programmed with vector
bases :data:`PIC_VECTOR_BASE` (master) and +8 (slave); the IOAPIC-only pins use the
vectors :meth:`Vm.route_ioapic_pins` programs. A PIC handler sends a non-specific EOI
(``out 0x20, 0x20``; to the slave first for gsi 8-15), a local APIC one writes the APIC's
EOI register; then each writes its gsi to :data:`TAKEN_PORT` and returns (``iret``).
Every other vector leads to a stub that reports it at :data:`STRAY_PORT`:
:meth:`Vcpu.take_interrupts` raises on it.

The programs and the guest layout named here live in :mod:`hostemu.kvm_real`. Every fd
and mapping is owned by a context manager; :func:`unusable` says why KVM cannot
be used here (for tests to skip with a reason), or ``None``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

from hostemu.kvm_real import (
    CODE_ADDR,
    DATA_ADDR,
    DONE_PORT,
    IOAPIC_ONLY_PINS,
    IOAPIC_VECTOR_BASE,
    RAM_SIZE,
    STACK_TOP,
    STRAY_PORT,
    TAKE_WINDOWS,
    TAKEN_PORT,
    TSS_ADDR,
    WINDOW_PORT,
    interrupt_image,
    pic_init_program,
    take_program,
)

# ------------------------------------------------------------------ ioctl encoding

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the size field")
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(kind: int, nr: int) -> int:
    return _ioc(_IOC_NONE, kind, nr, 0)


def _IOW(kind: int, nr: int, struct_type: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, kind, nr, ctypes.sizeof(struct_type))


def _IOR(kind: int, nr: int, struct_type: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, kind, nr, ctypes.sizeof(struct_type))


def _IOWR(kind: int, nr: int, struct_type: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, ctypes.sizeof(struct_type))


# ------------------------------------------------------------------ structures (uapi)

u8, u16, u32, u64, s32 = (
    ctypes.c_uint8,
    ctypes.c_uint16,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_int32,
)


class KvmIrqfd(ctypes.Structure):
    _fields_ = (("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16))


class KvmIoeventfd(ctypes.Structure):
    _fields_ = (
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    )


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = (
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    )


class KvmPicState(ctypes.Structure):
    _fields_ = tuple(
        (name, u8)
        for name in (
            "last_irr",
            "irr",
            "imr",
            "isr",
            "priority_add",
            "irq_base",
            "read_reg_select",
            "poll",
            "special_mask",
            "init_state",
            "auto_eoi",
            "rotate_on_auto_eoi",
            "special_fully_nested_mode",
            "init4",
            "elcr",
            "elcr_mask",
        )
    )


IOAPIC_NUM_PINS = 24


class KvmIoapicState(ctypes.Structure):
    # Each redirection entry is one u64; the bit fields are decoded by ioapic_entry().
    _fields_ = (
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * IOAPIC_NUM_PINS),
    )


class _IrqchipUnion(ctypes.Union):
    _fields_ = (("dummy", ctypes.c_char * 512), ("pic", KvmPicState), ("ioapic", KvmIoapicState))


class KvmIrqchip(ctypes.Structure):
    _fields_ = (("chip_id", u32), ("pad", u32), ("chip", _IrqchipUnion))


class KvmLapicState(ctypes.Structure):
    """The local APIC's register page (``struct kvm_lapic_state``)."""

    _fields_ = (("regs", ctypes.c_uint8 * 1024),)


class KvmSegment(ctypes.Structure):
    _fields_ = (
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    )


class KvmDtable(ctypes.Structure):
    _fields_ = (("base", u64), ("limit", u16), ("padding", u16 * 3))


class KvmSregs(ctypes.Structure):
    _fields_ = (
        *((name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *((name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", u64 * 4),
    )


class KvmRegs(ctypes.Structure):
    _fields_ = tuple(
        (name, u64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    )


class KvmRunIo(ctypes.Structure):
    _fields_ = (
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    )


class KvmRunMmio(ctypes.Structure):
    _fields_ = (("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8))


class _KvmRunExit(ctypes.Union):
    _fields_ = (("io", KvmRunIo), ("mmio", KvmRunMmio), ("padding", ctypes.c_char * 256))


class KvmRunHead(ctypes.Structure):
    """The start of ``struct kvm_run`` up to the exit union (x86: no s390 fields)."""

    _fields_ = (
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", _KvmRunExit),
    )


# ------------------------------------------------------------------ constants

KVMIO = 0xAE
KVM_API_VERSION = 12
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, KvmIrqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, KvmIrqchip)
KVM_IRQFD = _IOW(KVMIO, 0x76, KvmIrqfd)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, KvmIoeventfd)
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, KvmRegs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, KvmRegs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, KvmSregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, KvmSregs)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, KvmLapicState)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, KvmLapicState)

KVM_CAP_IRQCHIP = 0
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQFD_RESAMPLE = 82

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2

APIC_SVR, APIC_SVR_ENABLE, APIC_IRR = 0xF0, 0x100, 0x200


class KvmUnavailable(RuntimeError):
    """``/dev/kvm`` is missing or unusable here."""


def unusable() -> str | None:
    """Why the kernel oracle cannot run here, or ``None`` when it can."""
    try:
        with Kvm() as kvm, kvm.create_vm(irqchip=True):
            return None
    except KvmUnavailable as e:
        return str(e)
    except OSError as e:
        return f"KVM refused a minimal VM: {e}"


def _ioctl(fd: int, request: int, arg: int | ctypes.Structure = 0) -> int:
    """One ioctl; ``OSError`` carries the kernel's errno."""
    if isinstance(arg, ctypes.Structure):
        return fcntl.ioctl(fd, request, arg, True)  # type: ignore[no-any-return]
    return fcntl.ioctl(fd, request, arg)


class Kvm:
    """``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from e
        try:
            version = _ioctl(self.fd, KVM_GET_API_VERSION)
            if version != KVM_API_VERSION:
                raise KvmUnavailable(f"{path} speaks KVM API {version}, not {KVM_API_VERSION}")
            for cap, name in (
                (KVM_CAP_IRQFD, "irqfd"),
                (KVM_CAP_IOEVENTFD, "ioeventfd"),
                (KVM_CAP_IRQCHIP, "an in-kernel irqchip"),
            ):
                if _ioctl(self.fd, KVM_CHECK_EXTENSION, cap) <= 0:
                    raise KvmUnavailable(f"this KVM has no {name}")
            self.vcpu_mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def create_vm(self, *, irqchip: bool) -> Vm:
        return Vm(self, irqchip=irqchip)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Exit:
    """One exit to userspace caused by a guest access."""

    pio: bool
    write: bool
    addr: int
    len: int
    value: int

    def describe(self) -> str:
        bus = "pio" if self.pio else "mmio"
        op = "write" if self.write else "read"
        return f"{bus} {op} {self.addr:#x}/{self.len}" + (f"={self.value:#x}" if self.write else "")


class Vm:
    """A VM fd with one RAM slot, optionally an in-kernel irqchip, and one vCPU on demand."""

    def __init__(self, kvm: Kvm, *, irqchip: bool) -> None:
        self.kvm = kvm
        self.irqchip = irqchip
        self._stack = contextlib.ExitStack()
        try:
            self.fd = _ioctl(kvm.fd, KVM_CREATE_VM, 0)
            self._stack.callback(self._close_fd)
            _ioctl(self.fd, KVM_SET_TSS_ADDR, TSS_ADDR)
            if irqchip:
                _ioctl(self.fd, KVM_CREATE_IRQCHIP)
            self.ram = self._stack.enter_context(mmap.mmap(-1, RAM_SIZE))
            addr = ctypes.addressof(ctypes.c_char.from_buffer(self.ram))
            region = KvmUserspaceMemoryRegion(
                slot=0, flags=0, guest_phys_addr=0, memory_size=RAM_SIZE, userspace_addr=addr
            )
            _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        except BaseException:
            self._stack.close()
            raise
        self._vcpu: Vcpu | None = None

    def _close_fd(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Tear the VM down: the vCPU, the RAM mapping, then the VM fd (KVM destroys the VM
        when its last reference goes, deactivating every irqfd and ioeventfd)."""
        if self._vcpu is not None:
            self._vcpu.close()
            self._vcpu = None
        self._stack.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- eventfd bindings

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        _ioctl(
            self.fd,
            KVM_IRQFD,
            KvmIrqfd(fd=fd & 0xFFFFFFFF, gsi=gsi, flags=flags, resamplefd=resamplefd & 0xFFFFFFFF),
        )

    def ioeventfd(
        self, fd: int, addr: int, length: int, flags: int = 0, datamatch: int = 0
    ) -> None:
        _ioctl(
            self.fd,
            KVM_IOEVENTFD,
            KvmIoeventfd(datamatch=datamatch, addr=addr, len=length, fd=fd, flags=flags),
        )

    # -------------------------------------------------------------- interrupt state

    def get_irqchip(self, chip_id: int) -> KvmIrqchip:
        chip = KvmIrqchip(chip_id=chip_id)
        _ioctl(self.fd, KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: KvmIrqchip) -> None:
        _ioctl(self.fd, KVM_SET_IRQCHIP, chip)

    def pic_irr(self) -> int:
        """The 16 legacy lines' request bits (master in bits 0-7, slave in 8-15).

        A request on the slave also raises the master's cascade input (line 2); that bit
        is left out while the slave has a request, so that bit 2 means gsi 2."""
        master = int(self.get_irqchip(KVM_IRQCHIP_PIC_MASTER).chip.pic.irr)
        slave = int(self.get_irqchip(KVM_IRQCHIP_PIC_SLAVE).chip.pic.irr)
        if slave:
            master &= ~(1 << 2)
        return master | slave << 8

    def clear_pic_irr(self) -> None:
        """Forget every request latched so far, so the next one can be seen. The slave
        first: clearing the master while the slave still requests would re-raise the
        cascade line."""
        for chip_id in (KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_PIC_MASTER):
            chip = self.get_irqchip(chip_id)
            chip.chip.pic.irr = 0
            self.set_irqchip(chip)

    def pic_levels(self) -> int:
        """The 16 legacy lines held high (master in bits 0-7, slave in 8-15): the PIC's
        ``last_irr``, the level it last saw on each input. An irqfd's edge is a pulse
        (high, then low at once); a resampling irqfd holds its line high until the
        guest's EOI or the irqfd's detach."""
        master = int(self.get_irqchip(KVM_IRQCHIP_PIC_MASTER).chip.pic.last_irr)
        slave = int(self.get_irqchip(KVM_IRQCHIP_PIC_SLAVE).chip.pic.last_irr)
        return master | slave << 8

    def latched(self) -> Latched:
        """Every interrupt request latched so far, not yet taken by the vCPU."""
        regs = bytes(self.vcpu().get_lapic().regs)
        return Latched(
            master=int(self.get_irqchip(KVM_IRQCHIP_PIC_MASTER).chip.pic.irr),
            slave=int(self.get_irqchip(KVM_IRQCHIP_PIC_SLAVE).chip.pic.irr),
            lapic=tuple(
                int.from_bytes(regs[APIC_IRR + 0x10 * w : APIC_IRR + 0x10 * w + 4], "little")
                for w in range(8)
            ),
        )

    def relatch(self, saved: Latched) -> None:
        """Latch ``saved``'s requests again, on top of what is latched now (the slave
        first, so its cascade input reaches the master before the master is set)."""
        for chip_id, bits in (
            (KVM_IRQCHIP_PIC_SLAVE, saved.slave),
            (KVM_IRQCHIP_PIC_MASTER, saved.master),
        ):
            if bits:
                chip = self.get_irqchip(chip_id)
                chip.chip.pic.irr |= bits
                self.set_irqchip(chip)
        if any(saved.lapic):
            vcpu = self.vcpu()
            lapic = vcpu.get_lapic()
            for w, bits in enumerate(saved.lapic):
                at = APIC_IRR + 0x10 * w
                now = int.from_bytes(bytes(lapic.regs[at : at + 4]), "little")
                lapic.regs[at : at + 4] = tuple((now | bits).to_bytes(4, "little"))
            vcpu.set_lapic(lapic)

    def init_interrupts(self) -> None:
        """Let the guest take interrupts: load the vector table and the handlers
        (:func:`interrupt_image`) and run :func:`pic_init_program` on vCPU 0."""
        for addr, blob in interrupt_image():
            self.ram[addr : addr + len(blob)] = blob
        exits = self.vcpu().run_program(pic_init_program())
        if exits:
            raise RuntimeError(f"initialising the PIC exited to userspace: {exits}")

    def ioapic(self) -> KvmIoapicState:
        state: KvmIoapicState = self.get_irqchip(KVM_IRQCHIP_IOAPIC).chip.ioapic
        return state

    def route_ioapic_pins(self) -> None:
        """Make edges on gsi 16-23 observable: the IOAPIC does not latch an edge request
        (the falling half of an irqfd's pulse clears its IRR), so program those pins --
        fixed delivery, edge, unmasked, vector :data:`IOAPIC_VECTOR_BASE` + pin -- to
        vCPU 0 and software-enable its local APIC, whose IRR then keeps the vector (the
        guest runs with interrupts disabled and never accepts it). Pins 0-15 stay masked
        in the IOAPIC: the PIC shows those."""
        vcpu = self.vcpu()
        chip = self.get_irqchip(KVM_IRQCHIP_IOAPIC)
        for pin in IOAPIC_ONLY_PINS:
            chip.chip.ioapic.redirtbl[pin] = IOAPIC_VECTOR_BASE + pin  # dest 0, physical
        self.set_irqchip(chip)
        lapic = vcpu.get_lapic()
        svr = int.from_bytes(bytes(lapic.regs[APIC_SVR : APIC_SVR + 4]), "little")
        lapic.regs[APIC_SVR + 1] = (svr | APIC_SVR_ENABLE) >> 8 & 0xFF
        vcpu.set_lapic(lapic)

    def ioapic_requests(self) -> int:
        """Bit ``p`` set for each pin of :data:`IOAPIC_ONLY_PINS` whose vector vCPU 0's
        local APIC holds requested (see :meth:`route_ioapic_pins`)."""
        regs = bytes(self.vcpu().get_lapic().regs)
        irr = 0
        for word in range(8):
            at = APIC_IRR + 0x10 * word
            irr |= int.from_bytes(regs[at : at + 4], "little") << (32 * word)
        return sum(1 << pin for pin in IOAPIC_ONLY_PINS if irr >> (IOAPIC_VECTOR_BASE + pin) & 1)

    def clear_ioapic_requests(self) -> None:
        """Forget every vector vCPU 0's local APIC holds requested."""
        vcpu = self.vcpu()
        lapic = vcpu.get_lapic()
        for word in range(8):
            at = APIC_IRR + 0x10 * word
            lapic.regs[at : at + 4] = (0, 0, 0, 0)
        vcpu.set_lapic(lapic)

    # -------------------------------------------------------------- the vCPU

    def vcpu(self) -> Vcpu:
        if self._vcpu is None:
            self._vcpu = Vcpu(self)
        return self._vcpu


def ioapic_entry(bits: int) -> dict[str, int]:
    """Decode one IOAPIC redirection entry."""
    return {
        "vector": bits & 0xFF,
        "delivery_mode": bits >> 8 & 7,
        "dest_mode": bits >> 11 & 1,
        "delivery_status": bits >> 12 & 1,
        "polarity": bits >> 13 & 1,
        "remote_irr": bits >> 14 & 1,
        "trig_mode": bits >> 15 & 1,
        "mask": bits >> 16 & 1,
        "dest_id": bits >> 56 & 0xFF,
    }


@dataclass(frozen=True)
class Latched:
    """Interrupt requests latched and not yet taken: each PIC's request register and the
    local APIC's (eight 32-bit words, vectors 0-255)."""

    master: int
    slave: int
    lapic: tuple[int, ...]


class Vcpu:
    """vCPU 0 with its ``kvm_run`` mapping."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self._stack = contextlib.ExitStack()
        try:
            self.fd = _ioctl(vm.fd, KVM_CREATE_VCPU, 0)
            self._stack.callback(os.close, self.fd)
            self.run_map = self._stack.enter_context(
                mmap.mmap(
                    self.fd,
                    vm.kvm.vcpu_mmap_size,
                    mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE,
                )
            )
            from hostemu.kvm_long import set_supported_cpuid

            set_supported_cpuid(vm.kvm, self.fd)  # long mode's reach (see kvm_long)
            reset = KvmSregs()
            _ioctl(self.fd, KVM_GET_SREGS, reset)
            self._reset_sregs = bytes(reset)
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        self._stack.close()

    def get_lapic(self) -> KvmLapicState:
        state = KvmLapicState()
        _ioctl(self.fd, KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: KvmLapicState) -> None:
        _ioctl(self.fd, KVM_SET_LAPIC, state)

    def reset_sregs(self) -> KvmSregs:
        """A copy of the special registers vCPU 0 had when it was created (real mode):
        every program starts from them, whatever mode the last one ran in."""
        sregs = KvmSregs()
        ctypes.memmove(ctypes.addressof(sregs), self._reset_sregs, ctypes.sizeof(sregs))
        return sregs

    def _reset(self) -> None:
        sregs = self.reset_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            seg: KvmSegment = getattr(sregs, name)
            seg.base, seg.selector = 0, 0
        # "Unreal mode": DS reaches all 4 GiB (see the module docstring).
        sregs.ds.limit, sregs.ds.g = 0xFFFFFFFF, 1
        sregs.cr0 &= ~0x8  # CR0.TS clear: MMX instructions must not fault
        _ioctl(self.fd, KVM_SET_SREGS, sregs)
        _ioctl(self.fd, KVM_SET_REGS, KvmRegs(rip=CODE_ADDR, rflags=0x2, rsp=STACK_TOP))

    def run_program(self, code: bytes, data: bytes = b"", max_exits: int = 16) -> list[Exit]:
        """Load ``code`` (and ``data`` at :data:`DATA_ADDR`), run it in real mode until it
        writes :data:`DONE_PORT`; return the exits it caused. Reads are answered with 0."""
        ram = self.vm.ram
        ram[CODE_ADDR : CODE_ADDR + len(code)] = code
        ram[DATA_ADDR : DATA_ADDR + len(data)] = data
        self._reset()
        return self.run_loop(max_exits)

    def run_loop(self, max_exits: int = 16) -> list[Exit]:
        """``KVM_RUN`` the program loaded (registers set) until it writes
        :data:`DONE_PORT`; return the exits it caused. Reads are answered with 0."""
        exits: list[Exit] = []
        run = KvmRunHead.from_buffer(self.run_map)
        try:
            for _ in range(max_exits):
                _ioctl(self.fd, KVM_RUN)
                reason = run.exit_reason
                if reason == KVM_EXIT_IO:
                    io = run.exit.io
                    off = int(io.data_offset)
                    write = io.direction == KVM_EXIT_IO_OUT
                    if write:
                        value = int.from_bytes(self.run_map[off : off + io.size], "little")
                    else:
                        value = 0
                        self.run_map[off : off + io.size * io.count] = bytes(io.size * io.count)
                    if write and io.port == DONE_PORT:
                        return exits
                    exits.append(Exit(True, write, int(io.port), int(io.size), value))
                elif reason == KVM_EXIT_MMIO:
                    mm = run.exit.mmio
                    length = int(mm.len)
                    if mm.is_write:
                        value = int.from_bytes(bytes(mm.data)[:length], "little")
                    else:
                        value = 0
                        ctypes.memset(ctypes.addressof(mm.data), 0, 8)
                    exits.append(Exit(False, bool(mm.is_write), int(mm.phys_addr), length, value))
                else:
                    raise RuntimeError(f"unexpected KVM exit reason {reason}")
            raise RuntimeError(f"the guest program made more than {max_exits} exits")
        finally:
            del run  # release the buffer export before the mapping can be closed

    def take_interrupts(self) -> list[int]:
        """Run :func:`take_program` (the VM's :meth:`Vm.init_interrupts` first): return the
        gsi of every interrupt the vCPU took and EOI'd, in the order it took them."""
        taken: list[int] = []
        for e in self.run_program(take_program(), max_exits=4 * TAKE_WINDOWS):
            if e.pio and e.write and e.addr == TAKEN_PORT:
                taken.append(e.value)
            elif e.pio and e.write and e.addr == STRAY_PORT:
                raise RuntimeError(f"the guest took vector {e.value:#x}, which has no handler")
            elif not (e.pio and e.write and e.addr == WINDOW_PORT):
                raise RuntimeError(f"unexpected exit while taking interrupts: {e.describe()}")
        return taken


# ------------------------------------------------------------------ eventfds


def eventfd_count(fd: int) -> int:
    """An eventfd's counter, read without consuming it (``/proc/self/fdinfo``)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "eventfd-count":
                return int(value.strip(), 16)
    raise OSError(errno.EINVAL, f"fd {fd} is not an eventfd")


@contextlib.contextmanager
def opened(path: str = "/dev/kvm") -> Iterator[Kvm]:
    kvm = Kvm(path)
    try:
        yield kvm
    finally:
        kvm.close()
