"""Introspection of the broker's table, a page at a time (``GetState``, ``vbusemu ps``).

Theory of operation
-------------------
The state is split into sections (:class:`~shared.wire.StateSection`); each lists plain
JSON-able items in cursor order -- object ids, or ``conn << 32 | handle`` for handles.
A request names a section, a cursor and a limit; :func:`page` returns the items past the
cursor that fit one reply frame, and the cursor of the last one (0 when the section is
done). Every table it pages through is an :class:`~hostemu.broker.idmap.IdMap`, so a
request costs O(log n + page) however big the table: one client asking for the state of
20,000 VMs cannot stall the loop that serves everyone else.

Pages are consistent one by one, not with each other: like reading ``/proc``, an object
created or destroyed between two pages may be missed or seen once. The summary (policy,
process, counts) is one small item.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from hostemu.broker.idmap import IdMap
from hostemu.broker.objects import (
    Binding,
    Conn,
    Device,
    EventfdObj,
    IoeventfdBinding,
    IrqfdBinding,
    KernelObject,
    KickfdBinding,
    MemoryObj,
    ShmSignalBinding,
    Vm,
)
from shared import wire
from shared.wire import StateSection

if TYPE_CHECKING:
    from hostemu.broker.table import ObjectTable

DEFAULT_PAGE = 512
MAX_PAGE = 4096
PAGE_BYTES = wire.MAX_PAYLOAD - 256  # room for the reply's fixed fields
_HANDLE_BITS = 32


def connection_item(c: Conn) -> dict[str, Any]:
    return {
        "id": c.id,
        "pid": c.pid,
        "uid": c.uid,
        "scope": c.scope.name.lower(),
        "target": c.target,
        "handles": len(c.handles),
    }


def object_item(o: KernelObject) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if isinstance(o, EventfdObj):
        extra = {"semaphore": o.semaphore}
    elif isinstance(o, MemoryObj):
        extra = {"size": o.size}
    return {
        "id": o.id,
        "kind": o.kind,
        "handles": o.handles,
        "bindings": o.ctx_refs,
        "fd": o.fd.fd,
        **extra,
    }


def vm_item(v: Vm) -> dict[str, Any]:
    return {
        "id": v.id,
        "owner": v.owner,
        "ngsi": v.ngsi,
        "irqchip": v.irqchip,
        "guest": v.guest,
        "devices": sorted(v.devices),
        "memslots": [
            {
                "slot": s.slot,
                "gpa": s.gpa,
                "size": s.size,
                "offset": s.offset,
                "memory": s.memory.id,
            }
            for s in sorted(v.memslots.values(), key=lambda s: s.gpa)
        ],
    }


def device_item(d: Device) -> dict[str, Any]:
    return {
        "id": d.id,
        "owner": d.owner,
        "vm": d.vm.id,
        "nsignals": d.nsignals,
        "process": d.process,
    }


def binding_item(b: Binding) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": b.id,
        "kind": b.kind,
        "eventfd": b.eventfd.id,
        "state": b.state,
        "consumer": b.consumer,
    }
    if isinstance(b, IrqfdBinding):
        d.update(vm=b.vm.id, gsi=b.gsi, resamplefd=b.resample.id if b.resample else None)
    elif isinstance(b, IoeventfdBinding):
        d.update(
            vm=b.vm.id,
            bus=b.bus,
            addr=b.addr,
            len=b.length,
            datamatch=b.datamatch,
        )
    elif isinstance(b, ShmSignalBinding):
        d.update(device=b.device.id, sigid=b.sigid)
    elif isinstance(b, KickfdBinding):
        d.update(device=b.device.id, queue=b.queue)
    return d


def _summary(t: ObjectTable) -> Iterator[tuple[int, dict[str, Any]]]:
    yield (
        1,
        {
            "policy": t.policy.name.lower(),
            "process": t.process_info(),
            "counts": {
                "connections": len(t.conns),
                "objects": len(t.objects),
                "vms": len(t.vms),
                "devices": len(t.devices),
                "bindings": len(t.bindings),
            },
            "quotas": dataclasses.asdict(t.quotas),
        },
    )


def _table(
    table: IdMap[Any], item: Callable[[Any], dict[str, Any]], after: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    for key in table.keys_after(after):
        yield key, item(table[key])


def _handles(t: ObjectTable, after: int) -> Iterator[tuple[int, dict[str, Any]]]:
    first_conn, first_handle = after >> _HANDLE_BITS, after & ((1 << _HANDLE_BITS) - 1)
    for cid in t.conns.keys_after(first_conn - 1 if first_conn else 0):
        handles = t.conns[cid].handles
        start = first_handle if cid == first_conn else -1
        for h in handles.keys_after(start):
            yield (cid << _HANDLE_BITS) | h, {"conn": cid, "handle": h, "object": handles[h].id}


def _items(
    t: ObjectTable, section: StateSection, after: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    if section is StateSection.SUMMARY:
        return _summary(t) if after == 0 else iter(())
    if section is StateSection.HANDLES:
        return _handles(t, after)
    sources: dict[StateSection, tuple[IdMap[Any], Callable[[Any], dict[str, Any]]]] = {
        StateSection.CONNECTIONS: (t.conns, connection_item),
        StateSection.OBJECTS: (t.objects, object_item),
        StateSection.VMS: (t.vms, vm_item),
        StateSection.DEVICES: (t.devices, device_item),
        StateSection.BINDINGS: (t.bindings, binding_item),
    }
    table, item = sources[section]
    return _table(table, item, after)


def page(t: ObjectTable, section: StateSection, after: int, limit: int) -> tuple[str, int]:
    """The JSON text of up to ``limit`` items past ``after`` that fit a reply frame, and
    the cursor to continue from (0: nothing more)."""
    texts: list[str] = []
    size = 2
    last = 0
    for cursor, item in _items(t, section, after):
        if len(texts) == limit:
            return "[" + ",".join(texts) + "]", last
        text = json.dumps(item, sort_keys=True)
        if size + len(text) + 1 > PAGE_BYTES:
            if not texts:  # one item bigger than a frame: say so rather than stall
                text = json.dumps({"id": item.get("id"), "truncated": True})
            else:
                return "[" + ",".join(texts) + "]", last
        texts.append(text)
        size += len(text) + 1
        last = cursor
    return "[" + ",".join(texts) + "]", 0


def snapshot(t: ObjectTable) -> dict[str, Any]:
    """Every section in one dict, in the shape ``Channel.state()`` gives (for in-process
    use and tests)."""

    def every(section: StateSection) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            text, after = page(t, section, after, MAX_PAGE)
            out.extend(json.loads(text))
            if not after:
                return out

    return wire.assemble_state(every)
