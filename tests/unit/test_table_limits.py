"""Per-connection quotas, the broker's fd reserve, and syscalls that fail at the limit:
each refusal is an errno reply that changes nothing, and the table keeps serving."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from hostemu.broker.limits import FdBudget, Quotas
from shared import wire
from shared.errors import ConfigError
from shared.fds import OwnedFd
from shared.wire import Scope
from tests.unit.test_table import PAGE, Harness, err


def state_counts(h: Harness) -> tuple[int, int, int, int]:
    snap = h.snap()
    return (len(snap["objects"]), len(snap["vms"]), len(snap["devices"]), len(snap["bindings"]))


# ------------------------------------------------------------------------------ quotas


def test_vm_quota_is_enospc_and_per_connection(harness: Callable[..., Harness]) -> None:
    h = harness(quotas=Quotas(vms=2))
    c, other = h.host(), h.host()
    h.vm(c)
    h.vm(c)
    before = state_counts(h)
    assert err(h.req(c, wire.VmCreate(ngsi=8))) == "ENOSPC"
    assert state_counts(h) == before
    h.vm(other)  # another connection has its own quota


def test_device_quota_is_enospc(harness: Callable[..., Harness]) -> None:
    h = harness(quotas=Quotas(devices=1))
    c = h.host()
    vm = h.vm(c)
    h.device(c, vm)
    before = state_counts(h)
    assert err(h.req(c, wire.DeviceCreate(vm=vm, nsignals=1))) == "ENOSPC"
    assert state_counts(h) == before


def test_binding_quota_counts_bindings_until_released(harness: Callable[..., Harness]) -> None:
    h = harness(quotas=Quotas(bindings=2))
    c = h.host()
    vm = h.vm(c)
    e = h.import_eventfd(c)
    h.ioeventfd(c, vm, e, 0x1000)
    h.ioeventfd(c, vm, e, 0x2000)
    before = state_counts(h)
    refused = h.req(c, wire.Ioeventfd(vm=vm, handle=e, addr=0x3000, len=4))
    assert err(refused) == "ENOSPC"
    assert "bindings quota" in refused.text  # type: ignore[union-attr]
    assert state_counts(h) == before
    assert isinstance(
        h.req(
            c,
            wire.Ioeventfd(vm=vm, handle=e, addr=0x1000, len=4, flags=wire.IOEVENTFD_FLAG_DEASSIGN),
        ),
        wire.Ok,
    )
    h.ioeventfd(c, vm, e, 0x3000)  # a released binding gives its place back


def test_memslot_quota_is_enospc(harness: Callable[..., Harness]) -> None:
    h = harness(quotas=Quotas(memslots=1))
    c = h.host()
    vm = h.vm(c)
    mem = h.import_memory(c, 4 * PAGE)
    ok = h.req(c, wire.MemslotSet(vm=vm, slot=0, gpa=0, size=PAGE, offset=0, handle=mem))
    assert isinstance(ok, wire.Ok), ok
    refused = h.req(c, wire.MemslotSet(vm=vm, slot=1, gpa=PAGE, size=PAGE, offset=PAGE, handle=mem))
    assert err(refused) == "ENOSPC"
    assert [len(v["memslots"]) for v in h.snap()["vms"]] == [1]
    assert isinstance(
        h.req(c, wire.MemslotSet(vm=vm, slot=0, gpa=0, size=0, offset=0, handle=mem)), wire.Ok
    )
    ok = h.req(c, wire.MemslotSet(vm=vm, slot=1, gpa=PAGE, size=PAGE, offset=PAGE, handle=mem))
    assert isinstance(ok, wire.Ok), ok


def test_quota_parse_names_the_bad_field() -> None:
    assert Quotas.parse(["vms=3", "handles=0x10"]) == Quotas(vms=3, handles=16)
    for bad, word in (
        ("vm=3", "vm=3"),
        ("vms", "NAME=N"),
        ("vms=x", "'x'"),
        ("bindings=0", "at least 1"),
    ):
        with pytest.raises(ConfigError, match=word):
            Quotas.parse([bad])


# ------------------------------------------------------------------------------ the reserve


def test_fd_reserve_refuses_new_fd_objects_but_not_introspection_or_dups(
    harness: Callable[..., Harness],
) -> None:
    room = {"free": 10}
    h = harness(fd_room=lambda n: room["free"] - n >= 0)
    c = h.host()
    a = h.import_eventfd(c)
    room["free"] = 0
    before = state_counts(h)
    for msg in (
        wire.EventfdCreate(),
        wire.EventfdImport(fds=(h.eventfd().dup(),)),
        wire.MemoryImport(size=PAGE, fds=(h.memfd(PAGE).dup(),)),
    ):
        refused = h.req(c, msg)
        assert err(refused) == "ENFILE", refused
        assert "reserve" in refused.text  # type: ignore[union-attr]
    assert state_counts(h) == before
    # What the reserve is for keeps working: a second handle on a known object,
    # introspection, a dup handed out, a VM.
    assert isinstance(h.req(c, wire.HandleDup(handle=a)), wire.HandleReply)
    assert isinstance(h.req(c, wire.GetState()), wire.StateReply)
    got = h.req(c, wire.HandleGetFd(handle=a))
    assert isinstance(got, wire.FdReply)
    h.vm(c)


def test_fd_budget_arithmetic() -> None:
    b = FdBudget(limit=100, fixed=10, reserve=20)
    b.variable = 69
    assert b.free() == 21 and b.room_for(1) and not b.room_for(2)


# ------------------------------------------------------------------------------ syscalls failing


@pytest.fixture
def dup_fails(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Make OwnedFd.dup fail with EMFILE while ``fail["on"]`` (the broker at its limit)."""
    fail = {"on": False}
    real = OwnedFd.dup

    def dup(self: OwnedFd) -> OwnedFd:
        if fail["on"]:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self)

    monkeypatch.setattr(OwnedFd, "dup", dup)
    return fail


