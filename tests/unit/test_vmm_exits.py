"""Unit tests for how the VMM serves I/O exits: fairly across VMs, in bounded turns.

No processes: the VMM runs on a stand-in channel that delivers notices when told to and
records every exit the VMM answers (``IoExitDone``), so each test can say exactly what
arrived when and check the order of service.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import pytest

from hostemu.vmm import Vmm
from shared import wire
from shared.errors import PeerGoneError
from shared.wire import Policy, Scope


class FakeChannel:
    """What :class:`~hostemu.vmm.Vmm` uses of a channel. ``arrive`` makes notices readable
    (the next ``pump`` reads them); ``on_done`` runs while the VMM waits for the broker's
    Ok to an ``IoExitDone`` -- what it puts in :attr:`notices` was read meanwhile, as
    :meth:`shared.channel.Channel.request` does."""

    def __init__(self) -> None:
        self.notices: deque[wire.Message] = deque()
        self.readable: deque[wire.Message] = deque()
        self.answered: list[int] = []
        self.on_done: Callable[[wire.IoExitDone], None] | None = None

    def hello(self) -> wire.HelloReply:
        return wire.HelloReply(
            client=1, policy=Policy.HUP, scope=Scope.HOST, target=0, broker_pid=1
        )

    def arrive(self, *msgs: wire.Message) -> None:
        self.readable.extend(msgs)

    def pump(self) -> None:
        while self.readable:
            self.notices.append(self.readable.popleft())

    def call(self, msg: wire.Message, reply_type: type, timeout: float = 10.0) -> wire.Message:
        assert isinstance(msg, wire.IoExitDone), msg
        self.answered.append(msg.token)
        if self.on_done is not None:
            self.on_done(msg)
        return wire.Ok()


def ex(vm: int, n: int) -> wire.IoExitNotice:
    """Exit ``n`` of VM ``vm`` (token ``100 * vm + n``); PIO, so no bus model is needed."""
    return wire.IoExitNotice(token=100 * vm + n, vm=vm, pio=1, write=0, len=4, addr=0xCF8, value=0)


@pytest.fixture
def ch() -> FakeChannel:
    return FakeChannel()


@pytest.fixture
def vmm(ch: FakeChannel) -> Vmm:
    return Vmm(ch)  # type: ignore[arg-type]


def test_vmm_serves_one_exit_per_vm_per_turn_round_robin(ch: FakeChannel, vmm: Vmm) -> None:
    """Even if one VM had several exits queued (the broker allows one per vCPU), a turn
    serves one exit per VM; the rest wait in order, and waiting VMs go first next turn."""
    report = wire.DeviceReportNotice(device=9, text='{"event": "queue_broken"}')
    ch.arrive(ex(1, 1), ex(1, 2), ex(1, 3), ex(2, 1), report, ex(1, 4), ex(3, 1))
    vmm.process_notices()
    assert ch.answered == [101, 201, 301]
    assert vmm.reports == [{"device": 9, "event": "queue_broken"}]  # not held up by VM 1
    assert vmm.has_work
    ch.arrive(ex(2, 2))
    vmm.process_notices()
    assert ch.answered[3:] == [102, 202]
    vmm.process_notices()
    vmm.process_notices()
    assert ch.answered[5:] == [103, 104]
    assert not vmm.has_work
    vmm.process_notices()
    assert len(ch.answered) == 7


def test_exit_storm_cannot_keep_the_vmm_in_one_turn(ch: FakeChannel, vmm: Vmm) -> None:
    """VM 1 exits again the moment each exit is answered (back to back); the exit arrives
    while the VMM is still completing the last one. Every turn ends anyway, and each turn
    serves the other VMs' exits too."""
    storm = iter(range(2, 10_000))

    def next_exit(done: wire.IoExitDone) -> None:
        if done.token // 100 == 1:
            ch.notices.append(ex(1, next(storm) % 100))

    ch.on_done = next_exit
    ch.arrive(ex(1, 1), ex(2, 1))
    vmm.process_notices()
    assert ch.answered == [101, 201]
    for n in range(2, 6):
        assert vmm.has_work  # the storm's next exit waits for the next turn
        ch.arrive(ex(2, n), ex(3, n))
        mark = len(ch.answered)
        vmm.process_notices()
        assert sorted(ch.answered[mark:]) == [100 + n, 200 + n, 300 + n]


def test_notices_not_handled_go_back_in_order(ch: FakeChannel, vmm: Vmm) -> None:
    """The broker going away while an exit is completed leaves the rest of the turn
    queued, in order, on the channel."""

    def gone(done: wire.IoExitDone) -> None:
        if done.token == 201:
            raise PeerGoneError("the broker closed the connection")

    ch.on_done = gone
    rest = [ex(3, 1), wire.PeerGone(kind=wire.PeerKind.GUEST, id=1)]
    ch.arrive(ex(1, 1), ex(2, 1), *rest)
    with pytest.raises(PeerGoneError):
        vmm.process_notices()
    assert ch.answered == [101, 201]
    assert list(ch.notices) == rest
