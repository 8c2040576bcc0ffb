"""The echo workload's in-place frames (:func:`stamp_row`, :func:`check_row`) against the
vectorized reference in :mod:`shared.frames`: the same bytes, and every
corruption the reference detects is detected (plus those a checksum cannot see)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from guestemu.workloads.echo import check_row, frame_bytes, payload_runs, stamp_row
from shared.frames import HEADER, check, stamp

SEQS = [0, 1, 2, 255, 256, 65535, 2**24, 2**31, 2**32 - 1, 2**32, 2**40 + 7]


@pytest.mark.parametrize("size", [HEADER + 1, 10, 64, 100, 511, 512, 4096, 70001, 1 << 20])
def test_stamp_row_writes_what_stamp_writes(size: int) -> None:
    rng = np.random.default_rng(size)
    seqs = [*SEQS, *rng.integers(0, 2**32, 8).tolist()]
    ref = np.zeros((len(seqs), size), dtype=np.uint8)
    stamp(ref, np.array(seqs, dtype=np.int64))
    for i, seq in enumerate(seqs):
        row = np.full(size, 0xEE, dtype=np.uint8)  # stale bytes must all be overwritten
        stamp_row(row, seq)
        assert np.array_equal(row, ref[i]), seq
        assert check_row(row, size, seq) is None
        if seq < 2**32 - 1:  # the reference counts in u32 and cannot start past that
            assert check(ref[i : i + 1], np.array([size]), seq) is None


@pytest.mark.parametrize("size", [HEADER + 1, 64, 600, 4096, 70001])
def test_check_row_finds_what_check_finds(size: int) -> None:
    rng = np.random.default_rng(size + 1)
    seq = int(rng.integers(0, 2**32))
    good = np.zeros(size, dtype=np.uint8)
    stamp_row(good, seq)
    # wrong sequence number, short frame
    assert check_row(good, size, seq + 1) == f"frame {seq + 1}: got sequence number {seq}"
    assert check_row(good, size - 1, seq) == f"frame {seq}: {size - 1} bytes, expected {size}"
    for _ in range(20):
        bad = good.copy()
        j = int(rng.integers(HEADER, size))
        bad[j] ^= int(rng.integers(1, 256))
        assert check_row(bad, size, seq) == f"frame {seq}: checksum mismatch (payload corrupted)"


@pytest.mark.parametrize("size", [64, 600, 4096])
def test_check_row_finds_what_a_checksum_cannot(size: int) -> None:
    """Two payload bytes swapped across the frame's two runs keep the checksum but not the
    bytes: the reference check passes the frame, check_row does not."""
    seqs = np.arange(1 << 22, dtype=np.uint64)
    low = (seqs * np.uint64(2654435761)) & np.uint64(0xFFFFFF)  # where the top byte steps
    seq = int(np.argmax(low > np.uint64((1 << 24) - (size - HEADER) + 1)))
    runs = payload_runs(seq, size - HEADER)
    assert len(runs) == 2 and runs[0][2] != runs[1][2]
    good = np.zeros(size, dtype=np.uint8)
    stamp_row(good, seq)
    bad = good.copy()
    a, b = HEADER + runs[0][1] - 1, HEADER + runs[1][0]
    bad[a], bad[b] = good[b], good[a]
    assert check(bad[None, :], np.array([size]), seq) is None
    assert check_row(bad, size, seq) == f"frame {seq}: checksum mismatch (payload corrupted)"


def test_payload_runs_cover_the_payload_in_order() -> None:
    for seq in SEQS:
        for length in (1, 56, 1 << 20, (1 << 24) + 5):
            runs = payload_runs(seq, length)
            assert runs[0][0] == 0 and runs[-1][1] == length
            assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
            assert all(0 <= v <= 255 for _, _, v in runs)


@pytest.mark.parametrize("size", [HEADER + 1, 10, 64, 100, 511, 512])
def test_frame_bytes_are_stamp_row_bytes(size: int) -> None:
    rng = np.random.default_rng(size + 7)
    seqs = [*SEQS, *rng.integers(0, 2**32, 64).tolist()]
    # and every sequence number whose payload steps to the next byte value inside the frame
    steps = np.arange(1 << 22, dtype=np.uint64)
    low = (steps * np.uint64(2654435761)) & np.uint64(0xFFFFFF)
    seqs += steps[low > np.uint64((1 << 24) - (size - HEADER))][:16].tolist()
    for seq in seqs:
        row = np.full(size, 0xEE, dtype=np.uint8)
        stamp_row(row, seq)
        assert frame_bytes(seq, size) == row.tobytes(), seq
        assert check_row(row, size, seq) is None


def test_check_row_fast_path_still_reports_every_corruption() -> None:
    size = 64
    good = np.frombuffer(frame_bytes(12345, size), dtype=np.uint8).copy()
    for j in range(size):
        bad = good.copy()
        bad[j] ^= 0x5A
        assert check_row(bad, size, 12345) is not None, j
