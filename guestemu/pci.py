"""The guest's PCI-like bus driver: enumeration, BAR and MSI programming, the device
initialisation sequence and queue setup, over an injected I/O interface.

Pure code: every register access goes through a :class:`GuestIo`. In the guest process a
read or write becomes an exit to the VMM -- or, for a notify write that matches an ioeventfd,
a signal on the in-kernel fast path; in unit tests :class:`hostemu.pci.BusIo` serves it from
a :class:`hostemu.pci.PciBus` in the same process. The register ABI is
:mod:`shared.pci_layout`.

Invariants
----------
* Only naturally aligned 32-bit accesses are issued (the only meaningful ones in the ABI).
* The driver never trusts what it reads: a vector count above :data:`MAX_MSI_VECTORS` is
  clamped; a device that does not answer with :data:`VENDOR_ID` is skipped; whether the
  device accepted features or a queue is decided by *reading back*, never assumed.
* Size probing is done with memory decode off (then the BAR and the command are restored), so
  a BAR never decodes at the probe address. Probing an unprogrammed function (the usual case)
  is invisible to the VMM; probing a decoding one shows as ``BarMoved(a, None)`` then
  ``BarMoved(None, a)``.
* Our own mistakes -- a misaligned BAR address, a BAR outside the MMIO window, a vector the
  function does not have, a config range past 256 bytes, a value that does not fit its
  register, using a BAR before programming it -- raise :class:`~shared.errors.UsageError`
  before any access is made. Values the *device* must validate (queue size, ring alignment,
  queue index) are passed through on purpose, so the device's checks can be exercised.

Theory of operation
-------------------
The usual bring-up of one function, as virtio 1.x orders it::

    found = enumerate_bus(io)                   # ECAM scan: ids, vector count, BAR size
    program_bar(io, fn, allocator.allocate(fn.bar_size))   # BAR, then CMD_MEMORY
    program_msi(io, fn, vector, gsi)            # per vector, gsi from the VMM
    reset_device(io, fn)                        # status 0
    accepted = negotiate(io, fn, want)          # ACK|DRIVER, features, FEATURES_OK read back
    setup_queue(io, fn, q, size, desc, avail, used, vector)   # per queue; checks acceptance
    set_driver_ok(io, fn)

A kick is a 4-byte write of ``q`` at :func:`queue_notify_address`. :class:`PciDriver` binds an
``io`` and a function for callers that prefer methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from shared.errors import UsageError
from shared.pci_layout import (
    BAR0_SIZE,
    CFG_BAR0,
    CFG_CLASS_REVISION,
    CFG_COMMAND,
    CFG_ID,
    CFG_MSI_COUNT,
    CMD_MEMORY,
    DEVICE_CONFIG_OFFSET,
    DEVICE_CONFIG_SIZE,
    MAX_FUNCTIONS,
    MAX_MSI_VECTORS,
    MMIO_WINDOW,
    MSI_UNPROGRAMMED,
    NOTIFY_SIZE,
    QUEUE_NO_VECTOR,
    REG_DEVICE_FEATURES,
    REG_DEVICE_STATUS,
    REG_DRIVER_FEATURES,
    REG_QUEUE_AVAIL_HI,
    REG_QUEUE_AVAIL_LO,
    REG_QUEUE_DESC_HI,
    REG_QUEUE_DESC_LO,
    REG_QUEUE_ENABLE,
    REG_QUEUE_SEL,
    REG_QUEUE_SIZE,
    REG_QUEUE_USED_HI,
    REG_QUEUE_USED_LO,
    REG_QUEUE_VECTOR,
    REG_SIZE,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    U32_MASK,
    VENDOR_ID,
    Window,
    bar_decodes,
    bar_size_from_probe,
    ecam_address,
    msi_gsi_offset,
    notify_offset,
)

_U64_MASK: Final = (1 << 64) - 1


class GuestIo(Protocol):
    """The guest's MMIO path: naturally sized little-endian loads and stores."""

    def read(self, addr: int, size: int) -> int:
        """Load ``size`` bytes at guest-physical ``addr``."""
        ...

    def write(self, addr: int, size: int, value: int) -> None:
        """Store the low ``size`` bytes of ``value`` at guest-physical ``addr``."""
        ...


