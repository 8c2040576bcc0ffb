"""Frames with a sequence number and a checksum, written and verified with numpy.

Every frame is ``seq u32 | checksum u32 | payload``; the payload is derived from the
sequence number, so a receiver can verify order, integrity and exactly-once delivery with
vectorized operations and no per-byte Python work.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HEADER = 8  # seq u32, checksum u32


def stamp(frames: np.ndarray[Any, Any], seqs: np.ndarray[Any, Any]) -> None:
    """Fill ``frames`` (N x size) with a payload derived from each seq, then its header."""
    size = frames.shape[1]
    body = (
        seqs[:, None].astype(np.uint32) * np.uint32(2654435761)
        + np.arange(size - HEADER, dtype=np.uint32)[None, :]
    ) >> np.uint32(24)
    frames[:, HEADER:] = body.astype(np.uint8)
    checksum = frames[:, HEADER:].sum(axis=1, dtype=np.uint32)
    frames[:, 0:4] = seqs.astype("<u4")[:, None].view(np.uint8).reshape(-1, 4)
    frames[:, 4:8] = checksum.astype("<u4")[:, None].view(np.uint8).reshape(-1, 4)


def check(
    frames: np.ndarray[Any, Any], lens: np.ndarray[Any, Any], expect_first: int
) -> str | None:
    """The first discrepancy in received frames, or None if all are intact and in order."""
    n, size = frames.shape
    seqs = frames[:, 0:4].copy().view("<u4").reshape(n)
    want = np.arange(expect_first, expect_first + n, dtype=np.uint32)
    bad = np.nonzero(seqs != want)[0]
    if bad.size:
        i = int(bad[0])
        return f"frame {expect_first + i}: got sequence number {int(seqs[i])}"
    short = np.nonzero(lens != size)[0]
    if short.size:
        i = int(short[0])
        return f"frame {expect_first + i}: {int(lens[i])} bytes, expected {size}"
    sums = frames[:, 4:8].copy().view("<u4").reshape(n)
    actual = frames[:, HEADER:].sum(axis=1, dtype=np.uint32)
    bad = np.nonzero(sums != actual)[0]
    if bad.size:
        return f"frame {expect_first + int(bad[0])}: checksum mismatch (payload corrupted)"
    return None
