"""Unit tests for the broker table's data plane: kick fds, guest-memory distribution,
PeerAttached, and the two relays (guest I/O exits to the VMM, VMM configuration to a
device process, plus device reports).

Pure and in-process, like ``test_table.py``: the :class:`Harness` from there plays the
server loop with real eventfds and memfds and a fake clock, and checks at the end of
every test that once all connections are gone the table is empty, no deadline is left
and no fd leaked (the conftest leak guard checks the fd table as well).
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from hostemu.broker.relay import RelayTable
from hostemu.broker.table import ObjectTable, Send
from shared import wire
from shared.fds import OwnedFd
from shared.wire import DetachReason, PeerKind, Policy, Scope
from tests.unit.test_table import (
    BAD,
    NO,
    PAGE,
    Harness,
    World,
    err,
    file_ident,
    kid,
    still_open,
    world,
)

KICK_DEASSIGN = wire.KICKFD_FLAG_DEASSIGN
TOP = 1 << 64
M = TypeVar("M", bound=wire.Message)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def make() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(policy: Policy = Policy.HUP, **kw: Any) -> Harness:
        h = Harness(policy, **kw)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()  # everyone leaves: the table must be empty, nothing pending, no fd kept


@pytest.fixture(params=list(Policy), ids=lambda p: p.name.lower())
def h(request: pytest.FixtureRequest, make: Callable[..., Harness]) -> Harness:
    return make(request.param)


@pytest.fixture
def hup(make: Callable[..., Harness]) -> Harness:
    return make(Policy.HUP)


@pytest.fixture
def refc(make: Callable[..., Harness]) -> Harness:
    return make(Policy.REFCOUNT)


# ------------------------------------------------------------------------------ helpers


def bare(msg: wire.Message) -> wire.Message:
    """``msg`` without its fds, for comparing notices that carry some."""
    return dataclasses.replace(msg, fds=())


def one(h: Harness, conn: int, kind: type[M]) -> M:
    """Pop ``conn``'s notices; exactly one of them, of type ``kind``, must be there."""
    got = h.notices(conn)
    assert len(got) == 1 and isinstance(got[0], kind), got
    return got[0]


SILENT = "no reply"


def answer(h: Harness, conn: int, msg: wire.Message) -> str:
    """Send a relay answer (IoExitDone, DeviceConfigDone): ``"Ok"`` or the errno name of
    the reply -- or, for a type the protocol never answers (``NO_REPLY``), check that
    nothing came back and return :data:`SILENT`. Either way the tests then check the
    effect (the requester's reply, or that it is still waiting)."""
    r = h.reply(conn, h.send(conn, msg))
    if getattr(type(msg), "NO_REPLY", False):
        assert r is None, r
        return SILENT
    return err(r)


def accepted(h: Harness, conn: int, msg: wire.Message) -> bool:
    return answer(h, conn, msg) in ("Ok", SILENT)


def refused(h: Harness, conn: int, msg: wire.Message, name: str) -> bool:
    return answer(h, conn, msg) in (name, SILENT)


def inbox_empty(h: Harness, conn: int) -> bool:
    return h.inbox[conn] == []


def kickfd(h: Harness, host: int, dev: int, handle: int, queue: int) -> int:
    r = h.req(host, wire.DeviceKickfd(device=dev, queue=queue, handle=handle))
    assert isinstance(r, wire.IdReply), r
    return r.id


def memory(h: Harness, conn: int, size: int = 4 * PAGE) -> tuple[int, OwnedFd]:
    """Import a memfd; return its handle and our own copy (to compare file identity)."""
    mfd = h.memfd(size)
    r = h.req(conn, wire.MemoryImport(size=size, fds=(mfd.dup(),)))
    assert isinstance(r, wire.HandleReply), r
    return r.handle, mfd


def memslot(
    h: Harness,
    host: int,
    vm: int,
    slot: int,
    gpa: int,
    size: int,
    handle: int = NO,
    offset: int = 0,
) -> None:
    r = h.req(
        host, wire.MemslotSet(vm=vm, slot=slot, gpa=gpa, size=size, offset=offset, handle=handle)
    )
    assert isinstance(r, wire.Ok), r


def io_exit(h: Harness, guest: int, host: int, **kw: Any) -> tuple[int, wire.IoExitNotice]:
    """The guest exits; the VMM gets the notice, the guest no reply (yet)."""
    kw.setdefault("len", 4)
    kw.setdefault("addr", 0x1000)
    seq = h.send(guest, wire.IoExit(**kw))
    assert h.reply(guest, seq) is None
    return seq, one(h, host, wire.IoExitNotice)


def config(
    h: Harness, host: int, dev: int, proc: int, text: str = '{"q": 0}'
) -> tuple[int, wire.DeviceConfigNotice]:
    """The VMM configures the device; its process gets the notice, the VMM no reply."""
    seq = h.send(host, wire.DeviceConfig(device=dev, text=text))
    assert h.reply(host, seq) is None
    return seq, one(h, proc, wire.DeviceConfigNotice)


def attached(w: World) -> tuple[int, int]:
    assert w.guest is not None and w.proc is not None
    return w.guest, w.proc


# ------------------------------------------------------------------------------ kick fds


