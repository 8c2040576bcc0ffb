"""Unit tests for shared.fds: fd ownership, eventfd ends, fd-type checks, SCM_RIGHTS.

Everything here runs on real kernel objects (eventfds, pipes, memfds, SOCK_SEQPACKET
socketpairs) in this one process; nothing is mocked. An autouse fixture checks that no
test leaves an fd open behind it.
"""

from __future__ import annotations

import array
import errno
import gc
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import fds
from shared.errors import PeerGoneError, ProtocolError, UsageError
from shared.fds import (
    EVENTFD_MAX,
    MAX_FDS_PER_MESSAGE,
    EventConsumer,
    EventFdInfo,
    EventNotifier,
    OwnedFd,
    close_all,
    eventfd_info,
    memory_fd_size,
    new_eventfd,
    recv_with_fds,
    send_with_fds,
)
from tests import timing

# ---------------------------------------------------------------------------- helpers


def open_fds() -> set[int]:
    """The fd numbers open in this process (plus the listing's own, lowest free, one)."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def eventfd_id(fd: int | OwnedFd) -> int:
    info = eventfd_info(fd.fileno() if isinstance(fd, OwnedFd) else fd)
    assert info is not None
    return info.eventfd_id


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = fd_count()
    yield
    if fd_count() != before:
        gc.collect()  # only pay for a full collection when something looks leaked
    assert fd_count() == before, "the test leaked file descriptors"


@pytest.fixture
def seqpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def eventfds() -> Iterator[list[OwnedFd]]:
    """A factory list: tests append OwnedFds to it and they are closed afterwards."""
    owned: list[OwnedFd] = []
    try:
        yield owned
    finally:
        close_all(owned)


def make_eventfds(n: int, into: list[OwnedFd], **kw: object) -> list[OwnedFd]:
    made = [new_eventfd(**kw) for _ in range(n)]  # type: ignore[arg-type]
    into.extend(made)
    return made


# ---------------------------------------------------------------------------- OwnedFd


class TestOwnedFd:
    def test_open_state(self) -> None:
        with OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) as o:
            assert o.fd >= 0
            assert not o.closed
            assert o.fileno() == o.fd
            assert repr(o) == f"OwnedFd({o.fd})"

    def test_close_sets_minus_one_and_really_closes(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        n = o.fd
        o.close()
        assert o.fd == -1
        assert o.closed
        assert not is_open(n)
        assert repr(o) == "OwnedFd(-1)"

    def test_double_close_is_harmless(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        o.close()
        o.close()
        assert o.fd == -1

    def test_double_close_does_not_close_a_reused_number(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        n = o.fd
        o.close()
        other = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))  # very likely gets number n again
        try:
            o.close()
            assert is_open(other.fd)
            if other.fd == n:
                assert eventfd_info(n) is not None
        finally:
            other.close()

    def test_fileno_on_closed_raises_usage_error(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        o.close()
        with pytest.raises(UsageError):
            o.fileno()

    @pytest.mark.parametrize("bad", [-1, -2, -(2**31), "3", 3.0, None])
    def test_constructor_rejects_non_fds(self, bad: object) -> None:
        with pytest.raises(UsageError):
            OwnedFd(bad)  # type: ignore[arg-type]

    def test_take_transfers_raw_number(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        n = o.fd
        raw = o.take()
        try:
            assert raw == n
            assert o.fd == -1 and o.closed
            assert is_open(raw)
            o.close()  # closing the empty owner must not touch the taken fd
            assert is_open(raw)
        finally:
            os.close(raw)

    def test_take_on_closed_raises(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        o.close()
        with pytest.raises(UsageError):
            o.take()
        with pytest.raises(UsageError):
            o.move()

    def test_move_transfers_ownership(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        n = o.fd
        with o.move() as m:
            assert m is not o
            assert m.fd == n
            assert o.fd == -1
            o.close()
            assert is_open(n)
        assert not is_open(n)

    def test_dup_is_new_noninheritable_fd_of_same_object(self) -> None:
        with OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) as o, o.dup() as d:
            assert d.fd != o.fd
            assert d.fd >= 0
            assert not os.get_inheritable(d.fd)
            assert eventfd_id(d) == eventfd_id(o)
            # independent ownership: closing the dup leaves the original open
            d.close()
            assert is_open(o.fd)

    def test_dup_of_inheritable_fd_is_still_noninheritable(self) -> None:
        with OwnedFd(os.eventfd(0, 0)) as o:
            os.set_inheritable(o.fd, True)
            with o.dup() as d:
                assert not os.get_inheritable(d.fd)

    def test_dup_of_closed_raises(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        o.close()
        with pytest.raises(UsageError):
            o.dup()

    def test_context_manager_closes(self) -> None:
        with OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) as o:
            n = o.fd
        assert o.fd == -1
        assert not is_open(n)

    def test_context_manager_closes_on_exception(self) -> None:
        n = -1
        with pytest.raises(RuntimeError), OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) as o:
            n = o.fd
            raise RuntimeError("boom")
        assert o.closed
        assert not is_open(n)

    def test_enter_returns_self(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        with o as entered:
            assert entered is o

    def test_garbage_collected_owner_closes_and_warns(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        n = o.fd
        with pytest.warns(ResourceWarning, match="unclosed OwnedFd"):
            del o
            gc.collect()
        assert not is_open(n)

    def test_garbage_collected_owner_closes_even_if_warnings_are_errors(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The project runs its tests with filterwarnings=error: the ResourceWarning then
        # becomes an exception inside __del__, which must not stop the close.
        unraisable: list[object] = []
        monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_type))
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        n = o.fd
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            del o
            gc.collect()
        assert not is_open(n)
        assert unraisable == [ResourceWarning]

    def test_closed_owner_does_not_warn_when_collected(self) -> None:
        o = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC))
        o.close()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            del o
            gc.collect()

    def test_close_all_closes_every_fd(self) -> None:
        owned = [OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) for _ in range(5)]
        numbers = [o.fd for o in owned]
        owned[2].close()  # already-closed entries are fine
        close_all(owned)
        assert all(o.closed for o in owned)
        assert not any(is_open(n) for n in numbers)


# ---------------------------------------------------------------------------- eventfd


class TestNewEventfd:
    def test_defaults(self) -> None:
        with new_eventfd() as e:
            info = eventfd_info(e.fd)
            assert info is not None
            assert info == EventFdInfo(eventfd_id=info.eventfd_id, count=0, semaphore=False)
            assert not os.get_inheritable(e.fd)
            assert not os.get_blocking(e.fd)

    def test_initval_semaphore_blocking(self) -> None:
        with new_eventfd(7, semaphore=True, nonblock=False) as e:
            info = eventfd_info(e.fd)
            assert info is not None
            assert info.count == 7
            assert info.semaphore
            assert os.get_blocking(e.fd)
            assert not os.get_inheritable(e.fd)


class TestEventEnds:
    @pytest.fixture(autouse=True, params=["nowait-read", "poll-then-read"])
    def read_path(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
        """Every drain test runs on both ways a consumer reads: the one-syscall
        ``RWF_NOWAIT`` read and the poll-then-read fallback for kernels that refuse it."""
        if request.param == "nowait-read":
            if not fds._RWF_NOWAIT:
                pytest.skip("this Python has no os.RWF_NOWAIT")
            monkeypatch.setattr(fds, "_nowait_reads", True)
        else:
            monkeypatch.setattr(fds, "_nowait_reads", False)
        return str(request.param)

    def test_a_kernel_refusing_nowait_reads_falls_back(
        self, read_path: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def refuse(*args: object) -> int:
            raise OSError(errno.EOPNOTSUPP, "not supported")

        monkeypatch.setattr(fds, "_nowait_reads", True)
        monkeypatch.setattr(fds.os, "preadv", refuse)
        efd = new_eventfd()
        n, c = EventNotifier(efd), EventConsumer(efd)
        try:
            assert n.notify(3)
            assert c.drain() == 3  # refused, then polled and read
            assert fds._nowait_reads is False
            assert c.drain() == 0
        finally:
            efd.close()

    @pytest.fixture
    def ends(self) -> Iterator[tuple[EventNotifier, EventConsumer]]:
        efd = new_eventfd()
        n, c = EventNotifier(efd), EventConsumer(efd.dup())
        try:
            yield n, c
        finally:
            n.close()
            c.close()

    def test_notify_then_drain(self, ends: tuple[EventNotifier, EventConsumer]) -> None:
        n, c = ends
        assert n.notify() is True
        assert c.drain() == 1
        assert n.notify(41) is True
        assert n.notify(1) is True
        assert c.drain() == 42
        assert c.drain() == 0

    def test_drain_on_empty_returns_zero_without_blocking(
        self, ends: tuple[EventNotifier, EventConsumer]
    ) -> None:
        _, c = ends
        # A blocking read of an empty eventfd with no writer would never return.
        assert c.drain() == 0
        assert c.drain() == 0

    def test_drain_on_empty_blocking_eventfd_does_not_block(self) -> None:
        efd = new_eventfd(nonblock=False)
        n, c = EventNotifier(efd), EventConsumer(efd)
        try:
            assert c.drain() == 0
            assert os.get_blocking(efd.fd)  # the shared file status flags were not changed
            assert n.notify(4)
            assert c.drain() == 4
            assert c.drain() == 0
        finally:
            efd.close()

    def test_semaphore_drains_one_at_a_time(self) -> None:
        efd = new_eventfd(semaphore=True)
        n, c = EventNotifier(efd), EventConsumer(efd)
        try:
            assert n.notify(3)
            assert [c.drain() for _ in range(4)] == [1, 1, 1, 0]
            assert n.notify()
            assert c.drain() == 1
            assert c.drain() == 0
        finally:
            efd.close()

    def test_notifications_coalesce(self, ends: tuple[EventNotifier, EventConsumer]) -> None:
        n, c = ends
        for _ in range(100_000):
            assert n.notify(1)
        assert eventfd_info(c.fileno()).count == 100_000  # type: ignore[union-attr]
        assert c.drain() == 100_000
        assert c.drain() == 0

    @pytest.mark.parametrize("bad", [0xFFFFFFFFFFFFFFFF, 0, -1, 2**64, 2**70])
    def test_invalid_notify_values_raise_usage_error(
        self, ends: tuple[EventNotifier, EventConsumer], bad: int
    ) -> None:
        n, c = ends
        with pytest.raises(UsageError):
            n.notify(bad)
        assert c.drain() == 0  # nothing reached the counter

    def test_saturation_returns_false_without_blocking(
        self, ends: tuple[EventNotifier, EventConsumer]
    ) -> None:
        n, c = ends
        assert EVENTFD_MAX == 0xFFFFFFFFFFFFFFFE
        assert n.notify(0xFFFFFFFFFFFFFFFE) is True
        assert n.notify(1) is False  # a blocking write would wait for a reader forever
        assert c.drain() == 0xFFFFFFFFFFFFFFFE  # the failed notify added nothing
        assert n.notify(1) is True
        assert c.drain() == 1

    def test_saturation_partial(self, ends: tuple[EventNotifier, EventConsumer]) -> None:
        n, c = ends
        assert n.notify(EVENTFD_MAX - 5)
        assert n.notify(5) is True
        assert n.notify(1) is False
        assert c.drain() == EVENTFD_MAX

    def test_wait_times_out_when_empty(self, ends: tuple[EventNotifier, EventConsumer]) -> None:
        _, c = ends
        t0 = time.monotonic()
        assert c.wait(0.05) is False
        assert time.monotonic() - t0 >= 0.04
        assert c.wait(0) is False

    def test_wait_returns_true_when_pending(
        self, ends: tuple[EventNotifier, EventConsumer]
    ) -> None:
        n, c = ends
        n.notify()
        assert c.wait(0) is True
        assert c.wait(None) is True
        assert c.wait(5.0) is True
        assert c.drain() == 1  # wait does not consume
        assert c.wait(0) is False

    def test_wait_wakes_on_notify_from_another_thread(
        self, ends: tuple[EventNotifier, EventConsumer]
    ) -> None:
        n, c = ends
        timer = threading.Timer(0.05, n.notify)
        timer.start()
        try:
            assert c.wait(timing.scaled(10.0)) is True  # woken by the notify, not timed out
        finally:
            timer.join()
        assert c.drain() == 1

    def test_ends_expose_their_fd(self) -> None:
        efd = new_eventfd()
        n, c = EventNotifier(efd), EventConsumer(efd)
        assert n.fd is efd
        assert c.fd is efd
        assert c.fileno() == efd.fd
        efd.close()

    def test_closed_ends_raise_usage_error(self) -> None:
        efd = new_eventfd()
        n, c = EventNotifier(efd), EventConsumer(efd)
        n.close()
        assert efd.closed
        c.close()  # harmless second close of the shared owner
        with pytest.raises(UsageError):
            n.notify()
        with pytest.raises(UsageError):
            c.drain()
        with pytest.raises(UsageError):
            c.wait(0)
        with pytest.raises(UsageError):
            c.fileno()


# ---------------------------------------------------------------------------- eventfd_info


class TestEventfdInfo:
    def test_reports_count_and_mode(self, eventfds: list[OwnedFd]) -> None:
        (plain,) = make_eventfds(1, eventfds)
        (sem,) = make_eventfds(1, eventfds, initval=9, semaphore=True)
        p, s = eventfd_info(plain.fd), eventfd_info(sem.fd)
        assert p is not None and s is not None
        assert (p.count, p.semaphore) == (0, False)
        assert (s.count, s.semaphore) == (9, True)
        EventNotifier(plain).notify(0x123456789)
        assert eventfd_info(plain.fd).count == 0x123456789  # type: ignore[union-attr]
        EventNotifier(plain).notify(EVENTFD_MAX - 0x123456789)
        assert eventfd_info(plain.fd).count == EVENTFD_MAX  # type: ignore[union-attr]

    def test_id_stable_across_dups_and_distinct_between_eventfds(
        self, eventfds: list[OwnedFd]
    ) -> None:
        a, b = make_eventfds(2, eventfds)
        a2 = a.dup()
        eventfds.append(a2)
        a3 = OwnedFd(os.dup(a.fd))
        eventfds.append(a3)
        ia, ib = eventfd_info(a.fd), eventfd_info(b.fd)
        assert ia is not None and ib is not None
        assert ia.eventfd_id >= 0 and ib.eventfd_id >= 0
        assert ia.eventfd_id != ib.eventfd_id
        assert eventfd_id(a2) == ia.eventfd_id == eventfd_id(a3)
        assert eventfd_id(a) == ia.eventfd_id  # stable when asked again
        # the dup sees the same counter
        EventNotifier(a).notify(3)
        assert eventfd_info(a2.fd) == EventFdInfo(ia.eventfd_id, 3, False)

    def test_many_eventfds_have_distinct_ids(self, eventfds: list[OwnedFd]) -> None:
        many = make_eventfds(50, eventfds)
        assert len({eventfd_id(e) for e in many}) == 50

    def test_none_for_pipe(self) -> None:
        r, w = os.pipe()
        try:
            assert eventfd_info(r) is None
            assert eventfd_info(w) is None
        finally:
            os.close(r)
            os.close(w)

    def test_none_for_socket(self, seqpair: tuple[socket.socket, socket.socket]) -> None:
        assert eventfd_info(seqpair[0].fileno()) is None

    def test_none_for_regular_file(self, tmp_path: Path) -> None:
        path = os.path.join(tmp_path, "eventfd")  # a misleading name changes nothing
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"eventfd-count: 1\n")
            assert eventfd_info(fd) is None
        finally:
            os.close(fd)

    def test_none_for_directory(self, tmp_path: Path) -> None:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert eventfd_info(fd) is None
        finally:
            os.close(fd)

    def test_none_for_memfd(self) -> None:
        fd = os.memfd_create("[eventfd]", os.MFD_CLOEXEC)
        try:
            assert eventfd_info(fd) is None
        finally:
            os.close(fd)

    def test_none_for_closed_or_bogus_fd(self) -> None:
        e = new_eventfd()
        n = e.fd
        e.close()
        assert eventfd_info(n) is None
        assert eventfd_info(999_999) is None
        assert eventfd_info(-1) is None


# ---------------------------------------------------------------------------- memory fds


class TestMemoryFdSize:
    @pytest.mark.parametrize("size", [0, 1, 4096, 12345, 1 << 20])
    def test_memfd_size(self, size: int) -> None:
        fd = os.memfd_create("vbusemu-test", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            assert memory_fd_size(fd) == size
        finally:
            os.close(fd)

    def test_memfd_size_follows_resize(self) -> None:
        fd = os.memfd_create("vbusemu-test", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 8192)
            assert memory_fd_size(fd) == 8192
            os.ftruncate(fd, 100)
            assert memory_fd_size(fd) == 100
        finally:
            os.close(fd)

    @pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
    def test_posix_shm_object_unlinked(self) -> None:
        name = f"/dev/shm/vbusemu-test-{os.getpid()}-{os.urandom(8).hex()}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.unlink(name)
            os.ftruncate(fd, 65536)
            assert memory_fd_size(fd) == 65536
        finally:
            os.close(fd)

    def test_none_for_pipe(self) -> None:
        r, w = os.pipe()
        try:
            assert memory_fd_size(r) is None
            assert memory_fd_size(w) is None
        finally:
            os.close(r)
            os.close(w)

    def test_none_for_eventfd(self) -> None:
        with new_eventfd(5) as e:
            assert memory_fd_size(e.fd) is None

    def test_none_for_socket(self, seqpair: tuple[socket.socket, socket.socket]) -> None:
        assert memory_fd_size(seqpair[0].fileno()) is None

    def test_none_for_regular_file_on_disk(self, tmp_path: Path) -> None:
        path = os.path.join(tmp_path, "memfd:guest-ram")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 4096)
            assert memory_fd_size(fd) is None
        finally:
            os.close(fd)

    def test_none_for_directory(self, tmp_path: Path) -> None:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert memory_fd_size(fd) is None
        finally:
            os.close(fd)

    def test_none_for_closed_fd(self) -> None:
        fd = os.memfd_create("vbusemu-test", os.MFD_CLOEXEC)
        os.close(fd)
        assert memory_fd_size(fd) is None
        assert memory_fd_size(999_999) is None


# ---------------------------------------------------------------------------- SCM_RIGHTS


class TestSendRecv:
    def test_data_and_fds_round_trip(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(3, eventfds)
        EventNotifier(sent[1]).notify(7)
        send_with_fds(a, b"hello", [e.fd for e in sent])
        # the sent fds stay ours
        assert all(is_open(e.fd) for e in sent)
        got = recv_with_fds(b, 4096)
        assert got is not None
        data, fds = got
        try:
            assert data == b"hello"
            assert len(fds) == 3
            for s, r in zip(sent, fds, strict=True):
                assert isinstance(r, OwnedFd)
                assert r.fd not in {e.fd for e in sent}
                assert not os.get_inheritable(r.fd)
                assert eventfd_id(r) == eventfd_id(s)
            assert eventfd_info(fds[1].fd).count == 7  # type: ignore[union-attr]
            # signalling through the received fd reaches the sender's counter
            EventNotifier(fds[0]).notify(2)
            assert EventConsumer(sent[0]).drain() == 2
        finally:
            close_all(fds)

    def test_max_fds_round_trip(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(MAX_FDS_PER_MESSAGE, eventfds)
        send_with_fds(a, b"x", [e.fd for e in sent])
        got = recv_with_fds(b, 16)
        assert got is not None
        try:
            assert [eventfd_id(r) for r in got[1]] == [eventfd_id(s) for s in sent]
        finally:
            close_all(got[1])

    def test_same_fd_twice(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        (e,) = make_eventfds(1, eventfds)
        send_with_fds(a, b"x", [e.fd, e.fd])
        got = recv_with_fds(b, 16)
        assert got is not None
        try:
            assert len(got[1]) == 2
            assert got[1][0].fd != got[1][1].fd
            assert eventfd_id(got[1][0]) == eventfd_id(got[1][1]) == eventfd_id(e)
        finally:
            close_all(got[1])

    def test_data_without_fds(self, seqpair: tuple[socket.socket, socket.socket]) -> None:
        a, b = seqpair
        send_with_fds(a, b"\x00plain")
        assert recv_with_fds(b, 4096) == (b"\x00plain", [])

    def test_message_boundaries_preserved(
        self, seqpair: tuple[socket.socket, socket.socket]
    ) -> None:
        a, b = seqpair
        for m in (b"one", b"two!", b"3"):
            send_with_fds(a, m)
        assert [recv_with_fds(b, 100) for _ in range(3)] == [
            (b"one", []),
            (b"two!", []),
            (b"3", []),
        ]

    def test_fds_without_data_payload(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        # An empty datagram with fds is not EOF: the fds must not be dropped.
        a, b = seqpair
        (e,) = make_eventfds(1, eventfds)
        send_with_fds(a, b"", [e.fd])
        got = recv_with_fds(b, 100)
        assert got is not None
        try:
            assert got[0] == b""
            assert [eventfd_id(f) for f in got[1]] == [eventfd_id(e)]
        finally:
            close_all(got[1])

    def test_eof_returns_none(self, seqpair: tuple[socket.socket, socket.socket]) -> None:
        a, b = seqpair
        a.close()
        assert recv_with_fds(b, 4096) is None
        assert recv_with_fds(b, 4096) is None  # EOF is sticky

    def test_pending_data_then_eof(self, seqpair: tuple[socket.socket, socket.socket]) -> None:
        a, b = seqpair
        send_with_fds(a, b"last words")
        a.close()
        assert recv_with_fds(b, 4096) == (b"last words", [])
        assert recv_with_fds(b, 4096) is None

    def test_pending_fds_are_received_after_peer_close(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        (e,) = make_eventfds(1, eventfds)
        send_with_fds(a, b"bye", [e.fd])
        a.close()
        got = recv_with_fds(b, 4096)
        assert got is not None
        try:
            assert eventfd_id(got[1][0]) == eventfd_id(e)
        finally:
            close_all(got[1])
        assert recv_with_fds(b, 4096) is None

    def test_reset_by_peer_is_peer_gone(self, seqpair: tuple[socket.socket, socket.socket]) -> None:
        a, b = seqpair
        send_with_fds(a, b"never read")
        b.close()  # closing with unread data resets the connection
        with pytest.raises(PeerGoneError):
            recv_with_fds(a, 4096)

    def test_nonblocking_receive_on_empty_socket(
        self, seqpair: tuple[socket.socket, socket.socket]
    ) -> None:
        _, b = seqpair
        with pytest.raises(BlockingIOError):
            recv_with_fds(b, 4096, flags=socket.MSG_DONTWAIT)

    def test_ctrunc_closes_what_arrived(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(8, eventfds)
        send_with_fds(a, b"eight", [e.fd for e in sent])
        close_all(sent)  # now only the in-flight references remain
        before = fd_count()
        with pytest.raises(ProtocolError, match="truncated"):
            recv_with_fds(b, 4096, max_fds=2)
        assert fd_count() == before
        # the connection keeps working for the next message
        send_with_fds(a, b"next")
        assert recv_with_fds(b, 4096) == (b"next", [])

    @pytest.mark.parametrize(("nsent", "max_fds"), [(1, 0), (2, 1), (8, 7), (3, 0)])
    def test_ctrunc_any_shortfall(
        self,
        seqpair: tuple[socket.socket, socket.socket],
        eventfds: list[OwnedFd],
        nsent: int,
        max_fds: int,
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(nsent, eventfds)
        send_with_fds(a, b"x", [e.fd for e in sent])
        close_all(sent)
        before = fd_count()
        with pytest.raises(ProtocolError):
            recv_with_fds(b, 4096, max_fds=max_fds)
        assert fd_count() == before

    def test_ctrunc_leaves_no_fd_referencing_sent_eventfds(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(8, eventfds)
        ids = {eventfd_id(e) for e in sent}
        send_with_fds(a, b"x", [e.fd for e in sent])
        before = open_fds()
        with pytest.raises(ProtocolError):
            recv_with_fds(b, 4096, max_fds=2)
        after = open_fds()
        assert after == before
        # the sender's eventfds are still exactly once each in our table
        live = [eventfd_info(n) for n in after]
        assert sorted(i.eventfd_id for i in live if i is not None and i.eventfd_id in ids) == (
            sorted(ids)
        )

    def test_trunc_message_larger_than_buffer(
        self, seqpair: tuple[socket.socket, socket.socket]
    ) -> None:
        a, b = seqpair
        send_with_fds(a, b"x" * 100)
        with pytest.raises(ProtocolError, match="larger than 10"):
            recv_with_fds(b, 10)
        # the rest of the datagram was discarded; the next one arrives whole
        send_with_fds(a, b"ok")
        assert recv_with_fds(b, 10) == (b"ok", [])

    def test_trunc_with_fds_closes_them(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(3, eventfds)
        send_with_fds(a, b"y" * 64, [e.fd for e in sent])
        close_all(sent)
        before = fd_count()
        with pytest.raises(ProtocolError):
            recv_with_fds(b, 63)
        assert fd_count() == before

    def test_exact_size_is_not_truncation(
        self, seqpair: tuple[socket.socket, socket.socket]
    ) -> None:
        a, b = seqpair
        send_with_fds(a, b"z" * 64)
        assert recv_with_fds(b, 64) == (b"z" * 64, [])

    def test_fds_spread_over_two_cmsgs(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(5, eventfds)
        numbers = [e.fd for e in sent]
        anc = [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", numbers[:2]).tobytes()),
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", numbers[2:]).tobytes()),
        ]
        assert a.sendmsg([b"split"], anc) == 5
        got = recv_with_fds(b, 4096)
        assert got is not None
        data, fds = got
        try:
            assert data == b"split"
            assert [eventfd_id(f) for f in fds] == [eventfd_id(e) for e in sent]
            assert not any(os.get_inheritable(f.fd) for f in fds)
        finally:
            close_all(fds)

    def test_fds_over_two_cmsgs_exceeding_max_are_rejected_without_leak(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(10, eventfds)
        numbers = [e.fd for e in sent]
        anc = [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", numbers[:5]).tobytes()),
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", numbers[5:]).tobytes()),
        ]
        a.sendmsg([b"ten"], anc)
        close_all(sent)
        before = fd_count()
        with pytest.raises(ProtocolError):
            recv_with_fds(b, 4096)  # default max_fds = 8 < 10
        assert fd_count() == before

    def test_unexpected_control_message_closes_fds(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        # With SO_PASSCRED on, the kernel adds an SCM_CREDENTIALS cmsg to every message.
        a, b = seqpair
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sent = make_eventfds(1, eventfds)
        send_with_fds(a, b"creds", [e.fd for e in sent])
        close_all(sent)
        before = fd_count()
        with pytest.raises(ProtocolError):
            recv_with_fds(b, 4096)
        assert fd_count() == before

    @pytest.mark.parametrize("n", [MAX_FDS_PER_MESSAGE + 1, 20])
    def test_too_many_fds_is_usage_error_and_nothing_sent(
        self,
        seqpair: tuple[socket.socket, socket.socket],
        eventfds: list[OwnedFd],
        n: int,
    ) -> None:
        a, b = seqpair
        sent = make_eventfds(n, eventfds)
        with pytest.raises(UsageError):
            send_with_fds(a, b"x", [e.fd for e in sent])
        with pytest.raises(BlockingIOError):
            b.recv(100, socket.MSG_DONTWAIT)
        assert all(is_open(e.fd) for e in sent)

    def test_send_to_closed_peer_is_peer_gone_without_sigpipe(
        self, seqpair: tuple[socket.socket, socket.socket], eventfds: list[OwnedFd]
    ) -> None:
        a, b = seqpair
        b.close()
        caught: list[int] = []
        old = signal.signal(signal.SIGPIPE, lambda sig, frame: caught.append(sig))
        try:
            with pytest.raises(PeerGoneError):
                send_with_fds(a, b"anyone?")
            with pytest.raises(PeerGoneError):
                send_with_fds(a, b"with fds", [make_eventfds(1, eventfds)[0].fd])
            with pytest.raises(PeerGoneError):
                send_with_fds(a, b"nonblocking", nonblocking=True)
            time.sleep(0.01)  # give a (wrongly) pending signal the chance to run
        finally:
            signal.signal(signal.SIGPIPE, old)
        assert caught == []

    def test_nonblocking_send_on_full_socket(
        self, seqpair: tuple[socket.socket, socket.socket]
    ) -> None:
        a, b = seqpair
        chunk = b"f" * 4096
        sent = 0
        with pytest.raises(BlockingIOError):
            for _ in range(1_000_000):
                send_with_fds(a, chunk, nonblocking=True)
                sent += 1
        assert sent > 0
        # everything that was accepted is delivered intact
        for _ in range(sent):
            assert recv_with_fds(b, 8192) == (chunk, [])
        with pytest.raises(BlockingIOError):
            recv_with_fds(b, 8192, flags=socket.MSG_DONTWAIT)
