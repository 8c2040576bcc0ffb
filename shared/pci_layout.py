"""The PCI-like register ABI shared by the guest drivers and the VMM's device functions.

Everything here is data: address windows, register offsets, bit values and numpy dtypes (all
little-endian, with an explicit ``<``) describing the byte layout of config space and of BAR0.
:mod:`hostemu.pci` implements the device side of it, :mod:`guestemu.pci` the driver side; both
import their numbers from here and nowhere else.

Address map (guest-physical, MMIO)
----------------------------------
::

    [0xC000_0000, 0xE000_0000)  MMIO_WINDOW   where the guest places BARs
    [0xE000_0000, 0xE002_0000)  ECAM_WINDOW   config space: function f at ECAM_BASE + f*0x1000

Config space of one function (4 KiB; 32-bit registers)
------------------------------------------------------
::

    0x00  vendor id (u16, VENDOR_ID) | device id (u16) << 16   ro   empty slot: 0xFFFFFFFF
    0x04  command (u32): bit 1 CMD_MEMORY = BAR decode on      rw   other bits read 0
    0x08  class code << 8 | revision                           ro
    0x10  BAR0: 32-bit non-prefetchable memory, BAR0_SIZE      rw   low 12 bits read 0
    0x14  BAR1..BAR5                                           ro   0 (not implemented)
    0x40  MSI vector count                                     ro
    0x44 + 4*v  gsi of MSI vector v (v < count)                rw   MSI_UNPROGRAMMED = masked
    else                                                       ro   0

Size probing follows PCI: write 0xFFFFFFFF to BAR0 and read back ``~(size - 1) & 0xFFFFFFFF``
(:data:`BAR0_PROBE_VALUE`); the low bits are read-only zeros, so every programmed address is
size-aligned. BAR0 is *decoded* only while ``CMD_MEMORY`` is set **and** the whole BAR lies
inside :data:`MMIO_WINDOW` (see :func:`bar_decodes`): the reset value 0 and the probe value
0xFFFFF000 never decode, and a BAR can never shadow ECAM.

BAR0 register file (4 KiB; 32-bit registers)
--------------------------------------------
::

    0x000 + 4*q  QUEUE_NOTIFY(q), q < MAX_QUEUES   wo   the guest writes the value q
    0x100  DEVICE_FEATURES   ro    bit 0 F_EVENT_IDX
    0x104  DRIVER_FEATURES   rw
    0x108  DEVICE_STATUS     rw    0 = reset; STATUS_* bits
    0x10C  NUM_QUEUES        ro
    0x110  QUEUE_SEL         rw    selects the queue the QUEUE_* registers below refer to
    0x114  QUEUE_SIZE        rw    power of two <= QUEUE_SIZE_MAX (0 after reset: unset)
    0x118  QUEUE_SIZE_MAX    ro
    0x11C  QUEUE_VECTOR      rw    MSI vector index for used-buffer interrupts, or NO_VECTOR
    0x120  QUEUE_DESC_LO  / 0x124 QUEUE_DESC_HI
    0x128  QUEUE_AVAIL_LO / 0x12C QUEUE_AVAIL_HI
    0x130  QUEUE_USED_LO  / 0x134 QUEUE_USED_HI
    0x138  QUEUE_ENABLE      rw    1 enables the selected queue, 0 disables it
    0x13C  QUEUE_BROKEN      ro    non-zero if the device reported the queue broken
    0x200..0x2FF  device-specific configuration bytes (ro for the guest, filled by the VMM)

The VMM binds one ioeventfd per queue at ``BAR0 + notify_offset(q)`` with length 4 and
``datamatch = q``, so a well-formed notify never exits to the VMM.

Invariants
----------
* Only naturally aligned 32-bit accesses are meaningful, in config space and in BAR0 alike.
  Any other width or a misaligned address reads all-ones of the access width
  (:func:`all_ones`) and ignores writes. Accesses that no window claims behave the same.
* Every register offset is 4-aligned, lies inside its 4 KiB space and no two overlap; the
  dtypes below state the same offsets and the unit tests check that both agree.
* Device ids are small positive integers; ``0xFFFF`` is never a device id (it is what an
  empty slot's all-ones read shows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from shared.errors import UsageError
from shared.virtio.layout import AVAIL_ALIGN, DESC_ALIGN, USED_ALIGN

# ---------------------------------------------------------------------------- access widths

ACCESS_SIZES: Final = (1, 2, 4, 8)
"""Widths (bytes) a guest load or store can have."""
REG_SIZE: Final = 4
"""The only meaningful access width: naturally aligned 32-bit."""
U32_MASK: Final = 0xFFFF_FFFF


def all_ones(size: int) -> int:
    """The value an unclaimed or malformed read of ``size`` bytes returns (0 for ``size <= 0``)."""
    return (1 << (8 * size)) - 1 if size > 0 else 0


def is_reg_access(offset: int, size: int) -> bool:
    """Whether an access at ``offset`` (within a space) of ``size`` bytes is a 32-bit register
    access: width 4 and 4-aligned."""
    return size == REG_SIZE and offset % REG_SIZE == 0


# ---------------------------------------------------------------------------- address windows


@dataclass(frozen=True)
class Window:
    """A half-open guest-physical range ``[start, end)``."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def contains(self, addr: int, length: int = 1) -> bool:
        """Whether ``[addr, addr + length)`` lies inside the window (``length >= 1``)."""
        return length >= 1 and self.start <= addr and addr + length <= self.end


