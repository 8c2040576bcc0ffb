"""Introspection pages: every section walks in cursor order without gaps or repeats, a
request costs one page however big the table, and the assembled state is the snapshot."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from hostemu.broker import introspect
from hostemu.broker.idmap import IdMap
from hostemu.broker.limits import Quotas
from shared import wire
from shared.wire import StateSection
from tests.unit.test_table import Harness, err


def walk(h: Harness, conn: int, section: StateSection, limit: int) -> list[list[Any]]:
    pages: list[list[Any]] = []
    after = 0
    while True:
        r = h.req(conn, wire.GetState(section=section, limit=limit, after=after))
        assert isinstance(r, wire.StateReply) and r.section == section, r
        pages.append(json.loads(r.text))
        if not r.next:
            return pages
        assert r.next > after  # the cursor only moves forward
        after = r.next


def test_each_section_pages_in_order_without_gaps(harness: Callable[..., Harness]) -> None:
    h = harness(quotas=Quotas(vms=100))
    c = h.host()
    vms = [h.vm(c, ngsi=1, irqchip=False) for _ in range(50)]
    pages = walk(h, c, StateSection.VMS, 7)
    assert all(len(p) <= 7 for p in pages) and len(pages) == 8
    assert [v["id"] for p in pages for v in p] == vms
    # Destroying some between walks: the rest still come in order.
    for vm in vms[::3]:
        assert isinstance(h.req(c, wire.VmDestroy(vm=vm)), wire.Ok)
    assert [v["id"] for p in walk(h, c, StateSection.VMS, 4) for v in p] == [
        vm for i, vm in enumerate(vms) if i % 3
    ]


def test_handles_page_across_connections(harness: Callable[..., Harness]) -> None:
    h = harness()
    conns = [h.host() for _ in range(3)]
    expect = []
    for c in conns:
        for _ in range(5):
            handle = h.import_eventfd(c)
            expect.append((c, handle))
    got = [(x["conn"], x["handle"]) for p in walk(h, conns[0], StateSection.HANDLES, 4) for x in p]
    assert got == expect


def test_one_request_costs_one_page(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,000 VMs: a page of 10 builds about 10 items, not 20,000."""
    h = harness(quotas=Quotas(vms=20_000))
    c = h.host()
    for _ in range(20_000):
        h.req(c, wire.VmCreate(ngsi=1))
    built = []
    real = introspect.vm_item

    def counting(v: Any) -> dict[str, Any]:
        built.append(v.id)
        return real(v)

    monkeypatch.setattr(introspect, "vm_item", counting)
    r = h.req(c, wire.GetState(section=StateSection.VMS, limit=10, after=15_000))
    assert isinstance(r, wire.StateReply)
    assert [v["id"] for v in json.loads(r.text)] == list(range(15_001, 15_011))
    assert len(built) <= 11  # the page, and one look-ahead to know there is more


def test_a_page_fits_one_frame(harness: Callable[..., Harness]) -> None:
    h = harness(quotas=Quotas(handles=20_000))
    c = h.host()
    e = h.import_eventfd(c)
    for _ in range(5000):
        h.req(c, wire.HandleDup(handle=e))
    pages = walk(h, c, StateSection.HANDLES, introspect.MAX_PAGE)
    assert len(pages) >= 2 and sum(map(len, pages)) == 5001


def test_unknown_section_is_einval(harness: Callable[..., Harness]) -> None:
    h = harness()
    c = h.host()
    assert err(h.req(c, wire.GetState(section=len(StateSection)))) == "EINVAL"


def test_snapshot_is_every_section_assembled(harness: Callable[..., Harness]) -> None:
    h = harness()
    c = h.host()
    vm = h.vm(c)
    e = h.import_eventfd(c)
    h.irqfd(c, vm, e, 1)
    snap = h.snap()
    assert snap["counts"] == {"connections": 1, "objects": 1, "vms": 1, "devices": 0, "bindings": 1}
    assert snap["connections"][0]["handles"] == {str(e): snap["objects"][0]["id"]}
    assert [b["kind"] for b in snap["bindings"]] == ["irqfd"]


def test_idmap_keeps_order_through_deletes_and_refuses_untracked_updates() -> None:
    m: IdMap[str] = IdMap()
    for k in (1, 2, 5, 9, 3):  # 3 arrives late (a wrapped handle number)
        m[k] = str(k)
    del m[2]
    assert m.pop(9) == "9" and m.pop(9, None) is None
    assert list(m.keys_after(0)) == [1, 3, 5] and list(m.keys_after(3)) == [5]
    with pytest.raises(TypeError):
        m.setdefault(4, "4")
    m.clear()
    assert list(m.keys_after(0)) == []
