"""The VMM's model of PCI-like device functions and of the bus that routes guest MMIO to them.

Pure state machines in the h11 style: guest accesses go in, *events* come out, nothing here
touches a socket, an eventfd or the broker. The VMM maps each event to broker calls:

========================  ======================================================================
event                     what the VMM typically does
========================  ======================================================================
:class:`BarMoved`         deassign the notify ioeventfds at ``old``, assign them at ``new``
:class:`MsiProgrammed`    deassign the vector's irqfd from ``old_gsi``, assign it to ``new_gsi``
:class:`QueueEnabled`     build a :class:`~shared.virtio.DeviceRing` and start serving the queue
:class:`QueueDisabled`    stop serving the queue, forget its ring
:class:`StatusChanged`    log; start the device on DRIVER_OK
:class:`DeviceReset`      drop all per-driver state (follows the queues' QueueDisabled events)
:class:`QueueNotifyExit`  a notify that no ioeventfd caught: kick the queue by hand
========================  ======================================================================

The register ABI (offsets, bits, windows) is :mod:`shared.pci_layout`.

Invariants
----------
* **A guest cannot crash the VMM.** No guest-reachable method (``config_read/write``,
  ``bar_read/write``, ``PciBus.mmio_read/write``) raises, whatever the address, width or
  value; a read of ``size`` bytes returns an int in ``0 .. 2**(8*size) - 1``. Invalid writes
  are ignored or, where the ABI says so, set ``NEEDS_RESET``; they never corrupt state.
  Only the VMM's own mistakes (building a function with impossible parameters, adding two
  functions to one slot, naming a queue that does not exist) raise
  :class:`~shared.errors.UsageError`.
* Only naturally aligned 32-bit accesses reach a register; any other access reads all-ones of
  its width and ignores writes. Unimplemented offsets inside a claimed space read 0.
* **Events report effective changes only**, in the order they happened: writing a register
  with the value it already has emits nothing. ``BarMoved`` compares the *decoded* BAR0
  address (:attr:`PciFunction.bar_address`: ``CMD_MEMORY`` set and the BAR inside the MMIO
  window, else ``None``) before and after a config write, so it is emitted for BAR writes and
  command writes alike, and never for size probing done with decode off.
* While a queue is enabled its QUEUE_SIZE / QUEUE_VECTOR / QUEUE_DESC / QUEUE_AVAIL /
  QUEUE_USED registers are read-only: the parameters in its :class:`QueueEnabled` event stay
  true until its :class:`QueueDisabled`. Every ``QueueEnabled`` is followed by exactly one
  ``QueueDisabled`` (on QUEUE_ENABLE=0 or on reset) before the next ``QueueEnabled`` of that
  queue.
* ``NEEDS_RESET`` is owned by the device: the guest can neither set nor clear it except by a
  reset (status 0). While it is set, QUEUE_ENABLE=1 is refused.

Theory of operation
-------------------
Config space (per function): vendor/device id, command, class/revision, BAR0, the MSI count
and one gsi register per vector (reset value :data:`MSI_UNPROGRAMMED` = masked). A gsi write
is passed through as :class:`MsiProgrammed` without range checks: the broker validates the gsi
(``EINVAL``) and the VMM reports the error. Config space is not touched by a device reset.

BAR0: virtio-1.x-like common configuration. The driver resets (status 0), sets ACKNOWLEDGE and
DRIVER, reads DEVICE_FEATURES, writes DRIVER_FEATURES, sets FEATURES_OK -- which the device
refuses (the bit reads back 0) if the driver asked for a feature the device does not offer;
after FEATURES_OK, DRIVER_FEATURES is read-only. Then per queue: QUEUE_SEL, QUEUE_SIZE (0 after
reset; a power of two <= QUEUE_SIZE_MAX, other values are ignored), QUEUE_VECTOR (< num_vectors
or :data:`QUEUE_NO_VECTOR`, other values are ignored), the three ring addresses, QUEUE_ENABLE=1.
Enabling checks size != 0, ring alignment (16 / 2 / 4) and that no area wraps past ``2**64``;
a failure leaves the queue disabled and sets NEEDS_RESET. ``event_idx`` in
:class:`QueueEnabled` is whether EVENT_IDX was negotiated (FEATURES_OK set) at enable time.
Finally DRIVER_OK. Writing status 0 resets: every enabled queue is disabled
(:class:`QueueDisabled` each, in queue order), queue registers, features, QUEUE_SEL, broken
marks and the status go back to their reset values (:class:`StatusChanged` if the status was
not 0), then :class:`DeviceReset`. MSI vectors, BAR0 and the command register are kept.

Notify: a 4-byte write of ``q`` at ``notify_offset(q)`` is a kick of queue ``q``; the VMM binds
an ioeventfd there (length 4, datamatch ``q``) so it normally never reaches this model. One that
does (no ioeventfd yet, or the fast path is off) yields :class:`QueueNotifyExit` if ``q`` is an
enabled queue. Any other value or width is ignored, exactly what the ioeventfd would do: the
fast path and the slow path agree on what a kick is.

Overlapping BARs: a guest may program two functions' BAR0 to the same address. Then the
**lowest slot wins**: :class:`PciBus` offers the access to decoded BARs in slot order and the
first one containing the address claims it; the other function is shadowed until one of them
moves. (Real PCI leaves this undefined; the VMM still gets both ``BarMoved`` events, and the
second ioeventfd assignment fails with ``EEXIST`` in the broker, which the VMM reports.)
ECAM cannot be shadowed: a BAR only decodes inside the MMIO window, below ECAM.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias

from shared.errors import UsageError
from shared.pci_layout import (
    BAR0_ADDR_MASK,
    BAR0_SIZE,
    CFG_BAR0,
    CFG_CLASS_REVISION,
    CFG_COMMAND,
    CFG_ID,
    CFG_MSI_COUNT,
    CFG_MSI_GSI_BASE,
    CMD_WRITABLE,
    DEVICE_CONFIG_RANGE,
    DEVICE_CONFIG_SIZE,
    ECAM_FUNCTION_SIZE,
    F_EVENT_IDX,
    MAX_FUNCTIONS,
    MAX_MSI_VECTORS,
    MAX_QUEUES,
    MSI_UNPROGRAMMED,
    NOTIFY_SIZE,
    QUEUE_NO_VECTOR,
    REG_DEVICE_FEATURES,
    REG_DEVICE_STATUS,
    REG_DRIVER_FEATURES,
    REG_NUM_QUEUES,
    REG_QUEUE_AVAIL_HI,
    REG_QUEUE_AVAIL_LO,
    REG_QUEUE_BROKEN,
    REG_QUEUE_DESC_HI,
    REG_QUEUE_DESC_LO,
    REG_QUEUE_ENABLE,
    REG_QUEUE_SEL,
    REG_QUEUE_SIZE,
    REG_QUEUE_SIZE_MAX,
    REG_QUEUE_USED_HI,
    REG_QUEUE_USED_LO,
    REG_QUEUE_VECTOR,
    STATUS_DRIVER_BITS,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    U32_MASK,
    VENDOR_ID,
    all_ones,
    bar_decodes,
    class_revision,
    ecam_decode,
    is_reg_access,
    notify_offset,
    notify_queue,
)
from shared.virtio import placement_problem, valid_queue_size

_U64_LIMIT: Final = 1 << 64
_LO_MASK: Final = U32_MASK
_HI_MASK: Final = U32_MASK << 32

# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class BarMoved:
    """The decoded BAR0 address of ``function`` changed (``None``: not decoded)."""

    function: int
    old: int | None
    new: int | None


@dataclass(frozen=True)
class MsiProgrammed:
    """Vector ``vector`` of ``function`` now targets ``new_gsi`` (``None``: masked)."""

    function: int
    vector: int
    old_gsi: int | None
    new_gsi: int | None


@dataclass(frozen=True)
class QueueEnabled:
    """The driver enabled ``queue`` with these (validated) ring parameters.

    ``desc``/``avail``/``used`` are guest-physical addresses, aligned 16/2/4; ``vector`` is
    the MSI vector index for used-buffer interrupts (``None``: no interrupts).
    """

    function: int
    queue: int
    size: int
    desc: int
    avail: int
    used: int
    vector: int | None
    event_idx: bool


@dataclass(frozen=True)
class QueueDisabled:
    """``queue`` of ``function`` was disabled (QUEUE_ENABLE=0 or a device reset)."""

    function: int
    queue: int


@dataclass(frozen=True)
class StatusChanged:
    """DEVICE_STATUS of ``function`` changed from ``old`` to ``new``."""

    function: int
    old: int
    new: int


@dataclass(frozen=True)
class DeviceReset:
    """The driver wrote status 0: every queue is disabled, features and status cleared."""

    function: int


@dataclass(frozen=True)
class QueueNotifyExit:
    """A notify of an enabled ``queue`` reached the VMM (no ioeventfd caught it): kick it."""

    function: int
    queue: int


Event: TypeAlias = (
    BarMoved
    | MsiProgrammed
    | QueueEnabled
    | QueueDisabled
    | StatusChanged
    | DeviceReset
    | QueueNotifyExit
)


# ---------------------------------------------------------------------------- one function


@dataclass
class _Queue:
    size: int = 0
    vector: int = QUEUE_NO_VECTOR
    desc: int = 0
    avail: int = 0
    used: int = 0
    enabled: bool = False
    broken: str | None = None
    event_idx: bool = False  # negotiated when the queue was enabled (what its device got)


def _gsi(value: int) -> int | None:
    return None if value == MSI_UNPROGRAMMED else value


def _check_range(name: str, value: int, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UsageError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


class PciFunction:
    """One device function: its config space and its BAR0 register file.

    ``slot`` is the function number (0..31) and the ``function`` field of every event it
    emits. ``device_config`` (at most 256 bytes, zero-padded) is what the guest reads at
    BAR0 0x200.
    """

    def __init__(
        self,
        slot: int,
        device_id: int,
        *,
        num_queues: int,
        num_vectors: int,
        queue_size_max: int,
        features: int,
        device_config: bytes = b"",
    ) -> None:
        self._slot = _check_range("slot", slot, 0, MAX_FUNCTIONS - 1)
        self._device_id = _check_range("device_id", device_id, 1, 0xFFFE)
        self._num_queues = _check_range("num_queues", num_queues, 0, MAX_QUEUES)
        self._num_vectors = _check_range("num_vectors", num_vectors, 0, MAX_MSI_VECTORS)
        if not valid_queue_size(queue_size_max):
            raise UsageError(f"queue_size_max must be a power of two, got {queue_size_max!r}")
        self._queue_size_max = queue_size_max
        self._features = _check_range("features", features, 0, U32_MASK)
        self._device_config = b""
        self.set_device_config(device_config)
        # config space
        self._command = 0
        self._bar = 0
        self._msi = [MSI_UNPROGRAMMED] * num_vectors
        # BAR0 state (reset by status 0)
        self._status = 0
        self._driver_features = 0
        self._sel = 0
        self._queues = [_Queue() for _ in range(num_queues)]

    # ------------------------------------------------------------------ VMM-side view

    @property
    def slot(self) -> int:
        return self._slot

    @property
    def device_id(self) -> int:
        return self._device_id

    @property
    def num_queues(self) -> int:
        return self._num_queues

    @property
    def num_vectors(self) -> int:
        return self._num_vectors

    @property
    def queue_size_max(self) -> int:
        return self._queue_size_max

    @property
    def device_features(self) -> int:
        return self._features

    @property
    def command(self) -> int:
        return self._command

    @property
    def bar(self) -> int:
        """The raw BAR0 register (decoded or not)."""
        return self._bar

    @property
    def bar_address(self) -> int | None:
        """Where BAR0 is decoded, ``None`` if it is not (decode off or outside the window)."""
        return self._bar if bar_decodes(self._command, self._bar) else None

    @property
    def status(self) -> int:
        return self._status

    @property
    def driver_features(self) -> int:
        return self._driver_features

    @property
    def negotiated_features(self) -> int:
        """The driver's features once FEATURES_OK is set, else 0."""
        return self._driver_features if self._status & STATUS_FEATURES_OK else 0

    @property
    def device_config(self) -> bytes:
        return self._device_config

    def set_device_config(self, data: bytes) -> None:
        """Replace the device-specific configuration bytes (VMM side; at most 256)."""
        if len(data) > DEVICE_CONFIG_SIZE:
            raise UsageError(f"device config is {len(data)} bytes, at most {DEVICE_CONFIG_SIZE}")
        self._device_config = bytes(data).ljust(DEVICE_CONFIG_SIZE, b"\0")

    def msi_gsi(self, vector: int) -> int | None:
        """The gsi vector ``vector`` targets, ``None`` if unprogrammed."""
        _check_range("vector", vector, 0, self._num_vectors - 1)
        return _gsi(self._msi[vector])

    def _queue(self, queue: int) -> _Queue:
        return self._queues[_check_range("queue", queue, 0, self._num_queues - 1)]

    def queue_config(self, queue: int) -> QueueEnabled | None:
        """The parameters of ``queue`` if it is enabled (as its QueueEnabled said), else None."""
        qs = self._queue(queue)
        return self._enabled_event(queue, qs) if qs.enabled else None

    def queue_broken(self, queue: int) -> str | None:
        """Why ``queue`` was reported broken, ``None`` if it was not."""
        return self._queue(queue).broken

    def notify_address(self, queue: int) -> int | None:
        """Guest-physical address of ``queue``'s notify register, ``None`` if BAR0 is not
        decoded. The VMM binds the queue's ioeventfd there (length 4, datamatch ``queue``)."""
        self._queue(queue)
        base = self.bar_address
        return None if base is None else base + notify_offset(queue)

    def set_queue_broken(self, queue: int, reason: str) -> list[Event]:
        """The device found ``queue`` broken: QUEUE_BROKEN reads 1 and NEEDS_RESET is set
        (sticky until reset; the first reason is kept)."""
        qs = self._queue(queue)
        if qs.broken is None:
            qs.broken = reason
        return self._set_status(self._status | STATUS_NEEDS_RESET)

    # ------------------------------------------------------------------ config space

    def config_read(self, offset: int, size: int) -> int:
        """A guest read of config space; never raises."""
        if not (0 <= offset < ECAM_FUNCTION_SIZE and is_reg_access(offset, size)):
            return all_ones(size)
        if offset == CFG_ID:
            return VENDOR_ID | self._device_id << 16
        if offset == CFG_COMMAND:
            return self._command
        if offset == CFG_CLASS_REVISION:
            return class_revision(self._device_id)
        if offset == CFG_BAR0:
            return self._bar
        if offset == CFG_MSI_COUNT:
            return self._num_vectors
        vector = self._msi_index(offset)
        if vector is not None:
            return self._msi[vector]
        return 0

    def config_write(self, offset: int, size: int, value: int) -> list[Event]:
        """A guest write to config space; never raises."""
        if not (0 <= offset < ECAM_FUNCTION_SIZE and is_reg_access(offset, size)):
            return []
        value &= U32_MASK
        if offset == CFG_COMMAND:
            old = self.bar_address
            self._command = value & CMD_WRITABLE
            return self._bar_event(old)
        if offset == CFG_BAR0:
            old = self.bar_address
            self._bar = value & BAR0_ADDR_MASK
            return self._bar_event(old)
        vector = self._msi_index(offset)
        if vector is not None:
            old_gsi = self._msi[vector]
            self._msi[vector] = value
            if old_gsi != value:
                return [MsiProgrammed(self._slot, vector, _gsi(old_gsi), _gsi(value))]
        return []

    def _msi_index(self, offset: int) -> int | None:
        vector = (offset - CFG_MSI_GSI_BASE) // 4
        if offset >= CFG_MSI_GSI_BASE and vector < self._num_vectors:
            return vector
        return None

    def _bar_event(self, old: int | None) -> list[Event]:
        new = self.bar_address
        return [] if new == old else [BarMoved(self._slot, old, new)]

    # ------------------------------------------------------------------ BAR0

    def _selected(self) -> tuple[int, _Queue] | None:
        if self._sel < self._num_queues:
            return self._sel, self._queues[self._sel]
        return None

    def bar_read(self, offset: int, size: int) -> int:
        """A guest read at BAR0 ``offset``; never raises (the bus checked decoding)."""
        if not (0 <= offset < BAR0_SIZE and is_reg_access(offset, size)):
            return all_ones(size)
        if DEVICE_CONFIG_RANGE.contains(offset, size):
            rel = offset - DEVICE_CONFIG_RANGE.start
            return int.from_bytes(self._device_config[rel : rel + size], "little")
        if offset == REG_DEVICE_FEATURES:
            return self._features
        if offset == REG_DRIVER_FEATURES:
            return self._driver_features
        if offset == REG_DEVICE_STATUS:
            return self._status
        if offset == REG_NUM_QUEUES:
            return self._num_queues
        if offset == REG_QUEUE_SEL:
            return self._sel
        sel = self._selected()
        if sel is None:
            return 0  # queue registers of a queue that does not exist, notify, reserved
        _, qs = sel
        if offset == REG_QUEUE_SIZE:
            return qs.size
        if offset == REG_QUEUE_SIZE_MAX:
            return self._queue_size_max
        if offset == REG_QUEUE_VECTOR:
            return qs.vector
        if offset in (REG_QUEUE_DESC_LO, REG_QUEUE_AVAIL_LO, REG_QUEUE_USED_LO):
            return self._ring_addr(qs, offset) & _LO_MASK
        if offset in (REG_QUEUE_DESC_HI, REG_QUEUE_AVAIL_HI, REG_QUEUE_USED_HI):
            return self._ring_addr(qs, offset - 4) >> 32
        if offset == REG_QUEUE_ENABLE:
            return int(qs.enabled)
        if offset == REG_QUEUE_BROKEN:
            return int(qs.broken is not None)
        return 0

    @staticmethod
    def _ring_addr(qs: _Queue, lo_offset: int) -> int:
        if lo_offset == REG_QUEUE_DESC_LO:
            return qs.desc
        if lo_offset == REG_QUEUE_AVAIL_LO:
            return qs.avail
        return qs.used

    def bar_write(self, offset: int, size: int, value: int) -> list[Event]:
        """A guest write at BAR0 ``offset``; never raises (the bus checked decoding)."""
        if not (0 <= offset < BAR0_SIZE and is_reg_access(offset, size)):
            return []
        value &= U32_MASK
        queue = notify_queue(offset)
        if queue is not None:
            return self._notify(queue, size, value)
        if offset == REG_DRIVER_FEATURES:
            if not self._status & STATUS_FEATURES_OK:
                self._driver_features = value
            return []
        if offset == REG_DEVICE_STATUS:
            return self._write_status(value)
        if offset == REG_QUEUE_SEL:
            self._sel = value
            return []
        sel = self._selected()
        if sel is None:
            return []
        queue, qs = sel
        if offset == REG_QUEUE_ENABLE:
            return self._write_enable(queue, qs, value)
        if qs.enabled:
            return []  # a running queue's parameters are frozen
        if offset == REG_QUEUE_SIZE:
            if valid_queue_size(value) and value <= self._queue_size_max:
                qs.size = value
        elif offset == REG_QUEUE_VECTOR:
            if value == QUEUE_NO_VECTOR or value < self._num_vectors:
                qs.vector = value
        elif offset in (REG_QUEUE_DESC_LO, REG_QUEUE_DESC_HI):
            qs.desc = _merge(qs.desc, offset - REG_QUEUE_DESC_LO, value)
        elif offset in (REG_QUEUE_AVAIL_LO, REG_QUEUE_AVAIL_HI):
            qs.avail = _merge(qs.avail, offset - REG_QUEUE_AVAIL_LO, value)
        elif offset in (REG_QUEUE_USED_LO, REG_QUEUE_USED_HI):
            qs.used = _merge(qs.used, offset - REG_QUEUE_USED_LO, value)
        return []

    def _notify(self, queue: int, size: int, value: int) -> list[Event]:
        # Same rule as the ioeventfd (length 4, datamatch q): anything else is no kick.
        if size != NOTIFY_SIZE or value != queue or queue >= self._num_queues:
            return []
        if not self._queues[queue].enabled:
            return []
        return [QueueNotifyExit(self._slot, queue)]

    def _set_status(self, new: int) -> list[Event]:
        old = self._status
        self._status = new
        return [] if new == old else [StatusChanged(self._slot, old, new)]

    def _write_status(self, value: int) -> list[Event]:
        if value == 0:
            return self._reset()
        new = value & STATUS_DRIVER_BITS | self._status & STATUS_NEEDS_RESET
        if (
            new & STATUS_FEATURES_OK
            and not self._status & STATUS_FEATURES_OK
            and self._driver_features & ~self._features
        ):
            new &= ~STATUS_FEATURES_OK  # the driver asked for a feature we do not offer
        return self._set_status(new)

    def _reset(self) -> list[Event]:
        events: list[Event] = [
            QueueDisabled(self._slot, q) for q, qs in enumerate(self._queues) if qs.enabled
        ]
        self._queues = [_Queue() for _ in range(self._num_queues)]
        self._driver_features = 0
        self._sel = 0
        events += self._set_status(0)
        events.append(DeviceReset(self._slot))
        return events

    def _write_enable(self, queue: int, qs: _Queue, value: int) -> list[Event]:
        if value == 0:
            if not qs.enabled:
                return []
            qs.enabled = False
            return [QueueDisabled(self._slot, queue)]
        if value != 1 or qs.enabled or self._status & STATUS_NEEDS_RESET:
            return []
        if not _ring_ok(qs):
            return self._set_status(self._status | STATUS_NEEDS_RESET)
        qs.enabled = True
        # Fixed now: a FEATURES_OK the guest sets later must not change, behind the device's
        # back, what queue_config() (and so a restarted device's replay) says this queue uses.
        qs.event_idx = bool(self.negotiated_features & F_EVENT_IDX)
        return [self._enabled_event(queue, qs)]

    def _enabled_event(self, queue: int, qs: _Queue) -> QueueEnabled:
        return QueueEnabled(
            self._slot,
            queue,
            qs.size,
            qs.desc,
            qs.avail,
            qs.used,
            None if qs.vector == QUEUE_NO_VECTOR else qs.vector,
            qs.event_idx,
        )