def test_kickfd_assign_reaches_the_device_process(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    b = kickfd(h, w.host, w.dev, w.handle, 3)
    n = one(h, proc, wire.KickfdAttach)
    assert bare(n) == wire.KickfdAttach(binding=b, queue=3)
    assert len(n.fds) == 1 and kid(n.fds[0]) == kid(w.efd)  # the very same kernel eventfd
    assert inbox_empty(h, guest) and inbox_empty(h, w.host)
    assert h.refs(w.host, w.handle) == (1, 1)
    assert h.bindings()[b] == {
        "id": b,
        "kind": "kickfd",
        "eventfd": h.obj_id(w.host, w.handle),
        "state": "active",
        "consumer": proc,
        "device": w.dev,
        "queue": 3,
    }


def test_kickfd_on_the_ioeventfd_eventfd_like_vhost(h: Harness) -> None:
    """The queue's doorbell: one eventfd, written by the guest (ioeventfd), read by the
    device process (kickfd)."""
    w = world(h)
    guest, proc = attached(w)
    io = h.ioeventfd(w.host, w.vm, w.handle, 0x1000)
    k = kickfd(h, w.host, w.dev, w.handle, 0)
    gi = one(h, guest, wire.IoeventfdAttach)
    pk = one(h, proc, wire.KickfdAttach)
    assert kid(gi.fds[0]) == kid(pk.fds[0]) == kid(w.efd)
    assert (gi.binding, pk.binding) == (io, k)
    assert h.refs(w.host, w.handle) == (1, 2)


def test_same_eventfd_may_kick_several_queues(h: Harness) -> None:
    w = world(h)
    _, proc = attached(w)
    a = kickfd(h, w.host, w.dev, w.handle, 0)
    b = kickfd(h, w.host, w.dev, w.handle, wire.MAX_QUEUES - 1)
    assert [bare(n) for n in h.notices(proc)] == [
        wire.KickfdAttach(binding=a, queue=0),
        wire.KickfdAttach(binding=b, queue=wire.MAX_QUEUES - 1),
    ]
    assert h.refs(w.host, w.handle) == (1, 2)


@pytest.mark.parametrize("flags", [0x2, 0x80000000, KICK_DEASSIGN | 0x4])
def test_kickfd_unknown_flags(h: Harness, flags: int) -> None:
    w = world(h)
    assert (
        err(h.req(w.host, wire.DeviceKickfd(device=w.dev, queue=0, handle=w.handle, flags=flags)))
        == "EINVAL"
    )
    assert h.bindings() == {}


@pytest.mark.parametrize("deassign", [False, True], ids=["assign", "deassign"])
@pytest.mark.parametrize(
    "queue,ok",
    [(0, True), (wire.MAX_QUEUES - 1, True), (wire.MAX_QUEUES, False), (0xFFFFFFFF, False)],
)
def test_kickfd_queue_range(h: Harness, queue: int, ok: bool, deassign: bool) -> None:
    w = world(h, proc=False)
    if deassign and ok:
        kickfd(h, w.host, w.dev, w.handle, queue)
    r = h.req(
        w.host,
        wire.DeviceKickfd(
            device=w.dev, queue=queue, handle=w.handle, flags=KICK_DEASSIGN if deassign else 0
        ),
    )
    if not ok:
        assert err(r) == "EINVAL"
    else:
        assert isinstance(r, wire.Ok if deassign else wire.IdReply), r
    assert h.refs(w.host, w.handle) == (1, 1 if ok and not deassign else 0)


@pytest.mark.parametrize("deassign", [False, True], ids=["assign", "deassign"])
def test_kickfd_ownership(h: Harness, deassign: bool) -> None:
    w = world(h)
    _, proc = attached(w)
    kickfd(h, w.host, w.dev, w.handle, 0)
    h.notices(proc)
    other = h.host()
    oh = h.import_eventfd(other, w.efd)  # even the same eventfd
    flags = KICK_DEASSIGN if deassign else 0
    assert (
        err(h.req(other, wire.DeviceKickfd(device=w.dev, queue=1, handle=oh, flags=flags)))
        == "EPERM"
    )
    assert (
        err(h.req(other, wire.DeviceKickfd(device=9999, queue=1, handle=oh, flags=flags)))
        == "ENOENT"
    )
    assert (
        err(h.req(w.host, wire.DeviceKickfd(device=9999, queue=1, handle=w.handle, flags=flags)))
        == "ENOENT"
    )
    assert (
        err(h.req(w.host, wire.DeviceKickfd(device=w.vm, queue=1, handle=w.handle, flags=flags)))
        == "ENOENT"
    )  # a VM id
    assert len(h.bindings()) == 1 and inbox_empty(h, proc)


def test_kickfd_handle_errors(h: Harness) -> None:
    w = world(h)
    _, proc = attached(w)
    m, _ = memory(h, w.host)
    req = wire.DeviceKickfd
    assert err(h.req(w.host, req(device=w.dev, queue=0, handle=BAD))) == "EBADF"
    assert err(h.req(w.host, req(device=w.dev, queue=0, handle=NO))) == "EBADF"
    assert err(h.req(w.host, req(device=w.dev, queue=0, handle=m))) == "EINVAL"  # memory
    kickfd(h, w.host, w.dev, w.handle, 0)
    for flags in (0, KICK_DEASSIGN):  # deassign checks the handle too
        assert err(h.req(w.host, req(device=w.dev, queue=0, handle=BAD, flags=flags))) == "EBADF"
        assert err(h.req(w.host, req(device=w.dev, queue=0, handle=m, flags=flags))) == "EINVAL"
    # A handle only another connection holds names nothing here.
    other = h.host()
    for _ in range(3):
        oh = h.import_eventfd(other)
    assert err(h.req(w.host, req(device=w.dev, queue=1, handle=oh))) == "EBADF"
    assert [type(n) for n in h.notices(proc)] == [wire.KickfdAttach]
    assert len(h.bindings()) == 1


@pytest.mark.parametrize("same", [True, False], ids=["same-eventfd", "other-eventfd"])
def test_second_kickfd_on_a_queue_is_eexist(h: Harness, same: bool) -> None:
    w = world(h)
    kickfd(h, w.host, w.dev, w.handle, 2)
    hd = w.handle if same else h.import_eventfd(w.host)
    assert err(h.req(w.host, wire.DeviceKickfd(device=w.dev, queue=2, handle=hd))) == "EEXIST"
    assert len(h.bindings()) == 1
    # Other devices' queues are independent.
    dev2 = h.device(w.host, w.vm)
    kickfd(h, w.host, dev2, hd, 2)


@pytest.mark.parametrize("by", ["handle", "dup-handle", "no-handle"])
def test_kickfd_deassign_waits_for_the_device_process(h: Harness, by: str) -> None:
    w = world(h)
    _, proc = attached(w)
    b = kickfd(h, w.host, w.dev, w.handle, 1)
    h.notices(proc)
    hd = {"handle": w.handle, "no-handle": NO}.get(by)
    if hd is None:
        r = h.req(w.host, wire.HandleDup(handle=w.handle))
        assert isinstance(r, wire.HandleReply)
        hd = r.handle
    seq = h.send(w.host, wire.DeviceKickfd(device=w.dev, queue=1, handle=hd, flags=KICK_DEASSIGN))
    assert h.notices(proc) == [wire.Detach(binding=b, reason=DetachReason.DEASSIGN)]
    assert h.reply(w.host, seq) is None  # until the process has stopped reading it
    assert h.bindings()[b]["state"] == "detaching"
    assert h.t.next_deadline() == h.now + h.t.ack_timeout
    # The queue is free at once: a new kickfd may be assigned before the ack.
    b2 = kickfd(h, w.host, w.dev, w.handle, 1)
    assert [bare(n) for n in h.notices(proc)] == [wire.KickfdAttach(binding=b2, queue=1)]
    assert h.refs(w.host, w.handle)[1] == 2
    h.ack(proc, b)
    assert isinstance(h.reply(w.host, seq), wire.Ok)
    assert h.refs(w.host, w.handle)[1] == 1
    assert set(h.bindings()) == {b2}


def test_kickfd_deassign_enoent(h: Harness) -> None:
    w = world(h)
    _, proc = attached(w)
    other = h.import_eventfd(w.host)
    d = wire.DeviceKickfd
    for hd in (w.handle, NO):  # nothing bound on the queue
        assert (
            err(h.req(w.host, d(device=w.dev, queue=0, handle=hd, flags=KICK_DEASSIGN))) == "ENOENT"
        )
    b = kickfd(h, w.host, w.dev, w.handle, 0)
    h.notices(proc)
    assert (
        err(h.req(w.host, d(device=w.dev, queue=0, handle=other, flags=KICK_DEASSIGN))) == "ENOENT"
    )  # another eventfd
    assert (
        err(h.req(w.host, d(device=w.dev, queue=1, handle=w.handle, flags=KICK_DEASSIGN)))
        == "ENOENT"
    )  # another queue
    assert inbox_empty(h, proc) and h.bindings()[b]["state"] == "active"
    seq = h.send(w.host, d(device=w.dev, queue=0, handle=w.handle, flags=KICK_DEASSIGN))
    # A second deassign while the first is still detaching finds nothing.
    assert err(h.req(w.host, d(device=w.dev, queue=0, handle=NO, flags=KICK_DEASSIGN))) == "ENOENT"
    h.ack_all(proc)
    assert isinstance(h.reply(w.host, seq), wire.Ok)


def test_kickfd_deassign_without_a_process_is_immediate(h: Harness) -> None:
    w = world(h, proc=False)
    b = kickfd(h, w.host, w.dev, w.handle, 0)
    assert h.bindings()[b]["consumer"] is None
    assert isinstance(
        h.req(w.host, wire.DeviceKickfd(device=w.dev, queue=0, handle=NO, flags=KICK_DEASSIGN)),
        wire.Ok,
    )
    assert h.bindings() == {} and h.refs(w.host, w.handle) == (1, 0)
    assert h.t.next_deadline() is None


def test_kickfd_deassign_finishes_when_the_process_crashes(h: Harness) -> None:
    w = world(h)
    _, proc = attached(w)
    b = kickfd(h, w.host, w.dev, w.handle, 0)
    seq = h.send(
        w.host, wire.DeviceKickfd(device=w.dev, queue=0, handle=w.handle, flags=KICK_DEASSIGN)
    )
    assert h.reply(w.host, seq) is None
    h.disconnect(proc)
    assert isinstance(h.reply(w.host, seq), wire.Ok)
    assert h.notices(w.host) == [wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev)]
    assert b not in h.bindings() and h.refs(w.host, w.handle) == (1, 0)


