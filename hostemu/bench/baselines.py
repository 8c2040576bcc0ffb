"""Baselines for ``vbusemu bench``: what plain Python IPC achieves on the same machine.

Every baseline uses its mechanism the natural, idiomatic way a Python user would: default
buffer sizes, no CPU pinning, no socket options, no tuning in either direction. Processes
are created with ``multiprocessing.get_context("fork")``; the calling process only starts
them, collects their results and cleans up, so the measured loops run in two fresh
children and the clocks are read (``time.perf_counter``) by one child, always the same side.

What each function measures
---------------------------
``small_messages(kind, payload, batch, seconds, window=batch)`` -> messages per second.
    A sender process sends ``payload``-byte ``bytes`` objects, one at a time, to a
    receiver process, which acks every ``batch`` messages; the sender keeps at most
    ``window`` messages unacknowledged (a multiple of ``batch``): with the default
    ``window == batch`` it waits for the ack of each batch (1 is stop-and-wait), with a
    larger one it pipelines -- ``vbusemu bench`` gives every baseline the same window as
    vbusemu's ring, so a batch means the same thing on both sides: messages per
    notification. It checks the clock once per batch and stops after about
    ``seconds``, then sends an empty message as the end marker. The *receiver*
    measures: from just before it sends "go" to the arrival of the end marker, and
    returns messages received / that time. Kinds:

    * ``"pipe"``: ``a, b = multiprocessing.Pipe()`` (the default, ``duplex=True``, which on
      Linux is an ``AF_UNIX`` ``SOCK_STREAM`` socketpair plus Connection's 4-byte length
      framing), ``send_bytes`` / ``recv_bytes``; acks go back on the same connection.
    * ``"queue"``: two ``multiprocessing.Queue`` (data and acks), ``put`` / ``get``; this
      includes pickling and the per-process feeder thread, as every Queue user pays.
    * ``"socketpair"``: ``socket.socketpair(AF_UNIX, SOCK_SEQPACKET)``, ``send`` /
      ``recv(payload)`` (message boundaries kept by the kernel, no framing in Python).

``round_trip(kind, payload, samples, cpus=None)`` -> ``samples`` round-trip times in seconds.
    A pinger process times each round trip (send one message, wait for the echo); an
    echo process sends every message straight back. ``_WARMUP`` untimed round trips come
    first. Unpinned by default; ``cpus=(a, b)`` pins the pinger to CPU ``a`` and the echo
    process to ``b`` -- a wakeup then is a context switch (``a == b``) or a cross-CPU
    wakeup (``a != b``), the two costs an unpinned pair alternates between at the
    scheduler's whim. Kinds:

    * ``"pipe"``: ``multiprocessing.Pipe()``, ``send_bytes`` / ``recv_bytes`` of
      ``payload`` bytes, echoed unchanged.
    * ``"eventfd"``: two eventfds (ping, pong); ``os.eventfd_write(ping, 1)`` /
      ``os.eventfd_read(pong)`` against ``os.eventfd_read(ping)`` /
      ``os.eventfd_write(pong, 1)``, blocking reads -- the raw kernel wake-up cost that
      irqfd/ioeventfd signalling sits on. An eventfd carries only its 8-byte counter, so
      ``payload`` is validated but not sent.
    * ``"eventfd-poll"``: the same with ``EFD_NONBLOCK`` eventfds and both sides
      busy-polling (retrying on ``BlockingIOError``). Extra information only: it burns a
      core on each side and needs two idle cores to mean anything.

``bulk(kind, size, seconds)`` -> bytes per second.
    A sender process sends the same ``size``-byte ``bytes`` buffer repeatedly to a
    receiver process for about ``seconds`` (clock checked after every buffer); the
    receiver measures from just before "go" until end-of-stream and returns bytes
    received / that time. Kinds:

    * ``"pipe"``: ``multiprocessing.Pipe()``, ``send_bytes`` / ``recv_bytes`` (each
      received buffer is a fresh ``bytes`` object, as Connection gives it); an empty
      message ends the stream.
    * ``"socketpair"``: ``socket.socketpair(AF_UNIX, SOCK_STREAM)``, ``sendall`` and
      ``recv_into`` a preallocated buffer (reassembling whole ``size``-byte buffers);
      ``shutdown(SHUT_WR)`` ends the stream. SOCK_STREAM rather than SOCK_SEQPACKET
      because a SEQPACKET message must fit in the socket send buffer (about 208 KiB by
      default here), so 1 MiB buffers would fail with EMSGSIZE.
    * ``"numpy-copy"``: no second process: ``np.copyto(dst, src)`` of two ``size``-byte
      ``uint8`` arrays in the calling process, repeated; bytes per second counts each
      byte once (``size`` per copy, although memory sees a read and a write). This is
      the memory-bandwidth bound for moving bulk data; note a 64 KiB copy runs mostly in
      the CPU caches, so it bounds a shared-memory path only from above.

``machine_info()`` -> cores, usable cores (affinity), CPU model, kernel, Python and
numpy versions, for the results table.

Hygiene: every function validates its arguments (``ValueError``), and leaves no process,
fd or ``/dev/shm`` entry behind, also on errors: children are joined with a timeout and
killed if stuck, every pipe, socket and eventfd is closed in ``finally`` blocks. A child
that fails makes the call raise ``RuntimeError`` with the child's traceback; a run that
does not finish in time raises ``TimeoutError``.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Protocol

import numpy as np

SMALL_KINDS = ("pipe", "queue", "socketpair")
ROUND_TRIP_KINDS = ("pipe", "eventfd", "eventfd-poll")
BULK_KINDS = ("pipe", "socketpair", "numpy-copy")
MAX_SMALL_PAYLOAD = 64 << 10  # a SEQPACKET message must fit in the default socket buffer

_WARMUP = 10  # untimed round trips before the timed ones
_GRACE = 30.0  # seconds allowed beyond the expected run time before giving up
_JOIN = 10.0  # seconds to wait for a finished child to exit before killing it
_GO = b"g"
_ACK = b"a"
_END = b""

_ctx = multiprocessing.get_context("fork")


class _Closable(Protocol):
    def close(self) -> None: ...


# ---------------------------------------------------------------- argument checks


def _check_kind(kind: str, kinds: Sequence[str]) -> None:
    if kind not in kinds:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(kinds)}")


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_seconds(seconds: float) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"seconds must be a number, got {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be positive and finite, got {seconds}")


# ---------------------------------------------------------------- process plumbing


def _child_main(work: Callable[[], object], result: Connection, drop: Sequence[_Closable]) -> None:
    """Body of each child: close what it must not hold, run ``work``, report."""
    for obj in drop:
        obj.close()
    try:
        outcome: tuple[str, object] = ("ok", work())
    except BaseException:
        outcome = ("err", traceback.format_exc())
    try:
        result.send(outcome)
    finally:
        result.close()


def _run(
    workers: Sequence[tuple[Callable[[], object], Sequence[_Closable]]], timeout: float
) -> list[object]:
    """Run each ``(work, drop)`` in its own forked child; return their results in order.

    ``drop`` lists the objects (channel ends) that child closes before working. Raises
    ``RuntimeError`` if a child fails or dies, ``TimeoutError`` after ``timeout`` seconds;
    either way every child is gone and every result pipe closed when this returns.
    """
    pipes = [_ctx.Pipe(duplex=False) for _ in workers]
    procs: list[BaseProcess] = []
    results: dict[int, object] = {}
    ok = False
    try:
        for i, (work, drop) in enumerate(workers):
            # the child keeps only its own result writer
            others: list[_Closable] = [r for r, _ in pipes]
            others += [w for j, (_, w) in enumerate(pipes) if j != i]
            proc = _ctx.Process(
                target=_child_main,
                args=(work, pipes[i][1], [*drop, *others]),
                name=f"baseline-{i}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        for _, w in pipes:
            w.close()  # so only the children hold writers
        deadline = time.monotonic() + timeout
        pending = set(range(len(workers)))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"baseline did not finish within {timeout:.0f} s")
            waitables = [pipes[i][0] for i in pending] + [procs[i].sentinel for i in pending]
            multiprocessing.connection.wait(waitables, remaining)
            for i in sorted(pending):
                reader = pipes[i][0]
                alive = procs[i].is_alive()  # before poll: a result sent then exit is seen
                if reader.poll():
                    try:
                        status, value = reader.recv()
                    except EOFError:
                        status, value = "err", "exited without a result"
                    if status != "ok":
                        raise RuntimeError(f"baseline child {i} failed:\n{value}")
                    results[i] = value
                    pending.discard(i)
                elif not alive:
                    raise RuntimeError(
                        f"baseline child {i} exited with code {procs[i].exitcode} without a result"
                    )
        ok = True
    finally:
        for child in procs:
            child.join(_JOIN if ok else 0.5)
            if child.is_alive():
                child.kill()
                child.join(_JOIN)
            with contextlib.suppress(ValueError):  # still running: nothing more to do
                child.close()
        for r, w in pipes:
            r.close()
            w.close()
    return [results[i] for i in range(len(workers))]


def _as_int(value: object) -> int:
    if not isinstance(value, int):
        raise RuntimeError(f"baseline child returned {value!r}, expected an int")
    return value


def _as_count_and_time(value: object) -> tuple[int, float]:
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not isinstance(value[0], int)
        or not isinstance(value[1], float)
    ):
        raise RuntimeError(f"baseline child returned {value!r}, expected (count, seconds)")
    return value[0], value[1]


def _rate(count: int, elapsed: float, sent: int, what: str) -> float:
    if count != sent:
        raise RuntimeError(f"receiver got {count} {what}, sender sent {sent}")
    if count <= 0 or elapsed <= 0:
        raise RuntimeError(f"nothing measured ({count} {what} in {elapsed} s)")
    return count / elapsed


# ---------------------------------------------------------------- small messages


def small_messages(
    kind: str, payload: int, batch: int, seconds: float, window: int | None = None
) -> float:
    """Messages per second, sender process -> receiver process, one ack per ``batch``,
    at most ``window`` messages (default: ``batch``) sent and not yet acknowledged.

    ``kind`` is ``"pipe"``, ``"queue"`` or ``"socketpair"`` (see the module docstring);
    ``payload`` is 1..65536 bytes; ``window`` is a multiple of ``batch``.
    """
    _check_kind(kind, SMALL_KINDS)
    _check_int("payload", payload, 1, MAX_SMALL_PAYLOAD)
    _check_int("batch", batch, 1)
    window = batch if window is None else window
    _check_int("window", window, batch)
    if window % batch:
        raise ValueError(f"window must be a multiple of batch ({batch}), got {window}")
    _check_seconds(seconds)
    msg = bytes(payload)
    timeout = seconds + _GRACE

    def sender_loop(send: Callable[[bytes], object], wait: Callable[[], object]) -> int:
        wait()  # "go"
        deadline = time.perf_counter() + seconds
        sent = unacked = 0
        while True:
            for _ in range(batch):
                send(msg)
            sent += batch
            unacked += batch
            while unacked + batch > window:  # no room for another batch: wait for an ack
                wait()
                unacked -= batch
            if time.perf_counter() >= deadline:
                break
        send(_END)
        return sent

    def receiver_loop(
        recv: Callable[[], bytes], ack: Callable[[bytes], object]
    ) -> tuple[int, float]:
        t0 = time.perf_counter()
        ack(_GO)
        count = 0
        while recv():
            for _ in range(batch - 1):
                recv()
            ack(_ACK)
            count += batch
        return count, time.perf_counter() - t0

    if kind == "pipe":
        a, b = _ctx.Pipe()
        try:
            sent, got = _run(
                [
                    (lambda: sender_loop(a.send_bytes, a.recv_bytes), [b]),
                    (lambda: receiver_loop(b.recv_bytes, b.send_bytes), [a]),
                ],
                timeout,
            )
        finally:
            a.close()
            b.close()
    elif kind == "queue":
        data = _ctx.Queue()
        acks = _ctx.Queue()
        try:
            sent, got = _run(
                [
                    (lambda: sender_loop(data.put, acks.get), []),
                    (lambda: receiver_loop(data.get, acks.put), []),
                ],
                timeout,
            )
        finally:
            for q in (data, acks):
                q.close()
                q.join_thread()
    else:
        s, r = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sent, got = _run(
                [
                    (lambda: sender_loop(s.send, lambda: s.recv(16)), [r]),
                    (lambda: receiver_loop(lambda: r.recv(payload), r.send), [s]),
                ],
                timeout,
            )
        finally:
            s.close()
            r.close()
    count, elapsed = _as_count_and_time(got)
    return _rate(count, elapsed, _as_int(sent), "messages")


# ---------------------------------------------------------------- round trip


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def round_trip(
    kind: str, payload: int, samples: int, cpus: tuple[int, int] | None = None
) -> list[float]:
    """``samples`` round-trip times in seconds between two processes.

    ``kind`` is ``"pipe"``, ``"eventfd"`` or ``"eventfd-poll"`` (the last is extra
    information only; see the module docstring). ``payload`` (>= 1 bytes) is what a
    pipe message carries; eventfds carry only their 8-byte counter. ``cpus``, if given,
    pins the pinger and the echo process to those CPUs (the same one twice: both share
    it); by default the kernel places them, as it places any two processes.
    """
    _check_kind(kind, ROUND_TRIP_KINDS)
    _check_int("payload", payload, 1)
    _check_int("samples", samples, 1)
    allowed = os.sched_getaffinity(0)
    if cpus is not None and (len(cpus) != 2 or not set(cpus) <= allowed):
        raise ValueError(f"cpus must be two of the usable CPUs {sorted(allowed)}, got {cpus!r}")
    pin_pinger, pin_echo = cpus if cpus is not None else (None, None)
    rounds = _WARMUP + samples
    timeout = _GRACE + 0.02 * rounds
    got: object
    if kind == "pipe":
        msg = bytes(payload)
        a, b = _ctx.Pipe()

        def pipe_pinger() -> list[float]:
            _pin(pin_pinger)
            rtts = []
            for i in range(rounds):
                t0 = time.perf_counter()
                a.send_bytes(msg)
                a.recv_bytes()
                t1 = time.perf_counter()
                if i >= _WARMUP:
                    rtts.append(t1 - t0)
            return rtts

        def pipe_echo() -> None:
            _pin(pin_echo)
            for _ in range(rounds):
                b.send_bytes(b.recv_bytes())

        try:
            got, _ = _run([(pipe_pinger, [b]), (pipe_echo, [a])], timeout)
        finally:
            a.close()
            b.close()
    else:
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if kind == "eventfd-poll" else 0)
        fds: list[int] = []
        try:
            fds.append(os.eventfd(0, flags))
            fds.append(os.eventfd(0, flags))
            ping, pong = fds
            read: Callable[[int], int] = os.eventfd_read if kind == "eventfd" else _spin_read

            def efd_pinger() -> list[float]:
                _pin(pin_pinger)
                rtts = []
                for i in range(rounds):
                    t0 = time.perf_counter()
                    os.eventfd_write(ping, 1)
                    read(pong)
                    t1 = time.perf_counter()
                    if i >= _WARMUP:
                        rtts.append(t1 - t0)
                return rtts

            def efd_echo() -> None:
                _pin(pin_echo)
                for _ in range(rounds):
                    read(ping)
                    os.eventfd_write(pong, 1)

            got, _ = _run([(efd_pinger, []), (efd_echo, [])], timeout)
        finally:
            for fd in fds:
                os.close(fd)
    if not isinstance(got, list) or len(got) != samples:
        raise RuntimeError(f"pinger returned {got!r}, expected {samples} samples")
    return [float(x) for x in got]


def _spin_read(fd: int) -> int:
    """Busy-poll a non-blocking eventfd until it can be read."""
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            pass


# ---------------------------------------------------------------- bulk


def bulk(kind: str, size: int, seconds: float) -> float:
    """Bytes per second moving ``size``-byte buffers for about ``seconds``.

    ``kind`` is ``"pipe"`` or ``"socketpair"`` (process to process) or ``"numpy-copy"``
    (in-process memory bandwidth); see the module docstring.
    """
    _check_kind(kind, BULK_KINDS)
    _check_int("size", size, 1)
    _check_seconds(seconds)
    if kind == "numpy-copy":
        return _numpy_copy(size, seconds)
    buf = bytes(size)
    timeout = seconds + _GRACE
    if kind == "pipe":
        a, b = _ctx.Pipe()

        def pipe_sender() -> int:
            a.recv_bytes()  # "go"
            deadline = time.perf_counter() + seconds
            sent = 0
            while time.perf_counter() < deadline:
                a.send_bytes(buf)
                sent += size
            a.send_bytes(_END)
            return sent

        def pipe_receiver() -> tuple[int, float]:
            t0 = time.perf_counter()
            b.send_bytes(_GO)
            total = 0
            while m := b.recv_bytes():
                total += len(m)
            return total, time.perf_counter() - t0

        try:
            sent, got = _run([(pipe_sender, [b]), (pipe_receiver, [a])], timeout)
        finally:
            a.close()
            b.close()
    else:
        s, r = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def sock_sender() -> int:
            s.recv(1)  # "go"
            deadline = time.perf_counter() + seconds
            sent = 0
            while time.perf_counter() < deadline:
                s.sendall(buf)
                sent += size
            s.shutdown(socket.SHUT_WR)
            return sent

        def sock_receiver() -> tuple[int, float]:
            into = memoryview(bytearray(size))
            t0 = time.perf_counter()
            r.sendall(_GO)
            total = 0
            filled = 0
            while n := r.recv_into(into[filled:]):
                total += n
                filled = (filled + n) % size  # a whole buffer assembled: start the next
            return total, time.perf_counter() - t0

        try:
            sent, got = _run([(sock_sender, [r]), (sock_receiver, [s])], timeout)
        finally:
            s.close()
            r.close()
    total, elapsed = _as_count_and_time(got)
    return _rate(total, elapsed, _as_int(sent), "bytes")


def _numpy_copy(size: int, seconds: float) -> float:
    src = np.full(size, 0xA5, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault in dst's pages before timing
    reps = max(1, (16 << 20) // size)  # read the clock about every 16 MiB copied
    copies = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(reps):
            np.copyto(dst, src)
        copies += reps
        t1 = time.perf_counter()
        if t1 >= deadline:
            break
    return copies * size / (t1 - t0)


# ---------------------------------------------------------------- machine


def machine_info() -> dict[str, str | int | None]:
    """Cores, usable cores, CPU model, kernel, Python and numpy versions."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu_model": model,
        "kernel": os.uname().release,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