MAX_FUNCTIONS: Final = 32
"""Functions (slots) on the bus: 0..31."""
ECAM_BASE: Final = 0xE000_0000
ECAM_FUNCTION_SIZE: Final = 0x1000
"""Config space of one function: 4 KiB."""
ECAM_WINDOW: Final = Window(ECAM_BASE, ECAM_BASE + MAX_FUNCTIONS * ECAM_FUNCTION_SIZE)
MMIO_WINDOW: Final = Window(0xC000_0000, 0xE000_0000)
"""Where the guest places BARs; a BAR outside it is never decoded."""


def ecam_address(function: int, offset: int) -> int:
    """Guest-physical address of config-space ``offset`` of ``function``."""
    if not 0 <= function < MAX_FUNCTIONS:
        raise UsageError(f"function must be in 0..{MAX_FUNCTIONS - 1}, got {function}")
    if not 0 <= offset < ECAM_FUNCTION_SIZE:
        raise UsageError(f"config offset must be in 0..{ECAM_FUNCTION_SIZE - 1}, got {offset}")
    return ECAM_BASE + function * ECAM_FUNCTION_SIZE + offset


def ecam_decode(addr: int) -> tuple[int, int] | None:
    """``(function, offset)`` of an ECAM address, ``None`` outside :data:`ECAM_WINDOW`."""
    if not ECAM_WINDOW.contains(addr):
        return None
    rel = addr - ECAM_BASE
    return rel // ECAM_FUNCTION_SIZE, rel % ECAM_FUNCTION_SIZE


# ---------------------------------------------------------------------------- config space

VENDOR_ID: Final = 0x5642
"""``"VB"``: every vbusemu function has this vendor id."""
EMPTY_SLOT: Final = 0xFFFF_FFFF
"""What any config read of an absent function returns (all-ones)."""

DEVICE_ECHO: Final = 1
DEVICE_NET: Final = 2
DEVICE_BLK: Final = 3
DEVICE_CONSOLE: Final = 4
DEVICE_IDS: Final = frozenset({DEVICE_ECHO, DEVICE_NET, DEVICE_BLK, DEVICE_CONSOLE})

REVISION: Final = 1
CLASS_CODES: Final[dict[int, int]] = {
    DEVICE_ECHO: 0xFF0000,  # unassigned class
    DEVICE_NET: 0x020000,  # network controller, ethernet
    DEVICE_BLK: 0x018000,  # mass storage controller, other
    DEVICE_CONSOLE: 0x078000,  # simple communication controller, other
}
"""24-bit PCI class code per device id (unknown ids use the ``0xFF0000`` "unassigned")."""
CLASS_UNASSIGNED: Final = 0xFF0000


def class_revision(device_id: int) -> int:
    """The read-only value at :data:`CFG_CLASS_REVISION`: ``class_code << 8 | revision``."""
    return CLASS_CODES.get(device_id, CLASS_UNASSIGNED) << 8 | REVISION


CFG_ID: Final = 0x00
CFG_COMMAND: Final = 0x04
CFG_CLASS_REVISION: Final = 0x08
CFG_BAR0: Final = 0x10
CFG_BAR5_END: Final = 0x28
"""BAR1..BAR5 (``0x14..0x27``) are not implemented: they read 0 and ignore writes."""
CFG_MSI_COUNT: Final = 0x40
CFG_MSI_GSI_BASE: Final = 0x44

CMD_MEMORY: Final = 1 << 1
"""Command bit: decode BAR0 (memory space enable)."""
CMD_WRITABLE: Final = CMD_MEMORY
"""Implemented command bits; all others are hardwired to 0."""

