"""Starting, driving and stopping vbusemu's processes: the only process-management file.

Every child is a :class:`ManagedProcess` addressed by its ``Popen`` object, i.e. by pid
-- never by name. Every child dies with its parent and ignores SIGINT (Ctrl-C is the
top process's to handle): see :mod:`shared.lifeline`. Stopping is graceful, then hard:
close its control pipe (an agent exits on stdin EOF) or send SIGTERM (the broker), wait,
and SIGKILL only if it is still there after the grace period. Every wait has a timeout.

Agent processes (guest, device) speak JSON lines: :meth:`ManagedProcess.call` sends
``{"id": n, "cmd": ...}`` and returns the matching ``{"id": n, "ok": ...}`` reply;
``{"event": ...}`` lines seen meanwhile are kept in :attr:`ManagedProcess.events`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from shared.errors import PeerGoneError, UsageError, VbusError
from shared.fds import OwnedFd, close_all
from shared.lifeline import child_setup
from shared.wire import Policy

GRACE = 5.0


class AgentError(VbusError):
    """An agent process answered a command with ``ok: false``; it keeps running."""


class ManagedProcess:
    """One child process we started; optionally driven over a JSON-lines control pipe."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int] = (),
        control: bool = True,
        stderr: IO[Any] | int | None = None,
        stdout: IO[Any] | int | None = None,
    ) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._next_id = 0
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            list(argv),
            pass_fds=tuple(pass_fds),
            env=env,
            close_fds=True,
            stdin=subprocess.PIPE if control else subprocess.DEVNULL,
            stdout=subprocess.PIPE if control else stdout,
            stderr=stderr,
            preexec_fn=child_setup(os.getpid()),
        )
        self.control = control

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    # ------------------------------------------------------------------ control pipe

    def _lines(self, deadline: float) -> dict[str, Any]:
        """The next JSON line from the child, waiting until ``deadline``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerGoneError(f"{self.name} (pid {self.pid}) did not answer in time")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise PeerGoneError(
                    f"{self.name} (pid {self.pid}) exited (status {self.proc.wait(GRACE)})"
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj: dict[str, Any] = json.loads(line)
        return obj

    def call(self, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """Send a command and return its reply; ``ok: false`` raises :class:`AgentError`."""
        if not self.control or self.proc.stdin is None:
            raise UsageError(f"{self.name} has no control pipe")
        self._next_id += 1
        ident = self._next_id
        self.proc.stdin.write((json.dumps({"id": ident, "cmd": cmd, **args}) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            obj = self._lines(deadline)
            if "event" in obj:
                self.events.append(obj)
            elif obj.get("id") == ident:
                if not obj.get("ok"):
                    raise AgentError(f"{self.name}: {cmd} failed: {obj.get('error', obj)}")
                return obj

    def send(self, cmd: str, **args: Any) -> None:
        """Send a command without waiting: for a caller that reads the child's output in
        its own loop (:meth:`poll_lines`), where the reply line shows up."""
        if not self.control or self.proc.stdin is None:
            raise UsageError(f"{self.name} has no control pipe")
        self._next_id += 1
        self.proc.stdin.write(
            (json.dumps({"id": self._next_id, "cmd": cmd, **args}) + "\n").encode()
        )
        self.proc.stdin.flush()

    @property
    def stdout_closed(self) -> bool:
        """True once :meth:`stop` / :meth:`kill` closed our end of its control pipe."""
        return self.proc.stdout is None or self.proc.stdout.closed

    def stdout_fd(self) -> int:
        """The control pipe's read end, for a caller's selector (see :meth:`poll_lines`)."""
        if self.proc.stdout is None:
            raise UsageError(f"{self.name} has no control pipe")
        return self.proc.stdout.fileno()

    def poll_lines(self) -> list[dict[str, Any]] | None:
        """Non-blocking: every complete JSON line available now (None once at EOF).
        Events are also kept in :attr:`events`."""
        fd = self.stdout_fd()
        if select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        out: list[dict[str, Any]] = []
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            obj: dict[str, Any] = json.loads(line)
            if "event" in obj:
                self.events.append(obj)
            out.append(obj)
        return out

    def wait_event(self, event: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """Return the first event named ``event`` whose fields include ``match``."""
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for obj in self.events[seen:]:
                if obj.get("event") == event and all(obj.get(k) == v for k, v in match.items()):
                    self.events.remove(obj)
                    return obj
            seen = len(self.events)
            self.events.append(self._lines(deadline))

    # ------------------------------------------------------------------ stopping

    def request_stop(self) -> None:
        """The graceful part of :meth:`stop`, without waiting: EOF on stdin (or SIGTERM)."""
        if self.proc.poll() is None:
            if self.control and self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            else:
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = GRACE) -> int:
        """Graceful then hard: EOF on stdin (or SIGTERM), wait, then SIGKILL."""
        if self.proc.poll() is None:
            self.request_stop()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
        self._close_pipes()
        return self.proc.returncode

    def terminate(self, timeout: float = GRACE) -> int:
        """SIGTERM now (the process's own orderly stop), then SIGKILL after ``timeout``.
        Meanwhile whatever it still writes on its control pipe is read and dropped, so a
        full pipe never holds it up."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            fd = -1 if self.stdout_closed or not self.control else self.stdout_fd()
            while self.proc.poll() is None and time.monotonic() < deadline:
                if fd < 0:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(max(0.0, deadline - time.monotonic()))
                    continue
                left = max(0.0, deadline - time.monotonic())
                if select.select([fd], [], [], min(0.1, left))[0] and not os.read(fd, 65536):
                    fd = -1  # EOF: only the exit is left to wait for
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout)
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL (a crash, for fault tests) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(GRACE)
        self._close_pipes()
        return self.proc.returncode

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def warm_kernels(interrupted: Callable[[], bool] = lambda: False) -> bool:
    """Compile or load the data-path kernels once, in a child (this process never imports
    numba), before guests and devices start and each would do it. ``False`` if
    ``interrupted()`` became true meanwhile (the child is stopped). A no-op with
    ``VBUSEMU_JIT=0``. The child says so on stderr when it really compiles."""
    from shared.jit import jit_enabled

    if not jit_enabled():
        return True
    proc = ManagedProcess(
        "warm", python_module("shared.virtio.warm"), control=False, stdout=subprocess.DEVNULL
    )
    while True:
        try:
            proc.proc.wait(0.1)
            break
        except subprocess.TimeoutExpired:
            if interrupted():
                proc.stop()
                return False
    if proc.proc.returncode:
        print(
            "vbusemu: warning: the data-path kernels did not compile (exit status "
            f"{proc.proc.returncode}); guests and devices will try again themselves",
            file=sys.stderr,
        )
    return True