def test_kickfd_deassign_times_out_on_a_silent_process(h: Harness) -> None:
    w = world(h)
    _, proc = attached(w)
    kickfd(h, w.host, w.dev, w.handle, 0)
    seq = h.send(
        w.host, wire.DeviceKickfd(device=w.dev, queue=0, handle=w.handle, flags=KICK_DEASSIGN)
    )
    h.now += h.t.ack_timeout
    h.expire()
    assert proc in h.dropped
    assert isinstance(h.reply(w.host, seq), wire.Ok)
    assert h.refs(w.host, w.handle) == (1, 0)


def test_kickfd_is_not_hupped_when_the_last_handle_closes(hup: Harness) -> None:
    """Like vhost's kick (eventfd_fget), a kickfd holds the file: closing the last handle
    HUPs the shm-signal on the same eventfd but leaves the kickfd in place."""
    h = hup
    w = world(h)
    _, proc = attached(w)
    k = kickfd(h, w.host, w.dev, w.handle, 0)
    sig = h.shmsignal(w.host, w.dev, w.handle, 0)
    h.notices(proc)
    oid = h.obj_id(w.host, w.handle)
    fd, ident = h.broker_fd(w.host, w.handle)
    seq = h.send(w.host, wire.HandleClose(handle=w.handle))
    assert h.notices(proc) == [wire.Detach(binding=sig, reason=DetachReason.HUP)]
    h.ack(proc, sig)
    assert isinstance(h.reply(w.host, seq), wire.Ok)
    o = h.objects()[oid]
    assert (o["handles"], o["bindings"]) == (0, 1)
    assert h.bindings()[k]["state"] == "active" and still_open(fd, ident)
    # A process attaching now still gets it (the broker's fd is the only file left).
    h.disconnect(proc)
    h.notices(w.host)
    p2 = h.devproc(w.host, w.dev)
    n = one(h, p2, wire.KickfdAttach)
    assert n.binding == k and kid(n.fds[0]) == kid(w.efd)
    # The VMM can still deassign it without a handle; here: destroy the device instead.
    seq = h.send(w.host, wire.DeviceDestroy(device=w.dev))
    assert h.notices(p2) == [
        wire.Detach(binding=k, reason=DetachReason.TEARDOWN),
        wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev),
    ]
    assert h.reply(w.host, seq) is None
    h.ack(p2, k)
    assert isinstance(h.reply(w.host, seq), wire.Ok)
    assert oid not in h.objects() and not still_open(fd, ident)


def test_kickfd_keeps_the_eventfd_under_refcount(refc: Harness) -> None:
    h = refc
    w = world(h)
    _, proc = attached(w)
    k = kickfd(h, w.host, w.dev, w.handle, 0)
    h.notices(proc)
    oid = h.obj_id(w.host, w.handle)
    assert isinstance(h.req(w.host, wire.HandleClose(handle=w.handle)), wire.Ok)
    assert inbox_empty(h, proc) and h.objects()[oid]["bindings"] == 1
    seq = h.send(w.host, wire.DeviceKickfd(device=w.dev, queue=0, handle=NO, flags=KICK_DEASSIGN))
    assert h.notices(proc) == [wire.Detach(binding=k, reason=DetachReason.DEASSIGN)]
    h.ack(proc, k)
    assert isinstance(h.reply(w.host, seq), wire.Ok)
    assert h.objects() == {}


def test_kickfd_torn_down_when_the_host_leaves(h: Harness) -> None:
    """Process exit drops the handles first (no HUP for a kickfd, even under hup),
    then destroys the device: TEARDOWN."""
    w = world(h)
    _, proc = attached(w)
    k = kickfd(h, w.host, w.dev, w.handle, 0)
    h.notices(proc)
    fd, ident = h.broker_fd(w.host, w.handle)
    h.disconnect(w.host)
    assert h.notices(proc) == [
        wire.Detach(binding=k, reason=DetachReason.TEARDOWN),
        wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev),
    ]
    assert still_open(fd, ident) and not h.t.is_empty()
    h.ack(proc, k)
    assert h.t.is_empty() and not still_open(fd, ident)


def test_device_process_restart_gets_its_kickfds_again(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    k0 = kickfd(h, w.host, w.dev, w.handle, 0)
    h.notices(proc)
    h.disconnect(proc)  # crash: no Detach, the binding just loses its consumer
    assert h.notices(w.host) == [wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev)]
    assert h.notices(guest) == [wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev)]
    assert h.bindings()[k0]["consumer"] is None and h.bindings()[k0]["state"] == "active"
    assert h.refs(w.host, w.handle) == (1, 1)
    k1 = kickfd(h, w.host, w.dev, h.import_eventfd(w.host), 1)  # while nobody is attached
    p2 = h.devproc(w.host, w.dev)
    got = h.notices(p2)
    assert [bare(n) for n in got] == [
        wire.KickfdAttach(binding=k0, queue=0),
        wire.KickfdAttach(binding=k1, queue=1),
    ]
    assert kid(got[0].fds[0]) == kid(w.efd)
    assert h.bindings()[k0]["consumer"] == p2


def test_kickfd_refcounts_across_assign_and_deassign(h: Harness) -> None:
    w = world(h, proc=False)
    e2 = h.import_eventfd(w.host)
    for q in range(4):
        kickfd(h, w.host, w.dev, w.handle if q % 2 == 0 else e2, q)
    assert h.refs(w.host, w.handle) == (1, 2) and h.refs(w.host, e2) == (1, 2)
    for q in (0, 1):
        assert isinstance(
            h.req(w.host, wire.DeviceKickfd(device=w.dev, queue=q, handle=NO, flags=KICK_DEASSIGN)),
            wire.Ok,
        )
    assert h.refs(w.host, w.handle) == (1, 1) and h.refs(w.host, e2) == (1, 1)
    kinds = sorted((b["kind"], b["device"], b["queue"]) for b in h.snap()["bindings"])
    assert kinds == [("kickfd", w.dev, 2), ("kickfd", w.dev, 3)]
    assert isinstance(h.req(w.host, wire.DeviceDestroy(device=w.dev)), wire.Ok)
    assert h.refs(w.host, w.handle) == (1, 0) and h.refs(w.host, e2) == (1, 0)


# ------------------------------------------------------------------------------ memory