BAR0_SIZE: Final = 0x1000
BAR0_ADDR_MASK: Final = ~(BAR0_SIZE - 1) & U32_MASK
"""Writable bits of BAR0; the low bits (memory, 32-bit, non-prefetchable) read 0."""
BAR0_PROBE_VALUE: Final = BAR0_ADDR_MASK
"""What BAR0 reads after writing 0xFFFFFFFF: ``~(BAR0_SIZE - 1) & 0xFFFFFFFF``."""
BAR_FLAG_BITS: Final = 0xF
"""Low BAR bits that are type flags, not address (all 0 here: 32-bit non-prefetchable memory)."""

MAX_MSI_VECTORS: Final = 64
"""Upper bound on a function's MSI vector count (its table ends at ``0x44 + 4*64``)."""
MSI_UNPROGRAMMED: Final = 0xFFFF_FFFF
"""A vector's gsi register value meaning "not programmed / masked" (the reset value)."""


def msi_gsi_offset(vector: int) -> int:
    """Config offset of vector ``vector``'s gsi register."""
    if not 0 <= vector < MAX_MSI_VECTORS:
        raise UsageError(f"MSI vector must be in 0..{MAX_MSI_VECTORS - 1}, got {vector}")
    return CFG_MSI_GSI_BASE + REG_SIZE * vector


def bar_size_from_probe(value: int) -> int:
    """Size of a 32-bit memory BAR from what it read after writing all-ones (0: no BAR)."""
    mask = value & U32_MASK & ~BAR_FLAG_BITS
    if mask == 0:
        return 0
    return (~mask + 1) & U32_MASK


def bar_decodes(command: int, bar: int) -> bool:
    """Whether a function with these command and BAR0 values decodes its BAR0."""
    return bool(command & CMD_MEMORY) and MMIO_WINDOW.contains(bar, BAR0_SIZE)


CONFIG_HEADER_DTYPE: Final = np.dtype(
    {
        "names": ["vendor_id", "device_id", "command", "class_revision", "bar", "msi_count"],
        "formats": ["<u2", "<u2", "<u4", "<u4", ("<u4", 6), "<u4"],
        "offsets": [0x00, 0x02, CFG_COMMAND, CFG_CLASS_REVISION, CFG_BAR0, CFG_MSI_COUNT],
        "itemsize": CFG_MSI_GSI_BASE,
    }
)
"""The config header up to the MSI table; the table follows as ``<u4`` gsi per vector."""
MSI_TABLE_DTYPE: Final = np.dtype(("<u4", MAX_MSI_VECTORS))

# ---------------------------------------------------------------------------- BAR0 registers

MAX_QUEUES: Final = 64
NOTIFY_BASE: Final = 0x000
NOTIFY_STRIDE: Final = 4
NOTIFY_RANGE: Final = Window(NOTIFY_BASE, NOTIFY_BASE + NOTIFY_STRIDE * MAX_QUEUES)
"""BAR0 offsets of the QUEUE_NOTIFY registers."""
NOTIFY_SIZE: Final = 4
"""Width of a notify write (and of its ioeventfd)."""


def notify_offset(queue: int) -> int:
    """BAR0 offset of queue ``queue``'s QUEUE_NOTIFY register."""
    if not 0 <= queue < MAX_QUEUES:
        raise UsageError(f"queue must be in 0..{MAX_QUEUES - 1}, got {queue}")
    return NOTIFY_BASE + NOTIFY_STRIDE * queue


def notify_queue(offset: int) -> int | None:
    """The queue whose QUEUE_NOTIFY register is at BAR0 ``offset`` (4-aligned), else ``None``."""
    if not NOTIFY_RANGE.contains(offset) or offset % NOTIFY_STRIDE:
        return None
    return (offset - NOTIFY_BASE) // NOTIFY_STRIDE


REG_DEVICE_FEATURES: Final = 0x100
REG_DRIVER_FEATURES: Final = 0x104
REG_DEVICE_STATUS: Final = 0x108
REG_NUM_QUEUES: Final = 0x10C
REG_QUEUE_SEL: Final = 0x110
REG_QUEUE_SIZE: Final = 0x114
REG_QUEUE_SIZE_MAX: Final = 0x118
REG_QUEUE_VECTOR: Final = 0x11C
REG_QUEUE_DESC_LO: Final = 0x120
REG_QUEUE_DESC_HI: Final = 0x124
REG_QUEUE_AVAIL_LO: Final = 0x128
REG_QUEUE_AVAIL_HI: Final = 0x12C
REG_QUEUE_USED_LO: Final = 0x130
REG_QUEUE_USED_HI: Final = 0x134
REG_QUEUE_ENABLE: Final = 0x138
REG_QUEUE_BROKEN: Final = 0x13C
COMMON_RANGE: Final = Window(REG_DEVICE_FEATURES, REG_QUEUE_BROKEN + REG_SIZE)
"""BAR0 offsets of the common configuration registers."""