def start_broker(
    path: str,
    policy: Policy = Policy.HUP,
    *,
    ack_timeout: float = 2.0,
    stderr: IO[Any] | int | None = None,
    stdout: IO[Any] | int | None = None,
    timeout: float = 15.0,
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    """Start a broker process and wait until it accepts connections. ``extra_args`` are
    more ``vbusemu broker`` options (``--quota``, ``--fd-reserve``)."""
    r, w = os.pipe()
    with OwnedFd(r) as rfd, OwnedFd(w) as wfd:
        proc = ManagedProcess(
            "broker",
            python_module(
                "hostemu.broker",
                "--socket",
                path,
                "--policy",
                policy.name.lower(),
                "--ack-timeout",
                str(ack_timeout),
                "--ready-fd",
                str(wfd.fd),
                *extra_args,
            ),
            pass_fds=[wfd.fd],
            control=False,
            stderr=stderr,
            stdout=stdout,
        )
        wfd.close()  # only the child holds the write end now: EOF means it died
        ready, _, _ = select.select([rfd.fd], [], [], timeout)
        if not ready or os.read(rfd.fd, 16) != b"ready\n":
            status = proc.stop()
            raise PeerGoneError(f"broker did not start (exit status {status}); see its log")
    return proc


def spawn_agent(
    module: str,
    channel: OwnedFd | list[OwnedFd],
    name: str,
    *args: str,
    stderr: IO[Any] | int | None = None,
) -> ManagedProcess:
    """Start a guest or device process on its scoped channel(s); our copies are closed."""
    channels = channel if isinstance(channel, list) else [channel]
    try:
        fd_args = [word for c in channels for word in ("--channel-fd", str(c.fileno()))]
        return ManagedProcess(
            name,
            python_module(module, *args, *fd_args, "--name", name),
            pass_fds=[c.fileno() for c in channels],
            stderr=stderr,
        )
    finally:
        close_all(channels)


def spawn_guest(channel: OwnedFd, name: str = "guest", **kw: Any) -> ManagedProcess:
    return spawn_agent("guestemu.guest", channel, name, **kw)


def spawn_device(channel: OwnedFd, name: str = "device", **kw: Any) -> ManagedProcess:
    return spawn_agent("hostemu.device", channel, name, **kw)
