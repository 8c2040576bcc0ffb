"""Store-buffering litmus test for the ordering intrinsics, across two real processes.

Each round r, side A stores ``x = r``, fences, loads ``y``; side B stores ``y = r``,
fences, loads ``x``. If both read a value from before round r, each side's store was
still invisible to the other when its load ran: the store->load reordering that the
store buffer allows on x86 (and that release/acquire alone permit). This is exactly the
split ring's "publish, then decide whether to notify" against "re-enable notifications,
then re-check": a violation there is a lost wakeup.

The two sides are forked processes pinned to two different CPUs, sharing an anonymous
``MAP_SHARED`` mapping viewed as numpy arrays (like guest memory). Rounds are separated by
a two-party barrier in the same memory (each side release-stores the round it finished
and acquire-loads the other's). The spinning happens inside the kernel for a bounded
number of iterations; then the kernel returns to Python, which checks a deadline and
yields the CPU (a descheduled peer gets to run) before going on.

With the fence no round may be a violation. Without it -- run it with
``VBUSEMU_LITMUS_NOFENCE=1`` -- about 0.1-0.3 % of rounds are violations on x86, the first
within tens to a few thousand rounds; that depends on timing, so the normal suite does not
assert on it.
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from numba import njit

from shared.virtio.atomics import (
    fence_seq_cst,
    load_acquire_u32_unchecked,
    store_release_u32_unchecked,
)
from tests.fault.racekit import scale, scaled

LINE = 16  # u32 words per 64-byte cache line: every control word on its own line
X, Y, DONE_A, DONE_B, START, STUCK_A, STUCK_B = (i * LINE for i in range(7))
CTL_WORDS = 7 * LINE
SPIN_BUDGET = 20_000  # spins inside the kernel before returning to Python to yield
DEADLINE = 150.0  # seconds per side (times VBUSEMU_ROUNDS); a quiet machine needs ~1 s


@njit(nogil=True)
def run_side(
    ctl: Any, obs: Any, state: Any, me: int, rounds: int, spin_budget: int, use_fence: bool
) -> bool:
    """Play rounds ``state[0]..rounds`` for side ``me`` (0 = A, 1 = B).

    ``state`` is ``[round, phase]``: phase 0 = do the litmus step, 1 = wait at the
    barrier. Returns True when every round is done, False when the spin budget ran out
    (``state`` says where to resume).
    """
    mine, theirs = (X, Y) if me == 0 else (Y, X)
    my_done, their_done = (DONE_A, DONE_B) if me == 0 else (DONE_B, DONE_A)
    r, phase = state[0], state[1]
    spins = 0
    while r <= rounds:
        if phase == 0:
            store_release_u32_unchecked(ctl, mine, r)
            if use_fence:
                fence_seq_cst()
            seen = load_acquire_u32_unchecked(ctl, theirs)
            obs[r - 1] = 1 if seen != r else 0  # the peer's store of round r not yet seen
            store_release_u32_unchecked(ctl, my_done, r)
            phase = 1
        while load_acquire_u32_unchecked(ctl, their_done) < r:
            spins += 1
            if spins >= spin_budget:
                state[0], state[1] = r, phase
                return False
        r += 1
        phase = 0
    state[0], state[1] = r, 0
    return True


def _side(ctl: Any, obs: Any, me: int, rounds: int, use_fence: bool, cpu: int) -> int:
    """A child's life: pin, wait for the start signal, play every round. Exit status."""
    os.sched_setaffinity(0, {cpu})
    deadline = time.monotonic() + DEADLINE * scale()
    while ctl[START] == 0:
        if time.monotonic() > deadline:
            return 3
        os.sched_yield()
    state = np.array([1, 0], np.int64)
    while not run_side(ctl, obs, state, me, rounds, SPIN_BUDGET, use_fence):
        if time.monotonic() > deadline:
            ctl[STUCK_A if me == 0 else STUCK_B] = state[0]
            return 3
        os.sched_yield()
    return 0


