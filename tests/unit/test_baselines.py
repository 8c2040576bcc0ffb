"""Smoke tests for hostemu.bench.baselines: every baseline runs, returns sane numbers, and
cleans up (the autouse leak guard checks fds, children and /dev/shm after each test).

Durations are tiny and nothing here asserts on speed.
"""

from __future__ import annotations

import math
import os
import time

import pytest

from hostemu.bench import baselines
from tests import timing

SECONDS = 0.2


def positive_finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("kind", baselines.SMALL_KINDS)
@pytest.mark.parametrize("batch", [1, 16])
def test_small_messages(kind: str, batch: int) -> None:
    assert positive_finite(baselines.small_messages(kind, 64, batch, SECONDS))


@pytest.mark.parametrize("kind", baselines.SMALL_KINDS)
@pytest.mark.parametrize("batch", [1, 16])
def test_small_messages_pipelined(kind: str, batch: int) -> None:
    """A window wider than the batch: acks per batch, up to 64 messages in flight."""
    assert positive_finite(baselines.small_messages(kind, 64, batch, SECONDS, window=64))


@pytest.mark.parametrize("kind", baselines.ROUND_TRIP_KINDS)
def test_round_trip(kind: str) -> None:
    rtts = baselines.round_trip(kind, 64, 50)
    assert len(rtts) == 50
    assert all(positive_finite(x) for x in rtts)


def _placements() -> list[tuple[int, int]]:
    cpus = sorted(os.sched_getaffinity(0))
    return [(cpus[0], cpus[0])] + ([(cpus[0], cpus[1])] if len(cpus) > 1 else [])


@pytest.mark.parametrize("cpus", _placements(), ids=lambda c: f"cpus{c[0]}-{c[1]}")
def test_round_trip_pinned(cpus: tuple[int, int]) -> None:
    before = os.sched_getaffinity(0)
    rtts = baselines.round_trip("eventfd", 64, 50, cpus=cpus)
    assert len(rtts) == 50 and all(positive_finite(x) for x in rtts)
    assert os.sched_getaffinity(0) == before  # the children pin themselves, not the caller


@pytest.mark.parametrize("kind", baselines.BULK_KINDS)
@pytest.mark.parametrize("size", [64 << 10, 1 << 20])
def test_bulk(kind: str, size: int) -> None:
    assert positive_finite(baselines.bulk(kind, size, SECONDS))


def test_bulk_odd_size() -> None:
    """A size that is not a multiple of the socket's chunking still adds up exactly."""
    assert positive_finite(baselines.bulk("socketpair", 100_003, SECONDS))


def test_machine_info() -> None:
    info = baselines.machine_info()
    assert {"cores", "cpu_model", "kernel", "python", "numpy"} <= set(info)
    assert isinstance(info["cores"], int) and info["cores"] >= 1
    assert all(
        isinstance(info[k], str) and info[k] for k in ("cpu_model", "kernel", "python", "numpy")
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: baselines.small_messages("pipes", 64, 1, SECONDS),
        lambda: baselines.small_messages("eventfd", 64, 1, SECONDS),
        lambda: baselines.small_messages("pipe", 0, 1, SECONDS),
        lambda: baselines.small_messages("socketpair", baselines.MAX_SMALL_PAYLOAD + 1, 1, 1.0),
        lambda: baselines.small_messages("pipe", 64, 0, SECONDS),
        lambda: baselines.small_messages("pipe", 64, 1, 0.0),
        lambda: baselines.small_messages("pipe", 64, 1, math.inf),
        lambda: baselines.round_trip("queue", 64, 10),
        lambda: baselines.round_trip("eventfd", 64, 0),
        lambda: baselines.round_trip("pipe", 0, 10),
        lambda: baselines.round_trip("eventfd", 64, 10, cpus=(0, 1 << 20)),
        lambda: baselines.round_trip("eventfd", 64, 10, cpus=(0,)),  # type: ignore[arg-type]
        lambda: baselines.small_messages("pipe", 64, 16, SECONDS, window=24),
        lambda: baselines.small_messages("pipe", 64, 16, SECONDS, window=8),
        lambda: baselines.bulk("queue", 1 << 16, SECONDS),
        lambda: baselines.bulk("pipe", 0, SECONDS),
        lambda: baselines.bulk("numpy-copy", 1 << 16, -1.0),
        lambda: baselines.bulk("pipe", True, SECONDS),
    ],
    ids=[
        "small-kind",
        "small-kind-eventfd",
        "small-payload",
        "small-payload-big",
        "small-batch",
        "small-seconds",
        "small-inf",
        "rtt-kind",
        "rtt-samples",
        "rtt-payload",
        "rtt-cpu",
        "rtt-cpus-one",
        "small-window-multiple",
        "small-window-below-batch",
        "bulk-kind",
        "bulk-size",
        "bulk-seconds",
        "bulk-bool",
    ],
)
def test_bad_arguments(call: object) -> None:
    assert callable(call)
    with pytest.raises(ValueError):
        call()


def _boom() -> object:
    raise OSError("injected")


def _hang() -> object:
    time.sleep(3600)  # until killed
    return None


def test_failing_child_is_reported_and_peer_killed() -> None:
    """A child that raises fails the call (not the timeout: a RuntimeError); its stuck
    peer is killed, not waited for; nothing leaks."""
    with (
        pytest.raises(RuntimeError, match="injected"),
        timing.within(10.0, "reporting the failure and killing the stuck peer"),
    ):
        baselines._run([(_boom, []), (_hang, [])], timeout=timing.scaled(30.0))


def test_stuck_children_time_out() -> None:
    with pytest.raises(TimeoutError):
        baselines._run([(_hang, []), (_hang, [])], timeout=0.3)
