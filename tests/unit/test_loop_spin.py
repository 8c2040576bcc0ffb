"""EventLoop busy pollers (:meth:`EventLoop.spin`): they run between non-blocking polls,
end when they say so, and never make the loop blind to its stop eventfd or its fds."""

from __future__ import annotations

import os

from shared.fds import new_eventfd
from shared.loop import EventLoop


def test_a_poller_runs_until_it_returns_false() -> None:
    loop = EventLoop()
    calls: list[int] = []

    def poller() -> bool:
        calls.append(1)
        if len(calls) == 5:
            loop.call_at(0.0, loop.stop)  # due at once: the loop runs it after this slice
            return False
        return True

    try:
        loop.spin("p", poller)
        assert loop.spinning("p")
        loop.run()
        assert len(calls) == 5 and not loop.spinning("p")
    finally:
        loop.close()


def test_the_stop_eventfd_ends_a_spinning_loop() -> None:
    loop = EventLoop()
    spins = 0

    def poller() -> bool:
        nonlocal spins
        spins += 1
        if spins == 3:
            os.eventfd_write(loop.stop_fd.fd, 1)  # what SIGTERM's handler does
        return True  # never done on its own

    try:
        loop.spin("p", poller)
        loop.run()
        assert loop.stopping and spins == 3
    finally:
        loop.close()


def test_fds_are_served_between_slices() -> None:
    loop = EventLoop()
    fd = new_eventfd()
    seen: list[int] = []
    spins = 0

    def on_fd() -> None:
        seen.append(os.eventfd_read(fd.fd))
        loop.stop()

    def poller() -> bool:
        nonlocal spins
        spins += 1
        if spins == 2:
            os.eventfd_write(fd.fd, 7)
        return spins < 1000  # bounded regardless

    try:
        loop.watch(fd.fileno(), on_fd)
        loop.spin("p", poller)
        loop.run()
        assert seen == [7] and spins < 1000
    finally:
        loop.unwatch(fd.fileno())
        fd.close()
        loop.close()


def test_a_poller_may_replace_itself() -> None:
    loop = EventLoop()
    order: list[str] = []

    def second() -> bool:
        order.append("second")
        loop.stop()
        return False

    def first() -> bool:
        order.append("first")
        loop.spin("p", second)  # replaced: the new one must not be dropped with the old
        return False

    try:
        loop.spin("p", first)
        loop.run()
        assert order == ["first", "second"]
    finally:
        loop.close()
