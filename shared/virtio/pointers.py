"""Entering a kernel with one table of arrays instead of two dozen array arguments.

Why
---
numba checks the type of every argument and unboxes every array on each call: a fused
step with 24 array arguments costs ~1.7 µs to enter, far more than the step's own work at
small batches. A :class:`PointerTable` records, once, the address and length of each
array a step uses; the kernel takes the table (one int64 array) and rebuilds each array
as a typed view with :func:`view_u8` & co -- no copy, no allocation (~0.3 µs to enter).

Contract
--------
* Every array in a table is one-dimensional (or 2-D for :func:`view_u8_2d`),
  C-contiguous, of the dtype the kernel views it as, and writable when the kernel writes
  it: :class:`PointerTable` checks all of this when it is built (:class:`UsageError`).
* The table keeps a reference to each array, so the memory stays mapped while the table
  lives (a numpy view keeps its buffer -- guest RAM's mapping -- alive, and an ``mmap``
  with exported views refuses to close). Whoever builds a table must rebuild it when an
  array is *replaced* (a ring re-attached to new memory, a pool reallocated); arrays
  written in place need nothing.
* The views carry no bounds checks (neither do the kernels' other array accesses); the
  kernels index within the lengths recorded here, as they did with the arrays themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.jit import prepare_numba_cache

prepare_numba_cache()

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402
from numba.np.numpy_support import carray  # noqa: E402

from shared.errors import UsageError  # noqa: E402


def _address_typer(typingctx: Any, addr: Any) -> Any:
    if not isinstance(addr, types.Integer):
        return None
    sig = types.voidptr(addr)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


_address_typer.__name__ = "address_to_pointer"
_address_typer.__qualname__ = "address_to_pointer"
address_to_pointer: Any = intrinsic(_address_typer)


@njit(cache=True, nogil=True, inline="always")
def view_u8(tbl: np.ndarray, i: int) -> np.ndarray:
    return carray(address_to_pointer(tbl[2 * i]), tbl[2 * i + 1], np.uint8)


@njit(cache=True, nogil=True, inline="always")
def view_u16(tbl: np.ndarray, i: int) -> np.ndarray:
    return carray(address_to_pointer(tbl[2 * i]), tbl[2 * i + 1], np.uint16)


@njit(cache=True, nogil=True, inline="always")
def view_u32(tbl: np.ndarray, i: int) -> np.ndarray:
    return carray(address_to_pointer(tbl[2 * i]), tbl[2 * i + 1], np.uint32)


@njit(cache=True, nogil=True, inline="always")
def view_u64(tbl: np.ndarray, i: int) -> np.ndarray:
    return carray(address_to_pointer(tbl[2 * i]), tbl[2 * i + 1], np.uint64)


@njit(cache=True, nogil=True, inline="always")
def view_i64(tbl: np.ndarray, i: int) -> np.ndarray:
    return carray(address_to_pointer(tbl[2 * i]), tbl[2 * i + 1], np.int64)


@njit(cache=True, nogil=True, inline="always")
def view_bool(tbl: np.ndarray, i: int) -> np.ndarray:
    return carray(address_to_pointer(tbl[2 * i]), tbl[2 * i + 1], np.bool_)


@njit(cache=True, nogil=True, inline="always")
def view_u8_2d(tbl: np.ndarray, i: int, columns: int) -> np.ndarray:
    return carray(address_to_pointer(tbl[2 * i]), (tbl[2 * i + 1] // columns, columns), np.uint8)


class PointerTable:
    """The addresses and lengths (in elements) of ``arrays``, in order, as one int64 array
    (:attr:`table`) for a kernel; ``dtypes`` say what each must be, ``written`` which ones
    the kernel writes."""

    __slots__ = ("_arrays", "table")

    def __init__(
        self,
        arrays: Sequence[np.ndarray[Any, Any]],
        dtypes: Sequence[Any],
        written: Sequence[bool],
    ) -> None:
        if not len(arrays) == len(dtypes) == len(written):
            raise UsageError("a pointer table needs one dtype and one flag per array")
        table = np.empty(2 * len(arrays), dtype=np.int64)
        for i, (arr, dtype, w) in enumerate(zip(arrays, dtypes, written, strict=True)):
            if arr.dtype != np.dtype(dtype) or not arr.flags.c_contiguous or arr.ndim > 2:
                raise UsageError(
                    f"pointer table entry {i}: expected a C-contiguous {np.dtype(dtype)} "
                    f"array, got {arr.dtype} of shape {arr.shape}"
                )
            if w and not arr.flags.writeable:
                raise UsageError(f"pointer table entry {i} is written but read-only")
            table[2 * i] = arr.ctypes.data if arr.size else 0
            table[2 * i + 1] = arr.size
        self._arrays = tuple(arrays)  # keeps every array (and its memory) alive
        self.table = table