def test_memslot_set_reaches_the_guest_and_device_processes(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    dev2 = h.device(w.host, w.vm)
    proc2 = h.devproc(w.host, dev2)
    h.device(w.host, w.vm)  # a device without a process: nobody to tell
    # Another VM (another VMM) with its own guest and device process hears nothing.
    o = world(h)
    og, op_ = attached(o)
    m, mfd = memory(h, w.host, 8 * PAGE)
    memslot(h, w.host, w.vm, 5, 0x100000, 2 * PAGE, m, offset=PAGE)
    want = wire.MemslotAttach(slot=5, gpa=0x100000, size=2 * PAGE, offset=PAGE)
    for c in (guest, proc, proc2):
        n = one(h, c, wire.MemslotAttach)
        assert bare(n) == want
        assert len(n.fds) == 1 and file_ident(n.fds[0].fileno()) == file_ident(mfd.fileno())
    for c in (og, op_, o.host, w.host):
        assert inbox_empty(h, c), h.inbox[c]
    assert h.refs(w.host, m) == (1, 1)
    memslot(h, w.host, w.vm, 5, 0, 0)  # delete
    for c in (guest, proc, proc2):
        assert h.notices(c) == [wire.MemslotDetach(slot=5)]
    for c in (og, op_, o.host, w.host):
        assert inbox_empty(h, c)
    assert h.refs(w.host, m) == (1, 0)


def test_failed_memslot_set_tells_nobody(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    m, _ = memory(h, w.host)
    memslot(h, w.host, w.vm, 0, 0, 2 * PAGE, m)
    h.notices(guest)
    h.notices(proc)
    for bad in (
        wire.MemslotSet(vm=w.vm, slot=1, gpa=PAGE, size=PAGE, handle=m),  # overlap
        wire.MemslotSet(vm=w.vm, slot=0, gpa=8 * PAGE, size=PAGE, handle=m),  # exists
        wire.MemslotSet(vm=w.vm, slot=2, gpa=0, size=0),  # delete nothing
        wire.MemslotSet(vm=w.vm, slot=3, gpa=8 * PAGE, size=PAGE, handle=BAD),
    ):
        assert isinstance(h.req(w.host, bad), wire.Error)
    assert inbox_empty(h, guest) and inbox_empty(h, proc)


@pytest.mark.parametrize("scope", [Scope.VM, Scope.DEVICE], ids=["guest", "device"])
def test_late_attach_gets_memslots_sorted_by_gpa_before_bindings(h: Harness, scope: Scope) -> None:
    w = world(h, guest=False, proc=False)
    m, mfd = memory(h, w.host, 8 * PAGE)
    memslot(h, w.host, w.vm, 0, 0x300000, PAGE, m)
    memslot(h, w.host, w.vm, 7, 0x100000, PAGE, m, offset=PAGE)
    memslot(h, w.host, w.vm, 3, 0x200000, 2 * PAGE, m, offset=2 * PAGE)
    memslot(h, w.host, w.vm, 9, 0x400000, PAGE, m)
    memslot(h, w.host, w.vm, 9, 0, 0)  # deleted before anyone attached: never sent
    irq = h.irqfd(w.host, w.vm, w.handle, 1)
    io = h.ioeventfd(w.host, w.vm, w.handle, 0x1000)
    sig = h.shmsignal(w.host, w.dev, w.handle, 2)
    k = kickfd(h, w.host, w.dev, w.handle, 0)
    c = h.channel(w.host, scope, w.vm if scope is Scope.VM else w.dev)
    got = h.notices(c)
    slots = [
        wire.MemslotAttach(slot=7, gpa=0x100000, size=PAGE, offset=PAGE),
        wire.MemslotAttach(slot=3, gpa=0x200000, size=2 * PAGE, offset=2 * PAGE),
        wire.MemslotAttach(slot=0, gpa=0x300000, size=PAGE, offset=0),
    ]
    tail: list[wire.Message]
    if scope is Scope.VM:
        tail = [
            wire.IrqfdAttach(binding=irq, gsi=1),
            wire.IoeventfdAttach(binding=io, addr=0x1000, datamatch=0, len=4, flags=0),
        ]
    else:
        tail = [wire.ShmSignalAttach(binding=sig, sigid=2), wire.KickfdAttach(binding=k, queue=0)]
    assert [bare(n) for n in got] == slots + tail
    assert all(file_ident(n.fds[0].fileno()) == file_ident(mfd.fileno()) for n in got[:3])
    assert all(kid(n.fds[0]) == kid(w.efd) for n in got[3:])


def test_memslot_changes_follow_attach_and_detach(h: Harness) -> None:
    w = world(h, guest=False, proc=False)
    m, _ = memory(h, w.host)
    g = h.guest(w.host, w.vm)
    memslot(h, w.host, w.vm, 0, 0, PAGE, m)
    assert [type(n) for n in h.notices(g)] == [wire.MemslotAttach]
    h.disconnect(g)
    h.notices(w.host)
    memslot(h, w.host, w.vm, 1, PAGE, PAGE, m)  # nobody attached: nobody told
    memslot(h, w.host, w.vm, 0, 0, 0)
    g2 = h.guest(w.host, w.vm)
    assert [bare(n) for n in h.notices(g2)] == [
        wire.MemslotAttach(slot=1, gpa=PAGE, size=PAGE, offset=0)
    ]
    p = h.devproc(w.host, w.dev)
    assert [bare(n) for n in h.notices(p)] == [
        wire.MemslotAttach(slot=1, gpa=PAGE, size=PAGE, offset=0)
    ]
    # Re-creating a slot number after its deletion: Detach then Attach.
    memslot(h, w.host, w.vm, 1, 0, 0)
    memslot(h, w.host, w.vm, 1, 2 * PAGE, PAGE, m)
    for c in (g2, p):
        assert [bare(n) for n in h.notices(c)] == [
            wire.MemslotDetach(slot=1),
            wire.MemslotAttach(slot=1, gpa=2 * PAGE, size=PAGE, offset=0),
        ]


def test_vm_destroy_tells_the_guest_to_unmap(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    m, _ = memory(h, w.host)
    memslot(h, w.host, w.vm, 0, 0, PAGE, m)
    h.notices(guest)
    h.notices(proc)
    assert isinstance(h.req(w.host, wire.VmDestroy(vm=w.vm)), wire.Ok)
    assert h.notices(guest) == [
        wire.MemslotDetach(slot=0),
        wire.PeerGone(kind=PeerKind.VM, id=w.vm),
    ]
    # The device is destroyed first, so its process only hears PeerGone (no
    # MemslotDetach): it must unmap everything on PeerGone(DEVICE).
    assert h.notices(proc) == [wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev)]
    assert h.refs(w.host, m) == (1, 0)


# ------------------------------------------------------------------------------ PeerAttached


def test_peer_attached_goes_to_the_owner_only(h: Harness) -> None:
    w = world(h, guest=False, proc=False)
    other = h.host()
    g = h.guest(w.host, w.vm, attach=False)
    p = h.devproc(w.host, w.dev, attach=False)
    assert inbox_empty(h, w.host)
    assert isinstance(h.req(g, wire.Attach()), wire.Ok)
    assert h.notices(w.host) == [wire.PeerAttached(kind=PeerKind.GUEST, id=w.vm)]
    assert isinstance(h.req(p, wire.Attach()), wire.Ok)
    assert h.notices(w.host) == [wire.PeerAttached(kind=PeerKind.DEVICE, id=w.dev)]
    assert inbox_empty(h, other) and inbox_empty(h, g) and inbox_empty(h, p)
    # A second process for the same VM / device is refused and announces nothing.
    g2 = h.guest(w.host, w.vm, attach=False)
    p2 = h.devproc(w.host, w.dev, attach=False)
    assert err(h.req(g2, wire.Attach())) == "EBUSY"
    assert err(h.req(p2, wire.Attach())) == "EBUSY"
    assert err(h.req(g, wire.Attach())) == "EBUSY"  # attaching twice
    assert err(h.req(w.host, wire.Attach())) == "EINVAL"  # a host connection
    assert inbox_empty(h, w.host)
    # Once the first leaves, the spare one can take over: announced again.
    h.disconnect(g)
    assert h.notices(w.host) == [wire.PeerGone(kind=PeerKind.GUEST, id=w.vm)]
    assert isinstance(h.req(g2, wire.Attach()), wire.Ok)
    assert h.notices(w.host) == [wire.PeerAttached(kind=PeerKind.GUEST, id=w.vm)]


def test_peer_attached_follows_the_memory_and_bindings(h: Harness) -> None:
    w = world(h, guest=False, proc=False)
    m, _ = memory(h, w.host)
    memslot(h, w.host, w.vm, 0, 0, PAGE, m)
    kickfd(h, w.host, w.dev, w.handle, 0)
    mark = len(h.log)
    p = h.devproc(w.host, w.dev, attach=False)
    seq = h.send(p, wire.Attach())
    sends = [(c, type(msg)) for c, msg in h.sends_since(mark)]
    assert sends[-4:] == [
        (p, wire.MemslotAttach),
        (p, wire.KickfdAttach),
        (w.host, wire.PeerAttached),
        (p, wire.Ok),
    ]
    assert isinstance(h.reply(p, seq), wire.Ok)


# ------------------------------------------------------------------------------ I/O exits


@pytest.mark.parametrize(
    "pio,write,length,addr,value",
    [
        (0, 0, 4, 0xFEB00000, 0),  # MMIO read
        (0, 1, 8, 0xFEB00008, 0x1122334455667788),  # MMIO write
        (1, 1, 1, 0x3F8, 0x41),  # PIO write
        (1, 0, 2, 0xCFC, 0),  # PIO read
        (0, 0, 8, TOP - 8, 0),  # the very last 8 bytes of the address space
    ],
)
def test_io_exit_round_trip(
    h: Harness, pio: int, write: int, length: int, addr: int, value: int
) -> None:
    w = world(h)
    guest, proc = attached(w)
    seq, n = io_exit(h, guest, w.host, pio=pio, write=write, len=length, addr=addr, value=value)
    assert n == wire.IoExitNotice(
        token=n.token, vm=w.vm, pio=pio, write=write, len=length, addr=addr, value=value
    )
    assert inbox_empty(h, proc) and inbox_empty(h, guest)
    assert h.t.next_deadline() == h.now + h.t.relay_timeout
    answer = 0 if write else 0xABCD
    assert accepted(h, w.host, wire.IoExitDone(token=n.token, value=answer))
    assert h.reply(guest, seq) == wire.IoExitReply(seq=seq, value=answer)
    assert inbox_empty(h, guest) and inbox_empty(h, w.host)
    assert h.t.next_deadline() is None


def test_io_exit_refused_by_the_vmm(h: Harness) -> None:
    w = world(h)
    guest, _ = attached(w)
    seq, n = io_exit(h, guest, w.host)
    assert accepted(h, w.host, wire.IoExitDone(token=n.token, errno=errno.EIO))
    r = h.reply(guest, seq)
    assert isinstance(r, wire.Error) and r.errno == errno.EIO


def test_io_exit_token_only_answerable_by_the_vmm_once(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    other = h.host()
    seq, n = io_exit(h, guest, w.host)
    # A guessed token, the right token from another VMM, the wrong message kind.
    assert refused(h, w.host, wire.IoExitDone(token=n.token + 1000), "ENOENT")
    assert refused(h, other, wire.IoExitDone(token=n.token, value=1), "ENOENT")
    assert refused(h, w.host, wire.DeviceConfigDone(token=n.token), "ENOENT")
    # Scoped channels may not answer at all.
    assert refused(h, guest, wire.IoExitDone(token=n.token, value=2), "EPERM")
    assert refused(h, proc, wire.IoExitDone(token=n.token, value=3), "EPERM")
    assert h.reply(guest, seq) is None  # still waiting
    assert accepted(h, w.host, wire.IoExitDone(token=n.token, value=7))
    assert h.reply(guest, seq) == wire.IoExitReply(seq=seq, value=7)
    assert refused(h, w.host, wire.IoExitDone(token=n.token, value=8), "ENOENT")  # twice
    assert inbox_empty(h, guest)


def test_io_exits_are_paired_by_token(h: Harness) -> None:
    """Several VMs' vCPUs exiting at once, answered in another order."""
    worlds = [world(h) for _ in range(3)]
    pending = [
        (w, *io_exit(h, attached(w)[0], w.host, addr=0x1000 + 8 * i)) for i, w in enumerate(worlds)
    ]
    assert len({n.token for _, _, n in pending}) == 3
    for i in (2, 0, 1):
        w, seq, n = pending[i]
        assert accepted(h, w.host, wire.IoExitDone(token=n.token, value=i))
        assert h.reply(attached(w)[0], seq) == wire.IoExitReply(seq=seq, value=i)


def test_second_io_exit_in_flight_is_ebusy(h: Harness) -> None:
    """A vCPU is blocked until its exit is answered: a second exit on the same VM channel
    is refused with EBUSY and changes nothing -- no notice reaches the VMM, no token, no
    deadline -- and the first one completes as if the second had never been sent."""
    w = world(h)
    guest, proc = attached(w)
    seq, n = io_exit(h, guest, w.host, addr=0x1000)
    deadline = h.t.next_deadline()
    pending = dict(h.t.relay.pending)
    mark = len(h.log)
    for write in (0, 1, 0):
        r = h.req(guest, wire.IoExit(write=write, len=4, addr=0x2000, value=9))
        assert err(r) == "EBUSY", r
    assert [c for c, _ in h.sends_since(mark)] == [guest] * 3  # only the three refusals
    assert inbox_empty(h, w.host) and inbox_empty(h, proc) and inbox_empty(h, guest)
    assert h.t.relay.pending == pending and h.t.next_deadline() == deadline
    assert accepted(h, w.host, wire.IoExitDone(token=n.token, value=7))
    assert h.reply(guest, seq) == wire.IoExitReply(seq=seq, value=7)
    assert inbox_empty(h, guest)
    # Answered: the vCPU runs again and may exit again.
    seq2, n2 = io_exit(h, guest, w.host, addr=0x2000)
    assert n2.addr == 0x2000 and n2.token != n.token
    assert accepted(h, w.host, wire.IoExitDone(token=n2.token, value=8))
    assert h.reply(guest, seq2) == wire.IoExitReply(seq=seq2, value=8)
    assert h.t.next_deadline() is None


def test_io_exit_in_flight_is_per_vm_channel(h: Harness) -> None:
    """One guest's exit in flight does not make another VM's guest busy."""
    a, b = world(h), world(h)
    ga, gb = attached(a)[0], attached(b)[0]
    seq_a, na = io_exit(h, ga, a.host)
    seq_b, nb = io_exit(h, gb, b.host)
    assert err(h.req(ga, wire.IoExit(len=4, addr=0x1000))) == "EBUSY"
    assert err(h.req(gb, wire.IoExit(len=4, addr=0x1000))) == "EBUSY"
    assert inbox_empty(h, a.host) and inbox_empty(h, b.host)
    assert accepted(h, b.host, wire.IoExitDone(token=nb.token, value=2))
    assert h.reply(gb, seq_b) == wire.IoExitReply(seq=seq_b, value=2)
    assert err(h.req(ga, wire.IoExit(len=4, addr=0x1000))) == "EBUSY"  # a still waits
    io_exit(h, gb, b.host)  # b may exit again
    assert accepted(h, a.host, wire.IoExitDone(token=na.token, value=1))
    assert h.reply(ga, seq_a) == wire.IoExitReply(seq=seq_a, value=1)


@pytest.mark.parametrize("how", ["answered", "refused", "timed-out"])
def test_io_exit_in_flight_ends_with_its_answer(h: Harness, how: str) -> None:
    """However the exit in flight ends -- the VMM's value, the VMM's errno, the relay
    deadline -- the guest's vCPU is free to exit again."""
    w = world(h)
    guest, _ = attached(w)
    seq, n = io_exit(h, guest, w.host)
    if how == "answered":
        assert accepted(h, w.host, wire.IoExitDone(token=n.token, value=3))
        assert h.reply(guest, seq) == wire.IoExitReply(seq=seq, value=3)
    elif how == "refused":
        assert accepted(h, w.host, wire.IoExitDone(token=n.token, errno=errno.EIO))
        assert err(h.reply(guest, seq)) == "EIO"
    else:
        h.now += h.t.relay_timeout
        h.expire()
        assert err(h.reply(guest, seq)) == "ETIMEDOUT"
    assert h.t.relay.in_flight(guest, "ioexit") is None
    seq2, n2 = io_exit(h, guest, w.host)
    assert accepted(h, w.host, wire.IoExitDone(token=n2.token, value=4))
    assert h.reply(guest, seq2) == wire.IoExitReply(seq=seq2, value=4)
    if how == "timed-out":  # the late answer to the first one is stale
        assert refused(h, w.host, wire.IoExitDone(token=n.token), "ENOENT")
    assert h.t.relay.pending == {}


def test_io_exit_in_flight_does_not_outlive_the_guest(h: Harness) -> None:
    """The guest dies with an exit in flight: a restarted guest on a new channel exits at
    once (the old exit stays until answered, and its answer goes nowhere)."""
    w = world(h)
    guest, _ = attached(w)
    _, old = io_exit(h, guest, w.host)
    h.disconnect(guest)
    assert h.notices(w.host) == [wire.PeerGone(kind=PeerKind.GUEST, id=w.vm)]
    assert h.t.relay.in_flight(guest, "ioexit") is None
    g2 = h.guest(w.host, w.vm)
    h.notices(w.host)
    seq, new = io_exit(h, g2, w.host)
    assert accepted(h, w.host, wire.IoExitDone(token=old.token, value=1))
    assert inbox_empty(h, g2)  # not the new guest's answer
    assert accepted(h, w.host, wire.IoExitDone(token=new.token, value=2))
    assert h.reply(g2, seq) == wire.IoExitReply(seq=seq, value=2)
    assert h.t.relay.pending == {} and h.t.relay.in_flight(g2, "ioexit") is None


def test_io_exit_in_flight_ends_when_the_vmm_leaves(h: Harness) -> None:
    w = world(h)
    guest, _ = attached(w)
    seq, _ = io_exit(h, guest, w.host)
    h.disconnect(w.host)
    assert err(h.reply(guest, seq)) == "EPIPE"
    assert h.t.relay.in_flight(guest, "ioexit") is None and h.t.relay.pending == {}


@pytest.mark.parametrize(
    "who", ["host", "owner", "device-process", "unattached-guest", "second-channel"]
)
def test_io_exit_only_from_an_attached_guest(h: Harness, who: str) -> None:
    w = world(h, guest=who != "unattached-guest")
    c = {"host": h.host(), "owner": w.host, "device-process": w.proc}.get(who)
    if c is None:
        c = h.guest(w.host, w.vm, attach=False)
    assert err(h.req(c, wire.IoExit(len=4, addr=0x1000))) == "EPERM"
    assert inbox_empty(h, w.host) and h.t.relay.pending == {}


@pytest.mark.parametrize(
    "length,addr",
    [(0, 0x1000), (3, 0x1000), (16, 0x1000), (0xFFFFFFFF, 0x1000), (2, TOP - 1), (8, TOP - 4)],
)
def test_io_exit_bad_access(h: Harness, length: int, addr: int) -> None:
    w = world(h)
    guest, _ = attached(w)
    assert err(h.req(guest, wire.IoExit(len=length, addr=addr))) == "EINVAL"
    assert inbox_empty(h, w.host) and h.t.next_deadline() is None


def test_io_exit_fails_with_epipe_when_the_vmm_leaves(h: Harness) -> None:
    w = world(h)
    guest, _ = attached(w)
    seq, _ = io_exit(h, guest, w.host)
    h.disconnect(w.host)
    r = h.reply(guest, seq)
    assert isinstance(r, wire.Error) and r.errno == errno.EPIPE
    assert h.notices(guest) == [wire.PeerGone(kind=PeerKind.VM, id=w.vm)]
    assert h.t.next_deadline() is None


def test_io_exit_requester_gone_then_answered(h: Harness) -> None:
    """The guest dies mid-exit: the VMM's answer is accepted (Ok) and goes nowhere."""
    w = world(h)
    guest, _ = attached(w)
    _, n = io_exit(h, guest, w.host)
    h.disconnect(guest)
    assert h.notices(w.host) == [wire.PeerGone(kind=PeerKind.GUEST, id=w.vm)]
    mark = len(h.log)
    assert accepted(h, w.host, wire.IoExitDone(token=n.token, value=1))
    assert {c for c, _ in h.sends_since(mark)} <= {w.host}  # at most its Ok
    assert h.t.next_deadline() is None


def test_io_exit_requester_gone_then_expired(h: Harness) -> None:
    w = world(h)
    guest, _ = attached(w)
    _, n = io_exit(h, guest, w.host)
    h.disconnect(guest)
    g2 = h.guest(w.host, w.vm)  # a new guest must not get the old answer
    h.now += h.t.relay_timeout
    mark = len(h.log)
    h.expire()
    assert h.sends_since(mark) == []
    assert refused(h, w.host, wire.IoExitDone(token=n.token), "ENOENT")
    assert inbox_empty(h, g2)


def test_io_exit_times_out(h: Harness) -> None:
    w = world(h)
    guest, _ = attached(w)
    seq, n = io_exit(h, guest, w.host)
    deadline = h.now + h.t.relay_timeout
    assert h.t.next_deadline() == deadline
    h.now = deadline - 0.001
    assert h.expire() == []
    assert h.reply(guest, seq) is None
    h.now = deadline
    h.expire()
    r = h.reply(guest, seq)
    assert isinstance(r, wire.Error) and r.errno == errno.ETIMEDOUT
    assert guest not in h.dropped and w.host not in h.dropped  # nobody is disconnected
    assert refused(h, w.host, wire.IoExitDone(token=n.token, value=1), "ENOENT")
    assert inbox_empty(h, guest)
    assert h.t.next_deadline() is None


def test_next_deadline_is_the_earliest_of_detaches_and_relays(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    kickfd(h, w.host, w.dev, w.handle, 0)
    h.notices(proc)
    start = h.now
    io_exit(h, guest, w.host)
    h.now += 1
    seq = h.send(w.host, wire.DeviceKickfd(device=w.dev, queue=0, handle=NO, flags=KICK_DEASSIGN))
    assert h.t.next_deadline() == min(start + h.t.relay_timeout, h.now + h.t.ack_timeout)
    h.ack_all(proc)
    assert isinstance(h.reply(w.host, seq), wire.Ok)
    assert h.t.next_deadline() == start + h.t.relay_timeout


def test_io_exit_survives_vm_destroy_until_answered(h: Harness) -> None:
    """Implemented behaviour: destroying the VM does not fail the guest's pending exit;
    the guest hears PeerGone(VM) and the VMM may still answer it."""
    w = world(h)
    guest, _ = attached(w)
    seq, n = io_exit(h, guest, w.host)
    assert isinstance(h.req(w.host, wire.VmDestroy(vm=w.vm)), wire.Ok)
    assert h.notices(guest)[-1] == wire.PeerGone(kind=PeerKind.VM, id=w.vm)
    assert h.reply(guest, seq) is None
    assert err(h.req(guest, wire.IoExit(len=4, addr=0))) == "EPERM"  # no VM any more
    assert accepted(h, w.host, wire.IoExitDone(token=n.token, value=5))
    assert h.reply(guest, seq) == wire.IoExitReply(seq=seq, value=5)


# ------------------------------------------------------------------------------ device config


def test_device_config_round_trip(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    text = '{"queue": 0, "desc": 4096, "avail": 8192, "used": 12288, "size": 256}'
    seq, n = config(h, w.host, w.dev, proc, text)
    assert n == wire.DeviceConfigNotice(token=n.token, text=text)
    assert inbox_empty(h, guest)
    assert h.t.next_deadline() == h.now + h.t.relay_timeout
    assert accepted(h, proc, wire.DeviceConfigDone(token=n.token))
    assert h.reply(w.host, seq) == wire.Ok(seq=seq)
    assert inbox_empty(h, w.host) and inbox_empty(h, proc)
    assert h.t.next_deadline() is None


@pytest.mark.parametrize(
    "text,want", [("queue 9 does not exist", "queue 9 does not exist"), ("", "the device refused")]
)
def test_device_config_refused(h: Harness, text: str, want: str) -> None:
    w = world(h)
    _, proc = attached(w)
    seq, n = config(h, w.host, w.dev, proc)
    assert accepted(h, proc, wire.DeviceConfigDone(token=n.token, errno=errno.EINVAL, text=text))
    assert h.reply(w.host, seq) == wire.Error(seq=seq, errno=errno.EINVAL, text=want)


def test_device_config_needs_an_attached_process(h: Harness) -> None:
    w = world(h, proc=False)
    assert err(h.req(w.host, wire.DeviceConfig(device=w.dev, text="{}"))) == "ENOTCONN"
    p = h.devproc(w.host, w.dev, attach=False)  # a channel is not enough
    assert err(h.req(w.host, wire.DeviceConfig(device=w.dev, text="{}"))) == "ENOTCONN"
    assert inbox_empty(h, p) and h.t.next_deadline() is None


def test_device_config_owner_only(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    other = h.host()
    assert err(h.req(other, wire.DeviceConfig(device=w.dev, text="{}"))) == "EPERM"
    assert err(h.req(w.host, wire.DeviceConfig(device=9999, text="{}"))) == "ENOENT"
    assert err(h.req(guest, wire.DeviceConfig(device=w.dev, text="{}"))) == "EPERM"
    assert err(h.req(proc, wire.DeviceConfig(device=w.dev, text="{}"))) == "EPERM"
    assert inbox_empty(h, proc) and h.t.next_deadline() is None


def test_device_config_token_only_answerable_by_its_process(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    dev2 = h.device(w.host, w.vm)
    proc2 = h.devproc(w.host, dev2)
    h.notices(guest)
    seq, n = config(h, w.host, w.dev, proc)
    assert inbox_empty(h, proc2)
    done = wire.DeviceConfigDone(token=n.token)
    assert refused(h, guest, done, "ENOENT")  # a VM channel: refused
    assert refused(h, proc2, done, "ENOENT")  # another device's process
    assert refused(h, w.host, done, "ENOENT")  # the VMM itself
    assert refused(h, proc, wire.DeviceConfigDone(token=n.token + 99), "ENOENT")
    assert refused(h, proc, wire.IoExitDone(token=n.token), "EPERM")
    assert h.reply(w.host, seq) is None
    assert accepted(h, proc, done)
    assert h.reply(w.host, seq) == wire.Ok(seq=seq)
    assert refused(h, proc, done, "ENOENT")  # answered already


def test_device_config_fails_with_epipe_when_the_process_crashes(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    seq, _ = config(h, w.host, w.dev, proc)
    seq2, _ = config(h, w.host, w.dev, proc, '{"second": true}')
    h.disconnect(proc)
    for s in (seq, seq2):
        r = h.reply(w.host, s)
        assert isinstance(r, wire.Error) and r.errno == errno.EPIPE
    assert h.notices(w.host) == [wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev)]
    assert h.notices(guest) == [wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev)]
    assert h.t.next_deadline() is None
    assert err(h.req(w.host, wire.DeviceConfig(device=w.dev, text="{}"))) == "ENOTCONN"


def test_device_config_times_out(h: Harness) -> None:
    w = world(h)
    _, proc = attached(w)
    seq, n = config(h, w.host, w.dev, proc)
    h.now += h.t.relay_timeout
    h.expire()
    r = h.reply(w.host, seq)
    assert isinstance(r, wire.Error) and r.errno == errno.ETIMEDOUT
    assert proc not in h.dropped
    assert refused(h, proc, wire.DeviceConfigDone(token=n.token), "ENOENT")
    assert inbox_empty(h, w.host) and h.t.next_deadline() is None


def test_device_config_answered_after_the_vmm_left(h: Harness) -> None:
    w = world(h)
    _, proc = attached(w)
    _, n = config(h, w.host, w.dev, proc)
    h.disconnect(w.host)
    assert h.notices(proc) == [wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev)]
    mark = len(h.log)
    assert accepted(h, proc, wire.DeviceConfigDone(token=n.token))
    assert {c for c, _ in h.sends_since(mark)} <= {proc}  # nothing for the gone VMM
    assert h.t.next_deadline() is None


# ------------------------------------------------------------------------------ device reports


def test_device_report_reaches_the_owner(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    other = h.host()
    assert isinstance(h.req(proc, wire.DeviceReport(text='{"queue": 0, "broken": true}')), wire.Ok)
    assert h.notices(w.host) == [
        wire.DeviceReportNotice(device=w.dev, text='{"queue": 0, "broken": true}')
    ]
    assert inbox_empty(h, guest) and inbox_empty(h, other)


@pytest.mark.parametrize(
    "who", ["unattached-device-channel", "guest", "owner", "other-host", "destroyed-device"]
)
def test_device_report_only_from_an_attached_device_process(h: Harness, who: str) -> None:
    w = world(h)
    guest, proc = attached(w)
    c: int
    if who == "unattached-device-channel":
        c = h.devproc(w.host, w.dev, attach=False)
    elif who == "guest":
        c = guest
    elif who == "owner":
        c = w.host
    elif who == "other-host":
        c = h.host()
    else:
        assert isinstance(h.req(w.host, wire.DeviceDestroy(device=w.dev)), wire.Ok)
        assert h.notices(proc) == [wire.PeerGone(kind=PeerKind.DEVICE, id=w.dev)]
        c = proc
    assert err(h.req(c, wire.DeviceReport(text="{}"))) == "EPERM"
    assert h.notices(w.host, wire.DeviceReportNotice) == []


# ------------------------------------------------------------------------------ scope


@pytest.mark.parametrize(
    "make_req",
    [
        lambda w: wire.DeviceKickfd(device=w.dev, queue=0, handle=0),
        lambda w: wire.DeviceConfig(device=w.dev, text="{}"),
        lambda w: wire.IoExitDone(token=1),
    ],
    ids=["kickfd", "config", "ioexit-done"],
)
@pytest.mark.parametrize("scope", [Scope.VM, Scope.DEVICE], ids=["vm", "device"])
def test_scoped_channels_may_not_drive_the_data_plane(
    h: Harness, scope: Scope, make_req: Callable[[World], wire.Message]
) -> None:
    w = world(h, guest=False, proc=False)
    c = h.channel(w.host, scope, w.vm if scope is Scope.VM else w.dev)
    h.import_eventfd(c)  # handle 0 exists on the channel: only the scope can refuse
    before = h.snap()
    assert refused(h, c, make_req(w), "EPERM")
    assert h.snap() == before and inbox_empty(h, w.host)


def test_scope_refusals_between_vm_and_device_channels(h: Harness) -> None:
    w = world(h)
    guest, proc = attached(w)
    seq, n = config(h, w.host, w.dev, proc)
    assert refused(h, guest, wire.DeviceConfigDone(token=n.token), "ENOENT")
    assert err(h.req(guest, wire.DeviceReport(text="{}"))) == "EPERM"
    assert err(h.req(proc, wire.IoExit(len=4, addr=0x1000))) == "EPERM"
    assert h.notices(w.host) == []
    assert h.reply(w.host, seq) is None  # the guest's answer did not count
    assert accepted(h, proc, wire.DeviceConfigDone(token=n.token))
    assert h.reply(w.host, seq) == wire.Ok(seq=seq)


def test_scoped_channel_of_another_vm_cannot_exit_into_this_one(h: Harness) -> None:
    a, b = world(h), world(h)
    ga, _ = attached(a)
    seq, n = io_exit(h, ga, a.host)
    assert n.vm == a.vm and inbox_empty(h, b.host)
    assert refused(h, b.host, wire.IoExitDone(token=n.token), "ENOENT")
    assert accepted(h, a.host, wire.IoExitDone(token=n.token))
    assert isinstance(h.reply(ga, seq), wire.IoExitReply)


# ------------------------------------------------------------------------------ teardown


def test_everything_pending_then_everyone_leaves(h: Harness) -> None:
    """Kick fds, memory, an I/O exit and a configuration in flight, a detach pending:
    all connections leave in an awkward order and the table ends empty (the fixture
    checks is_empty, next_deadline and fds)."""
    w = world(h)
    guest, proc = attached(w)
    m, _ = memory(h, w.host)
    memslot(h, w.host, w.vm, 0, 0, 2 * PAGE, m)
    h.ioeventfd(w.host, w.vm, w.handle, 0x1000)
    kickfd(h, w.host, w.dev, w.handle, 0)
    kickfd(h, w.host, w.dev, w.handle, 1)
    h.notices(guest)
    h.notices(proc)
    io_exit(h, guest, w.host)
    config(h, w.host, w.dev, proc)
    h.send(w.host, wire.DeviceKickfd(device=w.dev, queue=1, handle=NO, flags=KICK_DEASSIGN))
    h.disconnect(guest)
    h.disconnect(w.host)
    assert not h.t.is_empty()  # the device process still holds detaches
    h.disconnect(proc)
    assert h.t.is_empty() and h.t.next_deadline() is None and h.t.relay.pending == {}


def test_table_with_explicit_relay_timeout() -> None:
    """The relay timeout is a constructor parameter (the Harness uses the default)."""
    now = [0.0]
    t = ObjectTable(Policy.HUP, relay_timeout=0.5, clock=lambda: now[0])
    t.connect(1, pid=1, uid=1)
    acts = t.handle(1, wire.VmCreate(seq=1, ngsi=4))
    assert acts == [Send(1, wire.IdReply(seq=1, id=1))]
    t.channel_opened(1, 2, 2, pid=2, uid=1, scope=Scope.VM, target=1)
    assert [type(a.msg) for a in t.handle(2, wire.Attach(seq=1)) if isinstance(a, Send)] == [
        wire.PeerAttached,
        wire.Ok,
    ]
    acts = t.handle(2, wire.IoExit(seq=2, len=1, addr=0x60))
    assert [a.conn for a in acts if isinstance(a, Send)] == [1]
    assert t.next_deadline() == 0.5
    now[0] = 0.5
    (a,) = t.expire()
    assert isinstance(a, Send) and a.conn == 2 and isinstance(a.msg, wire.Error)
    assert a.msg.seq == 2 and a.msg.errno == errno.ETIMEDOUT
    t.disconnect(1)
    t.disconnect(2)
    assert t.is_empty() and t.next_deadline() is None


def test_a_reused_connection_id_gets_no_stale_answer() -> None:
    """The table API allows a new connection to reuse a gone one's id (the server never
    does): an answer relayed for the old connection must not reach the new one."""
    t = ObjectTable(Policy.HUP, clock=lambda: 0.0)
    t.connect(1, pid=1, uid=1)
    t.handle(1, wire.VmCreate(seq=1, ngsi=4))
    t.channel_opened(1, 2, 2, pid=2, uid=1, scope=Scope.VM, target=1)
    t.handle(2, wire.Attach(seq=1))
    (a,) = t.handle(2, wire.IoExit(seq=2, len=1, addr=0x60))
    assert isinstance(a, Send) and isinstance(a.msg, wire.IoExitNotice)
    token = a.msg.token
    t.disconnect(2)
    t.connect(2, pid=3, uid=1)  # an unrelated host connection, same id
    acts = t.handle(1, wire.IoExitDone(seq=5, token=token, value=1))
    assert all(isinstance(a, Send) and a.conn == 1 for a in acts), acts  # at most its Ok
    t.disconnect(1)
    t.disconnect(2)
    assert t.is_empty() and t.next_deadline() is None


def test_relay_table_opens_one_io_exit_per_requester_and_any_number_of_configs() -> None:
    relay = RelayTable()
    first = relay.open("ioexit", 1, 10, 9, 5.0)
    with pytest.raises(ValueError):
        relay.open("ioexit", 1, 11, 9, 5.0)
    assert relay.in_flight(1, "ioexit") is first and relay.in_flight(2, "ioexit") is None
    other = relay.open("ioexit", 2, 10, 9, 5.0)  # another requester
    configs = [relay.open("config", 1, 12 + i, 8, 5.0) for i in range(3)]
    assert relay.in_flight(1, "config") is None  # not a one-in-flight kind
    assert relay.answer(first.token, 9, "ioexit") is first
    assert relay.in_flight(1, "ioexit") is None
    again = relay.open("ioexit", 1, 13, 9, 5.0)
    relay.requester_gone(1)
    assert relay.in_flight(1, "ioexit") is None and again.token in relay.pending
    assert relay.expired(5.0) == [other, *configs, again]
    assert relay.pending == {} and relay.in_flight(2, "ioexit") is None
