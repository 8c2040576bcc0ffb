"""Control-plane scenarios, as data, that both the real KVM and the broker run.

A scenario is a list of :class:`Step` s on one or more VMs (``"a"`` is created up front,
with or without an in-kernel interrupt controller; ``"b"`` and others by a ``vm`` step).
Eventfds have names; the special name :data:`BADFD` is a descriptor / handle that is not
open, and a ``memfd`` step makes an open descriptor that is not an eventfd.

After every step each backend reports its observable (see :mod:`hostemu.conform.run`):
the step's result (``ok`` or an errno name), for a guest access whether it exited to
the VMM (and with which address, width and value) or was absorbed by an ioeventfd, for a
step that may raise an interrupt which lines (gsi 0-23) were raised, for a ``take`` step
which interrupts the guest took and EOI'd, which legacy lines (gsi 0-15) are held
asserted, and the counter of every open eventfd. VM ``a``'s guest runs with interrupts
disabled: what is raised stays latched until a ``take`` step. The kernel is the oracle:
scenarios do not state expected values, they are compared. A step may name the
documented deviation or open bug (:mod:`hostemu.conform.deviations`) that explains a
difference there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BADFD = "BADFD"
"""A descriptor (kernel) or handle (broker) that is not open: EBADF."""

# Addresses the scenarios use: clear of the in-kernel PIC/ELCR ports, the IOAPIC and
# LAPIC pages, and the oracle's own DONE port.
PORT = 0x500
MMIO = 0xD000_0000


@dataclass(frozen=True)
class Step:
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    deviation: str | None = None
    """The documented deviation or open bug a difference at this step is explained by."""

    def dev(self, name: str) -> Step:
        return dataclasses.replace(self, deviation=name)

    def describe(self) -> str:
        parts = []
        for k, v in self.args.items():
            if v is None or v is False or (k == "vm" and v == "a") or (k == "flags" and not v):
                continue
            if (
                isinstance(v, int)
                and not isinstance(v, bool)
                and k in ("addr", "datamatch", "value", "flags", "gsi")
                and v > 9
            ):
                parts.append(f"{k}={v:#x}")
            elif v is True:
                parts.append(k)
            else:
                parts.append(f"{k}={v}")
        return f"{self.op}({', '.join(parts)})"


@dataclass(frozen=True)
class Scenario:
    name: str
    doc: str
    steps: tuple[Step, ...]
    irqchip: bool = True
    policy: str = "hup"


# ------------------------------------------------------------------ step constructors


def eventfd(name: str, initval: int = 0, *, semaphore: bool = False) -> Step:
    return Step("eventfd", {"name": name, "initval": initval, "semaphore": semaphore})


def memfd(name: str) -> Step:
    return Step("memfd", {"name": name})


def vm(name: str, irqchip: bool = True) -> Step:
    return Step("vm", {"name": name, "irqchip": irqchip})


def irqfd(
    efd: str, gsi: int, *, resample: str | None = None, flags: int = 0, vm: str = "a"
) -> Step:
    return Step("irqfd", {"efd": efd, "gsi": gsi, "resample": resample, "flags": flags, "vm": vm})


def irqfd_deassign(efd: str, gsi: int, *, flags: int = 0, vm: str = "a") -> Step:
    return Step("irqfd_deassign", {"efd": efd, "gsi": gsi, "flags": flags, "vm": vm})


def ioeventfd(
    efd: str,
    addr: int,
    length: int,
    *,
    datamatch: int | None = None,
    pio: bool = False,
    flags: int = 0,
    vm: str = "a",
) -> Step:
    return Step(
        "ioeventfd",
        {
            "efd": efd,
            "addr": addr,
            "len": length,
            "datamatch": datamatch,
            "pio": pio,
            "flags": flags,
            "vm": vm,
        },
    )


def ioeventfd_deassign(
    efd: str,
    addr: int,
    length: int,
    *,
    datamatch: int | None = None,
    pio: bool = False,
    flags: int = 0,
    vm: str = "a",
) -> Step:
    """The same arguments as :func:`ioeventfd`, with DEASSIGN."""
    assign = ioeventfd(efd, addr, length, datamatch=datamatch, pio=pio, flags=flags, vm=vm)
    return Step("ioeventfd_deassign", assign.args)


def write(addr: int, length: int, value: int, *, pio: bool = False) -> Step:
    return Step("write", {"addr": addr, "len": length, "value": value, "pio": pio})


def read(addr: int, length: int, *, pio: bool = False) -> Step:
    return Step("read", {"addr": addr, "len": length, "pio": pio})


def signal(efd: str, n: int = 1) -> Step:
    return Step("signal", {"efd": efd, "n": n})


def take() -> Step:
    """VM ``a``'s guest enables interrupts for a moment: it takes every latched request
    and EOIs it (which de-asserts a resampling irqfd's line and signals its resamplefd),
    then disables them again."""
    return Step("take")


def close(efd: str) -> Step:
    return Step("close", {"efd": efd})


def teardown(vm: str = "a") -> Step:
    return Step("teardown", {"vm": vm})


def _s(name: str, doc: str, *steps: Step, irqchip: bool = True, policy: str = "hup") -> Scenario:
    return Scenario(name, doc, tuple(steps), irqchip=irqchip, policy=policy)


# ------------------------------------------------------------------ the library

IRQFD = [
    _s(
        "irqfd-basic",
        "assign, signal (injected, counter drained), deassign, signal (not)",
        eventfd("e"),
        irqfd("e", 5),
        signal("e"),
        irqfd_deassign("e", 5),
        signal("e"),
    ),
    _s(
        "irqfd-unknown-flags",
        "irqfd flags outside DEASSIGN|RESAMPLE",
        eventfd("e"),
        irqfd("e", 5, flags=0x4),
        irqfd("e", 5, flags=0x80000000),
        irqfd_deassign("e", 5, flags=0x10),
    ),
    _s(
        "irqfd-no-irqchip",
        "no in-kernel irqchip: refused before the fd is looked at",
        eventfd("e"),
        irqfd("e", 5),
        irqfd(BADFD, 5),
        irqfd_deassign("e", 5),
        irqchip=False,
    ),
    _s("irqfd-bad-fd", "a descriptor that is not open", irqfd(BADFD, 5)),
    _s("irqfd-not-eventfd", "an open descriptor that is not an eventfd", memfd("m"), irqfd("m", 5)),
    _s(
        "irqfd-gsi-unchecked",
        "the gsi is not range-checked: 24, 5000, 0xffffffff",
        eventfd("e"),
        eventfd("f"),
        eventfd("g"),
        irqfd("e", 24),
        irqfd("f", 5000),
        irqfd("g", 0xFFFFFFFF),
        signal("e"),
        signal("g"),
        irqfd_deassign("f", 5000),
    ),
    _s(
        "irqfd-ebusy-same-vm",
        "selftest: one eventfd, a second gsi in the same VM",
        eventfd("e"),
        irqfd("e", 10),
        irqfd("e", 11),
    ),
    _s(
        "irqfd-ebusy-other-vm",
        "selftest: the same eventfd in another VM",
        vm("b"),
        eventfd("e"),
        irqfd("e", 10),
        irqfd("e", 12, vm="b"),
    ),
    _s(
        "irqfd-deassign-never-assigned",
        "selftest: deassign of pairs never assigned succeeds",
        eventfd("e"),
        irqfd("e", 10),
        irqfd_deassign("e", 11),
        irqfd_deassign("e", 12),
        irqfd_deassign("e", 13),
        irqfd_deassign("e", 14),
        irqfd_deassign("e", 10),
        irqfd_deassign("e", 10),
    ),
    _s(
        "irqfd-deassign-bad-fd",
        "deassign still needs a valid eventfd",
        memfd("m"),
        irqfd_deassign(BADFD, 5),
        irqfd_deassign("m", 5),
    ),
    _s(
        "irqfd-deassign-no-irqchip",
        "deassign does not check the irqchip",
        eventfd("e"),
        irqfd_deassign("e", 5),
        irqchip=False,
    ),
    _s(
        "irqfd-deassign-wrong-gsi",
        "deassign matches (eventfd, gsi)",
        eventfd("e"),
        irqfd("e", 5),
        irqfd_deassign("e", 6),
        signal("e"),
    ),
    _s(
        "irqfd-reassign-after-deassign",
        "the eventfd can be bound again at once",
        eventfd("e"),
        irqfd("e", 5),
        irqfd_deassign("e", 5),
        irqfd("e", 6),
        signal("e"),
    ),
    _s(
        "irqfd-juggle",
        "selftest primary: second assign EBUSY, both deassigns succeed",
        vm("b"),
        eventfd("e"),
        irqfd("e", 0x20),
        irqfd("e", 0x21),
        irqfd_deassign("e", 0x20),
        irqfd_deassign("e", 0x21),
        irqfd("e", 0x20, vm="b"),
        irqfd("e", 0x21, vm="b"),
        irqfd_deassign("e", 0x20, vm="b"),
        irqfd_deassign("e", 0x21, vm="b"),
    ),
    _s(
        "irqfd-after-other-vm-teardown",
        "after the first VM goes the eventfd binds again",
        vm("b"),
        eventfd("e"),
        irqfd("e", 10, vm="b"),
        teardown("b"),
        irqfd("e", 10),
    ),
    _s(
        "irqfd-pending-at-assign",
        "a count already pending: one edge, the count stays",
        eventfd("e", initval=3),
        irqfd("e", 4),
        signal("e"),
    ),
    _s(
        "irqfd-pending-at-assign-deassign",
        "a count pending at assign stays until the deassign takes it",
        eventfd("e", initval=3),
        irqfd("e", 4),
        irqfd_deassign("e", 4),
        signal("e"),
    ),
    _s(
        "irqfd-pending-at-assign-level",
        "a count pending at assign on a resampling irqfd asserts the line",
        eventfd("e", initval=2),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
    ),
    _s(
        "irqfd-semaphore",
        "a semaphore-mode eventfd: each write's injection takes 1 from the count",
        eventfd("e", semaphore=True),
        irqfd("e", 6),
        signal("e", 3),
        signal("e"),
        irqfd_deassign("e", 6),
    ),
    _s(
        "irqfd-semaphore-pending-at-assign",
        "a semaphore-mode count pending at assign: one edge, nothing taken",
        eventfd("e", initval=3, semaphore=True),
        irqfd("e", 6),
        signal("e"),
        irqfd_deassign("e", 6),
    ),
    _s(
        "irqfd-ioapic-pins",
        "gsi 16-23 reach the IOAPIC alone: injected, counter drained; 24 is not routed",
        eventfd("e"),
        eventfd("f"),
        eventfd("g"),
        eventfd("h"),
        irqfd("e", 16),
        irqfd("f", 19),
        irqfd("g", 23),
        irqfd("h", 24),
        signal("e"),
        signal("f", 4),
        signal("g"),
        signal("h"),
        irqfd_deassign("f", 19),
        signal("f"),
    ),
    _s(
        "irqfd-ioapic-pending-at-assign",
        "a count pending at assign on an IOAPIC pin: one edge, the count stays",
        eventfd("e", initval=2),
        irqfd("e", 20),
        signal("e"),
    ),
    _s(
        "irqfd-ioapic-shared-eventfd-doorbell",
        "an ioeventfd write injects through an irqfd on gsi 17",
        eventfd("e"),
        irqfd("e", 17),
        ioeventfd("e", PORT, 2, pio=True),
        write(PORT, 2, 0x1234, pio=True),
    ),
    _s(
        "irqfd-two-lines",
        "two eventfds on two gsis",
        eventfd("e"),
        eventfd("f"),
        irqfd("e", 3),
        irqfd("f", 9),
        signal("f"),
        signal("e"),
    ),
    _s(
        "irqfd-two-eventfds-one-gsi",
        "two eventfds may share a gsi",
        eventfd("e"),
        eventfd("f"),
        irqfd("e", 7),
        irqfd("f", 7),
        signal("f"),
        irqfd_deassign("e", 7),
        signal("f"),
    ),
    _s(
        "irqfd-signal-many",
        "a signal of 5 drains as one injection",
        eventfd("e"),
        irqfd("e", 6),
        signal("e", 5),
    ),
    _s(
        "irqfd-close-hup",
        "closing the last reference detaches the irqfd (HUP)",
        eventfd("e"),
        eventfd("k"),
        irqfd("e", 5),
        ioeventfd("e", PORT, 1, pio=True),
        close("e"),
        write(PORT, 1, 1, pio=True),
        irqfd_deassign(BADFD, 5),
    ),
    _s(
        "irqfd-close-refcount",
        "the refcount policy keeps the irqfd after the last close",
        eventfd("e"),
        irqfd("e", 5),
        ioeventfd("e", PORT, 1, pio=True),
        close("e"),
        write(PORT, 1, 1, pio=True).dev("refcount"),
        policy="refcount",
    ),
    _s(
        "irqfd-teardown",
        "VM teardown deactivates its irqfds; the eventfd lives on",
        eventfd("e"),
        irqfd("e", 5),
        teardown(),
        signal("e"),
    ),
    _s(
        "irqfd-after-teardown",
        "the VM is gone",
        eventfd("e"),
        teardown(),
        irqfd("e", 5).dev("vm-id"),
    ),
    _s(
        "irqfd-resample-basic",
        "RESAMPLE: assert on signal",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        signal("e"),
    ),
    _s(
        "irqfd-resample-self",
        "resamplefd == fd: KVM accepts it",
        eventfd("e"),
        irqfd("e", 5, resample="e").dev("resample-self"),
    ),
    _s(
        "irqfd-resample-bad",
        "RESAMPLE with a bad or non-eventfd resamplefd",
        eventfd("e"),
        memfd("m"),
        irqfd("e", 5, resample=BADFD),
        irqfd("e", 5, resample="m"),
    ),
    _s(
        "irqfd-resample-no-irqchip",
        "RESAMPLE needs the in-kernel irqchip",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        irqchip=False,
    ),
    _s(
        "irqfd-resample-deassign",
        "deassign of a resampling irqfd",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        irqfd_deassign("e", 5),
        signal("e"),
    ),
    _s(
        "irqfd-resample-close-resamplefd",
        "closing the resamplefd alone keeps the irqfd",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 9, resample="r"),
        close("r"),
        signal("e"),
    ),
    _s(
        "irqfd-resample-eoi",
        "RESAMPLE: a signal asserts the line; the guest's EOI de-asserts it and signals the "
        "resamplefd; the next signal asserts it again",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        signal("e"),
        take(),
        signal("e"),
        take(),
        take(),
    ),
    _s(
        "irqfd-resample-signal-while-asserted",
        "while the line is asserted a signal is read but injects nothing; one EOI",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        signal("e"),
        signal("e", 2),
        signal("e"),
        take(),
        take(),
    ),
    _s(
        "irqfd-resample-deassign-while-asserted",
        "deassign de-asserts the line without signaling the resamplefd; the request stays "
        "latched and its EOI reaches no resampler",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        signal("e"),
        irqfd_deassign("e", 5),
        take(),
        signal("e"),
    ),
    _s(
        "irqfd-resample-close-while-asserted",
        "closing the eventfd (HUP) de-asserts the line; the request stays latched",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        signal("e"),
        close("e"),
        take(),
    ),
    _s(
        "irqfd-resample-close-resamplefd-asserted",
        "closing the resamplefd while asserted: the EOI still de-asserts",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        signal("e"),
        close("r"),
        take(),
        signal("e"),
    ),
    _s(
        "irqfd-resample-shared-resamplefd",
        "one resamplefd for two irqfds on two gsis: each EOI signals it once",
        eventfd("e"),
        eventfd("f"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        irqfd("f", 6, resample="r"),
        signal("e"),
        signal("f"),
        take(),
        signal("f"),
        take(),
    ),
    _s(
        "irqfd-resample-shared-resamplefd-one-gsi",
        "one resamplefd for two irqfds on one gsi: an EOI signals it for each",
        eventfd("e"),
        eventfd("f"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        irqfd("f", 5, resample="r"),
        signal("e"),
        take(),
    ),
    _s(
        "irqfd-resample-two-on-one-gsi",
        "two resampling irqfds on one gsi share its level: an EOI signals both "
        "resamplefds; the line stays asserted until the last one detaches",
        eventfd("e"),
        eventfd("f"),
        eventfd("r1"),
        eventfd("r2"),
        irqfd("e", 7, resample="r1"),
        irqfd("f", 7, resample="r2"),
        signal("e"),
        take(),
        signal("f"),
        signal("e"),
        irqfd_deassign("f", 7),
        take(),
        signal("e"),
        irqfd_deassign("e", 7),
    ),
    _s(
        "irqfd-resample-level-outlives-its-irqfd",
        "the gsi stays asserted after the irqfd that raised it detaches, while another "
        "resampling irqfd is on the gsi",
        eventfd("e"),
        eventfd("f"),
        eventfd("r1"),
        eventfd("r2"),
        irqfd("e", 7, resample="r1"),
        irqfd("f", 7, resample="r2"),
        signal("e"),
        irqfd_deassign("e", 7),
        take(),
    ),
    _s(
        "irqfd-resample-edge-on-its-gsi",
        "an edge irqfd on a resampling irqfd's gsi: its EOI signals the resamplefd; "
        "while the line is asserted its pulse makes no edge",
        eventfd("e"),
        eventfd("f"),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        irqfd("f", 5),
        signal("f"),
        take(),
        signal("e"),
        signal("f"),
        take(),
    ),
    _s(
        "irqfd-resample-slave-line",
        "RESAMPLE on a slave PIC line",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 10, resample="r"),
        signal("e"),
        take(),
        signal("e"),
    ),
    _s(
        "irqfd-resample-semaphore",
        "a semaphore-mode eventfd on a resampling irqfd: each write reads 1, asserted or not",
        eventfd("e", semaphore=True),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        signal("e", 3),
        signal("e"),
        take(),
        signal("e"),
    ),
    _s(
        "irqfd-resample-pending-at-assign-eoi",
        "a count pending at assign asserts the line, stays until the next write; EOI",
        eventfd("e", initval=2),
        eventfd("r"),
        irqfd("e", 5, resample="r"),
        signal("e"),
        take(),
        signal("e"),
    ),
    _s(
        "irqfd-resample-ioapic-pin",
        "RESAMPLE on an IOAPIC-only pin: the local APIC's EOI signals the resamplefd",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 18, resample="r"),
        signal("e"),
        take(),
        signal("e"),
        take(),
    ),
    _s(
        "irqfd-resample-ioapic-signal-while-asserted",
        "RESAMPLE on an IOAPIC-only pin, a signal while the line is asserted",
        eventfd("e"),
        eventfd("r"),
        irqfd("e", 18, resample="r"),
        signal("e"),
        signal("e"),
        take(),
        take(),
        signal("e"),
    ),
    _s(
        "take-order",
        "the guest takes latched interrupts by PIC priority, then IOAPIC pins highest "
        "first; one request per line however many edges",
        eventfd("a"),
        eventfd("b"),
        eventfd("c"),
        eventfd("d"),
        irqfd("a", 3),
        irqfd("b", 9),
        irqfd("c", 17),
        irqfd("d", 20),
        signal("a"),
        signal("c"),
        signal("d"),
        signal("b"),
        signal("a"),
        take(),
        take(),
    ),
]

IOEVENTFD = [
    _s(
        "ioeventfd-pio-basic",
        "a PIO ioeventfd absorbs a matching write",
        eventfd("e"),
        ioeventfd("e", PORT, 2, pio=True),
        write(PORT, 2, 7, pio=True),
        write(PORT, 1, 7, pio=True),
        write(PORT, 4, 7, pio=True),
        write(PORT + 2, 2, 7, pio=True),
    ),
    _s(
        "ioeventfd-mmio-widths",
        "MMIO ioeventfds of every width",
        eventfd("a1"),
        eventfd("a2"),
        eventfd("a4"),
        eventfd("a8"),
        ioeventfd("a1", MMIO, 1),
        ioeventfd("a2", MMIO + 0x10, 2),
        ioeventfd("a4", MMIO + 0x20, 4),
        ioeventfd("a8", MMIO + 0x30, 8),
        write(MMIO, 1, 1),
        write(MMIO + 0x10, 2, 2),
        write(MMIO + 0x20, 4, 4),
        write(MMIO + 0x30, 8, 0x1122334455667788),
        write(MMIO + 0x30, 4, 8),
    ),
    _s(
        "ioeventfd-datamatch",
        "only the matching value is absorbed",
        eventfd("e"),
        ioeventfd("e", MMIO, 4, datamatch=3),
        write(MMIO, 4, 3),
        write(MMIO, 4, 4),
    ),
    _s(
        "ioeventfd-value-at-width",
        "a 1-byte write carries one byte",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", PORT, 1, datamatch=0x1FF, pio=True),
        ioeventfd("f", PORT + 1, 1, datamatch=0x34, pio=True),
        write(PORT, 1, 0x1FF, pio=True),
        write(PORT + 1, 1, 0x1234, pio=True),
    ),
    _s(
        "ioeventfd-len0-mmio",
        "length 0 matches every width",
        eventfd("e"),
        ioeventfd("e", MMIO, 0),
        write(MMIO, 1, 1),
        write(MMIO, 8, 2),
    ),
    _s(
        "ioeventfd-len0-pio",
        "length 0 with PIO is accepted",
        eventfd("e"),
        ioeventfd("e", PORT, 0, pio=True),
        write(PORT, 2, 9, pio=True),
    ),
    _s(
        "ioeventfd-len0-datamatch",
        "length 0 with DATAMATCH is refused",
        eventfd("e"),
        ioeventfd("e", MMIO, 0, datamatch=1),
    ),
    _s(
        "ioeventfd-bad-len",
        "lengths outside {0,1,2,4,8}",
        eventfd("e"),
        ioeventfd("e", MMIO, 3),
        ioeventfd("e", MMIO, 16),
        ioeventfd("e", PORT, 5, pio=True),
    ),
    _s(
        "ioeventfd-overflow",
        "addr + len past the top of the address space",
        eventfd("e"),
        ioeventfd("e", 0xFFFF_FFFF_FFFF_FFFC, 4),
        ioeventfd("e", 0xFFFF_FFFF_FFFF_FFF8, 8),
        ioeventfd("e", 0xFFFF_FFFF_FFFF_FFF0, 8),
    ),
    _s(
        "ioeventfd-flag-0x8",
        "flag 0x8 (virtio-ccw notify bus) is accepted on x86",
        eventfd("e"),
        ioeventfd("e", MMIO, 4, flags=0x8),
        write(MMIO, 4, 1),
        ioeventfd("e", MMIO, 4),  # a different bus: no collision
    ),
    _s(
        "ioeventfd-flag-0x10",
        "flag 0x10 is accepted on x86 and changes nothing",
        eventfd("f"),
        ioeventfd("f", MMIO + 8, 4, flags=0x10),
        write(MMIO + 8, 4, 1),
        ioeventfd("f", MMIO + 8, 4),
    ),
    _s(
        "ioeventfd-flags-unknown",
        "flag bits outside 0x1f are refused",
        eventfd("e"),
        ioeventfd("e", MMIO, 4, flags=0x20),
        ioeventfd("e", MMIO, 4, flags=0x80000000),
    ),
    _s(
        "ioeventfd-order-len-first",
        "a bad length wins over a bad fd and flags",
        ioeventfd(BADFD, MMIO, 3, flags=0x80),
    ),
    _s(
        "ioeventfd-order-overflow-before-flags",
        "overflow is checked before flags",
        ioeventfd(BADFD, 0xFFFF_FFFF_FFFF_FFFC, 8, flags=0x80),
    ),
    _s(
        "ioeventfd-order-flags-before-fd",
        "unknown flags before the fd",
        ioeventfd(BADFD, MMIO, 4, flags=0x80),
    ),
    _s("ioeventfd-bad-fd", "a descriptor that is not open", ioeventfd(BADFD, MMIO, 4)),
    _s(
        "ioeventfd-not-eventfd",
        "an open descriptor that is not an eventfd",
        memfd("m"),
        ioeventfd("m", MMIO, 4),
    ),
    _s(
        "ioeventfd-collision-wildcard",
        "a wildcard collides with anything of its length",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", MMIO, 4),
        ioeventfd("f", MMIO, 4, datamatch=1),
        ioeventfd("f", MMIO, 2),
        ioeventfd("f", MMIO, 4, pio=True),
    ),
    _s(
        "ioeventfd-collision-datamatch",
        "distinct datamatch values coexist",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", MMIO, 4, datamatch=1),
        ioeventfd("f", MMIO, 4, datamatch=2),
        ioeventfd("f", MMIO, 4, datamatch=1),
        ioeventfd("f", MMIO, 4),
        write(MMIO, 4, 2),
        write(MMIO, 4, 1),
        write(MMIO, 4, 3),
    ),
    _s(
        "ioeventfd-collision-len0",
        "length 0 collides with every length at its address",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", MMIO, 0),
        ioeventfd("f", MMIO, 8),
        ioeventfd("f", MMIO, 0),
        ioeventfd("f", MMIO + 8, 0),
    ),
    _s(
        "ioeventfd-same-eventfd-twice",
        "one eventfd may back several ioeventfds",
        eventfd("e"),
        ioeventfd("e", MMIO, 4),
        ioeventfd("e", PORT, 4, pio=True),
        write(MMIO, 4, 1),
        write(PORT, 4, 1, pio=True),
    ),
    _s(
        "ioeventfd-deassign",
        "deassign stops absorbing",
        eventfd("e"),
        ioeventfd("e", MMIO, 4, datamatch=5),
        write(MMIO, 4, 5),
        ioeventfd_deassign("e", MMIO, 4, datamatch=5),
        write(MMIO, 4, 5),
    ),
    _s(
        "ioeventfd-deassign-validates-nothing",
        "deassign of length 3 is ENOENT",
        eventfd("e"),
        ioeventfd_deassign("e", MMIO, 3),
        ioeventfd_deassign("e", 0xFFFF_FFFF_FFFF_FFFC, 8),
    ),
    _s(
        "ioeventfd-deassign-ignores-flags",
        "deassign ignores unknown flag bits",
        eventfd("e"),
        ioeventfd("e", MMIO, 4),
        ioeventfd_deassign("e", MMIO, 4, flags=0x80),
        write(MMIO, 4, 1),
    ),
    _s(
        "ioeventfd-deassign-must-match",
        "deassign matches bus, fd, addr, len, datamatch",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", MMIO, 4, datamatch=1),
        ioeventfd_deassign("f", MMIO, 4, datamatch=1),
        ioeventfd_deassign("e", MMIO, 2, datamatch=1),
        ioeventfd_deassign("e", MMIO, 4, datamatch=2),
        ioeventfd_deassign("e", MMIO, 4),
        ioeventfd_deassign("e", MMIO, 4, datamatch=1, pio=True),
        ioeventfd_deassign("e", MMIO, 4, datamatch=1),
    ),
    _s(
        "ioeventfd-deassign-bad-fd",
        "deassign with a bad descriptor",
        memfd("m"),
        ioeventfd_deassign(BADFD, MMIO, 4),
        ioeventfd_deassign("m", MMIO, 4),
    ),
    _s(
        "ioeventfd-read-never-matches",
        "a read always exits",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", PORT, 2, pio=True),
        ioeventfd("f", MMIO, 0),
        read(PORT, 2, pio=True),
        read(MMIO, 4),
    ),
    _s(
        "ioeventfd-close-stays",
        "an ioeventfd has no HUP path: it stays after close",
        eventfd("e"),
        ioeventfd("e", MMIO, 4),
        close("e"),
        write(MMIO, 4, 1),
        ioeventfd_deassign(BADFD, MMIO, 4),
    ),
    _s(
        "ioeventfd-teardown",
        "VM teardown removes the ioeventfds",
        eventfd("e"),
        ioeventfd("e", MMIO, 4),
        teardown(),
        signal("e"),
    ),
    _s(
        "ioeventfd-after-teardown",
        "the VM is gone",
        eventfd("e"),
        teardown(),
        ioeventfd("e", MMIO, 4).dev("vm-id"),
    ),
    _s(
        "ioeventfd-no-irqchip",
        "ioeventfds need no irqchip",
        eventfd("e"),
        ioeventfd("e", PORT, 1, pio=True),
        write(PORT, 1, 1, pio=True),
        irqchip=False,
    ),
    _s(
        "ioeventfd-semaphore-counter",
        "each absorbed write adds 1",
        eventfd("e"),
        ioeventfd("e", MMIO, 4),
        write(MMIO, 4, 1),
        write(MMIO, 4, 2),
        write(MMIO, 4, 3),
    ),
]

COMBINED = [
    _s(
        "doorbell-to-irq",
        "an ioeventfd write injects through an irqfd on the same eventfd",
        eventfd("e"),
        irqfd("e", 11),
        ioeventfd("e", PORT, 4, pio=True),
        write(PORT, 4, 0, pio=True),
    ),
    _s(
        "doorbell-after-irqfd-deassign",
        "after deassign the doorbell only counts",
        eventfd("e"),
        irqfd("e", 11),
        ioeventfd("e", MMIO, 4),
        irqfd_deassign("e", 11),
        write(MMIO, 4, 0),
    ),
    _s(
        "assign-then-close-2009",
        "the 2009 dance: irqfd, ioeventfd as producer, close(fd)",
        eventfd("e"),
        irqfd("e", 5),
        ioeventfd("e", MMIO, 4),
        close("e"),
        write(MMIO, 4, 1),
        teardown(),
    ),
    _s(
        "teardown-then-close",
        "teardown first, then close: nothing left to detach",
        eventfd("e"),
        irqfd("e", 5),
        ioeventfd("e", MMIO, 4),
        teardown(),
        close("e"),
    ),
    _s(
        "two-vms-independent",
        "bindings in one VM do not reach another",
        vm("b"),
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", MMIO, 4),
        ioeventfd("f", MMIO, 4, vm="b"),
        irqfd("f", 5, vm="b"),
        write(MMIO, 4, 1),
    ),
]

SCENARIOS: tuple[Scenario, ...] = (*IRQFD, *IOEVENTFD, *COMBINED)
BY_NAME: dict[str, Scenario] = {s.name: s for s in SCENARIOS}
assert len(BY_NAME) == len(SCENARIOS), "scenario names must be unique"