def test_assign_whose_notice_cannot_dup_is_emfile_and_changes_nothing(
    harness: Callable[..., Harness], dup_fails: dict[str, bool]
) -> None:
    h = harness()
    c = h.host()
    vm = h.vm(c)
    guest = h.guest(c, vm)
    e = h.import_eventfd(c)
    before = (state_counts(h), h.refs(c, e))
    dup_fails["on"] = True
    refused = h.req(c, wire.Irqfd(vm=vm, handle=e, gsi=3))
    assert err(refused) == "EMFILE"
    assert (state_counts(h), h.refs(c, e)) == before
    assert h.notices(guest, wire.IrqfdAttach) == []
    dup_fails["on"] = False
    h.irqfd(c, vm, e, 3)  # the eventfd is not left marked as bound (no EBUSY)
    assert len(h.notices(guest, wire.IrqfdAttach)) == 1


def test_attach_that_cannot_dup_fails_whole(
    harness: Callable[..., Harness], dup_fails: dict[str, bool]
) -> None:
    h = harness()
    c = h.host()
    vm = h.vm(c)
    e = h.import_eventfd(c)
    h.irqfd(c, vm, e, 1)
    mem = h.import_memory(c, PAGE)
    assert isinstance(
        h.req(c, wire.MemslotSet(vm=vm, slot=0, gpa=0, size=PAGE, offset=0, handle=mem)), wire.Ok
    )
    guest = h.channel(c, Scope.VM, vm, attach=False)
    dup_fails["on"] = True
    assert err(h.req(guest, wire.Attach())) == "EMFILE"
    assert h.snap()["vms"][0]["guest"] is None
    assert h.notices(guest, wire.MemslotAttach) == []
    dup_fails["on"] = False
    assert isinstance(h.req(guest, wire.Attach()), wire.Ok)
    assert len(h.notices(guest, wire.IrqfdAttach)) == 1


def test_get_fd_at_the_limit_is_emfile(
    harness: Callable[..., Harness], dup_fails: dict[str, bool]
) -> None:
    h = harness()
    c = h.host()
    e = h.import_eventfd(c)
    dup_fails["on"] = True
    assert err(h.req(c, wire.HandleGetFd(handle=e))) == "EMFILE"
    assert isinstance(h.req(c, wire.Ping(token=1)), wire.Pong)
