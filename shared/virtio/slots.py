"""Guest memory slots as lookup tables: which slot holds a guest-physical address.

The device validates buffers and copies payloads per memory slot (a buffer must lie inside
one slot; a simple batch is copied with one gather or scatter per slot). Both ask a
:class:`SlotTable`: the slots' starts, last bytes and writability as numpy arrays for the
vectorized paths and as Python lists for the scalar ones.

Invariants
----------
* A table describes exactly the map's current slots: :meth:`SlotCache.table` rebuilds it
  whenever the map changed -- every add and remove advances the map's ``generation``.
* ``lasts`` holds each slot's *last* byte (``end - 1``): ``end`` itself may be ``2**64``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from shared.memory import GuestMemoryMap
from shared.virtio.layout import BoolArray, I64Array, U64Array


class SlotTable(NamedTuple):
    starts: U64Array
    lasts: U64Array  # last byte (end - 1): end itself may be 2**64
    writable: BoolArray
    gpas: list[int]
    sizes: list[int]
    last_list: list[int]  # ``lasts`` and ``writable`` as Python values, for the scalar paths
    writable_list: list[bool]


class SlotCache:
    """The slot table of one memory map, rebuilt only when the map changed."""

    __slots__ = ("_built_at", "_mem", "_table")

    def __init__(self, mem: GuestMemoryMap) -> None:
        self._mem = mem
        self._built_at = -1  # the map's generation the table was built for
        self._table: SlotTable | None = None

    def table(self) -> SlotTable:
        """The memory map's slots as arrays and lists, rebuilt only when the map changed
        (building costs a dozen numpy calls and a translate per slot, too much to repeat on
        every pass)."""
        if self._built_at == self._mem.generation and self._table is not None:
            return self._table
        slots = self._mem.slots()
        writable = [bool(self._mem.translate(s.gpa, 0).flags.writeable) for s in slots]
        table = SlotTable(
            starts=np.array([s.gpa for s in slots], dtype=np.uint64),
            lasts=np.array([s.end - 1 for s in slots], dtype=np.uint64),
            writable=np.array(writable, dtype=np.bool_),
            gpas=[s.gpa for s in slots],
            sizes=[s.size for s in slots],
            last_list=[s.end - 1 for s in slots],
            writable_list=writable,
        )
        self._built_at, self._table = self._mem.generation, table
        return table


def locate(addrs: U64Array, table: SlotTable) -> I64Array:
    """Slot index (into ``table``) holding each address, -1 if none."""
    if not table.gpas:
        return np.full(addrs.shape[0], -1, dtype=np.int64)
    si = np.searchsorted(table.starts, addrs, side="right").astype(np.int64) - 1
    safe = np.maximum(si, 0)
    return np.where((si >= 0) & (addrs <= table.lasts[safe]), si, -1).astype(np.int64)
