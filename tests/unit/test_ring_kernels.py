"""The compiled kernels against the reference ring: the same random and hostile programs
(batch sizes from 1 to the queue size, indices wrapping past 2**16, suppression on and off,
descriptors and ring entries rewritten, index jumps, heads re-posted, used entries forged)
on a side whose batches go to the kernels and a side that runs the numpy reference only.
After every step the results, errors, broken reasons, every byte of guest memory and the
private bookkeeping must be identical (:class:`~tests.unit.test_ring_scalar.Twin`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.virtio import INDEX_MASK, DeviceRing, DriverRing, RingLayout
from shared.virtio import compiled as compiled_path
from tests.unit.test_ring_scalar import BUF, SLOT1, Twin, memory, outcome

QSIZES = [1, 2, 4, 8, 16, 64, 256]
STARTS = st.one_of(st.just(0), st.integers(65530, 65535), st.integers(0, INDEX_MASK))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q=st.sampled_from(QSIZES),
    event_idx=st.booleans(),
    start=STARTS,
    seed=st.integers(0, 2**32),
    steps=st.integers(5, 60),
    hostile=st.booleans(),
    scalar=st.booleans(),
)
def test_kernels_agree_with_the_reference(
    q: int, event_idx: bool, start: int, seed: int, steps: int, hostile: bool, scalar: bool
) -> None:
    # scalar=False sends every batch to the kernels; True only those past the scalar path.
    twin = Twin(q, event_idx, start, seed, fast=(scalar, True), slow=(scalar, False))
    for _ in range(steps):
        twin.step(hostile)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count each kernel's calls and the ones it did not decline."""
    calls: Counter[str] = Counter()
    for name in ("device_pop_simple", "device_push_used", "driver_add_simple", "driver_get_used"):
        real = getattr(compiled_path.k, name)

        def counted(*args: Any, _real: Callable[..., int] = real, _name: str = name) -> int:
            result = _real(*args)
            calls[_name] += 1
            calls[f"{_name} done"] += result >= 0
            return result

        monkeypatch.setattr(compiled_path.k, name, counted)
    return calls


@pytest.mark.parametrize("hostile", [False, True])
def test_kernels_agree_seeded_and_do_the_work(hostile: bool, kernel_calls: Counter[str]) -> None:
    """Long deterministic programs (indices wrap on small rings); and the kernels really
    ran -- a differential test where every call declined would prove nothing."""
    rng = random.Random(29)
    for run in range(30):
        twin = Twin(
            rng.choice(QSIZES),
            rng.random() < 0.5,
            rng.choice([0, 65535 - rng.randrange(8), rng.randrange(1 << 16)]),
            run,
            fast=(False, True),
            slow=(False, False),
        )
        for _ in range(200):
            twin.step(hostile)
    for name in ("device_pop_simple", "device_push_used", "driver_add_simple", "driver_get_used"):
        # (hostile programs break most rings early, and a broken ring calls nothing)
        assert kernel_calls[f"{name} done"] > (0 if hostile else 10), (name, kernel_calls)
    if hostile:  # hostile programs make the kernels decline, and the reference takes over
        assert kernel_calls["device_pop_simple"] > kernel_calls["device_pop_simple done"]


def _copy_world(jit: bool, seed: int) -> tuple[Any, ...]:
    """A TX and an RX ring in one memory (two slots), random buffers -- overlapping ones,
    ones in the second slot, writable sources -- posted, popped and copied across."""
    rng = random.Random(seed)
    mem = memory()
    rings = []
    for base in (0x0000, 0x4000):
        layout = RingLayout(64)
        driver = DriverRing(mem.translate(base, layout.size), layout, event_idx=True, jit=jit)
        device = DeviceRing.from_layout(mem, base, layout, event_idx=True, jit=jit)
        rings.append((driver, device))
    (txd, tx), (rxd, rx) = rings
    n = rng.choice([5, 8, 17, 40, 64])

    def buffers(writable: bool) -> None:
        drv = rxd if writable else txd
        for _ in range(n):
            if rng.random() < 0.1:
                addr = SLOT1 + rng.randrange(0, 0x800)
            else:
                addr = BUF + rng.randrange(0, 0x8000)
            flag = writable if rng.random() < 0.95 else not writable
            drv.add_batch([addr], [rng.randrange(1, 300)], flag)

    buffers(False)
    buffers(True)
    sent, room = tx.pop_batch(), rx.pop_batch()
    width = rng.choice([0, 1, 64, 300])
    copied = outcome(tx.copy_payloads, sent, rx, room, width)
    return copied, tx.broken, rx.broken, b"".join(mem.read(s.gpa, s.size) for s in mem.slots())


@pytest.mark.parametrize("seed", range(60))
def test_copy_kernel_agrees_with_the_reference(seed: int) -> None:
    assert _copy_world(True, seed) == _copy_world(False, seed)


def _llvm(kernel: Any) -> str:
    """The LLVM IR of ``kernel`` for the signatures the rings use. Code loaded from the
    cache cannot be inspected, so the same Python function is compiled afresh."""
    from numba import njit

    from shared.virtio.warm import exercise

    exercise()
    fresh = njit(nogil=True)(kernel.py_func)
    for signature in kernel.signatures:
        fresh.compile(signature)
    return "\n".join(fresh.inspect_llvm().values())


def test_kernels_publish_with_release_and_fence_before_deciding() -> None:
    from shared.virtio import kernels

    push = _llvm(kernels.device_push_used)
    assert "store atomic i16" in push and " release" in push
    assert "fence seq_cst" in push  # used.idx, then used_event: a store->load point
    assert "load atomic i16" in push and " acquire" in push
    add = _llvm(kernels.driver_add_simple)
    assert "store atomic i16" in add and " release" in add
    # The driver's own publish needs no fence there: kick_needed is the decision point.
    assert "fence seq_cst" not in add
