"""The ``blk`` workload: write a pattern to the block device, flush, read it back, verify.

Parameters (all optional): ``count`` requests of ``sectors`` sectors each, starting at
``start`` (sector), with the pattern of ``seed`` (:func:`pattern`); ``depth`` requests in
flight (each a 3-descriptor chain: header, data, status); ``qsize``; ``timeout`` seconds per
phase; ``progress_every``: emit ``blk_progress`` every that many completions;
``hold_after_flush``: after the flush completed and ``blk_flushed`` was emitted, halt
until the VM is torn down (a test then SIGKILLs every process and checks the image).

Invariants
----------
* The content of sector ``s`` is a pure function of ``(seed, s)`` (:func:`pattern`): a test
  can verify the image file without talking to the guest, and a misplaced sector is caught
  (its first 8 bytes hold its own sector number).
* ``blk_flushed`` is emitted only after every write completed with status OK *and* a FLUSH
  submitted after the last of those completions completed with status OK: from then on the
  writes are durable.
* A request slot (its header, data and status buffers) is reused only after the device
  returned its chain. The status byte is preset to a value the device never writes, so a
  chain returned without a status is caught.
* The guest trusts nothing the device returns: the status must be OK and the used length
  exactly what the request transfers (data + status byte).

Halting follows :mod:`guestemu.workloads.echo`: when nothing can progress, re-enable
interrupts, re-check the ring, and only then halt the vCPU -- no completion is slept through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from guestemu.drivers import (
    BufferPool,
    Function,
    GuestRam,
    Virtqueue,
    boot,
    find,
    start_device,
)
from shared import pci_layout as pl
from shared.errors import UsageError, VbusError

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

U8Array = npt.NDArray[np.uint8]

SECTOR: Final = pl.SECTOR_SIZE
T_IN: Final = pl.BLK_T_IN
T_OUT: Final = pl.BLK_T_OUT
T_FLUSH: Final = pl.BLK_T_FLUSH
S_OK: Final = pl.BLK_S_OK
S_IOERR: Final = pl.BLK_S_IOERR
S_UNSUPP: Final = pl.BLK_S_UNSUPP
STATUS_UNSET: Final = 0xFF
"""Preset into every status byte; the device only ever writes 0, 1 or 2."""
REQ_HEADER_DTYPE: Final = pl.BLK_REQ_HEADER_DTYPE

_WORDS: Final = SECTOR // 8
_K_SECTOR: Final = np.uint64(0x9E3779B97F4A7C15)
_K_WORD: Final = np.uint64(0xBF58476D1CE4E5B9)
_K_SEED: Final = np.uint64(0x94D049BB133111EB)


def pattern(seed: int, first_sector: int, nsectors: int) -> U8Array:
    """The bytes of sectors ``first_sector .. first_sector + nsectors - 1`` for ``seed``:
    ``nsectors * 512`` bytes. Word 0 of each sector is its sector number, the other 63 a
    splitmix64-style hash of ``(seed, sector, word)``. Vectorized (uint64 arithmetic wraps)."""
    sectors = (np.arange(nsectors, dtype=np.uint64) + np.uint64(first_sector))[:, None]
    words = np.arange(_WORDS, dtype=np.uint64)[None, :]
    seed_term = np.full(1, seed & (2**64 - 1), dtype=np.uint64) * _K_SEED
    x = sectors * _K_SECTOR + words * _K_WORD + seed_term
    x ^= x >> np.uint64(30)
    x *= _K_WORD
    x ^= x >> np.uint64(27)
    x *= _K_SEED
    x ^= x >> np.uint64(31)
    x[:, 0] = sectors[:, 0]
    out: U8Array = x.astype("<u8").view(np.uint8).reshape(-1)
    return out


def first_mismatch(got: U8Array, seed: int, first_sector: int) -> int | None:
    """The first sector of ``got`` (starting at ``first_sector``) that differs from
    :func:`pattern`, or ``None``."""
    nsectors = got.shape[0] // SECTOR
    want = pattern(seed, first_sector, nsectors).reshape(nsectors, SECTOR)
    bad = (got[: nsectors * SECTOR].reshape(nsectors, SECTOR) != want).any(axis=1)
    return first_sector + int(np.argmax(bad)) if bool(bad.any()) else None


@dataclass(frozen=True)
class Request:
    type: int
    sector: int
    nsectors: int
    expect: int = S_OK

    @property
    def nbytes(self) -> int:
        return self.nsectors * SECTOR if self.type in (T_IN, T_OUT) else 0

    def describe(self) -> str:
        name = {T_IN: "read", T_OUT: "write", T_FLUSH: "flush"}.get(self.type, str(self.type))
        return f"{name} of {self.nsectors} sectors at sector {self.sector}"


Fill = Callable[[Request, U8Array], None]
"""Fill an OUT request's data buffer before it is posted."""
Check = Callable[[Request, U8Array], "str | None"]
"""Check a completed OK IN request's data; the first discrepancy or ``None``."""


