"""The guest's interrupt controller: one injection per write, a count pending at attach
injected once and left in the eventfd (KVM's irqfd), the counters' invariant, and
level-triggered lines with KVM's per-gsi resampler, taken at once or held until a take
(what ``vbusemu conform`` checks against the real KVM)."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

import pytest

from guestemu import irq as irq_module
from guestemu.irq import TAKE_ORDER, InterruptController
from shared.fds import OwnedFd, eventfd_info, fdinfo_shows_semaphore, new_eventfd


def count(fd: OwnedFd) -> int:
    info = eventfd_info(fd.fileno())
    assert info is not None
    return info.count


@pytest.fixture
def irq() -> Iterator[InterruptController]:
    c = InterruptController()
    yield c
    c.close()


def attach(
    irq: InterruptController, gsi: int, initval: int = 0, *, semaphore: bool = False
) -> tuple[int, OwnedFd]:
    """A line on ``gsi``; returns its binding and the producer's own copy."""
    producer = new_eventfd(initval, semaphore=semaphore)
    binding = len(irq.lines) + 1
    irq.add(binding, gsi, producer.dup())
    return binding, producer


def attach_level(irq: InterruptController, gsi: int) -> tuple[int, OwnedFd, OwnedFd]:
    """A resampling line on ``gsi``; returns its binding, the trigger and the resamplefd
    (the producer's copies)."""
    trigger, resample = new_eventfd(), new_eventfd()
    binding = len(irq.lines) + 1
    irq.add(binding, gsi, trigger.dup(), resample.dup())
    return binding, trigger, resample


def signal(fd: OwnedFd, n: int = 1) -> None:
    os.eventfd_write(fd.fileno(), n)


def test_each_write_injects_once_and_reads_the_whole_count(irq: InterruptController) -> None:
    b, e = attach(irq, 5)
    with e:
        assert not irq.lines[b].held
        assert not irq.deliver(b)  # nothing written
        os.eventfd_write(e.fileno(), 2)
        os.eventfd_write(e.fileno(), 3)
        assert irq.deliver(b)  # two writes before the guest looked: one interrupt
        assert count(e) == 0
        assert not irq.deliver(b)
        os.eventfd_write(e.fileno(), 1)
        assert irq.deliver(b)
        assert (irq.delivered[5], irq.wakeups[5]) == (6, 2)


def test_count_pending_at_attach_is_one_injection_left_in_the_eventfd(
    irq: InterruptController,
) -> None:
    seen: list[tuple[int, int]] = []
    irq.handlers[4] = lambda gsi, n: seen.append((gsi, n))
    b, e = attach(irq, 4, initval=3)
    with e:
        assert irq.lines[b].held
        assert irq.deliver(b)
        assert not irq.deliver(b)  # once, not again while the count sits there
        assert count(e) == 3
        assert (irq.delivered[4], irq.wakeups[4], seen) == (0, 1, [(4, 0)])
        os.eventfd_write(e.fileno(), 1)  # a new write takes the old count along
        assert irq.deliver(b)
        assert count(e) == 0
        assert (irq.delivered[4], irq.wakeups[4], seen) == (4, 2, [(4, 0), (4, 4)])


def test_pending_at_attach_then_detach_is_read_without_injection(
    irq: InterruptController,
) -> None:
    b, e = attach(irq, 4, initval=3)
    with e:
        assert irq.deliver(b)
        assert irq.remove(b) == 3
        assert count(e) == 0
        assert irq.delivered[4] + irq.drained_at_detach[4] == 3
        assert irq.wakeups[4] == 1


def test_a_write_racing_the_attach_injection_is_read_with_it(irq: InterruptController) -> None:
    b, e = attach(irq, 4, initval=3)
    with e:
        os.eventfd_write(e.fileno(), 1)  # before the held edge was injected
        assert irq.deliver(b)
        assert not irq.deliver(b)
        assert (count(e), irq.delivered[4], irq.wakeups[4]) == (0, 4, 1)


