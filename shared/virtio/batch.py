"""The chains one pass of the device took, as a :class:`Batch` of validated segments.

Invariants
----------
* Everything in a batch comes from the device's *private copies* of the descriptors, never
  from guest memory read again, and every segment was validated (:mod:`shared.virtio.chains`)
  before the batch was made: inside one guest memory slot, non-empty, device-readable
  segments before device-writable ones in each chain.
* Segments are stored flat, CSR style: chain ``i`` is segments ``starts[i]:starts[i+1]``;
  ``starts[0] == 0`` and ``starts[-1]`` is the number of segments. A batch is *simple* when
  every chain is one descriptor (``starts == arange(N+1)``), the case the vectorized payload
  copies handle without a per-chain loop.
* ``flags`` keeps only ``VRING_DESC_F_WRITE``; ``readable_lens`` / ``writable_lens`` are the
  per-chain sums of the readable / writable segment lengths.

Theory of operation: the vectorized pop builds a batch from arrays (:func:`make_batch`,
:func:`simple_batch`); the scalar pop builds one from Python lists (``Batch._of_lists``) and
each array is made on first access, as most small-batch consumers touch only a few fields.
Once an array is made it is what every method reads. An empty pass returns the one shared,
read-only :func:`empty_batch`.
"""

from __future__ import annotations

import itertools
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from shared.virtio.layout import (
    VRING_DESC_F_WRITE,
    BoolArray,
    I64Array,
    U16Array,
    U32Array,
    U64Array,
)


class Segment(NamedTuple):
    """One buffer of a chain as the device saw it (from its private copy)."""

    gpa: int
    len: int
    writable: bool


_BATCH_DTYPES: Final = (np.uint16, np.int64, np.uint64, np.uint32, np.uint16, np.int64, np.int64)
"""The dtypes of a batch's fields, in field order."""


class Batch:
    """Chains taken by one :meth:`~shared.virtio.DeviceRing.pop_batch`, from the device's
    private copies.

    Segments of all chains are stored flat, CSR style: chain ``i`` is segments
    ``starts[i]:starts[i+1]`` of ``addrs``/``lens``/``flags``. When every chain is a single
    descriptor (:attr:`simple`), ``starts`` is ``arange(N+1)`` and ``addrs[i]``, ``lens[i]``,
    ``flags[i]`` describe chain ``heads[i]`` directly, ready for vectorized payload copies.
    ``flags`` keeps only ``VRING_DESC_F_WRITE``. Every address range was validated.

    The fields are numpy arrays. A batch from the scalar path holds Python lists and makes
    each array on first access (most small-batch consumers never touch most of them); once
    made, an array is what every method reads.
    """

    __slots__ = ("_arrays", "_lists")

    def __init__(
        self,
        heads: U16Array,
        starts: I64Array,
        addrs: U64Array,
        lens: U32Array,
        flags: U16Array,
        readable_lens: I64Array,
        writable_lens: I64Array,
    ) -> None:
        self._arrays: list[npt.NDArray[Any] | None] = [
            heads,
            starts,
            addrs,
            lens,
            flags,
            readable_lens,
            writable_lens,
        ]
        self._lists: list[list[int]] | None = None

    @classmethod
    def _of_lists(cls, *lists: list[int]) -> Batch:
        """A batch over Python lists, in field order (the scalar path's result)."""
        batch = cls.__new__(cls)
        batch._arrays = [None] * 7
        batch._lists = list(lists)
        return batch

    def _array(self, i: int) -> npt.NDArray[Any]:
        a = self._arrays[i]
        if a is None:
            assert self._lists is not None
            a = self._arrays[i] = np.array(self._lists[i], dtype=_BATCH_DTYPES[i])
        return a

    def _list(self, i: int) -> list[int]:
        """Field ``i`` as Python ints (the array once made: a caller may have changed it)."""
        if self._lists is not None and self._arrays[i] is None:
            return self._lists[i]
        out: list[int] = self._array(i).tolist()
        return out

    @property
    def heads(self) -> U16Array:
        return self._array(0)

    @property
    def starts(self) -> I64Array:
        return self._array(1)

    @property
    def addrs(self) -> U64Array:
        return self._array(2)

    @property
    def lens(self) -> U32Array:
        return self._array(3)

    @property
    def flags(self) -> U16Array:
        return self._array(4)

    @property
    def readable_lens(self) -> I64Array:
        """Bytes the device may read, per chain."""
        return self._array(5)

    @property
    def writable_lens(self) -> I64Array:
        """Bytes the device may write, per chain (the most it may report as used len)."""
        return self._array(6)

    @property
    def head_list(self) -> list[int]:
        """:attr:`heads` as Python ints (cheap for a batch from the scalar path)."""
        return self._list(0)

    @property
    def readable_list(self) -> list[int]:
        """:attr:`readable_lens` as Python ints."""
        return self._list(5)

    @property
    def writable_list(self) -> list[int]:
        """:attr:`writable_lens` as Python ints."""
        return self._list(6)

    def __len__(self) -> int:
        if self._lists is not None:
            return len(self._lists[0])
        return int(self._array(0).shape[0])

    @property
    def simple(self) -> bool:
        """Whether every chain is one descriptor (the vectorized fast path)."""
        if self._lists is not None:
            return len(self._lists[2]) == len(self._lists[0])
        return bool(self.addrs.shape[0] == self.heads.shape[0])

    @property
    def writable(self) -> BoolArray:
        """Per segment: device-writable."""
        flagged: BoolArray = (self.flags & VRING_DESC_F_WRITE) != 0
        return flagged

    def _slice(self, i: int, lo: int, hi: int) -> list[int]:
        """Items ``lo:hi`` of field ``i`` as Python ints, converting only those."""
        a = self._arrays[i]
        if a is None:
            assert self._lists is not None
            return self._lists[i][lo:hi]
        out: list[int] = a[lo:hi].tolist()
        return out

    def chain(self, i: int) -> tuple[Segment, ...]:
        """Segments of chain ``i`` (readable ones first; negative ``i`` counts from the
        end). Converts only that chain's entries, so walking a batch chain by chain is
        linear in its size."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"chain {i} of a batch of {n}")
        i %= n
        lo, hi = self._slice(1, i, i + 2)
        return tuple(
            Segment(a, ln, bool(f & VRING_DESC_F_WRITE))
            for a, ln, f in zip(
                self._slice(2, lo, hi), self._slice(3, lo, hi), self._slice(4, lo, hi), strict=True
            )
        )

    def chains(self) -> list[tuple[Segment, ...]]:
        """Every chain's segments (each field converted once)."""
        starts, addrs, lens, flags = self._list(1), self._list(2), self._list(3), self._list(4)
        segs = [
            Segment(a, ln, bool(f & VRING_DESC_F_WRITE))
            for a, ln, f in zip(addrs, lens, flags, strict=True)
        ]
        return [tuple(segs[lo:hi]) for lo, hi in itertools.pairwise(starts)]

    def rows(self, lo: int, hi: int) -> Batch:
        """Chains ``lo:hi`` (clamped to the batch) as a batch of their own -- for handling a
        big batch in pieces of bounded size; the chains stay in flight as one."""
        n = len(self)
        lo = min(max(lo, 0), n)
        hi = min(max(hi, lo), n)
        starts = self._list(1)
        s0, s1 = starts[lo], starts[hi]
        return Batch._of_lists(
            self._list(0)[lo:hi],
            [s - s0 for s in starts[lo : hi + 1]],
            self._list(2)[s0:s1],
            self._list(3)[s0:s1],
            self._list(4)[s0:s1],
            self._list(5)[lo:hi],
            self._list(6)[lo:hi],
        )

    def __repr__(self) -> str:
        return f"Batch(heads={self.head_list}, starts={self._list(1)})"