class BlkDriver:
    """A blk function brought up on queue 0, with ``depth`` request slots in guest RAM."""

    def __init__(
        self,
        agent: GuestAgent,
        ram: GuestRam,
        fn: Function,
        *,
        depth: int,
        max_sectors: int,
        qsize: int = 256,
    ) -> None:
        if not 1 <= depth <= qsize // 3:
            raise VbusError(f"depth must be in 1..{qsize // 3} (3 descriptors per request)")
        self.agent = agent
        self.vcpu = vcpu = agent.vcpu
        self.fn = fn
        event_idx = bool(start_device(fn) & pl.F_EVENT_IDX)
        self.vq = Virtqueue(vcpu, ram, fn, 0, qsize, vector=0, event_idx=event_idx)
        fn.driver.set_driver_ok()
        raw = fn.driver.read_device_config(0, pl.BLK_CONFIG_DTYPE.itemsize)
        self.capacity = int(np.frombuffer(raw, dtype=pl.BLK_CONFIG_DTYPE)["capacity"][0])
        self.max_bytes = max_sectors * SECTOR
        self.headers = BufferPool(ram, depth, REQ_HEADER_DTYPE.itemsize)
        # At least two sectors: the out-of-range check writes a request straddling the end.
        self.data = BufferPool(ram, depth, max(2 * SECTOR, self.max_bytes))
        self.status = BufferPool(ram, depth, 1)
        # Slot i is header i + data i + status i; the pools' own free lists are not used.
        self.free = list(range(depth - 1, -1, -1))
        self.slot_of: npt.NDArray[np.int64] = np.full(qsize, -1, dtype=np.int64)
        self.req_of: dict[int, Request] = {}
        self.elapsed = 0.0
        self.progress_every = 0  # > 0: emit ``blk_progress`` every that many completions

    def _post(self, req: Request, fill: Fill | None) -> None:
        if req.nbytes > self.data.size:
            raise UsageError(f"{req.describe()}: larger than the {self.data.size}-byte buffers")
        slot = self.free.pop()
        hdr = self.headers.data[slot].view(REQ_HEADER_DTYPE)
        hdr["type"], hdr["reserved"], hdr["sector"] = req.type, 0, req.sector
        self.status.data[slot, 0] = STATUS_UNSET
        at = np.array([slot])
        segments = [(int(self.headers.addrs(at)[0]), REQ_HEADER_DTYPE.itemsize, False)]
        if req.nbytes:
            if req.type == T_OUT and fill is not None:
                fill(req, self.data.data[slot, : req.nbytes])
            segments.append((int(self.data.addrs(at)[0]), req.nbytes, req.type == T_IN))
        segments.append((int(self.status.addrs(at)[0]), 1, True))
        head = self.vq.ring.add_chain(segments)
        self.slot_of[head] = slot
        self.req_of[slot] = req

    def _complete(self, head: int, used: int, check: Check | None) -> str | None:
        slot = int(self.slot_of[head])
        req = self.req_of.pop(slot)
        self.slot_of[head] = -1
        status = int(self.status.data[slot, 0])
        error: str | None = None
        if status != req.expect:
            error = f"{req.describe()}: status {status}, expected {req.expect}"
        else:
            want = req.nbytes + 1 if req.type == T_IN and status == S_OK else 1
            if used != want:
                error = f"{req.describe()}: used length {used}, expected {want}"
            elif req.type == T_IN and status == S_OK and check is not None:
                error = check(req, self.data.data[slot, : req.nbytes])
        self.free.append(slot)
        return error

    def execute(
        self,
        reqs: list[Request],
        *,
        fill: Fill | None = None,
        check: Check | None = None,
        timeout: float = 60.0,
    ) -> str | None:
        """Run ``reqs`` with up to ``depth`` in flight, in order of submission; return the
        first discrepancy or ``None``. Completions may come back in any order."""
        ring = self.vq.ring
        start = time.monotonic()
        deadline = start + timeout
        posted = completed = 0
        error: str | None = None
        while completed < len(reqs) and error is None:
            progressed = False
            n = min(len(self.free), len(reqs) - posted)
            for req in reqs[posted : posted + n]:
                self._post(req, fill)
            if n:
                posted += n
                self.vq.kick()  # one doorbell for the whole batch (if the device wants it)
                progressed = True
            ids, lens = ring.get_used()
            for head, used in zip(ids.tolist(), lens.tolist(), strict=True):
                error = error or self._complete(head, used, check)
                completed += 1
                progressed = True
                if self.progress_every and completed % self.progress_every == 0:
                    self.agent.emit("blk_progress", completed=completed, of=len(reqs))
            if ring.broken:
                error = f"ring broken: {ring.broken}"
            if progressed or error:
                continue
            # Nothing to do: ask for interrupts, re-check, then halt.
            if ring.enable_interrupts():
                continue
            if not self.vcpu.halt(ring.has_used, max(0.0, deadline - time.monotonic())):
                error = f"timed out: {completed} of {len(reqs)} requests completed"
            ring.disable_interrupts()
        self.elapsed = time.monotonic() - start
        return error


