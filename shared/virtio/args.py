"""Checking and converting the caller's arguments for the ring operations.

A mistake of *our own* side -- a bad argument, completing a buffer that is not in flight, a
length beyond what a chain can hold -- is :class:`~shared.errors.UsageError`; what the *other*
side wrote is never checked here (that breaks the ring instead).

Theory of operation: the vectorized paths convert everything to numpy arrays
(:func:`index_array`, :func:`u64_array`), which is the reference for what is accepted and
which error is raised. The scalar paths first ask :func:`small_ints` / :func:`small_bools`
for plain Python values; these answer ``None`` for anything they are not sure about, so the
vectorized path's conversion stays the one that decides (and words) every rejection.
Private bookkeeping is allocated by :func:`private_array` as one buffer with two views, a
numpy array for the vectorized paths and a ``memoryview`` for the scalar ones, so both paths
always see the same state.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from shared.errors import UsageError
from shared.virtio.layout import NATIVE_LE, I64Array, U64Array

I64_MAX: Final = (1 << 63) - 1


def check_int(value: object, what: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``lo..hi``; :class:`UsageError` otherwise (bools rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{what} must be an integer, got {value!r}")
    n = int(value)
    if not lo <= n <= hi:
        raise UsageError(f"{what} must be in {lo}..{hi}, got {n}")
    return n


def _nonnegative_ints(values: npt.ArrayLike, what: str) -> npt.NDArray[Any] | None:
    """``values`` as a 1-D integer array of no negatives, or ``None`` if it is empty;
    :class:`UsageError` otherwise."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UsageError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return None
    if arr.dtype.kind not in "iu":
        raise UsageError(f"{what} must hold integers, got {arr.dtype}")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise UsageError(f"{what} must not be negative")
    return arr


def index_array(values: npt.ArrayLike, what: str) -> I64Array:
    """A 1-D int64 copy of ``values``; :class:`UsageError` for non-integers or negatives."""
    arr = _nonnegative_ints(values, what)
    if arr is None:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.uint64 and int(arr.max()) > I64_MAX:
        raise UsageError(f"{what} out of range")
    return arr.astype(np.int64)


def u64_array(values: npt.ArrayLike, what: str) -> U64Array:
    """A 1-D uint64 copy of ``values`` (guest addresses); :class:`UsageError` if impossible."""
    arr = _nonnegative_ints(values, what)
    if arr is None:
        return np.zeros(0, dtype=np.uint64)
    return arr.astype(np.uint64)


def small_ints(values: object, what: str, limit: int, top: int) -> list[int] | None:
    """``values`` as a list of Python ints for the scalar paths, or ``None`` (take the
    vectorized path, which validates everything itself).

    Only a 1-D integer ndarray or a list of plain ints (bools excluded) of at most ``limit``
    items qualifies; anything else -- other types, empty float arrays, huge ints -- is left to
    the vectorized path so the error it raises stays the reference. Raises the same
    :class:`UsageError` as :func:`index_array` (``top`` = 2**63-1) or :func:`u64_array`
    (``top`` = 2**64-1) for negative or too large values.
    """
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.shape[0] > limit or values.dtype.kind not in "iu":
            return None
        out: list[int] = values.tolist()
    elif isinstance(values, list) and len(values) <= limit:
        for v in values:
            # Past 2**63-1 numpy would not make an int64 array of the list (it picks another
            # dtype, or fails): leave such lists to the vectorized path too.
            if type(v) is not int or not 0 <= v <= I64_MAX:
                return None  # the vectorized path says what is wrong
        return values
    else:
        return None
    for v in out:
        if v < 0:
            raise UsageError(f"{what} must not be negative")
        if v > top:
            raise UsageError(f"{what} out of range")
    return out


def small_bools(values: object, n: int) -> list[bool] | None:
    """``device_writable`` as ``n`` Python bools (one bool for all, or one per buffer), or
    ``None`` for anything else (the vectorized path broadcasts and validates it)."""
    if isinstance(values, (bool, np.bool_)):
        return [bool(values)] * n
    if isinstance(values, np.ndarray):
        if values.dtype == np.bool_ and values.shape == (n,):
            out: list[bool] = values.tolist()
            return out
        return None
    if isinstance(values, list) and len(values) == n and all(type(v) is bool for v in values):
        return values
    return None


def private_array(
    count: int, dtype: npt.DTypeLike, fmt: Literal["B", "H", "q"]
) -> tuple[npt.NDArray[Any], memoryview]:
    """Private (never shared) bookkeeping as two views of one buffer: a numpy array for the
    vectorized paths and a ``memoryview`` of format ``fmt`` for the scalar ones."""
    dt = np.dtype(dtype)
    buf = bytearray(count * dt.itemsize)
    return np.frombuffer(buf, dtype=dt), memoryview(buf).cast(fmt)


KERNEL_OVER: Final = 4
"""With the kernels on, ring operations on more chains than this go to them: a kernel call
(a dozen array arguments) costs about what the scalar path spends on four chains."""


STAGE_START: Final = 0
STAGE_RECLAIMED: Final = 1
STAGE_DONE: Final = 2
"""How far a fused step (:mod:`shared.virtio.fused`) got before it declined: nothing done,
completions taken back (and, when receiving, verified), or the whole step. Defined here,
where numba is not imported, so callers can read a step's result on either path."""


def use_jit(choice: bool | None) -> bool:
    """Whether a ring takes the compiled path: ``choice``, or ``VBUSEMU_JIT`` when None.
    The kernels index little-endian fields natively, so a big-endian host never does."""
    from shared.jit import jit_enabled

    wanted = jit_enabled() if choice is None else bool(choice)
    return wanted and NATIVE_LE