def make_batch(
    heads: npt.NDArray[Any],
    starts: npt.NDArray[Any],
    addrs: npt.NDArray[Any],
    lens: npt.NDArray[Any],
    writable: BoolArray,
) -> Batch:
    """A batch of chains ``heads`` whose segments are given CSR style (``starts``) with
    ``writable`` per segment; sums the readable and writable lengths per chain."""
    lens64 = lens.astype(np.int64)
    if heads.shape[0]:
        first = starts[:-1]
        readable_lens = np.add.reduceat(np.where(writable, 0, lens64), first)
        writable_lens = np.add.reduceat(np.where(writable, lens64, 0), first)
    else:
        readable_lens = writable_lens = np.zeros(0, dtype=np.int64)
    return Batch(
        heads=heads.astype(np.uint16),
        starts=starts.astype(np.int64),
        addrs=addrs.astype(np.uint64),
        lens=lens.astype(np.uint32),
        flags=np.where(writable, VRING_DESC_F_WRITE, 0).astype(np.uint16),
        readable_lens=readable_lens.astype(np.int64),
        writable_lens=writable_lens.astype(np.int64),
    )


def simple_batch(
    heads: I64Array, addrs: npt.NDArray[Any], lens: npt.NDArray[Any], wflags: npt.NDArray[Any]
) -> Batch:
    """:func:`make_batch` for single-descriptor chains (``wflags``: each one's WRITE bit)."""
    lens64 = lens.astype(np.int64)
    wcap = lens64 * (wflags != 0)
    return Batch(
        heads=heads.astype(np.uint16),
        starts=np.arange(heads.shape[0] + 1, dtype=np.int64),
        addrs=addrs.astype(np.uint64),
        lens=lens.astype(np.uint32),
        flags=wflags.astype(np.uint16),
        readable_lens=lens64 - wcap,
        writable_lens=wcap,
    )


def _make_empty_batch() -> Batch:
    z = np.zeros(0, dtype=np.int64)
    batch = make_batch(z, np.zeros(1, dtype=np.int64), z, z, np.zeros(0, dtype=np.bool_))
    for arr in (
        batch.heads,
        batch.starts,
        batch.addrs,
        batch.lens,
        batch.flags,
        batch.readable_lens,
        batch.writable_lens,
    ):
        arr.flags.writeable = False
    return batch


_EMPTY_BATCH: Final = _make_empty_batch()


def empty_batch() -> Batch:
    """The empty batch: one shared read-only instance (an empty pass is the common case of
    every poll and building one costs a dozen numpy calls)."""
    return _EMPTY_BATCH
