"""EventLoop fd watching: level-triggered callbacks, one watch per fd, unwatching inside a
wakeup, closed fds, the stop eventfd and timers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.fds import new_eventfd
from shared.loop import EventLoop


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    ev = EventLoop()
    yield ev
    ev.close()


def test_a_readable_fd_runs_its_callback_until_read(loop: EventLoop) -> None:
    with new_eventfd() as efd:
        hits: list[int] = []
        loop.watch(efd.fd, lambda: hits.append(1))
        assert loop.poll_once(0) == 0 and not hits
        os.eventfd_write(efd.fd, 1)
        assert loop.poll_once(0) == 1
        assert loop.poll_once(0) == 1  # level-triggered: still readable
        os.eventfd_read(efd.fd)
        assert loop.poll_once(0) == 0
        assert len(hits) == 2
        loop.unwatch(efd.fd)


def test_watching_twice_and_unwatching_an_unknown_fd_raise_key_error(loop: EventLoop) -> None:
    with new_eventfd() as efd:
        loop.watch(efd.fd, lambda: None)
        with pytest.raises(KeyError):
            loop.watch(efd.fd, lambda: None)
        loop.unwatch(efd.fd)
        with pytest.raises(KeyError):
            loop.unwatch(efd.fd)


def test_a_callback_that_unwatches_another_ready_fd_stops_its_callback(loop: EventLoop) -> None:
    with new_eventfd(1) as a, new_eventfd(1) as b:
        ran: list[str] = []

        def on(name: str, other: int) -> None:
            ran.append(name)
            loop.unwatch(other)

        loop.watch(a.fd, lambda: on("a", b.fd))
        loop.watch(b.fd, lambda: on("b", a.fd))
        assert loop.poll_once(0) == 1
        assert len(ran) == 1  # whichever ran first unwatched the other


def test_an_fd_closed_before_unwatch_is_forgotten(loop: EventLoop) -> None:
    efd = new_eventfd(1)
    loop.watch(efd.fd, lambda: None)
    number = efd.fd
    efd.close()
    loop.unwatch(number)  # no error: epoll dropped it with the file
    assert loop.poll_once(0) == 0


def test_the_stop_eventfd_stops_the_loop_before_other_callbacks_matter(loop: EventLoop) -> None:
    os.eventfd_write(loop.stop_fd.fd, 1)
    assert loop.poll_once(None) == 0
    assert loop.stopping


def test_a_due_timer_bounds_the_wait_and_runs(loop: EventLoop) -> None:
    fired: list[int] = []
    loop.call_at(0.0, lambda: fired.append(1))
    assert loop.poll_once(None) == 1  # would block forever without the timer
    assert fired == [1]
    assert loop.poll_once(0) == 0


@pytest.mark.parametrize(
    ("content", "cpus", "expected"),
    [
        (b"0.50 0.40 0.30 3/120 4242\n", 2, True),  # 3 runnable, 2 CPUs: one waits
        (b"0.50 0.40 0.30 2/120 4242\n", 2, False),
        (b"0.50 0.40 0.30 1/120 4242\n", 1, False),
        (b"garbage\n", 2, False),  # unreadable: poll as before
        (b"", 2, False),
    ],
)
def test_oversubscribed_reads_the_runnable_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, cpus: int, expected: bool
) -> None:
    fake = tmp_path / "loadavg"
    fake.write_bytes(content)
    monkeypatch.setattr(EventLoop, "LOADAVG", str(fake))
    ev = EventLoop()
    try:
        ev._cpus = cpus
        assert ev.oversubscribed() is expected
        assert ev.oversubscribed() is expected  # read again through the same fd
    finally:
        ev.close()
    assert ev._loadavg == -1


def test_oversubscribed_without_a_loadavg_is_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(EventLoop, "LOADAVG", str(tmp_path / "missing"))
    ev = EventLoop()
    try:
        assert ev.oversubscribed() is False
    finally:
        ev.close()


def test_oversubscribed_on_this_machine_answers() -> None:
    ev = EventLoop()
    try:
        assert ev.oversubscribed() in (True, False)
        assert ev._loadavg >= 0
    finally:
        ev.close()