@dataclass
class Outcome:
    rounds: int
    violations: int
    first_violation: int | None
    a_stale: int
    b_stale: int
    seconds: float


def run_litmus(rounds: int, *, use_fence: bool) -> Outcome:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("the store-buffering litmus test needs two CPUs")
    size = CTL_WORDS * 4 + 2 * rounds
    # Not closed explicitly: numba may still hold a view; the mapping goes with the last one.
    mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
    ctl = np.frombuffer(mem, np.uint32, CTL_WORDS)
    obs_a = np.frombuffer(mem, np.uint8, rounds, CTL_WORDS * 4)
    obs_b = np.frombuffer(mem, np.uint8, rounds, CTL_WORDS * 4 + rounds)
    # compile before forking, so the children share the machine code
    run_side(ctl, obs_a, np.array([1, 0], np.int64), 0, 0, 1, use_fence)
    pids: dict[int, str] = {}
    try:
        for me, obs, cpu, name in ((0, obs_a, cpus[0], "A"), (1, obs_b, cpus[1], "B")):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                status = 4
                try:
                    status = _side(ctl, obs, me, rounds, use_fence, cpu)
                finally:
                    os._exit(status)
            pids[pid] = name
        start = time.monotonic()
        ctl[START] = 1
        statuses = _reap(pids, DEADLINE * scale() + 30.0)
        seconds = time.monotonic() - start
    finally:
        for pid in pids:  # only if something above failed part-way
            _kill_and_reap(pid)
    stuck = {n: s for n, s in statuses.items() if s != 0}
    assert not stuck, (
        f"litmus sides did not finish: exit statuses {stuck} (3 = deadline); "
        f"A stuck at round {ctl[STUCK_A]}, B at round {ctl[STUCK_B]}, "
        f"rounds done A={ctl[DONE_A]} B={ctl[DONE_B]} of {rounds}"
    )
    both = np.flatnonzero(obs_a & obs_b)
    outcome = Outcome(
        rounds=rounds,
        violations=int(both.size),
        first_violation=int(both[0]) + 1 if both.size else None,
        a_stale=int(obs_a.sum()),
        b_stale=int(obs_b.sum()),
        seconds=seconds,
    )
    return outcome


def _reap(pids: dict[int, str], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    statuses: dict[str, int] = {}
    while pids:
        for pid in list(pids):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                statuses[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
        if pids and time.monotonic() > deadline:
            names = sorted(pids.values())
            for pid in list(pids):
                _kill_and_reap(pid)
                statuses[pids.pop(pid)] = -9
            raise AssertionError(f"litmus sides {names} still running after {timeout:.0f} s")
        time.sleep(0.01)
    return statuses


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _report(label: str, o: Outcome) -> str:
    return (
        f"{label}: {o.violations} violations in {o.rounds} rounds "
        f"(first at round {o.first_violation}); A saw stale {o.a_stale}x, B {o.b_stale}x; "
        f"{o.seconds:.2f} s"
    )


@pytest.mark.timeout(400)
def test_no_store_buffering_violation_with_the_fence() -> None:
    outcome = run_litmus(scaled(300_000), use_fence=True)
    print(_report("with fence", outcome))
    assert outcome.violations == 0, _report("with fence", outcome)


@pytest.mark.timeout(400)
@pytest.mark.skipif(
    os.environ.get("VBUSEMU_LITMUS_NOFENCE") != "1",
    reason="measurement: set VBUSEMU_LITMUS_NOFENCE=1 (result depends on timing)",
)
def test_store_buffering_is_observable_without_the_fence() -> None:
    """Shows the harness can see the reordering at all (so the test above can fail)."""
    outcome = run_litmus(scaled(300_000), use_fence=False)
    print(_report("without fence", outcome))
    assert outcome.violations > 0, _report("without fence", outcome)
