"""File-descriptor ownership, eventfd ends, fd-type checks and SCM_RIGHTS transfer.

Invariants
----------
* Every fd vbusemu holds is owned by exactly one :class:`OwnedFd`. ``OwnedFd.fd`` is the
  number while open and ``-1`` once closed or moved away; closing twice is harmless.
  Ownership moves explicitly with :meth:`OwnedFd.take` / :meth:`OwnedFd.move`.
* Every fd we create or receive is close-on-exec: eventfds are made with ``EFD_CLOEXEC``
  and received fds arrive with ``MSG_CMSG_CLOEXEC`` (``socket.recv_fds`` ignores its
  flags, CPython gh-128881, so we call ``recvmsg`` ourselves).
* On a truncated receive (``MSG_CTRUNC``/``MSG_TRUNC``) the kernel has already dropped
  the fds that did not fit; every fd that *did* arrive is closed before
  :class:`~shared.errors.ProtocolError` is raised, so a hostile peer cannot fill our fd
  table (CVE-2022-0669 was a backend that kept such fds).
* Sends use ``MSG_NOSIGNAL``: a vanished peer is a :class:`~shared.errors.PeerGoneError`,
  never a SIGPIPE.

Eventfd behaviour (what the ends promise)
-----------------------------------------
:class:`EventNotifier` writes; :class:`EventConsumer` reads. Both work on the same
kernel object and are normally non-blocking: ``notify`` returns ``False`` instead of
blocking when the counter would pass ``0xfffffffffffffffe`` (the kernel's saturation
point), ``drain`` returns ``0`` when nothing is pending (EAGAIN). A notifier built on a
*blocking* fd blocks in that case, exactly like ``write(2)``. Writing
``0xffffffffffffffff`` is rejected by the kernel (EINVAL) and raised as
:class:`~shared.errors.UsageError`. A semaphore-mode eventfd drains 1 per read.
"""

from __future__ import annotations

import array
import errno
import fcntl
import functools
import os
import select
import socket
import stat
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType

from shared.errors import PeerGoneError, ProtocolError, UsageError

EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE
"""Largest value an eventfd counter can hold; a write that would pass it blocks/EAGAINs."""

MAX_FDS_PER_MESSAGE = 8
"""Like vhost-user: at most 8 fds per control message."""

_INT_SIZE = array.array("i").itemsize
_EVENTFD_INITVAL_MAX = 0xFFFFFFFF  # eventfd(2)'s initval is an unsigned int


