"""The broker at its fd limit, as a real process: every refusal is an errno reply to the
one requester, the broker stays up and keeps serving everyone else, and it idles (no
accept spin) while it cannot take a connection."""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Callable, Iterator

import pytest

from shared import wire
from shared.channel import Channel
from shared.errors import BrokerError
from shared.fds import OwnedFd, recv_with_fds
from tests.conftest import BrokerHandle

pytestmark = pytest.mark.timeout(180)


def broker_fds(b: BrokerHandle) -> int:
    return len(os.listdir(f"/proc/{b.proc.pid}/fd"))


@pytest.fixture
def limited(broker_factory: Callable[..., BrokerHandle]) -> Iterator[Callable[..., BrokerHandle]]:
    """A broker whose fd limit the test lowers with prlimit (restored before teardown)."""
    started: list[tuple[BrokerHandle, tuple[int, int]]] = []

    def start(limit: int, *args: str) -> BrokerHandle:
        b = broker_factory(args=args, name=f"broker{len(started)}")
        old = resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, (limit, old[1]))
        started.append((b, old))
        return b

    yield start
    for b, old in started:
        if b.proc.alive:
            resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, old)


def test_eventfd_create_loop_at_fd_limit_is_errno_and_broker_keeps_serving(
    limited: Callable[..., BrokerHandle],
) -> None:
    b = limited(1024)
    ch = b.connect()
    handles: list[int] = []
    with pytest.raises(BrokerError) as refused:
        for _ in range(1100):
            handles.append(ch.eventfd_create())
    assert refused.value.errno == errno.ENFILE, refused.value
    assert "reserve" in str(refused.value)
    assert len(handles) > 800  # the reserve is a small part of the table
    # The broker is up and serves others: a new connection, introspection, a dup.
    other = b.connect()
    assert other.ping(7) == 7
    state = other.state()
    assert state["process"]["fd_limit"] == 1024
    assert state["process"]["fds_free"] <= state["process"]["fd_reserve"]
    with ch.handle_fd(handles[0]) as fd:
        os.eventfd_write(fd.fd, 1)
    vm = other.vm_create(ngsi=4)  # objects that hold no fd are not refused
    assert vm > 0
    # Freeing fds gives room back.
    for h in handles[:8]:
        ch.handle_close(h)
    handles[:8] = [ch.eventfd_create()]
    assert b.proc.alive


def test_syscalls_and_accept_at_the_kernel_fd_limit_are_errno_replies_without_spin(
    limited: Callable[..., BrokerHandle],
) -> None:
    """With no reserve and the limit lowered under what the broker holds, the kernel
    itself refuses: every syscall made for a request becomes that request's errno."""
    b = limited(resource.getrlimit(resource.RLIMIT_NOFILE)[0], "--fd-reserve", "0")
    ch = b.connect()
    handles = [ch.eventfd_create() for _ in range(40)]
    old = resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, (broker_fds(b) - 20, old[1]))

    with pytest.raises(BrokerError) as dup:
        ch.handle_fd(handles[0])  # HandleGetFd: the dup fails
    assert dup.value.errno == errno.EMFILE
    with pytest.raises(BrokerError) as create:
        ch.eventfd_create()
    assert create.value.errno in (errno.ENFILE, errno.EMFILE)
    assert ch.state()["process"]["open_fds"] is None  # /proc/self/fd cannot be opened
    assert ch.ping(3) == 3

    # A connection that arrives now is taken with the spare fd, told why, and closed.
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw.connect(b.path)
    raw.settimeout(30)
    got = recv_with_fds(raw, wire.MAX_FRAME)
    assert got is not None
    msg = wire.decode(*got)
    assert isinstance(msg, wire.Error) and msg.errno == errno.EMFILE, msg
    assert recv_with_fds(raw, wire.MAX_FRAME) is None  # then EOF
    raw.close()

    # Another one waits in the backlog; the broker does not spin on it meanwhile.
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    waiting.connect(b.path)
    for i in range(50):
        assert ch.ping(i) == i
    log = b.log_text()
    assert log.count("not accepting connections") == 1, log
    assert "accept failed" not in log

    # Give the fds back: the broker listens again and serves the one that waited.
    resource.prlimit(b.proc.pid, resource.RLIMIT_NOFILE, old)
    ch.handle_close(handles.pop())
    late = Channel(waiting)
    b.channels.append(late)
    assert late.ping(5) == 5
    assert "accepting connections again" in b.log_text()
    assert b.proc.alive


def test_refused_request_fds_are_closed_before_the_reply(broker: BrokerHandle) -> None:
    """An EventfdImport of a pipe is refused; when the reply arrives the broker holds
    none of the fds that came with it (checked from outside, right at the reply)."""
    ch = broker.connect()
    ch.ping(0)
    baseline = broker_fds(broker)
    r, w = os.pipe()
    try:
        for _ in range(200):
            with OwnedFd(os.dup(r)) as fd, pytest.raises(BrokerError) as refused:
                ch.call(wire.EventfdImport(fds=(fd,)), wire.HandleReply)
            assert refused.value.errno == errno.EINVAL
            assert broker_fds(broker) == baseline
    finally:
        os.close(r)
        os.close(w)


def test_quota_option_bounds_vms_per_connection(
    broker_factory: Callable[..., BrokerHandle],
) -> None:
    b = broker_factory(args=("--quota", "vms=2"))
    ch = b.connect()
    ch.vm_create(ngsi=1)
    ch.vm_create(ngsi=1)
    with pytest.raises(BrokerError) as over:
        ch.vm_create(ngsi=1)
    assert over.value.errno == errno.ENOSPC
    assert len(ch.state()["vms"]) == 2
    assert b.connect().vm_create(ngsi=1) > 0  # per connection