def test_semaphore_mode_takes_one_per_write(irq: InterruptController) -> None:
    b, e = attach(irq, 6, semaphore=True)
    with e:
        os.eventfd_write(e.fileno(), 3)
        assert irq.deliver(b)
        assert not irq.deliver(b)  # readable, but no new write: no second interrupt
        assert count(e) == 2
        os.eventfd_write(e.fileno(), 1)
        assert irq.deliver(b)
        assert (count(e), irq.delivered[6], irq.wakeups[6]) == (2, 2, 2)
        assert irq.remove(b) == 1  # a semaphore read takes 1, at detach too
        assert count(e) == 1


def test_masked_line_keeps_writes_and_held_count_until_unmask(irq: InterruptController) -> None:
    irq.mask(2)
    held, e = attach(irq, 2, initval=5)
    plain, f = attach(irq, 2)
    with e, f:
        os.eventfd_write(f.fileno(), 7)
        assert not irq.deliver(held) and not irq.deliver(plain)
        assert (count(e), count(f), irq.wakeups[2]) == (5, 7, 0)
        irq.unmask(2)
        assert irq.deliver(held)  # injected, not read
        assert irq.deliver(plain)  # the write made while masked, read now
        assert (count(e), count(f)) == (5, 0)
        assert (irq.delivered[2], irq.wakeups[2]) == (7, 2)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@pytest.mark.parametrize(
    ("initval", "semaphore", "direct"),
    [(0, False, True), (0, True, False), (2, False, False)],
    ids=["direct", "semaphore-edge", "pending-edge"],
)
@pytest.mark.parametrize("kernel_tells", [True, False], ids=["fdinfo-mode", "no-fdinfo-mode"])
def test_the_watched_fd_is_readable_once_per_write_in_either_mode(
    monkeypatch: pytest.MonkeyPatch,
    irq: InterruptController,
    initval: int,
    semaphore: bool,
    direct: bool,
    kernel_tells: bool,
) -> None:
    """A line is watched directly (its eventfd) where a delivery's read clears it -- not
    in semaphore mode, no count at attach -- else through its edge epoll; where the
    kernel's fdinfo does not show the mode (before Linux 6.4), always the edge epoll.
    Either way the watched fd is readable after writes and not after their delivery."""
    if not kernel_tells:
        monkeypatch.setattr(irq_module, "fdinfo_shows_semaphore", lambda: False)
    direct = direct and kernel_tells and fdinfo_shows_semaphore()
    b, e = attach(irq, 3, initval, semaphore=semaphore)
    with e:
        line = irq.lines[b]
        assert (line.fileno() == line.consumer.fileno()) == direct
        assert irq.fds_of(3) == [line.fileno()]
        if line.held:
            assert irq.deliver(b)  # the count pending at attach: injected once, left
        assert not readable(line.fileno())
        signal(e, 2)
        signal(e)
        assert readable(line.fileno())
        assert irq.deliver(b)
        assert not readable(line.fileno())
        assert not irq.deliver(b)


def test_the_watched_fd_is_released_on_close() -> None:
    irq = InterruptController()
    b, e = attach(irq, 3)
    with e:
        line = irq.lines[b]
        watched = irq.fds_of(3)
        assert watched == [line.fileno()]
        os.fstat(watched[0])
        irq.close()
        assert not irq.lines and line.consumer.fd.closed
        with pytest.raises(OSError):
            os.fstat(watched[0])


def test_a_level_line_is_asserted_until_its_eoi(irq: InterruptController) -> None:
    b, e, r = attach_level(irq, 5)
    with e, r:
        signal(e)
        assert irq.deliver(b)
        assert irq.level == {5} and count(r) == 0
        signal(e, 2)  # asserted: read, but no new edge
        assert not irq.deliver(b)
        assert (count(e), irq.delivered[5], irq.wakeups[5]) == (0, 3, 1)
        assert irq.eoi(5) == 1
        assert irq.level == set() and count(r) == 1 and irq.eois[5] == 1
        signal(e)
        assert irq.deliver(b) and irq.level == {5}