@dataclass
class FoundFunction:
    """One function found by :func:`enumerate_bus`.

    ``bar_address`` is the driver's record of where BAR0 is decoded: set by
    :func:`program_bar`, or at enumeration if the BAR was already decoding.
    """

    slot: int
    vendor_id: int
    device_id: int
    class_revision: int
    num_vectors: int
    bar_size: int
    bar_address: int | None = None


# ---------------------------------------------------------------------------- register access


def _cfg_read(io: GuestIo, fn: FoundFunction, offset: int) -> int:
    return io.read(ecam_address(fn.slot, offset), REG_SIZE) & U32_MASK


def _cfg_write(io: GuestIo, fn: FoundFunction, offset: int, value: int) -> None:
    io.write(ecam_address(fn.slot, offset), REG_SIZE, value)


def _bar_base(fn: FoundFunction) -> int:
    if fn.bar_address is None:
        raise UsageError(f"BAR0 of function {fn.slot} is not programmed")
    return fn.bar_address


def _reg_read(io: GuestIo, fn: FoundFunction, offset: int) -> int:
    return io.read(_bar_base(fn) + offset, REG_SIZE) & U32_MASK


def _reg_write(io: GuestIo, fn: FoundFunction, offset: int, value: int) -> None:
    io.write(_bar_base(fn) + offset, REG_SIZE, value)