class OwnedFd:
    """The single owner of one file descriptor. ``fd == -1`` means closed or moved."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if not isinstance(fd, int) or fd < 0:
            raise UsageError(f"OwnedFd needs an open fd number, got {fd!r}")
        self._fd = fd

    @property
    def fd(self) -> int:
        """The fd number, or -1 once closed or moved away."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd number; raises :class:`UsageError` if closed (for selectors/poll)."""
        if self._fd < 0:
            raise UsageError("fd is closed")
        return self._fd

    def close(self) -> None:
        """Close the fd. Harmless when already closed."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def take(self) -> int:
        """Give up ownership and return the raw number; this object becomes closed."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def move(self) -> OwnedFd:
        """Transfer ownership to a new object (this one becomes closed)."""
        return OwnedFd(self.take())

    def dup(self) -> OwnedFd:
        """A new, independently owned, close-on-exec duplicate."""
        return OwnedFd(os.dup(self.fileno()))  # os.dup makes the copy non-inheritable

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self.close()  # first: under warnings-as-errors the warning raises
            warnings.warn(f"unclosed OwnedFd {fd}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})"


def close_all(fds: Iterable[OwnedFd]) -> None:
    """Close every fd, even if one close fails (the first error is re-raised)."""
    first: OSError | None = None
    for f in fds:
        try:
            f.close()
        except OSError as e:  # pragma: no cover - EBADF would be an ownership bug
            first = first or e
    if first is not None:
        raise first


# ---------------------------------------------------------------------------- eventfd


def new_eventfd(initval: int = 0, *, semaphore: bool = False, nonblock: bool = True) -> OwnedFd:
    """Create a close-on-exec eventfd (non-blocking unless asked otherwise).

    ``initval`` may be anything from 0 to :data:`EVENTFD_MAX`, the counter's range.
    eventfd(2) takes a 32-bit initial value only, so a larger one is written into the new,
    empty counter (a write that cannot block).
    """
    if not 0 <= initval <= EVENTFD_MAX:
        raise UsageError(f"eventfd initval {initval:#x} is outside 0..{EVENTFD_MAX:#x}")
    flags = os.EFD_CLOEXEC
    if semaphore:
        flags |= os.EFD_SEMAPHORE
    if nonblock:
        flags |= os.EFD_NONBLOCK
    small = initval <= _EVENTFD_INITVAL_MAX
    fd = OwnedFd(os.eventfd(initval if small else 0, flags))
    if not small:
        try:
            os.eventfd_write(fd.fd, initval)
        except BaseException:
            fd.close()
            raise
    return fd


@dataclass(frozen=True)
class EventFdInfo:
    """What the kernel reports about an eventfd (``/proc/self/fdinfo``)."""

    eventfd_id: int
    """Kernel-wide identity of the eventfd object: equal ids are the same counter."""
    count: int
    semaphore: bool


_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def eventfd_info(fd: int) -> EventFdInfo | None:
    """Identity and state of ``fd`` if it is an eventfd, else ``None``; ``OSError`` when
    the process is out of fds or memory and cannot tell (``EMFILE``, ``ENFILE``, ``ENOMEM``).

    The check is the kernel's own: the fd's anon-inode name is ``[eventfd]``. Any other
    type (pipe, socket, regular file, directory, memfd) returns ``None``.
    """
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
            return None
        with open(f"/proc/self/fdinfo/{fd}") as f:
            text = f.read()
    except OSError as e:
        if e.errno in _OUT_OF_RESOURCES:  # not an answer about the fd: let the caller say so
            raise
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    try:
        return EventFdInfo(
            eventfd_id=int(fields.get("eventfd-id", str(-1))),
            count=int(fields["eventfd-count"], 16),
            semaphore=fields.get("eventfd-semaphore", "0") == "1",
        )
    except (KeyError, ValueError):
        return None


@functools.cache
def fdinfo_shows_semaphore() -> bool:
    """Whether this kernel's fdinfo says if an eventfd is in semaphore mode (Linux 6.4 and
    later); before that :func:`eventfd_info` cannot tell and reports ``semaphore`` False.
    Probed once with a semaphore-mode eventfd of our own."""
    try:
        probe = new_eventfd(semaphore=True)
    except OSError:
        return False
    try:
        info = eventfd_info(probe.fd)
    except OSError:
        return False
    finally:
        probe.close()
    return info is not None and info.semaphore


class EventNotifier:
    """The signaling end of an eventfd. Does not own the fd unless given an OwnedFd."""

    __slots__ = ("_fd",)

    def __init__(self, fd: OwnedFd) -> None:
        self._fd = fd

    @property
    def fd(self) -> OwnedFd:
        return self._fd

    def notify(self, value: int = 1) -> bool:
        """Add ``value`` to the counter. ``False`` if it would saturate (non-blocking fd)."""
        if not 0 < value <= EVENTFD_MAX:
            raise UsageError(f"eventfd write of {value:#x} is invalid (1..{EVENTFD_MAX:#x})")
        try:
            os.eventfd_write(self._fd.fileno(), value)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        self._fd.close()


_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_nowait_reads = _RWF_NOWAIT != 0
"""Whether ``preadv2(RWF_NOWAIT)`` works on eventfds here (Linux 5.x on): one syscall per
drain instead of a poll and a read. Cleared the first time the kernel refuses it."""


class EventConsumer:
    """The waiting end of an eventfd."""

    __slots__ = ("_buf", "_fd")

    def __init__(self, fd: OwnedFd) -> None:
        self._fd = fd
        self._buf = bytearray(8)

    @property
    def fd(self) -> OwnedFd:
        return self._fd

    def fileno(self) -> int:
        return self._fd.fileno()

    def drain(self) -> int:
        """Read and reset the counter; 0 if nothing pending (semaphore mode: 1 per call).

        Never blocks, even on a blocking fd: O_NONBLOCK lives in the open file
        description that every holder of a passed eventfd shares, so a consumer must not
        flip it. Instead the read itself is non-blocking (``RWF_NOWAIT``, which eventfds
        honour); where the kernel refuses that flag, it polls first -- a consumer is the
        eventfd's only reader, so nothing can empty the counter between the poll and the
        read.
        """
        global _nowait_reads
        fd = self._fd.fileno()
        if _nowait_reads:
            try:
                os.preadv(fd, (self._buf,), -1, _RWF_NOWAIT)
            except BlockingIOError:
                return 0
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _nowait_reads = False  # an older kernel: poll, then read
            else:
                return int.from_bytes(self._buf, sys.byteorder)
        if not select.select([fd], [], [], 0)[0]:
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float | None) -> bool:
        """Block until the counter is non-zero or ``timeout`` seconds pass."""
        r, _, _ = select.select([self._fd.fileno()], [], [], timeout)
        return bool(r)

    def close(self) -> None:
        self._fd.close()