def _chunked(first: int, count: int, sectors: int, rtype: int) -> list[Request]:
    return [Request(rtype, first + i * sectors, sectors) for i in range(count)]


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    """Boot the bus, then :func:`run_on` the first blk device."""
    found = find(boot(agent.vcpu), pl.DEVICE_BLK)
    if not found:
        raise VbusError("no blk device on the bus")
    return run_on(agent, GuestRam(agent.memory.map), found[0], params)


def run_on(
    agent: GuestAgent, ram: GuestRam, fn: Function, params: dict[str, Any]
) -> dict[str, Any]:
    """Write, flush, (optionally hold,) read back and verify; then check that requests past
    the end of the disk fail with IOERR."""
    count = int(params.get("count", 64))
    sectors = int(params.get("sectors", 8))
    seed = int(params.get("seed", 1))
    first = int(params.get("start", 0))
    timeout = float(params.get("timeout", 60.0))
    hold = bool(params.get("hold_after_flush", False))
    if count < 1 or sectors < 1 or first < 0:
        raise VbusError("count and sectors must be >= 1, start >= 0")
    drv = BlkDriver(
        agent,
        ram,
        fn,
        depth=int(params.get("depth", 16)),
        max_sectors=sectors,
        qsize=int(params.get("qsize", 256)),
    )
    drv.progress_every = int(params.get("progress_every", 0))
    total = count * sectors
    result: dict[str, Any] = {
        "workload": "blk",
        "ok": False,
        "error": None,
        "capacity": drv.capacity,
        "sectors": total,
        "seed": seed,
        "written_bytes": 0,
        "read_bytes": 0,
        "flushes": 0,
        "mb_per_s_write": 0.0,
        "mb_per_s_read": 0.0,
    }
    if first + total > drv.capacity:
        result["error"] = f"sectors {first}..{first + total - 1} exceed capacity {drv.capacity}"
        return result

    def fill(req: Request, buf: U8Array) -> None:
        buf[...] = pattern(seed, req.sector, req.nsectors)

    def check(req: Request, buf: U8Array) -> str | None:
        bad = first_mismatch(buf, seed, req.sector)
        return None if bad is None else f"sector {bad}: read back differs from what was written"

    error = drv.execute(_chunked(first, count, sectors, T_OUT), fill=fill, timeout=timeout)
    if error is None:
        result["written_bytes"] = total * SECTOR
        result["mb_per_s_write"] = total * SECTOR / max(drv.elapsed, 1e-9) / 1e6
        # Issued only after every write completed, so it covers all of them.
        error = drv.execute([Request(T_FLUSH, 0, 0)], timeout=timeout)
    if error is None:
        result["flushes"] = 1
        agent.emit("blk_flushed", sectors=total, seed=seed, start=first)
        if hold:
            # Stay up (the VMM keeps serving) until the VM is torn down or we are killed.
            while not agent.loop.stopping:
                drv.vcpu.halt(lambda: False, 3600.0)
            result.update(ok=True, held=True, vcpu=dict(drv.vcpu.counters))
            return result
        error = drv.execute(_chunked(first, count, sectors, T_IN), check=check, timeout=timeout)
    if error is None:
        result["read_bytes"] = total * SECTOR
        result["mb_per_s_read"] = total * SECTOR / max(drv.elapsed, 1e-9) / 1e6
        # Past the end of the disk: a read at capacity, and a write straddling the end
        # (the device must refuse both before touching the file).
        cap = drv.capacity
        error = drv.execute(
            [Request(T_IN, cap, 1, expect=S_IOERR), Request(T_OUT, cap - 1, 2, expect=S_IOERR)],
            fill=fill,
            timeout=timeout,
        )
    result.update(
        ok=error is None,
        error=error,
        doorbells=drv.vq.counters["doorbells"],
        doorbells_suppressed=drv.vq.counters["doorbells_suppressed"],
        interrupts={str(k): v for k, v in agent.irq.wakeups.items()},
        vcpu=dict(drv.vcpu.counters),
    )
    return result
