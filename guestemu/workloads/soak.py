"""The ``soak`` workload: continuous traffic that survives its device being restarted.

Runs until the wall-clock time ``until`` (seconds since the epoch: a restarted guest runs
to the same end), in one of two modes:

``mode = "echo"`` (an echo device)
    Frames carry a sequence number and a checksum (:mod:`shared.frames`). At
    most ``window`` frames are outstanding. A restarted echo device re-takes what its dead
    predecessor had taken but not completed, so a reply may come twice: replies below the
    next expected sequence number are dropped and counted (``duplicates``); anything else
    out of order or corrupted is an error. At ``until`` the guest stops sending and drains:
    every frame sent must come back (``lost`` = sent - received, must be 0).
    ``acked`` counts TX completions: the echo device completes a frame only once its copy
    was delivered, so an acknowledged frame is never lost even if the device dies.

``mode = "blk"`` (a blk device)
    Passes over ``count`` requests of ``sectors`` sectors from sector ``start``: pass *g*
    writes every sector with generation *g* (:func:`stamp_generation`), flushes, reads all
    back and verifies; then emits ``blk_pass`` -- from then on generation *g* is
    acknowledged. A restarted guest first reads the area to find the newest generation on
    disk and continues after it. Whoever runs the soak checks the image at the end: every
    sector holds an intact generation at least the last one acknowledged
    (:func:`image_generations`).

Progress is emitted as ``soak_progress`` about every ``progress`` seconds. The result has
the totals of this guest incarnation.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from guestemu.drivers import GuestRam, PacketQueues, boot, find
from guestemu.workloads.blk import SECTOR, T_FLUSH, T_IN, T_OUT, BlkDriver, Request, pattern
from shared import pci_layout as pl
from shared.errors import VbusError
from shared.frames import HEADER, check, stamp

if TYPE_CHECKING:
    from guestemu.guest import GuestAgent

U8Array = npt.NDArray[np.uint8]

DRAIN_TIMEOUT: Final = 30.0
"""Seconds the echo mode waits at the end for every outstanding frame to come back."""


def stamp_generation(gen: int, first_sector: int, nsectors: int) -> U8Array:
    """Sector bytes of generation ``gen``: :func:`~guestemu.workloads.blk.pattern` with
    ``gen`` as its seed and word 1 of each sector replaced by ``gen`` itself."""
    words = pattern(gen, first_sector, nsectors).view("<u8").reshape(nsectors, SECTOR // 8)
    words[:, 1] = gen
    out: U8Array = words.view(np.uint8).reshape(-1)
    return out


def image_generations(data: U8Array, first_sector: int) -> npt.NDArray[np.int64]:
    """Per sector of ``data``: the generation it holds intact, 0 for a never-written (all
    zero) sector, -1 for a sector that is neither (torn or corrupted)."""
    n = data.shape[0] // SECTOR
    sectors = data[: n * SECTOR].reshape(n, SECTOR)
    gens = sectors.view("<u8")[:, 1].astype(np.int64)
    out = np.full(n, -1, dtype=np.int64)
    out[~sectors.any(axis=1)] = 0
    for gen in np.unique(gens[gens > 0]).tolist():
        rows = np.nonzero(gens == gen)[0]
        for r in rows.tolist():
            want = stamp_generation(int(gen), first_sector + r, 1)
            if np.array_equal(sectors[r], want):
                out[r] = gen
    return out


class _Progress:
    def __init__(self, agent: GuestAgent, every: float) -> None:
        self.agent, self.every = agent, every
        self.next = time.monotonic() + every

    def maybe(self, **counts: Any) -> None:
        if time.monotonic() >= self.next:
            self.next = time.monotonic() + self.every
            self.agent.emit("soak_progress", **counts)


def run_echo(agent: GuestAgent, params: dict[str, Any], until: float) -> dict[str, Any]:
    size = max(int(params.get("size", 64)), HEADER + 1)
    qsize = int(params.get("qsize", 256))
    batch = int(params.get("batch", 16))
    window = int(params.get("window", qsize // 2))
    progress = _Progress(agent, float(params.get("progress", 0.5)))
    found = find(boot(agent.vcpu), pl.DEVICE_ECHO)
    if not found:
        raise VbusError("no echo device on the bus")
    q = PacketQueues(agent.vcpu, GuestRam(agent.memory.map), found[0], size, qsize)
    sent = received = duplicates = 0
    error: str | None = None
    draining = False
    deadline = until + DRAIN_TIMEOUT
    while error is None and (not draining or received < sent):
        now = time.time()
        if not draining and now >= until:
            draining = True
            continue
        if now >= deadline:
            error = f"drain timed out: {sent - received} of {sent} frames never came back"
            break
        progressed = False
        n = 0 if draining else min(batch, q.tx_room(), window - (sent - received))
        if n > 0:
            frames = np.zeros((n, size), dtype=np.uint8)
            stamp(frames, np.arange(sent, sent + n))
            q.send(frames)
            sent += n
            progressed = True
        got, lens = q.receive()
        if len(got):
            seqs = got[:, 0:4].copy().view("<u4").reshape(-1).astype(np.int64)
            dup = seqs < received  # re-sent by a restarted device: already delivered
            duplicates += int(dup.sum())
            fresh, fresh_lens = got[~dup], lens[~dup]
            if len(fresh):
                error = check(fresh, fresh_lens, received)
                received += len(fresh)
            progressed = True
        if q.broken():
            error = f"ring broken: {q.broken()}"
        acked = sent - (qsize - q.tx_room())
        progress.maybe(
            mode="echo", sent=sent, acked=acked, received=received, duplicates=duplicates
        )
        if not progressed and error is None:
            # Wake at least at ``until`` to start draining (halts fail past a device grace).
            q.wait(min(deadline, time.monotonic() + max(0.01, until - time.time())))
    acked = sent - (qsize - q.tx_room())
    return {
        "workload": "soak",
        "mode": "echo",
        "ok": error is None,
        "error": error,
        "sent": sent,
        "acked": acked,
        "received": received,
        "duplicates": duplicates,
        "lost": sent - received if error is None else None,
        "device_returns": agent.device_returns,
    }


def run_blk(agent: GuestAgent, params: dict[str, Any], until: float) -> dict[str, Any]:
    count = int(params.get("count", 32))
    sectors = int(params.get("sectors", 8))
    first = int(params.get("start", 0))
    found = find(boot(agent.vcpu), pl.DEVICE_BLK)
    if not found:
        raise VbusError("no blk device on the bus")
    drv = BlkDriver(agent, GuestRam(agent.memory.map), found[0], depth=16, max_sectors=sectors)
    reqs = [(first + i * sectors) for i in range(count)]
    seen: dict[int, npt.NDArray[np.int64]] = {}

    def record(req: Request, buf: U8Array) -> str | None:
        seen[req.sector] = image_generations(buf, req.sector)
        return None

    error = drv.execute([Request(T_IN, s, sectors) for s in reqs], check=record)
    if error is not None:
        return {"workload": "soak", "mode": "blk", "ok": False, "error": error, "passes": 0}
    gens = np.concatenate([seen[s] for s in reqs])
    if (gens < 0).any():
        bad = first + int(np.nonzero(gens < 0)[0][0])
        return {
            "workload": "soak",
            "mode": "blk",
            "ok": False,
            "passes": 0,
            "error": f"sector {bad} holds no intact generation at start",
        }
    gen = int(gens.max())
    agent.emit("blk_start", generation=gen)
    passes = 0
    while error is None and time.time() < until:
        gen += 1

        def fill(req: Request, buf: U8Array, gen: int = gen) -> None:
            buf[...] = stamp_generation(gen, req.sector, req.nsectors)

        def verify(req: Request, buf: U8Array, gen: int = gen) -> str | None:
            if np.array_equal(buf, stamp_generation(gen, req.sector, req.nsectors)):
                return None
            return f"sectors at {req.sector}: read back differs from generation {gen}"

        error = drv.execute([Request(T_OUT, s, sectors) for s in reqs], fill=fill)
        error = error or drv.execute([Request(T_FLUSH, 0, 0)])
        error = error or drv.execute([Request(T_IN, s, sectors) for s in reqs], check=verify)
        if error is None:
            passes += 1
            agent.emit("blk_pass", generation=gen)
    return {
        "workload": "soak",
        "mode": "blk",
        "ok": error is None,
        "error": error,
        "passes": passes,
        "generation": gen,
        "device_returns": agent.device_returns,
    }


def run(agent: GuestAgent, params: dict[str, Any]) -> dict[str, Any]:
    mode = str(params.get("mode", "echo"))
    until = float(params.get("until", time.time() + float(params.get("seconds", 10.0))))
    try:
        if mode == "echo":
            return run_echo(agent, params, until)
        if mode == "blk":
            return run_blk(agent, params, until)
    except VbusError as e:
        return {"workload": "soak", "mode": mode, "ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"workload": "soak", "mode": mode, "ok": False, "error": f"unknown mode {mode!r}"}
