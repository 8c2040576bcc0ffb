"""The memory-ordering intrinsics: values, checks, and the instructions they compile to.

The compiled-code tests look at what LLVM actually emitted, so they fail if a fence or an
atomic goes missing -- and a control kernel without the fence call shows that the
fence test can fail (numba's own reference counting uses ``lock inc/dec`` and
``fence acquire/release``, which must not be mistaken for the fence we asked for).
"""

from __future__ import annotations

import platform
import re
from typing import Any

import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from shared.virtio.atomics import (
    fence_seq_cst,
    load_acquire_u16,
    load_acquire_u16_unchecked,
    load_acquire_u32,
    load_acquire_u64,
    store_release_u16,
    store_release_u16_unchecked,
    store_release_u32,
    store_release_u64,
)

pytestmark = pytest.mark.timeout(240)  # first compile on a loaded machine takes seconds

X86 = platform.machine() in ("x86_64", "AMD64", "i686")
FULL_FENCE_ASM = re.compile(r"\bmfence\b|\block\s+or[bwlq]?\b|\bxchg[bwlq]?\b")


@njit(nogil=True)
def publish_then_check(mine: Any, theirs: Any, value: int) -> int:
    """The ring's decision point: publish our index, fence, read the peer's."""
    store_release_u16(mine, 0, value)
    fence_seq_cst()
    return load_acquire_u16(theirs, 0)  # type: ignore[no-any-return]


@njit(nogil=True)
def publish_then_check_no_fence(mine: Any, theirs: Any, value: int) -> int:
    store_release_u16(mine, 0, value)
    return load_acquire_u16(theirs, 0)  # type: ignore[no-any-return]


@njit(nogil=True)
def publish_unchecked(mine: Any, theirs: Any, value: int) -> int:
    store_release_u16_unchecked(mine, 0, value)
    fence_seq_cst()
    return load_acquire_u16_unchecked(theirs, 0)  # type: ignore[no-any-return]


@njit(nogil=True)
def wide(a32: Any, a64: Any) -> int:
    store_release_u32(a32, 1, 0xDEADBEEF)
    store_release_u64(a64, 1, 0x0123456789ABCDEF)
    fence_seq_cst()
    return load_acquire_u32(a32, 1) + load_acquire_u64(a64, 1)  # type: ignore[no-any-return]


def _compiled(kernel: Any, *args: Any) -> tuple[str, str]:
    kernel(*args)
    sig = kernel.signatures[-1]
    return kernel.inspect_llvm(sig), kernel.inspect_asm(sig)


def _args() -> tuple[Any, Any, int]:
    return np.zeros(4, np.uint16), np.full(4, 7, np.uint16), 5


def test_values_round_trip_and_wrap() -> None:
    mine, theirs, _ = _args()
    assert publish_then_check(mine, theirs, 0x1_0005) == 7
    assert mine[0] == 5  # wrapped modulo 2**16, like numpy assignment
    a32, a64 = np.zeros(2, np.uint32), np.zeros(2, np.uint64)
    assert wide(a32, a64) == 0xDEADBEEF + 0x0123456789ABCDEF
    assert a32[1] == 0xDEADBEEF and a64[1] == 0x0123456789ABCDEF
    assert load_acquire_u16(theirs, 3) == 7  # the wrappers work from Python too


def test_checked_wrappers_reject_out_of_bounds() -> None:
    a = np.zeros(4, np.uint16)
    for index in (4, -1, 1 << 40):
        with pytest.raises(IndexError, match="out of bounds"):
            load_acquire_u16(a, index)
        with pytest.raises(IndexError, match="out of bounds"):
            store_release_u16(a, index, 1)
    assert not a.any()


def test_checked_wrappers_reject_misaligned_elements() -> None:
    raw = np.zeros(20, np.uint8)
    odd16 = raw[1:9].view(np.uint16)
    odd32 = raw[2:10].view(np.uint32)
    odd64 = raw[4:20].view(np.uint64)
    with pytest.raises(ValueError, match="2-byte aligned"):
        load_acquire_u16(odd16, 0)
    with pytest.raises(ValueError, match="4-byte aligned"):
        store_release_u32(odd32, 0, 1)
    with pytest.raises(ValueError, match="8-byte aligned"):
        store_release_u64(odd64, 0, 1)
    assert not raw.any()


def test_wrong_dtype_is_a_typing_error() -> None:
    with pytest.raises(TypingError):
        load_acquire_u16(np.zeros(2, np.uint32), 0)
    with pytest.raises(TypingError):
        store_release_u32(np.zeros(2, np.int64), 0, 1)


def test_read_only_array_cannot_be_stored_to() -> None:
    a = np.zeros(2, np.uint16)
    a.flags.writeable = False
    assert load_acquire_u16(a, 1) == 0
    with pytest.raises(TypingError):
        store_release_u16(a, 0, 1)


@pytest.mark.parametrize("kernel", [publish_then_check, publish_unchecked])
def test_llvm_ir_has_release_store_acquire_load_and_fence(kernel: Any) -> None:
    ir, _ = _compiled(kernel, *_args())
    assert re.search(r"store atomic i16 .* release, align 2", ir), ir
    assert re.search(r"load atomic i16, ptr .* acquire, align 2", ir), ir
    assert "fence seq_cst" in ir


def test_llvm_ir_without_the_fence_call_has_no_fence() -> None:
    ir, _ = _compiled(publish_then_check_no_fence, *_args())
    assert re.search(r"store atomic i16 .* release", ir)
    assert re.search(r"load atomic i16, ptr .* acquire", ir)
    assert "fence seq_cst" not in ir


@pytest.mark.skipif(not X86, reason="x86 instruction names")
def test_x86_asm_fence_is_a_full_barrier_and_the_index_store_a_plain_mov() -> None:
    _, asm = _compiled(publish_then_check, *_args())
    fences = [line.strip() for line in asm.splitlines() if FULL_FENCE_ASM.search(line)]
    assert fences, asm
    assert re.search(r"\bmovw\s+%\w+, \(", asm), asm  # the release store: a plain 16-bit mov


@pytest.mark.skipif(not X86, reason="x86 instruction names")
def test_x86_asm_without_the_fence_call_has_no_barrier() -> None:
    _, asm = _compiled(publish_then_check_no_fence, *_args())
    fences = [line.strip() for line in asm.splitlines() if FULL_FENCE_ASM.search(line)]
    assert fences == []