# ---------------------------------------------------------------------------- memory fds


def memory_fd_size(fd: int) -> int | None:
    """Size of a shared-memory object (POSIX shm or memfd) behind ``fd``, else ``None``.

    A pipe, socket, directory, eventfd or ordinary on-disk file is not shared memory, and
    neither is an fd opened read-only or ``O_PATH`` on such an object: every holder maps
    guest memory shared and read/write, which needs an ``O_RDWR`` open file.
    """
    try:
        st = os.fstat(fd)
        target = os.readlink(f"/proc/self/fd/{fd}")
        mode = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if not (target.startswith("/dev/shm/") or target.startswith("/memfd:")):
        return None
    if mode & os.O_ACCMODE != os.O_RDWR:  # O_PATH reads as O_RDONLY | O_PATH
        return None
    return st.st_size


# ---------------------------------------------------------------------------- SCM_RIGHTS


def send_with_fds(
    sock: socket.socket, data: bytes, fds: Sequence[int] = (), *, nonblocking: bool = False
) -> None:
    """Send one SOCK_SEQPACKET message with ``fds`` attached (the fds stay ours).

    Raises :class:`PeerGoneError` if the peer is gone, :class:`BlockingIOError` if
    ``nonblocking`` and the socket buffer is full.
    """
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise UsageError(f"{len(fds)} fds exceed the limit of {MAX_FDS_PER_MESSAGE}")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    flags = socket.MSG_NOSIGNAL | (socket.MSG_DONTWAIT if nonblocking else 0)
    try:
        sent = sock.sendmsg([data], anc, flags)
    except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as e:
        raise PeerGoneError(f"peer gone while sending: {e}") from e
    if sent != len(data):  # SEQPACKET is atomic; a short send would be a kernel surprise
        raise ProtocolError(f"short send: {sent} of {len(data)} bytes")


def recv_with_fds(
    sock: socket.socket, max_bytes: int, max_fds: int = MAX_FDS_PER_MESSAGE, *, flags: int = 0
) -> tuple[bytes, list[OwnedFd]] | None:
    """Receive one message and every fd that came with it; ``None`` on EOF.

    Walks every control message. Any truncation, a non-SCM_RIGHTS control message or a
    torn fd array closes every received fd and raises :class:`ProtocolError`.
    """
    try:
        data, anc, msg_flags, _ = sock.recvmsg(
            max_bytes, socket.CMSG_SPACE(max_fds * _INT_SIZE), socket.MSG_CMSG_CLOEXEC | flags
        )
    except ConnectionResetError as e:
        raise PeerGoneError(f"peer reset the connection: {e}") from e
    fds: list[OwnedFd] = []
    problem = ""
    for level, kind, payload in anc:
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            problem = problem or f"unexpected control message level={level} type={kind}"
            continue
        whole = len(payload) - len(payload) % _INT_SIZE
        fds.extend(OwnedFd(n) for n in array.array("i", payload[:whole]))
        if whole != len(payload):
            problem = problem or "torn SCM_RIGHTS payload"
    if msg_flags & socket.MSG_CTRUNC:
        problem = problem or f"control data truncated (more than {max_fds} fds sent)"
    if len(fds) > max_fds:  # CMSG_SPACE rounds up: an odd max_fds has room for one more
        problem = problem or f"{len(fds)} fds received, more than {max_fds}"
    if msg_flags & socket.MSG_TRUNC:
        problem = problem or f"message larger than {max_bytes} bytes"
    if problem:
        close_all(fds)
        raise ProtocolError(problem)
    if not data and not fds:
        return None  # orderly EOF (our protocol never sends empty messages)
    return data, fds