def _merge(addr: int, half: int, value: int) -> int:
    """Replace the low (``half == 0``) or high (``half == 4``) 32 bits of a u64 address."""
    if half == 0:
        return addr & _HI_MASK | value
    return addr & _LO_MASK | value << 32


def _ring_ok(qs: _Queue) -> bool:
    """Size set, areas aligned (16 / 2 / 4) and none wrapping past ``2**64`` (overlapping
    areas are the device's to find: its ring starts broken)."""
    if qs.size == 0:
        return False
    problem = placement_problem(
        qs.size, qs.desc, qs.avail, qs.used, limit=_U64_LIMIT, allow_overlap=True
    )
    return problem is None


# ---------------------------------------------------------------------------- the bus


class PciBus:
    """The functions of one guest, by slot, and the routing of guest MMIO to them.

    ECAM accesses go to the addressed slot (an empty slot reads all-ones); any other address
    goes to the lowest slot whose BAR0 is decoded there; unclaimed addresses read all-ones and
    ignore writes. Never raises on a guest access.
    """

    def __init__(self, functions: Iterable[PciFunction] = ()) -> None:
        self._functions: dict[int, PciFunction] = {}
        for fn in functions:
            self.add(fn)

    def add(self, fn: PciFunction) -> None:
        """Plug ``fn`` in at its slot (:class:`UsageError` if the slot is taken)."""
        if fn.slot in self._functions:
            raise UsageError(f"slot {fn.slot} is already taken")
        self._functions[fn.slot] = fn
        self._functions = dict(sorted(self._functions.items()))

    def function(self, slot: int) -> PciFunction | None:
        return self._functions.get(slot)

    @property
    def functions(self) -> tuple[PciFunction, ...]:
        """The functions in slot order."""
        return tuple(self._functions.values())

    def bar_claimant(self, addr: int) -> PciFunction | None:
        """The function whose decoded BAR0 claims ``addr`` (lowest slot on overlap)."""
        for fn in self._functions.values():
            base = fn.bar_address
            if base is not None and base <= addr < base + BAR0_SIZE:
                return fn
        return None

    def mmio_read(self, addr: int, size: int) -> int:
        """A guest load of ``size`` bytes at ``addr``."""
        cfg = ecam_decode(addr)
        if cfg is not None:
            fn = self._functions.get(cfg[0])
            return all_ones(size) if fn is None else fn.config_read(cfg[1], size)
        fn = self.bar_claimant(addr)
        if fn is None:
            return all_ones(size)
        base = fn.bar_address
        assert base is not None
        return fn.bar_read(addr - base, size)

    def mmio_write(self, addr: int, size: int, value: int) -> list[Event]:
        """A guest store of ``size`` bytes at ``addr`` (``value`` truncated to the width)."""
        value &= all_ones(size)
        cfg = ecam_decode(addr)
        if cfg is not None:
            fn = self._functions.get(cfg[0])
            return [] if fn is None else fn.config_write(cfg[1], size, value)
        fn = self.bar_claimant(addr)
        if fn is None:
            return []
        base = fn.bar_address
        assert base is not None
        return fn.bar_write(addr - base, size, value)