DEVICE_CONFIG_OFFSET: Final = 0x200
DEVICE_CONFIG_SIZE: Final = 0x100
DEVICE_CONFIG_RANGE: Final = Window(DEVICE_CONFIG_OFFSET, DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_SIZE)
"""BAR0 offsets of the device-specific configuration bytes."""

F_EVENT_IDX: Final = 1 << 0
"""Feature bit: both sides use virtio's EVENT_IDX notification suppression."""

STATUS_ACKNOWLEDGE: Final = 1
STATUS_DRIVER: Final = 2
STATUS_DRIVER_OK: Final = 4
STATUS_FEATURES_OK: Final = 8
STATUS_NEEDS_RESET: Final = 64
STATUS_FAILED: Final = 128
STATUS_DRIVER_BITS: Final = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED
)
"""Status bits the driver may write; NEEDS_RESET belongs to the device, other bits read 0."""

QUEUE_NO_VECTOR: Final = 0xFFFF_FFFF
"""QUEUE_VECTOR value meaning "no interrupt for this queue" (the reset value)."""
QUEUE_DESC_ALIGN: Final = DESC_ALIGN
"""Required alignment of QUEUE_DESC (16), as the split ring requires
(:mod:`shared.virtio.layout`)."""
QUEUE_AVAIL_ALIGN: Final = AVAIL_ALIGN
QUEUE_USED_ALIGN: Final = USED_ALIGN

_COMMON_FIELDS: Final[list[tuple[str, int]]] = [
    ("device_features", REG_DEVICE_FEATURES),
    ("driver_features", REG_DRIVER_FEATURES),
    ("device_status", REG_DEVICE_STATUS),
    ("num_queues", REG_NUM_QUEUES),
    ("queue_sel", REG_QUEUE_SEL),
    ("queue_size", REG_QUEUE_SIZE),
    ("queue_size_max", REG_QUEUE_SIZE_MAX),
    ("queue_vector", REG_QUEUE_VECTOR),
    ("queue_desc", REG_QUEUE_DESC_LO),
    ("queue_avail", REG_QUEUE_AVAIL_LO),
    ("queue_used", REG_QUEUE_USED_LO),
    ("queue_enable", REG_QUEUE_ENABLE),
    ("queue_broken", REG_QUEUE_BROKEN),
]


def _bar0_dtype() -> np.dtype[Any]:
    names = ["queue_notify"]
    formats: list[Any] = [("<u4", MAX_QUEUES)]
    offsets = [NOTIFY_BASE]
    for name, offset in _COMMON_FIELDS:
        names.append(name)
        # the 64-bit ring addresses are lo/hi register pairs: one little-endian u64 each
        formats.append("<u8" if name in ("queue_desc", "queue_avail", "queue_used") else "<u4")
        offsets.append(offset)
    names.append("device_config")
    formats.append(("u1", DEVICE_CONFIG_SIZE))
    offsets.append(DEVICE_CONFIG_OFFSET)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": BAR0_SIZE})


BAR0_DTYPE: Final = _bar0_dtype()
"""The whole BAR0 register file as one little-endian record (notify, common, device config)."""

# ---------------------------------------------------------------------------- device config

NET_CONFIG_DTYPE: Final = np.dtype(
    {"names": ["mac", "port_id"], "formats": [("u1", 6), "<u4"], "offsets": [0, 8], "itemsize": 12}
)
"""Device-specific config of DEVICE_NET: MAC address (6 bytes), then the port id at 8."""
BLK_CONFIG_DTYPE: Final = np.dtype(
    {"names": ["capacity"], "formats": ["<u8"], "offsets": [0], "itemsize": 8}
)
"""Device-specific config of DEVICE_BLK: capacity in 512-byte sectors."""
SECTOR_SIZE: Final = 512
BLK_REQ_HEADER_DTYPE: Final = np.dtype(
    {
        "names": ["type", "reserved", "sector"],
        "formats": ["<u4", "<u4", "<u8"],
        "offsets": [0, 4, 8],
        "itemsize": 16,
    }
)
"""DEVICE_BLK request header (virtio-blk's ``struct virtio_blk_outhdr``)."""
BLK_T_IN: Final = 0
BLK_T_OUT: Final = 1
BLK_T_FLUSH: Final = 4
BLK_T_GET_ID: Final = 8
BLK_S_OK: Final = 0
BLK_S_IOERR: Final = 1
BLK_S_UNSUPP: Final = 2
