"""Scenarios for MMIO ioeventfds above 4 GiB.

The kernel side makes these accesses from a 64-bit guest (:mod:`hostemu.kvm_long`); the
addresses stay below 2**48, the guest-physical reach of 4-level paging (and of this
machine's guests: MAXPHYADDR 48). Addresses beyond any guest's reach -- the top of the
64-bit space -- are compared by their assign and deassign results only.
"""

from __future__ import annotations

from hostemu.conform.steps import (
    MMIO,
    Scenario,
    eventfd,
    ioeventfd,
    ioeventfd_deassign,
    read,
    scenario,
    write,
)

HIGH = 0x40_D000_0000
"""256 GiB above :data:`MMIO`: past 4 GiB and past the 36 bits of a guest without CPUID."""
TOP48 = 0xFFFF_FFFF_FFF8
"""The last 8 bytes of a 48-bit guest-physical space."""
HALF48 = 0x8000_0000_0000
"""The first guest-physical address whose virtual address is sign-extended."""
TOP64 = 0xFFFF_FFFF_FFFF_FFFF

MMIO64: list[Scenario] = [
    scenario(
        "mmio64-widths",
        "MMIO ioeventfds above 4 GiB, every width; a width mismatch exits",
        eventfd("a1"),
        eventfd("a2"),
        eventfd("a4"),
        eventfd("a8"),
        ioeventfd("a1", HIGH, 1),
        ioeventfd("a2", HIGH + 0x10, 2),
        ioeventfd("a4", HIGH + 0x20, 4),
        ioeventfd("a8", HIGH + 0x30, 8),
        write(HIGH, 1, 1),
        write(HIGH + 0x10, 2, 2),
        write(HIGH + 0x20, 4, 4),
        write(HIGH + 0x30, 8, 0x1122334455667788),
        write(HIGH + 0x30, 4, 8),
        write(HIGH + 0x20, 8, 4),
        write(HIGH + 0x34, 8, 9),
    ),
    scenario(
        "mmio64-datamatch",
        "an 8-byte datamatch compares all 64 bits; a datamatch wider than the length never matches",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", HIGH, 8, datamatch=0x1122334455667788),
        ioeventfd("f", HIGH + 0x10, 4, datamatch=0x1_0000_0003),
        write(HIGH, 8, 0x1122334455667788),
        write(HIGH, 8, 0x0122334455667788),
        write(HIGH, 4, 0x55667788),
        write(HIGH + 0x10, 4, 3),
        write(HIGH + 0x10, 8, 0x1_0000_0003),
    ),
    scenario(
        "mmio64-len0",
        "length 0 above 4 GiB matches every width at its address, and only there",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", HIGH, 0),
        write(HIGH, 1, 1),
        write(HIGH, 2, 2),
        write(HIGH, 4, 3),
        write(HIGH, 8, 4),
        write(HIGH + 1, 1, 5),
        ioeventfd("f", HIGH, 8),
        ioeventfd("f", HIGH + 8, 0),
    ),
    scenario(
        "mmio64-no-alias",
        "an address above 4 GiB is not its low 32 bits",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", MMIO + (1 << 32), 4),
        write(MMIO, 4, 1),
        write(MMIO + (1 << 32), 4, 2),
        ioeventfd("f", MMIO, 4),
        write(MMIO, 4, 3),
        ioeventfd_deassign("e", MMIO, 4),
    ),
    scenario(
        "mmio64-top-of-guest-physical",
        "the last 8 bytes of a 48-bit guest-physical space, and its upper half",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", TOP48, 8, datamatch=0xAB),
        ioeventfd("f", HALF48, 4),
        write(TOP48, 8, 0xAB),
        write(TOP48, 8, 0xAC),
        write(TOP48 + 4, 4, 0xAB),
        write(HALF48, 4, 1),
        write(HALF48 - 4, 4, 1),
    ),
    scenario(
        "mmio64-top-of-u64",
        "at the top of the 64-bit space (no guest reaches it): addr + len wrapping to 0 "
        "overflows, length 0 at the last address does not",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", TOP64 - 7, 8),
        ioeventfd("e", TOP64, 1),
        ioeventfd("e", TOP64 - 1, 2),
        ioeventfd("e", TOP64 - 8, 8),
        ioeventfd("e", TOP64, 0),
        ioeventfd("f", TOP64, 0),
        ioeventfd("f", TOP64 - 8, 8, datamatch=1),
        ioeventfd_deassign("e", TOP64, 0),
        ioeventfd_deassign("e", TOP64, 0),
        ioeventfd_deassign("e", TOP64 - 7, 8),
        ioeventfd_deassign("e", TOP64 - 8, 8),
    ),
    scenario(
        "mmio64-deassign",
        "deassign above 4 GiB matches the whole address",
        eventfd("e"),
        ioeventfd("e", HIGH, 4, datamatch=5),
        write(HIGH, 4, 5),
        ioeventfd_deassign("e", HIGH & 0xFFFF_FFFF, 4, datamatch=5),
        write(HIGH, 4, 5),
        ioeventfd_deassign("e", HIGH, 4, datamatch=5),
        write(HIGH, 4, 5),
        ioeventfd_deassign("e", HIGH, 4, datamatch=5),
    ),
    scenario(
        "mmio64-read",
        "a read above 4 GiB exits, length 0 or not",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", HIGH, 0),
        ioeventfd("f", HIGH + 8, 8),
        read(HIGH, 8),
        read(HIGH, 1),
        read(HIGH + 8, 8),
    ),
    scenario(
        "mmio64-unaligned",
        "an unaligned access inside one page is one access",
        eventfd("e"),
        ioeventfd("e", HIGH + 4, 8),
        write(HIGH + 4, 8, 1),
        write(HIGH + 0xFFA, 4, 2),
    ),
    scenario(
        "mmio64-page-split",
        "KVM splits an access that crosses a page into one access per page",
        eventfd("e"),
        ioeventfd("e", HIGH + 0xFFC, 8),
        write(HIGH + 0xFFC, 8, 1).dev("page-split"),
    ),
    scenario(
        "mmio64-page-split-halves",
        "the halves of an access across 4 GiB each match their own ioeventfd in KVM",
        eventfd("e"),
        eventfd("f"),
        ioeventfd("e", (1 << 32) - 4, 4),
        ioeventfd("f", 1 << 32, 4),
        write((1 << 32) - 4, 8, 0x1122334455667788).dev("page-split"),
    ),
]
