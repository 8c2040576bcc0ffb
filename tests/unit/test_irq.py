"""The guest's interrupt controller: one injection per write, a count pending at attach
injected once and left in the eventfd (KVM's irqfd), and the counters' invariant."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from guestemu.irq import InterruptController
from shared.fds import OwnedFd, eventfd_info, new_eventfd


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


def test_the_watched_fd_is_the_lines_edge_epoll_and_close_releases_it() -> None:
    irq = InterruptController()
    b, e = attach(irq, 3)
    with e:
        line = irq.lines[b]
        watched = irq.fds_of(3)
        assert watched == [line.fileno()] and line.fileno() != line.consumer.fileno()
        os.fstat(watched[0])
        irq.close()
        assert not irq.lines and line.consumer.fd.closed
        with pytest.raises(OSError):
            os.fstat(watched[0])