# ---------------------------------------------------------------------------- test double


class BusIo:
    """An in-process guest I/O path over a :class:`PciBus` (a test double for
    :class:`guestemu.pci.GuestIo`): every access goes straight to the bus and the events are
    collected in :attr:`events`.

    With ``fast_path=True`` it also plays the VMM's ioeventfd wiring: on every
    :class:`BarMoved` it binds one ioeventfd per queue at the notify address (length 4,
    datamatch ``q``), and a matching write is counted in :attr:`kicks` per ``(slot, queue)``
    instead of reaching the bus -- as KVM's ioeventfd would.
    """

    def __init__(self, bus: PciBus, *, fast_path: bool = False) -> None:
        self.bus = bus
        self.fast_path = fast_path
        self.events: list[Event] = []
        self.kicks: Counter[tuple[int, int]] = Counter()
        self._ioeventfds: dict[int, tuple[int, int]] = {}  # addr -> (slot, queue == datamatch)

    def read(self, addr: int, size: int) -> int:
        return self.bus.mmio_read(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self._ioeventfds.get(addr)
        if hit is not None and size == NOTIFY_SIZE and value == hit[1]:
            self.kicks[hit] += 1
            return
        events = self.bus.mmio_write(addr, size, value)
        self.events.extend(events)
        if self.fast_path:
            for ev in events:
                if isinstance(ev, BarMoved):
                    self._rebind(ev)

    def take_events(self) -> list[Event]:
        """Return and forget the collected events."""
        events, self.events = self.events, []
        return events

    def _rebind(self, ev: BarMoved) -> None:
        fn = self.bus.function(ev.function)
        if fn is None:
            return
        if ev.old is not None:
            for q in range(fn.num_queues):
                addr = ev.old + notify_offset(q)
                if self._ioeventfds.get(addr) == (ev.function, q):
                    del self._ioeventfds[addr]
        if ev.new is not None:
            for q in range(fn.num_queues):
                # first binding wins, like the broker's EEXIST on a collision
                self._ioeventfds.setdefault(ev.new + notify_offset(q), (ev.function, q))
