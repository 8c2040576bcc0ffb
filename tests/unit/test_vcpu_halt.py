"""The vCPU's halt: it polls its condition for the configured window -- unless tasks
wait for a CPU, when it sleeps at once (as KVM's halt-poll stops when its CPU has other
work) -- and sleeps in the event loop otherwise."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestemu.vcpu import Vcpu
from shared.loop import EventLoop


class _Agent:
    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.devices_gone: dict[int, float] = {}
        self.device_grace = 5.0


@pytest.fixture
def loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EventLoop]:
    monkeypatch.setattr(EventLoop, "LOADAVG", str(tmp_path / "loadavg"))
    ev = EventLoop()
    ev._cpus = 2
    yield ev
    ev.close()


def _runnable(tmp_path: Path, n: int) -> None:
    (tmp_path / "loadavg").write_bytes(f"0.10 0.10 0.10 {n}/99 1234\n".encode())


def test_a_halt_polls_when_cpus_are_free(loop: EventLoop, tmp_path: Path) -> None:
    _runnable(tmp_path, 2)
    vcpu = Vcpu(_Agent(loop), halt_poll_ns=10_000_000_000)  # type: ignore[arg-type]
    calls = [0]

    def until() -> bool:
        calls[0] += 1
        return calls[0] >= 2  # false on entry, true at the next look

    assert vcpu.halt(until, timeout=30.0)
    # it polled: the look came in the window -- or, on a busy machine, its first yield
    # found the CPU wanted and it went to sleep (where the look came)
    c = vcpu.counters
    assert c["halt_polls_ok"] + c["halt_polls_contended"] == 1
    assert "halt_polls_skipped" not in c


def test_a_halt_sleeps_at_once_when_tasks_wait_for_a_cpu(loop: EventLoop, tmp_path: Path) -> None:
    _runnable(tmp_path, 3)
    vcpu = Vcpu(_Agent(loop), halt_poll_ns=10_000_000_000)  # type: ignore[arg-type]
    woken: list[Any] = []
    loop.call_at(time.monotonic(), lambda: woken.append(1))  # what the sleep wakes on

    assert vcpu.halt(lambda: bool(woken), timeout=30.0)
    assert vcpu.counters["halt_polls_skipped"] == 1
    assert vcpu.counters["halts"] == 1 and "halt_polls_ok" not in vcpu.counters


def test_a_halt_without_a_window_never_reads_the_load(loop: EventLoop, tmp_path: Path) -> None:
    _runnable(tmp_path, 3)
    vcpu = Vcpu(_Agent(loop), halt_poll_ns=0)  # type: ignore[arg-type]
    woken: list[Any] = []
    loop.call_at(time.monotonic(), lambda: woken.append(1))
    assert vcpu.halt(lambda: bool(woken), timeout=30.0)
    assert "halt_polls_skipped" not in vcpu.counters and vcpu.counters["halts"] == 1
    assert loop._loadavg == -1