def _u32(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MASK:
        raise UsageError(f"{name} must be a u32, got {value!r}")
    return value


def _u64(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MASK:
        raise UsageError(f"{name} must be a u64, got {value!r}")
    return value


# ---------------------------------------------------------------------------- enumeration


def probe_bar_size(io: GuestIo, slot: int) -> int:
    """Size of BAR0 of ``slot`` (0: none), probed with decode off; BAR and command restored."""
    bar = ecam_address(slot, CFG_BAR0)
    cmd_addr = ecam_address(slot, CFG_COMMAND)
    command = io.read(cmd_addr, REG_SIZE) & U32_MASK
    if command & CMD_MEMORY:
        io.write(cmd_addr, REG_SIZE, command & ~CMD_MEMORY)
    saved = io.read(bar, REG_SIZE) & U32_MASK
    io.write(bar, REG_SIZE, U32_MASK)
    size = bar_size_from_probe(io.read(bar, REG_SIZE))
    io.write(bar, REG_SIZE, saved)
    if command & CMD_MEMORY:
        io.write(cmd_addr, REG_SIZE, command)
    return size


def enumerate_bus(io: GuestIo) -> list[FoundFunction]:
    """Scan every slot's ECAM and describe each function with our vendor id, in slot order."""
    found: list[FoundFunction] = []
    for slot in range(MAX_FUNCTIONS):
        ident = io.read(ecam_address(slot, CFG_ID), REG_SIZE) & U32_MASK
        if ident & 0xFFFF != VENDOR_ID:
            continue  # empty slot (all-ones) or not one of ours
        fn = FoundFunction(
            slot=slot,
            vendor_id=VENDOR_ID,
            device_id=ident >> 16,
            class_revision=io.read(ecam_address(slot, CFG_CLASS_REVISION), REG_SIZE) & U32_MASK,
            num_vectors=min(
                io.read(ecam_address(slot, CFG_MSI_COUNT), REG_SIZE) & U32_MASK, MAX_MSI_VECTORS
            ),
            bar_size=probe_bar_size(io, slot),
        )
        command = _cfg_read(io, fn, CFG_COMMAND)
        bar = _cfg_read(io, fn, CFG_BAR0)
        if fn.bar_size == BAR0_SIZE and bar_decodes(command, bar):
            fn.bar_address = bar
        found.append(fn)
    return found


# ---------------------------------------------------------------------------- BAR and MSI


def program_bar(io: GuestIo, fn: FoundFunction, address: int) -> None:
    """Place BAR0 at ``address`` (size-aligned, inside the MMIO window), then enable decode."""
    if fn.bar_size == 0:
        raise UsageError(f"function {fn.slot} has no BAR0")
    if address % fn.bar_size or not MMIO_WINDOW.contains(address, fn.bar_size):
        raise UsageError(
            f"BAR address {address:#x} is not {fn.bar_size:#x}-aligned inside the MMIO window"
        )
    _cfg_write(io, fn, CFG_BAR0, address)
    command = _cfg_read(io, fn, CFG_COMMAND)
    if not command & CMD_MEMORY:
        _cfg_write(io, fn, CFG_COMMAND, command | CMD_MEMORY)
    fn.bar_address = address


def disable_bar(io: GuestIo, fn: FoundFunction) -> None:
    """Turn memory decode off (the BAR keeps its address but is no longer decoded)."""
    _cfg_write(io, fn, CFG_COMMAND, _cfg_read(io, fn, CFG_COMMAND) & ~CMD_MEMORY)
    fn.bar_address = None


def program_msi(io: GuestIo, fn: FoundFunction, vector: int, gsi: int | None) -> None:
    """Point MSI ``vector`` at ``gsi`` (``None``: unprogram / mask it)."""
    if not 0 <= vector < fn.num_vectors:
        raise UsageError(f"function {fn.slot} has {fn.num_vectors} vectors, not {vector}")
    value = MSI_UNPROGRAMMED if gsi is None else _u32("gsi", gsi)
    _cfg_write(io, fn, msi_gsi_offset(vector), value)


# ---------------------------------------------------------------------------- device init


def device_status(io: GuestIo, fn: FoundFunction) -> int:
    return _reg_read(io, fn, REG_DEVICE_STATUS)


def reset_device(io: GuestIo, fn: FoundFunction) -> None:
    """Write status 0: the device disables every queue and forgets features and status."""
    _reg_write(io, fn, REG_DEVICE_STATUS, 0)


def _add_status(io: GuestIo, fn: FoundFunction, bits: int) -> int:
    status = device_status(io, fn) | bits
    _reg_write(io, fn, REG_DEVICE_STATUS, status)
    return device_status(io, fn)


def negotiate(io: GuestIo, fn: FoundFunction, want_features: int) -> int | None:
    """ACKNOWLEDGE, DRIVER, then offer ``want_features & device_features`` and set
    FEATURES_OK. Returns the accepted features, or ``None`` if FEATURES_OK did not stick
    (the device refused; the driver should set FAILED)."""
    want = _u32("want_features", want_features)
    _add_status(io, fn, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    accepted = want & _reg_read(io, fn, REG_DEVICE_FEATURES)
    _reg_write(io, fn, REG_DRIVER_FEATURES, accepted)
    if not _add_status(io, fn, STATUS_FEATURES_OK) & STATUS_FEATURES_OK:
        return None
    return accepted


def setup_queue(
    io: GuestIo,
    fn: FoundFunction,
    queue: int,
    size: int,
    desc: int,
    avail: int,
    used: int,
    vector: int | None,
) -> bool:
    """Program queue ``queue`` and enable it. Returns whether the device accepted it:
    QUEUE_ENABLE reads back 1 and NEEDS_RESET is not set. ``vector`` ``None``: no interrupts.
    """
    regs = [
        (REG_QUEUE_SEL, _u32("queue", queue)),
        (REG_QUEUE_SIZE, _u32("size", size)),
        (REG_QUEUE_VECTOR, QUEUE_NO_VECTOR if vector is None else _u32("vector", vector)),
    ]
    for lo, hi, name, addr in (
        (REG_QUEUE_DESC_LO, REG_QUEUE_DESC_HI, "desc", desc),
        (REG_QUEUE_AVAIL_LO, REG_QUEUE_AVAIL_HI, "avail", avail),
        (REG_QUEUE_USED_LO, REG_QUEUE_USED_HI, "used", used),
    ):
        regs += [(lo, _u64(name, addr) & U32_MASK), (hi, addr >> 32)]
    _bar_base(fn)  # every check before the first access
    for offset, value in regs:
        _reg_write(io, fn, offset, value)
    _reg_write(io, fn, REG_QUEUE_ENABLE, 1)
    enabled = _reg_read(io, fn, REG_QUEUE_ENABLE) == 1
    return enabled and not device_status(io, fn) & STATUS_NEEDS_RESET


def disable_queue(io: GuestIo, fn: FoundFunction, queue: int) -> None:
    _reg_write(io, fn, REG_QUEUE_SEL, _u32("queue", queue))
    _reg_write(io, fn, REG_QUEUE_ENABLE, 0)


def set_driver_ok(io: GuestIo, fn: FoundFunction) -> bool:
    """Set DRIVER_OK; returns whether the device is live (DRIVER_OK set, NEEDS_RESET clear)."""
    status = _add_status(io, fn, STATUS_DRIVER_OK)
    return bool(status & STATUS_DRIVER_OK) and not status & STATUS_NEEDS_RESET


def read_device_config(io: GuestIo, fn: FoundFunction, offset: int, length: int) -> bytes:
    """``length`` bytes of device-specific configuration from ``offset`` (0..256), read as
    aligned 32-bit registers."""
    if offset < 0 or length < 0 or offset + length > DEVICE_CONFIG_SIZE:
        raise UsageError(f"device config range {offset}+{length} exceeds {DEVICE_CONFIG_SIZE}")
    start = offset - offset % REG_SIZE
    out = bytearray()
    for reg in range(start, offset + length, REG_SIZE):
        out += _reg_read(io, fn, DEVICE_CONFIG_OFFSET + reg).to_bytes(REG_SIZE, "little")
    return bytes(out[offset - start : offset - start + length])


def queue_notify_address(fn: FoundFunction, queue: int) -> int:
    """Where the guest writes ``queue`` (4 bytes) to kick it."""
    return _bar_base(fn) + notify_offset(queue)


def kick_queue(io: GuestIo, fn: FoundFunction, queue: int) -> None:
    """Kick ``queue``: the write the VMM's ioeventfd (datamatch ``queue``) catches."""
    io.write(queue_notify_address(fn, queue), NOTIFY_SIZE, queue)


# ---------------------------------------------------------------------------- conveniences


class PciDriver:
    """The helpers above bound to one ``io`` and one function."""

    def __init__(self, io: GuestIo, fn: FoundFunction) -> None:
        self.io = io
        self.fn = fn

    def program_bar(self, address: int) -> None:
        program_bar(self.io, self.fn, address)

    def program_msi(self, vector: int, gsi: int | None) -> None:
        program_msi(self.io, self.fn, vector, gsi)

    def reset(self) -> None:
        reset_device(self.io, self.fn)

    def status(self) -> int:
        return device_status(self.io, self.fn)

    def negotiate(self, want_features: int) -> int | None:
        return negotiate(self.io, self.fn, want_features)

    def setup_queue(
        self, queue: int, size: int, desc: int, avail: int, used: int, vector: int | None
    ) -> bool:
        return setup_queue(self.io, self.fn, queue, size, desc, avail, used, vector)

    def disable_queue(self, queue: int) -> None:
        disable_queue(self.io, self.fn, queue)

    def set_driver_ok(self) -> bool:
        return set_driver_ok(self.io, self.fn)

    def read_device_config(self, offset: int, length: int) -> bytes:
        return read_device_config(self.io, self.fn, offset, length)

    def queue_notify_address(self, queue: int) -> int:
        return queue_notify_address(self.fn, queue)

    def notify(self, queue: int) -> None:
        kick_queue(self.io, self.fn, queue)


class BarAllocator:
    """Hands out naturally aligned BAR addresses from a window (a bump allocator; BARs are
    never freed while the guest runs)."""

    def __init__(self, window: Window = MMIO_WINDOW) -> None:
        self.window = window
        self._next = window.start

    def allocate(self, size: int) -> int:
        """A ``size``-aligned address with ``size`` bytes free (``size`` a power of two)."""
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size & (size - 1):
            raise UsageError(f"BAR size must be a power of two, got {size!r}")
        addr = (self._next + size - 1) & ~(size - 1)
        if not self.window.contains(addr, size):
            raise UsageError(f"no room for a {size:#x}-byte BAR in the MMIO window")
        self._next = addr + size
        return addr
