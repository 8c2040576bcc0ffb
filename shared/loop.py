"""The event loop of guest and device processes: one of vbusemu's few I/O files.

Theory of operation
-------------------
An *agent* is a process that holds one broker channel (usually a scoped one handed over
by the VMM) and reacts to three sources, all watched by one epoll loop:

* the broker channel -- notices such as attach (with real eventfds), detach, peer gone;
* its own fds -- irqfds for a guest, for example -- registered with :meth:`EventLoop.watch`;
* a *control pipe*: JSON-lines commands on stdin from whoever started it (the launcher,
  a test, the demo), answered on stdout as ``{"id": n, "ok": true, ...}``; unsolicited
  progress is reported as ``{"event": "..."}`` lines.

Every loop watches a stop eventfd that SIGTERM (and SIGINT, unless the process started
with it ignored, as the launcher's children do) writes, so a signal ends the loop at the
next wakeup with a clean exit (no traceback, fds closed). EOF on stdin (the parent
went away) also stops it. EOF on the broker channel is a peer-gone: the agent reports
``broker_gone`` and exits with :data:`EXIT_BROKER_GONE`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

from shared import wire
from shared.channel import Channel
from shared.errors import BrokerError, PeerGoneError, ProtocolError, VbusError
from shared.fds import new_eventfd
from shared.lifeline import catch_sigint

EXIT_OK = 0
EXIT_BROKER_GONE = 3
EXIT_ERROR = 1

log = logging.getLogger("vbusemu.agent")


YIELD_CONTENDED_NS = 20_000
"""A ``sched_yield`` that takes longer than this gave the CPU to another task."""


def yield_cpu() -> bool:
    """Let any other task runnable on this CPU go first; True if one did (the yield took
    long): the CPU is wanted, and a poller should stop and sleep -- as KVM's halt-poll
    stops when ``single_task_running()`` is false and vhost's busyloop on
    ``need_resched()``. Without this, two pollers sharing a core on a busy machine hold it
    for whole scheduler slices (milliseconds) in turn."""
    start = time.monotonic_ns()
    os.sched_yield()
    return time.monotonic_ns() - start > YIELD_CONTENDED_NS


class EventLoop:
    """An epoll loop with a stop eventfd, one-shot timers and busy pollers.

    It uses ``select.epoll`` directly, not :mod:`selectors`: a guest or device wakes once
    per interrupt or kick, and the selector's per-wakeup bookkeeping (a key object and a
    ready list per event) was a measurable part of a sleeping round trip. A callback that
    unwatches another fd ready in the same wakeup stops that fd's callback from running.

    A *busy poller* (:meth:`spin`) is a callable run between non-blocking polls of the fds
    instead of sleeping in epoll -- a vhost-style busyloop. Each call should spin for a
    bounded slice and return False once done; the fds (the stop eventfd, the control pipe,
    the channel) are polled between slices, so a spinning process still stops and answers.
    Between slices the loop also yields the CPU (:func:`yield_cpu`); :attr:`cpu_contended`
    says whether another task took it, and a poller should then end early.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None] | None] = {}
        self.stop_fd = new_eventfd()
        self._register(self.stop_fd.fileno(), None)
        self.stopping = False
        self.signalled = False  # a stop signal arrived (it ends the loop at its next poll)
        self._timers: list[tuple[float, Callable[[], None]]] = []
        self._spinners: dict[object, Callable[[], bool]] = {}
        self.cpu_contended = False
        self._loadavg = -1  # /proc/loadavg, opened at the first oversubscribed() call
        self._cpus = os.cpu_count() or 1

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.signalled = True
            if not self.stop_fd.closed:
                os.eventfd_write(self.stop_fd.fd, 1)

        catch_sigint(on_signal)  # unless ignored: a launched child leaves Ctrl-C to its parent
        signal.signal(signal.SIGTERM, on_signal)

    def _register(self, fd: int, callback: Callable[[], None] | None) -> None:
        if fd in self._callbacks:
            raise KeyError(f"fd {fd} is already watched")
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` whenever ``fd`` is readable (level-triggered). KeyError if
        ``fd`` is already watched."""
        self._register(fd, callback)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (KeyError if not watched). Unwatch before closing the fd;
        an fd closed first is forgotten all the same (the kernel already dropped it)."""
        del self._callbacks[fd]
        with contextlib.suppress(OSError):  # closed (EBADF): epoll dropped it with the file
            self._epoll.unregister(fd)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        self._timers.append((when, callback))

    def spin(self, key: object, poller: Callable[[], bool]) -> None:
        """Run ``poller`` between non-blocking polls until it returns False (one per ``key``;
        a new one replaces the old)."""
        self._spinners[key] = poller

    def spinning(self, key: object) -> bool:
        return key in self._spinners

    LOADAVG = "/proc/loadavg"

    def oversubscribed(self) -> bool:
        """Whether more tasks are runnable on the machine right now than it has CPUs (the
        caller counted): polling instead of sleeping would take a CPU from a task that
        waits for one. KVM's halt-poll asks the same of its own CPU
        (``single_task_running()``); this asks the machine, from the runnable count in
        ``/proc/loadavg`` (~2 µs). False where that cannot be read."""
        if self._loadavg < 0:
            try:
                self._loadavg = os.open(self.LOADAVG, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        try:
            running = int(os.pread(self._loadavg, 128, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            return False
        return running > self._cpus

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        while not self.stopping:
            if not self._spinners:
                self.poll_once(None)
                continue
            self.poll_once(0)  # the fds between slices: never blind while spinning
            self.cpu_contended = yield_cpu()
            for key, poller in list(self._spinners.items()):
                if self.stopping:
                    break
                if self._spinners.get(key) is not poller:
                    continue  # removed or replaced by an earlier one this round
                if not poller() and self._spinners.get(key) is poller:
                    del self._spinners[key]

    def poll_once(self, timeout: float | None) -> int:
        """Wait up to ``timeout`` (None: until something happens, 0: don't wait), run the
        callbacks of every ready fd and due timer; returns how many ran."""
        if self._timers:
            due_in = max(0.0, min(t for t, _ in self._timers) - time.monotonic())
            timeout = due_in if timeout is None else min(timeout, due_in)
        ran = 0
        callbacks = self._callbacks
        for fd, _ in self._epoll.poll(-1 if timeout is None else timeout):
            if fd not in callbacks:
                continue  # unwatched by an earlier callback of this wakeup
            callback = callbacks[fd]
            if callback is None:
                self.stopping = True
                break
            callback()
            ran += 1
            if self.stopping:
                break
        if not self._timers:
            return ran
        now = time.monotonic()
        due = [cb for t, cb in self._timers if t <= now]
        self._timers = [(t, cb) for t, cb in self._timers if t > now]
        for cb in due:
            cb()
        return ran + len(due)

    def close(self) -> None:
        self._epoll.close()
        self._callbacks.clear()
        self.stop_fd.close()
        if self._loadavg >= 0:
            os.close(self._loadavg)
            self._loadavg = -1


class ControlPipe:
    """JSON-lines commands in (a non-blocking fd), replies and events out."""

    def __init__(self, infd: int = 0, out: TextIO | None = None) -> None:
        self.infd = infd
        self.out = out if out is not None else sys.stdout
        os.set_blocking(infd, False)
        self._buf = b""
        self.eof = False

    def read_commands(self) -> list[dict[str, Any]]:
        try:
            chunk = os.read(self.infd, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            self.eof = True
            return []
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        cmds: list[dict[str, Any]] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                self.emit({"event": "bad_command", "line": line[:200].decode("replace")})
                continue
            if isinstance(obj, dict):
                cmds.append(obj)
            else:
                self.emit({"event": "bad_command", "line": line[:200].decode("replace")})
        return cmds

    def emit(self, obj: dict[str, Any]) -> None:
        try:
            self.out.write(json.dumps(obj, sort_keys=True) + "\n")
            self.out.flush()
        except BrokenPipeError:  # the parent is gone; the stdin EOF will stop us
            self.eof = True
            if self.out is sys.stdout:
                silence_stdout()


class Agent:
    """Base of guest and device processes: broker notices + control commands."""

    name = "agent"

    def __init__(
        self, channel: Channel, control: ControlPipe, loop: EventLoop | None = None
    ) -> None:
        self.channel = channel
        self.control = control
        self.loop = loop if loop is not None else EventLoop()
        self.exit_code = EXIT_OK
        channel.on_notice = self._on_notice

    # subclasses override these ------------------------------------------------
    def on_attach(self) -> None:
        """Called once attached; attach notices have been handled."""

    def handle_notice(self, msg: wire.Message) -> None:
        msg.close_fds()

    def handle_command(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        """Return a reply dict, or None if the reply will be sent later."""
        raise KeyError(cmd.get("cmd"))

    def main(self) -> None:
        """What the process does once attached; by default, serve events until stopped."""
        self.loop.run()

    def shutdown(self) -> None:
        """Release everything (called once, on every exit path)."""

    # ------------------------------------------------------------------------------
    def _on_notice(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.PeerGone):
            self.emit("peer_gone", kind=wire.PeerKind(msg.kind).name.lower(), id=msg.id)
        self.handle_notice(msg)

    def emit(self, event: str, **fields: Any) -> None:
        self.control.emit({"event": event, **fields})

    def reply(self, cmd: dict[str, Any], ok: bool = True, **fields: Any) -> None:
        self.control.emit({"id": cmd.get("id"), "ok": ok, **fields})

    def _on_channel(self) -> None:
        try:
            self.channel.pump()
        except PeerGoneError as e:
            self.emit("broker_gone", reason=str(e))
            self.exit_code = EXIT_BROKER_GONE
            self.loop.stop()
        except ProtocolError as e:
            log.error("the broker broke the protocol: %s", e)
            self.emit("protocol_error", reason=str(e))
            self.exit_code = EXIT_ERROR
            self.loop.stop()

    def _on_control(self) -> None:
        for cmd in self.control.read_commands():
            if cmd.get("cmd") == "quit":
                self.reply(cmd)
                self.loop.stop()
                return
            try:
                result = self.handle_command(cmd)
            except KeyError as e:
                self.reply(cmd, ok=False, error=f"unknown command {e}")
                continue
            except VbusError as e:
                self.reply(cmd, ok=False, error=str(e))
                continue
            if result is not None:
                self.reply(cmd, **result)
        if self.control.eof:
            self.loop.stop()

    def start(self, *, control: bool = True) -> bool:
        """Attach and start watching the channel (and the control pipe if ``control``).
        False if the broker is already gone."""
        try:
            self.channel.attach()
        except PeerGoneError as e:
            self.emit("broker_gone", reason=str(e))
            self.exit_code = EXIT_BROKER_GONE
            return False
        except BrokerError as e:
            # Refused: the VM or device was destroyed before we attached (a restart racing
            # a teardown), or another process holds it. Nothing to serve: say so and exit.
            log.error("attach refused: %s", e)
            self.emit("attach_refused", errno=e.name, reason=str(e))
            self.exit_code = EXIT_ERROR
            return False
        self.on_attach()
        self.emit("attached", pid=os.getpid())
        self.loop.watch(self.channel.fileno(), self._on_channel)
        if control:
            self.loop.watch(self.control.infd, self._on_control)
        self._on_channel()  # notices that arrived with the attach reply
        return True

    def close(self) -> None:
        self.shutdown()
        self.channel.close()

    def run(self) -> int:
        self.loop.install_signal_handlers()
        try:
            if self.start():
                self.main()
            return self.exit_code
        finally:
            self.close()
            self.loop.close()


def run_group(agents: list[Agent], loop: EventLoop) -> int:
    """Run several agents sharing one loop in one process (a switch serving many ports).
    The first agent owns the control pipe; the worst exit code wins."""
    loop.install_signal_handlers()
    started: list[Agent] = []
    try:
        for i, agent in enumerate(agents):
            if not agent.start(control=i == 0):
                break
            started.append(agent)
        if len(started) == len(agents):
            loop.run()
        return max(agent.exit_code for agent in agents)
    finally:
        for agent in agents:
            agent.close()
        loop.close()


def silence_stdout() -> None:
    """After EPIPE on stdout: point it at /dev/null, so that the buffered rest is dropped
    at exit instead of reported (no "Exception ignored ... BrokenPipeError" on stderr)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)


def setup_logging(name: str) -> None:
    """Log lines to stderr as ``name: LEVEL message``."""
    logging.basicConfig(
        level=os.environ.get("VBUSEMU_LOG", "WARNING").upper(),
        format=f"{name}[%(process)d]: %(levelname)s %(message)s",
        stream=sys.stderr,
    )
