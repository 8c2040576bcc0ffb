"""The test frames guests send through data-path devices: the format, and its numpy
reference writer and checker.

Every frame is ``seq u32 | checksum u32 | payload`` (little-endian): ``seq`` is the frame's
sequence number modulo 2**32, payload byte ``i`` is the top byte of the u32 ``seq *
2654435761 + i`` and ``checksum`` is the sum of the payload bytes modulo 2**32. A receiver
can so verify order, integrity and exactly-once delivery with vectorized operations and no
per-byte Python work. The format is a contract between processes: guests write and verify
it, the echo device's sink mode checks the sequence numbers. The compiled data path
(:mod:`shared.virtio.fused`) writes and verifies the same bytes; :func:`stamp` and
:func:`check` are its reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HEADER = 8  # seq u32, checksum u32
MULTIPLIER = 2654435761
"""Payload byte ``i`` of frame ``seq`` is the top byte of ``(seq * MULTIPLIER + i) % 2**32``."""


def stamp(frames: np.ndarray[Any, Any], seqs: np.ndarray[Any, Any]) -> None:
    """Fill ``frames`` (N x size) with a payload derived from each seq, then its header."""
    size = frames.shape[1]
    body = (
        seqs[:, None].astype(np.uint32) * np.uint32(MULTIPLIER)
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
        return fault_message(FAULT_SEQ, expect_first + i, int(seqs[i]), size)
    short = np.nonzero(lens != size)[0]
    if short.size:
        i = int(short[0])
        return fault_message(FAULT_LENGTH, expect_first + i, int(lens[i]), size)
    sums = frames[:, 4:8].copy().view("<u4").reshape(n)
    actual = frames[:, HEADER:].sum(axis=1, dtype=np.uint32)
    bad = np.nonzero(sums != actual)[0]
    if bad.size:
        return fault_message(FAULT_CHECKSUM, expect_first + int(bad[0]), 0, size)
    return None


FAULT_NONE, FAULT_SEQ, FAULT_LENGTH, FAULT_CHECKSUM = 0, 1, 2, 3
"""What :func:`check` finds first (it looks at every sequence number, then every length,
then every checksum); the compiled checker reports the same codes."""


def fault_message(fault: int, seq: int, value: int, size: int) -> str | None:
    """:func:`check`'s words for ``fault`` in frame ``seq``: ``value`` is the sequence
    number found (``FAULT_SEQ``) or the length received (``FAULT_LENGTH``)."""
    if fault == FAULT_SEQ:
        return f"frame {seq}: got sequence number {value}"
    if fault == FAULT_LENGTH:
        return f"frame {seq}: {value} bytes, expected {size}"
    if fault == FAULT_CHECKSUM:
        return f"frame {seq}: checksum mismatch (payload corrupted)"
    return None
