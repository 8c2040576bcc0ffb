"""Memory-ordering primitives for numba kernels that share memory with another process.

The virtio split ring lives in memory that two processes (driver and device) touch at once.
Plain loads and stores are not enough there: the compiler may move, merge or hoist them,
and the CPU may make them visible to the other side in a different order. These
intrinsics emit LLVM atomics and fences, so both the compiler and the CPU are bound by
them; nothing here relies on numba or LLVM "happening not to" reorder plain accesses.

Which ordering each ring step needs
-----------------------------------

* **Publish an index** (driver: ``avail.idx`` after filling descriptors and
  ``avail.ring``; device: ``used.idx`` after filling ``used.ring``): a **release store**
  (:func:`store_release_u16`). Every write before it -- descriptors, ring entries,
  payload -- is visible to a peer that sees the new index.
* **Read the peer's index** (device: ``avail.idx``; driver: ``used.idx``): an **acquire
  load** (:func:`load_acquire_u16`). Nothing read after it (ring entries, descriptors,
  payload) can be a value from before the peer published that index. Poll loops must
  use it too: an atomic load is re-executed every iteration, a plain one may be hoisted
  out of the loop.
* **Every store -> load decision point**: a **sequentially consistent fence**
  (:func:`fence_seq_cst`) between the store and the load. There are two in a split ring
  with or without EVENT_IDX, and both sides have them:

  - *publish, then decide whether to notify*: the driver stores ``avail.idx`` and then
    loads ``avail_event`` / ``used.flags`` to decide whether to kick; the device stores
    ``used.idx`` and then loads ``used_event`` / ``avail.flags`` to decide whether to
    interrupt.
  - *re-enable notifications, then re-check before sleeping*: the consumer stores its
    ``*_event`` (or clears its NO_NOTIFY / NO_INTERRUPT flag) and then loads the
    producer's index once more before it sleeps.

  These pair up as the classic store-buffering (Dekker) pattern: each side stores, then
  reads what the other side stored. Without both fences both sides can read the old
  value -- the producer concludes "the consumer is polling, no notification needed", the
  consumer concludes "nothing new, go to sleep" -- and the wakeup is lost for good.

Why x86 needs the fence
-----------------------

x86 is "total store order", which still allows one reordering: a store followed by a
load of a *different* address. A store first goes into the core's store buffer and only
later drains to the cache, where other cores can see it; a later load is served from the
cache (or from the store buffer for the same address) without waiting for the drain. So
the load can effectively happen before the store becomes visible. Release and acquire do
not forbid that (neither in C11/LLVM nor on the CPU), and on x86 they compile to plain
``mov`` instructions. ``fence seq_cst`` compiles to ``mfence`` (or a ``lock``-prefixed
instruction), which drains the store buffer before any later load executes. On aarch64
the same code gives ``stlr`` / ``ldar`` / ``dmb ish``.

Usage and contract
------------------

Call these only from ``@njit`` code (the intrinsics cannot be called from the
interpreter; the bounds-checked wrappers can, which is handy in tests).

* ``store_release_u16(array, index, value)``, ``load_acquire_u16(array, index)`` and the
  u32/u64 variants take a one-dimensional numpy array of exactly that dtype (another
  dtype is a compile-time typing error), writable for the stores. The value is converted
  to the element type the way numpy assignment does (wrapping modulo 2**16 for u16 --
  which is what ring indices do).
* The element must be naturally aligned: an atomic access that straddles a cache line is
  not atomic (and is a "split lock" on x86). numba's array type does not record
  alignment (``numba.typeof`` says ``aligned`` even for an odd-offset view), so this is
  checked at run time.
* The wrappers check ``0 <= index < len(array)`` (else ``IndexError``) and the element's
  alignment (else ``ValueError``). The ``*_unchecked`` intrinsics check nothing: a
  kernel that has already validated its indices (for example ``idx & (queue_size - 1)``
  against a queue size it checked, on ring arrays whose layout it checked once) may use
  them; the caller is then responsible for the index being in bounds and aligned.

This module imports only numpy, numba, llvmlite and the standard library.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic
from numba.np import arrayobj as _arrayobj

# numba's code-generation helpers are untyped; call them through Any.
cgutils: Any = _cgutils
make_array: Any = _arrayobj.make_array

__all__ = [
    "fence_seq_cst",
    "load_acquire_u16",
    "load_acquire_u16_unchecked",
    "load_acquire_u32",
    "load_acquire_u32_unchecked",
    "load_acquire_u64",
    "load_acquire_u64_unchecked",
    "store_release_u16",
    "store_release_u16_unchecked",
    "store_release_u32",
    "store_release_u32_unchecked",
    "store_release_u64",
    "store_release_u64_unchecked",
]


def _array_ok(arr: Any, dtype: Any, *, store: bool) -> bool:
    return (
        isinstance(arr, types.Array)
        and arr.ndim == 1
        and arr.dtype == dtype
        and bool(arr.aligned)
        and (bool(arr.mutable) or not store)
    )


def _element_pointer(context: Any, builder: Any, arrty: Any, arr: Any, idxty: Any, idx: Any) -> Any:
    ary = make_array(arrty)(context, builder, arr)
    index = context.cast(builder, idx, idxty, types.intp)
    return cgutils.get_item_pointer(context, builder, arrty, ary, [index], wraparound=False)


def _make_store_release(dtype: Any) -> Any:
    align = dtype.bitwidth // 8

    def typer(typingctx: Any, arr: Any, index: Any, value: Any) -> Any:
        if not _array_ok(arr, dtype, store=True):
            return None
        if not isinstance(index, types.Integer) or not isinstance(
            value, (types.Integer, types.Boolean)
        ):
            return None
        sig = types.void(arr, index, value)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arrty, idxty, valty = signature.args
            a, i, v = args
            ptr = _element_pointer(context, builder, arrty, a, idxty, i)
            val = context.cast(builder, v, valty, dtype)
            builder.store_atomic(val, ptr, "release", align)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = f"store_release_{dtype}_unchecked"
    typer.__qualname__ = typer.__name__
    return intrinsic(typer)


def _make_load_acquire(dtype: Any) -> Any:
    align = dtype.bitwidth // 8

    def typer(typingctx: Any, arr: Any, index: Any) -> Any:
        if not _array_ok(arr, dtype, store=False):
            return None
        if not isinstance(index, types.Integer):
            return None
        sig = dtype(arr, index)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            arrty, idxty = signature.args
            a, i = args
            ptr = _element_pointer(context, builder, arrty, a, idxty, i)
            return builder.load_atomic(ptr, "acquire", align)

        return sig, codegen

    typer.__name__ = f"load_acquire_{dtype}_unchecked"
    typer.__qualname__ = typer.__name__
    return intrinsic(typer)


def _fence_seq_cst_typer(typingctx: Any) -> Any:
    sig = types.void()

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


_fence_seq_cst_typer.__name__ = "fence_seq_cst"
_fence_seq_cst_typer.__qualname__ = "fence_seq_cst"

fence_seq_cst: Any = intrinsic(_fence_seq_cst_typer)
"""``fence seq_cst``: no load after it executes before every store before it is visible
to all CPUs (x86: ``mfence`` or a ``lock``-prefixed instruction). njit code only."""

store_release_u16_unchecked: Any = _make_store_release(types.uint16)
store_release_u32_unchecked: Any = _make_store_release(types.uint32)
store_release_u64_unchecked: Any = _make_store_release(types.uint64)
load_acquire_u16_unchecked: Any = _make_load_acquire(types.uint16)
load_acquire_u32_unchecked: Any = _make_load_acquire(types.uint32)
load_acquire_u64_unchecked: Any = _make_load_acquire(types.uint64)


# The checked wrappers. Not cache=True: they are compiled into (and cached with) the
# kernels that call them, and importing this module must work even where numba has no
# writable cache directory.


_OK, _OUT_OF_BOUNDS, _MISALIGNED = 0, 1, 2


def _check(array: Any, index: int, align: int) -> int:
    if index < 0 or index >= array.shape[0]:
        return _OUT_OF_BOUNDS
    if (array.ctypes.data + index * array.strides[0]) & (align - 1):
        return _MISALIGNED
    return _OK


_check_jit = njit(nogil=True)(_check)


def _store_release_u16(array: Any, index: int, value: int) -> None:
    bad = _check_jit(array, index, 2)
    if bad == _OUT_OF_BOUNDS:
        raise IndexError("store_release_u16: index out of bounds")
    if bad == _MISALIGNED:
        raise ValueError("store_release_u16: element is not 2-byte aligned")
    store_release_u16_unchecked(array, index, value)


def _store_release_u32(array: Any, index: int, value: int) -> None:
    bad = _check_jit(array, index, 4)
    if bad == _OUT_OF_BOUNDS:
        raise IndexError("store_release_u32: index out of bounds")
    if bad == _MISALIGNED:
        raise ValueError("store_release_u32: element is not 4-byte aligned")
    store_release_u32_unchecked(array, index, value)


def _store_release_u64(array: Any, index: int, value: int) -> None:
    bad = _check_jit(array, index, 8)
    if bad == _OUT_OF_BOUNDS:
        raise IndexError("store_release_u64: index out of bounds")
    if bad == _MISALIGNED:
        raise ValueError("store_release_u64: element is not 8-byte aligned")
    store_release_u64_unchecked(array, index, value)


def _load_acquire_u16(array: Any, index: int) -> int:
    bad = _check_jit(array, index, 2)
    if bad == _OUT_OF_BOUNDS:
        raise IndexError("load_acquire_u16: index out of bounds")
    if bad == _MISALIGNED:
        raise ValueError("load_acquire_u16: element is not 2-byte aligned")
    return load_acquire_u16_unchecked(array, index)  # type: ignore[no-any-return]


def _load_acquire_u32(array: Any, index: int) -> int:
    bad = _check_jit(array, index, 4)
    if bad == _OUT_OF_BOUNDS:
        raise IndexError("load_acquire_u32: index out of bounds")
    if bad == _MISALIGNED:
        raise ValueError("load_acquire_u32: element is not 4-byte aligned")
    return load_acquire_u32_unchecked(array, index)  # type: ignore[no-any-return]


def _load_acquire_u64(array: Any, index: int) -> int:
    bad = _check_jit(array, index, 8)
    if bad == _OUT_OF_BOUNDS:
        raise IndexError("load_acquire_u64: index out of bounds")
    if bad == _MISALIGNED:
        raise ValueError("load_acquire_u64: element is not 8-byte aligned")
    return load_acquire_u64_unchecked(array, index)  # type: ignore[no-any-return]


_wrap = njit(nogil=True)

store_release_u16: Any = _wrap(_store_release_u16)
"""Release-store ``value`` (wrapped to u16) into ``array[index]``; ``IndexError`` if out
of bounds. Publishes every earlier write to a peer that acquire-loads this element."""
store_release_u32: Any = _wrap(_store_release_u32)
store_release_u64: Any = _wrap(_store_release_u64)
load_acquire_u16: Any = _wrap(_load_acquire_u16)
"""Acquire-load ``array[index]``; ``IndexError`` if out of bounds. No later access in
this thread is performed before it."""
load_acquire_u32: Any = _wrap(_load_acquire_u32)
load_acquire_u64: Any = _wrap(_load_acquire_u64)
