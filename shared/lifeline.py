"""Child processes die with their parent, and leave Ctrl-C to it.

:func:`child_setup` runs in every child the launcher starts, between ``fork`` and
``exec`` (``Popen(preexec_fn=...)``), so it is in force before the child runs a line of
Python:

* ``PR_SET_PDEATHSIG`` = SIGKILL: when the parent goes (normally, crashed or killed), the
  kernel kills the child -- no guest or device is ever left running without its VMM, and
  no VMM or broker without the launcher. The parent may already have died between
  ``fork`` and the ``prctl``; then ``getppid()`` is no longer the pid that forked us and
  the child exits at once. (The signal follows the *thread* that forked: vbusemu starts
  processes from main threads only.)
* SIGINT ignored. Ctrl-C goes to the terminal's whole foreground process group; only the
  process at the top (``vbusemu run``, a test) decides what happens, and stops its
  children in order. An ignored disposition survives ``exec``; Python keeps it, and
  :func:`catch_sigint` leaves it alone.

The launcher itself is a *subreaper* (:func:`become_subreaper`): if a VMM dies, its
guests and devices (killed by their death signal) are re-parented to the launcher, which
reaps them (:func:`reap_orphans`) before it exits -- not even a zombie is left for init.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
EXIT_ORPHANED = 111
"""Exit status of a child whose parent died before it could ask to die with it."""

_Handler = Callable[[int, FrameType | None], object]


def _load_prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn: Callable[..., int] = libc.prctl
        return fn
    except (OSError, AttributeError):  # not Linux/glibc: no death signal, still works
        return None


_prctl = _load_prctl()  # loaded in the parent: the child only calls it


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies."""
    return _prctl is not None and _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def become_subreaper() -> bool:
    """``PR_SET_CHILD_SUBREAPER``: descendants whose parent dies are re-parented to us
    (not to init), so :func:`reap_orphans` can make sure none is left, not even a zombie."""
    return _prctl is not None and _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def processes() -> Iterator[tuple[int, list[bytes]]]:
    """Every process (zombies included) with the fields of its ``/proc/PID/stat`` after
    ``pid (comm)``: state, ppid, pgrp, session, ..."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        yield int(name), stat[stat.rfind(b")") + 2 :].split()


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from ``/proc``; zombies included)."""
    return [p for p, fields in processes() if len(fields) > 1 and int(fields[1]) == pid]


def reap_orphans(timeout: float = 5.0) -> list[int]:
    """Kill (SIGKILL, by pid) and reap every child of ours: call it once every process we
    started ourselves has been waited for, so what is left are orphans re-parented to us
    as a subreaper. Returns their pids."""
    found = children(os.getpid())
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in found:
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours after all, or reaped meanwhile
                break
            if done or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
    return found


def child_setup(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` for a child of ``parent_pid`` (see the module docstring)."""

    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the prctl took effect
            os._exit(EXIT_ORPHANED)

    return setup


def catch_sigint(handler: _Handler) -> None:
    """Handle SIGINT with ``handler`` unless it was ignored when this process started
    (a child of the launcher: the launcher handles Ctrl-C for everyone)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)


class CtrlC:
    """SIGINT for the process at the top (``vbusemu run``): counted, never raised -- a
    ``KeyboardInterrupt`` could land anywhere, even between a ``fork`` and the line that
    remembers the child's pid. The handler also writes to a pipe, so a ``select`` on
    :meth:`fileno` wakes up at once."""

    def __init__(self) -> None:
        self.count = 0
        self._r = self._w = -1

    def install(self) -> None:
        if self._r < 0:
            self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGINT, self._on_sigint)

    @property
    def installed(self) -> bool:
        return signal.getsignal(signal.SIGINT) == self._on_sigint

    def uninstall(self) -> None:
        """Back to Python's default (``KeyboardInterrupt``) if ours is installed."""
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        with contextlib.suppress(OSError):  # the pipe is full: a wakeup is pending anyway
            os.write(self._w, b"\0")

    @property
    def pending(self) -> bool:
        return self.count > 0

    def fileno(self) -> int:
        return self._r

    def close(self) -> None:
        """Uninstall and close the wakeup pipe."""
        self.uninstall()
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1


CTRL_C = CtrlC()
"""The one instance: installed by the ``vbusemu`` command as soon as it starts."""
