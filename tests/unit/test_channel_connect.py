"""Channel.connect against a real listening socket whose listen backlog is full.

No broker: a bare SOCK_SEQPACKET listener with a tiny backlog, filled with connections
nobody accepts. A connect to it must wait for a slot (not fail at once with EAGAIN) and,
when none frees up, give up at its deadline with an error that says why.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.channel import Channel
from shared.errors import PeerGoneError


def _fill_backlog(path: str) -> list[socket.socket]:
    """Connect non-blocking until the listener's backlog refuses with EAGAIN."""
    pending: list[socket.socket] = []
    for _ in range(64):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return pending
        pending.append(s)
    raise AssertionError("the listen backlog never filled up")


@pytest.fixture
def full_listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(0)
    pending = _fill_backlog(path)
    assert pending, "not even one connection fits in the backlog"
    try:
        yield listener, path
    finally:
        for s in pending:
            s.close()
        listener.close()


def test_connect_retries_while_listen_backlog_is_full(
    full_listener: tuple[socket.socket, str],
) -> None:
    listener, path = full_listener
    started = threading.Event()
    result: list[Channel | BaseException] = []

    def dial() -> None:
        started.set()
        try:
            result.append(Channel.connect(path, timeout=30))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=dial, daemon=True)
    t.start()
    assert started.wait(10)
    # Free one slot. Whether the dialler is already waiting in the kernel or still about
    # to connect, it must end up connected (a connect failing at once with EAGAIN would
    # already be in `result` as an error).
    conn, _ = listener.accept()
    t.join(30)
    assert not t.is_alive(), "connect did not return after a backlog slot was freed"
    conn.close()
    (got,) = result
    assert isinstance(got, Channel), f"connect failed: {got!r}"
    try:
        assert not got.closed
        # The channel's socket is connected to our listener and non-blocking.
        assert got._socket().getpeername() == path
        assert got._socket().gettimeout() == 0.0
    finally:
        got.close()


def test_connect_gives_up_at_its_deadline_naming_the_full_backlog(
    full_listener: tuple[socket.socket, str],
) -> None:
    _, path = full_listener
    with pytest.raises(PeerGoneError) as info:
        Channel.connect(path, timeout=0.2)
    text = str(info.value)
    assert path in text
    assert "backlog" in text and "full" in text


def test_connect_to_nothing_still_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(PeerGoneError) as info:
        Channel.connect(str(tmp_path / "absent.sock"), timeout=30)
    assert "absent.sock" in str(info.value)