def test_an_eoi_signals_every_resamplefd_of_the_gsi(irq: InterruptController) -> None:
    """KVM keeps one resampler per gsi: its ack signals every resampling irqfd of the gsi,
    whichever raised the line."""
    b1, e1, r1 = attach_level(irq, 7)
    _, e2, r2 = attach_level(irq, 7)
    with e1, r1, e2, r2:
        signal(e1)
        assert irq.deliver(b1)
        assert irq.eoi(7) == 2
        assert (count(r1), count(r2), irq.eois[7]) == (1, 1, 1)
        assert irq.eoi(3) == 0 and 3 not in irq.eois  # no resampler on gsi 3


def test_the_gsis_last_resampling_line_detaching_lowers_the_level(
    irq: InterruptController,
) -> None:
    b1, e1, r1 = attach_level(irq, 7)
    b2, e2, r2 = attach_level(irq, 7)
    with e1, r1, e2, r2:
        signal(e1)
        assert irq.deliver(b1)
        irq.remove(b1)
        assert irq.level == {7}  # b2 is still on the gsi's resampler
        irq.remove(b2)
        assert irq.level == set() and not irq.resamplers


def test_an_edge_makes_no_new_edge_while_its_gsi_is_held_high(irq: InterruptController) -> None:
    lb, e, r = attach_level(irq, 5)
    eb, f = attach(irq, 5)
    with e, r, f:
        signal(e)
        assert irq.deliver(lb)
        signal(f)
        assert not irq.deliver(eb)
        assert (count(f), irq.delivered[5], irq.wakeups[5]) == (0, 2, 1)


def test_held_interrupts_latch_until_taken_in_kvms_order(irq: InterruptController) -> None:
    assert irq.hold(True) == []
    lines = {gsi: attach(irq, gsi) for gsi in (3, 9, 17, 20, 1, 30)}
    try:
        for gsi in (3, 17, 20, 9, 1, 30, 3):
            b, e = lines[gsi]
            signal(e)
            assert irq.deliver(b)
        assert irq.requested == {1, 3, 9, 17, 20}  # gsi 30 reaches no pin
        assert irq.wakeups[3] == 2  # two injections, one request
        assert irq.take() == [1, 9, 3, 20, 17]
        assert irq.requested == set() and irq.take() == []
    finally:
        for _, e in lines.values():
            e.close()


def test_held_level_line_stays_asserted_until_the_take(irq: InterruptController) -> None:
    irq.hold(True)
    b, e, r = attach_level(irq, 10)
    with e, r:
        signal(e)
        assert irq.deliver(b)
        assert (irq.level, irq.requested, count(r)) == ({10}, {10}, 0)
        assert irq.take() == [10]
        assert (irq.level, count(r)) == (set(), 1)
        signal(e)
        assert irq.deliver(b)
        assert irq.hold(False) == [10]  # enabling interrupts takes what is latched
        assert (irq.level, count(r), irq.holding) == (set(), 2, False)


def test_a_request_outlives_the_detach_of_its_line(irq: InterruptController) -> None:
    """The PIC latches the edge: after the asserted irqfd detaches the request is still
    taken, and its EOI reaches no resampler."""
    irq.hold(True)
    b, e, r = attach_level(irq, 5)
    with e, r:
        signal(e)
        assert irq.deliver(b)
        irq.remove(b)
        assert (irq.level, irq.requested) == (set(), {5})
        assert irq.take() == [5]
        assert count(r) == 0 and not irq.eois


def test_take_order_covers_the_pic_and_ioapic_pins() -> None:
    assert sorted(TAKE_ORDER) == list(range(24))
    assert TAKE_ORDER[:4] == (0, 1, 2, 8) and TAKE_ORDER[-2:] == (17, 16)
